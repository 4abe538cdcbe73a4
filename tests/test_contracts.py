"""The user's side of the contract, checked on the first batch: the Task (loss shape,
sample key, hashability), the data's form, and the model's train/eval mode; and the
sampled Fisher's independence of the batching."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import influence as inf
from influence import tasks, testing
from tests.helpers import fit_quietly

_fit = fit_quietly


def _relative(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# default-suite time; runtime/multidevice check_sharding [mlp] checks the same across batch sizes and devices
@pytest.mark.slow
def test_sampled_fisher_does_not_depend_on_the_batch_size(small_classifier):
    """Each example's targets are drawn with a key of its row, so batch sizes 7, 32 and 128
    (one padded batch) give the same factors and scores; a per-batch key gave up to 29%."""
    model, data = small_classifier
    fits = {bs: _fit(model, data, batch_size=bs, fisher="sampled") for bs in (7, 32, 128)}
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
    other = _fit(model, data, batch_size=32, key=jax.random.key(1), fisher="sampled")
    name = next(iter(other.layers))
    assert _relative(other.layers[name].eigenvalues, fits[32].layers[name].eigenvalues) > 1e-3


# --- the Task's contract -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Column(tasks.Classification):
    """Classification whose loss comes back as ``[B, 1]`` (``shape="column"``), a batch mean
    (``"mean"``), or which ignores its key (``"no_key"``) or takes one scalar key (``"scalar_key"``)."""

    mode: str = "column"

    def loss(self, model, batch, sample_key=None):
        if self.mode == "no_key":
            return super().loss(model, batch)
        if self.mode == "scalar_key" and sample_key is not None:
            logits = model(batch["x"])
            y = jax.random.categorical(sample_key, jax.lax.stop_gradient(logits))  # needs one scalar key
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]
        per_example = super().loss(model, batch, sample_key)
        if self.mode == "column":
            return per_example[:, None]
        return jnp.mean(per_example) if self.mode == "mean" else per_example


@pytest.mark.parametrize("mode,shape", [("column", "[32, 1]"), ("mean", "[]")])
def test_loss_not_per_example_is_refused(small_classifier, mode, shape):
    model, data = small_classifier
    with pytest.raises(inf.TaskError, match=rf"one number per example, shape \[B\] = \[32\]; it returned shape "
                                            rf"{re.escape(shape)}.*per-example sums"):
        _fit(model, data, _Column(mode=mode), batch_size=32, fisher="empirical")
    factors = _fit(model, data, batch_size=32, fisher="empirical")
    with pytest.raises(inf.TaskError, match=r"_Column\.measurement must return one number per example"):
        inf.pairwise_scores(model, _Column(mode=mode), factors, data, data, batch_size=32, progress=False)


def test_sampled_loss_that_ignores_its_key_is_refused(small_classifier):
    model, data = small_classifier
    with pytest.raises(inf.TaskError, match=r"ignores its sample_key.*empirical Fisher.*fisher='empirical'"):
        _fit(model, data, _Column(mode="no_key"), batch_size=32, fisher="sampled")
    empirical = _fit(model, data, _Column(mode="no_key"), batch_size=32, fisher="empirical")
    assert empirical.metadata["fisher"] == "empirical"


def test_loss_with_one_scalar_key_still_works_and_is_warned_about(small_classifier):
    model, data = small_classifier
    with pytest.warns(UserWarning, match=r"one scalar sample_key.*depends on batch_size"):
        factors = _fit(model, data, _Column(mode="scalar_key"), batch_size=32, strategy="kfac", fisher="sampled")
    assert factors.metadata["sample_keys"] == "per batch"


@dataclasses.dataclass(frozen=True)
class _TransposedDirections(tasks.Classification):
    """Exact Fisher directions returned as ``[B, K]``, the transpose of the contract."""

    def fisher_directions(self, model, batch):
        return super().fisher_directions(model, batch).T


def test_exact_fisher_directions_not_k_by_b_are_refused(small_classifier):
    model, data = small_classifier
    with pytest.raises(inf.TaskError, match=r"fisher='exact' needs _TransposedDirections\.fisher_directions to "
                                            r"return pseudo-losses \[K, B\] = \[K, 32\].*returned shape \[32, 10\]"):
        _fit(model, data, _TransposedDirections(), batch_size=32, fisher="exact")
    assert _fit(model, data, batch_size=32, fisher="exact", strategy="kfac").metadata["fisher"] == "exact"


def test_unhashable_task_is_refused_with_what_to_do(small_classifier):
    model, data = small_classifier

    @dataclasses.dataclass
    class Plain(tasks.Task):
        def loss(self, model, batch, sample_key=None):
            return tasks.Classification().loss(model, batch, sample_key)

    with pytest.raises(TypeError, match=r"Plain is not hashable.*frozen dataclass \(@dataclasses\.dataclass"
                                        r"\(frozen=True\)\) or give it __hash__"):
        _fit(model, data, Plain(), fisher="empirical")


# --- the data's form -----------------------------------------------------------------


def test_all_zero_query_mask_names_the_query_rows():
    model, train, queries = testing.trained_lm(n_train=16, steps=20)
    task = tasks.CausalLM()
    factors = inf.fit_factors(model, task, train, strategy="kfac", fisher="empirical", progress=False)
    queries["loss_mask"][[1, 3]] = 0
    queries["loss_mask"][2, 1:] = 0  # only position 0, which is never a target
    with pytest.raises(inf.DataError, match=r"query row\(s\) 1, 2, 3 measure nothing.*loss mask is all zero"):
        inf.pairwise_scores(model, task, factors, queries, train, progress=False)


def test_tuple_of_arrays_is_refused_with_the_dict_to_pass(small_classifier):
    model, data = small_classifier
    with pytest.raises(inf.DataError, match=r"tuple of 2 arrays.*pass a dict \{'x': X, 'y': y\}.*fields \['x', 'y'\]"):
        _fit(model, (data["x"], data["y"]), fisher="empirical")


def test_pandas_dataframe_is_read_by_column(small_classifier):
    pandas = pytest.importorskip("pandas")
    model, data = small_classifier
    task = tasks.Regression(y_key="t")
    frame = pandas.DataFrame({"x": list(data["x"][:, :1].astype(np.float32).ravel()),
                              "t": data["y"].astype(np.float32), "name": ["row"] * len(data["y"])})

    class One(nnx.Module):
        def __init__(self):
            self.linear = nnx.Linear(1, 1, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.linear(x[:, None])[:, 0]

    got = inf.fit_factors(One(), task, frame, strategy="kfac", fisher="empirical", progress=False)
    want = inf.fit_factors(One(), task, {"x": frame["x"].to_numpy(), "t": frame["t"].to_numpy()}, strategy="kfac",
                           fisher="empirical", progress=False)
    np.testing.assert_array_equal(got.layers["linear"].eigenvalues, want.layers["linear"].eigenvalues)
    assert got.metadata["n_examples"] == len(frame)


# --- train mode ----------------------------------------------------------------------


def _host(x):
    return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


class _Regularised(nnx.Module):
    """Dropout and BatchNorm, left in train mode (the NNX default)."""

    def __init__(self):
        rngs = nnx.Rngs(0, dropout=1)
        self.hidden = nnx.Linear(64, 12, rngs=rngs)
        self.norm = nnx.BatchNorm(12, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(12, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(jax.nn.relu(self.norm(self.hidden(x)))))


def test_model_in_train_mode_is_scored_in_eval_mode_and_left_untouched(small_classifier):
    """Dropout off and BatchNorm on its running statistics: the scores are those of the
    eval-mode model (deterministic), and the user's model keeps its mode and state."""
    _, data = small_classifier
    model = _Regularised()
    model.norm.mean.value = jnp.linspace(-0.5, 0.5, 12)  # running statistics that differ from the batch's
    model.norm.var.value = jnp.linspace(0.5, 2.0, 12)
    before = jax.tree.map(_host, nnx.state(model))
    task = tasks.Classification()
    queries = {k: v[:4] for k, v in data.items()}
    factors = inf.fit_factors(model, task, data, strategy="ekfac", batch_size=32, progress=False)
    scores = inf.pairwise_scores(model, task, factors, queries, data, progress=False).values
    again = inf.pairwise_scores(model, task, factors, queries, data, progress=False).values
    np.testing.assert_array_equal(scores, again)
    assert model.dropout.deterministic is False and model.norm.use_running_average is False
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(_host, nnx.state(model)), before)
    evaluated = nnx.clone(model)
    evaluated.eval()
    want = inf.pairwise_scores(evaluated, task, factors, queries, data, progress=False).values
    np.testing.assert_allclose(scores, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    refit = inf.fit_factors(evaluated, task, data, strategy="ekfac", batch_size=32, progress=False)
    np.testing.assert_array_equal(refit.layers["out"].eigenvalues, factors.layers["out"].eigenvalues)
