"""Influence scores: preconditioned query gradients dotted with training gradients.

For a query measurement m_q and a training example n,

    score(q, n) = ∇m_qᵀ (G + λI)⁻¹ ∇L_n,

with G the curvature (block-diagonal over tracked layers) and L_n the training loss of
example n (summed over its tokens). A positive score means that upweighting n lowers
m_q (raises the completion's log-probability); removing n from a training set of N
examples changes m_q by about ``score / N`` (Koh & Liang 2017; Grosse et al. 2023).

The training set is streamed one batch at a time; per-example gradients of a dense
layer, DW_n = Σ_t ā_t g_tᵀ, live only a chunk of examples at a time, or are never
formed when the factored form Σ_t ā_tᵀ P g_t is cheaper.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from influence import io
from influence.capture import track
from influence.curvature import LayerCurvature, precondition
from influence.contract import LayerQueries, layer_scores, low_rank
from influence.curvature.accumulate import example_chunk, per_example_gradients
from influence.data import as_source
from influence.factors import Factors
from influence.gradients import layer_gradients

_FILE_KIND = "influence-scores"


class Scores:
    """Pairwise influence scores.

    Attributes:
      values: float32 ``[n_query, n_train]``; positive = upweighting the training
        example lowers the query's measurement.
      per_layer: ``None``, or layer name -> ``[n_query, n_train]``; they sum to
        ``values`` (up to float32 rounding).
      metadata: strategy, damping per layer, counts, model fingerprint.
    """

    def __init__(self, values: np.ndarray, per_layer: dict[str, np.ndarray] | None, metadata: dict[str, Any]):
        self.values = np.asarray(values)
        self.per_layer = per_layer
        self.metadata = dict(metadata)

    def __repr__(self) -> str:
        return f"Scores(shape={self.values.shape}, strategy={self.metadata.get('strategy')!r}, per_layer={self.per_layer is not None})"

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and scores of the ``k`` most positively influential training
        examples per query, each ``[n_query, k]``, best first."""
        k = min(k, self.values.shape[1])
        idx = np.argsort(-self.values, axis=1, kind="stable")[:, :k]
        return idx, np.take_along_axis(self.values, idx, axis=1)

    @staticmethod
    def _file(path) -> Path:
        path = Path(path)
        return path if path.suffix == ".npz" else path / "scores.npz"

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically to ``path/scores.npz`` (or to ``path`` if it ends in .npz)."""
        arrays = {"values": self.values}
        for name, arr in (self.per_layer or {}).items():
            arrays[f"per_layer/{name}"] = arr
        file = self._file(path)
        io.save_arrays(file, _FILE_KIND, arrays, self.metadata)
        return file

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        arrays, metadata = io.load_arrays(cls._file(path), _FILE_KIND)
        per_layer = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("per_layer/")}
        return cls(arrays["values"], per_layer or None, metadata)


# --- kernels ------------------------------------------------------------------------

_STATIC = ("graphdef", "layers", "task", "kind")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _gradient_step(state, batch, example_mask, *, graphdef, layers, task, kind):
    """Per-example gradients ``{name: [B, d_a, d_out]}`` of one batch."""
    _, a, g = layer_gradients(graphdef, state, layers, task, kind, batch, example_mask)
    return {info.name: per_example_gradients(a[info.name], g[info.name]) for info in layers}


@jax.jit
def _precondition_all(gradients, curvature, damping):
    return {name: precondition(v, curvature[name], damping[name]) for name, v in gradients.items()}


@functools.partial(jax.jit, static_argnames=_STATIC)
def _score_step(preconditioned, state, batch, example_mask, *, graphdef, layers, task, kind):
    """Per-layer scores ``[L, Q, B]`` of one training batch."""
    _, a, g = layer_gradients(graphdef, state, layers, task, kind, batch, example_mask)
    return jnp.stack([layer_scores(a[i.name], g[i.name], preconditioned[i.name]) for i in layers])


def _self_layer_scores(a, g, curvature: LayerCurvature, damping) -> jax.Array:
    """⟨DW_b, P(DW_b)⟩ per example ``[B]``, in the eigenbasis when there is one."""
    if curvature.q_a is not None:
        a, g = a @ curvature.q_a, g @ curvature.q_s
    weights = 1.0 if curvature.eigenvalues is None else 1.0 / (curvature.eigenvalues + damping)
    if a.shape[1] == 1:  # DW_b = ā_b g_bᵀ: Σ_ij ā_i² g_j² W_ij without forming DW_b
        a2, g2 = a[:, 0] ** 2, g[:, 0] ** 2
        return jnp.sum((a2 @ weights) * g2, axis=-1) if curvature.eigenvalues is not None else a2.sum(-1) * g2.sum(-1)
    chunk = example_chunk(a.shape[0], a.shape[-1] * g.shape[-1])

    def one_example(xs):
        dw = xs[0].T @ xs[1]
        return jnp.sum(dw * dw * weights)

    return jax.lax.map(one_example, (a, g), batch_size=chunk)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _self_step(curvature, damping, state, batch, example_mask, *, graphdef, layers, task, kind):
    _, a, g = layer_gradients(graphdef, state, layers, task, kind, batch, example_mask)
    return jnp.stack([_self_layer_scores(a[i.name], g[i.name], curvature[i.name], damping[i.name]) for i in layers])


# --- drivers ------------------------------------------------------------------------


def _prepare(model, factors: Factors, damping):
    tracked = track(model, list(factors.layer_names))
    factors.check_compatible(tracked)
    curvature = {
        name: LayerCurvature(*(None if x is None else jnp.asarray(x, jnp.float32) for x in curv))
        for name, curv in factors.layers.items()
    }
    dampings = {name: factors.damping(name, damping) for name in factors.layer_names}
    return tracked, curvature, dampings


def _stream(step, tracked, task, kind, source, desc, progress, *leading) -> np.ndarray:
    """Run ``step`` over every batch; concatenate its ``[..., B]`` outputs over real rows."""
    parts = []
    bar = tqdm(total=source.num_batches, desc=desc, unit="batch", disable=not progress, leave=False)
    for batch in source:
        out = step(*leading, tracked.state, batch.arrays, batch.example_mask,
                   graphdef=tracked.graphdef, layers=tracked.layers, task=task, kind=kind)
        parts.append((out, batch.n_valid))
        bar.update(1)
    bar.close()
    return np.concatenate([np.asarray(out)[..., :n] for out, n in parts], axis=-1)


def query_gradients(model, task, factors: Factors, queries, *, damping=None, rank=None, batch_size=32, progress=True):
    """Preconditioned query gradients per layer, ``{name: LayerQueries}``, and the
    damping used per layer. ``rank=r`` keeps each ``[d_a, d_out]`` matrix as its best
    rank-r approximation (query batching); ``None`` keeps it in full."""
    tracked, curvature, dampings = _prepare(model, factors, damping)
    source = as_source(queries, batch_size, task)
    grads = {name: [] for name in tracked.layer_names}
    for batch in tqdm(source, total=source.num_batches, desc="query gradients", disable=not progress, leave=False):
        out = _gradient_step(tracked.state, batch.arrays, batch.example_mask,
                             graphdef=tracked.graphdef, layers=tracked.layers, task=task, kind="measurement")
        for name, v in out.items():
            grads[name].append(v[: batch.n_valid])
    stacked = {name: jnp.concatenate(vs) for name, vs in grads.items()}
    preconditioned = _precondition_all(stacked, curvature, dampings)
    if rank is not None:
        if rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        return {name: low_rank(p, rank) for name, p in preconditioned.items()}, dampings
    return {name: LayerQueries(full=p) for name, p in preconditioned.items()}, dampings


def pairwise_scores(
    model: nnx.Module,
    task: Any,
    factors: Factors,
    queries: Any,
    train: Any,
    *,
    damping: float | None = None,
    per_layer: bool = False,
    query_rank: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> Scores:
    """Influence of every training example on every query's measurement.

    Args:
      model, task: as for :func:`influence.fit_factors`; the model must have the
        structure the factors were fitted on.
      factors: fitted :class:`Factors`.
      queries: query data (same forms as training data); its measurement is
        ``task.measurement``.
      train: training data, streamed in batches of ``batch_size``.
      damping: absolute damping λ for every layer, or ``None`` for 0.1 × mean(Λ) per layer.
      per_layer: also return each layer's share.
      query_rank: keep each layer's preconditioned query gradient as its best rank-r
        approximation (Grosse et al. use 32): less memory per query, and cheaper
        scoring when r·(d_a + d_out) is small against d_a·d_out. ``None``: full rank.

    Returns:
      :class:`Scores` with ``values [n_query, n_train]``.
    """
    tracked, _, _ = _prepare(model, factors, damping)
    preconditioned, dampings = query_gradients(model, task, factors, queries, damping=damping, rank=query_rank,
                                               batch_size=batch_size, progress=progress)
    source = as_source(train, batch_size, task)
    layer_scores = _stream(_score_step, tracked, task, "empirical", source, "scores", progress, preconditioned)
    values = layer_scores.sum(axis=0)
    metadata = {
        "strategy": factors.strategy,
        "damping": dampings,
        "layers": list(tracked.layer_names),
        "n_query": int(values.shape[0]),
        "n_train": int(values.shape[1]),
        "query_rank": query_rank,
        "fingerprint": tracked.fingerprint,
    }
    per = {name: layer_scores[i] for i, name in enumerate(tracked.layer_names)} if per_layer else None
    return Scores(values, per, metadata)


def self_scores(
    model: nnx.Module,
    task: Any,
    factors: Factors,
    train: Any,
    *,
    damping: float | None = None,
    per_layer: bool = False,
    batch_size: int = 32,
    progress: bool = True,
):
    """Self-influence ∇L_nᵀ (G + λI)⁻¹ ∇L_n of every training example.

    Returns:
      float32 numpy ``[n_train]``; with ``per_layer=True``, a tuple of that and a dict
      layer name -> ``[n_train]`` whose values sum to it.
    """
    tracked, curvature, dampings = _prepare(model, factors, damping)
    source = as_source(train, batch_size, task)
    layer_scores = _stream(_self_step, tracked, task, "empirical", source, "self scores", progress,
                           curvature, dampings)
    total = layer_scores.sum(axis=0)
    if per_layer:
        return total, {name: layer_scores[i] for i, name in enumerate(tracked.layer_names)}
    return total
