"""Built-in tasks people reach for: MultiLabel (sigmoid BCE, exact Fisher), extra batch
fields passed to the model, and what a fit says about the Fisher it uses."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import influence as inf
from influence import tasks
from influence.reference.exact import per_example_gradients


def test_bernoulli_directions_give_the_loss_hessian():
    family = tasks.Bernoulli()
    rs = np.random.RandomState(0)
    outputs = jnp.asarray(rs.randn(3, 2, 4), jnp.float32)
    targets = jnp.asarray(rs.randint(0, 2, (3, 2, 4)), jnp.float32)
    mask = jnp.asarray([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    for b in range(3):
        def one(out, b=b):
            return family.loss(out[None], targets[b:b + 1], mask[b:b + 1])[0]

        hess = jax.hessian(one)(outputs[b]).reshape(8, 8)
        jac = jax.jacrev(lambda out, b=b: family.fisher_directions(out[None], mask[b:b + 1])[:, 0])(outputs[b])
        jac = jac.reshape(8, 8)  # [directions, outputs]
        np.testing.assert_allclose(jac.T @ jac, hess, atol=1e-6)
        assert np.abs(hess).max() > 0.05
    # the loss is the summed sigmoid cross-entropy
    p = jax.nn.sigmoid(outputs)
    bce = -(targets * jnp.log(p) + (1 - targets) * jnp.log(1 - p)).sum(-1)
    np.testing.assert_allclose(family.loss(outputs, targets, mask), (bce * mask).sum(1), rtol=1e-5)


class Masked(nnx.Module):
    """Takes a second input: a feature mask."""

    def __init__(self, k=3):
        self.l1 = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
        self.l2 = nnx.Linear(6, k, rngs=nnx.Rngs(1))

    def __call__(self, x, mask):
        return self.l2(jnp.tanh(self.l1(x)) * mask)


def _data(n, seed, multilabel=False):
    rs = np.random.RandomState(seed)
    data = {"x": rs.randn(n, 4).astype(np.float32), "mask": rs.randint(0, 2, (n, 6)).astype(np.float32)}
    data["y"] = (rs.randint(0, 2, (n, 3)) if multilabel else rs.randint(0, 3, n)).astype(np.int32)
    return data


@pytest.mark.parametrize("task", [tasks.Classification(extra_inputs=("mask",)),
                                  tasks.MultiLabel(extra_inputs="mask")], ids=["classification", "multilabel"])
def test_extra_inputs_reach_the_model_and_scores_are_exact_gradient_products(task):
    multilabel = isinstance(task, tasks.MultiLabel)
    model, train, queries = Masked(), _data(10, 0, multilabel), _data(3, 1, multilabel)
    factors = inf.fit_factors(model, task, train, strategy="identity", progress=False)
    got = inf.pairwise_scores(model, task, factors, queries, train, progress=False).values
    g_train = per_example_gradients(model, task, train)
    g_query = per_example_gradients(model, task, queries, measurement=True)
    expected = g_query @ g_train.T
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # the mask matters: without it the gradients differ
    unmasked = {**train, "mask": np.ones_like(train["mask"])}
    assert np.abs(per_example_gradients(model, task, unmasked) - g_train).max() > 1e-3


def test_multilabel_defaults_to_the_exact_fisher():
    model, train = Masked(), _data(8, 2, multilabel=True)
    factors = inf.fit_factors(model, tasks.MultiLabel(extra_inputs=("mask",)), train, strategy="kfac",
                              progress=False)
    assert factors.metadata["fisher"] == "exact" and "3 Fisher directions" in factors.metadata["fisher_rule"]
    with pytest.raises(ValueError, match="must be 0 or 1"):
        inf.fit_factors(model, tasks.MultiLabel(extra_inputs=("mask",)), {**train, "y": train["y"] * 2},
                        strategy="kfac", progress=False)


@dataclasses.dataclass(frozen=True)
class LossOnly(inf.Task):
    fields = ("x", "y")

    def loss(self, model, batch, sample_key=None):
        logits = model(batch["x"], jnp.ones((batch["x"].shape[0], 6)))
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1)[:, 0]


def test_a_loss_only_task_says_once_which_fisher_and_identity_says_nothing():
    model, train = Masked(), _data(8, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        factors = inf.fit_factors(model, LossOnly(), train, strategy="kfac", progress=False)
    said = [str(w.message) for w in caught if "Fisher" in str(w.message)]
    assert len(said) == 1 and "LossOnly uses the empirical Fisher" in said[0] and "OutputTask" in said[0]
    assert factors.metadata["fisher"] == "empirical"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inf.fit_factors(model, LossOnly(), train, strategy="identity", progress=False)
    assert not [w for w in caught if "Fisher" in str(w.message)]


@pytest.mark.parametrize("bad_row,first_row", [(2, 5), (0, 5), (3, 0)])
def test_multilabel_names_the_row_of_a_bad_label_in_the_whole_data(bad_row, first_row):
    """The row counted from the data's start (the batch's first row + its row in the
    batch): a cosmic-ray mutant writing ``first_row << row`` survived the test above,
    whose bad labels start the first batch."""
    y = np.zeros((4, 3), np.float32)
    y[bad_row, 1] = 2.0
    y[bad_row + 1:, 2] = 0.5  # later bad rows are not the first
    with pytest.raises(inf.InfluenceError, match=rf"labels 'y' must be 0 or 1; row {first_row + bad_row} has"):
        tasks.MultiLabel().validate({"x": np.zeros((4, 2)), "y": y}, (4, 3), first_row=first_row)
