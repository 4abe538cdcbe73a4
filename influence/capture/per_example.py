"""Per-example weight gradients from captured layer inputs and output gradients.

For a dense layer the gradient of example b's loss with respect to the augmented weight
is ``DW_b = Σ_t ā_bt g_btᵀ`` ``[d_a, d_out]``. Where a sum over examples of something of
``DW_b`` is needed (Λ, self-influence, dense scoring), the ``[B, d_a, d_out]`` stack is
formed a chunk of examples at a time, so memory stays bounded whatever the batch size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Per-example gradients are materialised a chunk of examples at a time: at most about
# this many float32 numbers (256 MiB) live at once, whatever the batch size.
MAX_PER_EXAMPLE_ELEMENTS = 2**26


def example_chunk(batch: int, per_example: int) -> int:
    """Largest divisor of ``batch`` whose chunk of per-example arrays fits the budget."""
    limit = max(1, MAX_PER_EXAMPLE_ELEMENTS // max(per_example, 1))
    return max(d for d in range(1, batch + 1) if batch % d == 0 and d <= limit)


def weight_gradients(a: jax.Array, g: jax.Array) -> jax.Array:
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
