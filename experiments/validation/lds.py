"""LDS of identity, diagonal, K-FAC and EK-FAC influence against retraining on half-subsets.

  python -m experiments.validation.lds --setting digits --subsets 64 --seeds 2
  python -m experiments.validation.lds --setting diabetes --subsets 64 --seeds 2
  python -m experiments.validation.lds --setting lm --subsets 64 --seeds 2

Retrained measurements are cached under ``runs/validation/lds-cache/`` (keyed by the
setting's recipe, the subset fraction and the sampling seed), so a rerun, or one with
more subsets or seeds, retrains only what is missing. Besides the default damping
(0.1 × mean Λ per layer), each strategy is scored at absolute dampings λ = r × mean Λ
(EK-FAC's Λ averaged over layers) for the ``--damping-sweep`` factors r, and at the
damping the training objective's weight decay implies (2·wd, MLP settings), to show
what the comparison depends on. Results go to ``--out`` as JSON.
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
from scipy.stats import spearmanr

import influence as inf
from experiments.validation import settings as settings_mod
from influence.reference.lds import MeasurementCache, lds, retrained_measurements, sample_subsets

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")


def seed_agreement(measurements: np.ndarray) -> float:
    """Mean over queries and seed pairs of the Spearman correlation between two seeds'
    retrained measurements over subsets, ``measurements [M, S, Q]``: how reproducible the
    retraining target itself is (NaN with one seed)."""
    m, s, q = measurements.shape
    values = [spearmanr(measurements[:, a, i], measurements[:, b, i])[0]
              for a in range(s) for b in range(a + 1, s) for i in range(q)]
    return float(np.nanmean(values)) if values else float("nan")


def reliability(agreement: float, n_seeds: int) -> float:
    """Spearman-Brown: the expected correlation of two independent ``n_seeds``-seed means
    when single seeds agree with correlation ``agreement`` (how stable the LDS target is)."""
    return n_seeds * agreement / (1 + (n_seeds - 1) * agreement)


def fisher_settings(spec: str) -> dict:
    """``fit_factors`` keywords of a Fisher spec: ``"sampled"``, ``"sampled*4"`` (4 draws
    per example), ``"empirical"``, ``"exact"``, or ``"default"`` (the library's choice);
    ``"...@k"`` fits with ``key=jax.random.key(k)`` (another draw of sampled targets)."""
    spec, _, key = spec.partition("@")
    settings = {"key": jax.random.key(int(key))} if key else {}
    if spec == "default":
        return settings
    if spec.startswith("sampled*"):
        return {**settings, "fisher": "sampled", "fisher_samples": int(spec.split("*")[1])}
    return {**settings, "fisher": spec}


def _fit(setting, strategy, fisher, progress, repeats):
    """Factors, and the best of ``repeats`` fit times after a first (compiling) fit, s."""
    def fit():
        return inf.fit_factors(setting.model, setting.task, setting.train, strategy=strategy,
                               batch_size=setting.batch_size, progress=progress, **fisher_settings(fisher))
    factors = fit()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fit()
        times.append(time.perf_counter() - t0)
    return factors, (min(times) if times else None)


def _score_all(setting, strategies, fishers, damping_factors, extra_dampings, progress=False, fit_timing=None,
               repeats=0, indexes=()):
    """Scores for every (measurement, strategy, fisher, damping label) -> ``[Q, N]``; fit
    times (s, after compilation) go to ``fit_timing[(strategy, fisher)]``. For each
    compression in ``indexes``, EK-FAC's scores at the default damping are also answered
    from a gradient index of that compression (label ``"index <compression>"``)."""
    out = {}
    fits = {}
    for fisher in fishers:
        for strategy in strategies:
            if strategy == "identity" and fisher != fishers[0]:
                continue
            fits[(strategy, fisher)], seconds = _fit(setting, strategy, fisher, progress,
                                                     repeats if strategy != "identity" else 0)
            if fit_timing is not None and seconds is not None:
                fit_timing[(strategy, fisher)] = seconds
    ekfac = fits.get(("ekfac", fishers[0]))
    mean_lambda = float(np.mean([c.eigenvalues.mean() for c in ekfac.layers.values()])) if ekfac else 1.0
    dampings = {"default": None}
    dampings.update({f"{r:g}×meanΛ": r * mean_lambda for r in damping_factors})
    dampings.update(extra_dampings)
    for name, task in setting.measurements.items():
        for (strategy, fisher), factors in fits.items():
            for label, damping in dampings.items():
                if strategy == "identity" and label != "default":
                    continue  # identity has no damping
                values = inf.pairwise_scores(setting.model, task, factors, setting.queries, setting.train,
                                             damping=damping, batch_size=setting.batch_size, progress=progress).values
                used = factors.damping(factors.layer_names[0], damping) if strategy != "identity" else None
                out[(name, strategy, fisher if strategy != "identity" else "-", label)] = (values, used)
            if strategy == "ekfac":
                for compression in indexes:
                    out[(name, strategy, fisher, f"index {compression}")] = (
                        _index_scores(setting, task, factors, compression), factors.damping(factors.layer_names[0]))
    return out, mean_lambda


def _index_scores(setting, task, factors, compression) -> np.ndarray:
    """``[Q, N]`` scores at the default damping answered from a gradient index (built in a
    temporary folder) instead of a rescan."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lds-index-") as folder:
        index = inf.build_index(setting.model, task, factors, setting.train, path=Path(folder) / "index",
                                compression=compression, batch_size=setting.batch_size, progress=False)
        return inf.pairwise_scores(setting.model, task, factors, setting.queries, None, index=index,
                                   progress=False).values


def evaluate(setting, n_subsets=64, seeds=(0, 1), fraction=0.5, subset_seed=0, strategies=STRATEGIES,
             fishers=("sampled",), damping_factors=(), extra_dampings=None, cache_root=settings_mod.RUNS / "lds-cache",
             log=print, fit_repeats=0, indexes=()) -> dict:
    """Retrain (cached), score, and compute the LDS of every configuration.

    Returns a JSON-serialisable dict: ``rows`` (measurement, strategy, fisher, damping
    label, λ of the first layer, LDS mean, stderr; the label ``"index <compression>"``
    marks EK-FAC's default-damping scores answered from an index), the retraining's seed
    agreement, the setting's key and timings.
    """
    masks = sample_subsets(setting.n_train, n_subsets, fraction, subset_seed)
    cache = MeasurementCache(cache_root, {**setting.key, "fraction": fraction, "subset_seed": subset_seed})
    t0 = time.perf_counter()
    measured = retrained_measurements(setting.retrain, masks, seeds, cache, chunk=16,
                                      progress=lambda i, n: log(f"  retrained {i}/{n} subsets × {len(seeds)} seeds"))
    t_retrain = time.perf_counter() - t0
    per_measure = setting.split(measured)  # name -> [M, S, Q]
    t0 = time.perf_counter()
    fit_timing: dict = {}
    scored, mean_lambda = _score_all(setting, strategies, fishers, damping_factors, extra_dampings or {},
                                     fit_timing=fit_timing, repeats=fit_repeats, indexes=indexes)
    t_score = time.perf_counter() - t0
    rows = []
    for (name, strategy, fisher, label), (values, used) in scored.items():
        result = lds(values, masks, per_measure[name].mean(axis=1))
        rows.append({"measurement": name, "strategy": strategy, "fisher": fisher, "damping": label,
                     "lambda": used, "lds": result.mean, "stderr": result.stderr})
    return {
        "setting": setting.name, "key": setting.key, "n_train": setting.n_train, "n_queries": setting.n_queries,
        "subsets": n_subsets, "seeds": list(seeds), "fraction": fraction, "mean_lambda": mean_lambda,
        "seed_agreement": {name: seed_agreement(m) for name, m in per_measure.items()},
        "rows": rows, "retrain_seconds": round(t_retrain, 1), "score_seconds": round(t_score, 1),
        "cache": str(cache.path),
        "fit_seconds": [{"strategy": st, "fisher": f, "seconds": t} for (st, f), t in fit_timing.items()],
        "load_average": list(os.getloadavg()),
        "sampler": inf.tasks.CATEGORICAL_SAMPLER,  # how sampled targets of a softmax were drawn
    }


def print_table(result: dict) -> None:
    print(f"setting {result['setting']}: N={result['n_train']}, Q={result['n_queries']}, M={result['subsets']} subsets "
          f"of α={result['fraction']}, seeds {result['seeds']}; retraining {result['retrain_seconds']} s "
          f"(0 when cached), scoring {result['score_seconds']} s")
    n_seeds = len(result["seeds"])
    print("seed agreement of the retrained measurements (Spearman, seed vs seed): "
          + ", ".join(f"{k} {v:.3f} (reliability of the {n_seeds}-seed mean {reliability(v, n_seeds):.2f})"
                      for k, v in result["seed_agreement"].items()))
    print("| measurement | strategy | fisher | damping | λ (first layer) | LDS | ± s.e. |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        lam = "—" if r["lambda"] is None else f"{r['lambda']:.3g}"
        print(f"| {r['measurement']} | {r['strategy']} | {r['fisher']} | {r['damping']} | {lam} | "
              f"{r['lds']:.3f} | {r['stderr']:.3f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(settings_mod.SETTINGS), default="digits")
    parser.add_argument("--subsets", type=int, default=64, help="M, the number of half-subsets")
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per subset (averaged)")
    parser.add_argument("--fraction", type=float, default=0.5, help="α, the subset fraction")
    parser.add_argument("--fishers", default=None,
                        help="comma-separated: sampled, sampled*k (k draws per example), empirical, exact, default "
                             "(the library's choice), each optionally @k: fitted with key k "
                             "(default: sampled,exact for the MLPs, sampled for lm)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    parser.add_argument("--fit-repeats", type=int, default=0,
                        help="time each fit this many times after its first (compiling) one; the best is kept")
    parser.add_argument("--damping-sweep", default="0.001,0.01,0.1,1,10", help="factors r of λ = r × mean Λ")
    parser.add_argument("--index", default="", metavar="COMPRESSIONS",
                        help="comma-separated index compressions (e.g. rank:8:int8,none): EK-FAC's default-damping "
                             "scores are also answered from a gradient index of each (rows 'index <compression>')")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default runs/validation/lds-<setting>.json)")
    args = parser.parse_args(argv)
    setting = settings_mod.get(args.setting)
    fishers = tuple((args.fishers or ("sampled" if args.setting == "lm" else "sampled,exact")).split(","))
    extra = {}
    if "weight_decay" in setting.key:
        extra["2·wd"] = 2 * setting.key["weight_decay"]
    factors = tuple(float(r) for r in args.damping_sweep.split(",") if r)
    t0 = time.perf_counter()
    result = evaluate(setting, args.subsets, tuple(range(args.seeds)), args.fraction, fishers=fishers,
                      strategies=tuple(args.strategies.split(",")), damping_factors=factors, extra_dampings=extra,
                      fit_repeats=args.fit_repeats, indexes=tuple(c for c in args.index.split(",") if c))
    result.update(command="python -m experiments.validation.lds " + " ".join(argv or sys.argv[1:]),
                  machine=f"{platform.machine()}, {os.cpu_count()} cores",
                  date=time.strftime("%Y-%m-%d"), seconds=round(time.perf_counter() - t0, 1))
    print_table(result)
    out = args.out or settings_mod.RUNS / f"lds-{args.setting}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
