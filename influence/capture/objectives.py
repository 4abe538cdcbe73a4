"""What is differentiated in each pass, as pure functions of ``(state, batch)``.

``kind`` selects the objective whose layer gradients are captured:

* ``"sampled"``: training loss with targets sampled from the model (true Fisher);
* ``"empirical"``: training loss with the data's labels (empirical Fisher, and the
  training gradients that are scored);
* ``"exact"``: the task's Fisher directions (exact Fisher, several backward passes);
* ``"measurement"``: the task's query measurement.

Padding rows are given weight 0, so they contribute nothing to any sum.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from influence.capture.activations import capture
from influence.capture.tracking import LayerInfo
from influence.errors import TrackingError

KINDS = ("sampled", "empirical", "exact", "measurement")


def _objective(task, kind: str, batch, example_mask, key):
    if kind == "sampled":
        return lambda model: jnp.sum(task.loss(model, batch, sample_key=key) * example_mask)
    if kind == "empirical":
        return lambda model: jnp.sum(task.loss(model, batch) * example_mask)
    if kind == "measurement":
        return lambda model: jnp.sum(task.measurement(model, batch) * example_mask)
    if kind == "exact":
        return lambda model: task.fisher_directions(model, batch) @ example_mask
    raise ValueError(f"unknown gradient kind {kind!r}; expected one of {KINDS}")


def layer_gradients(
    graphdef: Any,
    state: Any,
    layers: tuple[LayerInfo, ...],
    task: Any,
    kind: str,
    batch: dict[str, jax.Array],
    example_mask: jax.Array,
    key: jax.Array | None = None,
):
    """Captured ``(objective value, a, g)`` for one padded batch (see :func:`capture`)."""
    batch_size = example_mask.shape[0]
    objective = _objective(task, kind, batch, example_mask, key)

    def checked(model):
        try:
            return objective(model)
        except (TypeError, ValueError) as e:
            if isinstance(e, TrackingError):
                raise
            shapes = {k: tuple(v.shape) for k, v in batch.items()}
            raise ValueError(f"the task's forward pass failed on a batch with fields {shapes}: {e}") from e

    return capture(graphdef, state, layers, checked, batch_size)


def token_weights(task: Any, batch, example_mask: jax.Array, a: jax.Array) -> jax.Array:
    """Weights ``[B, T]`` of the token positions of a layer input ``a [B, T, d_a]``.

    Padding examples weigh 0. The task's token mask applies when its shape matches the
    layer's token axis; a layer that sees a different token axis (e.g. a classifier head
    after pooling) counts all of its positions.
    """
    weights = jnp.broadcast_to(example_mask[:, None], a.shape[:2])
    mask = task.token_mask(batch)
    if mask is not None and mask.shape == a.shape[:2]:
        weights = weights * mask.astype(weights.dtype)
    return weights
