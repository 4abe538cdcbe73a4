"""GPT-style decoder-only transformer in flax NNX, and the named scale ladder.

Contract relied on by the influence engine:

* ``model(input_ids)`` with ``input_ids`` int32 ``[B, T]`` (``T <= config.context_length``)
  returns logits float32 ``[B, T, V]``; there is no dropout, so calls are deterministic.
* Every projection is an ``nnx.Linear`` called exactly once per forward pass, with 2-D
  kernels ``[d_in, d_out]``: ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``,
  ``blocks.{i}.mlp.fc_in``, ``blocks.{i}.mlp.fc_out`` and the untied output head
  ``lm_head`` (no bias). Blocks live in an ``nnx.List`` (no scan / stacked layers).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from influence.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Architecture hyper-parameters (all sizes in units of features or tokens)."""

    vocab_size: int
    context_length: int = 128
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int | None = None  # defaults to 4 * d_model
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def mlp_width(self) -> int:
        return self.d_mlp or 4 * self.d_model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class Scale:
    """One rung of the ladder: architecture (without vocabulary) and training budget.

    ``tokens`` is the training budget in target tokens; ``batch_size`` in sequences;
    ``learning_rate`` is the peak AdamW rate reached after warmup.
    """

    d_model: int
    n_layers: int
    n_heads: int
    tokens: int
    batch_size: int = 32
    learning_rate: float = 3e-3
    context_length: int = 128

    def config(self, vocab_size: int, context_length: int | None = None) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, context_length=context_length or self.context_length,
                         d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads)


# Non-embedding parameters (blocks + final LayerNorm) grow ~12 d^2 per layer: ~0.10M,
# 0.60M, 2.2M, 6.3M (63x from mini to large). All rungs see the same 4M-token budget
# (976 steps of 32 x 128 tokens, ~2.6 epochs of Shakespeare), sized so that `large`
# trains in under ~30 min on a 2-core CPU; docs/lm.md has the measured numbers.
LADDER: dict[str, Scale] = {
    "tiny": Scale(d_model=32, n_layers=1, n_heads=2, tokens=20_000, batch_size=8,
                  learning_rate=1e-2, context_length=32),
    "mini": Scale(d_model=64, n_layers=2, n_heads=2, tokens=4_000_000, learning_rate=5e-3),
    "small": Scale(d_model=128, n_layers=3, n_heads=4, tokens=4_000_000, learning_rate=3e-3),
    "medium": Scale(d_model=192, n_layers=5, n_heads=6, tokens=4_000_000, learning_rate=2e-3),
    "large": Scale(d_model=256, n_layers=8, n_heads=8, tokens=4_000_000, learning_rate=1.5e-3),
    # Rungs for an accelerator (the scale experiment's --config gpu): ~14M and ~31M.
    "xl": Scale(d_model=384, n_layers=8, n_heads=8, tokens=4_000_000, learning_rate=1e-3),
    "xxl": Scale(d_model=512, n_layers=10, n_heads=8, tokens=4_000_000, learning_rate=8e-4),
    # ~99M non-embedding, ~102M total at a 2048-token vocabulary: the top of the v3
    # accelerator ladder (issue 26: >= 100M parameters).
    "xxxl": Scale(d_model=768, n_layers=14, n_heads=12, tokens=4_000_000, learning_rate=6e-4),
}


def get_scale(name: str) -> Scale:
    """Look up a ladder rung by name, with the list of valid names on error."""
    try:
        return LADDER[name]
    except KeyError:
        raise ConfigError(f"unknown scale {name!r}; choose one of: {', '.join(LADDER)}") from None


class CausalSelfAttention(nnx.Module):
    """Multi-head attention with a causal mask; one fused ``qkv`` Linear and one ``proj``."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        init = nnx.initializers.normal(0.02)
        # Residual-branch outputs are scaled down with depth (GPT-2) so the stream's
        # variance does not grow with the number of layers at initialisation.
        out_init = nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layers))
        self.qkv = nnx.Linear(d, 3 * d, kernel_init=init, rngs=rngs)
        self.proj = nnx.Linear(d, d, kernel_init=out_init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, d] -> [B, T, d]."""
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)

        def heads(z: jax.Array) -> jax.Array:  # [B, T, d] -> [B, T, heads, d / heads]
            return z.reshape(b, t, self.n_heads, d // self.n_heads)

        y = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        return self.proj(y.reshape(b, t, d))


class MLP(nnx.Module):
    """Position-wise feed-forward: ``fc_in`` (d -> 4d), GELU, ``fc_out`` (4d -> d)."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        out_init = nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layers))
        self.fc_in = nnx.Linear(cfg.d_model, cfg.mlp_width, kernel_init=init, rngs=rngs)
        self.fc_out = nnx.Linear(cfg.mlp_width, cfg.d_model, kernel_init=out_init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc_out(jax.nn.gelu(self.fc_in(x)))


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(cfg.d_model, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.ln2 = nnx.LayerNorm(cfg.d_model, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nnx.Module):
    """Decoder-only language model with learned token and position embeddings."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        init = nnx.initializers.normal(0.02)
        self.token_embed = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init, rngs=rngs)
        self.pos_embed = nnx.Embed(cfg.context_length, cfg.d_model, embedding_init=init, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, kernel_init=init, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: int32 [B, T] with T <= context_length -> logits float32 [B, T, V]."""
        t = input_ids.shape[-1]
        if t > self.config.context_length:
            raise ConfigError(f"sequence length {t} exceeds context_length {self.config.context_length}")
        x = self.token_embed(input_ids) + self.pos_embed(jnp.arange(t))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x)).astype(jnp.float32)


def init_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A freshly initialised model; the same seed gives the same weights."""
    return GPT(cfg, rngs=nnx.Rngs(seed))


def parameter_counts(model: GPT) -> dict[str, int]:
    """Parameter counts: ``total``, ``embedding`` (token + position tables), ``head``
    (``lm_head``) and ``non_embedding`` (blocks + final LayerNorm, Kaplan et al.'s N)."""
    counts = {"total": 0, "embedding": 0, "head": 0, "non_embedding": 0}
    for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = int(p.get_value().size)
        counts["total"] += n
        top = str(path[0])
        if top in ("token_embed", "pos_embed"):
            counts["embedding"] += n
        elif top == "lm_head":
            counts["head"] += n
        else:
            counts["non_embedding"] += n
    return counts


def token_losses(model: GPT, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Per-token next-token cross-entropy in nats, float32 [B, T].

    Entry t is -log p(input_ids[t] | input_ids[:t]) times loss_mask[t]; entry 0 is always 0
    because nothing precedes the first token.
    """
    logits = model(input_ids)[:, :-1]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), input_ids[:, 1:, None], axis=-1)[..., 0]
    nll = nll * loss_mask[:, 1:].astype(nll.dtype)
    return jnp.pad(nll, ((0, 0), (1, 0)))


def mean_loss(model: GPT, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats per target token) over masked tokens; a scalar."""
    total = token_losses(model, input_ids, loss_mask).sum()
    return total / jnp.maximum(loss_mask[:, 1:].sum(), 1).astype(total.dtype)


@nnx.jit
def _summed_token_losses(model: GPT, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    return token_losses(model, input_ids, loss_mask).sum(axis=1)


def sequence_losses(model: GPT, input_ids: np.ndarray, loss_mask: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Summed next-token loss (nats) of each sequence, float64 ``[N]``, for int
    ``[N, T]`` inputs held on the host. The last batch is padded to ``batch_size`` so the
    jitted function compiles once per shape."""
    out = []
    for lo in range(0, len(input_ids), batch_size):
        ids, mask = input_ids[lo:lo + batch_size], loss_mask[lo:lo + batch_size]
        n = len(ids)
        if n < batch_size:
            pad = ((0, batch_size - n), (0, 0))
            ids, mask = np.pad(ids, pad), np.pad(mask, pad)
        out.append(np.asarray(_summed_token_losses(model, jnp.asarray(ids), jnp.asarray(mask)), np.float64)[:n])
    return np.concatenate(out) if out else np.zeros(0)
