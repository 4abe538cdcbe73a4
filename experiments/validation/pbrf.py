"""PBRF check (Bae et al. 2022): influence estimates against the optimised proximal Bregman
response, for a few hundred training examples of a small MLP.

  python -m experiments.validation.pbrf                       # 256 examples, 32 queries

For each upweighted example m the PBRF is optimised from the final weights
(:func:`influence.reference.pbrf.pbrf`, float64, converged to a relative gradient of
1e-6); its effect on a query is ``−Δm_q / ε``, which every strategy's score predicts at
the same absolute damping λ. Reported per strategy: Pearson (and Spearman) over the
examples, averaged over queries. "exact" is exact influence with the full damped
Gauss-Newton matrix: it differs from the PBRF only by the PBRF's nonlinearity in ε.
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
from experiments.validation.settings import RUNS, mlp_setting
from influence import tasks
from influence.reference.exact import exact_scores
from influence.reference.pbrf import measurement_changes, pbrf
from influence.testing import digits

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")


def pbrf_setting(n_train: int = 512, n_queries: int = 32, hidden=(32,)):
    """A tanh MLP 64-32-10 on the first ``n_train`` digits (P = 2,410 parameters, small
    enough for the dense Gauss-Newton matrix the PBRF optimisation uses)."""
    x, y = digits()
    task = tasks.Classification()
    return mlp_setting("pbrf-digits", {"x": x[:n_train], "y": y[:n_train]},
                        {"x": x[1500 : 1500 + n_queries], "y": y[1500 : 1500 + n_queries]}, task, {"loss": task},
                        hidden=hidden, d_out=10, steps=300, lr=1e-2, weight_decay=1e-3, key={})


def correlations(predicted: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """Mean over queries of Pearson and Spearman over examples; both ``[Q, K]``."""
    pe = [pearsonr(p, a)[0] for p, a in zip(predicted, actual)]
    sp = [spearmanr(p, a)[0] for p, a in zip(predicted, actual)]
    return float(np.mean(pe)), float(np.mean(sp))


def run(n_points: int = 256, configs=((0.1, 0.1), (1.0, 1.0), (1.0, -1.0)), fishers=("sampled", "exact"),
        max_iterations: int = 300, log=print):
    """``configs``: (r, k) pairs: damping λ = r × mean Λ (EK-FAC, averaged over layers) and
    ε = k / N. Returns JSON-serialisable rows."""
    setting = pbrf_setting()
    model, task, train, queries = setting.model, setting.task, setting.train, setting.queries
    n = setting.n_train
    points = np.linspace(0, n - 1, n_points).round().astype(int)
    fits = {(s, f): inf.fit_factors(model, task, train, strategy=s, fisher=f, progress=False)
            for f in fishers for s in STRATEGIES if not (s == "identity" and f != fishers[0])}
    mean_lambda = float(np.mean([c.eigenvalues.mean() for c in fits[("ekfac", fishers[0])].layers.values()]))
    rows = []
    for r, k in configs:
        damping, epsilon = r * mean_lambda, k / n
        t0 = time.perf_counter()
        response = pbrf(model, task, train, points, epsilon=epsilon, damping=damping, max_iterations=max_iterations)
        seconds = time.perf_counter() - t0
        ok = response.converged  # correlations over the examples whose PBRF was found
        actual = (-measurement_changes(model, task, queries, response.delta[ok]) / epsilon).T  # [Q, K_ok]
        nonlinearity = float(np.linalg.norm(response.delta[ok] - response.linear[ok])
                             / np.linalg.norm(response.linear[ok]))
        log(f"λ = {r:g} × mean Λ = {damping:.3g}, ε = {k:g}/N: {ok.sum()}/{len(ok)} converged in "
            f"{response.iterations} iterations, {seconds:.0f} s, ‖δ − δ_linear‖/‖δ_linear‖ = {nonlinearity:.3f}")
        candidates = {("exact", "-"): exact_scores(model, task, queries, train, damping=damping)}
        for (strategy, fisher), factors in fits.items():
            values = inf.pairwise_scores(model, task, factors, queries, train, damping=damping, progress=False).values
            candidates[(strategy, fisher if strategy != "identity" else "-")] = values
        for (strategy, fisher), values in candidates.items():
            pe, sp = correlations(values[:, points[ok]], actual)
            rows.append({"damping_factor": r, "damping": damping, "epsilon_times_n": k, "strategy": strategy,
                         "fisher": fisher, "pearson": pe, "spearman": sp, "nonlinearity": nonlinearity,
                         "converged": int(ok.sum()), "points": len(ok), "iterations": response.iterations})
    return {"n_train": n, "n_points": n_points, "n_queries": setting.n_queries, "mean_lambda": mean_lambda,
            "rows": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=256, help="training examples upweighted (one PBRF each)")
    parser.add_argument("--out", type=Path, default=RUNS / "pbrf.json")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    result = run(args.points)
    result.update(command="python -m experiments.validation.pbrf " + " ".join(argv or sys.argv[1:]),
                  machine=f"{platform.machine()}, {os.cpu_count()} cores", date=time.strftime("%Y-%m-%d"),
                  seconds=round(time.perf_counter() - t0, 1))
    print(f"MLP 64-32-10 on {result['n_train']} digits; {result['n_points']} upweighted examples, "
          f"{result['n_queries']} queries (loss)")
    print("| λ / mean Λ | ε·N | PBRF found | ‖δ−δ_lin‖/‖δ_lin‖ | strategy | fisher | Pearson | Spearman |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['damping_factor']:g} | {r['epsilon_times_n']:g} | {r['converged']}/{r['points']} | "
              f"{r['nonlinearity']:.3f} | {r['strategy']} | {r['fisher']} | {r['pearson']:.3f} | {r['spearman']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
