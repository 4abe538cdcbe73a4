"""Which attribution method holds under retraining *on your run*: ``inf.validate``.

For a small run written as a :class:`influence.unrolled.TrainingRun`, every method scores
the queries, the run is retrained on ``M`` random subsets (a fraction ``α`` of the
training set kept) and each method's linear datamodeling score (LDS, :mod:`.lds`) is
reported under two kinds of retraining:

* **deterministic**: the run's own seed (same initialisation, same batch order), the
  removed examples given weight 0 — what a metagradient differentiates exactly;
* **re-seeded**: other seeds (another initialisation, and another order when the run's
  order depends on the seed), averaged — what a user who retrains from scratch sees.

Intervals are bootstrap 95 % intervals over queries (the queries are resampled, the
subsets kept). Retraining reuses :func:`.lds.retrained_measurements` (cached on disk
under ``cache_dir``, several models side by side under ``vmap``).

Cost: each method's wall-clock seconds (compilation included) and the same in
multiples of one training run (one :func:`influence.unrolled.train` call, compilation
included), measured in this process.

The retrain-without-top-k check: for each query, remove its ``k`` (default 1 % of N)
highest-scoring examples — those whose upweighting most lowers its measurement — and
retrain deterministically; the query's measurement should rise more than when ``k``
random examples are removed. Reported as the mean change over queries for each.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from influence.errors import InfluenceError
from influence.reference.lds import MeasurementCache, lds, retrained_measurements, sample_subsets
from influence.runtime import io

METHODS = ("ekfac", "identity", "metagradient", "trajectory", "trackstar")
_DESCRIPTIONS = {
    "ekfac": "EK-FAC at the final weights",
    "identity": "gradient dot products at the final weights",
    "metagradient": "exact metagradient through the run",
    "trajectory": "EK-FAC at K checkpoints, learning-rate-share weights",
    "trackstar": "Adam-ν-preconditioned, unit-normalised gradients at K checkpoints",
}


@dataclasses.dataclass
class Validation:
    """What :func:`validate` measured.

    Attributes:
      rows: one dict per (method, retraining): ``method``, ``retraining``
        (``"deterministic"`` / ``"reseeded"``), ``lds`` (mean over queries), ``low``,
        ``high`` (bootstrap 95 % interval), ``n_queries`` (queries with a defined LDS).
      cost: method -> ``{"seconds", "training_runs"}``; the metagradient's also has
        ``metagradient_bytes``, ``training_bytes`` and their ratio ``memory_vs_training``
        (compiled programs' memory as XLA reports it).
      top_k: method -> ``{"k", "top_k", "random"}``: mean change of the query's
        measurement when its top-k / k random examples are removed and the run retrained.
      settings: the sizes and seeds used; ``skipped``: method -> why it was left out.
      scores: method -> ``[Q, N]`` (not saved to JSON).
    """

    rows: list[dict]
    cost: dict[str, dict]
    top_k: dict[str, dict]
    settings: dict[str, Any]
    skipped: dict[str, str]
    scores: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        return {"rows": self.rows, "cost": self.cost, "top_k": self.top_k, "settings": self.settings,
                "skipped": self.skipped}

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` atomically (numbers rounded to 4 decimals)."""
        io.atomic_write_json(Path(path), _rounded(self.to_json()))
        return Path(path)

    def table(self) -> str:
        """A markdown table: LDS [95 % interval] per method and retraining, cost, top-k check."""
        head = ("| method | LDS deterministic | LDS re-seeded | seconds | × training run | "
                "Δ top-k removed | Δ random removed |")
        lines = [head, "|" + "---|" * 7]
        for method in self.cost:
            cells = []
            for kind in ("deterministic", "reseeded"):
                row = next((r for r in self.rows if r["method"] == method and r["retraining"] == kind), None)
                cells.append("—" if row is None else f"{row['lds']:.3f} [{row['low']:.3f}, {row['high']:.3f}]")
            c, t = self.cost[method], self.top_k.get(method)
            tk = ("—", "—") if t is None else (f"{t['top_k']:+.4f}", f"{t['random']:+.4f}")
            lines.append(f"| {method} | {cells[0]} | {cells[1]} | {c['seconds']:.1f} | {c['training_runs']:.1f} | "
                         f"{tk[0]} | {tk[1]} |")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """A bar chart of LDS with intervals per method and retraining (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        methods = list(self.cost)
        fig, ax = plt.subplots(figsize=(1.4 * len(methods) + 2, 3.2))
        for i, kind in enumerate(("deterministic", "reseeded")):
            rows = [next((r for r in self.rows if r["method"] == m and r["retraining"] == kind), None)
                    for m in methods]
            x = np.arange(len(methods)) + (i - 0.5) * 0.38
            y = [np.nan if r is None else r["lds"] for r in rows]
            err = np.array([[0, 0] if r is None else [r["lds"] - r["low"], r["high"] - r["lds"]] for r in rows]).T
            ax.bar(x, y, 0.36, yerr=err, capsize=3, label=f"{kind} retraining")
        ax.set_xticks(np.arange(len(methods)), methods)
        ax.set_ylabel("LDS (95 % interval over queries)")
        ax.axhline(0, color="k", lw=0.5)
        ax.legend(fontsize=8)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        return Path(path)


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def bootstrap_interval(per_query: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the mean of the finite ``per_query`` values, resampling queries."""
    valid = np.asarray(per_query)[np.isfinite(per_query)]
    if valid.size < 2:
        return float("nan"), float("nan")
    means = np.random.default_rng(seed).choice(valid, (n, valid.size)).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _retrainer(run, measure, queries):
    """``(masks [m, N], seeds) -> [m, S, Q]`` for :func:`.lds.retrained_measurements`."""
    from influence.unrolled import train_many

    evaluate = jax.jit(jax.vmap(lambda p: measure(p, queries)))

    def retrain(masks: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        pairs = [(j, s) for j in range(len(masks)) for s in seeds]
        weights = np.stack([masks[j] for j, _ in pairs]).astype(np.float32)
        params = train_many(run, weights, [s for _, s in pairs])
        return np.asarray(evaluate(params), np.float64).reshape(len(masks), len(seeds), -1)

    return retrain


def validate(run: Any, task: Any, queries: dict, *, methods: Sequence[str] = METHODS, n_subsets: int = 32,
             fraction: float = 0.5, reseeds: Sequence[int] = (1, 2), seed: int = 0, n_checkpoints: int = 4,
             top_k_fraction: float = 0.01, cache_dir: str | Path | None = None, run_key: dict | None = None,
             batch_size: int = 64, key: jax.Array | None = None, progress: bool = False,
             reuse: Validation | None = None) -> Validation:
    """LDS of each method on ``run`` under deterministic and re-seeded retraining.

    Args:
      run: a :class:`influence.unrolled.TrainingRun` with ``merge`` (params -> model).
      task: its loss (per example, summed) and the query measurement.
      queries: dict of arrays ``[Q, ...]``.
      methods: any of ``METHODS``; ``"trackstar"`` is skipped (with a warning) when the
        optimizer holds no Adam ν.
      n_subsets, fraction: ``M`` random subsets keeping a fraction ``α`` of N.
      reseeds: seeds of the re-seeded retraining (empty: deterministic only).
      seed: the run's seed (the scored run and the deterministic retraining).
      top_k_fraction: k = max(1, round(fraction · N)) for the top-k removal check (0: off).
      cache_dir, run_key: retrained measurements are cached under ``cache_dir`` keyed by
        ``run_key`` (JSON naming everything that determines the run and the queries) and
        the sampling settings; both or neither.
      reuse: an earlier :class:`Validation` of the same run and queries whose scores (and
        their cost) are reused, e.g. to measure LDS at another ``fraction``.
    """
    from influence.fit import fit_factors
    from influence.scoring.pairwise import pairwise_scores
    from influence.unrolled import metagradient_scores, train
    from influence.unrolled.trajectory import trajectory_scores

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise InfluenceError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if (cache_dir is None) != (run_key is None):
        raise InfluenceError("give cache_dir and run_key together (the cache is keyed by run_key)")
    key = jax.random.PRNGKey(0) if key is None else key
    n = run.n_train
    train_data = run.data
    queries = {k: jnp.asarray(v) for k, v in queries.items()}

    def measure(params, q):
        return task.measurement(run.model(params), q)

    t0 = time.perf_counter()
    params = jax.block_until_ready(train(run, seed=seed))
    one_run = time.perf_counter() - t0
    model = run.model(params)

    scores, cost, skipped, memory = {}, {}, {}, {}
    for method in methods:
        if reuse is not None and method in reuse.scores:
            scores[method], cost[method] = reuse.scores[method], reuse.cost[method]
            continue
        t0 = time.perf_counter()
        if method in ("ekfac", "identity"):
            factors = fit_factors(model, task, train_data, strategy=method, key=key, batch_size=batch_size,
                                  progress=progress)
            values = pairwise_scores(model, task, factors, queries, train_data, batch_size=batch_size,
                                     progress=progress).values
        elif method == "metagradient":
            result = metagradient_scores(run, measure, queries, seed=seed, memory=True)
            values, memory = result.values, {k: result.metadata.get(k) for k in ("metagradient_bytes",
                                                                                 "training_bytes")}
        elif method == "trajectory":
            values = trajectory_scores(run, task, queries, n_checkpoints=n_checkpoints, strategy="ekfac", seed=seed,
                                       key=key, batch_size=batch_size).values
        else:  # trackstar
            try:
                values = trajectory_scores(run, task, queries, n_checkpoints=n_checkpoints, strategy="adam",
                                           normalize=True, seed=seed).values
            except InfluenceError as error:
                skipped[method] = str(error)
                warnings.warn(f"validate: trackstar skipped: {error}", stacklevel=2)
                continue
        scores[method] = np.asarray(values, np.float64)
        seconds = time.perf_counter() - t0
        cost[method] = {"seconds": seconds, "training_runs": seconds / one_run}
        if method == "metagradient" and memory.get("metagradient_bytes") and memory.get("training_bytes"):
            cost[method].update(memory, memory_vs_training=memory["metagradient_bytes"] / memory["training_bytes"])

    masks = sample_subsets(n, n_subsets, fraction, seed=1000 + seed)
    retrain = _retrainer(run, measure, queries)
    sampling = {"n_subsets": n_subsets, "fraction": fraction, "subset_seed": 1000 + seed}

    def cache(kind: str):
        if cache_dir is None:
            return None
        return MeasurementCache(cache_dir, {**run_key, **sampling, "retraining": kind})

    rows = []
    retrained = {"deterministic": retrained_measurements(retrain, masks, [seed], cache("deterministic")).mean(1)}
    if len(reseeds):
        retrained["reseeded"] = retrained_measurements(retrain, masks, list(reseeds), cache("reseeded")).mean(1)
    for method, values in scores.items():
        for kind, measured in retrained.items():
            result = lds(values, masks, measured)
            low, high = bootstrap_interval(result.per_query)
            rows.append({"method": method, "retraining": kind, "lds": result.mean, "low": low, "high": high,
                         "n_queries": int(np.isfinite(result.per_query).sum())})

    top = {}
    if top_k_fraction > 0:
        k = max(1, int(round(top_k_fraction * n)))
        base = np.asarray(measure(params, queries), np.float64)
        rng = np.random.default_rng(2000 + seed)
        n_q = len(base)
        random_masks = np.ones((n_q, n), bool)
        for q in range(n_q):
            random_masks[q, rng.choice(n, k, replace=False)] = False
        random_delta = np.diag(retrained_measurements(retrain, random_masks, [seed])[:, 0]) - base
        for method, values in scores.items():
            masks_q = np.ones((n_q, n), bool)
            np.put_along_axis(masks_q, np.argsort(-values, axis=1, kind="stable")[:, :k], False, axis=1)
            delta = np.diag(retrained_measurements(retrain, masks_q, [seed])[:, 0]) - base
            top[method] = {"k": k, "top_k": float(delta.mean()), "random": float(random_delta.mean())}

    settings = {"n_train": n, "n_queries": int(len(next(iter(queries.values())))), **sampling,
                "reseeds": [int(s) for s in reseeds], "seed": seed, "n_checkpoints": n_checkpoints,
                "top_k_fraction": top_k_fraction, "steps": int(run.steps(seed).shape[0]),
                "batch_size": int(run.steps(seed).shape[1]), "one_training_run_seconds": one_run,
                "methods": {m: _DESCRIPTIONS[m] for m in scores}}
    return Validation(rows, cost, top, settings, skipped, scores)
