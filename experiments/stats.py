"""Statistics of the v2 scale experiment: per-scale estimates and scaling slopes with a
paired bootstrap over queries nested within seeds, and the declared primary endpoint of
each finding.

Data layout: for one metric, ``values[c]`` is float ``[S_c, Q]`` for scale (cell) ``c``:
one row per training seed of that scale, one column per query, the same query in the same
column for every scale (NaN where a query has no value). One bootstrap draw

1. resamples the Q queries with replacement, once, for every scale and seed (paired:
   a comparison between scales sees the same queries on both sides), and
2. resamples, independently per scale, that scale's S_c seeds with replacement (seeds of
   different architectures are different models: nothing pairs them),

then takes the mean over the drawn seeds and queries of each scale. A scale with one seed
contributes no seed variation, which the report states (its interval is too narrow).
Slopes are least-squares slopes of the per-scale means against log10(parameters) or
against the per-scale mean held-out loss (itself resampled with the seeds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Interval:
    """An estimate on the original data and its percentile-bootstrap interval."""

    value: float
    low: float
    high: float

    def excludes(self, x: float = 0.0) -> bool:
        """Whether the interval lies wholly above or below ``x``."""
        return bool(self.low > x or self.high < x)

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}


def _interval(value: float, draws: np.ndarray, level: float) -> Interval:
    draws = draws[np.isfinite(draws)]
    if not len(draws) or not np.isfinite(value):
        return Interval(float(value), float("nan"), float("nan"))
    tail = (1 - level) / 2
    return Interval(float(value), float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail)))


def _check(values: Sequence[np.ndarray]) -> list[np.ndarray]:
    mats = [np.atleast_2d(np.asarray(v, np.float64)) for v in values]
    if not mats:
        raise ValueError("no scales given")
    q = {m.shape[1] for m in mats}
    if len(q) != 1:
        raise ValueError(f"every scale needs the same queries (columns); got {sorted(q)}")
    if any(m.shape[0] == 0 for m in mats):
        raise ValueError("a scale has no seed")
    return mats


def _nanmean(m: np.ndarray) -> float:
    finite = np.isfinite(m)
    return float(m[finite].mean()) if finite.any() else float("nan")


@dataclasses.dataclass
class NestedDraws:
    """Per-scale means on the data (``means`` ``[C]``) and in each bootstrap draw
    (``draws`` ``[B, C]``); with a covariate (held-out loss ``[S_c]`` per scale) its
    means likewise (``cov_means`` ``[C]``, ``cov_draws`` ``[B, C]``)."""

    means: np.ndarray
    draws: np.ndarray
    cov_means: np.ndarray | None = None
    cov_draws: np.ndarray | None = None


def nested_draws(values: Sequence[np.ndarray], covariate: Sequence[np.ndarray] | None = None, *, n_boot: int = 2000,
                 seed: int = 0) -> NestedDraws:
    """Bootstrap draws of the per-scale means: queries resampled jointly (paired across
    scales), seeds resampled within each scale (see the module docstring)."""
    mats = _check(values)
    covs = None if covariate is None else [np.asarray(c, np.float64).reshape(-1) for c in covariate]
    if covs is not None and [len(c) for c in covs] != [m.shape[0] for m in mats]:
        raise ValueError("the covariate needs one value per seed of each scale")
    rng = np.random.default_rng(seed)
    n_q = mats[0].shape[1]
    draws = np.empty((n_boot, len(mats)))
    cov_draws = np.empty((n_boot, len(mats))) if covs is not None else None
    for b in range(n_boot):
        qi = rng.integers(0, n_q, n_q)
        for c, m in enumerate(mats):
            si = rng.integers(0, m.shape[0], m.shape[0])
            draws[b, c] = _nanmean(m[np.ix_(si, qi)])
            if covs is not None:
                cov_draws[b, c] = covs[c][si].mean()
    means = np.array([_nanmean(m) for m in mats])
    cov_means = None if covs is None else np.array([c.mean() for c in covs])
    return NestedDraws(means, draws, cov_means, cov_draws)


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2 or np.ptp(x[ok]) == 0:
        return float("nan")
    xc = x[ok] - x[ok].mean()
    return float(np.dot(xc, y[ok] - y[ok].mean()) / np.dot(xc, xc))


def scale_means(values: Sequence[np.ndarray], *, n_boot: int = 2000, seed: int = 0,
                level: float = 0.95) -> list[Interval]:
    """Each scale's mean over seeds and queries, with its nested bootstrap interval."""
    d = nested_draws(values, n_boot=n_boot, seed=seed)
    return [_interval(d.means[c], d.draws[:, c], level) for c in range(len(d.means))]


def slope_vs(x: Sequence[float], values: Sequence[np.ndarray], *, n_boot: int = 2000, seed: int = 0,
             level: float = 0.95) -> Interval:
    """Least-squares slope of the per-scale means against fixed ``x`` (e.g. log10 of the
    non-embedding parameters), with its nested bootstrap interval."""
    x = np.asarray(x, np.float64)
    d = nested_draws(values, n_boot=n_boot, seed=seed)
    return _interval(_slope(x, d.means), np.array([_slope(x, row) for row in d.draws]), level)


def slope_vs_covariate(covariate: Sequence[np.ndarray], values: Sequence[np.ndarray], *, n_boot: int = 2000,
                       seed: int = 0, level: float = 0.95) -> Interval:
    """Slope of the per-scale means against the per-scale mean of a per-seed covariate
    (held-out loss), both resampled with the same seeds."""
    d = nested_draws(values, covariate, n_boot=n_boot, seed=seed)
    draws = np.array([_slope(cx, row) for cx, row in zip(d.cov_draws, d.draws)])
    return _interval(_slope(d.cov_means, d.means), draws, level)


def difference(values: Sequence[np.ndarray], a: int, b: int, *, n_boot: int = 2000, seed: int = 0,
               level: float = 0.95) -> Interval:
    """Mean of scale ``b`` minus mean of scale ``a``, paired over queries."""
    d = nested_draws(values, n_boot=n_boot, seed=seed)
    return _interval(d.means[b] - d.means[a], d.draws[:, b] - d.draws[:, a], level)


# --------------------------------------------------------------------------- records -> matrices


def metric_matrix(records_by_seed: Sequence[Sequence[dict]], metric: str, kinds: Sequence[str] | None,
                  query_ids: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """``[S, Q]`` values of ``metric`` for one scale from its seeds' records (one list per
    seed), queries of ``kinds`` in ``query_ids`` order (default: the first seed's order);
    NaN where a record lacks the metric."""
    if query_ids is None:
        query_ids = [r["id"] for r in records_by_seed[0] if kinds is None or r["kind"] in kinds]
    col = {q: j for j, q in enumerate(query_ids)}
    out = np.full((len(records_by_seed), len(query_ids)), np.nan)
    for i, records in enumerate(records_by_seed):
        for r in records:
            j = col.get(r["id"])
            if j is not None and metric in r and r[metric] is not None:
                out[i, j] = float(r[metric])
    return out, list(query_ids)


# --------------------------------------------------------------------------- endpoints


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """The declared primary endpoint of one finding: the per-query ``metric`` over the
    queries of ``kinds`` (and of the fixed or the greedy query set), its per-scale mean,
    and the slope of that mean against log10(non-embedding parameters). ``reproduces``
    says which sign of the slope (or of every per-scale mean, ``test = "every_scale"``)
    would reproduce the paper.

    ``role`` says what a passing test means (issue 26): ``"paper claim"`` (a test of a
    finding of the paper; only these can be reported as reproducing it), ``"positive
    control"`` (must pass for the set-up to be trusted; says nothing about the paper),
    ``"sanity check"`` (a property any working estimator has, e.g. finding a memorised
    insertion) or ``"descriptive"`` (a trend measured without a claim to test)."""

    name: str
    metric: str
    kinds: tuple[str, ...] | None
    claim: str
    test: str = "slope"  # "slope": slope vs log10(params); "every_scale": each scale's mean vs threshold
    reproduces: str = "positive"
    query_set: str = "fixed"
    threshold: float = 0.0  # every_scale: the interval must lie wholly above (positive) or below it
    role: str = "paper claim"


# Verdicts of every-scale tests as results written before issue 26 word them ("reproduces",
# which named controls and checks reproductions), and their wording since.
LEGACY_VERDICTS = {"reproduces at every scale": "passes at every scale",
                   "does not reproduce at every scale": "fails at some scale"}
ROLES = ("paper claim", "positive control", "sanity check", "descriptive")
# Reproducing the paper needs at least this many queries in the endpoint (issue 26: v2's
# "BM25 misses" stratum had n = 1).
MIN_N_CLAIM = 30

ENDPOINTS = (
    Endpoint("abstraction", "semantic_rr_minus_bm25", ("semantic",),
             "influence finds the KJV source of a WEB rendering better than BM25 does, more so with scale "
             "(paper: influential sequences become more abstract with size)"),
    Endpoint("abstraction_control", "semantic_rr", ("semantic_control",),
             "the KJV text itself finds its own sequence (positive control: MRR above 0.5 at every scale)",
             test="every_scale", threshold=0.5, role="positive control"),
    Endpoint("sparsity", "top1_share", None, "the top 1% of sequences hold more of the positive influence with "
             "scale (paper: heavy-tailed at every size)", role="descriptive"),
    Endpoint("word_order", "order_asymmetry", ("fact_order",),
             "the forward statement helps more than the reversed one, above the background, at every scale",
             test="every_scale", role="sanity check"),
    Endpoint("crosslingual", "transfer_pct_excess", ("crosslingual",),
             "a verse's top English sequences help its Spanish translation more than other verses', more so with "
             "scale (paper: cross-lingual influence grows with size)"),
    Endpoint("canaries", "canary_share", ("canary",),
             "the summed copies of a canary hold more of its query's positive influence with scale",
             role="sanity check"),
    Endpoint("abstraction_greedy", "semantic_rr_minus_bm25", ("semantic",),
             "the abstraction endpoint on the models' own greedy completions of the same prompts",
             query_set="greedy"),
)


def order_asymmetry(forward_excess: float, reversed_excess: float) -> float:
    """(forward − reversed) / (|forward| + |reversed|) of background-subtracted scores, in
    [−1, 1]: 1 = only the forward statement helps, 0 = no order effect; NaN for 0 / 0."""
    den = abs(forward_excess) + abs(reversed_excess)
    return (forward_excess - reversed_excess) / den if den > 0 else float("nan")


def evaluate_endpoint(ep: Endpoint, cells: Sequence[dict], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """The endpoint over the scales in ``cells`` (each ``{"scale", "params", "heldout",
    "records": [records per seed]}``, ordered by size): per-scale means with intervals,
    slopes against log10(params) and held-out loss, and the verdict."""
    mats, ids = [], None
    for cell in cells:
        m, ids = metric_matrix(cell["records"], ep.metric, ep.kinds, ids)
        mats.append(m)
    if not ids or all(not np.isfinite(m).any() for m in mats):
        return {"endpoint": ep.name, "n_queries": 0, "verdict": "no data"}
    log_params = np.log10([c["params"] for c in cells])
    per_scale = scale_means(mats, n_boot=n_boot, seed=seed)
    out = {"endpoint": ep.name, "role": ep.role, "metric": ep.metric, "kinds": ep.kinds, "claim": ep.claim,
           "test": ep.test,
           "threshold": ep.threshold,
           "query_set": ep.query_set, "n_queries": len(ids), "seeds": [m.shape[0] for m in mats],
           "scales": [c["scale"] for c in cells], "params": [c["params"] for c in cells],
           "per_scale": [i.as_dict() for i in per_scale]}
    if len(cells) >= 2:
        slope = slope_vs(log_params, mats, n_boot=n_boot, seed=seed)
        out["slope_log10_params"] = slope.as_dict()
        out["slope_heldout_loss"] = slope_vs_covariate([c["heldout"] for c in cells], mats, n_boot=n_boot,
                                                       seed=seed).as_dict()
    if ep.test == "every_scale":
        signs = [np.sign(i.value - ep.threshold) if i.excludes(ep.threshold) else 0 for i in per_scale]
        want = 1 if ep.reproduces == "positive" else -1
        # "passes", not "reproduces": an every-scale test is a control or a check (issue 26).
        out["verdict"] = ("passes at every scale" if all(s == want for s in signs)
                          else "fails at some scale")
    elif len(cells) < 2:
        out["verdict"] = "one scale: no slope"
    else:
        want = 1 if ep.reproduces == "positive" else -1
        out["verdict"] = (("grows" if slope.value > 0 else "falls") + " with scale (interval excludes 0)"
                          if slope.excludes(0) else "no trend resolved (interval includes 0)")
        out["reproduces"] = bool(slope.excludes(0) and np.sign(slope.value) == want)
    return out
