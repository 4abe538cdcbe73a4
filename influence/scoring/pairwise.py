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
import jax.numpy as jnp
import numpy as np
from flax import nnx

from influence.capture.objectives import layer_gradients
from influence.errors import InfluenceError
from influence.factors import Factors
from influence.runtime.data import as_source
from influence.runtime.driver import concatenate, run_pass
from influence.runtime.execution import Execution
from influence.runtime.mesh import DATA, describe_mesh, local, query_axis, spec
from influence.scoring.blocks import collect_scores, open_index_source, scores_result
from influence.scoring.contractions import layer_scores, query_token_scores, stack_layers
from influence.scoring.finite import RowCheck
from influence.scoring.preconditioned import GRADIENT_STATICS, prepare_queries, score_checkpoint, scoring_batch
from influence.scoring.results import Scores

MAX_PER_TOKEN = 2**26
"""Most floats ``Q·N·T`` that ``per_token=True`` keeps (256 MiB of float32)."""


@functools.partial(jax.jit, static_argnames=GRADIENT_STATICS + ("mesh", "keep_layers", "per_token"))
def score_step(preconditioned, state, batch, example_mask, *, graphdef, layers, task, kind, mesh, keep_layers,
                per_token=False):
    """The score block of one training batch (:mod:`influence.scoring.blocks`): ``[L, Q, B]``
    per layer (or ``[1, Q, B]`` summed); each device scores its rows (against its queries,
    with a query axis). With ``per_token``, the per-token terms ``[Q, T, B]`` summed over
    layers follow, packed as one array ``[L·Q + Q·T, B]`` (the pass concatenates one array per batch)."""
    _, a, g = layer_gradients(graphdef, state, layers, task, kind, batch, example_mask)

    def per_device(a, g, queries):
        return stack_layers([layer_scores(a[i.name], g[i.name], queries[i.name]) for i in layers], keep_layers)

    q = query_axis(mesh)
    scores = local(per_device, mesh, (spec(DATA), spec(DATA), spec(q)), spec(None, q, DATA))(a, g, preconditioned)
    if not per_token:
        return scores
    tokens = {i.name: a[i.name].shape[1] for i in layers}
    if len(set(tokens.values())) != 1:
        raise InfluenceError(f"per_token=True needs every tracked layer to see the same token axis; they see {tokens} "
                             "positions: track the layers of one token axis (layers=...), or use rank_training + "
                             "attribute for per-layer, per-token terms")

    def per_device_tokens(a, g, queries):
        terms = sum(query_token_scores(a[i.name], g[i.name], queries[i.name]) for i in layers)  # [Q, B, T]
        return jnp.moveaxis(terms, 1, -1)

    terms = local(per_device_tokens, mesh, (spec(DATA), spec(DATA), spec(q)), spec(q, None, DATA))(
        a, g, preconditioned)
    return jnp.concatenate([scores.reshape(-1, scores.shape[-1]), terms.reshape(-1, terms.shape[-1])])


def pairwise_scores(
    model: nnx.Module,
    task: Any,
    factors: Factors,
    queries: Any,
    train: Any,
    *,
    damping: float | None = None,
    per_layer: bool = False,
    per_token: bool = False,
    query_rank: int | None = None,
    index: Any = None,
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
      per_token: also return ``Scores.per_token [Q, N, T]``, each training position's
        term (summed over layers; T is the training batch's token axis). Memory: Q·N·T
        float32 on the host; above :data:`MAX_PER_TOKEN` floats it is refused (use
        :func:`~influence.rank_training` and :func:`~influence.attribute` for chosen pairs).
      query_rank: keep each layer's preconditioned query gradient as its best rank-r
        approximation (Grosse et al. use 32): less memory per query, and cheaper
        scoring when r·(d_a + d_out) is small against d_a·d_out. ``None``: full rank.
      index: an index of ``train`` (:func:`influence.build_index`: a path or an
        :class:`~influence.index.Index`, or a list of host parts): answer from it without
        a pass over ``train`` (then only read to check it is the indexed data; ``None``
        skips that check). Not with ``per_token``.
      execution, **options: run settings (:class:`influence.Execution`). The mesh holds
        this process's devices; ``("data", "query")`` also splits the queries.

    Returns:
      :class:`~influence.Scores` with ``values [n_query, n_train]``.
    """
    run = Execution.of(execution, options)
    if index is not None:  # the index's score blocks, collected as a rescan's are (scoring.blocks)
        if per_token:
            raise InfluenceError("per_token=True needs each training position's terms, which an index does not "
                                 "keep: score without index= (a rescan), or rank_training(..., index=) and "
                                 "attribute(...) for the per-token terms of the top pairs")
        source = open_index_source(model, task, factors, queries, train, index, damping, query_rank, run)
        collected = collect_scores(source.blocks(per_layer), source.row_check())
        return scores_result(collected, source.side.n_query, source.names, per_layer,
                             source.metadata(factors, query_rank))
    side = prepare_queries(model, task, factors, queries, damping=damping, rank=query_rank, execution=run)
    mesh, tracked, dampings = side.mesh, side.tracked, side.damping
    run = scoring_batch(run, tracked, task, train, mesh, queries=side.placed)
    source = as_source(train, run.batch_size, task, model)
    settings = {"per_layer": per_layer, **({"per_token": True} if per_token else {})}
    checkpoint = score_checkpoint("scores", run, tracked, factors, dampings, lambda: settings, queries=side.queries)

    finite = RowCheck(source.batch_size)
    shapes: dict[str, int] = {}
    rows = [0]
    n_layers = len(tracked.layer_names) if per_layer else 1

    def score(step):
        out = score_step(side.placed, tracked.state, step.arrays, step.example_mask, graphdef=tracked.graphdef,
                          layers=tracked.layers, task=task, kind="empirical", mesh=mesh, keep_layers=per_layer,
                          per_token=per_token)
        if per_token:
            _check_per_token_size(shapes, out, side, n_layers, source, rows, step.batch.n_valid)
        finite.update(out, step.batch)
        return out

    resumed = checkpoint.load() if checkpoint is not None else None
    accumulator = finite.guard(concatenate(score), checkpointed=checkpoint is not None)
    collected = run_pass(accumulator, source, mesh, checkpoint=checkpoint, resumed=resumed, desc="scores",
                         progress=run.progress).value
    tokens = None
    if per_token:
        padded = side.n_placed
        split = n_layers * padded
        tokens = collected[split:].reshape(padded, -1, collected.shape[-1])[: side.n_query]  # [Q, T, N]
        tokens = np.ascontiguousarray(np.moveaxis(tokens, 1, -1))  # [Q, N, T]
        collected = collected[:split].reshape(n_layers, padded, -1)
    metadata = {
        "strategy": factors.strategy,
        "damping": dampings,
        "layers": list(tracked.layer_names),
        "n_query": side.n_query,
        "n_train": int(collected.shape[-1]),
        "query_rank": query_rank,
        "fingerprint": tracked.fingerprint,
        "mesh": describe_mesh(mesh),
        "batch_size": run.batch_size,
    }
    if per_token:
        metadata["per_token"] = {"tokens": int(tokens.shape[-1]), "limit_floats": MAX_PER_TOKEN}
    return scores_result(collected, side.n_query, list(tracked.layer_names), per_layer, metadata, per_token=tokens)


def _check_per_token_size(shapes: dict, out, side, n_layers: int, source, rows: list, n_valid: int) -> None:
    """``InfluenceError`` before ``per_token``'s ``[Q, N, T]`` outgrows :data:`MAX_PER_TOKEN`
    floats: checked on the first batch when N is known, and as rows come otherwise."""
    rows[0] += n_valid
    if "tokens" not in shapes:  # out is packed [L·Q + Q·T, B]
        shapes["tokens"] = (out.shape[0] - n_layers * side.n_placed) // side.n_placed
    n_train = source.num_examples or rows[0]
    size = side.n_query * n_train * shapes["tokens"]
    if size > MAX_PER_TOKEN:
        raise InfluenceError(
            f"per_token=True would keep {side.n_query} queries x {n_train} training rows x {shapes['tokens']} "
            f"tokens = {size:,} floats, above the limit of {MAX_PER_TOKEN:,} (pairwise.MAX_PER_TOKEN): score fewer "
            "pairs, or use rank_training(...) and attribute(...) for the per-token terms of the top pairs")
