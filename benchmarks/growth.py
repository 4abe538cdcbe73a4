"""How fitting and scoring time grow with the number of training sequences and with width.

  python -m benchmarks.growth                         # transformer block, n = 256..2048, d = 64..256
  python -m benchmarks.growth --sizes 256,512 --widths 64,128   # quicker

For each configuration, one run measures a forward+backward pass over the training set
(jitted ``value_and_grad`` of the summed loss, same batches), ``fit_factors`` (EK-FAC) and
``pairwise_scores`` (32 queries), all after compilation (best of 2), and prints the times
and their ratios to the forward+backward pass. The growth exponent is the least-squares
slope of log(time) on log(n): 1 means linear in the training set. Results also go to
``--out`` as JSON (for docs/benchmarks plots).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

import influence as inf
from benchmarks.speed import forward_backward, setup, timed


def measure(model_name: str, n: int, width: int | None, batch_size: int, strategy: str = "ekfac") -> dict:
    model, task, train, queries, label = setup(model_name, n, width)
    base = timed(forward_backward(model, task, train, batch_size), repeats=2)
    def fit():
        return inf.fit_factors(model, task, train, strategy=strategy, batch_size=batch_size, progress=False)
    t_fit = timed(fit, repeats=2)
    factors = fit()
    t_score = timed(lambda: inf.pairwise_scores(model, task, factors, queries, train, batch_size=batch_size,
                                                 progress=False).values, repeats=2)
    return {"label": label, "n": n, "width": width, "fwd_bwd": base, "fit": t_fit, "scores": t_score}


def slope(xs, ys) -> float:
    """Least-squares slope of log y on log x."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def _print_rows(rows, key):
    print(f"| {key} | fwd+bwd (s) | fit (s) | fit ÷ fwd+bwd | pairwise scores (s) | scores ÷ fwd+bwd |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[key]} | {r['fwd_bwd']:.3f} | {r['fit']:.3f} | {r['fit'] / r['fwd_bwd']:.1f}× | "
              f"{r['scores']:.3f} | {r['scores'] / r['fwd_bwd']:.1f}× |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "lm"], default="lm")
    parser.add_argument("--sizes", default="256,512,1024,2048", help="training-set sizes at the default width")
    parser.add_argument("--widths", default="64,128,256", help="widths (d_model or hidden) at --width-n examples")
    parser.add_argument("--width-n", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/growth.json"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    sizes = [int(x) for x in args.sizes.split(",") if x]
    widths = [int(x) for x in args.widths.split(",") if x]
    by_size = [measure(args.model, n, None, args.batch_size) for n in sizes]
    print(f"{by_size[0]['label']}; EK-FAC, 32 queries, batch {args.batch_size}; jax {jax.__version__}, "
          f"{platform.machine()} with {os.cpu_count()} cores")
    print()
    _print_rows(by_size, "n")
    growth = {k: slope(sizes, [r[k] for r in by_size]) for k in ("fwd_bwd", "fit", "scores")} if len(sizes) > 1 else {}
    if growth:
        print(f"\ngrowth exponent in n (1 = linear): fwd+bwd {growth['fwd_bwd']:.2f}, fit {growth['fit']:.2f}, "
              f"scores {growth['scores']:.2f}")
    by_width = [measure(args.model, args.width_n, w, args.batch_size) for w in widths]
    if by_width:
        print(f"\nwidth, at n = {args.width_n}:")
        _print_rows(by_width, "width")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "by_size": by_size, "by_width": by_width, "growth": growth,
                                    "batch_size": args.batch_size, "date": time.strftime("%Y-%m-%d"),
                                    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                    "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
