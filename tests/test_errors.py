"""Bad input to the public API: clear errors, nothing lost."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import influence as inf
from influence import tasks
from influence.runtime.data import DataError
from influence.testing import MLP, trained_lm, trained_mlp


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
    with pytest.raises(ValueError,
                       match=r"forward pass failed on a batch with fields \{'x': \(32, 63\), 'y': \(32,\)\}"):
        inf.fit_factors(model, tasks.Classification(), wrong, progress=False, batch_size=32)
    # without a batch size the size probe (one row) finds it first
    with pytest.raises(ValueError, match=r"forward pass failed on a batch with fields \{'x': \(1, 63\), 'y': \(1,\)\}"):
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


# --- labels and targets are checked on the host, before a batch reaches the device -----


def _labels(y):
    model, data, _ = trained_mlp()
    data["y"] = y(data["y"])
    return model, data


def test_negative_label_is_named_with_its_batch_and_row():
    def minus_one(y):
        y[97] = -1
        return y

    model, data = _labels(minus_one)
    with pytest.raises(DataError, match=r"batch 3: labels 'y' must be integers in \[0, 10\); row 97 has -1"):
        inf.fit_factors(model, tasks.Classification(), data, strategy="kfac", batch_size=32, progress=False)


def test_float_labels_are_refused_not_truncated():
    model, data = _labels(lambda y: y.astype(np.float32) + 0.5)
    with pytest.raises(DataError, match=r"labels 'y' must be integers in \[0, 10\); got dtype float32 .*not truncated"):
        inf.fit_factors(model, tasks.Classification(), data, strategy="kfac", progress=False)


def test_int64_label_that_would_wrap_to_int32_is_refused():
    def huge(y):
        y = y.astype(np.int64)
        y[5] = 2**33 + 1  # 1 as int32
        return y

    model, data = _labels(huge)
    with pytest.raises(DataError, match=r"batch 0: labels 'y' must be integers in \[0, 10\); row 5 has 8589934593"):
        inf.fit_factors(model, tasks.Classification(), data, strategy="kfac", progress=False)


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_out_of_range_label_is_refused_by_every_fisher(fisher):
    def ten(y):
        y[200] = 10
        return y

    model, data = _labels(ten)
    with pytest.raises(DataError, match=r"batch 6: labels 'y' must be integers in \[0, 10\); row 200 has 10"):
        inf.fit_factors(model, tasks.Classification(), data, strategy="kfac", fisher=fisher, progress=False,
                        batch_size=32)


def test_token_ids_beyond_the_vocabulary_are_refused():
    model, data, _ = trained_lm()
    data["input_ids"][9, 3] = 16
    with pytest.raises(DataError, match=r"batch 1: token ids 'input_ids' must be integers in \[0, 16\); row 9 has 16"):
        inf.fit_factors(model, tasks.CausalLM(), data, strategy="kfac", batch_size=8, progress=False)
    data["input_ids"][9, 3] = 1
    data["loss_mask"] = data["loss_mask"][:, :-1]
    with pytest.raises(DataError, match=r"'loss_mask' must have the shape of 'input_ids', \[8, 8\]; got \[8, 7\]"):
        inf.fit_factors(model, tasks.CausalLM(), data, strategy="kfac", batch_size=8, progress=False)


def test_regression_targets_must_match_the_outputs():
    model = MLP(d_out=3, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)
    task = tasks.Regression()
    with pytest.raises(DataError, match=r"batch 0: targets 'y' must have shape \[B, 3\] to match the model's 3 "
                                        r"output\(s\); got \[B\]"):
        inf.fit_factors(model, task, {"x": x, "y": np.zeros(40, np.float32)}, strategy="kfac", progress=False)
    y = np.zeros((40, 3), np.float32)
    y[33, 1] = np.nan
    with pytest.raises(DataError, match=r"batch 1: targets 'y' must be finite; row 33 is not"):
        inf.fit_factors(model, task, {"x": x, "y": y}, strategy="kfac", batch_size=32, progress=False)
    y[33, 1] = 0.0
    factors = inf.fit_factors(model, task, {"x": x, "y": y}, strategy="kfac", progress=False)
    assert factors.metadata["n_examples"] == 40


def test_a_custom_validate_hook_is_called_on_every_host_batch():
    seen = []

    class Checked(tasks.Classification):
        def validate(self, batch, output_shape, *, first_row=0):
            seen.append((first_row, len(batch["y"]), output_shape))
            if first_row >= 64:
                raise ValueError("rows from 64 on are not allowed")

    model, data, _ = trained_mlp()
    with pytest.raises(DataError, match="batch 2: rows from 64 on are not allowed"):
        inf.fit_factors(model, Checked(), {k: v[:80] for k, v in data.items()}, strategy="kfac", batch_size=32,
                        progress=False)
    assert seen == [(0, 32, (32, 1, 10)), (32, 32, (32, 1, 10)), (64, 16, (32, 1, 10))]
