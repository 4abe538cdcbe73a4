"""``~rest``: every parameter outside the tracked layers, as one diagonal pseudo-layer.

Norm scales and biases, embeddings, position embeddings, class tokens, bare ``nnx.Param``
s used as ``x @ self.w``, layers whose settings are not a matrix map (a grouped
convolution): their influence is left out of the scores unless they are tracked as
``~rest`` (``fit_factors(rest="diagonal")``). ``~rest`` is a layer like the others to
everything after capture, with ``d_in = 1`` (no bias) and ``d_out = R``, the number of such
parameters: ``a = 1`` at one token, ``g`` the example's gradient with respect to those R
parameters ``[(K,) B, 1, R]``, so its weight gradient ``DW = a gᵀ`` is that gradient. Its
curvature is the diagonal of the Gauss-Newton matrix (the eigenvalue pass without a
rotation, Λ = E_n[DW_n²] ``[1, R]``) whatever the strategy of the tracked layers, and its
scores go through the same per-layer contraction.

Cost: ``g`` is a per-example gradient, one backward pass per example (``jax.vmap`` of
``jax.grad`` over the batch), and ``[B, R]`` floats: cheap for norms and small parameters,
``B × vocabulary × width`` for a language model's embeddings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from influence.capture.kinds import LayerKind
from influence.capture.streams import fresh
from influence.errors import ConfigError

__all__ = ["REST", "RestLayer", "rest_gradients", "rest_layer"]

REST = "~rest"
"""The pseudo-layer's name (no module path starts with ``~``)."""


def _key(path) -> str:
    """A state leaf's dotted path, as ``nnx.to_flat_state`` names it (without the
    Variable's own ``value`` attribute)."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


@dataclasses.dataclass(frozen=True)
class RestLayer(LayerKind):
    """The parameters outside the tracked layers as one ``[1, R]`` map: ``paths`` the dotted
    paths of the parameters (in state order), ``sizes`` their element counts."""

    paths: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()

    kind: ClassVar[str] = "rest"
    module_type: ClassVar[type] = nnx.Param


def rest_layer(state: Any, tracked: set[str]) -> RestLayer | None:
    """The ``~rest`` layer of a model's ``state``: every ``nnx.Param`` that is not the kernel
    or bias of a layer in ``tracked``; ``None`` when there is none."""
    paths, sizes = [], []
    for path, leaf in nnx.to_flat_state(state):
        if not isinstance(leaf, nnx.Param):
            continue
        owner = ".".join(str(p) for p in path[:-1])
        if owner in tracked and str(path[-1]) in ("kernel", "bias"):
            continue
        paths.append(".".join(str(p) for p in path))
        sizes.append(int(math.prod(leaf.get_value().shape)))
    if not paths:
        return None
    total = sum(sizes)
    return RestLayer(REST, 1, total, False, (1, total), None, tuple(paths), tuple(sizes))


def _split(state: Any, layer: RestLayer) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
    """``(theta [R], put)``: the rest parameters of ``state`` as one vector, and
    ``put(theta)``, the state with them replaced (other leaves untouched)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    where = {path: i for i, path in enumerate(layer.paths)}
    index = [where.get(_key(path)) for path, _ in flat]
    found = [i for i in index if i is not None]
    if sorted(found) != list(range(len(layer.paths))):
        raise ConfigError(f"the model state does not hold the parameters of {REST} ({len(found)} of "
                         f"{len(layer.paths)} found)")
    order = sorted((i, pos) for pos, i in enumerate(index) if i is not None)
    theta = jnp.concatenate([flat[pos][1].reshape(-1).astype(jnp.float32) for _, pos in order])
    offsets = [0]
    for size in layer.sizes:
        offsets.append(offsets[-1] + size)

    def put(theta):
        leaves = [leaf for _, leaf in flat]
        for i, pos in order:
            old = leaves[pos]
            leaves[pos] = theta[offsets[i]:offsets[i + 1]].reshape(old.shape).astype(old.dtype)
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return theta, put


def rest_gradients(graphdef: Any, state: Any, layer: RestLayer, objective_of: Callable[..., Callable],
                   batch: dict[str, jax.Array], example_mask: jax.Array, key: jax.Array | None):
    """``(a [B, 1, 1], g [(K,) B, 1, R])`` of ``~rest``: per-example gradients of the
    objective with respect to the rest parameters, ``jax.vmap`` over the examples of
    ``jax.grad`` (``jax.jacrev`` for K objectives) on one-example batches.

    ``objective_of(batch, example_mask, key)`` builds the objective ``model -> scalar or
    [K]`` of a batch (:func:`influence.capture.objectives.layer_gradients`' objective);
    ``key`` is ``[B]`` per-example keys, one key for the batch, or ``None``."""
    theta, put = _split(state, layer)
    per_example_key = key is not None and jnp.ndim(key) == 1

    def one(row, mask, k):
        single = {name: v[None] for name, v in row.items()}
        objective = objective_of(single, mask[None], None if key is None else (k[None] if per_example_key else key))

        def value(theta):
            return objective(nnx.merge(graphdef, fresh(put(theta))))

        shape = jax.eval_shape(value, theta).shape
        return (jax.jacrev if shape else jax.grad)(value)(theta)  # [(K,) R]

    keys = key if per_example_key else jnp.zeros(example_mask.shape[0])
    g = jax.vmap(one)(batch, example_mask, keys)  # [B, (K,) R]
    if g.ndim == 3:
        g = jnp.swapaxes(g, 0, 1)
    a = jnp.ones((example_mask.shape[0], 1, 1), jnp.float32)
    return a, g[..., None, :].astype(jnp.float32)
