"""The decoder of every supported family in flax NNX, switched by an :class:`ArchConfig`.

Contract (what the influence engine and the tests rely on):

* ``model(input_ids [B, T], attention_mask=None [B, T], position_ids=None [B, T])``
  returns logits float32 ``[B, T, V]``. ``attention_mask`` is 1 for real tokens and 0 for
  padding (left or right); keys at padding are never attended to. ``position_ids``
  default to ``0..T-1`` as in ``transformers``; give them for left-padded rows. Outputs at
  padding positions are meaningless. No dropout: calls are deterministic.
* Every projection is an ``nnx.Linear`` with a ``[d_in, d_out]`` kernel, called once per
  forward pass: ``blocks.{i}.attn.q``, ``.k``, ``.v``, ``.o`` and ``blocks.{i}.mlp.up``,
  ``.down`` (and ``.gate`` for gated MLPs), plus ``lm_head`` when the head is not tied to
  the embedding. So ``layers="mlp"`` selects the MLPs, ``"attn"`` the attention
  projections, ``r"blocks\\.3\\.attn\\.(q|k)$"`` two of one block. Fused checkpoints (GPT-2's
  ``c_attn``, GPT-NeoX's per-head interleaved ``query_key_value``) are split into q, k, v
  at load time, which computes the same function.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ACTIVATIONS, ArchConfig


def rope_frequencies(arch: ArchConfig) -> np.ndarray:
    """Inverse frequencies ``[rotary_dim / 2]`` of the rotary embedding (float32), with
    ``linear`` or ``llama3`` scaling applied as ``transformers`` does."""
    dim = arch.rotary_dim
    inv = 1.0 / (arch.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    scaling = None if arch.rope_scaling is None else dict(arch.rope_scaling)
    if scaling is None:
        return inv
    if scaling["rope_type"] == "linear":
        return (inv / np.float32(scaling["factor"])).astype(np.float32)
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array, dim: int) -> jax.Array:
    """Rotary embedding on the first ``dim`` features of each head (``rotate_half``
    convention: the two halves of those features are a pair). x: [B, T, H, hd];
    cos, sin: [B, T, 1, dim]."""
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    turned = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    return jnp.concatenate([rot * cos + turned * sin, rest], axis=-1)


class Attention(nnx.Module):
    """Causal multi-head attention with grouped key/value heads (``n_kv_heads`` of them,
    each shared by ``n_heads / n_kv_heads`` query heads) and optional rotary positions."""

    def __init__(self, arch: ArchConfig, layer: int, *, rngs: nnx.Rngs):
        d, hd = arch.d_model, arch.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = arch.n_heads, arch.n_kv_heads, hd
        self.rotary_dim = arch.rotary_dim
        self.scale = 1.0 / math.sqrt(hd) / ((layer + 1) if arch.attn_scale_by_layer else 1)
        self.q = nnx.Linear(d, arch.n_heads * hd, use_bias=arch.qkv_bias, rngs=rngs)
        self.k = nnx.Linear(d, arch.n_kv_heads * hd, use_bias=arch.qkv_bias, rngs=rngs)
        self.v = nnx.Linear(d, arch.n_kv_heads * hd, use_bias=arch.qkv_bias, rngs=rngs)
        self.o = nnx.Linear(arch.n_heads * hd, d, use_bias=arch.o_bias, rngs=rngs)

    def __call__(self, x: jax.Array, allowed: jax.Array, cos: jax.Array | None, sin: jax.Array | None) -> jax.Array:
        """x: [B, T, d]; allowed: bool [B, 1, T, T] (query, key); cos/sin: [B, T, 1, rotary_dim]."""
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.n_heads, self.head_dim)
        k = self.k(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        v = self.v(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        if self.rotary_dim:
            q, k = _rotate(q, cos, sin, self.rotary_dim), _rotate(k, cos, sin, self.rotary_dim)
        group = self.n_heads // self.n_kv_heads
        if group > 1:  # key/value head j serves query heads j*group .. (j+1)*group - 1
            k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
        # The finite minimum (not -inf) keeps rows with no allowed key (left padding) finite.
        scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, self.n_heads * self.head_dim)
        return self.o(y)


class MLP(nnx.Module):
    """``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))`` (Llama family)."""

    def __init__(self, arch: ArchConfig, *, rngs: nnx.Rngs):
        d, m = arch.d_model, arch.d_mlp
        name, approximate = ACTIVATIONS[arch.activation]
        self.fn = name
        self.approximate = approximate
        if arch.gated_mlp:
            self.gate = nnx.Linear(d, m, use_bias=arch.mlp_bias, rngs=rngs)
        self.up = nnx.Linear(d, m, use_bias=arch.mlp_bias, rngs=rngs)
        self.down = nnx.Linear(m, d, use_bias=arch.mlp_bias, rngs=rngs)
        self.gated = arch.gated_mlp

    def _act(self, x: jax.Array) -> jax.Array:
        if self.fn == "gelu":
            return jax.nn.gelu(x, approximate=self.approximate)
        return jax.nn.silu(x) if self.fn == "silu" else jax.nn.relu(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gated:
            return self.down(self._act(self.gate(x)) * self.up(x))
        return self.down(self._act(self.up(x)))


def _norm(arch: ArchConfig, rngs: nnx.Rngs) -> nnx.Module:
    if arch.norm == "rmsnorm":
        return nnx.RMSNorm(arch.d_model, epsilon=arch.norm_eps, use_fast_variance=False, rngs=rngs)
    return nnx.LayerNorm(arch.d_model, epsilon=arch.norm_eps, use_fast_variance=False, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm block: serial ``h = x + attn(ln1(x)); h + mlp(ln2(h))`` or parallel
    ``x + attn(ln1(x)) + mlp(ln2(x))`` (GPT-NeoX's ``use_parallel_residual``)."""

    def __init__(self, arch: ArchConfig, layer: int, *, rngs: nnx.Rngs):
        self.ln1 = _norm(arch, rngs)
        self.attn = Attention(arch, layer, rngs=rngs)
        self.ln2 = _norm(arch, rngs)
        self.mlp = MLP(arch, rngs=rngs)
        self.parallel = arch.parallel_residual

    def __call__(self, x, allowed, cos, sin):
        if self.parallel:
            return x + self.attn(self.ln1(x), allowed, cos, sin) + self.mlp(self.ln2(x))
        h = x + self.attn(self.ln1(x), allowed, cos, sin)
        return h + self.mlp(self.ln2(h))


class PretrainedLM(nnx.Module):
    """A decoder-only language model of one of the supported families (module docstring).

    Parameters are float32 (bfloat16 checkpoints are widened when loaded). Build one with
    random weights from an :class:`ArchConfig` (``PretrainedLM(arch, rngs=nnx.Rngs(0))``)
    or load one with :func:`influence.pretrained.load_model`.
    """

    def __init__(self, arch: ArchConfig, *, rngs: nnx.Rngs):
        self.arch = arch
        self.embed = nnx.Embed(arch.vocab_size, arch.d_model, rngs=rngs)
        if not arch.rotary_dim:
            self.pos = nnx.Embed(arch.context_length, arch.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(arch, i, rngs=rngs) for i in range(arch.n_layers)])
        self.norm = _norm(arch, rngs)
        if not arch.tied_embeddings:
            self.lm_head = nnx.Linear(arch.d_model, arch.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None) -> jax.Array:
        """input_ids int [B, T]; attention_mask {0,1} [B, T]; position_ids int [B, T] → logits float32 [B, T, V]."""
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
        x = self.embed(input_ids)
        cos = sin = None
        if self.arch.rotary_dim:
            freqs = position_ids.astype(jnp.float32)[..., None] * rope_frequencies(self.arch)  # [B, T, rd/2]
            angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
            cos, sin = jnp.cos(angles), jnp.sin(angles)
        else:
            x = x + self.pos(position_ids)
        q, k = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
        allowed = k <= q
        if self.arch.sliding_window is not None:
            allowed = allowed & (q - k < self.arch.sliding_window)
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & (attention_mask[:, None, None, :] > 0)
        for block in self.blocks:
            x = block(x, allowed, cos, sin)
        x = self.norm(x)
        if self.arch.tied_embeddings:
            return self.embed.attend(x)
        return self.lm_head(x)
