"""Pairwise influence scores: every query against every training example.

For a query measurement m_q and a training example n,

    score(q, n) = ∇m_qᵀ (G + λI)⁻¹ ∇L_n,

with G the curvature (block-diagonal over tracked layers) and L_n the training loss of
example n (summed over its tokens). A positive score means that upweighting n lowers
m_q (raises the completion's log-probability); removing n from a training set of N
examples changes m_q by about ``score / N`` (Koh & Liang 2017; Grosse et al. 2023).

The training set is streamed one batch at a time through the pass driver; per-example
gradients of a dense layer, DW_n = Σ_t ā_t g_tᵀ, live only a chunk of examples at a time,
or are never formed when the factored form Σ_t ā_tᵀ P g_t is cheaper
(:mod:`influence.scoring.contractions`). On a device mesh each device scores its rows of
every batch against the same (replicated) preconditioned queries, or against its share
of them when the mesh has a ``"query"`` axis.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx

from influence.capture.objectives import layer_gradients
from influence.factors import Factors
from influence.runtime.data import as_source
from influence.runtime.driver import concatenate, run_pass
from influence.runtime.execution import Execution
from influence.runtime.mesh import DATA, describe_mesh, local, query_axis, spec
from influence.scoring.contractions import layer_scores, stack_layers
from influence.scoring.finite import RowCheck
from influence.scoring.queries import STEP_STATICS, prepare_queries, score_checkpoint
from influence.scoring.results import Scores


@functools.partial(jax.jit, static_argnames=STEP_STATICS + ("mesh", "keep_layers"))
def _score_step(preconditioned, state, batch, example_mask, *, graphdef, layers, task, kind, mesh, keep_layers):
    """Scores ``[L, Q, B]`` per layer (or ``[1, Q, B]`` summed) of one training batch; each
    device scores its rows (against its queries, with a query axis)."""
    _, a, g = layer_gradients(graphdef, state, layers, task, kind, batch, example_mask)

    def per_device(a, g, queries):
        return stack_layers([layer_scores(a[i.name], g[i.name], queries[i.name]) for i in layers], keep_layers)

    q = query_axis(mesh)
    return local(per_device, mesh, (spec(DATA), spec(DATA), spec(q)), spec(None, q, DATA))(a, g, preconditioned)


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
    execution: Execution | None = None,
    **options: Any,
) -> Scores:
    """Influence of every training example on every query's measurement.

    Args:
      model, task: as for :func:`influence.fit_factors`; the model must have the
        structure the factors were fitted on.
      factors: fitted :class:`~influence.Factors`.
      queries: query data (same forms as training data); its measurement is
        ``task.measurement``.
      train: training data, streamed in batches.
      damping: absolute damping λ for every layer, or ``None`` for 0.1 × mean(Λ) per layer.
      per_layer: also return each layer's share.
      query_rank: keep each layer's preconditioned query gradient as its best rank-r
        approximation (Grosse et al. use 32): less memory per query, and cheaper
        scoring when r·(d_a + d_out) is small against d_a·d_out. ``None``: full rank.
      execution, **options: run settings (:class:`influence.Execution`). The mesh holds
        this process's devices; ``("data", "query")`` also splits the queries.

    Returns:
      :class:`~influence.Scores` with ``values [n_query, n_train]``.
    """
    run = Execution.of(execution, options)
    side = prepare_queries(model, task, factors, queries, damping=damping, rank=query_rank, execution=run)
    mesh, tracked, dampings = side.mesh, side.tracked, side.damping
    source = as_source(train, run.batch_size, task, model)
    checkpoint = score_checkpoint("scores", run, tracked, factors, dampings, lambda: {"per_layer": per_layer},
                                  queries=side.queries)

    finite = RowCheck(source.batch_size)

    def score(step):
        out = _score_step(side.placed, tracked.state, step.arrays, step.example_mask, graphdef=tracked.graphdef,
                          layers=tracked.layers, task=task, kind="empirical", mesh=mesh, keep_layers=per_layer)
        finite.update(out, step.batch)
        return out

    resumed = checkpoint.load() if checkpoint is not None else None
    accumulator = finite.guard(concatenate(score), checkpointed=checkpoint is not None)
    collected = run_pass(accumulator, source, mesh, checkpoint=checkpoint, resumed=resumed, desc="scores",
                         progress=run.progress).value[:, :side.n_query]
    values = collected.sum(axis=0)
    metadata = {
        "strategy": factors.strategy,
        "damping": dampings,
        "layers": list(tracked.layer_names),
        "n_query": int(values.shape[0]),
        "n_train": int(values.shape[1]),
        "query_rank": query_rank,
        "fingerprint": tracked.fingerprint,
        "mesh": describe_mesh(mesh),
    }
    per = {name: collected[i] for i, name in enumerate(tracked.layer_names)} if per_layer else None
    return Scores(values, per, metadata)
