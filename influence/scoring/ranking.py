"""Top-k influential training examples per query, in one streaming pass.

Memory does not grow with the training set: per batch, scores ``[Q, B]`` are merged into
a running top-k ``[Q, k]`` on the device (on a mesh, one per device, merged at the end).
Optionally every score is also written to a ``.npy`` file (memory-mapped, written batch
by batch, renamed into place at the end).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from influence.capture.objectives import layer_gradients
from influence.errors import ConfigError, DataError
from influence.factors import Factors
from influence.runtime.data import as_source, num_rows, select_rows
from influence.runtime.driver import Accumulator, run_pass
from influence.runtime.execution import Execution
from influence.runtime.io import digest_arrays
from influence.runtime.mesh import DATA, local, n_data, query_axis, shard_batch, spec
from influence.scoring.contractions import layer_scores
from influence.scoring.finite import RowCheck
from influence.scoring.queries import LayerQueries, prepare_queries, score_checkpoint, sized
from influence.scoring.results import check_k
from influence.scoring.topk import merge_slots


class Ranking(NamedTuple):
    """Result of :func:`rank_training`.

    Attributes:
      indices: int64 ``[Q, k]`` training-row indices, most positive score first (``-1``
        where fewer than k rows were candidates).
      values: float32 ``[Q, k]``, their scores.
      queries: the preconditioned query gradients used (``{layer: LayerQueries}``), kept
        so that attribution reuses them.
      damping: the damping of each layer.
      n_train: number of training examples scored.
    """

    indices: np.ndarray
    values: np.ndarray
    queries: dict[str, LayerQueries]
    damping: dict[str, float]
    n_train: int

    @property
    def scores(self) -> np.ndarray:
        """The same as :attr:`values`."""
        return self.values

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``min(k, kept)`` of each query: ``(indices, values)``, each ``[Q, k']``."""
        check_k(k)
        return self.indices[:, :k], self.values[:, :k]




@functools.partial(jax.jit, static_argnames=("graphdef", "layers", "task", "k", "mesh"))
def _rank_step(best_scores, best_indices, queries, state, batch, example_mask, rows, allowed, *, graphdef, layers, task,
               k, mesh):
    """Score one batch and merge it into each device's running top-k ``[n_data, Q, k]``.
    ``rows [B]`` are the batch's training indices; ``allowed [Q, B]`` masks (query, row)
    pairs out of the ranking. Also returns the batch's scores ``[Q, B]``."""
    _, a, g = layer_gradients(graphdef, state, layers, task, "empirical", batch, example_mask)

    def per_device(best_scores, best_indices, queries, a, g, example_mask, rows, allowed):
        scores = sum(layer_scores(a[i.name], g[i.name], queries[i.name]) for i in layers)  # [Q, B] of this device
        ranked = jnp.where((example_mask[None, :] > 0) & allowed, scores, -jnp.inf)
        merged_scores = jnp.concatenate([best_scores[0], ranked], axis=1)
        merged_rows = jnp.concatenate([best_indices[0], jnp.broadcast_to(rows, ranked.shape)], axis=1)
        top, pos = jax.lax.top_k(merged_scores, k)  # ties: the earlier position, i.e. the lower row
        return top[None], jnp.take_along_axis(merged_rows, pos, axis=1)[None], scores

    q = query_axis(mesh)
    best = spec(DATA, q)
    in_specs = (best, best, spec(q), spec(DATA), spec(DATA), spec(DATA), spec(DATA), spec(q, DATA))
    return local(per_device, mesh, in_specs, (best, best, spec(q, DATA)))(
        best_scores, best_indices, queries, a, g, example_mask, rows, allowed)


def _candidate_mask(candidates, n_query: int, rows: np.ndarray) -> np.ndarray:
    if candidates is None:
        return np.ones((n_query, len(rows)), bool)
    return np.stack([np.isin(rows, c) for c in candidates])


class _Best(NamedTuple):
    """Each device's running top-k ``[n_data, Q, k]``: scores and training rows."""

    scores: Any
    rows: Any


def rank_training(
    model,
    task,
    factors: Factors,
    queries: Any,
    train: Any,
    *,
    k: int = 10,
    damping: float | None = None,
    query_rank: int | None = None,
    candidates: list[np.ndarray] | None = None,
    scores_path: str | os.PathLike | None = None,
    index: Any = None,
    execution: Execution | None = None,
    **options: Any,
) -> Ranking:
    """The ``k`` training examples with the most positive influence on each query.

    Args:
      queries, train: as for :func:`influence.pairwise_scores`.
      k: how many to keep per query.
      damping, query_rank: as for :func:`influence.pairwise_scores`.
      candidates: optional per-query arrays of training-row indices (e.g. from a BM25
        prefilter); only those rows are scored for that query, and only the union of all
        queries' candidates is read from ``train``.
      scores_path: also write every score, float32 ``[Q, n_train]`` (``-inf`` where a
        pair was not a candidate), to this ``.npy`` file (memory-mapped, renamed into
        place when the pass ends).
      index: an index of ``train`` (:func:`influence.build_index`), as for
        :func:`influence.pairwise_scores`: the ranking is answered from it.
      execution, **options: run settings (:class:`influence.Execution`). On a mesh each
        device keeps a running top-k of its rows, merged exactly at the end; a
        ``"query"`` axis splits the queries. A checkpoint keeps the running top-k and the
        rows of ``scores_path`` written so far.
    """
    check_k(k)
    run = Execution.of(execution, options)
    if index is not None:  # the index path (influence/index): imported here, so scoring does not depend on it
        from influence.index.score import index_rank_training

        return index_rank_training(model, task, factors, queries, train, index, k=k, damping=damping,
                                   query_rank=query_rank, candidates=candidates, scores_path=scores_path,
                                   execution=run)
    side = prepare_queries(model, task, factors, queries, damping=damping, rank=query_rank, execution=run)
    mesh, tracked, dampings, placed, n_query, q_pad = (side.mesh, side.tracked, side.damping, side.placed,
                                                       side.n_query, side.n_placed)
    row_map = None
    if candidates is not None:
        if len(candidates) != n_query:
            raise ConfigError(f"candidates has {len(candidates)} entries for {n_query} queries")
        candidates = [np.asarray(c, np.int64) for c in candidates]
        row_map = np.unique(np.concatenate(candidates)) if candidates else np.zeros(0, np.int64)
        n_total = num_rows(train)
        train = select_rows(train, row_map)
    run = sized(run, tracked, task, train, mesh, queries=side.placed)
    source = as_source(train, run.batch_size, task, model)
    n_rows = source.num_examples if row_map is None else n_total
    k_eff = min(k, n_rows) if n_rows else k
    checkpoint = score_checkpoint("ranking", run, tracked, factors, dampings, lambda: {
        "k": k, "candidates": None if candidates is None else digest_arrays(candidates),
        "scores_path": None if scores_path is None else str(scores_path)}, queries=side.queries)
    resumed = checkpoint.load() if checkpoint is not None else None
    best_sharding = NamedSharding(mesh, spec(DATA, query_axis(mesh)))
    allowed_sharding = NamedSharding(mesh, spec(query_axis(mesh), DATA))
    writer = _ScoreWriter(scores_path, n_query, n_rows, reopen=resumed is not None) if scores_path is not None else None
    finite = RowCheck(source.batch_size, None if row_map is None else lambda row: int(row_map[row]))

    def init():
        scores = np.full((n_data(mesh), q_pad, k_eff), -np.inf, np.float32)
        rows = np.full((n_data(mesh), q_pad, k_eff), -1, np.int32)
        return _Best(*jax.device_put((scores, rows), best_sharding))

    def update(best, step):
        local_rows = np.arange(step.batch.start, step.batch.start + source.batch_size)
        rows = local_rows if row_map is None else np.where(
            local_rows < len(row_map), row_map[np.minimum(local_rows, len(row_map) - 1)], -1)
        allowed = np.zeros((q_pad, len(rows)), bool)
        allowed[:n_query] = _candidate_mask(candidates, n_query, rows)
        top, top_rows, scores = _rank_step(
            best.scores, best.rows, placed, tracked.state, step.arrays, step.example_mask,
            shard_batch(rows.astype(np.int32), mesh), jax.device_put(allowed, allowed_sharding),
            graphdef=tracked.graphdef, layers=tracked.layers, task=task, k=k_eff, mesh=mesh)
        finite.update(scores, step.batch)
        if writer is not None:  # written one step late: the host never waits on the step just dispatched
            write_pending()
            pending.append((rows[:step.batch.n_valid], allowed, scores, step.batch.n_valid))
        return _Best(top, top_rows)

    pending: list = []

    def write_pending():
        while pending:
            rows, allowed, scores, n = pending.pop()
            writer.write(rows, np.where(allowed, np.asarray(scores), -np.inf)[:n_query, :n])

    def save(best, checkpoint):
        if writer is not None:
            write_pending()
            writer.flush()
        return best, {}, {"best_scores": np.asarray(best.scores), "best_indices": np.asarray(best.rows)}

    def restore(facts, arrays, checkpoint):
        restored = _restore_best(arrays["best_scores"], arrays["best_indices"], n_data(mesh), n_query, q_pad)
        return _Best(*jax.device_put(restored, best_sharding))

    def finalize(best):
        if writer is not None:
            write_pending()
            writer.close()
        return merge_slots(np.asarray(best.scores), np.asarray(best.rows), k_eff)

    def abort(best):
        if writer is not None:
            writer.abort()

    accumulator = finite.guard(Accumulator(init, update, finalize, save, restore, abort),
                               checkpointed=checkpoint is not None)
    result = run_pass(accumulator, source, mesh, checkpoint=checkpoint, resumed=resumed, desc="ranking",
                      progress=run.progress)
    idx, top = result.value
    n_train = n_total if row_map is not None else (n_rows if n_rows is not None else result.n_examples)
    return Ranking(idx[:n_query], top[:n_query], side.queries, dampings, int(n_train))


def _restore_best(scores: np.ndarray, indices: np.ndarray, slots: int, n_query: int, q_pad: int):
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


class _ScoreWriter:
    """Writes a ``[Q, N]`` float32 ``.npy`` batch by batch; atomic rename on close."""

    def __init__(self, path, n_query: int, n_train: int | None, reopen: bool = False):
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
        self.array[:, rows] = scores

    def flush(self) -> None:
        self.array.flush()

    def close(self) -> None:
        self.array.flush()
        del self.array
        os.replace(self.tmp, self.path)
        self.done = True

    def abort(self) -> None:
        if not self.done and self.tmp.exists():
            self.tmp.unlink()
