"""Exact Gauss-Newton-vector products and conjugate gradient, against dense linear algebra."""

import numpy as np
import pytest
from flax import nnx

import influence as inf
from influence import tasks
from influence.capture.tracking import track
from influence.reference.exact import flatten, gauss_newton, per_example_gradient_batches
from influence.reference.ihvp import (
    conjugate_gradient,
    cosine,
    curvature_preconditioner,
    damping_vector,
    gauss_newton_product,
)
from influence.scoring.preconditioned import query_gradients
from influence.testing import trained_lm, trained_mlp


@pytest.fixture(scope="module")
def mlp():
    model, data, queries = trained_mlp()
    return model, tasks.Classification(), data, queries


@pytest.fixture(scope="module")
def lm():
    model, data, queries = trained_lm()
    return model, tasks.CausalLM(), data, queries


def test_gauss_newton_product_equals_the_dense_matrix(mlp):
    model, task, data, _ = mlp
    dense = gauss_newton(model, task, data)
    product = gauss_newton_product(model, task, data, batch_size=100)  # a padded last batch
    v = np.random.default_rng(0).normal(size=(3, dense.shape[0]))
    np.testing.assert_allclose(product(v), v @ dense, rtol=1e-4, atol=1e-5 * np.abs(v @ dense).max())


def test_gauss_newton_product_on_a_transformer_gives_the_exact_fisher_eigenvalues(lm):
    """vᵀGv along an EK-FAC eigen-direction q_a,i ⊗ q_s,j is Λ_ij with the exact Fisher
    (tokens summed per sequence): the jvp/vjp products see the same per-sequence curvature."""
    model, task, data, _ = lm
    factors = inf.fit_factors(model, task, data, strategy="ekfac", fisher="exact", layers="mlp_in", progress=False)
    curv = factors.layers["mlp_in"]
    product = gauss_newton_product(model, task, data, layers="mlp_in", batch_size=12)
    rng = np.random.default_rng(2)
    pairs = [(int(i), int(j)) for i, j in zip(rng.integers(0, curv.q_a.shape[0], 6),
                                              rng.integers(0, curv.q_s.shape[0], 6))]
    pairs.append(np.unravel_index(np.argmax(curv.eigenvalues), curv.eigenvalues.shape))
    v = np.stack([np.outer(curv.q_a[:, i], curv.q_s[:, j]).ravel() for i, j in pairs]).astype(np.float64)
    quadratic = np.sum(v * product(v), axis=1)
    expected = np.array([curv.eigenvalues[i, j] for i, j in pairs])
    np.testing.assert_allclose(quadratic, expected, rtol=2e-3, atol=1e-4 * curv.eigenvalues.max())


def test_conjugate_gradient_solves_the_damped_system(mlp):
    model, task, data, queries = mlp
    factors = inf.fit_factors(model, task, data, strategy="ekfac", fisher="exact", progress=False)
    dampings = {name: factors.damping(name) for name in factors.layer_names}
    d = damping_vector(model, dampings)
    dense = gauss_newton(model, task, data) + np.diag(d)
    product = gauss_newton_product(model, task, data)
    b = np.random.default_rng(1).normal(size=(4, dense.shape[0]))
    expected = np.linalg.solve(dense, b.T).T
    plain = conjugate_gradient(lambda v: product(v) + d * v, b, tol=1e-5, max_iterations=3000)
    pre = curvature_preconditioner(model, factors.layers, dampings)
    preconditioned = conjugate_gradient(lambda v: product(v) + d * v, b, preconditioner=pre, tol=1e-5)
    for result in (plain, preconditioned):  # the products are float32: residuals stall near 1e-5
        assert result.residual.max() < 3e-5
        np.testing.assert_allclose(result.x, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_preconditioner_is_what_query_gradients_apply(lm):
    model, task, data, queries = lm
    factors = inf.fit_factors(model, task, data, strategy="kfac", progress=False)
    pre, dampings = query_gradients(model, task, factors, queries, execution=inf.Execution(progress=False))
    tracked = track(model)
    ours = np.asarray(flatten(tracked, {name: q.full for name, q in pre.items()}))
    raw = inf.reference.exact.per_example_gradients(model, task, queries, measurement=True)
    np.testing.assert_allclose(curvature_preconditioner(model, factors.layers, dampings)(raw), ours,
                               rtol=2e-3, atol=2e-4 * np.abs(ours).max())
    assert cosine(ours, ours) == pytest.approx(np.ones(len(ours)))


def test_streamed_per_example_gradients_equal_nnx_grad_in_the_flat_layout(mlp):
    """Batches of 5 (the last one padded) of ``exact.per_example_gradient_batches`` against
    ``nnx.grad`` of one example's measurement, laid out by hand: per tracked layer its
    kernel rows, then its bias row, row-major."""
    model, task, _, queries = mlp
    n = len(queries["y"])
    batches = list(per_example_gradient_batches(model, task, queries, measurement=True, batch_size=5))
    assert [len(b) for b in batches] == [min(5, n - lo) for lo in range(0, n, 5)]
    ours = np.concatenate(batches)
    for i in (0, 6, n - 1):
        example = {k: v[i:i + 1] for k, v in queries.items()}
        grads = nnx.to_flat_state(nnx.grad(lambda m, example=example: task.measurement(m, example)[0])(model))
        leaves = {".".join(map(str, path)): np.asarray(v[...]) for path, v in grads}
        expected = np.concatenate([np.concatenate([leaves[f"{info.name}.kernel"],
                                                   leaves[f"{info.name}.bias"][None]]).ravel()
                                   for info in track(model).layers])
        np.testing.assert_allclose(ours[i], expected, rtol=1e-5, atol=1e-6)
