"""Several hosts: each reads its own shard of the training data; parts are merged.

Fitting factors is one SPMD program over every host's devices (``jax.distributed``): a
global batch is every host's local batch side by side, and the sums are reduced over
all devices before the eigendecompositions, so every host ends with the same factors::

    jax.distributed.initialize(coordinator_address="host0:1234", num_processes=P, process_id=i)
    part, offset = inf.hosts.host_shard(train)              # this host's rows
    mesh = jax.make_mesh((jax.device_count(),), ("data",))  # every device of every host
    factors = inf.fit_factors(model, task, part, mesh=mesh, batch_size=32 * jax.device_count())

Scoring needs no communication: each host scores its rows on its own devices and writes
its part; any one host (or a later job) merges the parts::

    ranking = inf.rank_training(model, task, factors, queries, part, k=10, mesh=jax.local_devices(),
                                scores_path=f"run/all-{i}.npy")
    inf.hosts.save_ranking_part("run/parts", ranking, offset, scores_file=f"run/all-{i}.npy")
    # after every host is done:
    indices, scores = inf.hosts.merge_rankings("run/parts", out="run/topk.npz", scores_path="run/all.npy")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from influence.errors import ConfigError, DataError, MissingFileError
from influence.runtime import io
from influence.scoring.results import Scores
from influence.scoring.topk import merge_slots

_RANKING_PART = "influence-ranking-part"
_SCORES_PART = "influence-scores-part"
_TOPK = "influence-topk"


def host_rows(n_rows: int, process_index: int | None = None, process_count: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of this host's contiguous block of ``n_rows`` rows; blocks differ
    in size by at most one row. Defaults: ``jax.process_index()`` and ``jax.process_count()``."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ConfigError(f"process_index {index} is not in [0, {count})")
    if n_rows < count:
        raise DataError(f"{n_rows} rows cannot give each of {count} hosts at least one")
    q, r = divmod(n_rows, count)
    start = index * q + min(index, r)
    return start, start + q + (1 if index < r else 0)


def host_shard(data: Any, process_index: int | None = None, process_count: int | None = None) -> tuple[Any, int]:
    """This host's rows of a dict of arrays or a ``datasets.Dataset``, and the index of
    its first row in the whole set (add it to the part's row indices)."""
    if isinstance(data, dict):
        n = len(next(iter(data.values())))
        start, stop = host_rows(n, process_index, process_count)
        return {k: np.asarray(v)[start:stop] for k, v in data.items()}, start
    if hasattr(data, "select") and hasattr(data, "__len__"):
        start, stop = host_rows(len(data), process_index, process_count)
        return data.select(range(start, stop)), start
    raise DataError("host_shard needs a dict of arrays or a datasets.Dataset; shard other sources yourself "
                    "(each host passes its own batches) and keep track of the first row's index")


def _part_file(directory, process_index: int | None) -> Path:
    index = jax.process_index() if process_index is None else process_index
    return Path(directory) / f"part-{index:05d}.npz"


def save_ranking_part(directory: str | os.PathLike, ranking, row_offset: int, *,
                      scores_file: str | os.PathLike | None = None, process_index: int | None = None) -> Path:
    """Write this host's top-k (:class:`influence.Ranking` on its shard), its row indices
    made global by ``row_offset``; ``scores_file``: the ``.npy`` of all its scores, if
    ``rank_training`` wrote one."""
    indices = np.where(ranking.indices >= 0, ranking.indices + row_offset, -1)
    file = _part_file(directory, process_index)
    metadata = {"row_offset": int(row_offset), "n_train": int(ranking.n_train), "damping": ranking.damping,
                "scores_file": None if scores_file is None else str(Path(scores_file).resolve())}
    io.save_arrays(file, _RANKING_PART, {"indices": indices, "scores": ranking.scores}, metadata)
    return file


def _parts(directory, kind: str) -> list[tuple[dict[str, np.ndarray], dict[str, Any]]]:
    files = sorted(Path(directory).glob("part-*.npz"))
    if not files:
        raise MissingFileError(f"no part-*.npz in {directory}")
    parts = [io.load_arrays(f, kind) for f in files]
    parts.sort(key=lambda p: p[1]["row_offset"])
    expected = 0
    for (_, meta), file in zip(parts, files):
        if meta["row_offset"] != expected:
            raise DataError(f"the parts in {directory} do not tile the rows: "
                            f"a part starts at row {meta['row_offset']}, "
                            f"expected {expected} (a host's part is missing or duplicated; {file.name})")
        expected += meta["n_train"]
    return parts


def merge_rankings(directory: str | os.PathLike, *, k: int | None = None, out: str | os.PathLike | None = None,
                   scores_path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Merge every host's top-k into the final ``(indices [Q, k], scores [Q, k])``, equal
    to a ranking of the whole set on one device.

    Args:
      k: keep this many (default: the parts' k).
      out: also write them (``indices``, ``scores``; atomically) to this ``.npz``.
      scores_path: also assemble the hosts' score files into one ``[Q, n_train]`` ``.npy``.
    """
    parts = _parts(directory, _RANKING_PART)
    scores = np.stack([a["scores"] for a, _ in parts])
    indices = np.stack([a["indices"] for a, _ in parts])
    k = scores.shape[-1] if k is None else k
    merged_indices, merged_scores = merge_slots(scores, indices, k)
    n_train = sum(meta["n_train"] for _, meta in parts)
    if out is not None:
        io.save_arrays(out, _TOPK, {"indices": merged_indices, "scores": merged_scores},
                       {"n_train": n_train, "parts": len(parts), "damping": parts[0][1]["damping"]})
    if scores_path is not None:
        _assemble_score_files([(meta["scores_file"], meta["row_offset"], meta["n_train"]) for _, meta in parts],
                              scores_path, merged_scores.shape[0], n_train)
    return merged_indices, merged_scores


def _assemble_score_files(files, path, n_query: int, n_train: int) -> None:
    """One ``[Q, n_train]`` float32 ``.npy`` from the hosts' files, written atomically
    (:func:`influence.runtime.io.atomic_path`)."""
    if any(f is None for f, _, _ in files):
        raise DataError("a part has no score file: pass scores_path to rank_training "
                        "and scores_file to save_ranking_part")
    with io.atomic_path(path) as tmp:
        merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_query, n_train))
        for file, offset, rows in files:
            part = np.load(file, mmap_mode="r")
            if part.shape != (n_query, rows):
                raise DataError(f"{file} holds scores of shape {part.shape}, expected {(n_query, rows)}")
            merged[:, offset:offset + rows] = part
        merged.flush()
        del merged  # unmap before atomic_path syncs and renames the file


def save_scores_part(directory: str | os.PathLike, scores: Scores, row_offset: int, *,
                     process_index: int | None = None) -> Path:
    """Write this host's :class:`~influence.Scores` (columns = its rows, from ``row_offset``)."""
    arrays = {"values": scores.values}
    for name, arr in (scores.per_layer or {}).items():
        arrays[f"per_layer/{name}"] = arr
    file = _part_file(directory, process_index)
    io.save_arrays(file, _SCORES_PART, arrays,
                   {**scores.metadata, "row_offset": int(row_offset), "n_train": int(scores.values.shape[1])})
    return file


def merge_scores(directory: str | os.PathLike) -> Scores:
    """Every host's part side by side: the :class:`~influence.Scores` of the whole set."""
    parts = _parts(directory, _SCORES_PART)
    values = np.concatenate([a["values"] for a, _ in parts], axis=1)
    names = [k.split("/", 1)[1] for k in parts[0][0] if k.startswith("per_layer/")]
    per_layer = {n: np.concatenate([a[f"per_layer/{n}"] for a, _ in parts], axis=1) for n in names} or None
    metadata = {k: v for k, v in parts[0][1].items() if k not in ("row_offset", "version")}
    metadata.update(n_train=int(values.shape[1]), parts=len(parts))
    return Scores(values, per_layer, metadata)
