"""Top-k influential training examples per query, in one streaming pass.

Memory does not grow with the training set: each batch's score block ``[1, Q, B]``
(:func:`~influence.scoring.pairwise.score_step`, the step of ``pairwise_scores`` too) is
merged into a running top-k ``[Q, k]`` on the device (on a mesh, one per device, merged
at the end) by :class:`~influence.scoring.blocks.TopK`, which also writes every score to
a ``.npy`` file if asked. With ``index=``, the index's blocks go through the same
:class:`~influence.scoring.blocks.TopK`.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

from influence.factors import Factors
from influence.runtime.data import as_source, num_rows, select_rows
from influence.runtime.driver import run_pass
from influence.runtime.execution import Execution
from influence.runtime.io import digest_arrays
from influence.scoring.blocks import TopK, check_candidates, open_index_source
from influence.scoring.contractions import LayerQueries
from influence.scoring.finite import RowCheck
from influence.scoring.pairwise import score_step
from influence.scoring.preconditioned import prepare_queries, score_checkpoint, scoring_batch
from influence.scoring.results import check_k


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
    if index is not None:  # the index's score blocks, through the same consumer (scoring.blocks)
        source = open_index_source(model, task, factors, queries, train, index, damping, query_rank, run)
        top_k = TopK(k, source.side.n_query, source.side.n_placed, source.side.mesh, n_rows=source.n_rows,
                     candidates=candidates, scores_path=scores_path, check=source.row_check())
        idx, top = top_k.consume(source.blocks(False))
        return Ranking(idx, top, source.side.queries, source.side.damping, int(source.n_rows))
    side = prepare_queries(model, task, factors, queries, damping=damping, rank=query_rank, execution=run)
    mesh, tracked, dampings, n_query = side.mesh, side.tracked, side.damping, side.n_query
    row_map = None
    candidates = check_candidates(candidates, n_query)
    if candidates is not None:
        row_map = np.unique(np.concatenate(candidates)) if candidates else np.zeros(0, np.int64)
        n_total = num_rows(train)
        train = select_rows(train, row_map)
    run = scoring_batch(run, tracked, task, train, mesh, queries=side.placed)
    source = as_source(train, run.batch_size, task, model)
    n_rows = source.num_examples if row_map is None else n_total
    checkpoint = score_checkpoint("ranking", run, tracked, factors, dampings, lambda: {
        "k": k, "candidates": None if candidates is None else digest_arrays(candidates),
        "scores_path": None if scores_path is None else str(scores_path)}, queries=side.queries)
    resumed = checkpoint.load() if checkpoint is not None else None
    finite = RowCheck(source.batch_size, None if row_map is None else lambda row: int(row_map[row]))
    top_k = TopK(k, n_query, side.n_placed, mesh, n_rows=n_rows, candidates=candidates, scores_path=scores_path,
                 reopen=resumed is not None, check=finite)

    def block(step):
        local_rows = np.arange(step.batch.start, step.batch.start + source.batch_size)
        rows = local_rows if row_map is None else np.where(
            local_rows < len(row_map), row_map[np.minimum(local_rows, len(row_map) - 1)], -1)
        scores = score_step(side.placed, tracked.state, step.arrays, step.example_mask, graphdef=tracked.graphdef,
                            layers=tracked.layers, task=task, kind="empirical", mesh=mesh, keep_layers=False)
        return scores, rows

    accumulator = finite.guard(top_k.accumulator(block), checkpointed=checkpoint is not None)
    result = run_pass(accumulator, source, mesh, checkpoint=checkpoint, resumed=resumed, desc="ranking",
                      progress=run.progress)
    idx, top = result.value
    n_train = n_total if row_map is not None else (n_rows if n_rows is not None else result.n_examples)
    return Ranking(idx, top, side.queries, dampings, int(n_train))
