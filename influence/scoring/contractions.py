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

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

CONTRACTION_CHUNK_ELEMENTS = 2**21
"""Most float32 numbers (8 MiB) of a dense contraction's intermediate held for one chunk
of training rows on a CPU: small enough to stay in its cache, so the contraction runs at
the speed of its GEMM. Larger batches are contracted a chunk of rows at a time (which
costs more per row than a batch of one chunk: the scoring passes choose batches no
larger, see :func:`rows_per_chunk`)."""

ACCELERATOR_CHUNK_ELEMENTS = 2**26
"""The same on an accelerator (256 MiB): there memory, not a cache, bounds the chunk."""


class LayerQueries(NamedTuple):
    """One layer's preconditioned query gradients: ``full`` or (``left``, ``right``)."""

    full: jax.Array | None = None  # [Q, d_a, d_out]
    left: jax.Array | None = None  # [Q, d_a, r], singular values folded in
    right: jax.Array | None = None  # [Q, d_out, r]

    @property
    def num_queries(self) -> int:
        return (self.full if self.full is not None else self.left).shape[0]

    @property
    def rank(self) -> int | None:
        return None if self.left is None else self.left.shape[-1]

    def dense(self) -> jax.Array:
        """``[Q, d_a, d_out]`` (reconstructed from the factors when low-rank)."""
        if self.full is not None:
            return self.full
        return jnp.einsum("qik,qjk->qij", self.left, self.right)

    def take(self, index: jax.Array) -> LayerQueries:
        """The queries at ``index`` (e.g. one per training row for attribution)."""
        return LayerQueries(*(None if x is None else x[index] for x in self))


def chunk_elements() -> int:
    """:data:`CONTRACTION_CHUNK_ELEMENTS` on a CPU, :data:`ACCELERATOR_CHUNK_ELEMENTS` elsewhere."""
    return CONTRACTION_CHUNK_ELEMENTS if jax.default_backend() == "cpu" else ACCELERATOR_CHUNK_ELEMENTS


def _forms(n_query: int, d_a: int, d_out: int, tokens: int) -> tuple[bool, int]:
    """``(factored?, intermediate floats per training row)`` of the dense contraction.

    One query or one token: both forms cost about B·T·Q·d_a·d_out, so the smaller
    intermediate decides; otherwise forming DW_b is cheaper (T + Q against T·Q)."""
    factored_row, materialised_row = n_query * d_a * tokens, d_a * d_out
    if n_query * tokens <= n_query + tokens and factored_row <= materialised_row:
        return True, factored_row
    return False, materialised_row


def rows_per_chunk(queries: LayerQueries, tokens: int) -> int:
    """Training rows a layer's contraction takes in one chunk (at least 1)."""
    if queries.rank is not None:
        per_row = 2 * queries.num_queries * tokens * queries.rank
    else:
        d_a, d_out = queries.full.shape[1:]
        per_row = _forms(queries.num_queries, d_a, d_out, tokens)[1]
    return max(1, chunk_elements() // max(per_row, 1))


def _row_chunks(fn, a: jax.Array, g: jax.Array, per_row: int) -> jax.Array:
    """``fn(a_c, g_c) -> [Q, c]`` over chunks of the rows of ``a [B, ...]``, ``g [B, ...]``,
    each chunk's intermediate at most about :func:`chunk_elements` floats;
    ``[Q, B]``. A last partial chunk is zero-padded (zero rows score 0) and cut off."""
    batch = a.shape[0]
    limit = max(1, chunk_elements() // max(per_row, 1))
    if batch <= limit:
        return fn(a, g)
    n = -(-batch // limit)
    chunk = -(-batch // n)  # n equal chunks: the least padding
    pad = n * chunk - batch

    def split(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x
        return x.reshape((n, chunk) + x.shape[1:])

    out = jax.lax.map(lambda xs: fn(*xs), (split(a), split(g)))  # [n, Q, c]
    return jnp.moveaxis(out, 0, 1).reshape(out.shape[1], n * chunk)[:, :batch]


def _factored(p: jax.Array, a: jax.Array, g: jax.Array) -> jax.Array:
    """Σ_t ā_tᵀ (P_q g_t): one GEMM ``[Q·d_a, d_out] × [d_out, B·T]`` over P's minor axis
    (no copy of P per step), then the weighted sum with ``ā``."""
    n_query, d_a, d_out = p.shape
    batch, tokens = a.shape[:2]
    pg = jax.lax.dot_general(p.reshape(n_query * d_a, d_out), g.reshape(batch * tokens, d_out),
                             (((1,), (1,)), ((), ())))  # [Q·d_a, B·T]
    return jnp.einsum("qibt,bti->qb", pg.reshape(n_query, d_a, batch, tokens), a)


def _materialised(p: jax.Array, a: jax.Array, g: jax.Array) -> jax.Array:
    """⟨P_q, DW_b⟩ with DW_b = Σ_t ā_t g_tᵀ formed for the chunk: one GEMM
    ``[Q, d_a·d_out] × [d_a·d_out, B]``."""
    dw = jnp.einsum("bti,btj->bij", a, g).reshape(a.shape[0], -1)
    return jax.lax.dot_general(p.reshape(p.shape[0], -1), dw, (((1,), (1,)), ((), ())))


def _dense_scores(a: jax.Array, g: jax.Array, p: jax.Array) -> jax.Array:
    factored, per_row = _forms(*p.shape, a.shape[1])
    return _row_chunks(functools.partial(_factored if factored else _materialised, p), a, g, per_row)


def _lowrank_scores(a: jax.Array, g: jax.Array, left: jax.Array, right: jax.Array) -> jax.Array:
    al = jnp.einsum("bti,qik->bqtk", a, left)
    gr = jnp.einsum("btj,qjk->bqtk", g, right)
    return jnp.einsum("bqtk,bqtk->qb", al, gr)


def layer_scores(a: jax.Array, g: jax.Array, queries: LayerQueries) -> jax.Array:
    """Scores ``[Q, B]`` of training examples ``a [B, T, d_a]``, ``g [B, T, d_out]``.

    Chooses the cheapest exact form at trace time:
      * dense, factored Σ_t ā_tᵀ P g_t: Q·B·T·d_a·d_out multiply-adds;
      * dense, per-example gradients: B·d_a·d_out·(T + Q);
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
