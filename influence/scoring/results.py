"""Result types of the scoring passes, with ``.values``, ``.per_layer``, ``.top_k`` and
atomic, checksummed save/load (:mod:`influence.runtime.io`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from influence.errors import ConfigError, FileFormatError
from influence.runtime import io


class _LayerSplit:
    """``values`` with an optional per-layer split that sums to it, and metadata."""

    _KIND = ""
    _FILE = ""
    _NDIM = 0

    def __init__(self, values: np.ndarray, per_layer: dict[str, np.ndarray] | None, metadata: dict[str, Any]):
        self.values = np.asarray(values)
        self.per_layer = per_layer
        self.metadata = dict(metadata)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={self.values.shape}, strategy={self.metadata.get('strategy')!r}, "
                f"per_layer={self.per_layer is not None})")

    @classmethod
    def _file(cls, path) -> Path:
        path = Path(path)
        return path if path.suffix == ".npz" else path / cls._FILE

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically to ``path/<name>.npz`` (or to ``path`` if it ends in .npz)."""
        arrays = {"values": self.values}
        for name, arr in (self.per_layer or {}).items():
            arrays[f"per_layer/{name}"] = arr
        file = self._file(path)
        io.save_arrays(file, self._KIND, arrays, self.metadata)
        return file

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a file written by :meth:`save` (``FileFormatError`` if it is not one, or if
        its arrays are missing, unexpected or of inconsistent shapes)."""
        file = cls._file(path)
        arrays, metadata = io.load_arrays(file, cls._KIND)
        return cls(*cls._from_arrays(file, arrays, metadata))

    @classmethod
    def _from_arrays(cls, file: Path, arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> tuple:
        """``(values, per_layer or None, metadata)`` of a loaded file, checked."""
        values = arrays.get("values")
        if values is None:
            raise FileFormatError(f"{file}: array 'values' is missing")
        if values.ndim != cls._NDIM:
            raise FileFormatError(f"{file}: array 'values' has shape {values.shape}, expected {cls._NDIM} axes")
        per_layer = {}
        for key, arr in arrays.items():
            if key == "values":
                continue
            if not key.startswith("per_layer/"):
                raise FileFormatError(f"{file}: unexpected array {key!r}")
            if arr.shape != values.shape:
                raise FileFormatError(f"{file}: array {key!r} has shape {arr.shape}, expected {values.shape} "
                                      "(that of 'values')")
            per_layer[key.split("/", 1)[1]] = arr
        return values, per_layer or None, metadata


def check_k(k: int) -> None:
    """``ValueError`` unless ``k`` is a positive integer (how many to keep)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")


class Scores(_LayerSplit):
    """Pairwise influence scores.

    Attributes:
      values: float32 ``[n_query, n_train]``; positive = upweighting the training
        example lowers the query's measurement.
      per_layer: ``None``, or layer name -> ``[n_query, n_train]``; they sum to
        ``values`` (up to float32 rounding).
      metadata: strategy, damping per layer, counts, model fingerprint.
      per_token: ``None``, or float32 ``[n_query, n_train, T]`` (``pairwise_scores(...,
        per_token=True)``): the terms ā_tᵀ P_q g_t of each training position t, summed
        over the tracked layers; they sum over T to ``values`` (up to float32 rounding).
        For a causal LM, position t's term is mostly the influence of predicting token t+1.
    """

    _KIND = "influence-scores"
    _FILE = "scores.npz"
    _NDIM = 2

    def __init__(self, values: np.ndarray, per_layer: dict[str, np.ndarray] | None, metadata: dict[str, Any],
                 per_token: np.ndarray | None = None):
        super().__init__(values, per_layer, metadata)
        self.per_token = None if per_token is None else np.asarray(per_token)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically to ``path/scores.npz`` (or to ``path`` if it ends in .npz),
        with ``per_token`` when present."""
        arrays = {"values": self.values, **{f"per_layer/{n}": a for n, a in (self.per_layer or {}).items()}}
        if self.per_token is not None:
            arrays["per_token"] = self.per_token
        file = self._file(path)
        io.save_arrays(file, self._KIND, arrays, self.metadata)
        return file

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        """Read a file written by :meth:`save` (``FileFormatError`` if it is not one, or if
        its arrays are missing, unexpected or of inconsistent shapes)."""
        file = cls._file(path)
        arrays, metadata = io.load_arrays(file, cls._KIND)
        per_token = arrays.pop("per_token", None)
        values = arrays.get("values")
        if per_token is not None and (values is None or per_token.ndim != 3 or per_token.shape[:2] != values.shape):
            raise FileFormatError(f"{file}: array 'per_token' has shape {per_token.shape}, expected "
                                  f"[n_query, n_train, T] with [n_query, n_train] = "
                                  f"{None if values is None else values.shape}")
        return cls(*cls._from_arrays(file, arrays, metadata), per_token)

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and scores of the ``k`` most positively influential training
        examples per query, each ``[n_query, min(k, n_train)]``, best first."""
        check_k(k)
        k = min(k, self.values.shape[1])
        idx = np.argsort(-self.values, axis=1, kind="stable")[:, :k]
        return idx, np.take_along_axis(self.values, idx, axis=1)


class SelfScores(_LayerSplit):
    """Self-influence ∇L_nᵀ (G + λI)⁻¹ ∇L_n of every training example.

    Attributes:
      values: float32 ``[n_train]`` (≥ 0 up to rounding: the curvature is positive
        definite); large values mark examples the model finds surprising or mislabelled.
      per_layer: ``None``, or layer name -> ``[n_train]``, summing to ``values``.
      metadata: strategy, damping per layer, counts, model fingerprint.
    """

    _KIND = "influence-self-scores"
    _FILE = "self_scores.npz"
    _NDIM = 1

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and values of the ``k`` training examples of highest self-influence,
        each ``[min(k, n_train)]``, highest first."""
        check_k(k)
        idx = np.argsort(-self.values, kind="stable")[: min(k, self.values.shape[0])]
        return idx, self.values[idx]
