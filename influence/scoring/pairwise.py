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

On a device mesh each device scores its rows of every batch against the same
(replicated) preconditioned queries, or against its share of them when the mesh has a
``"query"`` axis. A scoring pass can be checkpointed and resumed like a fitting pass.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from influence.runtime import io
from influence.capture.tracking import track
from influence.runtime.checkpoint import Checkpoint
from influence.runtime.io import digest_arrays
from influence.scoring.contractions import LayerQueries, layer_scores, low_rank
from influence.curvature import LayerCurvature, precondition
from influence.curvature.accumulate import example_chunk, per_example_gradients
from influence.curvature.blocks import matmul_last
from influence.curvature.layer import map_arrays
from influence.runtime.data import as_source
from influence.factors import Factors, curvature_arrays
from influence.capture.objectives import layer_gradients
from influence.runtime.mesh import (
    DATA,
    MeshLike,
    check_batch_size,
    describe,
    local,
    n_query,
    query_axis,
    replicate,
    resolve_mesh,
    shard_batch,
    spans_processes,
    spec,
)
from influence.runtime.stream import collect

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
    """Per-example gradients ``{name: [B, d_a, d_out]}`` of one batch (partitioned over
    the batch's devices by ``jit``)."""
    _, a, g = layer_gradients(graphdef, state, layers, task, kind, batch, example_mask)
    return {info.name: per_example_gradients(a[info.name], g[info.name]) for info in layers}


@jax.jit
def _precondition_all(gradients, curvature, damping):
    return {name: precondition(v, curvature[name], damping[name]) for name, v in gradients.items()}


def _stack_layers(per_layer_scores: list[jax.Array], keep_layers: bool) -> jax.Array:
    """``[L, ...]`` per layer, or their sum as ``[1, ...]`` (so memory holds one score
    matrix, not L, when the split is not asked for)."""
    stacked = jnp.stack(per_layer_scores)
    return stacked if keep_layers else stacked.sum(axis=0, keepdims=True)


@functools.partial(jax.jit, static_argnames=_STATIC + ("mesh", "keep_layers"))
def _score_step(preconditioned, state, batch, example_mask, *, graphdef, layers, task, kind, mesh, keep_layers):
    """Scores ``[L, Q, B]`` per layer (or ``[1, Q, B]`` summed) of one training batch; each
    device scores its rows (against its queries, with a query axis)."""
    _, a, g = layer_gradients(graphdef, state, layers, task, kind, batch, example_mask)

    def per_device(a, g, queries):
        return _stack_layers([layer_scores(a[i.name], g[i.name], queries[i.name]) for i in layers], keep_layers)

    q = query_axis(mesh)
    return local(per_device, mesh, (spec(DATA), spec(DATA), spec(q)), spec(None, q, DATA))(a, g, preconditioned)


def _self_layer_scores(a, g, curvature: LayerCurvature, damping) -> jax.Array:
    """⟨DW_b, P(DW_b)⟩ per example ``[B]``, in the eigenbasis when there is one."""
    if curvature.q_a is not None:
        a, g = matmul_last(a, curvature.q_a), matmul_last(g, curvature.q_s)
    weights = 1.0 if curvature.eigenvalues is None else 1.0 / (curvature.eigenvalues.astype(a.dtype) + damping)
    if a.shape[1] == 1:  # DW_b = ā_b g_bᵀ: Σ_ij ā_i² g_j² W_ij without forming DW_b
        a2, g2 = a[:, 0] ** 2, g[:, 0] ** 2
        return jnp.sum((a2 @ weights) * g2, axis=-1) if curvature.eigenvalues is not None else a2.sum(-1) * g2.sum(-1)
    chunk = example_chunk(a.shape[0], a.shape[-1] * g.shape[-1])

    def one_example(xs):
        dw = xs[0].T @ xs[1]
        return jnp.sum(dw * dw * weights)

    return jax.lax.map(one_example, (a, g), batch_size=chunk)


@functools.partial(jax.jit, static_argnames=_STATIC + ("mesh", "keep_layers"))
def _self_step(curvature, damping, state, batch, example_mask, *, graphdef, layers, task, kind, mesh, keep_layers):
    _, a, g = layer_gradients(graphdef, state, layers, task, kind, batch, example_mask)

    def per_device(a, g, curvature, damping):
        return _stack_layers([_self_layer_scores(a[i.name], g[i.name], curvature[i.name], damping[i.name])
                              for i in layers], keep_layers)

    return local(per_device, mesh, (spec(DATA), spec(DATA), spec(), spec()), spec(None, DATA))(a, g, curvature, damping)


# --- drivers ------------------------------------------------------------------------


def scoring_mesh(mesh: MeshLike, batch_size: int):
    """The mesh of a scoring pass: devices of this process only (hosts score their own
    shards independently and merge, see :mod:`influence.runtime.hosts`)."""
    mesh = resolve_mesh(mesh)
    if spans_processes(mesh):
        raise ValueError(
            "scoring runs on the devices of one process: give each process a mesh of its local devices "
            "(jax.local_devices()) and its own shard of the training data, then merge the parts "
            "(influence.runtime.hosts.merge_rankings / merge_scores)"
        )
    check_batch_size(batch_size, mesh)
    return mesh


def _prepare(model, factors: Factors, damping, mesh):
    """The tracked model and the factors, replicated on the mesh, and the damping per layer."""
    tracked = track(model, list(factors.layer_names))
    factors.check_compatible(tracked)
    curvature = {name: map_arrays(curv, jnp.asarray) for name, curv in factors.layers.items()}
    dampings = {name: factors.damping(name, damping) for name in factors.layer_names}
    on_mesh = dataclasses.replace(tracked, state=replicate(tracked.state, mesh))
    return on_mesh, replicate(curvature, mesh), dampings


def place_queries(prepared: dict[str, LayerQueries], mesh) -> dict[str, LayerQueries]:
    """Preconditioned queries on the mesh: replicated, or split over its query axis (padded
    with zero queries, which score 0, to a multiple of its size)."""
    q = query_axis(mesh)
    if q is None:
        return replicate(prepared, mesh)
    n = next(iter(prepared.values())).num_queries
    padded = -n % n_query(mesh)
    pad = lambda x: jnp.pad(x, [(0, padded)] + [(0, 0)] * (x.ndim - 1))  # noqa: E731
    prepared = {name: LayerQueries(*(None if x is None else pad(x) for x in lq)) for name, lq in prepared.items()}
    return jax.device_put(prepared, jax.sharding.NamedSharding(mesh, spec(q)))


def score_checkpoint(kind: str, checkpoint_dir, every: int, resume: bool, tracked, settings) -> Checkpoint | None:
    """The checkpoint of a scoring pass, keyed by the model (structure and weights) and
    whatever else decides its scores (``settings()``, only computed when checkpointing)."""
    if checkpoint_dir is None:
        return None
    settings = {"model": tracked.fingerprint, "weights": digest_arrays(tracked.state), **settings()}
    return Checkpoint(checkpoint_dir, kind, settings, every=every, resume=resume)


def query_gradients(model, task, factors: Factors, queries, *, damping=None, rank=None, batch_size=32, progress=True,
                    mesh: MeshLike = None):
    """Preconditioned query gradients per layer, ``{name: LayerQueries}``, and the
    damping used per layer. ``rank=r`` keeps each ``[d_a, d_out]`` matrix as its best
    rank-r approximation (query batching); ``None`` keeps it in full. The query batches
    are split over the mesh's data axis."""
    mesh = scoring_mesh(mesh, batch_size)
    tracked, curvature, dampings = _prepare(model, factors, damping, mesh)
    source = as_source(queries, batch_size, task)
    grads = {name: [] for name in tracked.layer_names}
    for batch in tqdm(source, total=source.num_batches, desc="query gradients", disable=not progress, leave=False):
        out = _gradient_step(tracked.state, shard_batch(batch.arrays, mesh), shard_batch(batch.example_mask, mesh),
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
    mesh: MeshLike = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
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
      mesh: this process's devices to score on (see :func:`influence.fit_factors`):
        each scores its rows of every batch; a mesh with axes ``("data", "query")``
        also splits the queries. ``batch_size`` must be a multiple of the data axis.
      checkpoint_dir, checkpoint_every, resume: save the scores computed so far every
        ``checkpoint_every`` batches (and on interruption) and resume from them, as
        for :func:`influence.fit_factors`.

    Returns:
      :class:`Scores` with ``values [n_query, n_train]``.
    """
    mesh = scoring_mesh(mesh, batch_size)
    tracked, _, _ = _prepare(model, factors, damping, mesh)
    preconditioned, dampings = query_gradients(model, task, factors, queries, damping=damping, rank=query_rank,
                                               batch_size=batch_size, progress=progress, mesh=mesh)
    n_queries = next(iter(preconditioned.values())).num_queries
    placed = place_queries(preconditioned, mesh)
    source = as_source(train, batch_size, task)
    checkpoint = score_checkpoint("scores", checkpoint_dir, checkpoint_every, resume, tracked, lambda: {
        "factors": digest_arrays(curvature_arrays(factors.layers)), "damping": dampings,
        "queries": digest_arrays(jax.device_get(preconditioned)), "batch_size": batch_size, "per_layer": per_layer})

    def run(step):
        return _score_step(placed, tracked.state, step.arrays, step.example_mask, graphdef=tracked.graphdef,
                           layers=tracked.layers, task=task, kind="empirical", mesh=mesh, keep_layers=per_layer)

    layer_scores = collect(run, source, mesh, checkpoint=checkpoint, desc="scores", progress=progress)[:, :n_queries]
    values = layer_scores.sum(axis=0)
    metadata = {
        "strategy": factors.strategy,
        "damping": dampings,
        "layers": list(tracked.layer_names),
        "n_query": int(values.shape[0]),
        "n_train": int(values.shape[1]),
        "query_rank": query_rank,
        "fingerprint": tracked.fingerprint,
        "mesh": describe(mesh),
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
    mesh: MeshLike = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
):
    """Self-influence ∇L_nᵀ (G + λI)⁻¹ ∇L_n of every training example.

    ``mesh`` and the checkpoint options are as for :func:`pairwise_scores`.

    Returns:
      float32 numpy ``[n_train]``; with ``per_layer=True``, a tuple of that and a dict
      layer name -> ``[n_train]`` whose values sum to it.
    """
    mesh = scoring_mesh(mesh, batch_size)
    tracked, curvature, dampings = _prepare(model, factors, damping, mesh)
    source = as_source(train, batch_size, task)
    checkpoint = score_checkpoint("self-scores", checkpoint_dir, checkpoint_every, resume, tracked, lambda: {
        "factors": digest_arrays(curvature_arrays(factors.layers)), "damping": dampings, "batch_size": batch_size,
        "per_layer": per_layer})

    def run(step):
        return _self_step(curvature, dampings, tracked.state, step.arrays, step.example_mask, graphdef=tracked.graphdef,
                          layers=tracked.layers, task=task, kind="empirical", mesh=mesh,
                          keep_layers=per_layer)

    layer_scores = collect(run, source, mesh, checkpoint=checkpoint, desc="self scores", progress=progress)
    total = layer_scores.sum(axis=0)
    if per_layer:
        return total, {name: layer_scores[i] for i, name in enumerate(tracked.layer_names)}
    return total
