"""Every layer kind as a matrix map: tokens times the kernel matrix are the layer's own
output, the factored per-example gradients equal jax.grad, and what is not tracked is said."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import influence as inf
from influence import tasks
from influence.capture.objectives import layer_gradients
from influence.capture.per_example import weight_gradients
from influence.capture.tracking import tapping, track
from influence.errors import ModelMismatch, TrackingError
from influence.reference.exact import flatten, layer_weights, model_at, unflatten
from influence.reference.exact import per_example_gradients as grad_reference
from influence.testing import trained_mlp
from tests.capture.kind_models import MODELS, Conv2D, kind_case, randomize_biases


class One(nnx.Module):
    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


def _tokens_times_matrix(layer, x):
    """``(ā W̄, the layer's output as tokens)`` for one layer wrapped in a model."""
    tracked = track(randomize_biases(One(layer), 7))
    kind = tracked.kinds[0]
    with tapping(None) as tap:
        y = nnx.merge(tracked.graphdef, tracked.state)(x)
    a = tap.inputs["layer"]
    a = a.reshape(a.shape[0], -1, a.shape[-1])
    if kind.has_bias:
        a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,))], axis=-1)
    assert a.shape[-1] == tracked.layers[0].d_a
    return a @ layer_weights(tracked)["layer"], kind.outputs(y), kind, y


def _rngs():
    return nnx.Rngs(3)


X1 = np.random.default_rng(0).normal(size=(2, 11, 3)).astype(np.float32)
X2 = np.random.default_rng(1).normal(size=(2, 7, 6, 3)).astype(np.float32)

CONVS = {
    "1d_same_stride2": (lambda: nnx.Conv(3, 4, 3, strides=2, padding="SAME", rngs=_rngs()), X1),
    "1d_valid_dilated": (lambda: nnx.Conv(3, 4, 3, padding="VALID", kernel_dilation=2, rngs=_rngs()), X1),
    "1d_causal_no_bias": (lambda: nnx.Conv(3, 4, 2, padding="CAUSAL", use_bias=False, rngs=_rngs()), X1),
    "1d_input_dilation": (lambda: nnx.Conv(3, 4, 2, padding=((1, 2),), input_dilation=2, rngs=_rngs()), X1),
    "2d_same_stride2": (lambda: nnx.Conv(3, 5, (3, 2), strides=2, padding="SAME", rngs=_rngs()), X2),
    "2d_valid_dilated": (lambda: nnx.Conv(3, 5, (2, 3), strides=(1, 2), padding="VALID", kernel_dilation=(2, 1),
                                          rngs=_rngs()), X2),
    "2d_explicit": (lambda: nnx.Conv(3, 5, (3, 3), padding=((2, 0), (1, 1)), rngs=_rngs()), X2),
    "2d_circular": (lambda: nnx.Conv(3, 5, (3, 3), strides=2, padding="CIRCULAR", rngs=_rngs()), X2),
    "3d_same_stride2": (lambda: nnx.Conv(3, 2, (2, 3, 2), strides=2, rngs=_rngs()), X2.reshape(1, 2, 7, 6, 3)),
    "2d_extra_batch_axis": (lambda: nnx.Conv(3, 5, (2, 2), rngs=_rngs()), X2.reshape(2, 1, 7, 6, 3)),
}


@pytest.mark.parametrize("case", list(CONVS))
def test_patches_times_kernel_matrix_is_the_conv_output(case):
    make, x = CONVS[case]
    got, expected, kind, y = _tokens_times_matrix(make(), x)
    assert kind.kind == "conv" and expected.shape[1] == np.prod(y.shape[1:-1])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


X3 = np.random.default_rng(2).normal(size=(2, 4, 5)).astype(np.float32)
X4 = np.random.default_rng(3).normal(size=(2, 4, 2, 3)).astype(np.float32)
MAPS = {
    "general_out_axes": (lambda: nnx.LinearGeneral(5, (2, 3), rngs=_rngs()), X3),
    "general_in_axes": (lambda: nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=_rngs()), X4),
    "general_middle_axis": (lambda: nnx.LinearGeneral(4, (3, 2), axis=1, rngs=_rngs()), X3),
    "einsum_qkv": (lambda: nnx.Einsum("BTD,DNH->BTNH", (5, 2, 3), (2, 3), rngs=_rngs()), X3),
    "einsum_out": (lambda: nnx.Einsum("BTNH,NHD->BTD", (2, 3, 4), (4,), rngs=_rngs()), X4),
    "einsum_stacked": (lambda: nnx.Einsum("BTD,SDNH->SBTNH", (3, 5, 2, 3), (3, 2, 3), rngs=_rngs()), X3),
    "einsum_transposed_out": (lambda: nnx.Einsum("BTD,DNH->BTHN", (5, 2, 3), (3, 2), rngs=_rngs()), X3),
    "einsum_permuted": (lambda: nnx.Einsum("BTNH,HND->BDT", (3, 2, 4), (4,), rngs=_rngs()), X4),
}


@pytest.mark.parametrize("case", list(MAPS))
def test_tokens_times_kernel_matrix_is_the_output(case):
    make, x = MAPS[case]
    got, expected, kind, y = _tokens_times_matrix(make(), x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_array_equal(kind.from_outputs(expected, y.shape), y)


@pytest.mark.parametrize("name", list(MODELS))
def test_weights_round_trip_through_the_matrix_layout(name):
    model, data, _ = kind_case(name)
    tracked = track(model)
    theta = flatten(tracked, layer_weights(tracked))
    assert theta.size == sum(i.d_a * i.d_out for i in tracked.layers)
    np.testing.assert_array_equal(flatten(tracked, unflatten(tracked, theta)), theta)
    np.testing.assert_array_equal(model_at(tracked, theta)(data["x"]), model(data["x"]))
    moved = model_at(tracked, theta + 0.1)(data["x"])  # every tracked weight is really set
    assert np.abs(moved - model(data["x"])).max() > 1e-2


@pytest.mark.parametrize("name", list(MODELS))
def test_factored_per_example_gradient_equals_jax_grad(name):
    model, data, _ = kind_case(name)
    task = tasks.Classification()
    tracked = track(model)
    expected_kinds = {"conv2d": "conv", "conv1d": "conv", "linear_general": "linear_general", "einsum": "einsum",
                      "attention": "linear_general"}[name]
    assert expected_kinds in {i.kind for i in tracked.layers}
    _, a, g = layer_gradients(tracked.graphdef, tracked.state, tracked.layers, task, "empirical", data, jnp.ones(12))
    reference = grad_reference(model, task, data)  # [N, P] by jax.grad of each example's loss
    for n in range(12):
        blocks = unflatten(tracked, jnp.asarray(reference[n]))
        for info in tracked.layers:
            dw = weight_gradients(a[info.name], g[info.name])[n]
            scale = np.abs(blocks[info.name]).max()
            assert scale > 0
            np.testing.assert_allclose(dw, blocks[info.name], rtol=1e-4, atol=2e-6 * scale)


def test_multi_head_attention_is_tracked_without_user_code():
    model, data, queries = kind_case("attention")
    assert {i.name: i.kind for i in track(model).layers} == {
        "attn.key": "linear_general", "attn.out": "linear_general", "attn.query": "linear_general",
        "attn.value": "linear_general", "head": "linear", "proj": "linear"}
    info = {i.name: i for i in track(model).layers}
    assert (info["attn.query"].d_a, info["attn.query"].d_out, info["attn.out"].d_a) == (9, 8, 9)
    task = tasks.Classification()
    with pytest.warns(inf.UntrackedParametersWarning, match="norm"):
        factors = inf.fit_factors(model, task, data, strategy="ekfac", progress=False)
    scores = inf.pairwise_scores(model, task, factors, queries, data, progress=False).values
    assert scores.shape == (3, 12) and np.all(np.isfinite(scores)) and np.abs(scores).max() > 0


def test_refused_configurations_say_why():
    cases = [
        (nnx.Conv(4, 4, 3, feature_group_count=2, rngs=_rngs()), "grouped convolution"),
        (nnx.Conv(3, 4, 3, mask=jnp.ones((3, 3, 4)), rngs=_rngs()), "masked convolution"),
        (nnx.LinearGeneral(3, 4, batch_axis={0: 2}, rngs=_rngs()), "batch_axis"),
        (nnx.Einsum("BTNH,NHD->BTND", (2, 3, 4), rngs=_rngs()), "'N' is in the input, the kernel and the output"),
        (nnx.Einsum("BTD,DF->BF", (5, 3), rngs=_rngs()), "'T' appears in one operand only"),
        (nnx.Einsum("...D,DF->...F", (5, 3), rngs=_rngs()), "ellipsis"),
        (nnx.Einsum("DT,DF->TF", (5, 3), rngs=_rngs()), "first letter must be the batch axis"),
    ]
    for layer, message in cases:
        with pytest.raises(TrackingError, match=message) as raised:
            track(One(layer))
        assert "'layer'" in str(raised.value)
    grouped = One(nnx.Conv(4, 4, 3, feature_group_count=2, rngs=_rngs()))
    grouped.head = nnx.Linear(4, 2, rngs=_rngs())
    assert track(grouped, ["head"]).layer_names == ("head",)  # excluded, it is no obstacle
    einsum = track(One(nnx.Einsum("BTD,DF->BTF", (5, 3), rngs=_rngs())))
    with pytest.raises(TrackingError, match="einsum_str='BTD,FD->BTF'"):
        nnx.merge(einsum.graphdef, einsum.state).layer(X3, "BTD,FD->BTF")
    with pytest.raises(TrackingError, match="leading batch axis"):
        model = track(One(nnx.Conv(3, 4, 3, rngs=_rngs())))
        with tapping(None):
            nnx.merge(model.graphdef, model.state)(X1[0])


def test_untracked_parameters_warn_once_and_are_recorded():
    class Mixed(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(7, 4, rngs=rngs)
            self.conv = nnx.Conv(4, 4, 3, feature_group_count=4, rngs=rngs)  # depthwise: not trackable
            self.norm = nnx.LayerNorm(4, rngs=rngs)
            self.scale = nnx.Param(jnp.ones(3))
            self.head = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, ids):
            h = self.norm(self.conv(self.embed(ids)))
            return self.head(h.mean(axis=1)) * self.scale[...]

    model = Mixed(nnx.Rngs(0))
    data = {"x": np.arange(12, dtype=np.int32).reshape(4, 3) % 7, "y": np.arange(4, dtype=np.int32) % 3}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        factors = inf.fit_factors(model, tasks.Classification(), data, strategy="kfac", layers=["head"],
                                  progress=False)
    ours = [w for w in caught if issubclass(w.category, inf.UntrackedParametersWarning)]
    assert len(ours) == 1
    expected = {"conv": 3 * 1 * 4 + 4, "embed": 28, "norm": 8, "scale": 3}
    total = sum(expected.values()) + 15
    message = str(ours[0].message)
    assert f"{sum(expected.values())} of {total} parameters" in message
    assert "embed (Embed, 28)" in message and "conv (Conv, 16)" in message and "scale (Param, 3)" in message
    untracked = factors.metadata["untracked"]
    assert untracked["modules"] == expected
    assert untracked["classes"] == {"conv": "Conv", "embed": "Embed", "norm": "LayerNorm", "scale": "Param"}
    assert untracked["share"] == pytest.approx(sum(expected.values()) / total)

    mlp, mlp_data, _ = trained_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error", inf.UntrackedParametersWarning)  # a fully tracked model: silence
        clean = inf.fit_factors(mlp, tasks.Classification(), mlp_data, strategy="identity", progress=False)
    assert clean.metadata["untracked"] == {"modules": {}, "classes": {}, "parameters": 0, "share": 0.0}


def test_layer_names_that_match_nothing_are_an_error_listing_the_trackable_layers():
    model, _, _ = kind_case("conv2d")
    with pytest.raises(TrackingError, match=r"layers=\['conv3'\] select no trackable layer.*conv1 \(conv\), "
                                            r"conv2 \(conv\), head \(linear\)"):
        track(model, ["conv1", "conv3"])
    assert track(model, ["conv.*"]).layer_names == ("conv1", "conv2")  # full-match patterns still select


def test_loading_factors_into_another_model_names_the_layers(tmp_path):
    model, data, _ = kind_case("conv2d")
    factors = inf.fit_factors(model, tasks.Classification(), data, strategy="diagonal", progress=False)
    path = factors.save(tmp_path / "f.npz")
    assert inf.Factors.load(path, model=model).layer_infos == factors.layer_infos
    wider = Conv2D(c1=5, rngs=nnx.Rngs(0))
    with pytest.raises(ModelMismatch) as raised:
        inf.Factors.load(path, model=wider)
    message = str(raised.value)
    assert "layer 'conv1': the factors have conv [d_in=9 + bias, d_out=3], the model has conv [d_in=9 + bias, " \
           "d_out=5]" in message
    assert "layer 'conv2': the factors have conv [d_in=12 + bias, d_out=4], the model has conv [d_in=20 + bias, " \
           "d_out=4]" in message
    assert "layers=" not in message and "'head'" not in message

    class Headless(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(1, 3, (3, 3), strides=2, padding="SAME", rngs=rngs)

    with pytest.raises(ModelMismatch, match=r"layers in the factors but not in the model: \['conv2', 'head'\]"):
        inf.Factors.load(path, model=Headless(nnx.Rngs(0)))

    class Extra(Conv2D):
        def __init__(self, rngs):
            super().__init__(rngs=rngs)
            self.norm = nnx.LayerNorm(3, rngs=rngs)

    with pytest.raises(ModelMismatch, match="the tracked layers match, but other variables differ"):
        inf.Factors.load(path, model=Extra(nnx.Rngs(0)))
