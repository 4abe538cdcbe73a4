"""Shared test setup: no network, deterministic CPU runs."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI turns on the persistent compilation cache: never in the user's home from the tests
# (tests/runtime/test_compilation.py turns it on in temporary folders).
os.environ.setdefault("INFLUENCE_COMPILATION_CACHE", "0")


import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked ``early`` run first: a minute-long test collected last would leave one
    of the two workers idle while it finishes (longest first is the classic remedy)."""
    items.sort(key=lambda item: item.get_closest_marker("early") is None)  # stable: order kept otherwise


@pytest.fixture(scope="module")
def small_classifier():
    """``(model, train)``: a hidden-8 digits MLP trained briefly on 96 examples, for the
    tests of what a fit accepts and which Fisher it uses (tests/test_fisher.py,
    tests/test_contracts.py)."""
    from influence import testing

    model, train, _ = testing.trained_mlp(hidden=8, n_train=96, steps=60)
    return model, train
