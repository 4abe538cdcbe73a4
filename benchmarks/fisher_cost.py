"""What each Fisher costs to fit, as ratios to the one-draw sampled Fisher, in one run.

  python -m benchmarks.fisher_cost [--out docs/benchmarks/fisher-cost.json]

EK-FAC fits (two passes) of an MLP 64-256-256-C with C outputs on 2,048 digits (labels
taken mod C, so every class size works), batch 128, for C = 10 … 256, with the Fisher
sampled (1, 4, 16 draws per example), empirical and exact (C directions per example);
and of a one-block transformer (``influence.testing.TinyLM``, vocabulary V = 16, T = 8,
so T−1 = 7 predicted positions: 112 exact directions per sequence) on 512 sequences. Each
time is the best of ``--repeats`` fits after a first, compiling one, the Fishers timed in
turn (round robin) so that a burst of load hits them alike; the machine's load average is
recorded (the ratios are measured side by side, so they survive load better
than the seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import influence as inf
from influence import tasks
from influence.testing import TinyLM, digits, lm_sequences

FISHERS = ("sampled", "sampled*4", "sampled*16", "empirical", "exact")


def _settings(spec: str) -> dict:
    if spec.startswith("sampled*"):
        return {"fisher": "sampled", "fisher_samples": int(spec.split("*")[1])}
    return {"fisher": spec}


class _Deep(nnx.Module):
    def __init__(self, n_out: int, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 256, rngs=rngs)
        self.l2 = nnx.Linear(256, 256, rngs=rngs)
        self.l3 = nnx.Linear(256, n_out, rngs=rngs)

    def __call__(self, x):
        return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))


def _row(label, directions, model, task, data, batch_size, repeats) -> dict:
    def fit(spec):
        factors = inf.fit_factors(model, task, data, strategy="ekfac", batch_size=batch_size, progress=False,
                                  **_settings(spec))
        jax.block_until_ready(jax.tree.leaves(factors.layers))

    for spec in FISHERS:  # compile each first
        fit(spec)
    times = {spec: np.inf for spec in FISHERS}
    for _ in range(repeats):  # round robin, so that a burst of load on the machine hits every Fisher alike
        for spec in FISHERS:
            t0 = time.perf_counter()
            fit(spec)
            times[spec] = min(times[spec], time.perf_counter() - t0)
    base = times["sampled"]
    row = {"model": label, "exact_directions": directions, "seconds": times,
           "ratio_to_sampled": {k: v / base for k, v in times.items()}}
    print(f"| {label} | {directions} | " + " | ".join(f"{times[k]:.3f} ({times[k] / base:.1f}×)" for k in FISHERS)
          + " |", flush=True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", default="10,32,64,128,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    x, y = digits()
    x = np.concatenate([x, x])[:2048]
    y = np.concatenate([y, y])[:2048]
    print("| model | exact directions per example | " + " | ".join(f"{k} (s, ÷ sampled)" for k in FISHERS) + " |")
    print("|---|---|" + "---|" * len(FISHERS))
    rows = []
    for c in (int(v) for v in args.classes.split(",")):
        data = {"x": x, "y": (y % c).astype(np.int32)}
        rows.append(_row(f"MLP 64-256-256-{c}", c, _Deep(c, nnx.Rngs(0)), tasks.Classification(), data, 128,
                         args.repeats))
    sequences = lm_sequences(512)
    rows.append(_row("TinyLM V=16, T=8", 7 * 16, TinyLM(rngs=nnx.Rngs(0)), tasks.CausalLM(), sequences, 64,
                     args.repeats))
    result = {"command": "python -m benchmarks.fisher_cost " + " ".join(sys.argv[1:] if argv is None else argv),
              "sampler": inf.tasks.CATEGORICAL_SAMPLER, "rows": rows,
              "repeats": args.repeats, "load_average": list(os.getloadavg()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - t0, 1)}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
