"""Block-diagonal split of a layer's Kronecker factors, to bound their memory.

A layer with augmented weight ``W [d_a, d_out]`` may split its input rows into
``n_a`` contiguous groups and its output columns into ``n_s`` groups. K-FAC then keeps
only the diagonal blocks of the factors, ``A ≈ blockdiag(A_11, …, A_{n_a n_a})`` and
``S ≈ blockdiag(S_11, …)``, so the curvature of the layer is block-diagonal over the
``n_a × n_s`` sub-matrices ``W_ij``, each with its own ``A_ii ⊗ S_jj``: a
within-layer block-diagonal approximation for layers whose factors do not fit. The
eigenbases are block-diagonal too, ``Q_A = blockdiag(Q_A^i)``,
so the EK-FAC formulas are unchanged; only "multiply by Q" is done block by block.

Memory: A takes Σ_i m_i² ≈ d_a²/n_a floats instead of d_a², S likewise; Λ stays
``[d_a, d_out]`` (as large as the weight). One block is exactly the dense layer.

A rotation is represented by a dense ``[d, d]`` array, or by a tuple of the square
diagonal blocks ``([m_1, m_1], …)`` with Σ m_i = d.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from influence.errors import ConfigError

Rotation = Any  # jax.Array [d, d] | tuple[jax.Array, ...] of [m_i, m_i]


class LayerBlocks(NamedTuple):
    """Boundaries of the blocks of one layer: ``a`` over its d_a input rows (the bias
    row, if any, is the last row of the last block) and ``s`` over its d_out outputs."""

    a: tuple[int, ...]
    s: tuple[int, ...]

    @property
    def n_a(self) -> int:
        return len(self.a) - 1

    @property
    def n_s(self) -> int:
        return len(self.s) - 1

    @property
    def dense(self) -> bool:
        return self.n_a == 1 and self.n_s == 1


def bounds(d: int, n: int) -> tuple[int, ...]:
    """Boundaries ``(0, …, d)`` of ``n`` contiguous blocks whose sizes differ by at most 1."""
    if not 1 <= n <= d:
        raise ConfigError(f"cannot split a factor of size {d} into {n} blocks")
    q, r = divmod(d, n)
    edges = [0]
    for i in range(n):
        edges.append(edges[-1] + q + (1 if i < r else 0))
    return tuple(edges)


def _pair(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, tuple | list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ConfigError(f"{where}: expected a positive int or a pair (n_a_blocks, n_s_blocks), got {value!r}")


def resolve(layers, blocks: Any = None, max_block_size: int | None = None) -> dict[str, LayerBlocks]:
    """Block boundaries of every layer.

    Args:
      layers: the tracked :class:`~influence.capture.LayerInfo` s.
      blocks: ``None`` (no split), an int (split d_a and d_out into that many blocks), a
        pair ``(n_a, n_s)``, or a mapping from layer name (or full-match regular
        expression) to an int or pair; unlisted layers are not split.
      max_block_size: split any factor larger than this into the fewest near-equal blocks
        no larger (applied after ``blocks``, never merging blocks).
    """
    if max_block_size is not None and max_block_size < 1:
        raise ConfigError(f"max_block_size must be a positive integer, got {max_block_size}")
    out = {}
    for info in layers:
        n_a, n_s = 1, 1
        if isinstance(blocks, Mapping):
            for pattern, value in blocks.items():
                if pattern == info.name or re.fullmatch(pattern, info.name):
                    n_a, n_s = _pair(value, f"blocks[{pattern!r}]")
                    break
        elif blocks is not None:
            n_a, n_s = _pair(blocks, "blocks")
        if max_block_size is not None:
            n_a = max(n_a, math.ceil(info.d_a / max_block_size))
            n_s = max(n_s, math.ceil(info.d_out / max_block_size))
        if n_a < 1 or n_s < 1 or n_a > info.d_a or n_s > info.d_out:
            raise ConfigError(
                f"layer {info.name!r} (d_a={info.d_a}, d_out={info.d_out}) cannot be split into "
                f"{n_a} × {n_s} blocks; each count must be between 1 and the factor's size"
            )
        out[info.name] = LayerBlocks(bounds(info.d_a, n_a), bounds(info.d_out, n_s))
    return out


def is_blocked(q: Rotation) -> bool:
    return isinstance(q, tuple | list)


def slices(edges: tuple[int, ...]) -> list[slice]:
    return [slice(lo, hi) for lo, hi in zip(edges, edges[1:])]


def edges_of(q: Rotation) -> tuple[int, ...]:
    """The block boundaries of a blocked rotation."""
    out = [0]
    for block in q:
        out.append(out[-1] + block.shape[0])
    return tuple(out)


def matmul_last(x: jax.Array, q: Rotation, transpose: bool = False) -> jax.Array:
    """``x @ Q`` (or ``x @ Qᵀ``) over the last axis of ``x``, block by block if blocked."""
    if not is_blocked(q):
        return x @ (q.T if transpose else q)
    parts = [x[..., s] @ (b.T if transpose else b) for s, b in zip(slices(edges_of(q)), q)]
    return jnp.concatenate(parts, axis=-1)


def rotate(v: jax.Array, q_a: Rotation, q_s: Rotation) -> jax.Array:
    """``Q_Aᵀ V Q_S`` for ``v [..., d_a, d_out]``."""
    v = matmul_last(v, q_s)
    return jnp.swapaxes(matmul_last(jnp.swapaxes(v, -1, -2), q_a), -1, -2)


def unrotate(v: jax.Array, q_a: Rotation, q_s: Rotation) -> jax.Array:
    """``Q_A V Q_Sᵀ`` for ``v [..., d_a, d_out]``."""
    v = matmul_last(v, q_s, transpose=True)
    return jnp.swapaxes(matmul_last(jnp.swapaxes(v, -1, -2), q_a, transpose=True), -1, -2)




def as_metadata(blocks: Mapping[str, LayerBlocks]) -> dict[str, dict[str, list[int]]]:
    """The split layers only (a dense layer is the default, and files from before blocks
    existed have none)."""
    return {name: {"a": list(b.a), "s": list(b.s)} for name, b in blocks.items() if not b.dense}
