"""The PBRF optimiser: converged minimisers whose small-ε response is exact influence."""

import numpy as np
import pytest

from influence import tasks
from influence.reference.exact import gauss_newton, per_example_gradients
from influence.reference.pbrf import measurement_changes, pbrf
from influence.testing import trained_mlp

POINTS = np.array([0, 7, 31, 64, 100, 255])


@pytest.fixture(scope="module")
def problem():
    model, data, queries = trained_mlp()
    task = tasks.Classification()
    return model, task, data, {k: v[:6] for k, v in queries.items()}, gauss_newton(model, task, data)


def test_small_upweighting_gives_exact_influence(problem):
    model, task, data, queries, gn = problem
    n, damping = len(data["y"]), 1e-3
    eps = 0.01 / n
    result = pbrf(model, task, data, POINTS, epsilon=eps, damping=damping, gauss_newton_matrix=gn)
    assert result.converged.all() and result.residual.max() <= 1e-6
    # so small an ε stays in the linear regime: the minimiser is the Newton step
    assert np.linalg.norm(result.delta - result.linear) <= 1e-2 * np.linalg.norm(result.linear)
    response = -measurement_changes(model, task, queries, result.delta) / eps  # [K, Q]
    q = per_example_gradients(model, task, queries, measurement=True)
    g = per_example_gradients(model, task, {k: v[POINTS] for k, v in data.items()})
    exact = g @ np.linalg.solve(gn + damping * np.eye(len(gn)), q.T)  # exact influence [K, Q]
    np.testing.assert_allclose(response, exact, rtol=0.03, atol=0.03 * np.abs(exact).max())


def test_larger_upweighting_is_nonlinear_and_removal_reverses(problem):
    model, task, data, queries, gn = problem
    n, damping = len(data["y"]), 1e-2
    points = np.tile(POINTS[:3], 3)
    eps = np.repeat([0.01 / n, 3.0 / n, -0.01 / n], 3)  # small, large, removal: one PBRF each
    result = pbrf(model, task, data, points, epsilon=eps, damping=damping, gauss_newton_matrix=gn)
    assert result.converged.all()
    small, large, removal = (slice(0, 3), slice(3, 6), slice(6, 9))

    def gap(s):
        return np.linalg.norm(result.delta[s] - result.linear[s]) / np.linalg.norm(result.linear[s])

    assert gap(large) > 5 * gap(small)
    # the linear responses are exactly opposite; the optimised ones nearly so
    np.testing.assert_allclose(result.linear[removal], -result.linear[small], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.delta[removal], -result.delta[small], rtol=0.05,
                               atol=0.02 * np.abs(result.delta[small]).max())
