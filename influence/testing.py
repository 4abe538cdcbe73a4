"""Small models and data for the demo, the tests and the benchmarks (offline; seconds to train).

The digits come from scikit-learn's bundled copy (imported on first use: scikit-learn is
an optional extra); the sequences are generated here. Training is cached, but every call
returns its own model and arrays, so a caller that mutates them (``model.train()``, an
edited kernel, an in-place write to a batch) cannot leak into the next.

Every seed of a trained fixture is offset by :func:`seed_offset` (the environment variable
``INFLUENCE_TEST_SEED``, default 0), so the tests that depend on how training went can
be rerun on other initialisations and data draws: ``python -m benchmarks.seed_robustness``.
At offset 0 the fixtures are the ones the suite has always used."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from influence.errors import ConfigError


def seed_offset() -> int:
    """``INFLUENCE_TEST_SEED`` (default 0), added to every seed of the trained fixtures."""
    value = os.environ.get("INFLUENCE_TEST_SEED", "0")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"INFLUENCE_TEST_SEED must be an integer, got {value!r}") from None


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int32)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits: x float32 [1797, 64] in [0, 1], y int32 (fresh copies)."""
    x, y = _digits()
    return x.copy(), y.copy()


def _copied(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in arrays.items()}


def _fresh_model(graphdef, state) -> nnx.Module:
    """A new model with new Variables holding copies of ``state``'s arrays (``nnx.merge``
    alone would share the Variables, so an edit to one model would show in the next)."""
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


class MLP(nnx.Module):
    """64 → hidden → out with tanh; ``use_bias`` toggles every bias."""

    def __init__(self, d_in=64, hidden=16, d_out=10, *, use_bias=True, rngs):
        self.l1 = nnx.Linear(d_in, hidden, use_bias=use_bias, rngs=rngs)
        self.l2 = nnx.Linear(hidden, d_out, use_bias=use_bias, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


class TinyLM(nnx.Module):
    """A one-block pre-LayerNorm causal transformer: embeddings, attention, MLP, head."""

    def __init__(self, vocab=16, d=16, heads=2, context=8, *, rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, d)))
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn_qkv = nnx.Linear(d, 3 * d, rngs=rngs)
        self.attn_out = nnx.Linear(d, d, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp_in = nnx.Linear(d, 2 * d, rngs=rngs)
        self.mlp_out = nnx.Linear(2 * d, d, rngs=rngs)
        self.ln_f = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)
        self.heads = heads

    def __call__(self, ids):
        b, t = ids.shape
        x = self.embed(ids) + self.pos[...][:t]
        q, k, v = jnp.split(self.attn_qkv(self.ln1(x)), 3, axis=-1)

        def split(z):
            return z.reshape(b, t, self.heads, -1)

        logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(q.shape[-1] // self.heads)
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), split(v)).reshape(b, t, -1)
        x = x + self.attn_out(att)
        x = x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))
        return self.head(self.ln_f(x))


def train(model, loss_fn, data: dict, steps: int, lr: float = 1e-2, weight_decay: float = 1e-3):
    """Full-batch Adam on ``loss_fn(model, data) + weight_decay·‖params‖²`` (in place)."""
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, data):
        def objective(m):
            reg = sum(jnp.sum(p**2) for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
            return loss_fn(m, data) + weight_decay * reg

        loss, grads = nnx.value_and_grad(objective)(model)
        opt.update(model, grads)
        return loss

    for _ in range(steps):
        loss = step(model, opt, data)
    return float(loss)


def _mean_cross_entropy(model, data):
    return optax.softmax_cross_entropy_with_integer_labels(model(data["x"]), data["y"]).mean()


@functools.cache
def _trained_mlp(hidden: int, n_train: int, steps: int, offset: int):
    x, y = digits()
    model = MLP(hidden=hidden, rngs=nnx.Rngs(offset))
    # offset 0: the first n_train digits; otherwise a random draw of them (queries stay held out)
    rows = np.arange(n_train) if offset == 0 else np.random.default_rng(offset).permutation(1500)[:n_train]
    data = {"x": x[rows], "y": y[rows]}
    train(model, _mean_cross_entropy, data, steps)
    queries = {"x": x[1500:1516], "y": y[1500:1516]}
    return (*nnx.split(model), data, queries)


def trained_mlp(hidden=16, n_train=256, steps=300):
    """``(model, train data, queries)``: an MLP trained on the first ``n_train`` digits
    (trained once per setting; each call gets its own copies)."""
    graphdef, state, data, queries = _trained_mlp(hidden, n_train, steps, seed_offset())
    return _fresh_model(graphdef, state), _copied(data), _copied(queries)


def lm_sequences(n: int, length: int = 8, vocab: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Sequences with learnable structure: arithmetic progressions mod ``vocab`` with a
    random start and step in {1, 2}, some of them padded (``loss_mask`` 0) at the end."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, vocab, n)
    step = rng.integers(1, 3, n)
    ids = (start[:, None] + step[:, None] * np.arange(length)) % vocab
    mask = np.ones((n, length), np.int32)
    mask[:, 0] = 0
    lengths = rng.integers(length - 3, length + 1, n)
    for i, L in enumerate(lengths):
        mask[i, L:] = 0
        ids[i, L:] = 0
    return {"input_ids": ids.astype(np.int32), "loss_mask": mask}


def trained_lm(n_train=32, steps=150):
    """``(model, train sequences, queries)``: a :class:`TinyLM` trained on
    :func:`lm_sequences`; the queries measure the completion after a 4-token prompt
    (trained once per setting; each call gets its own copies)."""
    graphdef, state, data, queries = _trained_lm(n_train, steps, seed_offset())
    return _fresh_model(graphdef, state), _copied(data), _copied(queries)


@functools.cache
def _trained_lm(n_train: int, steps: int, offset: int):
    model = TinyLM(rngs=nnx.Rngs(1 + offset))
    data = lm_sequences(n_train, seed=2 * offset)

    def lm_loss(m, d):
        logits = m(d["input_ids"])[:, :-1]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, d["input_ids"][:, 1:])
        mask = d["loss_mask"][:, 1:]
        return jnp.sum(ce * mask) / jnp.sum(mask)

    train(model, lm_loss, data, steps)
    queries = lm_sequences(6, seed=2 * offset + 1)
    queries["loss_mask"][:, :4] = 0  # measure only the completion after a 4-token prompt
    return (*nnx.split(model), data, queries)
