"""Fitted curvature factors: the :class:`Factors` container and its persistence.

:func:`influence.fit_factors` (:mod:`influence.fit`) makes them; scoring reads them.
A file is one checksummed ``.npz`` (:mod:`influence.runtime.io`) holding each layer's
``Q_A``, ``Q_S``, ``Λ`` (split into blocks where the layer was) and a JSON header with
what they were fitted on.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from influence.capture.rest import REST
from influence.capture.tracking import LayerInfo, TrackedModel, model_fingerprint, trackable_infos
from influence.curvature import STRATEGIES, LayerCurvature, default_damping, get_strategy
from influence.curvature import blocks as blocks_
from influence.curvature.layer import arrays_of
from influence.errors import ConfigError, ConfigTypeError, FileFormatError, ModelMismatch, NonFiniteError
from influence.runtime import io

_FILE_KIND = "influence-factors"
_FIELDS = LayerCurvature._fields
FACTOR_DTYPES = ("float32", "bfloat16")


def as_factor_dtype(dtype: Any) -> np.dtype:
    """``float32`` or ``bfloat16`` as a numpy dtype (bfloat16 from ml_dtypes, via jax)."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in FACTOR_DTYPES:
        raise ConfigError(f"factor_dtype must be one of {FACTOR_DTYPES}, got {dtype!r}")
    return np.dtype(jnp.bfloat16) if name == "bfloat16" else np.dtype(np.float32)


def curvature_arrays(layers: dict[str, LayerCurvature], prefix: str = "") -> dict[str, np.ndarray]:
    """Flat ``{"<prefix><layer>/<field>[/<block>]": float32 array}`` for a file."""
    arrays = {}
    for name, curv in layers.items():
        for field, x in zip(_FIELDS, curv):
            if x is None:
                continue
            if blocks_.is_blocked(x):
                for i, block in enumerate(x):
                    arrays[f"{prefix}{name}/{field}/{i}"] = np.asarray(block, np.float32)
            else:
                arrays[f"{prefix}{name}/{field}"] = np.asarray(x, np.float32)
    return arrays


def curvature_from_arrays(arrays: dict[str, np.ndarray], names, dtype: np.dtype,
                          prefix: str = "") -> dict[str, LayerCurvature]:
    """Inverse of :func:`curvature_arrays`, in ``dtype``."""
    layers = {}
    for name in names:
        fields = []
        for field in _FIELDS:
            key = f"{prefix}{name}/{field}"
            if key in arrays:
                fields.append(arrays[key].astype(dtype))
            elif f"{key}/0" in arrays:
                count = sum(1 for k in arrays if k.startswith(f"{key}/"))
                fields.append(tuple(arrays[f"{key}/{i}"].astype(dtype) for i in range(count)))
            else:
                fields.append(None)
        layers[name] = LayerCurvature(*fields)
    return layers


def _shape(info: LayerInfo) -> str:
    """A layer as a matrix map, for messages: ``conv [d_in=9 + bias, d_out=4]``."""
    return f"{info.kind} [d_in={info.d_in}{' + bias' if info.has_bias else ''}, d_out={info.d_out}]"


def _variable_name(path) -> str:
    """``l1.kernel`` for the path of a leaf of an ``nnx.State``."""
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return ".".join(keys[:-1] if len(keys) > 1 and keys[-1] == "value" else keys)


def check_finite_weights(state: Any) -> None:
    """``FloatingPointError`` naming the first variable of a model state (``nnx.State``)
    that holds NaN/Inf. One host sync for all variables: run once per pass, before it."""
    leaves = [(path, x) for path, x in jax.tree_util.tree_leaves_with_path(state)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return
    finite = np.asarray(jnp.stack([jnp.all(jnp.isfinite(x)) for _, x in leaves]))
    if finite.all():
        return
    path, x = leaves[int(np.argmin(finite))]
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(np.asarray(x, np.float32))))
    raise NonFiniteError(f"the model's weights hold NaN/Inf: variable {_variable_name(path)!r} "
                             f"{tuple(x.shape)} has {bad} non-finite value(s); load finite weights")


class Factors:
    """Fitted curvature of every tracked layer, plus what it was fitted on.

    Attributes:
      strategy: ``"identity"``, ``"diagonal"``, ``"kfac"`` or ``"ekfac"``.
      layers: layer name -> :class:`~influence.curvature.LayerCurvature` (numpy, in
        ``dtype``; a layer split into blocks has tuples of blocks for ``q_a``/``q_s``).
      metadata: JSON-serialisable facts: layer shapes, ``n_examples``, ``n_tokens``,
        ``fisher``, ``fingerprint`` (model structure), ``untracked`` (the parameters
        outside the tracked layers: ``modules`` path -> count, ``classes`` path ->
        module class, ``parameters``, ``share``), ``blocks`` (split layers), ``dtype``,
        ``mesh``, ``version``, ``created``.
    """

    def __init__(self, strategy: str, layers: dict[str, LayerCurvature], metadata: dict[str, Any]):
        get_strategy(strategy)
        self.strategy = strategy
        self.layers = dict(layers)
        self.metadata = dict(metadata)
        self._check_finite()

    def __repr__(self) -> str:
        return (
            f"Factors(strategy={self.strategy!r}, layers={len(self.layers)}, "
            f"n_examples={self.metadata.get('n_examples')}, fisher={self.metadata.get('fisher')!r})"
        )

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(self.layers)

    @property
    def dtype(self) -> np.dtype:
        """The dtype the factors are kept in (``float32`` or ``bfloat16``)."""
        return as_factor_dtype(self.metadata.get("dtype", "float32"))

    @property
    def layer_infos(self) -> tuple[LayerInfo, ...]:
        return tuple(LayerInfo(**info) for info in self.metadata["layers"])

    def damping(self, name: str, damping: float | None = None) -> float:
        """The damping λ of layer ``name``: ``damping`` if given, else 0.1 × mean(Λ)
        (floored, and refused for an all-zero Λ: see
        :func:`~influence.curvature.default_damping`)."""
        if damping is not None:
            if not np.isfinite(damping) or damping < 0:
                raise ConfigError(f"damping must be a finite non-negative float, got {damping}")
            return float(damping)
        return default_damping(self.layers[name], name=name)

    def _check_finite(self) -> None:
        for name, curv in self.layers.items():
            for field, x in zip(_FIELDS, curv):
                if not all(np.all(np.isfinite(np.asarray(arr, np.float32))) for arr in arrays_of(x)):
                    raise NonFiniteError(
                        f"factors of layer {name!r} hold NaN/Inf in {field}; the loss or the layer's inputs "
                        "were not finite on the fitting data"
                    )

    def check_compatible(self, model: TrackedModel | nnx.Module) -> None:
        """Raise :class:`~influence.errors.ModelMismatch` unless the factors were fitted on a
        model of this structure.

        ``model`` is a :class:`~influence.capture.TrackedModel` (its tracked layers must be
        exactly the factors' layers) or a module (it must have every layer of the factors,
        of the same kind and shape). The message names each differing layer, with what the
        factors hold and what the model has.
        """
        ours = {info.name: info for info in self.layer_infos}
        if isinstance(model, TrackedModel):
            theirs, fingerprint, tracked = {info.name: info for info in model.layers}, model.fingerprint, True
        else:
            theirs, fingerprint, tracked = trackable_infos(model), model_fingerprint(model), False
        problems = []
        for name, info in ours.items():
            if name not in theirs:
                continue
            if info != theirs[name]:
                problems.append(f"layer {name!r}: the factors have {_shape(info)}, "
                                f"the model has {_shape(theirs[name])}")
        missing = [name for name in ours if name not in theirs and (tracked or name != REST)]  # ~rest: no module
        if missing:
            found = ", ".join(f"{n} ({_shape(i)})" for n, i in theirs.items()) or "none"
            problems.append(f"layers in the factors but not in the model: {missing} (the model's trackable layers: "
                            f"{found})")
        extra = [name for name in theirs if name not in ours] if tracked else []
        if extra:
            problems.append(f"layers tracked in the model without factors: {extra}")
        if problems:
            raise ModelMismatch("these factors were fitted on a model of another structure: " + "; ".join(problems))
        if self.metadata.get("fingerprint") != fingerprint:
            raise ModelMismatch(
                f"these factors were fitted on a model of another structure: the tracked layers match, but other "
                f"variables differ (structure fingerprint {self.metadata.get('fingerprint')} in the factors, "
                f"{fingerprint} for the model; e.g. an embedding or a norm of another size): refit the factors on "
                "this model"
            )

    # --- persistence -------------------------------------------------------------

    @staticmethod
    def _file(path: str | os.PathLike) -> Path:
        path = Path(path)
        return path if path.suffix == ".npz" else path / "factors.npz"

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically to ``path/factors.npz`` (or to ``path`` if it ends in .npz).
        Arrays are stored as float32 (bfloat16 factors convert exactly both ways)."""
        arrays = curvature_arrays(self.layers)
        file = self._file(path)
        io.save_arrays(file, _FILE_KIND, arrays, {"strategy": self.strategy, **self.metadata})
        return file

    @classmethod
    def load(cls, path: str | os.PathLike, model: nnx.Module | None = None) -> Factors:
        """Read factors saved by :meth:`save`; with ``model``, also check it matches.

        A file whose header lacks ``strategy`` or ``layers``, or whose arrays are missing,
        unexpected or of the wrong shape for their layer, raises :class:`FileFormatError`
        naming the key (even when its checksum was recomputed to match)."""
        file = cls._file(path)
        arrays, metadata = io.load_arrays(file, _FILE_KIND)
        strategy, infos, dtype = _check_header(file, metadata)
        _check_arrays(file, arrays, strategy, infos, metadata.get("blocks") or {})
        layers = curvature_from_arrays(arrays, [info.name for info in infos], dtype)
        factors = cls(strategy, layers, metadata)
        if model is not None:
            factors.check_compatible(model)
        return factors


def _check_header(file: Path, metadata: dict[str, Any]) -> tuple[str, list[LayerInfo], np.dtype]:
    """The strategy, layers and dtype a factors file declares (popping ``strategy``)."""
    for key in ("strategy", "layers"):
        if key not in metadata:
            raise FileFormatError(f"{file}: the header has no {key!r}; not a complete factors file")
    strategy = metadata.pop("strategy")
    if strategy not in STRATEGIES:
        raise FileFormatError(f"{file}: unknown strategy {strategy!r} in the header; "
                              f"expected one of {tuple(STRATEGIES)}")
    try:
        infos = [LayerInfo(**info) for info in metadata["layers"]]
        if not all(isinstance(getattr(i, f), int) and getattr(i, f) > 0 for i in infos for f in ("d_in", "d_out")):
            raise ConfigTypeError("sizes must be positive integers")
    except TypeError as e:
        raise FileFormatError(f"{file}: the header's 'layers' is not a list of layers (name, d_in, d_out, "
                              f"has_bias): {e}") from e
    try:
        dtype = as_factor_dtype(metadata.get("dtype", "float32"))
    except (TypeError, ValueError) as e:
        raise FileFormatError(f"{file}: the header's 'dtype': {e}") from e
    return strategy, infos, dtype


def _check_arrays(file: Path, arrays: dict[str, np.ndarray], strategy: str, infos: list[LayerInfo],
                  blocks: dict) -> None:
    """Every array the strategy needs is there with its layer's shape, and no other."""
    passes = {p.name for p in get_strategy(strategy).passes}
    rotated = "covariances" in passes
    needed = {"q_a": rotated, "q_s": rotated, "eigenvalues": bool(passes), "a_eigenvalues": rotated,
              "s_eigenvalues": rotated}
    expected: dict[str, tuple[int, ...]] = {}
    for info in infos:
        split = blocks.get(info.name)  # a split layer keeps both rotations as blocks (one block on a side not split)
        for field, side, d in (("q_a", "a", info.d_a), ("q_s", "s", info.d_out)):
            if not needed[field]:
                continue
            if split is None:
                expected[f"{info.name}/{field}"] = (d, d)
                continue
            edges = split.get(side) if isinstance(split, dict) else None
            if (not isinstance(edges, list) or len(edges) < 2 or not all(isinstance(e, int) for e in edges)
                    or edges[0] != 0 or edges[-1] != d or any(hi <= lo for lo, hi in itertools.pairwise(edges))):
                raise FileFormatError(f"{file}: the header's blocks of layer {info.name!r} ({side}: {edges}) do "
                                      f"not split its size {d}")
            for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
                expected[f"{info.name}/{field}/{i}"] = (hi - lo, hi - lo)
        shapes = {"eigenvalues": (info.d_a, info.d_out), "a_eigenvalues": (info.d_a,), "s_eigenvalues": (info.d_out,)}
        for field, shape in shapes.items():
            if needed[field]:
                expected[f"{info.name}/{field}"] = shape
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise FileFormatError(f"{file}: array {missing[0]!r} is missing ({strategy} factors need it)")
    unexpected = sorted(set(arrays) - set(expected))
    if unexpected:
        raise FileFormatError(f"{file}: unexpected array {unexpected[0]!r} (not one of the {strategy} factors of the "
                              "layers in the header)")
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise FileFormatError(f"{file}: array {key!r} has shape {arrays[key].shape}, "
                                  f"expected {shape} for its layer")
