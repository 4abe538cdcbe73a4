"""Peak memory as the training set grows: it should stay flat (the set is streamed).

  python -m benchmarks.memory                         # transformer block, n = 512, 2048, 8192
  python -m benchmarks.memory --sizes 256,1024

Each measurement runs in a fresh subprocess and reports its peak resident set size
(``ru_maxrss``). Two stages per size: ``baseline`` builds the model and data and runs one
jitted forward+backward pass over the training set (JAX's runtime, compiled code and the
data itself); ``influence`` does that too, then fits EK-FAC factors and computes pairwise
scores for 32 queries. The difference is what the influence computation adds. For
scale: holding every per-example gradient of the tracked layers would take
n × P × 4 bytes. Results also go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STAGES = ("baseline", "influence")


def child(model_name: str, n: int, stage: str, batch_size: int) -> None:
    """Run one stage and print ``peak_rss_mb`` (and the tracked parameter count)."""
    import influence as inf
    from benchmarks.speed import forward_backward, setup
    from influence.capture.tracking import track

    model, task, train, queries, _ = setup(model_name, n)
    forward_backward(model, task, train, batch_size)()
    if stage == "influence":
        factors = inf.fit_factors(model, task, train, strategy="ekfac", batch_size=batch_size, progress=False)
        scores = inf.pairwise_scores(model, task, factors, queries, train, batch_size=batch_size, progress=False)
        assert scores.values.shape[1] == n
    params = sum(i.d_a * i.d_out for i in track(model).layers)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    print(json.dumps({"peak_rss_mb": peak_kb / 1024, "tracked_parameters": params}))


def measure(model_name: str, n: int, stage: str, batch_size: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", stage, "--model", model_name,
                          "--sizes", str(n), "--batch-size", str(batch_size)],
                         check=True, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "lm"], default="lm")
    parser.add_argument("--sizes", default="512,2048,8192")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--child", choices=STAGES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/memory.json"))
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    if args.child:
        child(args.model, sizes[0], args.child, args.batch_size)
        return
    t0 = time.perf_counter()
    rows = []
    print(f"model {args.model}, EK-FAC fit + pairwise scores (32 queries), batch {args.batch_size}; "
          f"{platform.machine()} with {os.cpu_count()} cores")
    print("| n | baseline peak RSS (MB) | with influence (MB) | added (MB) | all per-example gradients would be (MB) |")
    print("|---|---|---|---|---|")
    for n in sizes:
        base, full = (measure(args.model, n, stage, args.batch_size) for stage in STAGES)
        grads_mb = n * full["tracked_parameters"] * 4 / 2**20
        rows.append({"n": n, "baseline_mb": base["peak_rss_mb"], "influence_mb": full["peak_rss_mb"],
                     "per_example_gradients_mb": grads_mb})
        print(f"| {n} | {base['peak_rss_mb']:.0f} | {full['peak_rss_mb']:.0f} | "
              f"{full['peak_rss_mb'] - base['peak_rss_mb']:.0f} | {grads_mb:,.0f} |", flush=True)
    added = [r["influence_mb"] - r["baseline_mb"] for r in rows]
    if len(rows) > 1:
        print(f"\nadded memory, largest ÷ smallest n: {added[-1] / max(added[0], 1e-9):.2f} "
              f"(n grew {sizes[-1] / sizes[0]:.0f}×); "
              f"slope {np.polyfit(sizes, added, 1)[0] * 1024:.3f} KB per sequence")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "rows": rows, "batch_size": args.batch_size,
                                    "date": time.strftime("%Y-%m-%d"),
                                    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                    "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
