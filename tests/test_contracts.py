"""The user's side of the contract, checked on the first batch: the Task (loss shape,
sample key, hashability), the data's form, and the model's train/eval mode; and the
sampled Fisher's independence of the batching."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import influence as inf
from influence import tasks, testing


@pytest.fixture(scope="module")
def mlp():
    model, train, _ = testing.trained_mlp(hidden=8, n_train=96, steps=60)
    return model, train


def _fit(model, data, task=None, **kw):
    kw.setdefault("progress", False)
    return inf.fit_factors(model, task or tasks.Classification(), data, **kw)


def _relative(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_sampled_fisher_does_not_depend_on_the_batch_size(mlp):
    """Each example's targets are drawn with a key of its row, so batch sizes 7, 32 and 128
    (one padded batch) give the same factors and scores; a per-batch key gave up to 29%."""
    model, data = mlp
    fits = {bs: _fit(model, data, batch_size=bs) for bs in (7, 32, 128)}
    assert fits[32].metadata["sample_keys"] == "per example"
    queries = {k: v[:3] for k, v in data.items()}
    scores = {bs: inf.pairwise_scores(model, tasks.Classification(), f, queries, data, progress=False).values
              for bs, f in fits.items()}
    for bs in (7, 128):
        for name, layer in fits[32].layers.items():
            assert _relative(fits[bs].layers[name].eigenvalues, layer.eigenvalues) < 1e-5, (bs, name)
            # eigenbases agree up to sign per column: compare the projectors' action on Λ-weighted space
            qa, qa_ref = fits[bs].layers[name].q_a, layer.q_a
            np.testing.assert_allclose(np.abs(np.sum(qa * qa_ref, axis=0)), 1.0, atol=1e-3)
        assert _relative(scores[bs], scores[32]) < 1e-4, bs
    # the draws do depend on the key: another key gives other eigenvalues
    other = _fit(model, data, batch_size=32, key=jax.random.key(1))
    name = next(iter(other.layers))
    assert _relative(other.layers[name].eigenvalues, fits[32].layers[name].eigenvalues) > 1e-3
