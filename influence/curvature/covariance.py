"""The covariance pass: token covariances A and S of every layer, and their eigenbases.

``A = Σ w ā āᵀ / Σ w`` ``[d_a, d_a]`` over the layer's counted tokens and
``S = Σ w g gᵀ / Σ w`` ``[d_out, d_out]`` (summed over Fisher directions), then float64
eigendecompositions on the host. Alone it is K-FAC (Λ = T̄ e_A e_Sᵀ); EK-FAC refits Λ in
these eigenbases (:mod:`.eigenvalues`). A layer split into blocks
(:mod:`.blocks`) keeps only the diagonal blocks of A and S.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import threadpoolctl

from influence.capture.objectives import example_keys, layer_gradients, token_weights
from influence.curvature.blocks import LayerBlocks, slices
from influence.curvature.layer import LayerCurvature
from influence.curvature.passes import CURVATURE_STATICS, CurvaturePass, g_spec
from influence.errors import DataError, NonFiniteError
from influence.runtime.mesh import DATA, local, spec, to_host, zeros_per_device

_THREADED_EIGH_SIZE = 2048


def covariance_sums(a: jax.Array, g: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(Σ_bt w ā āᵀ [d_a, d_a], Σ_(k)bt w g gᵀ [d_out, d_out])`` with token weights ``w [B, T]``."""
    a_sum = jnp.einsum("bti,btj->ij", a * weights[..., None], a)
    gw = g * weights[..., None]
    s_sum = jnp.einsum("...bti,...btj->ij", gw, g)
    return a_sum, s_sum


def covariance_block_sums(a: jax.Array, g: jax.Array, weights: jax.Array, layer_blocks: LayerBlocks):
    """Diagonal blocks of the token covariance sums: ``(tuple of Σ w ā_i ā_iᵀ [m_i, m_i],
    tuple of Σ w g_j g_jᵀ)``; ``a [B, T, d_a]``, ``g [(K,) B, T, d_out]``, ``weights [B, T]``."""
    aw = a * weights[..., None]
    gw = g * weights[..., None]
    a_sums = tuple(jnp.einsum("bti,btj->ij", aw[..., s], a[..., s]) for s in slices(layer_blocks.a))
    s_sums = tuple(jnp.einsum("...bti,...btj->ij", gw[..., s], g[..., s]) for s in slices(layer_blocks.s))
    return a_sums, s_sums


@functools.partial(jax.jit, static_argnames=CURVATURE_STATICS, donate_argnums=(0,))
def covariance_step(sums, state, batch, example_mask, key, index, *, graphdef, layers, task, fisher, mesh, blocks):
    """Add one batch's token covariance sums to each device's slot.

    ``sums[name] = (A [n_data, d_a, d_a], S [n_data, d_out, d_out])`` (tuples of diagonal
    blocks for a split layer). Returns the new sums, the global count of weighted tokens
    per layer and the objective's value."""
    value, a, g = layer_gradients(graphdef, state, layers, task, fisher, batch, example_mask,
                                  example_keys(key, index))
    weights = {i.name: token_weights(task, batch, example_mask, a[i.name]) for i in layers}

    def per_device(a, g, w):
        out = {}
        for info, layer_blocks in zip(layers, blocks):
            n = info.name
            if layer_blocks.dense:
                pair = covariance_sums(a[n], g[n], w[n])
            else:
                pair = covariance_block_sums(a[n], g[n], w[n], layer_blocks)
            out[n] = jax.tree.map(lambda x: x[None], pair)
        return out

    new = local(per_device, mesh, (spec(DATA), g_spec(fisher), spec(DATA)), spec(DATA))(a, g, weights)
    counts = {name: jnp.sum(w) for name, w in weights.items()}
    return jax.tree.map(jnp.add, sums, new), counts, jnp.sum(value)


def covariance_zeros(layers, blocks: dict[str, LayerBlocks], mesh) -> dict:
    """Per-device slots for A and S (the diagonal blocks only, for a split layer)."""
    out = {}
    for info in layers:
        b = blocks[info.name]
        if b.dense:
            out[info.name] = (zeros_per_device((info.d_a, info.d_a), mesh),
                              zeros_per_device((info.d_out, info.d_out), mesh))
        else:
            a = tuple(zeros_per_device((hi - lo, hi - lo), mesh) for lo, hi in zip(b.a, b.a[1:]))
            s = tuple(zeros_per_device((hi - lo, hi - lo), mesh) for lo, hi in zip(b.s, b.s[1:]))
            out[info.name] = (a, s)
    return out


def _eigh(matrix: np.ndarray, name: str, which: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric eigendecomposition in float64; tiny negative eigenvalues clipped to 0."""
    m = np.asarray(matrix, np.float64)
    if not np.all(np.isfinite(m)):
        raise NonFiniteError(f"factor {which} of layer {name!r} holds NaN/Inf; the loss or inputs were not finite")
    # LAPACK's divide-and-conquer driver on one BLAS thread for small factors: threaded
    # BLAS spinning against JAX's own threads made a 256×256 eigh take 0.5 s instead of 13 ms.
    limit = 1 if m.shape[0] < _THREADED_EIGH_SIZE else None
    with threadpoolctl.threadpool_limits(limit):
        # overwrite_a: the symmetrised copy is LAPACK's work array (one d² float64 less at peak)
        eigenvalues, vectors = scipy.linalg.eigh(0.5 * (m + m.T), driver="evd", overwrite_a=True, check_finite=False)
    return np.clip(eigenvalues, 0.0, None), vectors


def eigendecompose(curvature: dict, totals: dict, n_tokens: dict[str, float], n_examples: int, layer_blocks,
                   dtype) -> dict[str, LayerCurvature]:
    """K-FAC curvature of every layer from its summed token covariances (on the devices),
    one factor block at a time in float64 on the host."""
    out = {}
    for name, (a_sum, s_sum) in totals.items():
        if n_tokens[name] <= 0:
            raise DataError(f"layer {name!r}: no token of the data is counted (all masked)")
        split = not layer_blocks[name].dense
        a_parts = [_eigh(to_host(m, np.float64) / n_tokens[name], name, "A") for m in (a_sum if split else (a_sum,))]
        s_parts = [_eigh(to_host(m, np.float64) / n_tokens[name], name, "S") for m in (s_sum if split else (s_sum,))]
        e_a = np.concatenate([e for e, _ in a_parts])
        e_s = np.concatenate([e for e, _ in s_parts])
        q_a = tuple(q.astype(dtype) for _, q in a_parts) if split else a_parts[0][1].astype(dtype)
        q_s = tuple(q.astype(dtype) for _, q in s_parts) if split else s_parts[0][1].astype(dtype)
        # K-FAC "expand": a sequence's curvature is its T̄ tokens' summed, so Λ for a
        # per-sequence Gauss-Newton is T̄ A⊗S (T̄ = 1 for one output per example).
        tokens_per_example = n_tokens[name] / n_examples
        out[name] = LayerCurvature(
            q_a, q_s, (tokens_per_example * np.outer(e_a, e_s)).astype(dtype), e_a.astype(dtype), e_s.astype(dtype),
        )
    return out


def _rotations_not_needed(curvature, mesh) -> tuple:
    return ()


COVARIANCES = CurvaturePass("covariances", 0, covariance_step, covariance_zeros, _rotations_not_needed,
                            eigendecompose)
