"""Linen models: their ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv`` and ``nn.Einsum`` calls
tracked as the NNX layer kinds of :mod:`.kinds`.

A Linen model enters the library as an NNX module, ``nnx.bridge.ToNNX`` (:func:`linen_model`
wraps a module and its variables; a ToNNX body under an NNX head works the same). Its
parameters are then NNX variables at ``<wrapper path>.<linen path>.kernel``, so a Linen
layer's name is its dotted path, e.g. ``"Dense_0"`` for a wrapper at the root or
``"body.block_0.mlp"`` under an NNX module.

Which layers: Linen creates its submodules only when called, so :func:`linen_layers`
reads them off the parameter tree at tracking time: every Linen module holding a
``kernel`` is a *candidate* (:class:`LinenLayer`), its matrix ``[d_in, d_out]`` from the
shapes: ``d_out`` the bias's size (``prod(features)`` of a DenseGeneral, ``c_out`` of a
Conv), or the kernel's last axis when there is no bias, ``d_in`` the rest. When the
forward pass runs, an ``nn.intercept_methods`` interceptor sees each ``__call__`` of a
candidate, builds the NNX kind of its class from the module's own settings
(:func:`call_kind`: ``nn.Dense`` → ``linear``, ``nn.DenseGeneral`` → ``linear_general``,
``nn.Conv`` → ``conv``, ``nn.Einsum`` → ``einsum``), checks it is the map the candidate
promised (same sizes, kernel flattened row-major), and records it through the same tap as
an NNX layer. A candidate of another class (a custom module with a ``kernel``), a
bias-free DenseGeneral with several output axes, or an einsum whose kernel is not laid
out contracted-axes-first is a :class:`~influence.errors.TrackingError` at its call, with
the fix (``layers=`` without it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, ClassVar

import jax
from flax import linen as nn
from flax import nnx
from flax.core import unfreeze

from influence.capture.kinds import Conv, Einsum, LayerKind, Linear, LinearGeneral
from influence.errors import TrackingError

__all__ = ["LINEN_CLASSES", "LinenLayer", "call_kind", "intercepting", "is_wrapper", "linen_layers", "linen_model"]

#: Linen classes tracked, most specific first, and the NNX kind each is described by.
LINEN_CLASSES: tuple[tuple[type, type[LayerKind]], ...] = (
    (nn.Dense, Linear), (nn.DenseGeneral, LinearGeneral), (nn.Conv, Conv), (nn.Einsum, Einsum))


def is_wrapper(module: Any) -> bool:
    """Whether ``module`` is an ``nnx.bridge.ToNNX`` wrapper of a Linen module."""
    return isinstance(module, nnx.bridge.ToNNX)


def linen_model(module: nn.Module, variables: Any) -> nnx.Module:
    """A Linen ``module`` with its ``variables`` (what ``module.init`` returns: ``{"params":
    ..., "batch_stats": ...}``) as an NNX module (``nnx.bridge.ToNNX``), ready for
    :func:`influence.fit_factors` and scoring; no example input is needed.

    ``model(x)`` is ``module.apply(variables, x)``. Random streams are not attached: a Linen
    model that needs an rng at apply time (Dropout left on) fails with Linen's own error;
    wrap it with ``nnx.bridge.ToNNX(module, rngs=...)`` yourself for that."""
    wrapper = nnx.bridge.ToNNX(module)
    attrs = nnx.bridge.variables.linen_vars_to_nnx_attrs(unfreeze(variables))
    for name, value in attrs.items():
        setattr(wrapper, name, nnx.data(value))
    return wrapper


@dataclasses.dataclass(frozen=True)
class LinenLayer(LayerKind):
    """A Linen layer found in the parameter tree: the matrix map its kernel (and bias)
    shapes imply, the kernel flattened row-major (``kernel.reshape(d_in, d_out)``). The
    kind that says what its tokens are is built at its call (:func:`call_kind`)."""

    linen_path: tuple[str, ...] = ()  # the module's path inside its Linen model

    kind: ClassVar[str] = "linen"
    module_type: ClassVar[type] = nn.Module


def linen_layers(wrapper: nnx.Module, prefix: tuple[str, ...]) -> list[LinenLayer]:
    """The candidate layers of a ToNNX ``wrapper`` at module path ``prefix``: every Linen
    module whose parameters include a ``kernel``, in parameter-tree order."""
    owners: dict[tuple, dict[str, tuple[int, ...]]] = {}
    for path, leaf in nnx.to_flat_state(nnx.state(wrapper, nnx.Param)):
        value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
        owners.setdefault(tuple(str(p) for p in path[:-1]), {})[str(path[-1])] = tuple(int(s) for s in value.shape)
    found = []
    for owner, leaves in owners.items():
        kernel = leaves.get("kernel")
        if kernel is None or len(kernel) < 2:
            continue
        bias = leaves.get("bias")
        d_out = math.prod(bias) if bias is not None else kernel[-1]
        if math.prod(kernel) % d_out:
            continue
        name = ".".join(prefix + owner)
        found.append(LinenLayer(name, math.prod(kernel) // d_out, d_out, bias is not None, kernel, bias, owner))
    return found


def _settings(module: nn.Module, layer: LinenLayer, kind: type[LayerKind]) -> SimpleNamespace:
    """What the NNX kind's ``of`` reads, from a Linen module's attributes (its variables
    are the candidate's shapes)."""
    kernel = jax.ShapeDtypeStruct(layer.kernel_shape, jax.numpy.float32)
    bias = None if layer.bias_shape is None else jax.ShapeDtypeStruct(layer.bias_shape, jax.numpy.float32)
    if kind is LinearGeneral:
        if module.batch_dims:
            raise TrackingError(f"layer {layer.name!r} is an nn.DenseGeneral with batch_dims={module.batch_dims}: one "
                                "kernel per batch index is not one matrix map: exclude it with layers=...")
        axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
        features = (module.features,) if isinstance(module.features, int) else tuple(module.features)
        return SimpleNamespace(kernel=kernel, bias=bias, batch_axis={}, axis=axis, out_features=features,
                               in_features=layer.kernel_shape[:len(axis)])
    if kind is Conv:
        return SimpleNamespace(kernel=kernel, bias=bias, feature_group_count=module.feature_group_count,
                               mask=module.mask, kernel_size=module.kernel_size, strides=module.strides,
                               padding=module.padding, input_dilation=module.input_dilation,
                               kernel_dilation=module.kernel_dilation)
    if kind is Einsum:
        return SimpleNamespace(kernel=kernel, bias=bias, einsum_str=module.einsum_str)
    return SimpleNamespace(kernel=kernel, bias=bias)


def call_kind(layer: LinenLayer, module: nn.Module) -> LayerKind:
    """The NNX kind describing the Linen ``module`` called as candidate ``layer``.

    Raises:
      TrackingError: the module's class is not tracked, or its map is not the candidate's
        (another split of the kernel into ``[d_in, d_out]``)."""
    kind = next((kind for cls, kind in LINEN_CLASSES if isinstance(module, cls)), None)
    if kind is None:
        raise TrackingError(
            f"layer {layer.name!r} is a Linen {type(module).__name__} with a kernel, not one of the tracked Linen "
            f"classes ({', '.join('nn.' + c.__name__ for c, _ in LINEN_CLASSES)}): exclude it with layers=...")
    spec = kind.of(layer.name, _settings(module, layer, kind))
    plain = not isinstance(spec, Einsum) or spec._kernel_order() == tuple(range(len(spec.rhs)))
    if (spec.d_in, spec.d_out, spec.has_bias) != (layer.d_in, layer.d_out, layer.has_bias) or not plain:
        raise TrackingError(
            f"layer {layer.name!r} ({type(module).__name__}, kernel {layer.kernel_shape}) is the matrix map "
            f"[{spec.d_in}, {spec.d_out}], not the [{layer.d_in}, {layer.d_out}] its parameter shapes suggest (a "
            "bias-free layer with several output axes, or an einsum kernel not laid out contracted axes first): "
            "exclude it with layers=...")
    return spec


def intercepting(layers: dict[tuple[str, ...], LinenLayer], record: Callable[[LayerKind, Any, Any], Any]):
    """An ``nn.intercept_methods`` context in which each ``__call__`` of a module in
    ``layers`` (keyed by Linen path) returns ``record(kind, input, output)``."""

    def interceptor(call, args, kwargs, context):
        layer = layers.get(tuple(context.module.path)) if context.method_name == "__call__" else None
        if layer is None:
            return call(*args, **kwargs)
        kind = call_kind(layer, context.module)
        inputs = args[0] if args else kwargs["inputs"]
        return record(kind, inputs, call(*args, **kwargs))

    return nn.intercept_methods(interceptor)
