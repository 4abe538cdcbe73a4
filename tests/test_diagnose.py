"""inf.diagnose: its exact side is exact (CG equals a dense solve with the per-layer
damping), and on linear regression, where EK-FAC is exact, everything agrees."""

import numpy as np
import pytest
from flax import nnx

from influence import tasks
from influence.capture.tracking import track
from influence.diagnose import diagnose, exact_influence
from influence.reference.exact import gauss_newton, layer_slices, per_example_gradients
from influence.testing import trained_mlp


def test_linear_regression_ekfac_is_exact_and_diagnose_says_so():
    rs = np.random.RandomState(0)
    x = rs.randn(30, 3).astype(np.float32)
    data = {"x": x, "y": (x @ rs.randn(3, 2) + 0.3 * rs.randn(30, 2)).astype(np.float32)}
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    result = diagnose(model, tasks.Regression(), "ekfac", data, n_train=20, n_queries=5, top_k=5, tol=1e-10)
    assert len(result.train_rows) == 20 and len(result.query_rows) == 5
    assert not set(result.train_rows) & set(result.query_rows)
    full, strategy = result.scores["full"], result.scores["strategy"]
    np.testing.assert_allclose(strategy, full, rtol=1e-3, atol=1e-4 * np.abs(full).max())
    np.testing.assert_allclose(result.scores["block"], full, rtol=1e-6, atol=1e-8 * np.abs(full).max())
    assert result.summary["strategy_vs_full"]["pearson_min"] > 0.9999
    assert result.summary["strategy_vs_full"]["top_k_mean"] == 1.0
    assert result.cg_residual["full"] < 1e-5  # float32 products
    assert "strategy_vs_full" in str(result)
    # with other damping the exact side moves: the comparison can fail
    other = diagnose(model, tasks.Regression(), "ekfac", data, n_train=20, n_queries=5, damping=10.0, tol=1e-10)
    assert np.abs(other.scores["full"] - full).max() > 0.1 * np.abs(full).max()


@pytest.mark.slow
def test_conjugate_gradient_equals_a_dense_solve_full_and_block_diagonal():
    model, train, queries = trained_mlp(hidden=4, n_train=16, steps=20)
    queries = {k: v[:3] for k, v in queries.items()}
    task = tasks.Classification()
    dampings = {"l1": 0.05, "l2": 0.2}  # different per layer: D is per layer
    gn = gauss_newton(model, task, train)
    slices = layer_slices(track(model))
    d = np.zeros(gn.shape[0])
    for name, sl in slices.items():
        d[sl] = dampings[name]
    q = per_example_gradients(model, task, queries, measurement=True)
    g = per_example_gradients(model, task, train)
    block = np.zeros_like(gn)
    for sl in slices.values():
        block[sl, sl] = gn[sl, sl]
    for matrix, block_diagonal in ((gn, False), (block, True)):
        expected = q @ np.linalg.solve(matrix + np.diag(d), g.T)
        got, residual = exact_influence(model, task, queries, train, dampings, block_diagonal=block_diagonal,
                                        tol=1e-10)
        assert residual < 1e-5
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert np.abs(gn - block).max() > 1e-3  # the cross-layer blocks are not zero: the two solves differ
