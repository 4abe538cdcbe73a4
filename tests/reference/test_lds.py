"""LDS machinery: subset sampling, the score itself, the retraining cache, vmapped training."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from influence import tasks
from influence.reference.lds import (
    MeasurementCache,
    lds,
    predicted_measurements,
    retrained_measurements,
    sample_subsets,
    settings_key,
)
from influence.reference.training import evaluate_many, fit_many, model_from, stack_models, weighted_mean_loss
from influence.testing import MLP, digits, train


def test_subsets_have_the_fraction_and_are_stable_as_m_grows():
    masks = sample_subsets(101, 20, 0.5, seed=3)
    assert masks.shape == (20, 101) and masks.dtype == bool
    assert np.all(masks.sum(1) == 50)  # round(0.5 · 101)
    np.testing.assert_array_equal(sample_subsets(101, 5, 0.5, seed=3), masks[:5])
    assert not np.array_equal(sample_subsets(101, 5, 0.5, seed=4), masks[:5])
    assert len({m.tobytes() for m in masks}) == 20
    # every example is in about half the subsets
    assert abs(sample_subsets(50, 400, 0.3, 0).mean() - 0.3) < 1e-9
    with pytest.raises(ValueError):
        sample_subsets(10, 3, 1.0)


def test_lds_is_one_for_an_additive_model_and_minus_one_reversed():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 80))
    masks = sample_subsets(80, 50, 0.5, 0)
    additive = -(masks @ scores.T) + 3.0  # exactly what the scores predict
    assert predicted_measurements(scores, masks) == pytest.approx(additive - 3.0)
    assert lds(scores, masks, additive).mean == pytest.approx(1.0)
    assert lds(-scores, masks, additive).mean == pytest.approx(-1.0)
    noisy = additive + rng.normal(scale=additive.std(), size=additive.shape)
    assert 0.4 < lds(scores, masks, noisy).mean < 0.9
    unrelated = lds(rng.normal(size=(6, 80)), masks, additive)
    assert abs(unrelated.mean) < 0.2


def test_lds_skips_a_query_whose_measurement_never_changes():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(3, 40))
    masks = sample_subsets(40, 30, 0.5, 0)
    measured = -(masks @ scores.T)
    measured[:, 1] = 7.0
    result = lds(scores, masks, measured)
    assert np.isnan(result.per_query[1]) and result.mean == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes"):
        lds(scores, masks, measured.T)


def test_cache_retrains_only_what_is_missing(tmp_path):
    calls = []

    def retrain(masks, seeds):
        calls.append((len(masks), tuple(seeds)))
        return np.stack([[m.sum(keepdims=True) * 1.0 + s for s in seeds] for m in masks])  # [m, S, 1]

    settings = {"recipe": "test", "lr": 0.1}
    masks = sample_subsets(30, 5, 0.5, 0)
    first = retrained_measurements(retrain, masks, [0, 1], MeasurementCache(tmp_path, settings), chunk=2)
    assert first.shape == (5, 2, 1) and calls == [(2, (0, 1)), (2, (0, 1)), (1, (0, 1))]
    calls.clear()
    again = retrained_measurements(retrain, masks, [0, 1], MeasurementCache(tmp_path, settings))
    np.testing.assert_array_equal(again, first)
    assert calls == []
    more = retrained_measurements(retrain, sample_subsets(30, 7, 0.5, 0), [0, 1], MeasurementCache(tmp_path, settings))
    assert calls == [(2, (0, 1))] and more.shape == (7, 2, 1)
    calls.clear()
    retrained_measurements(retrain, masks, [0, 1], MeasurementCache(tmp_path, {**settings, "lr": 0.2}))
    assert len(calls) == 1  # other settings, other cache file
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_cache_keys_are_those_of_existing_caches(tmp_path):
    """Settings are compared and hashed as canonical JSON; the key of these settings was
    computed by the cache before it used influence.runtime.io.canonical_json, so caches
    already on disk keep their names."""
    settings = {"model": {"hidden": (16, 8), "act": "tanh"}, "lr": 0.1, "data": Path("/data/digits"), "steps": 300,
                "fraction": 0.5}
    cache = MeasurementCache(tmp_path, settings)
    assert cache.path.name == "d1500745473b04fc.npz"
    assert cache.settings == {"data": "/data/digits", "fraction": 0.5, "lr": 0.1,
                              "model": {"act": "tanh", "hidden": [16, 8]}, "steps": 300}
    assert settings_key(settings) == settings_key(cache.settings) == "d1500745473b04fc"


@pytest.fixture(scope="module")
def small_problem():
    x, y = digits()
    return {"x": jnp.asarray(x[:64]), "y": jnp.asarray(y[:64])}


def _small_mlp(seed):
    return MLP(hidden=8, rngs=nnx.Rngs(seed))


def test_vmapped_training_matches_the_reference_trainer(small_problem):
    """fit_many with all-ones weights is influence.testing.train (Adam, mean CE + wd‖θ‖²)."""
    data = small_problem
    graphdef, params, rest = stack_models(_small_mlp, [0, 1])
    params = fit_many(graphdef, params, rest, optax.adam(1e-2), weighted_mean_loss(tasks.Classification()), data,
                      lambda _: jnp.ones((2, 64)), steps=25, weight_decay=1e-3)
    reference = _small_mlp(1)  # the second stacked model: stacking kept each seed's own weights

    def ce(m, d):
        return optax.softmax_cross_entropy_with_integer_labels(m(d["x"]), d["y"]).mean()

    train(reference, ce, data, steps=25, lr=1e-2, weight_decay=1e-3)
    np.testing.assert_allclose(model_from(graphdef, params, rest, 1)(data["x"]), reference(data["x"]),
                               rtol=1e-4, atol=1e-4)
    assert not np.allclose(model_from(graphdef, params, rest, 0)(data["x"]), reference(data["x"]), atol=1e-2)


def test_zero_weights_train_on_the_subset_only(small_problem):
    data = small_problem
    keep = np.arange(64) % 3 != 0
    subset = {k: v[keep] for k, v in data.items()}
    loss = weighted_mean_loss(tasks.Classification())
    graphdef, params, rest = stack_models(_small_mlp, [5])
    weights = jnp.asarray(keep[None], jnp.float32)
    weighted = fit_many(graphdef, params, rest, optax.adam(1e-2), loss, data, lambda _: weights, 20)
    graphdef, params, rest = stack_models(_small_mlp, [5])
    direct = fit_many(graphdef, params, rest, optax.adam(1e-2), loss, subset, lambda _: jnp.ones((1, keep.sum())), 20)
    task = tasks.Classification()
    a = evaluate_many(graphdef, weighted, rest, task.measurement, data)
    b = evaluate_many(graphdef, direct, rest, task.measurement, data)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name, subsets, floor, margin", [
    # measured with more subsets (docs/benchmarks.md): EK-FAC 0.68 vs identity 0.31 (digits),
    # 0.25 vs 0.13 (diabetes), 0.52 vs 0.13 (lm)
    ("digits", 32, 0.55, 0.2),
    ("diabetes", 32, 0.12, 0.05),
    ("lm", 16, 0.35, 0.2),
])
def test_ekfac_beats_identity_on_lds(name, subsets, floor, margin, tmp_path_factory):
    """The LDS fast configuration: M half-subsets × 2 seeds, retrained from scratch."""
    from experiments.validation import settings
    from experiments.validation.lds import evaluate

    root = tmp_path_factory.mktemp(name)
    setting = settings.get(name, root=root) if name == "lm" else settings.get(name)
    result = evaluate(setting, n_subsets=subsets, seeds=(0, 1), strategies=("identity", "ekfac"), fishers=("sampled",),
                      cache_root=root, log=lambda *_: None)
    lds_of = {r["strategy"]: r["lds"] for r in result["rows"] if r["measurement"] == list(setting.measurements)[0]}
    assert lds_of["ekfac"] > floor
    assert lds_of["ekfac"] > lds_of["identity"] + margin
