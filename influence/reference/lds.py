"""Linear datamodeling score (LDS; Park et al. 2023, "TRAK"), as kronfluence and dattri use it.

Sample ``M`` subsets ``S_j`` of the training set, each of a fraction ``α`` of it; retrain
the model on each (with a few seeds, averaged) and record every query's measurement
``m_q(θ_{S_j})``. An attribution method predicts the measurement of a subset as the sum
of its members' attributions. The LDS of a query is the Spearman correlation, over the
``M`` subsets, between predicted and retrained measurements; the reported LDS is its
mean over queries.

Sign: an influence score > 0 means that upweighting the example *lowers* the query's
measurement, so the prediction is ``−Σ_{n∈S} score(q, n)`` (up to a constant, which a
rank correlation ignores).

Retraining is the expensive part, so :class:`MeasurementCache` keeps retrained
measurements on disk, one entry per (subset, seed), keyed by a hash of the settings that
determine them; asking for more subsets or seeds later computes only the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy.stats import spearmanr

from influence.errors import ConfigError
from influence.runtime import io

_FILE_KIND = "influence-lds-measurements"


def sample_subsets(n_train: int, n_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Boolean masks ``[n_subsets, n_train]``, each with ``round(fraction · n_train)`` members.

    Subset ``j`` is drawn from its own generator ``(seed, j)``, so the first ``M`` subsets
    are the same whatever ``n_subsets`` is (cached retraining stays valid when M grows).
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction must be in (0, 1), got {fraction}")
    size = int(round(fraction * n_train))
    if not 0 < size < n_train:
        raise ConfigError(f"a fraction {fraction} of {n_train} examples leaves an empty or full subset")
    masks = np.zeros((n_subsets, n_train), bool)
    for j in range(n_subsets):
        masks[j, np.random.default_rng([seed, j]).choice(n_train, size, replace=False)] = True
    return masks


def predicted_measurements(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Datamodel predictions ``[M, Q]`` = −Σ_{n ∈ S_j} score(q, n).

    scores ``[Q, N]`` (positive = upweighting lowers the measurement), masks ``[M, N]``.
    """
    return -(masks.astype(np.float64) @ np.asarray(scores, np.float64).T)


class LDSResult(NamedTuple):
    """``mean``: LDS averaged over queries; ``per_query [Q]`` (NaN where a query's
    retrained measurement is constant over subsets); ``stderr`` over queries."""

    mean: float
    per_query: np.ndarray
    stderr: float


def lds(scores: np.ndarray, masks: np.ndarray, measurements: np.ndarray) -> LDSResult:
    """LDS of ``scores [Q, N]`` against retrained ``measurements [M, Q]`` on subsets ``masks [M, N]``.

    ``measurements`` are the retrained measurements averaged over seeds.
    """
    scores, measurements = np.asarray(scores), np.asarray(measurements)
    if scores.shape[1] != masks.shape[1] or measurements.shape != (masks.shape[0], scores.shape[0]):
        raise ConfigError(f"shapes do not agree: scores {scores.shape}, masks {masks.shape}, "
                         f"measurements {measurements.shape} (expected [M, Q])")
    predicted = predicted_measurements(scores, masks)
    per_query = np.full(scores.shape[0], np.nan)
    for q in range(scores.shape[0]):
        if np.ptp(measurements[:, q]) > 0 and np.ptp(predicted[:, q]) > 0:
            per_query[q] = spearmanr(predicted[:, q], measurements[:, q])[0]
    valid = per_query[np.isfinite(per_query)]
    if valid.size == 0:
        raise ConfigError("every query's retrained measurement (or prediction) is constant over the subsets")
    stderr = float(valid.std(ddof=1) / np.sqrt(valid.size)) if valid.size > 1 else float("nan")
    return LDSResult(float(valid.mean()), per_query, stderr)


def settings_key(settings: dict[str, Any]) -> str:
    """A short hash of ``settings`` as canonical JSON (:func:`influence.runtime.io.canonical_json`),
    so settings that read back the same from JSON share a key."""
    return hashlib.sha256(json.dumps(io.canonical_json(settings), sort_keys=True).encode()).hexdigest()[:16]


class MeasurementCache:
    """Retrained measurements on disk: ``root/<settings hash>.npz``, one row per (subset, seed).

    ``settings`` must name everything that determines a retrained measurement (data,
    model, training recipe, the subset sampling seed and fraction, the queries); the
    subset index and the training seed are the row keys.
    """

    def __init__(self, root: str | os.PathLike, settings: dict[str, Any]):
        self.settings = io.canonical_json(settings)
        self.path = Path(root) / f"{settings_key(self.settings)}.npz"
        self._rows: dict[tuple[int, int], np.ndarray] = {}
        if self.path.exists():
            arrays, meta = io.load_arrays(self.path, _FILE_KIND)
            if meta["settings"] != self.settings:  # a hash collision, or a hand-edited file
                raise io.FileFormatError(f"{self.path} holds measurements for other settings")
            for j, s, v in zip(arrays["subset"], arrays["seed"], arrays["values"]):
                self._rows[(int(j), int(s))] = v

    def __len__(self) -> int:
        return len(self._rows)

    def missing(self, subsets: Sequence[int], seeds: Sequence[int]) -> list[tuple[int, int]]:
        return [(j, s) for j in subsets for s in seeds if (j, s) not in self._rows]

    def put(self, subset: int, seed: int, values: np.ndarray) -> None:
        self._rows[(int(subset), int(seed))] = np.asarray(values, np.float64)

    def get(self, subsets: Sequence[int], seeds: Sequence[int]) -> np.ndarray:
        """Stored measurements ``[len(subsets), len(seeds), Q]``; ``KeyError`` if one is missing."""
        return np.stack([np.stack([self._rows[(j, s)] for s in seeds]) for j in subsets])

    def save(self) -> Path:
        keys = sorted(self._rows)
        arrays = {
            "subset": np.array([k[0] for k in keys], np.int64),
            "seed": np.array([k[1] for k in keys], np.int64),
            "values": np.stack([self._rows[k] for k in keys]),
        }
        io.save_arrays(self.path, _FILE_KIND, arrays, {"settings": self.settings})
        return self.path


Retrain = Callable[[np.ndarray, Sequence[int]], np.ndarray]


def retrained_measurements(
    retrain: Retrain,
    masks: np.ndarray,
    seeds: Sequence[int],
    cache: MeasurementCache | None = None,
    chunk: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Measurements ``[M, S, Q]`` of models retrained on each subset with each seed.

    ``retrain(masks_chunk [m, N], seeds) -> [m, len(seeds), Q]`` trains one model per
    (subset, seed). Rows already in ``cache`` are reused; new ones are added and the
    cache is saved after every chunk, so an interrupted run loses at most one chunk.
    """
    subsets = list(range(len(masks)))
    seeds = list(seeds)
    if cache is None:
        cache = _MemoryCache()
    todo = sorted({j for j, _ in cache.missing(subsets, seeds)})
    for lo in range(0, len(todo), chunk):
        ids = todo[lo : lo + chunk]
        values = np.asarray(retrain(masks[ids], seeds))
        for row, j in enumerate(ids):
            for col, s in enumerate(seeds):
                cache.put(j, s, values[row, col])
        cache.save()
        if progress is not None:
            progress(min(lo + chunk, len(todo)), len(todo))
    return cache.get(subsets, seeds)


class _MemoryCache(MeasurementCache):
    """A cache that is never written (``retrained_measurements`` without ``cache``)."""

    def __init__(self):
        self.settings, self._rows = {}, {}

    def save(self) -> Path:
        return Path(os.devnull)
