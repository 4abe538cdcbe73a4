"""The fixtures: trained once, but every call gets its own model and arrays."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from influence.testing import digits, trained_lm, trained_mlp


def _weights(model):
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


@pytest.mark.parametrize("fixture", [trained_mlp, trained_lm], ids=["mlp", "lm"])
def test_fixture_calls_are_independent_with_identical_weights(fixture):
    first, data, queries = fixture()
    second, data2, queries2 = fixture()
    assert first is not second
    jax.tree.map(np.testing.assert_array_equal, _weights(first), _weights(second))
    before = _weights(second)
    # vandalise everything the first call returned
    for variable in jax.tree.leaves(nnx.state(first, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        variable[...] = jnp.zeros_like(variable[...])
    first.train()
    for arrays in (data, queries):
        for v in arrays.values():
            v[...] = 0
    third, data3, queries3 = fixture()
    for model in (second, third):
        jax.tree.map(np.testing.assert_array_equal, _weights(model), before)
    for a, b in ((data2, data3), (queries2, queries3)):
        assert all(np.array_equal(a[k], b[k]) and np.any(b[k] != 0) for k in a)


def test_digits_are_fresh_copies():
    x, _ = digits()
    x[...] = -1.0
    assert digits()[0].min() == 0.0


def test_importing_the_fixtures_does_not_need_scikit_learn():
    code = ("import sys; sys.modules['sklearn'] = None\n"
            "import influence.testing as t\n"
            "assert t.lm_sequences(2)['input_ids'].shape == (2, 8)\n"
            "try:\n    t.digits()\nexcept ImportError:\n    print('digits needs sklearn')\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "digits needs sklearn"
