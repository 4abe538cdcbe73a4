"""Small classifiers built of each trackable layer kind, small enough for exact matrices.

Every bias is drawn at random (flax initialises them to zero, which would hide a bias row
in the wrong order), and each model's data is 12 examples with labels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from influence.testing import digits


def randomize_biases(model: nnx.Module, seed: int) -> nnx.Module:
    rng = np.random.default_rng(seed)
    for _, module in nnx.iter_modules(model):
        bias = getattr(module, "bias", None)
        if isinstance(bias, nnx.Param):
            bias[...] = jnp.asarray(0.5 * rng.normal(size=bias.shape), bias.dtype)
    return model


class Conv2D(nnx.Module):
    """Two 2-D convolutions (stride 2 with SAME padding; VALID with kernel dilation 2), a head."""

    def __init__(self, *, c1=3, rngs):
        self.conv1 = nnx.Conv(1, c1, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(c1, 4, (2, 2), padding="VALID", kernel_dilation=2, rngs=rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):  # x [B, 8, 8, 1]
        h = jax.nn.relu(self.conv1(x))  # [B, 4, 4, c1]
        h = jnp.tanh(self.conv2(h))  # [B, 2, 2, 4]
        return self.head(h.reshape(h.shape[0], -1))


class Conv1D(nnx.Module):
    """1-D convolutions: stride 2 VALID, then input dilation 2 with explicit padding (1, 0)."""

    def __init__(self, *, rngs):
        self.conv1 = nnx.Conv(2, 3, 3, strides=2, padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(3, 4, 2, padding=((1, 0),), input_dilation=2, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):  # x [B, 12, 2]
        h = jnp.tanh(self.conv1(x))  # [B, 5, 3]
        h = jnp.tanh(self.conv2(h))  # [B, 9, 4]
        return self.head(h.mean(axis=1))


class General(nnx.Module):
    """``nnx.LinearGeneral`` with multi-axis outputs, then multi-axis and non-trailing inputs."""

    def __init__(self, *, rngs):
        self.up = nnx.LinearGeneral(5, (2, 3), rngs=rngs)
        self.down = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=rngs)
        self.head = nnx.LinearGeneral((4, 4), 3, axis=(1, 2), rngs=rngs)

    def __call__(self, x):  # x [B, 4, 5]
        h = jnp.tanh(self.up(x))  # [B, 4, 2, 3]
        h = jnp.tanh(self.down(h))  # [B, 4, 4]
        return self.head(h)


class Einsums(nnx.Module):
    """Gemma-style ``nnx.Einsum`` projections, one with its output axes permuted."""

    def __init__(self, *, rngs):
        self.qkv = nnx.Einsum("BTD,DNH->BTHN", (5, 2, 3), (3, 2), rngs=rngs)  # columns in output order H, N
        self.out = nnx.Einsum("BTHN,HND->BDT", (3, 2, 4), (4,), rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):  # x [B, 4, 5]
        h = jnp.tanh(self.qkv(x))  # [B, 4, 3, 2]
        h = jnp.tanh(self.out(h))  # [B, 4 (D), 4 (T)]
        return self.head(h.mean(axis=-1))


class Attention(nnx.Module):
    """flax's own ``nnx.MultiHeadAttention`` between a projection and a LayerNorm'd head."""

    def __init__(self, *, rngs):
        self.proj = nnx.Linear(5, 8, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):  # x [B, 4, 5]
        h = jnp.tanh(self.proj(x))
        h = h + self.attn(h)
        return self.head(self.norm(h.mean(axis=1)))


MODELS = {"conv2d": Conv2D, "conv1d": Conv1D, "linear_general": General, "einsum": Einsums, "attention": Attention}


def kind_case(name: str, n: int = 12, seed: int = 0):
    """``(model, data, queries)`` for the model ``name``: ``data`` n examples, ``queries`` 3."""
    model = randomize_biases(MODELS[name](rngs=nnx.Rngs(seed)), seed + 1)
    rng = np.random.default_rng(seed + 2)
    if name == "conv2d":
        x, y = digits()
        x = x[: n + 3].reshape(-1, 8, 8, 1)
        y = y[: n + 3].astype(np.int32)
    else:
        shape = {"conv1d": (12, 2)}.get(name, (4, 5))
        x = rng.normal(size=(n + 3, *shape)).astype(np.float32)
        y = rng.integers(0, 3, size=n + 3).astype(np.int32)
    return model, {"x": x[:n], "y": y[:n]}, {"x": x[n:], "y": y[n:]}
