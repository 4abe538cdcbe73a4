"""Fitted curvature factors: the :class:`Factors` container and its persistence.

:func:`influence.fit_factors` (:mod:`influence.fit`) makes them; scoring reads them.
A file is one checksummed ``.npz`` (:mod:`influence.runtime.io`) holding each layer's
``Q_A``, ``Q_S``, ``Λ`` (split into blocks where the layer was) and a JSON header with
what they were fitted on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from influence.capture.tracking import LayerInfo, TrackedModel, model_fingerprint, trackable_infos
from influence.curvature import LayerCurvature, default_damping, get_strategy
from influence.curvature import blocks as blocks_
from influence.curvature.layer import arrays_of
from influence.errors import ModelMismatch
from influence.runtime import io

FISHER_KINDS = ("sampled", "empirical", "exact")
_FILE_KIND = "influence-factors"
_FIELDS = LayerCurvature._fields
FACTOR_DTYPES = ("float32", "bfloat16")


def as_factor_dtype(dtype: Any) -> np.dtype:
    """``float32`` or ``bfloat16`` as a numpy dtype (bfloat16 from ml_dtypes, via jax)."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in FACTOR_DTYPES:
        raise ValueError(f"factor_dtype must be one of {FACTOR_DTYPES}, got {dtype!r}")
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


def curvature_from_arrays(arrays: dict[str, np.ndarray], names, dtype: np.dtype, prefix: str = "") -> dict[str, LayerCurvature]:
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
        """The damping λ of layer ``name``: ``damping`` if given, else 0.1 × mean(Λ)."""
        if damping is not None:
            if not np.isfinite(damping) or damping < 0:
                raise ValueError(f"damping must be a finite non-negative float, got {damping}")
            return float(damping)
        return default_damping(self.layers[name])

    def _check_finite(self) -> None:
        for name, curv in self.layers.items():
            for field, x in zip(_FIELDS, curv):
                if not all(np.all(np.isfinite(np.asarray(arr, np.float32))) for arr in arrays_of(x)):
                    raise FloatingPointError(
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
                problems.append(f"layer {name!r}: the factors have {_shape(info)}, the model has {_shape(theirs[name])}")
        missing = [name for name in ours if name not in theirs]
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
        """Read factors saved by :meth:`save`; with ``model``, also check it matches."""
        arrays, metadata = io.load_arrays(cls._file(path), _FILE_KIND)
        strategy = metadata.pop("strategy")
        names = [info["name"] for info in metadata["layers"]]
        layers = curvature_from_arrays(arrays, names, as_factor_dtype(metadata.get("dtype", "float32")))
        factors = cls(strategy, layers, metadata)
        if model is not None:
            factors.check_compatible(model)
        return factors
