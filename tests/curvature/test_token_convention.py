"""The token convention of the factors (CausalLM: of an unpadded sequence of T tokens,
positions 0…T−2 count, the last predicts nothing), checked against A and S built here in
numpy from the model's weights, without the library's token weights or activations: a
tiny LM (embedding → linear → tanh → linear) whose per-token activations and
output gradients (empirical Fisher: softmax − one-hot) have closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import influence as inf

V, D, H, N, T = 7, 4, 5, 6, 5


class TinyLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.fc = nnx.Linear(D, H, rngs=rngs)
        self.out = nnx.Linear(H, V, rngs=rngs)

    def __call__(self, ids):
        return self.out(jnp.tanh(self.fc(self.embed(ids))))


def _numpy_sides(model, ids) -> dict:
    """{layer: (ā [N, T−1, d_a], g [N, T−1, d_out])} at positions 0…T−2, in float64:
    inputs with the bias's 1 appended, and gradients of the summed loss at the outputs."""
    f64 = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    emb, w1, b1 = f64(model.embed.embedding), f64(model.fc.kernel), f64(model.fc.bias)
    w2, b2 = f64(model.out.kernel), f64(model.out.bias)
    x = emb[ids]                      # [N, T, D]
    hidden = np.tanh(x @ w1 + b1)     # [N, T, H]
    logits = hidden @ w2 + b2         # [N, T, V]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    g_out = p[:, :-1] - np.eye(V)[ids[:, 1:]]  # softmax − one-hot of the next token
    g_fc = (g_out @ w2.T) * (1 - hidden[:, :-1] ** 2)
    one = np.ones((N, T - 1, 1))
    return {"fc": (np.concatenate([x[:, :-1], one], -1), g_fc),
            "out": (np.concatenate([hidden[:, :-1], one], -1), g_out)}


def _numpy_factors(model, ids) -> dict:
    """{layer: (A, S)}: means over positions 0…T−2 of every sequence of ā āᵀ and g gᵀ."""
    out = {}
    for name, (a, g) in _numpy_sides(model, ids).items():
        a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        out[name] = (a.T @ a / len(a), g.T @ g / len(g))
    return out


@pytest.fixture(scope="module")
def fitted():
    model = TinyLM(nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, V, size=(N, T)).astype(np.int32)
    with pytest.warns(inf.UntrackedParametersWarning):  # the embedding is not a tracked layer
        factors = {s: inf.fit_factors(model, inf.tasks.CausalLM(), {"input_ids": ids}, strategy=s,
                                      fisher="empirical", key=jax.random.key(0), progress=False)
                   for s in ("kfac", "ekfac")}
    return model, ids, factors


def test_kfac_eigenvalues_of_a_and_s_are_those_of_positions_0_to_t_minus_2(fitted):
    model, ids, factors = fitted
    expected = _numpy_factors(model, ids)
    for name, (a, s) in expected.items():
        curv = factors["kfac"].layers[name]
        for got, want in ((curv.a_eigenvalues, a), (curv.s_eigenvalues, s)):
            want = np.linalg.eigvalsh(want)
            np.testing.assert_allclose(np.sort(np.asarray(got, np.float64)), want, rtol=1e-3,
                                       atol=1e-4 * want.max())


def test_ekfac_eigenvalues_in_an_eigenbasis_built_here(fitted):
    """Λ[i, j] = mean over sequences of (q_a,iᵀ DW_n q_s,j)², with the eigenvectors q from
    numpy's eigh of the A and S built here (not the library's eigenbasis). Columns are
    matched to the library's by eigenvalue rank (the eigenvalues of this random model are
    distinct; signs cancel in the square)."""
    model, ids, factors = fitted
    expected = _numpy_factors(model, ids)
    # Per-sequence gradients of the augmented weights: Σ_t ā_t g_tᵀ over positions 0…T−2.
    grads = {name: np.einsum("nti,ntj->nij", a, g) for name, (a, g) in _numpy_sides(model, ids).items()}
    for name, (a, s) in expected.items():
        _, qa = np.linalg.eigh(a)
        _, qs = np.linalg.eigh(s)
        want = (np.einsum("ia,nij,jb->nab", qa, grads[name], qs) ** 2).mean(0)
        curv = factors["ekfac"].layers[name]
        got = np.asarray(curv.eigenvalues, np.float64)
        # The library's eigenvector order and signs may differ: match columns by eigenvalue.
        ra = np.argsort(np.argsort(curv.a_eigenvalues))
        rs = np.argsort(np.argsort(curv.s_eigenvalues))
        np.testing.assert_allclose(got, want[np.ix_(ra, rs)], rtol=2e-2, atol=1e-3 * want.max())
