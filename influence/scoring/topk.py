"""Merging partial top-k lists (per device, per host) into one.

Every partial list holds, per query, candidate ``(score, training row)`` pairs. The
merged list orders by score, highest first, and breaks ties by the lower row index,
which is also what one device streaming the rows in order keeps; so merging the
per-device or per-host lists gives exactly the single-device ranking.
"""

from __future__ import annotations

import numpy as np


def merge_top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of candidates ``scores [Q, m]`` at training rows ``rows [Q, m]``.

    Returns ``(rows [Q, k'], scores [Q, k'])`` with ``k' = min(k, m)``, best first; a
    candidate whose score is ``-inf`` (nothing there) gets row ``-1``.
    """
    scores = np.asarray(scores, np.float32)
    rows = np.asarray(rows, np.int64)
    k = min(k, scores.shape[-1])
    # lexicographic (−score, row): stable sort by row, then stable sort by −score
    by_row = np.argsort(rows, axis=-1, kind="stable")
    scores, rows = np.take_along_axis(scores, by_row, -1), np.take_along_axis(rows, by_row, -1)
    by_score = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    best, best_rows = np.take_along_axis(scores, by_score, -1), np.take_along_axis(rows, by_score, -1)
    return np.where(np.isfinite(best), best_rows, -1), best


def merge_slots(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-slot lists ``[S, Q, k]`` (one per device or host) into ``[Q, k]``."""
    q = scores.shape[1]
    def flat(x):  # [Q, S·k]
        return np.moveaxis(x, 0, 1).reshape(q, -1)
    return merge_top_k(flat(scores), flat(rows), k)
