"""Answering queries from an index: one matrix product per chunk of stored rows.

The queries' preconditioned gradients are computed as for a rescan
(:func:`~influence.scoring.queries.prepare_queries`: the same damping, checks and rank-r
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
from influence.index.compress import LEVELS, MAP_KEYS, LayerMap, decode, levels, map_queries, row_bytes
from influence.index.store import Index, check_data, open_parts
from influence.index.write import built_from
from influence.runtime.execution import Execution
from influence.runtime.mesh import describe_mesh
from influence.scoring.blocks import register_index_source
from influence.scoring.finite import RowCheck
from influence.scoring.queries import prepare_queries

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
