"""Curvature factors and preconditioning against explicitly built dense matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import influence as inf
from influence import tasks
from influence.capture import per_example
from influence.capture.objectives import layer_gradients, token_weights
from influence.capture.tracking import track
from influence.curvature import LayerCurvature, precondition
from influence.reference.exact import gauss_newton, layer_slices, unflatten
from influence.reference.exact import per_example_gradients as grad_reference
from influence.testing import trained_lm, trained_mlp


def assert_kfac_is_dense_kronecker_inverse(curv, a_cov, s_cov, tokens_per_example, rng):
    """K-FAC preconditioning of a random V equals (T̄ A ⊗ S + λI)⁻¹ vec(V), in float64.

    float32 factors: expect ~1e-5 relative agreement; a transposed rotation or a missing
    damping term is off by O(1)."""
    lam = 0.3 * float(np.mean(curv.eigenvalues))
    dense = tokens_per_example * np.kron(a_cov, s_cov) + lam * np.eye(a_cov.shape[0] * s_cov.shape[0])
    v = rng.normal(size=curv.eigenvalues.shape)
    expected = np.linalg.solve(dense, v.ravel()).reshape(v.shape)
    with jax.enable_x64(True):
        c64 = LayerCurvature(*(None if x is None else np.asarray(x, np.float64) for x in curv))
        got = np.asarray(precondition(jnp.asarray(v), c64, lam))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())


def _kron_basis(c: LayerCurvature) -> np.ndarray:
    return np.kron(c.q_a.astype(np.float64), c.q_s.astype(np.float64))


def _orthogonal(q) -> np.ndarray:
    u, _, vt = np.linalg.svd(np.asarray(q, np.float64))
    return u @ vt


def _explicit_covariances(model, task, data):
    """A and S as plain token means of ā āᵀ and g gᵀ over counted tokens (numpy, float64)."""
    tracked = track(model)
    n = len(next(iter(data.values())))
    mask = jnp.ones(n)
    _, a, g = layer_gradients(tracked.graphdef, tracked.state, tracked.layers, task, "empirical", data, mask)
    out = {}
    for name in a:
        w = np.asarray(token_weights(task, data, mask, a[name]), np.float64).ravel()
        aa = np.asarray(a[name], np.float64).reshape(-1, a[name].shape[-1])
        gg = np.asarray(g[name], np.float64).reshape(-1, g[name].shape[-1])
        out[name] = ((aa * w[:, None]).T @ aa / w.sum(), (gg * w[:, None]).T @ gg / w.sum(), w.sum() / n)
    return out


@pytest.mark.parametrize("case", ["mlp", "lm"])
def test_kfac_preconditioning_equals_dense_kronecker_inverse(case):
    model, data, _ = trained_mlp() if case == "mlp" else trained_lm()
    task = tasks.Classification() if case == "mlp" else tasks.CausalLM()
    factors = inf.fit_factors(model, task, data, strategy="kfac", fisher="empirical", progress=False)
    explicit = _explicit_covariances(model, task, data)
    rng = np.random.default_rng(0)
    for name, curv in factors.layers.items():
        a_cov, s_cov, tokens_per_example = explicit[name]
        if case == "lm":
            assert tokens_per_example > 3  # the K-FAC "expand" factor is really exercised
        assert_kfac_is_dense_kronecker_inverse(curv, a_cov, s_cov, tokens_per_example, rng)


def test_ekfac_preconditioning_equals_dense_eigenbasis_inverse():
    model, data, _ = trained_lm()
    factors = inf.fit_factors(model, tasks.CausalLM(), data, strategy="ekfac", progress=False)
    rng = np.random.default_rng(1)
    for curv in factors.layers.values():
        with jax.enable_x64(True):
            # Nearest orthogonal matrices to the stored float32 eigenvectors, so the
            # comparison is exact to float64 rounding.
            c64 = curv._replace(q_a=_orthogonal(curv.q_a), q_s=_orthogonal(curv.q_s),
                                eigenvalues=np.asarray(curv.eigenvalues, np.float64))
            q = _kron_basis(c64)
            lam = 0.1 * float(np.mean(c64.eigenvalues))
            dense = q @ np.diag(c64.eigenvalues.ravel()) @ q.T + lam * np.eye(q.shape[0])
            v = rng.normal(size=(3,) + curv.eigenvalues.shape)  # a batch of gradients
            expected = np.linalg.solve(dense, v.reshape(3, -1).T).T.reshape(v.shape)
            got = np.asarray(precondition(jnp.asarray(v), c64, lam))
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


def test_ekfac_eigenvalues_equal_mean_square_of_rotated_per_example_gradients():
    """Λ = E_n[(Qᵀ vec DW_n)²], with DW_n from jax.grad of each sequence's summed loss."""
    model, data, _ = trained_lm()
    task = tasks.CausalLM()
    factors = inf.fit_factors(model, task, data, strategy="ekfac", fisher="empirical", progress=False)
    diagonal = inf.fit_factors(model, task, data, strategy="diagonal", fisher="empirical", progress=False)
    tracked = track(model)
    grads = grad_reference(model, task, data)  # [N, P] float64
    for name, curv in factors.layers.items():
        per_example = np.stack([np.asarray(unflatten(tracked, jnp.asarray(g))[name], np.float64) for g in grads])
        flat = per_example.reshape(len(grads), -1)
        expected = ((flat @ _kron_basis(curv)) ** 2).mean(axis=0).reshape(curv.eigenvalues.shape)
        np.testing.assert_allclose(curv.eigenvalues, expected, rtol=2e-3, atol=1e-6 * expected.max())
        np.testing.assert_allclose(diagonal.layers[name].eigenvalues, (per_example**2).mean(0), rtol=2e-3,
                                   atol=1e-6 * expected.max())


def test_exact_fisher_eigenvalues_equal_projected_gauss_newton():
    """With fisher='exact', Λ is the diagonal of the exact Gauss-Newton block in the Kronecker eigenbasis."""
    model, data, _ = trained_mlp()
    task = tasks.Classification()
    factors = inf.fit_factors(model, task, data, strategy="ekfac", fisher="exact", progress=False)
    gn = gauss_newton(model, task, data)
    for name, sl in layer_slices(track(model)).items():
        curv = factors.layers[name]
        q = _kron_basis(curv)
        expected = np.diag(q.T @ gn[sl, sl] @ q).reshape(curv.eigenvalues.shape)
        np.testing.assert_allclose(curv.eigenvalues, expected, rtol=1e-3, atol=1e-5 * expected.max())


def test_sampled_fisher_estimates_the_exact_fisher():
    """Sampled targets come from the model: their Fisher matches the exact one within
    sampling noise, while the empirical Fisher (data labels) is a different matrix."""
    model, data, _ = trained_mlp()
    task = tasks.Classification()
    def fit(fisher, key=0):
        return inf.fit_factors(model, task, data, strategy="diagonal", fisher=fisher,
                               key=jax.random.key(key), progress=False)
    exact, empirical = fit("exact"), fit("empirical")
    # A confident model makes the one-sample estimator heavy-tailed: averaging 16 fits
    # brings the relative error to ~0.15-0.25 (it falls like 1/sqrt(fits)).
    sampled = [fit("sampled", k) for k in range(16)]
    for name in exact.layers:
        e = exact.layers[name].eigenvalues
        s = np.mean([f.layers[name].eigenvalues for f in sampled], axis=0)
        assert np.linalg.norm(s - e) / np.linalg.norm(e) < 0.3
        assert np.linalg.norm(empirical.layers[name].eigenvalues - e) / np.linalg.norm(e) > 0.6
    assert not np.allclose(sampled[0].layers["l1"].eigenvalues, sampled[1].layers["l1"].eigenvalues)


def test_chunked_per_example_sums_equal_unchunked(monkeypatch):
    model, data, queries = trained_lm()
    task = tasks.CausalLM()
    full = inf.fit_factors(model, task, data, strategy="ekfac", progress=False, batch_size=8)
    full_scores = inf.pairwise_scores(model, task, full, queries, data, progress=False, batch_size=8).values
    monkeypatch.setattr(per_example, "MAX_PER_EXAMPLE_ELEMENTS", 600)  # forces 1-2 example chunks
    chunked = inf.fit_factors(model, task, data, strategy="ekfac", progress=False, batch_size=8)
    chunked_scores = inf.pairwise_scores(model, task, chunked, queries, data, progress=False, batch_size=8).values
    for name in full.layers:
        np.testing.assert_allclose(chunked.layers[name].eigenvalues, full.layers[name].eigenvalues, rtol=1e-5)
    np.testing.assert_allclose(chunked_scores, full_scores, rtol=1e-4, atol=1e-4 * np.abs(full_scores).max())


def test_default_damping_is_a_tenth_of_mean_eigenvalue():
    model, data, _ = trained_mlp()
    factors = inf.fit_factors(model, tasks.Classification(), data, strategy="ekfac", progress=False)
    for name, curv in factors.layers.items():
        assert factors.damping(name) == pytest.approx(0.1 * float(np.mean(curv.eigenvalues, dtype=np.float64)))
        assert factors.damping(name, 0.5) == 0.5
    with pytest.raises(ValueError, match="damping"):
        factors.damping("l1", -1.0)


def test_batch_size_does_not_change_factors():
    model, data, _ = trained_lm()
    task = tasks.CausalLM()
    a = inf.fit_factors(model, task, data, strategy="ekfac", fisher="empirical", batch_size=32, progress=False)
    b = inf.fit_factors(model, task, data, strategy="ekfac", fisher="empirical", batch_size=5, progress=False)
    for name in a.layers:
        # float32 sums in another order; near-degenerate eigenvalues of A or S let the
        # eigenbasis turn a little (seen: 2e-4 relative); a per-batch instead of per-example
        # normalisation would be off by the ratio of batch counts (6.4×)
        np.testing.assert_allclose(a.layers[name].eigenvalues, b.layers[name].eigenvalues, rtol=1e-3,
                                   atol=1e-5 * a.layers[name].eigenvalues.max())
    assert a.metadata["n_examples"] == b.metadata["n_examples"] == 32
