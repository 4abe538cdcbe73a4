"""Accuracy of the preconditioned query gradients on the tiny language model: identity,
diagonal, K-FAC and EK-FAC against the exact damped Gauss-Newton inverse, applied by
conjugate gradient with jvp/vjp Gauss-Newton-vector products.

  python -m experiments.validation.ihvp                 # lm setting, block layers, 8 queries, G on 64 sequences
  python -m experiments.validation.ihvp --layers .      # every layer, the 4,096-way head included (slow CG)

The model is the LDS ``lm`` setting's (``tiny`` ladder rung). By default the transformer
block's layers are tracked (qkv, proj, fc_in, fc_out; 12,576 parameters); the untied
head's curvature over a 4,096-token vocabulary makes CG converge far more slowly. ``G``
is the mean Gauss-Newton matrix over ``--fit-examples`` training sequences, for the
factors and for CG alike (its products still run through the whole model); every
strategy uses the same per-layer damping D (EK-FAC's default, 0.1 × mean Λ_ℓ, times
``--damping-scale``). CG is preconditioned by EK-FAC (which changes only its speed) and
run until ‖(G + D)x − v‖ ≤ 1e-4 ‖v‖ (float32 products). Reported per strategy, mean over
queries: cosine similarity with the CG solution (all parameters, and per layer), and the
Pearson / Spearman correlation of the resulting influence scores over the training set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

import influence as inf
from experiments.validation import settings as settings_mod
from influence.capture.tracking import track
from influence.reference.exact import layer_slices, per_example_gradient_batches, per_example_gradients
from influence.reference.ihvp import (
    conjugate_gradient,
    cosine,
    curvature_preconditioner,
    damping_vector,
    gauss_newton_product,
)

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")


def _subset(data: dict, n: int) -> dict:
    return {k: v[:n] for k, v in data.items()}


def training_scores(model, task, train: dict, vectors: np.ndarray, layers) -> np.ndarray:
    """``vectors [R, P] @ ∇L_n`` for every training example: ``[R, N]``."""
    grads = per_example_gradient_batches(model, task, train, layers=layers, batch_size=64)
    return np.concatenate([vectors @ g.T for g in grads], axis=1)


def run(setting, n_queries=8, fit_examples=64, damping_scale=1.0, layers="blocks", tol=1e-4, max_iterations=400,
        log=print) -> dict:
    model, task = setting.model, setting.task
    fit = _subset(setting.train, fit_examples)
    queries = _subset(setting.queries, n_queries)
    fits = {s: inf.fit_factors(model, task, fit, strategy=s, layers=layers, batch_size=setting.batch_size,
                               progress=False) for s in STRATEGIES}
    ekfac = fits["ekfac"]
    dampings = {name: damping_scale * ekfac.damping(name) for name in ekfac.layer_names}
    d = damping_vector(model, dampings, layers)
    raw = per_example_gradients(model, task, queries, layers=layers, measurement=True)  # [Q, P]
    product = gauss_newton_product(model, task, fit, layers=layers, batch_size=setting.batch_size)
    matvec = lambda v: product(v) + d * v  # noqa: E731
    t0 = time.perf_counter()

    def report(it, residuals):
        if it % 25 == 0:
            log(f"  CG iteration {it}: worst relative residual {residuals.max():.1e}, {time.perf_counter() - t0:.0f} s")

    reference = conjugate_gradient(matvec, raw, tol=tol, max_iterations=max_iterations, callback=report,
                                   preconditioner=curvature_preconditioner(model, ekfac.layers, dampings, layers))
    log(f"CG: {reference.iterations} iterations, worst relative residual {reference.residual.max():.1e}, "
        f"{time.perf_counter() - t0:.0f} s")
    approx = {s: curvature_preconditioner(model, f.layers, dampings, layers)(raw) for s, f in fits.items()}
    slices = layer_slices(track(model, layers))
    vectors = np.concatenate([reference.x, *approx.values()])
    scores = training_scores(model, task, setting.train, vectors, layers)
    ref_scores, q = scores[:n_queries], n_queries
    rows = []
    for i, (strategy, x) in enumerate(approx.items(), start=1):
        s = scores[i * q : (i + 1) * q]
        rows.append({
            "strategy": strategy,
            "cosine": float(cosine(x, reference.x).mean()),
            "cosine_per_layer": {name: float(cosine(x[:, sl], reference.x[:, sl]).mean())
                                 for name, sl in slices.items()},
            "score_pearson": float(np.mean([pearsonr(a, b)[0] for a, b in zip(s, ref_scores)])),
            "score_spearman": float(np.mean([spearmanr(a, b)[0] for a, b in zip(s, ref_scores)])),
        })
    return {"n_queries": n_queries, "fit_examples": fit_examples, "layers": layers, "n_train_scored": setting.n_train,
            "parameters": int(raw.shape[1]), "damping_scale": damping_scale,
            "dampings": dampings, "cg_iterations": reference.iterations,
            "cg_residual": float(reference.residual.max()), "rows": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--fit-examples", type=int, default=64, help="training sequences G is taken over")
    parser.add_argument("--layers", default="blocks", help="tracked layers (regex); 'blocks' leaves out the "
                        "4,096-way head, '.' tracks every nnx.Linear")
    parser.add_argument("--max-iterations", type=int, default=400)
    parser.add_argument("--damping-scales", default="1,10", help="multiples of EK-FAC's default per-layer damping")
    parser.add_argument("--out", type=Path, default=settings_mod.RUNS / "ihvp.json")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    setting = settings_mod.get("lm")
    results = []
    for scale in (float(x) for x in args.damping_scales.split(",")):
        result = run(setting, args.queries, args.fit_examples, scale, args.layers, max_iterations=args.max_iterations)
        results.append(result)
        print(f"layers {args.layers!r}, damping {scale:g} × default; P = {result['parameters']:,}, "
              f"G over {result['fit_examples']} sequences, {result['n_queries']} queries, "
              f"scores over {result['n_train_scored']} training sequences; CG "
              f"{result['cg_iterations']} iterations (residual {result['cg_residual']:.1e})")
        layers = list(result["rows"][0]["cosine_per_layer"])
        print("| strategy | cosine | " + " | ".join(layers) + " | score Pearson | score Spearman |")
        print("|---" * (len(layers) + 4) + "|")
        for r in result["rows"]:
            per = " | ".join(f"{r['cosine_per_layer'][name]:.3f}" for name in layers)
            print(f"| {r['strategy']} | {r['cosine']:.3f} | {per} | {r['score_pearson']:.3f} | "
                  f"{r['score_spearman']:.3f} |")
    out = {"results": results, "command": "python -m experiments.validation.ihvp " + " ".join(argv or sys.argv[1:]),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
           "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
