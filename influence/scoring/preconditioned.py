"""Preconditioned query gradients: what every scoring pass dots training gradients with.

For each query the measurement's gradient with respect to every tracked layer's
augmented weight, ``[Q, d_a, d_out]``, is preconditioned by the layer's damped inverse
curvature and kept in full or, with query batching (Grosse et al. §3.2), as its best
rank-r approximation ``L Rᵀ`` (``L [Q, d_a, r]``, ``R [Q, d_out, r]``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl
from jax.sharding import Mesh

from influence.capture.objectives import bytes_per_example, captured_shapes, layer_gradients
from influence.capture.per_example import weight_gradients
from influence.capture.tracking import TrackedModel, track
from influence.curvature import precondition
from influence.curvature.layer import map_arrays
from influence.errors import ConfigError
from influence.factors import Factors, check_finite_weights, curvature_arrays
from influence.runtime.data import as_source
from influence.runtime.driver import Accumulator, run_pass
from influence.runtime.execution import Execution
from influence.runtime.io import digest_arrays
from influence.runtime.mesh import (
    MeshLike,
    check_batch_size,
    n_data,
    n_query,
    query_axis,
    replicate,
    resolve_mesh,
    spans_processes,
    spec,
)
from influence.scoring.contractions import LayerQueries, rows_per_chunk
from influence.scoring.finite import check_query_gradients

GRADIENT_STATICS = ("graphdef", "layers", "task", "kind")
"""Static arguments of a jitted step that takes layer gradients (``layer_gradients``)."""


def low_rank(full: jax.Array, rank: int) -> LayerQueries:
    """Best rank-``rank`` approximation (truncated SVD) of each ``[d_a, d_out]`` matrix.

    The SVD runs once per query on the host (LAPACK, one BLAS thread: XLA's CPU SVD was
    ~10× slower on 32 queries of 65×256)."""
    with threadpoolctl.threadpool_limits(1):
        u, s, vt = np.linalg.svd(np.asarray(full, np.float32), full_matrices=False)
    r = min(rank, s.shape[-1])
    left = u[..., :r] * s[..., None, :r]
    right = np.swapaxes(vt[..., :r, :], -1, -2)
    return LayerQueries(left=jnp.asarray(left), right=jnp.asarray(right))


@functools.partial(jax.jit, static_argnames=GRADIENT_STATICS)
def _gradient_step(state, batch, example_mask, *, graphdef, layers, task, kind):
    """Per-example gradients ``{name: [B, d_a, d_out]}`` of one batch (partitioned over
    the batch's devices by ``jit``)."""
    _, a, g = layer_gradients(graphdef, state, layers, task, kind, batch, example_mask)
    return {info.name: weight_gradients(a[info.name], g[info.name]) for info in layers}


@jax.jit
def _precondition_all(gradients, curvature, damping):
    return {name: precondition(v, curvature[name], damping[name]) for name, v in gradients.items()}


def scoring_mesh(mesh: MeshLike, batch_size: int | None):
    """The mesh of a scoring pass: devices of this process only (hosts score their own
    shards independently and merge, see :mod:`influence.scoring.hosts`)."""
    mesh = resolve_mesh(mesh)
    if spans_processes(mesh):
        raise ConfigError(
            "scoring runs on the devices of one process: give each process a mesh of its local devices "
            "(jax.local_devices()) and its own shard of the training data, then merge the parts "
            "(influence.scoring.hosts.merge_rankings / merge_scores)"
        )
    if batch_size is not None:
        check_batch_size(batch_size, mesh)
    return mesh


def scoring_batch(run: Execution, tracked: TrackedModel, task, data, mesh, kind: str = "empirical", *,
          per_example_gradients: bool = False, queries: dict[str, LayerQueries] | None = None) -> Execution:
    """``run`` with the batch size of a scoring pass over ``data`` set (chosen from its
    memory budget when it has none: :meth:`influence.Execution.sized`). With ``queries``,
    no larger than the rows each device's contraction with them takes in one chunk
    (:func:`~influence.scoring.contractions.rows_per_chunk`): a larger batch is
    contracted in chunks anyway, at more cost per row."""
    def per_example(row):
        return bytes_per_example(tracked.graphdef, tracked.state, tracked.layers, task, kind, row,
                                 per_example_gradients=per_example_gradients)

    def max_rows(row):
        a, _ = captured_shapes(tracked.graphdef, tracked.state, tracked.layers, task, kind, row)
        per_device = min(rows_per_chunk(queries[i.name], a[i.name][1]) for i in tracked.layers)
        return per_device * n_data(mesh)

    return run.sized(data, task, per_example, multiple=n_data(mesh), max_rows=None if queries is None else max_rows)


def prepare(model, factors: Factors, damping, mesh):
    """The tracked model and the factors, replicated on the mesh, and the damping per layer
    (``FloatingPointError`` if the model's weights are not finite)."""
    factors.check_compatible(model)  # before tracking: says which layers differ, and how
    tracked = track(model, list(factors.layer_names))
    check_finite_weights(tracked.state)
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
    def pad(x):
        return jnp.pad(x, [(0, padded)] + [(0, 0)] * (x.ndim - 1))
    prepared = {name: LayerQueries(*(None if x is None else pad(x) for x in lq)) for name, lq in prepared.items()}
    return jax.device_put(prepared, jax.sharding.NamedSharding(mesh, spec(q)))


def query_gradients(model, task, factors: Factors, queries, *, damping=None, rank=None,
                    execution: Execution | None = None):
    """Preconditioned query gradients per layer, ``{name: LayerQueries}``, and the
    damping used per layer. ``rank=r`` keeps each ``[d_a, d_out]`` matrix as its best
    rank-r approximation (query batching); ``None`` keeps it in full. The query batches
    are split over the mesh's data axis (``execution``'s batch size and mesh; no
    checkpoint: a query pass is short)."""
    run = Execution() if execution is None else execution
    mesh = scoring_mesh(run.mesh, run.batch_size)
    return _query_gradients(model, task, prepare(model, factors, damping, mesh), queries, rank, run, mesh)


def _query_gradients(model, task, prepared, queries, rank, run: Execution, mesh):
    """:func:`query_gradients` with the model and factors already :func:`prepare` d."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    tracked, curvature, dampings = prepared
    run = scoring_batch(run, tracked, task, queries, mesh, "measurement", per_example_gradients=True)
    source = as_source(queries, run.batch_size, task, model, queries=True)

    def update(grads, step):
        out = _gradient_step(tracked.state, step.arrays, step.example_mask, graphdef=tracked.graphdef,
                             layers=tracked.layers, task=task, kind="measurement")
        return {name: grads[name] + (v[: step.batch.n_valid],) for name, v in out.items()}

    def finalize(grads):
        return {name: jnp.concatenate(vs) for name, vs in grads.items()}

    accumulator = Accumulator(lambda: {name: () for name in tracked.layer_names}, update, finalize)
    stacked = run_pass(accumulator, source, mesh, desc="query gradients", progress=run.progress).value
    preconditioned = _precondition_all(stacked, curvature, dampings)
    check_query_gradients(stacked, preconditioned, dampings)
    if rank is not None:
        return {name: low_rank(p, rank) for name, p in preconditioned.items()}, dampings
    return {name: LayerQueries(full=p) for name, p in preconditioned.items()}, dampings


class QuerySide(NamedTuple):
    """What a scoring pass over the training set needs of its queries.

    ``tracked``: the model, replicated on ``mesh``; ``queries``: the preconditioned query
    gradients per layer (as computed); ``placed``: the same on the mesh (padded with
    zero queries to split over a query axis); ``damping``: λ per layer."""

    run: Execution
    mesh: Mesh
    tracked: TrackedModel
    queries: dict[str, LayerQueries]
    placed: dict[str, LayerQueries]
    damping: dict[str, float]

    @property
    def n_query(self) -> int:
        return next(iter(self.queries.values())).num_queries

    @property
    def n_placed(self) -> int:
        """Queries on the mesh, padding included."""
        return next(iter(self.placed.values())).num_queries


def prepare_queries(model, task, factors: Factors, queries, *, damping=None, rank=None,
                    execution: Execution) -> QuerySide:
    """Preconditioned query gradients, placed for a scoring pass (see :func:`query_gradients`)."""
    mesh = scoring_mesh(execution.mesh, execution.batch_size)
    prepared = prepare(model, factors, damping, mesh)
    preconditioned, dampings = _query_gradients(model, task, prepared, queries, rank, execution, mesh)
    tracked = prepared[0]
    return QuerySide(execution, mesh, tracked, preconditioned, place_queries(preconditioned, mesh), dampings)


def score_checkpoint(kind: str, run: Execution, tracked, factors: Factors, dampings: dict, settings,
                     queries: dict[str, LayerQueries] | None = None):
    """The checkpoint of a scoring pass, keyed by the model (structure and weights), the
    factors and damping, the preconditioned queries if any, and whatever else decides its
    scores (``settings()``, only computed when checkpointing)."""
    if run.checkpoint_dir is None:
        return None
    keys = {"model": tracked.fingerprint, "weights": digest_arrays(tracked.state),
            "factors": digest_arrays(curvature_arrays(factors.layers)), "damping": dampings,
            "batch_size": run.batch_size, **settings()}
    if queries is not None:
        keys["queries"] = digest_arrays(jax.device_get(queries))
    return run.checkpoint(kind, keys)
