"""The GPT model: the contract the influence engine relies on, and the ladder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from influence.lm import LADDER, GPTConfig, get_scale, init_model, parameter_counts, sequence_losses, token_losses

CFG = GPTConfig(vocab_size=50, context_length=16, d_model=32, n_layers=2, n_heads=4)
forward = nnx.jit(lambda model, ids: model(ids))  # one compiled call beats op-by-op dispatch


def test_forward_shape_dtype_and_determinism():
    model = init_model(CFG, seed=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (3, 16)), dtype=jnp.int32)
    logits = forward(model, ids)
    assert logits.shape == (3, 16, 50) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, forward(model, ids))
    np.testing.assert_array_equal(logits, forward(init_model(CFG, seed=0), ids))
    assert model(ids[:, :5]).shape == (3, 5, 50)
    with pytest.raises(ValueError, match="exceeds context_length"):
        model(jnp.zeros((1, 17), jnp.int32))


def test_linear_layers_named_two_dimensional_and_called_once(monkeypatch):
    model = init_model(CFG)
    linears = {".".join(map(str, path)): m for path, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)}
    expected = {f"blocks.{i}.{name}" for i in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc_in", "mlp.fc_out")}
    assert set(linears) == expected | {"lm_head"}
    assert all(m.kernel.get_value().ndim == 2 for m in linears.values())
    assert linears["blocks.0.mlp.fc_in"].kernel.get_value().shape == (32, 128)  # [d_in, d_out]
    calls: dict[int, int] = {}
    original = nnx.Linear.__call__

    def counting(self, x):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return original(self, x)

    monkeypatch.setattr(nnx.Linear, "__call__", counting)
    model(jnp.zeros((1, 8), jnp.int32))
    assert sorted(calls) == sorted(id(m) for m in linears.values()) and set(calls.values()) == {1}


def test_attention_is_causal():
    model = init_model(CFG)
    ids = jnp.arange(16, dtype=jnp.int32)[None]
    changed = ids.at[0, 10].set(49)
    a, b = forward(model, ids), forward(model, changed)
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_token_losses_follow_the_mask():
    model = init_model(CFG)
    ids = jnp.arange(16, dtype=jnp.int32)[None] % 50
    mask = jnp.ones((1, 16), jnp.int32).at[0, 12:].set(0)
    losses = token_losses(model, ids, mask)
    logp = jax.nn.log_softmax(model(ids)[0], -1)
    assert losses.shape == (1, 16) and losses[0, 0] == 0 and (losses[0, 12:] == 0).all()
    np.testing.assert_allclose(losses[0, 5], -logp[4, ids[0, 5]], rtol=1e-5)


def test_sequence_losses_sum_each_sequence_across_padded_batches():
    model = init_model(CFG)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(7, 16)).astype(np.int32)
    mask = (rng.random((7, 16)) < 0.7).astype(np.int32)
    expected = np.asarray(token_losses(model, jnp.asarray(ids), jnp.asarray(mask))).sum(axis=1)
    got = sequence_losses(model, ids, mask, batch_size=3)  # batches of 3, 3 and a padded 1
    assert got.shape == (7,) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert sequence_losses(model, ids[:0], mask[:0]).shape == (0,)


def test_ladder_spans_thirtyfold_in_non_embedding_parameters():
    rungs = [name for name in LADDER if name != "tiny"]
    assert len(rungs) >= 4
    shapes = [nnx.eval_shape(lambda n=n: init_model(get_scale(n).config(vocab_size=4096))) for n in rungs]
    counts = [parameter_counts(m)["non_embedding"] for m in shapes]
    assert counts == sorted(counts) and counts[-1] / counts[0] >= 30
    c = parameter_counts(init_model(CFG))
    assert c["total"] == c["embedding"] + c["head"] + c["non_embedding"]
    assert c["embedding"] == 50 * 32 + 16 * 32 and c["head"] == 32 * 50


def test_bad_configs_and_unknown_scale():
    with pytest.raises(ValueError, match="unknown scale 'huge'; choose one of: tiny, mini"):
        get_scale("huge")
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig(vocab_size=10, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_layers must be positive"):
        GPTConfig(vocab_size=10, n_layers=0)
