"""nnx.ConvTranspose is tracked: its patches times the kernel matrix are its output, and
its factored per-example gradients equal jax.grad."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from influence import tasks
from influence.capture.objectives import layer_gradients
from influence.capture.per_example import weight_gradients
from influence.capture.tracking import tapping, track
from influence.errors import TrackingError
from influence.reference.exact import layer_weights, unflatten
from influence.reference.exact import per_example_gradients as grad_reference

X = np.random.default_rng(0).normal(size=(3, 5, 4, 2)).astype(np.float32)
CASES = {
    "same_stride2": dict(kernel_size=(3, 3), strides=2, padding="SAME"),
    "valid_stride_1x2_dilated": dict(kernel_size=(2, 3), strides=(1, 2), padding="VALID", kernel_dilation=(2, 1)),
    "explicit_no_bias": dict(kernel_size=(3, 2), strides=(2, 1), padding=((1, 2), (0, 1)), use_bias=False),
    "1d": dict(kernel_size=(3,), strides=3, padding="SAME"),
}


class One(nnx.Module):
    def __init__(self, **kw):
        self.layer = nnx.ConvTranspose(2, 3, rngs=nnx.Rngs(1), **kw)
        if self.layer.bias is not None:
            self.layer.bias.set_value(jnp.arange(3.0) * 0.3)

    def __call__(self, x):
        return self.layer(x)


@pytest.mark.parametrize("case", list(CASES))
def test_patches_times_kernel_matrix_is_the_output(case):
    x = X[:, :, 0] if case == "1d" else X
    tracked = track(One(**CASES[case]))
    kind = tracked.kinds[0]
    assert kind.kind == "conv_transpose"
    with tapping(None) as tap:
        y = nnx.merge(tracked.graphdef, tracked.state)(x)
    a = tap.inputs["layer"]
    if kind.has_bias:
        a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,))], axis=-1)
    expected = kind.outputs(y)
    got = a @ layer_weights(tracked)["layer"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


class Net(nnx.Module):
    def __init__(self):
        self.up = nnx.ConvTranspose(2, 3, (3, 3), strides=2, rngs=nnx.Rngs(0))
        self.head = nnx.Linear(3, 3, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.head(jnp.tanh(self.up(x)).mean(axis=(1, 2)))


@pytest.mark.slow
def test_factored_per_example_gradient_equals_jax_grad():
    model, task = Net(), tasks.Classification()
    data = {"x": X, "y": np.array([0, 2, 1], np.int32)}
    tracked = track(model)
    _, a, g = layer_gradients(tracked.graphdef, tracked.state, tracked.layers, task, "empirical", data, jnp.ones(3))
    reference = grad_reference(model, task, data)
    for n in range(3):
        blocks = unflatten(tracked, jnp.asarray(reference[n]))
        dw = weight_gradients(a["up"], g["up"])[n]
        np.testing.assert_allclose(dw, blocks["up"], rtol=1e-4, atol=1e-5 * np.abs(blocks["up"]).max())


def test_refused_settings_say_why():
    with pytest.raises(TrackingError, match="transpose_kernel"):
        track(One(kernel_size=(3, 3), transpose_kernel=True))
