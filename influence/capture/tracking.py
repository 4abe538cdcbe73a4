"""Which layers are tracked, and the hooks that let :mod:`.activations` capture them.

How it works: :func:`track` clones the model and gives every tracked layer (each module
of a kind in :mod:`.kinds`: ``nnx.Linear``, ``nnx.Conv``, ``nnx.LinearGeneral``,
``nnx.Einsum``) a subclass whose ``__call__`` reports its input, as tokens ``[B, T, d_in]``
(a convolution's patches), to the active :class:`_Tap` and adds a zero *perturbation*
``[B, T, d_out]`` to its output. The gradient of the objective with respect to that
perturbation is the gradient with respect to the layer's pre-activation output, ``g``
(the zero-perturbation VJP trick, run by :func:`influence.capture.activations.capture`).
Everything runs inside pure functions of ``(params, batch)``, so it jits; the tap is a
trace-time context only, holding tracers that are returned from the function, and the
user's model is never modified.

Whatever is not tracked is said: :attr:`TrackedModel.untracked` lists the modules whose
parameters lie outside the tracked layers, and :func:`warn_untracked` warns once with
:class:`~influence.errors.UntrackedParametersWarning`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import re
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
from flax import nnx

from influence.capture.kinds import LayerInfo, LayerKind, describe_kinds, kind_class
from influence.capture.linen import LinenLayer, intercepting, is_wrapper, linen_layers
from influence.capture.rest import REST, rest_layer
from influence.errors import ConfigTypeError, TrackingError, UntrackedParametersWarning

__all__ = ["LayerFilter", "LayerInfo", "TrackedModel", "Untracked", "model_fingerprint", "track", "trackable_infos",
           "trackable_layers", "warn_untracked"]

LayerFilter = str | Iterable[str] | Callable[[str], bool] | None


# --- the tap ------------------------------------------------------------------------

_ACTIVE = threading.local()


class _Tap:
    """Trace-time recorder: collects layer inputs and applies output perturbations."""

    def __init__(self, perturbations: dict[str, jax.Array] | None):
        self.perturbations = perturbations
        self.inputs: dict[str, jax.Array] = {}
        self.output_shapes: dict[str, jax.ShapeDtypeStruct] = {}

    def record(self, layer: LayerKind, x: jax.Array, y: jax.Array) -> jax.Array:
        """Keep ``layer``'s input tokens; return ``y`` plus its perturbation (in ``y``'s layout)."""
        name = layer.name
        if name in self.inputs:
            raise TrackingError(
                f"layer {name!r} was called more than once in one forward pass; shared "
                "weights are not supported: exclude it with layers=..."
            )
        self.inputs[name] = layer.inputs(x)
        tokens = jax.eval_shape(layer.outputs, jax.ShapeDtypeStruct(y.shape, y.dtype))
        self.output_shapes[name] = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype)
        if self.perturbations is None:
            return y
        return y + layer.from_outputs(self.perturbations[name].astype(y.dtype), y.shape)


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
    """A subclass of the given layer class that reports to the active tap."""
    if cls not in _TRACKED_CLASSES:

        def __call__(self, inputs, *args, **kwargs):
            layer = self.influence_layer
            layer.check_call(args, kwargs)
            out = cls.__call__(self, inputs, *args, **kwargs)
            tap = getattr(_ACTIVE, "tap", None)
            if tap is None:
                return out
            return tap.record(layer, inputs, out)

        _TRACKED_CLASSES[cls] = type(f"Tracked{cls.__name__}", (cls,), {"__call__": __call__})
    return _TRACKED_CLASSES[cls]


_LINEN_ATTRIBUTE = "to_nnx__influence_layers"  # ToNNX passes its other attributes to Linen as variables


def _record(layer: LayerKind, x: jax.Array, y: jax.Array) -> jax.Array:
    tap = getattr(_ACTIVE, "tap", None)
    return y if tap is None else tap.record(layer, x, y)


def _tracked_wrapper_class(cls: type) -> type:
    """A subclass of an ``nnx.bridge.ToNNX`` class whose call intercepts the tracked Linen
    layers inside it (:mod:`.linen`) and reports them to the active tap."""
    if cls not in _TRACKED_CLASSES:

        def __call__(self, *args, **kwargs):
            with intercepting(dict(getattr(self, _LINEN_ATTRIBUTE)), _record):
                return cls.__call__(self, *args, **kwargs)

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


def _named(layers: LayerFilter, name: str) -> bool:
    """Whether a list ``layers=`` names ``name`` (exactly or by a full-match pattern)."""
    if layers is None or callable(layers) or isinstance(layers, str):
        return False
    return any(name == entry or re.fullmatch(entry, name) for entry in layers)


def _unmatched(layers: LayerFilter, names: list[str]) -> list[str]:
    """The entries of a list ``layers=`` that select none of ``names``."""
    if layers is None or callable(layers) or isinstance(layers, str):
        return []
    return [entry for entry in layers
            if not any(name == entry or re.fullmatch(entry, name) for name in names)]


class Untracked(NamedTuple):
    """Parameters outside the tracked layers: ``modules`` maps each module path (a
    parameter's own path for one held by the model itself) to ``(class name, parameter
    count)``; ``n_parameters`` of ``total`` parameters (``nnx.Param`` elements);
    ``skipped``: layers of a trackable class left out of the default selection because
    their settings are not one matrix map (a grouped or masked convolution), with why."""

    modules: dict[str, tuple[str, int]]
    n_parameters: int
    total: int
    skipped: dict[str, str] = {}  # layers of a tracked class whose settings are not a matrix map: why

    @property
    def share(self) -> float:
        return self.n_parameters / self.total if self.total else 0.0

    def as_metadata(self) -> dict[str, Any]:
        """``{"modules": {path: count}, "classes": {path: class}, "parameters", "share"}``,
        and ``"skipped": {path: why}`` when layers were skipped."""
        out = {"modules": {p: n for p, (_, n) in self.modules.items()},
               "classes": {p: c for p, (c, _) in self.modules.items()},
               "parameters": self.n_parameters, "share": self.share}
        if self.skipped:
            out["skipped"] = dict(self.skipped)
        return out


@dataclasses.dataclass(frozen=True)
class TrackedModel:
    """A functional view of a model with hooks on its tracked layers.

    ``graphdef`` is hashable and static under ``jit``; ``state`` holds every variable of
    the model (parameters and any other state) as a pytree of arrays. ``kinds`` (one
    :class:`~influence.capture.kinds.LayerKind` per entry of ``layers``) say how each
    layer is a matrix map; ``untracked`` what is left out.
    """

    graphdef: Any
    state: Any
    layers: tuple[LayerInfo, ...]
    fingerprint: str
    kinds: tuple[LayerKind, ...] = ()
    untracked: Untracked | None = None

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def kind(self, name: str) -> LayerKind:
        return self.kinds[self.layer_names.index(name)]


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


def _trackable(model: nnx.Module) -> list[tuple[str, Any, type[LayerKind]]]:
    """``(path, module, kind)`` of every module of a trackable class, in model order."""
    found = []
    for path, module in nnx.iter_modules(model):
        kind = kind_class(module)
        if kind is not None:
            found.append((_path_name(path), module, kind))
    return found


def _linen(model: nnx.Module) -> list[tuple[Any, LinenLayer]]:
    """``(wrapper, layer)`` of every candidate Linen layer inside an ``nnx.bridge.ToNNX``."""
    return [(module, layer) for path, module in nnx.iter_modules(model) if is_wrapper(module)
            for layer in linen_layers(module, tuple(str(p) for p in path))]


def trackable_layers(model: nnx.Module) -> dict[str, str]:
    """``{path: kind}`` of every layer :func:`track` could track (sorted by path), without
    checking their configuration."""
    found = {name: kind.kind for name, _, kind in _trackable(model)}
    found.update({layer.name: layer.kind for _, layer in _linen(model)})
    return dict(sorted(found.items()))


def trackable_infos(model: nnx.Module) -> dict[str, LayerInfo]:
    """``{path: LayerInfo}`` of every layer :func:`track` would track with ``layers=None``
    (layers whose configuration cannot be tracked are left out), without cloning."""
    infos = {}
    for name, module, kind in sorted(_trackable(model), key=lambda t: t[0]):
        try:
            infos[name] = kind.of(name, module).info
        except TrackingError:
            continue
    infos.update({layer.name: layer.info for _, layer in _linen(model)})
    return dict(sorted(infos.items()))


def _describe(trackable: dict[str, str]) -> str:
    if not trackable:
        return f"it has no trackable layer (the trackable classes are {describe_kinds()})"
    return "its trackable layers are " + ", ".join(f"{name or '<model>'} ({kind})" for name, kind in trackable.items())


def _owner_class(modules: dict[str, Any], path: tuple) -> str:
    """The class of the module holding a parameter: the nearest NNX module on its path
    (a Linen module's parameters are held by their ``nnx.bridge.ToNNX`` wrapper, named
    with the Linen class it wraps)."""
    for end in range(len(path), -1, -1):
        module = modules.get(_path_name(path[:end]))
        if module is not None:
            if is_wrapper(module):
                return f"ToNNX({type(module.to_nnx__module).__name__})"
            return type(module).__name__
    return "Param"


def _untracked(model: nnx.Module, tracked: set[str]) -> Untracked:
    modules = {_path_name(path): module for path, module in nnx.iter_modules(model)}
    counts: dict[str, tuple[str, int]] = {}
    total = 0
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        size = int(math.prod(getattr(leaf.get_value() if hasattr(leaf, "get_value") else leaf, "shape", ())))
        total += size
        owner = _path_name(path[:-1])
        if owner in tracked and str(path[-1]) in ("kernel", "bias"):
            continue
        key = owner if owner else _path_name(path)
        cls = _owner_class(modules, path[:-1]) if owner else "Param"
        previous = counts.get(key, (cls, 0))
        counts[key] = (cls, previous[1] + size)
    return Untracked(dict(sorted(counts.items())), sum(n for _, n in counts.values()), total)


def track(model: nnx.Module, layers: LayerFilter = None, rest: bool = False) -> TrackedModel:
    """Prepare ``model`` for capture, tracking each trackable layer selected by ``layers``.

    The trackable layers are the modules of the kinds in :mod:`influence.capture.kinds`
    (``nnx.Linear``, ``nnx.Conv``, ``nnx.LinearGeneral``, ``nnx.Einsum``, and so the
    projections of ``nnx.MultiHeadAttention``), each seen as a matrix map ``[d_in, d_out]``.

    Args:
      model: any flax NNX module. It is cloned and the clone set to eval mode
        (``nnx.Module.eval``: Dropout deterministic, BatchNorm on running statistics); the
        original, and its mode, are left untouched.
      layers: ``None`` (every trackable layer), a regular expression searched in the
        dotted module path (e.g. ``"mlp"``), a list of exact paths or full-match
        patterns (each must select a layer), or a predicate on the path.

    Raises:
      TrackingError: no layer is tracked, an entry of a list ``layers=`` selects no
        trackable layer, or a layer named in a list ``layers=`` has a configuration that
        is not a matrix map (e.g. a grouped convolution). Selected otherwise (by default,
        by a pattern or a predicate), such a layer is skipped, with its reason in the
        untracked warning and ``Untracked.skipped``.
    """
    if not isinstance(model, nnx.Module):
        raise ConfigTypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    if layers is not None and not callable(layers) and not isinstance(layers, str):
        layers = list(layers)
        if REST in layers:
            rest, layers = True, [entry for entry in layers if entry != REST]
    keep = _make_filter(layers)
    clone = nnx.clone(model)
    # Influence is of the deterministic function the model computes at evaluation: Dropout
    # off, BatchNorm on its running statistics (train mode would also mutate RNG counts and
    # statistics inside jitted code). The user's model keeps its own mode.
    clone.eval()
    found = _trackable(clone)
    linen = _linen(clone)
    trackable = dict(sorted([(name, kind.kind) for name, _, kind in found]
                            + [(layer.name, layer.kind) for _, layer in linen]))
    unmatched = _unmatched(layers, list(trackable))
    if unmatched:
        raise TrackingError(f"layers={unmatched!r} select no trackable layer of the model; {_describe(trackable)}")
    specs, skipped = [], {}
    for name, module, kind in found:
        if not keep(name):
            continue
        try:
            spec = kind.of(name, module)
        except TrackingError as e:
            if _named(layers, name):  # asked for by name: the user learns why it cannot be
                raise
            # not asked for by name (the default selection, a pattern): left out, said in
            # the untracked warning and metadata, instead of stopping the fit
            skipped[name] = re.sub(r"[:;,] (and cannot be tracked: )?exclude it with layers=\.\.\.$", "", str(e))
            continue
        module.__class__ = _tracked_class(type(module))
        module.influence_layer = spec
        specs.append(spec)
    wrappers: dict[int, tuple[Any, list]] = {}
    for wrapper, layer in linen:
        if keep(layer.name):
            wrappers.setdefault(id(wrapper), (wrapper, []))[1].append(layer)
            specs.append(layer)
    for wrapper, chosen in wrappers.values():
        wrapper.__class__ = _tracked_wrapper_class(type(wrapper))
        setattr(wrapper, _LINEN_ATTRIBUTE, tuple((layer.linen_path, layer) for layer in chosen))
    specs.sort(key=lambda spec: spec.name)
    untracked = _untracked(clone, {spec.name for spec in specs})._replace(skipped=skipped)
    rest_spec = rest_layer(nnx.state(clone), {spec.name for spec in specs}) if rest else None
    if rest_spec is not None:
        specs.append(rest_spec)  # "~" sorts after every module path
        untracked = Untracked({}, 0, untracked.total, skipped)
    if not specs:
        why = "".join(f"; skipped {reason}" for reason in skipped.values())
        if layers is None:
            raise TrackingError(f"no layer of the model can be tracked: {_describe(trackable)}{why}")
        raise TrackingError(f"no layer of the model is tracked by layers={layers!r}: {_describe(trackable)}")
    graphdef, state = nnx.split(clone)
    return TrackedModel(graphdef, state, tuple(spec.info for spec in specs), model_fingerprint(model), tuple(specs),
                        untracked)


def warn_untracked(tracked: TrackedModel, stacklevel: int = 2) -> None:
    """Warn once (:class:`~influence.errors.UntrackedParametersWarning`) if parameters of the
    model lie outside the tracked layers: their influence is left out of every score."""
    untracked = tracked.untracked
    if untracked is None or not untracked.n_parameters:
        return
    shown = sorted(untracked.modules.items(), key=lambda item: -item[1][1])
    listed = ", ".join(f"{path} ({cls}, {n})" for path, (cls, n) in shown[:12])
    more = f" and {len(shown) - 12} more" if len(shown) > 12 else ""
    why = "".join(f" Skipped {reason}." for reason in untracked.skipped.values())
    warnings.warn(
        f"{untracked.n_parameters} of {untracked.total} parameters ({untracked.share:.1%}) lie outside the tracked "
        f"layers and are left out of the influence: {listed}{more}.{why} They are listed in "
        "Factors.metadata['untracked']. "
        "If that is intended, silence this with "
        "warnings.simplefilter('ignore', influence.UntrackedParametersWarning).",
        UntrackedParametersWarning, stacklevel=stacklevel + 1)
