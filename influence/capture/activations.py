"""The pure capture of tracked layers' inputs ``a`` and output gradients ``g``.

Runs an objective inside a pure function of the model state under the tap of
:mod:`influence.capture.tracking`: each tracked layer reports its input and adds a zero
perturbation to its output, and one VJP with respect to those perturbations gives ``g``,
the gradient with respect to the layer's pre-activation output (per example and token,
from one batched backward pass of the summed objective: examples are independent).

Shapes: ``a`` is ``[B, T, d_a]`` (a trailing 1 appended when the layer has a bias, so the
bias is the last row of the augmented weight ``[d_a, d_out]``); ``g`` is ``[B, T, d_out]``
(``[K, B, T, d_out]`` for K objectives). The layer's kind (:mod:`.kinds`) says what its
tokens are: for a dense layer, inputs of rank 2 ``[B, d]`` get ``T = 1`` and higher ranks
are flattened into ``T``; for a convolution they are its output positions, ``a`` the
input patches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from influence.capture.streams import fresh
from influence.capture.tracking import LayerInfo, tapping
from influence.errors import TrackingError


def _augment(x: jax.Array, has_bias: bool) -> jax.Array:
    if not has_bias:
        return x
    return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def _as_tokens(x: jax.Array, batch: int, name: str) -> jax.Array:
    """``[B, ..., d] -> [B, T, d]`` (``T = 1`` for rank-2 inputs)."""
    if x.ndim < 2 or x.shape[0] != batch:
        raise TrackingError(
            f"layer {name!r} received input of shape {x.shape}; its leading axis must be the batch axis (size {batch})"
        )
    return x.reshape(batch, -1, x.shape[-1])


def capture(
    graphdef: Any,
    state: Any,
    layers: tuple[LayerInfo, ...],
    objective: Callable[[nnx.Module], jax.Array],
    batch_size: int,
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """Run ``objective(model)`` and return ``(value, a, g)`` for every tracked layer.

    Pure and jittable (``graphdef`` and ``layers`` static). ``objective`` returns either
    a scalar, or a vector ``[K]`` of K objectives (then ``g[name]`` has a leading axis
    ``K``: one backward pass per objective, sharing the forward pass). ``a[name]`` is
    ``[B, T, d_a]`` float32 with the bias column appended; ``g[name]`` is
    ``[(K,) B, T, d_out]`` float32.
    """
    names = tuple(info.name for info in layers)

    def run(perturbations):
        # fresh Variables in this trace: a forward pass that draws from nnx.Rngs advances
        # their counts here, and the advance is discarded (the streams are held fixed)
        model = nnx.merge(graphdef, fresh(state))
        with tapping(perturbations) as tap:
            value = objective(model)
        missing = set(names) - set(tap.inputs)
        if missing:
            raise TrackingError(f"tracked layers {sorted(missing)} were not called by the task's forward pass")
        return value, {n: tap.inputs[n] for n in names}, {n: tap.output_shapes[n] for n in names}

    # Trace once without perturbations to learn the output shapes (no FLOPs are spent).
    _, _, shapes = jax.eval_shape(lambda: run(None))
    zeros = {name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}

    def forward(perturbations):
        value, inputs, _ = run(perturbations)
        return value, inputs

    value, vjp_fn, inputs = jax.vjp(forward, zeros, has_aux=True)
    if value.ndim == 0:
        (grads,) = vjp_fn(jnp.ones_like(value))
    else:
        (grads,) = jax.vmap(vjp_fn)(jnp.eye(value.shape[0], dtype=value.dtype))
    a, g = {}, {}
    for info in layers:
        x = _as_tokens(inputs[info.name], batch_size, info.name)
        a[info.name] = _augment(x.astype(jnp.float32), info.has_bias)
        lead = grads[info.name].shape[:1] if value.ndim else ()
        g[info.name] = grads[info.name].reshape(lead + (batch_size, -1, info.d_out)).astype(jnp.float32)
    return value, a, g
