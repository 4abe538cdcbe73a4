"""Which Fisher a fit uses: several sampled draws per example (``fisher_samples=``), the
default chosen by the task (exact for small outputs, sampled draws for large ones,
empirical when the loss cannot sample), and the explicit ``fisher=`` kept as given."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import influence as inf
from influence import tasks, testing
from influence.capture import objectives
from influence.capture.tracking import track
from tests.helpers import fit_quietly


def _fit(model, data, task=None, **kw):
    kw.setdefault("batch_size", 32)
    return fit_quietly(model, data, task, **kw)


def _relative(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_draws_are_the_single_draw_gradients_with_folded_keys_over_root_k(small_classifier):
    """g of ``"sampled*3"`` is, for draw j, the one-draw g with keys fold_in(key_n, j),
    divided by √3 (so that Σ_j g_j g_jᵀ is the mean over draws); a the same."""
    model, data = small_classifier
    tracked = track(model)
    task = tasks.Classification()
    batch = {k: jnp.asarray(v[:16]) for k, v in data.items()}
    mask = jnp.ones(16).at[-3:].set(0.0)  # padding rows weigh 0
    keys = objectives.example_keys(jax.random.key(3), jnp.arange(16, dtype=jnp.int32) + 40)
    value, a, g = objectives.layer_gradients(tracked.graphdef, tracked.state, tracked.layers, task,
                                             objectives.sampled_kind(3), batch, mask, keys)
    assert value.shape == (3,)
    for j in range(3):
        _, a_j, g_j = objectives.layer_gradients(tracked.graphdef, tracked.state, tracked.layers, task, "sampled",
                                                 batch, mask, objectives.draw_keys(keys, j))
        for name in g:
            assert g[name].shape == (3, *g_j[name].shape)
            np.testing.assert_allclose(g[name][j], g_j[name] / np.sqrt(3.0), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(a[name], a_j[name])
    # the draws differ from each other (a wrong key fold would repeat one draw)
    name = next(iter(g))
    assert _relative(g[name][0], g[name][1]) > 1e-2


@pytest.mark.slow  # default-suite time; the sampled Fisher vs exact stays in tests/curvature/test_curvature.py
def test_more_draws_approach_the_exact_fisher(small_classifier):
    """K-FAC's S with 64 draws per example is within sampling error of the exact S, and
    much closer than one draw (error ∝ 1/√k: 8× at k = 64; asserted 3×)."""
    model, data = small_classifier
    exact = _fit(model, data, strategy="kfac", fisher="exact")
    one = _fit(model, data, strategy="kfac", fisher="sampled")
    many = _fit(model, data, strategy="kfac", fisher="sampled", fisher_samples=64)
    assert many.metadata["fisher_samples"] == 64 and one.metadata["fisher_samples"] == 1
    for name, layer in exact.layers.items():
        s_exact = (layer.q_s * layer.s_eigenvalues) @ layer.q_s.T

        def s_of(f, name=name):
            c = f.layers[name]
            return (c.q_s * c.s_eigenvalues) @ c.q_s.T

        err_one, err_many = _relative(s_of(one), s_exact), _relative(s_of(many), s_exact)
        assert err_many < err_one / 3, (name, err_one, err_many)
        assert err_many < 0.1, (name, err_many)


# by default: check_sharding.py::test_sampled_draws_same_for_other_batch_size_and_devices
@pytest.mark.slow
def test_draws_do_not_depend_on_the_batch_size(small_classifier):
    model, data = small_classifier
    fits = {bs: _fit(model, data, fisher="sampled", fisher_samples=4, batch_size=bs) for bs in (7, 96)}
    for name, layer in fits[96].layers.items():
        assert _relative(fits[7].layers[name].eigenvalues, layer.eigenvalues) < 1e-5, name
    assert fits[7].metadata["sample_keys"] == "per example"


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "4"])
def test_fisher_samples_must_be_a_positive_int(small_classifier, bad):
    model, data = small_classifier
    with pytest.raises(ValueError, match=r"fisher_samples must be an int >= 1"):
        _fit(model, data, fisher="sampled", fisher_samples=bad)


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_fisher_samples_only_with_the_sampled_fisher(small_classifier, fisher):
    model, data = small_classifier
    with pytest.raises(ValueError, match=rf"fisher_samples=4 is the number of sampled draws.*fisher='{fisher}'"):
        _fit(model, data, fisher=fisher, fisher_samples=4)


def test_unknown_fisher_is_refused(small_classifier):
    model, data = small_classifier
    with pytest.raises(ValueError, match=r"unknown fisher 'true'.*or None \(chosen by the task\)"):
        _fit(model, data, fisher="true")


# --- the default, per task kind ------------------------------------------------------


def test_default_is_exact_for_a_small_classifier_and_equals_fisher_exact(small_classifier):
    model, data = small_classifier
    default, exact = _fit(model, data), _fit(model, data, fisher="exact")
    assert default.metadata["fisher"] == "exact" and "fisher_samples" not in default.metadata
    assert default.metadata["fisher_rule"].startswith("default: exact, the task has 10 Fisher directions")
    assert exact.metadata["fisher_rule"] == "requested"
    for name, layer in exact.layers.items():
        np.testing.assert_array_equal(default.layers[name].eigenvalues, layer.eigenvalues)


def test_default_is_exact_for_regression():
    model = testing.MLP(d_in=4, hidden=6, d_out=2, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(40, 4)).astype(np.float32), "y": rng.normal(size=(40, 2)).astype(np.float32)}
    factors = _fit(model, data, tasks.Regression(), strategy="kfac")
    assert factors.metadata["fisher"] == "exact"
    assert "2 Fisher directions" in factors.metadata["fisher_rule"]


def test_default_samples_draws_when_the_output_is_large():
    """More classes than EXACT_MAX_DIRECTIONS (a vocabulary): DEFAULT_SAMPLES sampled draws,
    the same factors as asking for them."""
    n_classes = objectives.EXACT_MAX_DIRECTIONS + 1
    model = testing.MLP(d_in=8, hidden=6, d_out=n_classes, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(40, 8)).astype(np.float32), "y": rng.integers(0, n_classes, 40).astype(np.int32)}
    default = _fit(model, data, strategy="kfac")
    assert default.metadata["fisher"] == "sampled"
    assert default.metadata["fisher_samples"] == objectives.DEFAULT_SAMPLES
    assert f"{n_classes} exact Fisher directions per example (> {objectives.EXACT_MAX_DIRECTIONS})" in \
        default.metadata["fisher_rule"]
    asked = _fit(model, data, strategy="kfac", fisher="sampled", fisher_samples=objectives.DEFAULT_SAMPLES)
    for name, layer in asked.layers.items():
        np.testing.assert_array_equal(default.layers[name].s_eigenvalues, layer.s_eigenvalues)
    # fisher_samples alone asks for the sampled Fisher, even where exact would be the default
    assert _fit(model, data, strategy="kfac", fisher_samples=2).metadata["fisher_samples"] == 2


def test_default_is_one_draw_for_sequences_of_many_target_tokens():
    """A language model: every draw samples each of its T target tokens, so the default is
    ⌈DEFAULT_SAMPLES / T⌉ draws (one for T ≥ 4), recorded in the rule; the same factors as
    asking for one draw."""
    model = testing.TinyLM(vocab=40, d=8, context=9, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, 40, (12, 9)).astype(np.int32)
    data = {"input_ids": ids}
    default = _fit(model, data, tasks.CausalLM(), strategy="kfac")
    assert default.metadata["fisher"] == "sampled" and default.metadata["fisher_samples"] == 1
    assert "8 target tokens per example, 1 draw" in default.metadata["fisher_rule"]
    asked = _fit(model, data, tasks.CausalLM(), strategy="kfac", fisher="sampled", fisher_samples=1)
    for name, layer in asked.layers.items():
        np.testing.assert_array_equal(default.layers[name].s_eigenvalues, layer.s_eigenvalues)
    assert [objectives.default_draws(t) for t in (1, 2, 3, 4, 127)] == [4, 2, 2, 1, 1]


@dataclasses.dataclass(frozen=True)
class _LabelsOnly(tasks.Task):
    """A custom task whose loss never samples (no key use) and has no exact Fisher."""

    def loss(self, model, batch, sample_key=None):
        return tasks.Classification().loss(model, batch)


@dataclasses.dataclass(frozen=True)
class _OneDrawPerCall(tasks.Task):
    """A custom task that samples with per-example keys but has no sampled_losses."""

    def loss(self, model, batch, sample_key=None):
        return tasks.Classification().loss(model, batch, sample_key)


def test_default_for_a_loss_that_cannot_sample_is_empirical_and_warned(small_classifier):
    model, data = small_classifier
    with pytest.warns(UserWarning, match=r"uses the empirical Fisher.*because the task has no exact Fisher.*"
                                         r"does not draw targets from sample_key"):
        factors = _fit(model, data, _LabelsOnly(), strategy="kfac")
    assert factors.metadata["fisher"] == "empirical"
    assert "cannot sample" in factors.metadata["fisher_rule"]
    # asked for explicitly, the sampled Fisher is still refused
    with pytest.raises(inf.TaskError, match=r"ignores its sample_key"):
        _fit(model, data, _LabelsOnly(), strategy="kfac", fisher="sampled")


def test_default_for_a_loss_with_one_draw_per_call_is_one_draw(small_classifier):
    model, data = small_classifier
    factors = _fit(model, data, _OneDrawPerCall(), strategy="kfac")
    assert factors.metadata["fisher"] == "sampled" and factors.metadata["fisher_samples"] == 1
    assert "_OneDrawPerCall has no sampled_losses" in factors.metadata["fisher_rule"]
    with pytest.raises(NotImplementedError, match=r"fisher_samples > 1 needs sampled_losses"):
        _fit(model, data, _OneDrawPerCall(), strategy="kfac", fisher="sampled", fisher_samples=3)


def test_identity_records_that_no_fisher_is_used(small_classifier):
    model, data = small_classifier
    factors = _fit(model, data, strategy="identity")
    assert factors.metadata["fisher"] is None
    assert factors.metadata["fisher_rule"].startswith("not used")
