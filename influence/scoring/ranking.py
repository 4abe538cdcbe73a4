"""Top-k influential training examples per query, in one streaming pass, and their
token-wise and layer-wise attribution.

Memory does not grow with the training set: per batch, scores ``[Q, B]`` are merged into
a running top-k ``[Q, k]`` on the device (on a mesh, one per device, merged at the end).
Optionally every score is also written to a ``.npy`` file (memory-mapped, written batch
by batch, renamed into place at the end).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from influence.capture.tracking import track
from influence.runtime.io import digest_arrays
from influence.scoring.contractions import LayerQueries, layer_scores, token_scores
from influence.runtime.data import DataError, as_source
from influence.factors import Factors, curvature_arrays
from influence.capture.objectives import layer_gradients
from influence.runtime.mesh import DATA, MeshLike, local, n_data, query_axis, replicate, shard_batch, spec
from influence.scoring.pairwise import place_queries, query_gradients, score_checkpoint, scoring_mesh
from influence.runtime.stream import BatchStream, drive
from influence.scoring.topk import merge_slots


class Ranking(NamedTuple):
    """Result of :func:`rank_training`.

    Attributes:
      indices: int64 ``[Q, k]`` training-row indices, most positive score first.
      scores: float32 ``[Q, k]``.
      queries: the preconditioned query gradients used (``{layer: LayerQueries}``), kept
        so that attribution reuses them.
      damping: the damping of each layer.
      n_train: number of training examples scored.
    """

    indices: np.ndarray
    scores: np.ndarray
    queries: dict[str, LayerQueries]
    damping: dict[str, float]
    n_train: int


_STATIC = ("graphdef", "layers", "task")


@functools.partial(jax.jit, static_argnames=_STATIC + ("k", "mesh"))
def _rank_step(best_scores, best_indices, queries, state, batch, example_mask, rows, allowed, *, graphdef, layers, task, k,
               mesh):
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


def _select_rows(data: Any, rows: np.ndarray) -> Any:
    """The training rows ``rows`` of a dict of arrays or a ``datasets.Dataset``."""
    if isinstance(data, dict):
        return {k: np.asarray(v)[rows] for k, v in data.items()}
    if hasattr(data, "select"):
        return data.select(rows.tolist())
    raise DataError("candidate rows (a prefilter) need training data that can be indexed: a dict of arrays or a datasets.Dataset")


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
    batch_size: int = 32,
    progress: bool = True,
    mesh: MeshLike = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
) -> Ranking:
    """The ``k`` training examples with the most positive influence on each query.

    Args:
      queries, train: as for :func:`influence.pairwise_scores`.
      k: how many to keep per query.
      query_rank: rank-r query batching (``None``: full rank).
      candidates: optional per-query arrays of training-row indices (e.g. from a BM25
        prefilter); only those rows are scored for that query, and only the union of all
        queries' candidates is read from ``train``.
      scores_path: also write every score, float32 ``[Q, n_train]`` (``-inf`` where a
        pair was not a candidate), to this ``.npy`` file.
      mesh: this process's devices (see :func:`influence.pairwise_scores`): each keeps
        a running top-k of its rows, merged at the end; a ``"query"`` axis splits the
        queries.
      checkpoint_dir, checkpoint_every, resume: save the running top-k (and the rows of
        ``scores_path`` written so far) every ``checkpoint_every`` batches and on
        interruption, and resume from them (see :func:`influence.fit_factors`).
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    mesh = scoring_mesh(mesh, batch_size)
    tracked = track(model, list(factors.layer_names))
    factors.check_compatible(tracked)
    tracked = dataclasses.replace(tracked, state=replicate(tracked.state, mesh))
    prepared, dampings = query_gradients(model, task, factors, queries, damping=damping, rank=query_rank,
                                         batch_size=batch_size, progress=progress, mesh=mesh)
    n_query = next(iter(prepared.values())).num_queries
    row_map = None
    if candidates is not None:
        if len(candidates) != n_query:
            raise ValueError(f"candidates has {len(candidates)} entries for {n_query} queries")
        candidates = [np.asarray(c, np.int64) for c in candidates]
        row_map = np.unique(np.concatenate(candidates)) if candidates else np.zeros(0, np.int64)
        n_total = _num_rows(train)
        train = _select_rows(train, row_map)
    source = as_source(train, batch_size, task)
    n_rows = source.num_examples if row_map is None else n_total
    k_eff = min(k, n_rows) if n_rows else k
    placed = place_queries(prepared, mesh)
    q_pad = next(iter(placed.values())).num_queries
    checkpoint = score_checkpoint("ranking", checkpoint_dir, checkpoint_every, resume, tracked, lambda: {
        "factors": digest_arrays(curvature_arrays(factors.layers)), "damping": dampings,
        "queries": digest_arrays(jax.device_get(prepared)), "k": k, "batch_size": batch_size,
        "candidates": None if candidates is None else digest_arrays(candidates),
        "scores_path": None if scores_path is None else str(scores_path)})
    resumed = checkpoint.load() if checkpoint is not None else None
    best_sharding = NamedSharding(mesh, spec(DATA, query_axis(mesh)))
    if resumed is None:
        start, consumed, chain = 0, None, ""
        best_scores = np.full((n_data(mesh), q_pad, k_eff), -np.inf, np.float32)
        best_indices = np.full((n_data(mesh), q_pad, k_eff), -1, np.int32)
    else:
        state, arrays = resumed
        start, consumed, chain = state["next"], state["consumed"], state["chain"]
        best_scores, best_indices = _restore_best(arrays["best_scores"], arrays["best_indices"], n_data(mesh),
                                                  n_query, q_pad)
    best_scores, best_indices = jax.device_put((best_scores, best_indices), best_sharding)
    writer = _ScoreWriter(scores_path, n_query, n_rows, reopen=resumed is not None) if scores_path is not None else None
    stream = BatchStream(source, mesh, start=start, consumed=consumed, chain=chain, checkpoint=checkpoint,
                         desc="ranking", progress=progress)
    done = (start, stream.consumed, chain)

    def snapshot() -> None:
        if writer is not None:
            writer.flush()
        index, n_read, data_chain = done
        checkpoint.save((0, index), {"next": index, "consumed": n_read, "chain": data_chain},
                        {"best_scores": np.asarray(best_scores), "best_indices": np.asarray(best_indices)})

    def body(s) -> None:
        nonlocal best_scores, best_indices, done
        local_rows = np.arange(s.batch.start, s.batch.start + source.batch_size)
        rows = local_rows if row_map is None else np.where(
            local_rows < len(row_map), row_map[np.minimum(local_rows, len(row_map) - 1)], -1)
        allowed = np.zeros((q_pad, len(rows)), bool)
        allowed[:n_query] = _candidate_mask(candidates, n_query, rows)
        best_scores, best_indices, scores = _rank_step(
            best_scores, best_indices, placed, tracked.state, s.arrays, s.example_mask,
            shard_batch(rows.astype(np.int32), mesh), jax.device_put(allowed, allowed_sharding),
            graphdef=tracked.graphdef, layers=tracked.layers, task=task, k=k_eff, mesh=mesh)
        if writer is not None:
            n = s.batch.n_valid
            writer.write(rows[:n], np.where(allowed, np.asarray(scores), -np.inf)[:n_query, :n])
        done = (s.index + 1, stream.consumed, stream.chain.value)

    allowed_sharding = NamedSharding(mesh, spec(query_axis(mesh), DATA))
    drive(stream, checkpoint, body, snapshot, on_abort=writer.abort if writer is not None else None)
    if writer is not None:
        writer.close()
    idx, top = merge_slots(np.asarray(best_scores), np.asarray(best_indices), k_eff)
    return Ranking(idx[:n_query], top[:n_query], prepared, dampings, int(n_rows))


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


def _num_rows(data) -> int:
    if isinstance(data, dict):
        return len(next(iter(data.values())))
    return len(data)


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


# --- attribution ----------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=_STATIC)
def _attribution_step(queries, state, batch, example_mask, *, graphdef, layers, task):
    _, a, g = layer_gradients(graphdef, state, layers, task, "empirical", batch, example_mask)
    return jnp.stack([token_scores(a[i.name], g[i.name], queries[i.name]) for i in layers], axis=1)  # [B, L, T]


class Attribution(NamedTuple):
    """Per (query, training row) pair: ``per_layer_token [P, L, T]`` terms of the score.

    ``token = per_layer_token.sum(1)`` ``[P, T]`` (token-wise), ``layer =
    per_layer_token.sum(2)`` ``[P, L]`` (layer-wise); both sum to the pair's score.
    Token t's term is ā_tᵀ P_q g_t at position t of the training sequence, i.e. mostly the
    influence of predicting token t+1 there.
    """

    per_layer_token: np.ndarray
    layer_names: tuple[str, ...]

    @property
    def token(self) -> np.ndarray:
        return self.per_layer_token.sum(axis=1)

    @property
    def layer(self) -> np.ndarray:
        return self.per_layer_token.sum(axis=2)

    @property
    def total(self) -> np.ndarray:
        return self.per_layer_token.sum(axis=(1, 2))


def attribute(model, task, factors: Factors, ranking: Ranking, train: Any, pairs: np.ndarray, *, batch_size: int = 32) -> Attribution:
    """Token-wise and layer-wise split of the scores of ``pairs`` ``[P, 2]`` of (query index,
    training row), using the query gradients kept in ``ranking``."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    tracked = track(model, list(factors.layer_names))
    rows = _select_rows(train, pairs[:, 1])
    source = as_source(rows, batch_size, task)
    parts = []
    for batch in source:
        q = pairs[batch.start : batch.start + batch.n_valid, 0]
        q = np.concatenate([q, np.zeros(source.batch_size - len(q), np.int64)])
        per_query = {name: lq.take(jnp.asarray(q)) for name, lq in ranking.queries.items()}
        out = _attribution_step(per_query, tracked.state, batch.arrays, batch.example_mask,
                                graphdef=tracked.graphdef, layers=tracked.layers, task=task)
        parts.append(np.asarray(out)[: batch.n_valid])
    return Attribution(np.concatenate(parts), tracked.layer_names)
