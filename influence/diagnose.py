"""``inf.diagnose``: how close a curvature strategy's scores are to exact influence, on a
small random subset of the user's own model and data.

An approximation's fidelity depends on the model: on a small MLP EK-FAC agrees well with
exact Gauss-Newton influence, on attention models much less (docs/your-model.md). This
measures it where it matters, before a ranking is trusted:

1. ``n_train`` training rows and ``n_queries`` query rows are drawn at random (disjoint,
   seeded); the strategy is fitted on the training rows (or given ``Factors`` are used);
2. the strategy's scores ``[Q, N]`` (:func:`influence.pairwise_scores`);
3. exact influence with the same per-layer damping λ_ℓ: ∇m_qᵀ (G + D)⁻¹ ∇L_n with G the
   exact Gauss-Newton matrix of the tracked layers' weights on the training rows, applied
   matrix-free (:func:`influence.reference.ihvp.gauss_newton_product`, jvp/vjp) and
   inverted by conjugate gradient, in full and block-diagonal (cross-layer blocks
   zeroed: what every per-layer approximation assumes);
4. per query, the Pearson and Spearman correlations and the top-k overlap of each pair:
   strategy vs full, strategy vs block-diagonal, block-diagonal vs full. The last says how
   much of the gap is cross-layer coupling, which no per-layer strategy can close.

Exact Gauss-Newton needs a likelihood task (:class:`influence.tasks.OutputTask`: the
built-ins are). ``~rest`` (``rest="diagonal"``) is left out of the comparison: the layers'
scores are compared. Cost: each CG iteration is one Gauss-Newton product over the
training rows (L of them for the block-diagonal solve of L layers), for Q right-hand
sides at once; keep the subset small.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import scipy.stats

from influence.capture.rest import REST
from influence.capture.tracking import track
from influence.errors import ConfigError
from influence.factors import Factors
from influence.fit import fit_factors
from influence.reference.exact import layer_slices, per_example_gradients, require_output_task
from influence.reference.ihvp import conjugate_gradient, damping_vector, gauss_newton_product
from influence.runtime.data import as_source
from influence.scoring.pairwise import pairwise_scores

__all__ = ["Diagnosis", "diagnose", "exact_influence"]

PAIRS = ("strategy_vs_full", "strategy_vs_block", "block_vs_full")


@dataclasses.dataclass
class Diagnosis:
    """What :func:`diagnose` measured.

    Attributes:
      per_query: pair (``"strategy_vs_full"``, ``"strategy_vs_block"``,
        ``"block_vs_full"``) -> ``{"pearson": [Q], "spearman": [Q], "top_k": [Q]}`` (top-k
        overlap: the share of the exact top-k training rows, by score, also in the
        other's top k).
      summary: pair -> ``{"pearson_mean", "pearson_min", "spearman_mean", "top_k_mean"}``.
      scores: ``{"strategy", "full", "block"}`` -> ``[Q, N]`` scores of the subset.
      train_rows, query_rows: the rows of ``data`` used.
      dampings: λ per layer; cg_residual: the largest relative residual of each solve;
      strategy, top_k, layers: the settings.
    """

    per_query: dict[str, dict[str, np.ndarray]]
    summary: dict[str, dict[str, float]]
    scores: dict[str, np.ndarray]
    train_rows: np.ndarray
    query_rows: np.ndarray
    dampings: dict[str, float]
    cg_residual: dict[str, float]
    strategy: str
    top_k: int
    layers: tuple[str, ...]

    def __str__(self) -> str:
        lines = [f"{self.strategy} vs exact Gauss-Newton influence on {len(self.train_rows)} training and "
                 f"{len(self.query_rows)} query rows ({len(self.layers)} layers); per query:",
                 f"{'pair':<20} {'pearson mean':>12} {'min':>6} {'spearman':>9} {'top-' + str(self.top_k):>7}"]
        for pair, s in self.summary.items():
            lines.append(f"{pair:<20} {s['pearson_mean']:>12.3f} {s['pearson_min']:>6.3f} {s['spearman_mean']:>9.3f} "
                         f"{s['top_k_mean']:>7.2f}")
        return "\n".join(lines)


def _rows(data: Any, task: Any) -> dict[str, np.ndarray]:
    """The data as one dict of numpy arrays (the task's fields)."""
    if isinstance(data, dict):
        return {k: np.asarray(v) for k, v in data.items() if not task.fields or k in task.fields
                or k in getattr(task, "optional_fields", ())}
    batches = [(b.arrays, b.n_valid) for b in as_source(data, 256, task)]
    return {k: np.concatenate([np.asarray(b[k])[:n] for b, n in batches]) for k in batches[0][0]}


def exact_influence(model: Any, task: Any, queries: Any, train: Any, dampings: dict[str, float], *,
                    block_diagonal: bool = False, tol: float = 1e-6, max_iterations: int = 500,
                    batch_size: int = 32) -> tuple[np.ndarray, float]:
    """Exact influence ``[Q, N]`` = ∇m_qᵀ (G + D)⁻¹ ∇L_n over the layers named in
    ``dampings`` (D: each layer's λ on its weights; G: the mean Gauss-Newton matrix on
    ``train``, matrix-free), solved by conjugate gradient for the Q query gradients at
    once; with ``block_diagonal``, G's cross-layer blocks are zeroed. Returns the scores
    and the largest relative CG residual."""
    layers = list(dampings)
    tracked = track(model, layers)
    gn = gauss_newton_product(model, task, train, layers=layers, batch_size=batch_size)
    d = damping_vector(model, dampings, layers)
    if block_diagonal:
        slices = list(layer_slices(tracked).values())

        def product(v):
            out = np.zeros_like(v)
            for sl in slices:  # one product per layer: G_ℓℓ v_ℓ
                masked = np.zeros_like(v)
                masked[:, sl] = v[:, sl]
                out[:, sl] = gn(masked)[:, sl]
            return out
    else:
        product = gn

    q = per_example_gradients(model, task, queries, layers=layers, measurement=True, batch_size=batch_size)
    g = per_example_gradients(model, task, train, layers=layers, batch_size=batch_size)
    solved = conjugate_gradient(lambda v: product(v) + d * v, q, tol=tol, max_iterations=max_iterations)
    return solved.x @ g.T, float(np.max(solved.residual))


def _compare(approx: np.ndarray, exact: np.ndarray, top_k: int) -> dict[str, np.ndarray]:
    pearson, spearman, overlap = [], [], []
    k = min(top_k, exact.shape[1])
    for a, e in zip(approx, exact):
        pearson.append(np.corrcoef(a, e)[0, 1])
        spearman.append(scipy.stats.spearmanr(a, e).statistic)
        top_e, top_a = set(np.argsort(-e)[:k]), set(np.argsort(-a)[:k])
        overlap.append(len(top_e & top_a) / k)
    return {"pearson": np.array(pearson), "spearman": np.array(spearman), "top_k": np.array(overlap)}


def diagnose(model: Any, task: Any, factors: Factors | str, data: Any, *, queries: Any = None, n_train: int = 64,
             n_queries: int = 8, top_k: int = 10, seed: int = 0, damping: float | None = None,
             tol: float = 1e-6, max_iterations: int = 500, batch_size: int = 32, **fit_options: Any) -> Diagnosis:
    """Compare a strategy's influence scores with exact Gauss-Newton influence on a random
    subset of ``data`` (see the module docstring for the method).

    Args:
      model, task: the model and an :class:`~influence.tasks.OutputTask` (a built-in task).
      factors: a strategy name (``"ekfac"``, ``"kfac"``, ``"diagonal"``), fitted on the
        training subset with ``fit_options``, or fitted :class:`~influence.Factors` (the
        exact side then uses the subset's Gauss-Newton with the factors' damping).
      data: training data (a dict of arrays, or anything ``fit_factors`` reads).
      queries: query rows (default: ``n_queries`` random rows of ``data`` outside the
        training subset).
      n_train, n_queries: subset sizes; top_k: for the overlap; seed: the draw.
      damping: λ for every layer (default: the factors' own, 0.1 × mean Λ per layer).
      tol, max_iterations: conjugate gradient settings.

    Returns:
      :class:`Diagnosis` (``print`` it for a table).
    """
    require_output_task(task, "diagnose (exact Gauss-Newton influence)")
    rows = _rows(data, task)
    n = len(next(iter(rows.values())))
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    train_rows = np.sort(order[:min(n_train, n)])
    train = {k: v[train_rows] for k, v in rows.items()}
    if queries is None:
        rest = order[len(train_rows):]
        if not len(rest):
            raise ConfigError(f"data has {n} rows, all in the training subset (n_train={n_train}); pass queries= or a "
                             "smaller n_train")
        query_rows = np.sort(rest[:n_queries])
        queries = {k: v[query_rows] for k, v in rows.items()}
    else:
        queries = _rows(queries, task)
        query_rows = np.arange(len(next(iter(queries.values()))))
    if isinstance(factors, str):
        strategy = factors
        fit_options.setdefault("progress", False)
        factors = fit_factors(model, task, train, strategy=strategy, **fit_options)
    strategy = factors.strategy
    layers = tuple(name for name in factors.layer_names if name != REST)
    dampings = {name: factors.damping(name, damping) for name in layers}
    approx = pairwise_scores(model, task, factors, queries, train, damping=damping, per_layer=REST in factors.layers,
                             progress=False)
    strategy_scores = (approx.values if REST not in factors.layers
                       else sum(approx.per_layer[name] for name in layers))
    full, full_residual = exact_influence(model, task, queries, train, dampings, tol=tol,
                                          max_iterations=max_iterations, batch_size=batch_size)
    block, block_residual = exact_influence(model, task, queries, train, dampings, block_diagonal=True, tol=tol,
                                            max_iterations=max_iterations, batch_size=batch_size)
    scores = {"strategy": np.asarray(strategy_scores, np.float64), "full": full, "block": block}
    per_query = {"strategy_vs_full": _compare(scores["strategy"], full, top_k),
                 "strategy_vs_block": _compare(scores["strategy"], block, top_k),
                 "block_vs_full": _compare(block, full, top_k)}
    summary = {pair: {"pearson_mean": float(np.mean(m["pearson"])), "pearson_min": float(np.min(m["pearson"])),
                      "spearman_mean": float(np.mean(m["spearman"])), "top_k_mean": float(np.mean(m["top_k"]))}
               for pair, m in per_query.items()}
    return Diagnosis(per_query, summary, scores, train_rows, query_rows, dampings,
                     {"full": full_residual, "block": block_residual}, strategy, top_k, layers)
