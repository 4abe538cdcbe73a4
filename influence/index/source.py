"""Answering queries from an index: one matrix product per chunk of stored rows.

The queries' preconditioned gradients are computed as for a rescan
(:func:`~influence.scoring.preconditioned.prepare_queries`: the same damping, checks and rank-r
query batching), mapped like the stored rows, ``K_q = E_Aᵀ P_q E_S`` per layer
(:mod:`influence.index.compress`), and each chunk of the index scores ``K C_chunkᵀ``
``[Q, rows]``. The index is streamed from its memory-mapped shards, a chunk at a time,
so memory does not grow with its size.

This module is only a *block source* (:mod:`influence.scoring.blocks`): it yields one
score block ``[L|1, Q, rows]`` per chunk, and the scoring's one consumer turns them into
a ranking (the rescan's top-k, tie rule, candidates and score file) or into
:class:`~influence.Scores`. It registers itself there on import.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from influence.curvature.layer import map_arrays
from influence.factors import Factors
from influence.index.compress import LEVELS, MAP_KEYS, LayerMap, decode, map_queries, nibbles, row_bytes
from influence.index.store import Index, check_data, open_parts
from influence.index.write import built_from
from influence.runtime.execution import Execution
from influence.runtime.mesh import describe_mesh
from influence.scoring.blocks import register_index_source
from influence.scoring.finite import RowCheck
from influence.scoring.preconditioned import prepare_queries

CHUNK_BYTES = 1 << 26
"""Stored bytes read per chunk (64 MiB): what the scoring holds of the index at once."""


class IndexSource:
    """The score blocks of ``queries`` against an index: the opened parts, the prepared
    queries and their keys ``K [Q, D]`` per layer (the block source that
    :func:`influence.pairwise_scores` and :func:`influence.rank_training` open for
    ``index=``)."""

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

    def blocks(self, keep_layers: bool):
        """``(first row, rows, scores)`` per chunk, in row order: ``[L, Q, rows]`` per
        layer with ``keep_layers``, else ``[1, Q, rows]`` summed (device arrays)."""
        for start, n, chunk in self.chunks():
            yield start, n, _chunk_scores(self.keys, chunk, dtype=self.dtype, keep_layers=keep_layers,
                                          shapes=self.shapes)

    def row_check(self) -> RowCheck:
        """The NaN/Inf check of the blocks: a non-finite score is a damaged index."""
        return RowCheck(1, what="index score", advice="verify the index (Index.verify()) and rebuild it")

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
decoding a whole 64 MiB chunk before its product spills the float32 rows out of cache.
``python -m benchmarks.index_scan`` measures the block sizes on yours."""


def _layer_scores(keys, chunk, dtype: str, shapes) -> list[jax.Array]:
    """Scores ``[Q, rows]`` per layer of one chunk, decoded and multiplied a block at a
    time. Measured on a ladder run's int8 index (XLA on CPU): ``keys @ rowsᵀ`` ran up to
    70× slower than ``(rows @ keysᵀ)ᵀ`` at one query; decoding fused into the product lost
    its fast path too (the barrier keeps it apart); and integer rows are scaled after the
    product (one multiply per score, not per stored number; int4's padding column meets a
    zero of the key). Stored rows are cut into blocks of columns (:func:`_column_scores`),
    rank-c rows (expanded to dense ones) into blocks of rows."""
    out = []
    for k, parts, shape in zip(keys, chunk, shapes):
        if shape is None:
            out.append(_column_scores(k, parts, dtype))
            continue
        n = parts[0].shape[0]
        size = max(1, min(n, BLOCK_BYTES // (4 * shape[0] * shape[1])))
        count = -(-n // size)
        blocks = tuple(jnp.pad(p, [(0, count * size - n)] + [(0, 0)] * (p.ndim - 1)).reshape(count, size, *p.shape[1:])
                       for p in parts)

        def block_scores(block, k=k, shape=shape):
            rows = jax.lax.optimization_barrier(decode(block, dtype, shape))
            return jnp.matmul(rows, k.T, precision=jax.lax.Precision.HIGHEST)

        out.append(jax.lax.map(block_scores, blocks).reshape(count * size, -1)[:n].T)
    return out


def _column_scores(key, parts, dtype: str) -> jax.Array:
    """Scores ``[Q, rows]`` of one layer's stored rows ``parts`` (data ``[rows, h]``, and
    the integers' scales ``[rows]``) against ``key [Q, D]``, a block of columns at a time:
    every row of the chunk, ``BLOCK_BYTES`` of them decoded, ``[rows, cb] @ [cb, Q]``
    accumulated. Blocks of whole rows instead leave a few rows to a block when rows are
    wide (4 of 1M int4 numbers in 16 MiB), and XLA's CPU product of ``[4, 1M] @ [1M, Q]``
    is very slow beyond one query; columns keep the product's rows at the chunk's.
    ``python -m benchmarks.index_floor`` measures the scan against the I/O floor. int4 is
    decoded to its two halves (low and high nibbles, each against its half of the key)
    without interleaving them; the last block overlaps the one before, and the key's
    columns already counted are zeroed there, so no padded copy of the rows is made."""
    data = parts[0]
    n, h = data.shape
    halves = 2 if dtype == "int4" else 1
    key = jnp.pad(key, ((0, 0), (0, halves * h - key.shape[1])))
    key_parts = [key[:, i * h:(i + 1) * h] for i in range(halves)]
    cb = max(1, min(h, BLOCK_BYTES // (4 * halves * n)))
    count = -(-h // cb)

    def block_scores(i, acc):
        start = jnp.minimum(i * cb, h - cb)
        keep = (start + jnp.arange(cb)) >= i * cb  # columns an earlier block has not counted
        block = jax.lax.dynamic_slice_in_dim(data, start, cb, axis=1)
        if dtype == "int4":
            decoded = tuple(x.astype(jnp.float32) for x in nibbles(block))
        elif dtype in LEVELS:
            decoded = (block.astype(jnp.float32),)
        else:
            decoded = (decode((block,), dtype),)
        decoded = jax.lax.optimization_barrier(decoded)
        for rows, k in zip(decoded, key_parts):
            k = jnp.where(keep, jax.lax.dynamic_slice_in_dim(k, start, cb, axis=1), 0.0)
            acc = acc + jnp.matmul(rows, k.T, precision=jax.lax.Precision.HIGHEST)
        return acc

    acc = jnp.zeros((n, key.shape[0]), jnp.float32)
    acc = block_scores(0, acc) if count == 1 else jax.lax.fori_loop(0, count, block_scores, acc)
    if dtype in LEVELS:
        acc = acc * parts[1][:, None]
    return acc.T


@functools.partial(jax.jit, static_argnames=("dtype", "keep_layers", "shapes"))
def _chunk_scores(keys, chunk, *, dtype, keep_layers, shapes):
    """Scores ``[L, Q, rows]`` per layer, or ``[1, Q, rows]`` summed, of one chunk."""
    per = _layer_scores(keys, chunk, dtype, shapes)
    return jnp.stack(per) if keep_layers else functools.reduce(jnp.add, per)[None]


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


register_index_source(IndexSource)

__all__ = ["Index", "IndexSource", "read_floor"]
