"""Jittable sums over a batch: token covariances (A, S) and per-example eigenvalues (Λ).

All functions take captured layer inputs ``a [B, T, d_a]`` and output gradients
``g [B, T, d_out]`` or, with several Fisher directions per example,
``g [K, B, T, d_out]``, plus weights. They return *sums*; the caller divides by the
counts when the pass is over.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from influence.curvature.blocks import matmul_last

# Per-example gradients are materialised a chunk of examples at a time: at most about
# this many float32 numbers (256 MiB) live at once, whatever the batch size.
MAX_PER_EXAMPLE_ELEMENTS = 2**26


def covariance_sums(a: jax.Array, g: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(Σ_bt w ā āᵀ [d_a, d_a], Σ_(k)bt w g gᵀ [d_out, d_out])`` with token weights ``w [B, T]``."""
    a_sum = jnp.einsum("bti,btj->ij", a * weights[..., None], a)
    gw = g * weights[..., None]
    s_sum = jnp.einsum("...bti,...btj->ij", gw, g)
    return a_sum, s_sum


def example_chunk(batch: int, per_example: int) -> int:
    """Largest divisor of ``batch`` whose chunk of per-example arrays fits the budget."""
    limit = max(1, MAX_PER_EXAMPLE_ELEMENTS // max(per_example, 1))
    return max(d for d in range(1, batch + 1) if batch % d == 0 and d <= limit)


def per_example_gradients(a: jax.Array, g: jax.Array) -> jax.Array:
    """``DW_b = Σ_t ā_bt g_btᵀ``: ``[B, d_a, d_out]``, or ``[K, B, d_a, d_out]`` with K directions."""
    return jnp.einsum("bti,...btj->...bij", a, g)


def sum_over_example_chunks(fn, a: jax.Array, g: jax.Array, *extra: jax.Array) -> jax.Array:
    """``Σ_chunks fn(a_c, g_c, *extra_c)``, chunking the example axis to bound memory.

    ``a`` is ``[B, ...]``; ``g`` is ``[B, ...]`` or ``[K, B, ...]``; each ``extra`` has a
    leading ``B``. ``fn`` returns an array of fixed shape summed over its chunk.
    """
    batch = a.shape[0]
    has_directions = g.ndim == a.ndim + 1
    k = g.shape[0] if has_directions else 1
    chunk = example_chunk(batch, k * a.shape[-1] * g.shape[-1])
    if chunk == batch:
        return fn(a, g, *extra)
    n = batch // chunk

    def split(x, axis=0):
        return jnp.moveaxis(x.reshape(x.shape[:axis] + (n, chunk) + x.shape[axis + 1 :]), axis, 0)

    g_axis = 1 if has_directions else 0
    xs = (split(a), split(g, g_axis), *(split(e) for e in extra))

    def body(total, x):
        return total + fn(*x), None

    first = jax.eval_shape(fn, *(x[0] for x in xs))
    total, _ = jax.lax.scan(body, jnp.zeros(first.shape, first.dtype), xs)
    return total


def eigenvalue_sums(a, g, example_weights, q_a=None, q_s=None) -> jax.Array:
    """``Σ_b w_b Σ_k (Q_Aᵀ DW_bk Q_S)²`` ``[d_a, d_out]`` (no rotation when ``q_a`` is None;
    block-diagonal rotations are given as tuples of blocks).

    The rotation is applied to ``a`` and ``g`` before the per-example outer product,
    so each example costs T·d_a·d_out instead of a further d_a²·d_out.
    """
    if q_a is not None:
        a = matmul_last(a, q_a)
        g = matmul_last(g, q_s)
    if a.shape[1] == 1:
        # One token per example: DW_b = ā_b g_bᵀ, so Σ_b w_b DW_b² = (w·ā²)ᵀ g², one matmul.
        a2 = (a[:, 0] ** 2) * example_weights[:, None]
        g2 = g[..., 0, :] ** 2  # [(K,) B, d_out]
        return jnp.einsum("bi,...bj->ij", a2, g2)

    def chunk_sum(a_c, g_c, w_c):
        dw = per_example_gradients(a_c, g_c)  # [(K,) b, d_a, d_out]
        sq = dw**2
        if sq.ndim == 4:
            sq = sq.sum(axis=0)
        return jnp.einsum("b,bij->ij", w_c, sq)

    return sum_over_example_chunks(chunk_sum, a, g, example_weights)
