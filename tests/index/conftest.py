"""Fixtures shared by the index tests."""

import pytest

import influence as inf
from influence import tasks
from influence.testing import trained_mlp


@pytest.fixture(scope="module")
def mlp():
    """``(model, task, factors, data, queries)``: a trained digits MLP (96 rows) and its EK-FAC."""
    model, data, queries = trained_mlp(n_train=96)
    task = tasks.Classification()
    factors = inf.fit_factors(model, task, data, strategy="ekfac", batch_size=32, progress=False)
    return model, task, factors, data, queries
