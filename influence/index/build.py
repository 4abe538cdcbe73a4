"""Building an index: choose its compression (:mod:`influence.index.choose`), then write
it (:mod:`influence.index.write`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from influence.errors import ConfigError, InfluenceError
from influence.factors import Factors
from influence.index.choose import choose_compression
from influence.index.compress import Compression
from influence.index.store import MANIFEST, SHARDS, Index
from influence.index.write import DEFAULT_SHARD_ROWS, built_from, write_index
from influence.runtime.execution import Execution

DEFAULT_COMPRESSION = "fidelity:0.95:0.0625:int4"
"""The compression of a new index when none is given: the most faithful (highest least
top-10 agreement with the rescan) within 1/16 of the full float32 gradient's bytes on
three held-out model kinds (``python -m benchmarks.index_heldout``; docs/index.md;
tests/index/test_docs.py holds this to docs/benchmarks/index-heldout.json). Per layer the
whitened eigen-coordinates of largest variance, at four bits each, as many as a probe of
held-out training rows needs for top-10 agreement 0.95 (no query below 0.8), at most 1/16
of the full bytes; what the probe measured is in ``Index.chosen``. (Before issue 28 the
default was ``select:0.375:int4``, chosen on docs/benchmarks/index.json.)"""

__all__ = ["DEFAULT_COMPRESSION", "build_index", "built_from"]


def build_index(model, task, factors: Factors, train: Any, *, path, compression: Any = None, append: bool = False,
                overwrite: bool = False, row_offset: int = 0, shard_rows: int = DEFAULT_SHARD_ROWS,
                probe: Any = None, execution: Execution | None = None, **options: Any) -> Index:
    """Store every training sequence's gradient, in the factors' eigenbasis and compressed,
    so that queries are answered without a pass over the training set.

    Args:
      model, task, factors, train: as for :func:`influence.pairwise_scores`.
      path: the index folder (created).
      compression: a :class:`~influence.index.Compression` or its string
        ``method[:fraction|rank][:dtype]`` (``"none"``: the full rotated gradient, which
        scores exactly as the rescan; ``"rank:4:bfloat16"``, ``"truncate:0.25"``,
        ``"project:0.25:int8"``, ...; ``"fidelity:0.95:int4"``: per layer the fewest
        coordinates that keep a probe's top-10 agreement with exact scores at 0.95,
        :func:`~influence.index.choose.choose_compression`); ``None``:
        :data:`DEFAULT_COMPRESSION` for a new index, the index's own when appending; an
        :class:`~influence.index.Index`: its compression and maps, as chosen for it (so
        each host's part of a multi-host index stores what host 0's choice measured:
        a ``"fidelity"`` choice depends on the rows it samples, and parts with other
        maps are refused when merged).
      append: add ``train``'s sequences after the rows of the index at ``path`` (same model,
        task, factors and compression; the data digest then covers both).
      overwrite: replace an index at ``path``. Without ``append`` or ``overwrite`` an
        existing index is refused.
      row_offset: the global row of ``train``'s first sequence, for one host's part of a
        multi-host index (see :func:`influence.scoring.hosts.host_shard`).
      shard_rows: rows per shard file.
      probe: for ``"fidelity"``: query data whose top-10 agreement is measured (default:
        held-out rows of ``train``).
      execution, **options: run settings (:class:`influence.Execution`). The build is
        always resumable: without ``checkpoint_dir`` its snapshots go to
        ``path/.build`` (removed when it finishes); run the same call again to resume.

    Returns:
      the opened :class:`~influence.index.Index` (``Index.chosen``: what a fidelity
      choice measured).
    """
    run = Execution.of(execution, options)
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise ConfigError(f"shard_rows must be a positive integer, got {shard_rows!r}")
    if isinstance(row_offset, bool) or not isinstance(row_offset, int) or row_offset < 0:
        raise ConfigError(f"row_offset must be a non-negative integer, got {row_offset!r}")
    path = Path(path)
    exists = (path / MANIFEST).is_file()
    like = compression if isinstance(compression, Index) else None
    if like is not None:
        compression = like.compression
    previous, chosen = None, None
    if append:
        if not exists:
            raise InfluenceError(f"append=True, but there is no index at {path}; build one first")
        previous = Index(path)  # checked against the model, task and factors by write_index
        if compression is not None and Compression.parse(compression) != previous.compression:
            raise InfluenceError(f"the index at {path} is compressed as {str(previous.compression)!r}; appended rows "
                                 f"are stored the same way, not as {str(Compression.parse(compression))!r}")
        comp, maps = previous.compression, previous.maps
    else:
        if exists and not overwrite:
            raise InfluenceError(f"an index exists at {path}; pass overwrite=True to replace it or append=True to add "
                                 "sequences to it")
        comp = Compression.parse(DEFAULT_COMPRESSION if compression is None else compression)
        if like is not None:  # another index's choice, maps and what it measured
            comp, maps, chosen = like.compression, like.maps, like.chosen
        else:
            comp, maps, chosen = choose_compression(model, task, factors, train, comp, probe=probe, execution=run)
        if exists:
            (path / MANIFEST).unlink()  # from here on the folder is not an index until the new manifest is written
            shutil.rmtree(path / SHARDS, ignore_errors=True)
    return write_index(model, task, factors, train, path=path, comp=comp, maps=maps, previous=previous, run=run,
                       shard_rows=shard_rows, row_offset=row_offset, chosen=chosen)
