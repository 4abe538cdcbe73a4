"""Curvature and scores of every layer kind against explicitly built dense matrices: once a
kind is tokens times a matrix, K-FAC, EK-FAC and scoring need nothing else."""

import jax.numpy as jnp
import numpy as np
import pytest

import influence as inf
from influence import tasks
from influence.capture.objectives import layer_gradients, token_weights
from influence.capture.tracking import track
from influence.curvature import LayerCurvature
from influence.reference.exact import gauss_newton, layer_slices
from influence.reference.exact import per_example_gradients as grad_reference
from tests.capture.kind_models import MODELS, kind_case
from tests.curvature.test_curvature import assert_kfac_is_dense_kronecker_inverse

pytestmark = pytest.mark.filterwarnings("ignore::influence.UntrackedParametersWarning")


def _kron_basis(c: LayerCurvature) -> np.ndarray:
    return np.kron(c.q_a.astype(np.float64), c.q_s.astype(np.float64))


def _explicit_covariances(model, task, data):
    """A and S as plain token means of ā āᵀ and g gᵀ (numpy, float64), and tokens per example."""
    tracked = track(model)
    n = len(data["y"])
    mask = jnp.ones(n)
    _, a, g = layer_gradients(tracked.graphdef, tracked.state, tracked.layers, task, "empirical", data, mask)
    out = {}
    for name in a:
        w = np.asarray(token_weights(task, data, mask, a[name]), np.float64).ravel()
        aa = np.asarray(a[name], np.float64).reshape(-1, a[name].shape[-1])
        gg = np.asarray(g[name], np.float64).reshape(-1, g[name].shape[-1])
        out[name] = ((aa * w[:, None]).T @ aa / w.sum(), (gg * w[:, None]).T @ gg / w.sum(), w.sum() / n)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_kfac_preconditioning_equals_dense_kronecker_inverse(name):
    model, data, _ = kind_case(name)
    task = tasks.Classification()
    factors = inf.fit_factors(model, task, data, strategy="kfac", fisher="empirical", progress=False)
    explicit = _explicit_covariances(model, task, data)
    rng = np.random.default_rng(0)
    positions = []
    for layer, curv in factors.layers.items():
        a_cov, s_cov, tokens_per_example = explicit[layer]
        positions.append(tokens_per_example)
        assert_kfac_is_dense_kronecker_inverse(curv, a_cov, s_cov, tokens_per_example, rng)
    assert max(positions) > 3  # several tokens (conv positions, sequence axes) per example really count


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_fisher_eigenvalues_equal_projected_gauss_newton(name):
    """With fisher='exact', Λ is the diagonal of the exact Gauss-Newton block in the Kronecker eigenbasis."""
    model, data, _ = kind_case(name)
    task = tasks.Classification()
    factors = inf.fit_factors(model, task, data, strategy="ekfac", fisher="exact", progress=False)
    gn = gauss_newton(model, task, data)
    for layer, sl in layer_slices(track(model)).items():
        curv = factors.layers[layer]
        q = _kron_basis(curv)
        expected = np.diag(q.T @ gn[sl, sl] @ q).reshape(curv.eigenvalues.shape)
        np.testing.assert_allclose(curv.eigenvalues, expected, rtol=1e-3, atol=1e-5 * expected.max())


@pytest.mark.parametrize("name", list(MODELS))
def test_identity_scores_equal_gradient_dot_products(name):
    model, data, queries = kind_case(name)
    task = tasks.Classification()
    factors = inf.fit_factors(model, task, data, strategy="identity", progress=False)
    scores = inf.pairwise_scores(model, task, factors, queries, data, progress=False, batch_size=5)
    expected = grad_reference(model, task, queries, measurement=True) @ grad_reference(model, task, data).T
    np.testing.assert_allclose(scores.values, expected, rtol=2e-4, atol=2e-5 * np.abs(expected).max())
