"""Bad input to the public API: clear errors, nothing lost."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import influence as inf
from influence import tasks
from influence.runtime.data import DataError
from influence.testing import trained_lm, trained_mlp


def test_unknown_strategy_and_fisher():
    model, data, _ = trained_mlp()
    with pytest.raises(ValueError, match="unknown strategy 'tracin'"):
        inf.fit_factors(model, tasks.Classification(), data, strategy="tracin")
    with pytest.raises(ValueError, match="unknown fisher"):
        inf.fit_factors(model, tasks.Classification(), data, fisher="true")


def test_nan_in_the_loss_is_reported_with_its_batch():
    model, data, _ = trained_mlp()
    bad = {k: v[:64].copy() for k, v in data.items()}
    bad["x"][40, 3] = np.nan
    with pytest.raises(FloatingPointError, match="batch 2 .examples 32..47"):
        inf.fit_factors(model, tasks.Classification(), bad, strategy="ekfac", batch_size=16, progress=False)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        inf.fit_factors(model, tasks.Classification(), bad, strategy="diagonal", batch_size=16, progress=False)


def test_nan_factors_are_refused():
    model, data, _ = trained_mlp()
    factors = inf.fit_factors(model, tasks.Classification(), data, strategy="diagonal", progress=False)
    curv = factors.layers["l1"]
    broken = curv._replace(eigenvalues=np.where(np.arange(curv.eigenvalues.size).reshape(curv.eigenvalues.shape) == 3,
                                                np.inf, curv.eigenvalues))
    with pytest.raises(FloatingPointError, match="layer 'l1'.*NaN/Inf"):
        inf.Factors("diagonal", {**factors.layers, "l1": broken}, factors.metadata)


def test_wrong_input_shape_for_the_model():
    model, data, _ = trained_mlp()
    wrong = {"x": np.zeros((8, 63), np.float32), "y": np.zeros(8, np.int32)}
    with pytest.raises(ValueError, match=r"forward pass failed on a batch with fields \{'x': \(32, 63\), 'y': \(32,\)\}"):
        inf.fit_factors(model, tasks.Classification(), wrong, progress=False)


def test_fields_missing_from_the_data():
    model, data, _ = trained_mlp()
    with pytest.raises(DataError, match="missing field.*'label'"):
        inf.fit_factors(model, tasks.Classification(y_key="label"), data, progress=False)


def test_task_output_shape_mismatch():
    model, data, _ = trained_lm()
    with pytest.raises(ValueError, match="Classification expects logits"):
        inf.fit_factors(model, tasks.Classification(x_key="input_ids", y_key="loss_mask"), data, progress=False)


def test_ekfac_refuses_a_one_shot_iterator():
    model, data, _ = trained_mlp()
    with pytest.raises(DataError, match="reads the data twice"):
        inf.fit_factors(model, tasks.Classification(), iter([data]), strategy="ekfac", progress=False)
    factors = inf.fit_factors(model, tasks.Classification(), iter([data]), strategy="kfac", progress=False)
    assert factors.metadata["n_examples"] == len(data["y"])


def test_fully_masked_data_is_refused():
    model, data, _ = trained_lm()
    masked = {"input_ids": data["input_ids"], "loss_mask": np.zeros_like(data["loss_mask"])}
    with pytest.raises(DataError, match="no token of the data is counted"):
        inf.fit_factors(model, tasks.CausalLM(), masked, strategy="kfac", layers="mlp", progress=False)


def test_custom_task_subclass():
    """A user task needs only `loss`; the exact Fisher is refused with a clear message."""

    class Hinge(inf.Task):
        def loss(self, model, batch, sample_key=None):
            margin = model(batch["x"])[:, 0] * batch["y"]
            return jnp.maximum(0.0, 1.0 - margin)

    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    data = {"x": np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32), "y": np.sign(np.arange(20) - 9.5)}
    factors = inf.fit_factors(model, Hinge(), data, strategy="ekfac", fisher="empirical", progress=False)
    scores = inf.pairwise_scores(model, Hinge(), factors, data, data, progress=False)
    assert scores.values.shape == (20, 20) and np.all(np.isfinite(scores.values))
    with pytest.raises(NotImplementedError, match="no exact Fisher"):
        inf.fit_factors(model, Hinge(), data, fisher="exact", progress=False)
