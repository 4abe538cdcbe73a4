"""How closely each strategy's scores track exact influence, on models small enough for it.

Exact influence uses the full damped Gauss-Newton matrix of the tracked layers (cross-layer
blocks included), built with jax.jacfwd and the Hessian of the loss in the outputs; all
methods share the same absolute damping λ, swept as multiples of EK-FAC's mean(Λ).
Metrics are averaged over queries: Spearman and Pearson correlation over training
examples, and the overlap of the top-10 sets.

  python -m benchmarks.exact_agreement            # digits MLP and the tiny transformer
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import pearsonr, spearmanr

import influence as inf
from influence import tasks
from influence.reference.exact import exact_scores
from influence.testing import trained_lm, trained_mlp

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")


def agreement(approx: np.ndarray, exact: np.ndarray) -> tuple[float, float, float]:
    spearman = np.mean([spearmanr(a, e)[0] for a, e in zip(approx, exact)])
    pearson = np.mean([pearsonr(a, e)[0] for a, e in zip(approx, exact)])
    top = np.mean([len(set(np.argsort(-a)[:10]) & set(np.argsort(-e)[:10])) / 10 for a, e in zip(approx, exact)])
    return float(spearman), float(pearson), float(top)


def run(setting: str, fishers=("sampled", "exact"), factors_of_mean=(0.1, 1.0, 10.0)) -> list[tuple]:
    if setting == "mlp":
        model, data, queries = trained_mlp(16, 512, 300)
        task, layers = tasks.Classification(), None
    else:
        model, data, queries = trained_lm(128, 300)
        task, layers = tasks.CausalLM(), "mlp"
    fits = {(f, s): inf.fit_factors(model, task, data, strategy=s, fisher=f, layers=layers, progress=False)
            for f in fishers for s in STRATEGIES if not (s == "identity" and f != fishers[0])}
    mean_lambda = float(np.mean([c.eigenvalues.mean() for c in fits[(fishers[0], "ekfac")].layers.values()]))
    rows = []
    for factor in factors_of_mean:
        damping = factor * mean_lambda
        exact = exact_scores(model, task, queries, data, damping=damping, layers=layers)
        for (fisher, strategy), factors in fits.items():
            values = inf.pairwise_scores(model, task, factors, queries, data, damping=damping, progress=False).values
            rows.append((setting, factor, damping, strategy, fisher if strategy != "identity" else "—",
                         *agreement(values, exact)))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="mlp,lm",
                        help="comma-separated: mlp (digits, 512 train), lm (tiny transformer, 128 sequences)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    print("| setting | λ / mean Λ | λ | strategy | fisher | Spearman | Pearson | top-10 overlap |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in args.settings.split(","):
        for row in run(setting):
            s, f, lam, strat, fisher, sp, pe, top = row
            print(f"| {s} | {f:g} | {lam:.2g} | {strat} | {fisher} | {sp:.3f} | {pe:.3f} | {top:.2f} |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
