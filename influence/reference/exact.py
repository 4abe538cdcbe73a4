"""Exact influence for small models: the reference the approximations are tested against.

Builds, for the tracked layers' parameters θ only (kernels and biases), the exact
damped Gauss-Newton matrix

    G = (1/N) Σ_n J_nᵀ H_n J_n,   J_n = ∂f_n/∂θ (jax.jacfwd),  H_n = ∂²ℓ_n/∂f_n²

from the model outputs f_n and the Hessian of the loss with respect to them (jax.hessian,
independent of the Fisher directions the library uses), and exact per-example
gradients with ``jax.grad``. Memory is O(P²) for P tracked parameters: use it on models
with at most a few thousand tracked parameters.

Parameter layout: layers in :attr:`TrackedModel.layers` order, each as its augmented
weight ``[d_a, d_out]`` (kernel rows, then the bias row) flattened row-major — the
layout of the per-example gradient DW in the factored code. A kernel of another shape
(a convolution's ``[*k, c_in, c_out]``, a LinearGeneral's or an Einsum's) enters as its
layer kind's matrix ``[d_in, d_out]`` (:meth:`influence.capture.kinds.LayerKind.matrix`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from influence.capture.tracking import LayerFilter, TrackedModel, track
from influence.errors import ConfigTypeError
from influence.runtime.data import as_source
from influence.tasks import LossFamily


def _dict_path(path) -> str:
    return ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _param(layer: str, leaf: str) -> str:
    return f"{layer}.{leaf}" if layer else leaf  # a model that is itself a Linear has path ""


def layer_weights(tracked: TrackedModel) -> dict[str, jax.Array]:
    """Augmented weights ``{name: [d_a, d_out]}`` of the tracked layers."""
    leaves = {_dict_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(tracked.state)}
    out = {}
    for info, kind in zip(tracked.layers, tracked.kinds):
        w = kind.matrix(leaves[_param(info.name, "kernel")])
        if info.has_bias:
            w = jnp.concatenate([w, kind.bias_row(leaves[_param(info.name, "bias")])[None]], axis=0)
        out[info.name] = w
    return out


def flatten(tracked: TrackedModel, blocks: dict[str, jax.Array]) -> jax.Array:
    """``{name: [..., d_a, d_out]} -> [..., P]`` in the layout above."""
    return jnp.concatenate([blocks[i.name].reshape(blocks[i.name].shape[:-2] + (-1,)) for i in tracked.layers], axis=-1)


def unflatten(tracked: TrackedModel, theta: jax.Array) -> dict[str, jax.Array]:
    """Inverse of :func:`flatten` for a vector ``[P]``."""
    out, start = {}, 0
    for info in tracked.layers:
        size = info.d_a * info.d_out
        out[info.name] = theta[start : start + size].reshape(info.d_a, info.d_out)
        start += size
    return out


def model_at(tracked: TrackedModel, theta: jax.Array, state=None) -> nnx.Module:
    """The model with its tracked layers' weights set from the flat vector ``theta``
    (other variables from ``state``, default the tracked model's own). Inside ``jit``,
    pass ``state`` as an argument: closed-over weights become constants XLA folds slowly."""
    blocks = unflatten(tracked, theta)
    replace = {}
    for info, kind in zip(tracked.layers, tracked.kinds):
        w = blocks[info.name]
        replace[_param(info.name, "kernel")] = kind.kernel(w[: info.d_in])
        if info.has_bias:
            replace[_param(info.name, "bias")] = kind.bias(w[info.d_in])
    state = tracked.state if state is None else state
    state = jax.tree_util.tree_map_with_path(lambda p, x: replace.get(_dict_path(p), x), state)
    return nnx.merge(tracked.graphdef, state)


def _examples(data, task) -> list[dict[str, np.ndarray]]:
    source = as_source(data, 1, task)
    return [{k: v[0] for k, v in batch.arrays.items()} for batch in source]


def _stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def per_example_gradient_batches(model, task, data, *, layers: LayerFilter = None, measurement: bool = False,
                                 batch_size: int = 32):
    """Exact gradients of each example's loss (or measurement) by ``jax.grad``, float64
    ``[B, P]`` one batch at a time, so the ``[N, P]`` matrix is never held.

    The tracked weights and the model state are arguments of the jitted function, not
    constants closed over: XLA would otherwise spend minutes folding them for a model with
    a large vocabulary.
    """
    tracked = track(model, layers)
    theta = flatten(tracked, layer_weights(tracked))
    fn = task.measurement if measurement else task.loss

    @jax.jit
    def grads(state, theta, batch):
        def one(example):
            single = {k: v[None] for k, v in example.items()}
            return jax.grad(lambda th: fn(model_at(tracked, th, state), single)[0])(theta)

        return jax.vmap(one)(batch)

    for b in as_source(data, batch_size, task):
        yield np.asarray(grads(tracked.state, theta, b.arrays), np.float64)[: b.n_valid]


def per_example_gradients(model, task, data, *, layers: LayerFilter = None, measurement: bool = False,
                          batch_size: int = 32) -> np.ndarray:
    """Exact gradients ``[N, P]`` of each example's loss (or measurement) by ``jax.grad``."""
    return np.concatenate(list(per_example_gradient_batches(model, task, data, layers=layers,
                                                            measurement=measurement, batch_size=batch_size)))


def require_output_task(task: Any, what: str) -> None:
    """Raise ``TypeError`` unless ``task`` exposes its likelihood over model outputs:
    ``outputs``, ``targets``, ``output_mask`` and a ``family`` (:class:`LossFamily`), as
    every :class:`influence.tasks.OutputTask` does. ``what`` names the caller."""
    missing = [name for name in ("outputs", "targets", "output_mask") if not callable(getattr(task, name, None))]
    if not isinstance(getattr(task, "family", None), LossFamily):
        missing.append("family (a LossFamily)")
    if missing:
        raise ConfigTypeError(f"{what} differentiates the task's loss in the model outputs; {type(task).__name__} "
                              f"lacks {', '.join(missing)}: subclass influence.tasks.OutputTask")


def gauss_newton(model, task, data, *, layers: LayerFilter = None) -> np.ndarray:
    """Exact Gauss-Newton matrix ``[P, P]`` (mean over examples) of a likelihood task.

    Needs an :class:`influence.tasks.OutputTask` (``outputs``, ``targets``,
    ``output_mask``, ``family``): H_n is the Hessian of ``task.family.loss`` in the outputs.
    """
    require_output_task(task, "the exact Gauss-Newton matrix")
    tracked = track(model, layers)
    theta = flatten(tracked, layer_weights(tracked))

    def gn_one(state, theta, example):
        batch = {k: v[None] for k, v in example.items()}

        def outputs(th):
            return task.outputs(model_at(tracked, th, state), batch)

        f = outputs(theta)
        jac = jax.jacfwd(outputs)(theta).reshape(f.size, -1)  # [T*K, P]
        mask = task.output_mask(batch, f)

        def loss_of_outputs(out):
            return task.family.loss(out, task.targets(batch), mask)[0]

        hess = jax.hessian(loss_of_outputs)(f).reshape(f.size, f.size)
        return jac.T @ hess @ jac

    examples = _examples(data, task)
    gn_batch = jax.jit(jax.vmap(gn_one, in_axes=(None, None, 0)))
    total = np.zeros((theta.size, theta.size), np.float64)
    for lo in range(0, len(examples), 16):
        total += np.asarray(gn_batch(tracked.state, theta, _stack(examples[lo : lo + 16])), np.float64).sum(axis=0)
    return total / len(examples)


def layer_slices(tracked: TrackedModel) -> dict[str, slice]:
    out, start = {}, 0
    for info in tracked.layers:
        out[info.name] = slice(start, start + info.d_a * info.d_out)
        start += info.d_a * info.d_out
    return out


def exact_scores(
    model: nnx.Module,
    task: Any,
    queries: Any,
    train: Any,
    *,
    damping: float,
    layers: LayerFilter = None,
    fit_data: Any = None,
    block_diagonal: bool = False,
) -> np.ndarray:
    """Exact influence ``[n_query, n_train]`` = ∇m_qᵀ (G + λI)⁻¹ ∇L_n in float64.

    ``G`` is the Gauss-Newton matrix on ``fit_data`` (default ``train``); with
    ``block_diagonal=True`` cross-layer blocks are zeroed (what every per-layer
    approximation assumes), isolating the within-layer approximation error.
    """
    gn = gauss_newton(model, task, train if fit_data is None else fit_data, layers=layers)
    if block_diagonal:
        mask = np.zeros_like(gn, dtype=bool)
        for sl in layer_slices(track(model, layers)).values():
            mask[sl, sl] = True
        gn = np.where(mask, gn, 0.0)
    q = per_example_gradients(model, task, queries, layers=layers, measurement=True)
    g = per_example_gradients(model, task, train, layers=layers)
    solved = np.linalg.solve(gn + damping * np.eye(gn.shape[0]), g.T)  # [P, N]
    return q @ solved
