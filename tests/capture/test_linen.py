"""Linen models (nnx.bridge.ToNNX, inf.linen_model) score as their NNX twins with the same
weights: the intercepted nn.Dense/DenseGeneral/Conv calls are the NNX layer kinds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import influence as inf
from influence import tasks
from influence.capture.linen import linen_model
from influence.errors import TrackingError


def _data(n, shape, seed=0):
    rs = np.random.RandomState(seed)
    return {"x": rs.randn(n, *shape).astype(np.float32), "y": rs.randint(0, 3, n).astype(np.int32)}


def _compare(linen, twin, data, pairs, strategy="ekfac"):
    """Fit and score both; per layer (linen name, twin name) the eigenvalues agree, and the scores."""
    task = tasks.Classification()
    fl = inf.fit_factors(linen, task, data, strategy=strategy, batch_size=8, progress=False)
    ft = inf.fit_factors(twin, task, data, strategy=strategy, batch_size=8, progress=False)
    for a, b in pairs:
        la, lb = fl.layers[a].eigenvalues, ft.layers[b].eigenvalues
        np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-4 * np.abs(lb).max())
    queries = {k: v[:4] for k, v in data.items()}
    sl = inf.pairwise_scores(linen, task, fl, queries, data, progress=False).values
    st = inf.pairwise_scores(twin, task, ft, queries, data, progress=False).values
    np.testing.assert_allclose(sl, st, rtol=1e-4, atol=1e-4 * np.abs(st).max())
    assert np.abs(st).max() > 0


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(jnp.tanh(nn.Dense(8)(x)))


class MLP(nnx.Module):
    def __init__(self, v):
        self.a = nnx.Linear(5, 8, rngs=nnx.Rngs(0))
        self.b = nnx.Linear(8, 3, rngs=nnx.Rngs(0))
        for layer, name in ((self.a, "Dense_0"), (self.b, "head")):
            layer.kernel.set_value(v["params"][name]["kernel"])
            layer.bias.set_value(v["params"][name]["bias"])

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


def test_linen_mlp_equals_its_nnx_twin():
    data = _data(24, (5,))
    v = LinenMLP().init(jax.random.key(1), data["x"][:1])
    model = linen_model(LinenMLP(), v)
    assert {i.name: (i.d_in, i.d_out) for i in inf.track(model).layers} == {"Dense_0": (5, 8), "head": (8, 3)}
    _compare(model, MLP(v), data, [("Dense_0", "a"), ("head", "b")], strategy="kfac")


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME")(x))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


class CNN(nnx.Module):
    def __init__(self, v):
        self.conv = nnx.Conv(2, 4, (3, 3), strides=(2, 2), padding="SAME", rngs=nnx.Rngs(0))
        self.head = nnx.Linear(36, 3, rngs=nnx.Rngs(0))
        for layer, name in ((self.conv, "Conv_0"), (self.head, "Dense_0")):
            layer.kernel.set_value(v["params"][name]["kernel"])
            layer.bias.set_value(v["params"][name]["bias"])

    def __call__(self, x):
        h = nnx.relu(self.conv(x))
        return self.head(h.reshape(h.shape[0], -1))


@pytest.mark.slow
def test_linen_cnn_equals_its_nnx_twin():
    data = _data(16, (6, 6, 2))
    v = LinenCNN().init(jax.random.key(2), data["x"][:1])
    _compare(linen_model(LinenCNN(), v), CNN(v), data, [("Conv_0", "conv"), ("Dense_0", "head")])


class Body(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(use_bias=False, use_scale=False)(x)
        return jnp.tanh(nn.DenseGeneral((2, 3), name="proj")(x)).reshape(x.shape[0], 6)


class Head(nnx.Module):
    """An NNX head over a Linen body (its ToNNX wrapper draws a key at every call)."""

    def __init__(self, x):
        self.body = nnx.bridge.ToNNX(Body(), rngs=nnx.Rngs(0))
        nnx.bridge.lazy_init(self.body, x)
        self.head = nnx.Linear(6, 3, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.head(self.body(x))


class Twin(nnx.Module):
    def __init__(self, headed):
        proj = headed.body.proj
        self.proj = nnx.LinearGeneral(5, (2, 3), rngs=nnx.Rngs(0))
        self.proj.kernel.set_value(proj["kernel"].get_value())
        self.proj.bias.set_value(proj["bias"].get_value())
        self.head = nnx.clone(headed.head)

    def __call__(self, x):
        x = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)
        return self.head(jnp.tanh(self.proj(x)).reshape(x.shape[0], 6))


@pytest.mark.slow
def test_linen_body_under_nnx_head_equals_its_nnx_twin():
    data = _data(16, (5,))
    headed = Head(data["x"][:1])
    twin = Twin(headed)
    np.testing.assert_allclose(headed(data["x"]), twin(data["x"]), atol=1e-5)
    _compare(headed, twin, data, [("body.proj", "proj"), ("head", "head")])


class Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 3))
        return x @ w


class WithCustom(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Custom()(nn.LayerNorm()(nn.Dense(4)(x)))


def test_linen_untracked_names_the_wrapper_and_a_custom_kernel_is_refused_at_its_call():
    data = _data(8, (5,))
    model = linen_model(WithCustom(), WithCustom().init(jax.random.key(0), data["x"][:1]))
    tracked = inf.track(model)
    assert tracked.untracked.modules["LayerNorm_0"][0] == "ToNNX(WithCustom)"
    with pytest.raises(TrackingError, match="Custom_0.*exclude it with layers"):
        inf.fit_factors(model, tasks.Classification(), data, progress=False)
    factors = inf.fit_factors(model, tasks.Regression(), {"x": data["x"], "y": np.zeros((8, 3), np.float32)},
                              layers=["Dense_0"], strategy="identity", progress=False)
    assert factors.layer_names == ("Dense_0",)
