"""A user's own OutputTask is checked against exact influence like the built-ins.

The tasks and the model are defined here, not in the library: two heads per example
(outputs [B, 2, K]), each with its own target and a per-head label mask. The exact
Gauss-Newton matrix of :func:`influence.reference.exact.gauss_newton` is compared with
one built here from ``jax.jacfwd`` and the closed-form output Hessian, and the EK-FAC
eigenvalues fitted with ``fisher="exact"`` with its diagonal in the Kronecker eigenbasis.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import influence as inf
from influence import tasks
from influence.reference.exact import gauss_newton
from influence.reference.ihvp import gauss_newton_product
from influence.reference.pbrf import pbrf

D_IN, HIDDEN, HEADS, K, N = 5, 4, 2, 3, 24


class TwoHeads(nnx.Module):
    def __init__(self, *, rngs):
        self.l1 = nnx.Linear(D_IN, HIDDEN, rngs=rngs)
        self.l2 = nnx.Linear(HIDDEN, HEADS * K, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x))).reshape(x.shape[0], HEADS, K)


@dataclasses.dataclass(frozen=True)
class TwoHeadClassification(tasks.OutputTask):
    """A softmax over K classes per head; ``w [B, 2]`` says which heads are labelled."""

    family = tasks.Categorical()
    fields = ("x", "y", "w")

    def outputs(self, model, batch):
        return model(batch["x"])

    def targets(self, batch):
        return batch["y"]

    def output_mask(self, batch, outputs):
        return batch["w"]


@dataclasses.dataclass(frozen=True)
class TwoHeadRegression(TwoHeadClassification):
    """0.5‖f − y‖² per head, targets ``[B, 2, K]``."""

    family = tasks.Gaussian()


def _data(task):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D_IN)).astype(np.float32)
    w = (rng.random((N, HEADS)) < 0.75).astype(np.float32)
    w[0] = 1.0  # at least one example with every head labelled
    if isinstance(task.family, tasks.Categorical):
        y = rng.integers(0, K, (N, HEADS)).astype(np.int32)
    else:
        y = rng.normal(size=(N, HEADS, K)).astype(np.float32)
    return {"x": x, "y": y, "w": w}


def _independent_gauss_newton(model, task, data):
    """(1/N) Σ_n J_nᵀ H_n J_n in float64, in the documented flat layout: layers l1, l2,
    each's augmented weight [kernel rows; bias row] flattened row-major."""
    blocks = [np.concatenate([np.asarray(m.kernel[...]), np.asarray(m.bias[...])[None]]) for m in (model.l1, model.l2)]
    shapes = [b.shape for b in blocks]
    theta = jnp.asarray(np.concatenate([b.ravel() for b in blocks]))

    def forward(theta, x):
        w1 = theta[: np.prod(shapes[0])].reshape(shapes[0])
        w2 = theta[np.prod(shapes[0]) :].reshape(shapes[1])
        h = jnp.tanh(x @ w1[:-1] + w1[-1])
        return (h @ w2[:-1] + w2[-1]).reshape(HEADS, K)

    total = np.zeros((theta.size, theta.size))
    for n in range(N):
        x = jnp.asarray(data["x"][n])
        jac = np.asarray(jax.jacfwd(forward)(theta, x), np.float64).reshape(HEADS * K, -1)
        f = np.asarray(forward(theta, x), np.float64)
        hess = np.zeros((HEADS * K, HEADS * K))
        for h in range(HEADS):
            if isinstance(task.family, tasks.Categorical):
                p = np.exp(f[h] - f[h].max())
                p /= p.sum()
                block = np.diag(p) - np.outer(p, p)
            else:
                block = np.eye(K)
            hess[h * K : (h + 1) * K, h * K : (h + 1) * K] = data["w"][n, h] * block
        total += jac.T @ hess @ jac
    return total / N


@pytest.fixture(scope="module", params=[TwoHeadClassification(), TwoHeadRegression()], ids=["categorical", "gaussian"])
def problem(request):
    task = request.param
    model = TwoHeads(rngs=nnx.Rngs(3))
    data = _data(task)
    return model, task, data, gauss_newton(model, task, data)


def test_user_task_gauss_newton_equals_jacobian_hessian_jacobian(problem):
    model, task, data, gn = problem
    expected = _independent_gauss_newton(model, task, data)
    assert gn.shape == expected.shape == (HIDDEN * (D_IN + 1) + HEADS * K * (HIDDEN + 1),) * 2
    np.testing.assert_allclose(gn, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_user_task_exact_fisher_eigenvalues_equal_projected_gauss_newton(problem):
    model, task, data, gn = problem
    factors = inf.fit_factors(model, task, data, strategy="ekfac", fisher="exact", progress=False)
    start = 0
    for name in ("l1", "l2"):
        curv = factors.layers[name]
        size = curv.eigenvalues.size
        q = np.kron(curv.q_a.astype(np.float64), curv.q_s.astype(np.float64))
        block = gn[start : start + size, start : start + size]
        expected = np.diag(q.T @ block @ q).reshape(curv.eigenvalues.shape)
        np.testing.assert_allclose(curv.eigenvalues, expected, rtol=1e-3, atol=1e-5 * expected.max())
        start += size
    assert start == gn.shape[0]


def test_user_task_gauss_newton_product_equals_the_matrix(problem):
    model, task, data, gn = problem
    v = np.random.default_rng(1).normal(size=(2, gn.shape[0]))
    expected = v @ gn
    got = gauss_newton_product(model, task, data, batch_size=7)(v)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


class LossOnly(inf.Task):
    def loss(self, model, batch, sample_key=None):
        return jnp.sum(model(batch["x"]) ** 2, axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class StringFamily(TwoHeadClassification):
    family = "categorical"  # the old private convention: not a LossFamily


def test_tasks_without_a_likelihood_over_outputs_are_refused_by_name():
    model = TwoHeads(rngs=nnx.Rngs(3))
    data = _data(TwoHeadClassification())
    for call in (lambda t: gauss_newton(model, t, data),
                 lambda t: gauss_newton_product(model, t, data),
                 lambda t: pbrf(model, t, data, np.arange(2), epsilon=1e-3, damping=1e-3)):
        with pytest.raises(TypeError, match=r"LossOnly lacks outputs, targets, output_mask, family \(a LossFamily\)"):
            call(LossOnly())
        with pytest.raises(TypeError, match=r"StringFamily lacks family \(a LossFamily\): subclass"):
            call(StringFamily())
