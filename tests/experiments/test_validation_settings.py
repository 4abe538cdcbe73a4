"""Pieces of experiments/validation: the Fisher specs of lds.py and the digits CNN."""

from __future__ import annotations

import warnings

import jax
import numpy as np
from flax import nnx

import influence as inf
from experiments.validation.lds import fisher_settings
from experiments.validation.settings import DigitsCNN
from influence import tasks


def test_fisher_specs():
    assert fisher_settings("default") == {}
    assert fisher_settings("exact") == {"fisher": "exact"}
    assert fisher_settings("sampled*16") == {"fisher": "sampled", "fisher_samples": 16}
    keyed = fisher_settings("sampled*4@1")
    assert keyed["fisher_samples"] == 4
    assert np.array_equal(jax.random.key_data(keyed["key"]), jax.random.key_data(jax.random.key(1)))


def test_digits_cnn_is_tracked_whole():
    """Both convolutions and both linear layers are tracked; nothing is left out (no warning)."""
    model = DigitsCNN(rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    data = {"x": rng.random((24, 64), dtype=np.float32), "y": rng.integers(0, 10, 24).astype(np.int32)}
    assert model(data["x"]).shape == (24, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", inf.UntrackedParametersWarning)
        factors = inf.fit_factors(model, tasks.Classification(), data, strategy="kfac", batch_size=8, progress=False)
    assert list(factors.layer_names) == ["conv1", "conv2", "fc1", "fc2"]
    assert factors.metadata["n_tokens"]["conv1"] == 24 * 64  # patches of every position are the tokens
    assert factors.metadata["fisher"] == "exact"
