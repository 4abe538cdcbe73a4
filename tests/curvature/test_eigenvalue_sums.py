"""EK-FAC's Λ sums for sequences with several Fisher directions per example, against
numpy loops written from the definition: Σ_b w_b Σ_k (Q_Aᵀ DW_bk Q_S)², DW_bk = Σ_t ā_bt g_bktᵀ.

A cosmic-ray mutant (``sq.sum(axis=1)`` for ``axis=0`` in
``influence.curvature.eigenvalues.eigenvalue_sums``: directions and examples swapped)
passed every curvature test, which fit sequences with one direction per example or
examples with one token only; it is equivalent only when K = B with equal weights."""

import jax.numpy as jnp
import numpy as np
import pytest

from influence.curvature.eigenvalues import eigenvalue_sums


def _numpy_sums(a, g, w, q_a, q_s):
    d_a, d_out = a.shape[-1], g.shape[-1]
    total = np.zeros((d_a, d_out))
    for b in range(a.shape[0]):
        for k in range(g.shape[0]):
            dw = np.zeros((d_a, d_out))
            for t in range(a.shape[1]):
                dw += np.outer(a[b, t], g[k, b, t])
            total += w[b] * (q_a.T @ dw @ q_s) ** 2
    return total


@pytest.mark.parametrize("k,b", [(3, 4), (3, 3)])
def test_lambda_sums_over_directions_and_weighted_examples(k, b):
    rng = np.random.default_rng(k * 10 + b)
    t, d_a, d_out = 5, 4, 3
    a = rng.normal(size=(b, t, d_a))
    g = rng.normal(size=(k, b, t, d_out))
    w = rng.uniform(0.2, 1.0, size=b)  # unequal weights: K = B cannot hide a swapped axis
    w[-1] = 0.0  # a padding row counts for nothing
    q_a = np.linalg.qr(rng.normal(size=(d_a, d_a)))[0]
    q_s = np.linalg.qr(rng.normal(size=(d_out, d_out)))[0]
    got = eigenvalue_sums(*(jnp.asarray(x, jnp.float32) for x in (a, g, w, q_a, q_s)))
    want = _numpy_sums(a, g, w, q_a, q_s)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # without rotations (the diagonal strategy): the parameter basis
    got = eigenvalue_sums(*(jnp.asarray(x, jnp.float32) for x in (a, g, w)))
    want = _numpy_sums(a, g, w, np.eye(d_a), np.eye(d_out))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
