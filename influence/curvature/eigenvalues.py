"""The eigenvalue pass: Λ = E_n[(Q_Aᵀ DW_n Q_S)²] of every layer.

``DW_n = Σ_t ā_t g_tᵀ`` is example n's weight gradient summed over its tokens (and over
Fisher directions), so Λ is the per-example second moment of the gradient in the
eigenbasis of the covariance pass (EK-FAC: George et al. 2018; Grosse et al. 2023 §3.1),
or in the parameter basis when there is none (the diagonal strategy). ``[d_a, d_out]``,
averaged over examples.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from influence.capture.objectives import example_keys, layer_gradients
from influence.capture.per_example import sum_over_example_chunks, weight_gradients
from influence.curvature.blocks import matmul_last
from influence.curvature.passes import CURVATURE_STATICS, CurvaturePass, g_spec
from influence.runtime.mesh import (
    DATA,
    local,
    replicate,
    spec,
    to_host,
    zeros_per_device,
)


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
        dw = weight_gradients(a_c, g_c)  # [(K,) b, d_a, d_out]
        sq = dw**2
        if sq.ndim == 4:
            sq = sq.sum(axis=0)
        return jnp.einsum("b,bij->ij", w_c, sq)

    return sum_over_example_chunks(chunk_sum, a, g, example_weights)


@functools.partial(jax.jit, static_argnames=CURVATURE_STATICS, donate_argnums=(0,))
def eigenvalue_step(sums, rotations, state, batch, example_mask, key, index, *, graphdef, layers, task, fisher, mesh,
                     blocks):
    """Add one batch's Σ_b (Q_Aᵀ DW_b Q_S)² ``[n_data, d_a, d_out]`` to each device's slot
    (no rotation for the diagonal strategy: ``rotations[name] = (None, None)``)."""
    value, a, g = layer_gradients(graphdef, state, layers, task, fisher, batch, example_mask,
                                  example_keys(key, index))

    def per_device(a, g, mask, rotations):
        return {i.name: eigenvalue_sums(a[i.name], g[i.name], mask, *rotations[i.name])[None] for i in layers}

    new = local(per_device, mesh, (spec(DATA), g_spec(fisher), spec(DATA), spec()), spec(DATA))(
        a, g, example_mask, rotations)
    return jax.tree.map(jnp.add, sums, new), None, jnp.sum(value)


def eigenvalue_zeros(layers, blocks, mesh) -> dict:
    return {info.name: zeros_per_device((info.d_a, info.d_out), mesh) for info in layers}


def rotations(curvature: dict, mesh) -> tuple:
    """The eigenbases ``{layer: (Q_A, Q_S)}`` on the mesh (``(None, None)`` before any
    covariance pass: the diagonal strategy works in the parameter basis)."""
    return (replicate(jax.tree.map(jnp.asarray, {name: (c.q_a, c.q_s) for name, c in curvature.items()}), mesh),)


def set_eigenvalues(curvature: dict, totals: dict, n_tokens, n_examples: int, layer_blocks, dtype) -> dict:
    """Λ = Σ_n (Q_Aᵀ DW_n Q_S)² / N per layer, replacing the K-FAC Λ if there was one."""
    out = dict(curvature)
    for name, lam in totals.items():
        out[name] = curvature[name]._replace(eigenvalues=(to_host(lam, np.float64) / n_examples).astype(dtype))
    return out


EIGENVALUES = CurvaturePass("eigenvalues", 1, eigenvalue_step, eigenvalue_zeros, rotations, set_eigenvalues)
