"""Contractions of preconditioned query gradients with training-token factors.

A layer's preconditioned query gradients are kept either in full, ``P [Q, d_a, d_out]``,
or in rank-r form ``P_q ≈ L_q R_qᵀ`` with ``L [Q, d_a, r]`` and ``R [Q, d_out, r]``
(query batching, Grosse et al. §3.2). A training sequence with layer inputs
``ā [T, d_a]`` and output gradients ``g [T, d_out]`` scores

    ⟨P_q, Σ_t ā_t g_tᵀ⟩ = Σ_t ā_tᵀ P_q g_t = Σ_t Σ_k (ā_tᵀ L_qk)(g_tᵀ R_qk),

and its per-token terms are the token-wise attribution. Every function here is exact for
the representation it is given; they differ in cost only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from influence.capture.per_example import example_chunk
from influence.scoring.queries import LayerQueries


def _dense_scores(a: jax.Array, g: jax.Array, p: jax.Array) -> jax.Array:
    n_query, batch, tokens = p.shape[0], a.shape[0], a.shape[1]
    if n_query * tokens <= n_query + tokens:
        return jnp.einsum("bti,qij,btj->qb", a, p, g)  # factored: no per-example gradient
    chunk = example_chunk(batch, a.shape[-1] * g.shape[-1])

    def one_example(xs):
        a_b, g_b = xs
        return jnp.einsum("ti,tj,qij->q", a_b, g_b, p)  # DW_b for a chunk of examples at a time

    return jax.lax.map(one_example, (a, g), batch_size=chunk).T


def _lowrank_scores(a: jax.Array, g: jax.Array, left: jax.Array, right: jax.Array) -> jax.Array:
    al = jnp.einsum("bti,qik->bqtk", a, left)
    gr = jnp.einsum("btj,qjk->bqtk", g, right)
    return jnp.einsum("bqtk,bqtk->qb", al, gr)


def layer_scores(a: jax.Array, g: jax.Array, queries: LayerQueries) -> jax.Array:
    """Scores ``[Q, B]`` of training examples ``a [B, T, d_a]``, ``g [B, T, d_out]``.

    Chooses the cheapest exact form at trace time:
      * dense, factored Σ_t ā_tᵀ P g_t: Q·B·T·d_a·d_out multiply-adds;
      * dense, per-example gradients (a chunk at a time): B·d_a·d_out·(T + Q);
      * low rank: B·T·Q·r·(d_a + d_out).
    """
    batch, tokens, d_a = a.shape
    d_out = g.shape[-1]
    q = queries.num_queries
    dense_cost = batch * d_a * d_out * min(q * tokens, tokens + q)
    if queries.rank is not None and batch * tokens * q * queries.rank * (d_a + d_out) <= dense_cost:
        return _lowrank_scores(a, g, queries.left, queries.right)
    return _dense_scores(a, g, queries.dense())


def token_scores(a: jax.Array, g: jax.Array, queries: LayerQueries) -> jax.Array:
    """Per-token terms ``[B, T]`` of example b against its own query b (``queries`` has
    one query per example): ā_btᵀ P_b g_bt. They sum over t to the example's score."""
    if queries.rank is not None:
        return jnp.einsum("bti,bik,btj,bjk->bt", a, queries.left, g, queries.right)
    return jnp.einsum("bti,bij,btj->bt", a, queries.full, g)


def query_token_scores(a: jax.Array, g: jax.Array, queries: LayerQueries) -> jax.Array:
    """Per-token terms ``[Q, B, T]`` of every query against every example: ā_btᵀ P_q g_bt
    (the terms of :func:`layer_scores`, which they sum to over t). Memory Q·B·T."""
    if queries.rank is not None:
        al = jnp.einsum("bti,qik->qbtk", a, queries.left)
        gr = jnp.einsum("btj,qjk->qbtk", g, queries.right)
        return jnp.sum(al * gr, axis=-1)
    return jnp.einsum("bti,qij,btj->qbt", a, queries.dense(), g)


def stack_layers(per_layer_scores: list[jax.Array], keep_layers: bool) -> jax.Array:
    """``[L, ...]`` per layer, or their sum as ``[1, ...]`` (so memory holds one score
    matrix, not L, when the split is not asked for)."""
    stacked = jnp.stack(per_layer_scores)
    return stacked if keep_layers else stacked.sum(axis=0, keepdims=True)
