"""Answering queries from an index: one matrix product per chunk of stored rows.

The queries' preconditioned gradients are computed as for a rescan
(:func:`~influence.scoring.queries.prepare_queries`: the same damping, checks and rank-r
query batching), mapped like the stored rows, ``K_q = E_Aᵀ P_q E_S`` per layer
(:mod:`influence.index.compress`), and each chunk of the index scores ``K C_chunkᵀ``
``[Q, rows]``. The index is streamed from its memory-mapped shards, a chunk at a time,
so memory does not grow with its size; the running top-k is merged on the device with
the rescan's tie rule (the lower row first).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from influence.curvature.layer import map_arrays
from influence.errors import ConfigError, DataError, InfluenceError, NonFiniteError
from influence.factors import Factors
from influence.index.build import built_from
from influence.index.compress import LEVELS, MAP_KEYS, LayerMap, decode, levels, map_queries, row_bytes
from influence.index.store import Index, check_data, open_parts
from influence.runtime import io
from influence.runtime.execution import Execution
from influence.runtime.mesh import describe_mesh
from influence.scoring.queries import prepare_queries
from influence.scoring.ranking import Ranking
from influence.scoring.results import Scores, check_k
from influence.scoring.topk import merge_top_k

CHUNK_BYTES = 1 << 26
"""Stored bytes read per chunk (64 MiB): what the scoring holds of the index at once."""


class _Context:
    """The opened parts, the prepared queries and their keys ``K [Q, D]`` per layer."""

    def __init__(self, model, task, factors: Factors, queries, train, index, damping, query_rank, run: Execution):
        self.parts = open_parts(index)
        self.side = prepare_queries(model, task, factors, queries, damping=damping, rank=query_rank, execution=run)
        origin = built_from(self.side.tracked, factors, task)
        for part in self.parts:
            part.check(origin)
        self.data_checked = train is not None
        if train is not None:
            check_data(self.parts, train, task, run.batch_size)
        first = self.parts[0]
        self.dtype = first.compression.dtype
        self.names = [layer["name"] for layer in first.layers]
        keys = []
        for name in self.names:
            curv = map_arrays(factors.layers[name], jnp.asarray)
            m = first.maps[name]
            layer = LayerMap(curv.q_a, curv.q_s,
                             *(jnp.asarray(m[s]) if s in m else None for s in MAP_KEYS))
            keys.append(_keys(self.side.queries[name], layer, rank=first.compression.rank))
        self.keys = tuple(keys)
        # rank-c rows are expanded to dense [rows, d_a·d_out] on the device, chunk by chunk
        self.shapes = tuple((la["d_a"], la["d_out"], la["rank"]) if la["rank"] else None for la in first.layers)
        width = sum(max(row_bytes(la["width"], self.dtype), 4 * la["d_a"] * la["d_out"] if la["rank"] else 0)
                    for la in first.layers)
        self.chunk_rows = max(1, CHUNK_BYTES // max(width, 1))
        self.n_rows = sum(p.n_rows for p in self.parts)

    def chunks(self):
        """``(global first row, rows, device-ready chunk)`` over every part in row order."""
        for part in self.parts:
            for start, n, arrays in part.chunks(self.chunk_rows):
                yield part.row_offset + start, n, tuple((d,) if s is None else (d, s) for d, s in arrays)

    def metadata(self, factors: Factors, query_rank) -> dict[str, Any]:
        first = self.parts[0]
        return {
            "strategy": factors.strategy, "damping": self.side.damping, "layers": self.names,
            "n_query": self.side.n_query, "n_train": self.n_rows, "query_rank": query_rank,
            "fingerprint": self.side.tracked.fingerprint, "mesh": describe_mesh(self.side.mesh),
            "index": {"paths": [str(p.path) for p in self.parts], "compression": str(first.compression),
                      "bytes_per_sequence": first.bytes_per_sequence, "data_checked": self.data_checked},
        }


@functools.partial(jax.jit, static_argnames=("rank",))
def _keys(queries, layer: LayerMap, *, rank):
    return map_queries(queries, layer, rank)


BLOCK_BYTES = 1 << 24
"""Float32 bytes of stored rows decoded at once (16 MiB), a block of a chunk at a time:
decoding a whole 64 MiB chunk before its product spills the float32 rows out of cache,
which ran 2–4× slower at 1 and at 32 queries on the 2-core development machine (32 MiB
L3). ``python -m benchmarks.index_scan`` measures the block sizes on yours."""


def _layer_scores(keys, chunk, dtype: str, shapes) -> list[jax.Array]:
    """Scores ``[Q, rows]`` per layer of one chunk, decoded and multiplied a block of
    rows at a time. Measured on a ladder run's int8 index (XLA on CPU): ``keys @ rowsᵀ``
    ran up to 70× slower than ``(rows @ keysᵀ)ᵀ`` at one query; decoding fused into the
    product lost its fast path too (the barrier keeps it apart); and integer rows are
    scaled after the product (one multiply per score, not per stored number; int4's
    padding column meets a zero of the key)."""
    out = []
    for k, parts, shape in zip(keys, chunk, shapes):
        n = parts[0].shape[0]
        decoded = shape[0] * shape[1] if shape is not None else parts[0].shape[1] * (2 if dtype == "int4" else 1)
        size = max(1, min(n, BLOCK_BYTES // (4 * decoded)))
        count = -(-n // size)
        blocks = tuple(jnp.pad(p, [(0, count * size - n)] + [(0, 0)] * (p.ndim - 1)).reshape(count, size, *p.shape[1:])
                       for p in parts)
        if dtype in LEVELS and shape is None:
            key = jnp.pad(k, ((0, 0), (0, decoded - k.shape[1])))

            def block_scores(block, key=key):
                rows = jax.lax.optimization_barrier(levels(block, dtype))
                return jnp.matmul(rows, key.T, precision=jax.lax.Precision.HIGHEST) * block[1][:, None]
        else:
            def block_scores(block, k=k, shape=shape):
                rows = jax.lax.optimization_barrier(decode(block, dtype, shape))
                return jnp.matmul(rows, k.T, precision=jax.lax.Precision.HIGHEST)
        scores = jax.lax.map(block_scores, blocks).reshape(count * size, -1)[:n]
        out.append(scores.T)
    return out


@functools.partial(jax.jit, static_argnames=("dtype", "keep_layers", "shapes"))
def _chunk_scores(keys, chunk, *, dtype, keep_layers, shapes):
    """Scores ``[L, Q, rows]`` per layer, or ``[1, Q, rows]`` summed, of one chunk."""
    per = _layer_scores(keys, chunk, dtype, shapes)
    return jnp.stack(per) if keep_layers else functools.reduce(jnp.add, per)[None]


@functools.partial(jax.jit, static_argnames=("dtype", "k", "shapes"))
def _rank_chunk(best_scores, best_rows, keys, chunk, rows, allowed, *, dtype, k, shapes):
    """Merge one chunk into the running top-k ``[Q, k]``; also its scores ``[Q, rows]``."""
    scores = functools.reduce(jnp.add, _layer_scores(keys, chunk, dtype, shapes))
    ranked = jnp.where(allowed, scores, -jnp.inf)
    merged = jnp.concatenate([best_scores, ranked], axis=1)
    merged_rows = jnp.concatenate([best_rows, jnp.broadcast_to(rows, ranked.shape)], axis=1)
    top, pos = jax.lax.top_k(merged, k)  # ties: the earlier position, i.e. the lower row
    return top, jnp.take_along_axis(merged_rows, pos, axis=1), scores


def index_pairwise_scores(model, task, factors: Factors, queries, train, index, *, damping=None,
                          per_layer: bool = False, per_token: bool = False, query_rank=None,
                          execution: Execution | None = None) -> Scores:
    """:func:`influence.pairwise_scores` answered from ``index`` (no pass over ``train``;
    ``train``, if given, is only read to check it is the data the index holds)."""
    if per_token:
        raise InfluenceError("per_token=True needs each training position's terms, which an index does not keep: "
                             "score without index= (a rescan), or rank_training(..., index=) and attribute(...) for "
                             "the per-token terms of the top pairs")
    run = Execution() if execution is None else execution
    ctx = _Context(model, task, factors, queries, train, index, damping, query_rank, run)
    outputs, pending = [], None
    for _, _, chunk in ctx.chunks():
        out = _chunk_scores(ctx.keys, chunk, dtype=ctx.dtype, keep_layers=per_layer, shapes=ctx.shapes)
        if pending is not None:
            outputs.append(np.asarray(pending))  # fetched one chunk late: the device runs ahead of the reads
        pending = out
    outputs.append(np.asarray(pending))
    collected = np.concatenate(outputs, axis=-1)
    _check_finite(collected)
    per = {name: collected[i] for i, name in enumerate(ctx.names)} if per_layer else None
    return Scores(collected.sum(axis=0), per, ctx.metadata(factors, query_rank))


def _check_finite(scores: np.ndarray) -> None:
    if not np.all(np.isfinite(scores)):
        row = int(np.argmin(np.all(np.isfinite(scores.reshape(-1, scores.shape[-1])), axis=0)))
        raise NonFiniteError(f"the index scores of training row {row} are NaN/Inf; verify the index "
                                 "(Index.verify()) and rebuild it")


def index_rank_training(model, task, factors: Factors, queries, train, index, *, k: int = 10, damping=None,
                        query_rank=None, candidates=None, scores_path: str | os.PathLike | None = None,
                        execution: Execution | None = None):
    """:func:`influence.rank_training` answered from ``index``: the same
    :class:`~influence.Ranking` (top-k, tie rule, candidates, ``scores_path``)."""
    check_k(k)
    run = Execution() if execution is None else execution
    ctx = _Context(model, task, factors, queries, train, index, damping, query_rank, run)
    n_query = ctx.side.n_query
    if candidates is not None:
        if len(candidates) != n_query:
            raise ConfigError(f"candidates has {len(candidates)} entries for {n_query} queries")
        candidates = [np.asarray(c, np.int64) for c in candidates]
    k_eff = min(k, ctx.n_rows)
    best = (jnp.full((n_query, k_eff), -jnp.inf, jnp.float32), jnp.full((n_query, k_eff), -1, jnp.int32))
    writer = _AllScores(scores_path, n_query, ctx.n_rows) if scores_path is not None else None
    try:
        for start, n, chunk in ctx.chunks():
            rows = np.arange(start, start + n)
            allowed = (np.ones((n_query, n), bool) if candidates is None
                       else np.stack([np.isin(rows, c) for c in candidates]))
            *best, scores = _rank_chunk(*best, ctx.keys, chunk, rows.astype(np.int32), allowed, dtype=ctx.dtype,
                                        k=k_eff, shapes=ctx.shapes)
            if writer is not None:
                writer.array[:, start:start + n] = np.where(allowed, np.asarray(scores), -np.inf)
        top = np.asarray(best[0])
        finite_or_masked = np.isfinite(top) | (top == -np.inf)
        if not finite_or_masked.all():
            raise NonFiniteError("the index scores hold NaN/Inf; verify the index (Index.verify()) and rebuild it")
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    idx, values = merge_top_k(top, np.asarray(best[1]), k_eff)
    return Ranking(idx, values, ctx.side.queries, ctx.side.damping, int(ctx.n_rows))


class _AllScores:
    """A ``[Q, N]`` float32 ``.npy`` written chunk by chunk, renamed into place on close."""

    def __init__(self, path, n_query: int, n_rows: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.context = io.atomic_path(self.path)
        tmp = self.context.__enter__()
        self.array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_query, n_rows))

    def close(self):
        self.array.flush()
        del self.array
        self.context.__exit__(None, None, None)

    def abort(self):
        if hasattr(self, "array"):
            del self.array
        try:
            self.context.__exit__(DataError, DataError("aborted"), None)
        except DataError:
            pass


def read_floor(index: Any) -> float:
    """Seconds to read every stored byte of ``index`` once (the I/O floor of a query)."""
    import time

    t0 = time.perf_counter()
    for part in open_parts(index):
        for _, _, arrays in part.chunks(1 << 16):
            for data, scale in arrays:
                np.array(data)  # a copy of every byte into memory, as the scoring's transfer makes
                if scale is not None:
                    np.array(scale)
    return time.perf_counter() - t0


__all__ = ["Index", "index_pairwise_scores", "index_rank_training", "read_floor"]
