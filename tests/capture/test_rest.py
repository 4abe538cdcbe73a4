"""``~rest``: the parameters outside the tracked layers get the diagonal Gauss-Newton and
are scored, checked against exact influence over all parameters on tiny models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import influence as inf
from influence import tasks
from influence.capture.tracking import track


class Bare(nnx.Module):
    """A model of bare parameters only (no trackable layer)."""

    def __init__(self):
        k = jax.random.split(jax.random.key(0), 2)
        self.w = nnx.Param(jax.random.normal(k[0], (4, 5)) * 0.7)
        self.v = nnx.Param(jax.random.normal(k[1], (5, 3)) * 0.7)
        self.b = nnx.Param(jnp.array([0.1, -0.2, 0.3]))

    def __call__(self, x):
        return jnp.tanh(x @ self.w) @ self.v + self.b


class Mixed(nnx.Module):
    """A tracked Linear, then a LayerNorm and a bare parameter, outside every layer kind."""

    def __init__(self):
        self.l1 = nnx.Linear(4, 5, rngs=nnx.Rngs(0))
        self.norm = nnx.LayerNorm(5, rngs=nnx.Rngs(0))
        self.norm.scale.set_value(jnp.linspace(0.5, 1.5, 5))
        self.v = nnx.Param(jax.random.normal(jax.random.key(3), (5, 3)) * 0.7)

    def __call__(self, x):
        return jnp.tanh(self.norm(self.l1(x))) @ self.v


def _data(n, seed):
    rs = np.random.RandomState(seed)
    return {"x": rs.randn(n, 4).astype(np.float32), "y": rs.randint(0, 3, n).astype(np.int32)}


def _exact(model, paths, data, measurement=False):
    """Per-example gradients ``[N, R]`` over the parameters ``paths`` (dotted, in state
    order) and the exact Gauss-Newton diagonal ``[R]`` (mean over examples), by jax.grad,
    jax.jacfwd and jax.hessian of the cross-entropy in the logits."""
    graphdef, state = nnx.split(model)
    flat = dict((".".join(map(str, p)), v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    theta = jnp.concatenate([flat[p].reshape(-1) for p in paths])
    sizes = np.cumsum([0] + [flat[p].size for p in paths])

    def logits(th, x):
        values = {p: th[sizes[i]:sizes[i + 1]].reshape(flat[p].shape) for i, p in enumerate(paths)}
        new = jax.tree_util.tree_map_with_path(
            lambda path, v: values.get(".".join(str(getattr(k, "key", k)) for k in path[:-1]), v), state)
        return nnx.merge(graphdef, new)(x[None])[0]

    def loss(th, x, y):
        return -jax.nn.log_softmax(logits(th, x))[y]

    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(theta, data["x"], data["y"])

    def gn(x):
        jac = jax.jacfwd(logits)(theta, x)  # [C, R]
        hess = jax.hessian(lambda z: jax.nn.logsumexp(z))(logits(theta, x))
        return jnp.diag(jac.T @ hess @ jac)

    diag = jax.vmap(gn)(data["x"]).mean(axis=0)
    return np.asarray(grads, np.float64), np.asarray(diag, np.float64)


def test_bare_parameter_model_is_scored_by_the_exact_gauss_newton_diagonal():
    model, train, queries = Bare(), _data(16, 0), _data(3, 1)
    task = tasks.Classification()
    factors = inf.fit_factors(model, task, train, batch_size=8, progress=False)  # rest="auto": on, no layer
    assert factors.layer_names == ("~rest",) and factors.metadata["rest"]["parameters"] == 4 * 5 + 5 * 3 + 3
    paths = factors.metadata["rest"]["paths"]
    assert sorted(paths) == ["b", "v", "w"]
    g_train, diag = _exact(model, paths, train)
    lam = factors.layers["~rest"].eigenvalues[0]
    np.testing.assert_allclose(lam, diag, rtol=1e-4, atol=1e-6 * diag.max())
    g_query, _ = _exact(model, paths, queries)
    damping = factors.damping("~rest")
    np.testing.assert_allclose(damping, 0.1 * diag.mean(), rtol=1e-4)
    expected = (g_query / (diag + damping)) @ g_train.T
    got = inf.pairwise_scores(model, task, factors, queries, train, progress=False).values
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    # the preconditioning matters: plain gradient products differ
    assert np.abs(g_query @ g_train.T / damping - expected).max() > 0.1 * np.abs(expected).max()


@pytest.mark.slow
def test_rest_beside_tracked_layers_equals_exact_and_leaves_the_layers_alone():
    model, train, queries = Mixed(), _data(16, 2), _data(3, 3)
    task = tasks.Classification()
    assert track(model, rest=True).layer_names == ("l1", "~rest")
    with pytest.warns(inf.UntrackedParametersWarning, match="norm"):
        plain = inf.fit_factors(model, task, train, batch_size=8, progress=False)  # rest="auto": off, l1 is tracked
    assert plain.layer_names == ("l1",) and plain.metadata["rest"] is None
    factors = inf.fit_factors(model, task, train, batch_size=8, rest="diagonal", progress=False)
    assert factors.metadata["untracked"]["parameters"] == 0
    paths = factors.metadata["rest"]["paths"]
    assert sorted(paths) == ["norm.bias", "norm.scale", "v"]
    g_train, diag = _exact(model, paths, train)
    g_query, _ = _exact(model, paths, queries)
    np.testing.assert_allclose(factors.layers["~rest"].eigenvalues[0], diag, rtol=1e-4, atol=1e-6 * diag.max())
    np.testing.assert_allclose(factors.layers["l1"].eigenvalues, plain.layers["l1"].eigenvalues, rtol=1e-5)
    scores = inf.pairwise_scores(model, task, factors, queries, train, per_layer=True, progress=False)
    before = inf.pairwise_scores(model, task, plain, queries, train, per_layer=True, progress=False)
    damping = factors.damping("~rest")
    expected = (g_query / (diag + damping)) @ g_train.T
    np.testing.assert_allclose(scores.per_layer["~rest"], expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    np.testing.assert_allclose(scores.per_layer["l1"], before.per_layer["l1"], rtol=1e-4,
                               atol=1e-5 * np.abs(before.per_layer["l1"]).max())
    np.testing.assert_allclose(scores.values, scores.per_layer["l1"] + scores.per_layer["~rest"], rtol=1e-5,
                               atol=1e-6 * np.abs(scores.values).max())
