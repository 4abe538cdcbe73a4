"""Which layers are tracked, and the hooks that let :mod:`.activations` capture them.

How it works: :func:`track` clones the model and gives every tracked ``nnx.Linear``
a subclass whose ``__call__`` reports its input to the active :class:`_Tap` and adds a
zero *perturbation* to its output. The gradient of the objective with respect to that
perturbation is the gradient with respect to the layer's pre-activation output, ``g``
(the zero-perturbation VJP trick, run by :func:`influence.capture.activations.capture`).
Everything runs inside pure functions of ``(params, batch)``, so it jits; the tap is a
trace-time context only, holding tracers that are returned from the function, and the
user's model is never modified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
from flax import nnx

from influence.errors import TrackingError


class LayerInfo(NamedTuple):
    """A tracked dense layer. ``d_a = d_in + has_bias`` is the augmented input size."""

    name: str
    d_in: int
    d_out: int
    has_bias: bool

    @property
    def d_a(self) -> int:
        return self.d_in + int(self.has_bias)




LayerFilter = str | Iterable[str] | Callable[[str], bool] | None


# --- the tap ------------------------------------------------------------------------

_ACTIVE = threading.local()


class _Tap:
    """Trace-time recorder: collects layer inputs and applies output perturbations."""

    def __init__(self, perturbations: dict[str, jax.Array] | None):
        self.perturbations = perturbations
        self.inputs: dict[str, jax.Array] = {}
        self.output_shapes: dict[str, jax.ShapeDtypeStruct] = {}

    def record(self, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
        if name in self.inputs:
            raise TrackingError(
                f"layer {name!r} was called more than once in one forward pass; shared "
                "weights are not supported: exclude it with layers=..."
            )
        self.inputs[name] = x
        self.output_shapes[name] = jax.ShapeDtypeStruct(y.shape, y.dtype)
        if self.perturbations is None:
            return y
        return y + self.perturbations[name].astype(y.dtype)


@contextlib.contextmanager
def tapping(perturbations):
    previous = getattr(_ACTIVE, "tap", None)
    tap = _ACTIVE.tap = _Tap(perturbations)
    try:
        yield tap
    finally:
        _ACTIVE.tap = previous


_TRACKED_CLASSES: dict[type, type] = {}


def _tracked_class(cls: type) -> type:
    """A subclass of the given nnx.Linear class that reports to the active tap."""
    if cls not in _TRACKED_CLASSES:

        def __call__(self, inputs, *args, **kwargs):
            out = cls.__call__(self, inputs, *args, **kwargs)
            tap = getattr(_ACTIVE, "tap", None)
            if tap is None:
                return out
            return tap.record(self.influence_layer_name, inputs, out)

        _TRACKED_CLASSES[cls] = type(f"Tracked{cls.__name__}", (cls,), {"__call__": __call__})
    return _TRACKED_CLASSES[cls]


# --- tracking a model ---------------------------------------------------------------


def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _make_filter(layers: LayerFilter) -> Callable[[str], bool]:
    if layers is None:
        return lambda name: True
    if callable(layers):
        return layers
    if isinstance(layers, str):
        pattern = re.compile(layers)
        return lambda name: pattern.search(name) is not None
    names = list(layers)
    patterns = [re.compile(n) for n in names]
    return lambda name: name in names or any(p.fullmatch(name) for p in patterns)


@dataclasses.dataclass(frozen=True)
class TrackedModel:
    """A functional view of a model with hooks on its tracked dense layers.

    ``graphdef`` is hashable and static under ``jit``; ``state`` holds every variable of
    the model (parameters and any other state) as a pytree of arrays.
    """

    graphdef: Any
    state: Any
    layers: tuple[LayerInfo, ...]
    fingerprint: str

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)


def model_fingerprint(model: nnx.Module) -> str:
    """A short hash of the model's structure: every variable's path, type, shape and dtype.

    Two models with the same architecture share it whatever their weights; factors
    fitted on one can be used with the other."""
    _, state = nnx.split(model)
    items = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        shape = tuple(getattr(leaf, "shape", ()))
        dtype = str(getattr(leaf, "dtype", type(leaf).__name__))
        items.append(f"{jax.tree_util.keystr(path)}:{shape}:{dtype}")
    digest = hashlib.sha256(("|".join([type(model).__name__, *sorted(items)])).encode())
    return digest.hexdigest()[:16]


def track(model: nnx.Module, layers: LayerFilter = None) -> TrackedModel:
    """Prepare ``model`` for capture, tracking each ``nnx.Linear`` selected by ``layers``.

    Args:
      model: any flax NNX module. It is cloned; the original is left untouched.
      layers: ``None`` (every ``nnx.Linear``), a regular expression searched in the
        dotted module path (e.g. ``"mlp"``), a list of exact paths or full-match
        patterns, or a predicate on the path.

    Raises:
      ValueError: no layer is tracked, or a tracked kernel is not 2-D.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    keep = _make_filter(layers)
    clone = nnx.clone(model)
    infos = []
    all_linear = []
    for path, module in nnx.iter_modules(clone):
        if not isinstance(module, nnx.Linear):
            continue
        name = _path_name(path)
        all_linear.append(name)
        if not keep(name):
            continue
        kernel = module.kernel[...]
        if kernel.ndim != 2:
            raise TrackingError(f"layer {name!r} has a {kernel.ndim}-D kernel; only 2-D kernels are supported")
        has_bias = getattr(module, "bias", None) is not None
        module.__class__ = _tracked_class(type(module))
        module.influence_layer_name = name
        infos.append(LayerInfo(name, int(kernel.shape[0]), int(kernel.shape[1]), has_bias))
    if not infos:
        found = f"its nnx.Linear layers are {all_linear}" if all_linear else "it has no nnx.Linear layer"
        raise TrackingError(f"no layer of the model is tracked by layers={layers!r}: {found}")
    infos.sort(key=lambda info: info.name)
    graphdef, state = nnx.split(clone)
    return TrackedModel(graphdef, state, tuple(infos), model_fingerprint(model))
