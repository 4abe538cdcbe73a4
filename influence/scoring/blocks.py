"""The one consumer of score blocks: what a rescan and an index both feed.

A *score block* is the scores of a run of training rows against every query,
``[L, Q, n]`` per tracked layer or ``[1, Q, n]`` summed, with the training rows it
holds (``rows [n]``, ``-1`` for padding). A rescan produces one block per training batch
(:func:`influence.scoring.pairwise.score_step`); an index produces one per chunk of its
stored rows (:mod:`influence.index.source`, a *block source* registered here). Whatever
produced them, the blocks become results here, once:

* :class:`TopK`: the running top-k per query (candidate masks, the lower row first on
  ties, one list per device merged exactly at the end) and, optionally, every score
  written to a memory-mapped ``.npy`` (:class:`ScoreWriter`, the only such writer);
* :func:`collect_scores`: all blocks kept, ``[L|1, Q, N]``, as :class:`Scores` with
  per-layer totals.

``scoring`` imports nothing of ``influence.index``: the index registers its block source
(:func:`register_index_source`) when it is imported, and the ``index=`` argument of the
scoring functions loads it by module name (:data:`INDEX_SOURCE_MODULE`) when nothing has
registered yet, so the import arrows keep pointing down.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from influence.errors import ConfigError, DataError
from influence.runtime.driver import Accumulator
from influence.runtime.mesh import DATA, local, n_data, query_axis, spec
from influence.scoring.finite import RowCheck
from influence.scoring.results import Scores
from influence.scoring.topk import merge_slots

INDEX_SOURCE_MODULE = "influence.index.source"
"""Module that registers the index's block source (imported by name on first ``index=``)."""

_INDEX_SOURCES: list[Callable[..., Any]] = []


def register_index_source(opener: Callable[..., Any]) -> None:
    """Register ``opener(model, task, factors, queries, train, index, damping, query_rank,
    run)``, which returns a block source: an object with ``side`` (the prepared
    :class:`~influence.scoring.preconditioned.QuerySide`), ``n_rows``, ``names`` (layers),
    ``blocks(keep_layers)`` yielding ``(first row, rows, scores [L|1, Q, rows])`` in row
    order, and ``metadata(factors, query_rank)``."""
    if opener not in _INDEX_SOURCES:
        _INDEX_SOURCES.append(opener)


def open_index_source(*args: Any) -> Any:
    """The registered index block source opened on ``args`` (see :func:`register_index_source`)."""
    if not _INDEX_SOURCES:
        importlib.import_module(INDEX_SOURCE_MODULE)  # registers itself on import
    return _INDEX_SOURCES[-1](*args)


def candidate_mask(candidates: list[np.ndarray] | None, n_query: int, rows: np.ndarray) -> np.ndarray:
    """``[Q, n]`` bool: which (query, row) pairs may be ranked (all without ``candidates``)."""
    if candidates is None:
        return np.ones((n_query, len(rows)), bool)
    return np.stack([np.isin(rows, c) for c in candidates])


def check_candidates(candidates, n_query: int) -> list[np.ndarray] | None:
    """``candidates`` as int64 arrays, one per query (``ValueError`` on a wrong count)."""
    if candidates is None:
        return None
    if len(candidates) != n_query:
        raise ConfigError(f"candidates has {len(candidates)} entries for {n_query} queries: pass one array of "
                         "training-row indices per query")
    return [np.asarray(c, np.int64) for c in candidates]


@functools.partial(jax.jit, static_argnames=("k", "mesh"))
def _merge(best_scores, best_rows, scores, rows, allowed, *, k, mesh):
    """Merge one block ``scores [L|1, Q', n]`` of training ``rows [n]`` (``-1``: padding)
    into each device's running top-k ``[n_data, Q, k]``; ``allowed [Q', n]`` masks pairs
    out. The block is padded to the top-k's queries and to a multiple of the devices."""
    total = jnp.sum(scores, axis=0)
    q_pad, slots = best_scores.shape[1], n_data(mesh)
    extra = -total.shape[1] % slots
    total = jnp.pad(total, ((0, q_pad - total.shape[0]), (0, extra)))
    rows = jnp.pad(rows, (0, extra), constant_values=-1)
    allowed = jnp.pad(allowed, ((0, q_pad - allowed.shape[0]), (0, extra)))

    def per_device(best_scores, best_rows, total, rows, allowed):
        ranked = jnp.where(allowed & (rows[None, :] >= 0), total, -jnp.inf)
        merged = jnp.concatenate([best_scores[0], ranked], axis=1)
        merged_rows = jnp.concatenate([best_rows[0], jnp.broadcast_to(rows, ranked.shape)], axis=1)
        top, pos = jax.lax.top_k(merged, k)  # ties: the earlier position, i.e. the lower row
        return top[None], jnp.take_along_axis(merged_rows, pos, axis=1)[None]

    q = query_axis(mesh)
    best = spec(DATA, q)
    return local(per_device, mesh, (best, best, spec(q, DATA), spec(DATA), spec(q, DATA)), (best, best))(
        best_scores, best_rows, total, rows, allowed)


class Best(NamedTuple):
    """Each device's running top-k ``[n_data, Q, k]``: scores and training rows."""

    scores: Any
    rows: Any


class TopK:
    """The running top-k of a stream of score blocks, and optionally every score on disk.

    Args:
      k: how many to keep per query (cut to the rows there are).
      n_query: real queries; ``n_placed``: queries on the mesh (padding included).
      mesh: one top-k list per device of its data axis, merged exactly at the end.
      n_rows: training rows in all (``None`` if unknown: then no ``scores_path``).
      candidates: per-query arrays of the training rows that may be ranked.
      scores_path: also write every score, float32 ``[Q, n_rows]`` (``-inf`` where a
        pair was not a candidate), memory-mapped, renamed into place at the end.
      reopen: a resumed pass: keep the partial score file written so far.
      check: the NaN/Inf check of the blocks (:class:`~influence.scoring.finite.RowCheck`).
    """

    def __init__(self, k: int, n_query: int, n_placed: int, mesh, *, n_rows: int | None, candidates=None,
                 scores_path=None, reopen: bool = False, check: RowCheck | None = None):
        self.k = min(k, n_rows) if n_rows else k
        self.n_query, self.n_placed, self.mesh = n_query, n_placed, mesh
        self.candidates = check_candidates(candidates, n_query)
        self.check = check
        self.sharding = NamedSharding(mesh, spec(DATA, query_axis(mesh)))
        self.writer = ScoreWriter(scores_path, n_query, n_rows, reopen=reopen) if scores_path is not None else None
        self.pending: list = []

    def init(self) -> Best:
        scores = np.full((n_data(self.mesh), self.n_placed, self.k), -np.inf, np.float32)
        rows = np.full((n_data(self.mesh), self.n_placed, self.k), -1, np.int32)
        return Best(*jax.device_put((scores, rows), self.sharding))

    def update(self, best: Best, scores, rows: np.ndarray, n_valid: int, start: int = 0) -> Best:
        """Merge one block ``scores [L|1, Q', n]`` (device work; the score file is written
        one block late so the host never waits on the block just dispatched). ``rows [n]``:
        its training rows (those past ``n_valid`` are padding); ``start``: its first row in
        the pass (for the NaN/Inf message)."""
        rows = np.where(np.arange(len(rows)) < n_valid, rows, -1).astype(np.int32)
        allowed = candidate_mask(self.candidates, self.n_query, rows)
        top, top_rows = _merge(best.scores, best.rows, scores, rows, allowed, k=self.k, mesh=self.mesh)
        if self.check is not None:
            self.check.update(scores, _Span(start, n_valid))
        if self.writer is not None:
            self.write_pending()
            self.pending.append((rows[:n_valid], allowed[:, :n_valid], scores, n_valid))
        return Best(top, top_rows)

    def write_pending(self) -> None:
        while self.pending:
            rows, allowed, scores, n = self.pending.pop()
            block = np.asarray(jnp.sum(scores, axis=0))[:self.n_query, :n]
            self.writer.write(rows, np.where(allowed, block, -np.inf))

    def arrays(self, best: Best) -> dict[str, np.ndarray]:
        """What a snapshot keeps (the score file is flushed first)."""
        if self.writer is not None:
            self.write_pending()
            self.writer.flush()
        return {"best_scores": np.asarray(best.scores), "best_indices": np.asarray(best.rows)}

    def restore(self, arrays: dict[str, np.ndarray]) -> Best:
        restored = restore_best(arrays["best_scores"], arrays["best_indices"], n_data(self.mesh), self.n_query,
                                self.n_placed)
        return Best(*jax.device_put(restored, self.sharding))

    def finalize(self, best: Best) -> tuple[np.ndarray, np.ndarray]:
        """``(rows [Q, k], scores [Q, k])``, best first (checked finite first)."""
        if self.check is not None:
            self.check.check()
        if self.writer is not None:
            self.write_pending()
            self.writer.close()
        idx, top = merge_slots(np.asarray(best.scores), np.asarray(best.rows), self.k)
        return idx[:self.n_query], top[:self.n_query]

    def abort(self, best: Best | None = None) -> None:
        if self.writer is not None:
            self.writer.abort()

    def accumulator(self, block: Callable[[Any], tuple[Any, np.ndarray]]) -> Accumulator:
        """An :class:`~influence.runtime.driver.Accumulator` of a pass whose step
        ``block(step)`` returns ``(scores [L|1, Q, B], rows [B])``."""
        def update(best, step):
            scores, rows = block(step)
            return self.update(best, scores, rows, step.batch.n_valid, step.batch.start)

        def save(best, checkpoint):
            return best, {}, self.arrays(best)

        return Accumulator(self.init, update, self.finalize, save, lambda facts, arrays, checkpoint:
                           self.restore(arrays), self.abort)

    def consume(self, blocks: Iterable[tuple[int, int, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Run over ``(first row, rows, scores)`` blocks in row order (an index's chunks);
        the score file is removed if anything fails."""
        try:
            best = self.init()
            for start, n, scores in blocks:
                best = self.update(best, scores, np.arange(start, start + n), n, start)
            return self.finalize(best)
        except BaseException:
            self.abort()
            raise


class _Span(NamedTuple):
    """The part of a :class:`~influence.runtime.data.Batch` that the NaN/Inf check reads."""

    start: int
    n_valid: int


def collect_scores(blocks: Iterable[tuple[int, int, Any]], check: RowCheck | None = None) -> np.ndarray:
    """Every block ``(first row, rows, scores [L|1, Q, rows])`` concatenated: ``[L|1, Q, N]``
    numpy (each block fetched one late: the device runs ahead of the host)."""
    outputs, pending = [], None
    for start, n, scores in blocks:
        if check is not None:
            check.update(scores, _Span(start, n))
        if pending is not None:
            outputs.append(np.asarray(pending))
        pending = scores
    if pending is not None:
        outputs.append(np.asarray(pending))
    if check is not None:
        check.check()
    return np.concatenate(outputs, axis=-1)


def scores_result(collected: np.ndarray, n_query: int, names: list[str], per_layer: bool, metadata: dict,
                  per_token: np.ndarray | None = None) -> Scores:
    """:class:`Scores` of collected blocks ``[L|1, Q', N]`` (padding queries cut): the
    total ``[Q, N]`` and, with ``per_layer``, each layer's ``[Q, N]``."""
    collected = collected[:, :n_query]
    per = {name: collected[i] for i, name in enumerate(names)} if per_layer else None
    return Scores(collected.sum(axis=0), per, metadata, per_token=per_token)


def restore_best(scores: np.ndarray, indices: np.ndarray, slots: int, n_query: int, q_pad: int):
    """Per-device top-k lists ``[slots, q_pad, k]`` from a snapshot. Taken with another
    number of devices, they are merged into the first slot (exactly: a top-k of top-k
    lists); with another query axis, the padding queries are cut or added."""
    scores, indices = scores[:, :n_query], indices[:, :n_query]
    if scores.shape[0] != slots:
        idx, top = merge_slots(scores, indices, scores.shape[-1])
        scores = np.full((slots, *top.shape), -np.inf, np.float32)
        indices = np.full((slots, *idx.shape), -1, np.int32)
        scores[0], indices[0] = top, idx
    pad = [(0, 0), (0, q_pad - n_query), (0, 0)]
    return np.pad(scores, pad, constant_values=-np.inf), np.pad(indices, pad, constant_values=-1).astype(np.int32)


class ScoreWriter:
    """Writes a ``[Q, N]`` float32 ``.npy`` block by block; atomic rename on close. The
    only writer of score files: rescans and indexes both write through it."""

    def __init__(self, path: str | os.PathLike, n_query: int, n_train: int | None, reopen: bool = False):
        if n_train is None:
            raise DataError("writing all scores needs a training set of known size (a dict, a list or a Dataset)")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        shape = (n_query, n_train)
        if reopen and self.tmp.exists():  # a resumed run: rows written before the snapshot are kept
            self.array = np.lib.format.open_memmap(self.tmp, mode="r+")
            if self.array.shape != shape or self.array.dtype != np.float32:
                raise DataError(f"{self.tmp} holds scores of shape {self.array.shape}, expected {shape}")
        else:
            self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=shape)
            self.array[:] = -np.inf
        self.done = False

    def write(self, rows: np.ndarray, scores: np.ndarray) -> None:
        """Scores ``[Q, n]`` of training ``rows [n]``."""
        self.array[:, rows] = scores

    def flush(self) -> None:
        self.array.flush()

    def close(self) -> None:
        self.array.flush()
        del self.array
        os.replace(self.tmp, self.path)
        self.done = True

    def abort(self) -> None:
        if hasattr(self, "array"):
            del self.array
        if not self.done and self.tmp.exists():
            self.tmp.unlink()
