"""Metric functions of the scale experiment, pure and small: each takes numpy arrays
(scores are influence values, positive = helps the query's completion) and returns numbers.

Conventions: ``scores`` of one query is float ``[N]`` over the N training sequences;
ranks are 1-based (rank 1 = the most positive score) and ties share the best rank.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from influence.query.bm25 import words

# --------------------------------------------------------------------------- sparsity


def top_share(scores: np.ndarray, fraction: float = 0.01) -> float:
    """Share of the total positive influence held by the top ``ceil(fraction·N)``
    sequences (1 = all of it in the top; ``fraction`` alone for equal scores). NaN when
    no score is positive."""
    positive = np.sort(np.clip(np.asarray(scores, np.float64), 0, None))[::-1]
    total = positive.sum()
    if total <= 0:
        return float("nan")
    k = max(1, math.ceil(fraction * len(positive)))
    return float(positive[:k].sum() / total)


# --------------------------------------------------------------------------- ranks


def ranks_of(scores: np.ndarray, rows: Sequence[int]) -> np.ndarray:
    """1-based rank of each of ``rows`` among all of ``scores`` (descending); a tie takes
    the best rank its value has (1 + the number of strictly larger scores)."""
    scores = np.asarray(scores)
    rows = np.asarray(rows, np.int64)
    return np.array([1 + int(np.sum(scores > scores[r])) for r in rows], np.int64)


def top_k(scores: np.ndarray, k: int, eligible: np.ndarray | None = None) -> np.ndarray:
    """Rows of the ``k`` largest scores, best first (ties by row), among ``eligible``
    (bool ``[N]``) rows when given."""
    scores = np.asarray(scores, np.float64)
    if eligible is not None:
        scores = np.where(eligible, scores, -np.inf)
    order = np.lexsort((np.arange(len(scores)), -scores))
    order = order[np.isfinite(scores[order])]
    return order[:k]


def percentile_in(values: np.ndarray, rows: Sequence[int]) -> np.ndarray:
    """For each row, the fraction of all ``values`` strictly below its value (0 = the
    lowest, near 1 = the highest)."""
    values = np.asarray(values, np.float64)
    ordered = np.sort(values)
    return np.searchsorted(ordered, values[np.asarray(rows, np.int64)], side="left") / len(values)


# --------------------------------------------------------------------------- surface overlap


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two ``[N]`` arrays (average ranks for ties; NaN if
    either is constant)."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Set of lower-cased word n-grams of ``text`` (the words of BM25)."""
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; 0 for two empty sets."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def ngram_jaccard(query: str, texts: Iterable[str], n: int) -> np.ndarray:
    """Word n-gram Jaccard similarity of ``query`` with each text, ``[len(texts)]``."""
    q = ngrams(query, n)
    return np.array([jaccard(q, ngrams(t, n)) for t in texts], np.float64)


# --------------------------------------------------------------------------- thematic agreement


def speaker_match(speakers: str, speaker: str) -> bool:
    """Whether ``speaker`` occurs in a sequence's ``"; "``-joined speaker labels
    (substring of a label: ``"Witch"`` matches ``"First Witch"``)."""
    return any(speaker in label for label in speakers.split("; ") if label)


def agreement(values: Sequence[str], target: str, match: Callable[[str, str], bool] | None = None) -> float:
    """Fraction of ``values`` equal to ``target`` (or for which ``match(value, target)``)."""
    if not len(values):
        return float("nan")
    test = match or (lambda v, t: v == t)
    return float(np.mean([test(v, target) for v in values]))


# --------------------------------------------------------------------------- layers

_BLOCK = re.compile(r"blocks\.(\d+)\.")
THIRDS = ("lower", "middle", "upper")


def layer_third(name: str, n_blocks: int) -> str:
    """Third of the network a layer belongs to, by its block's relative depth
    ``(i + 0.5) / n_blocks``: below 1/3 lower, below 2/3 middle, else upper (a 1-block
    model is all middle; a 2-block model has no middle). Layers outside the blocks (the
    output head) count as upper."""
    m = _BLOCK.search(name)
    if not m:
        return "upper"
    depth = (int(m[1]) + 0.5) / n_blocks
    return "lower" if depth < 1 / 3 else "middle" if depth < 2 / 3 else "upper"


def third_shares(layer_totals: dict[str, float], n_blocks: int) -> dict[str, float]:
    """Share of the summed influence in each third, from per-layer totals (signed; the
    shares sum to 1; NaN when the total is 0). A third with no layer gets 0."""
    sums = dict.fromkeys(THIRDS, 0.0)
    for name, v in layer_totals.items():
        sums[layer_third(name, n_blocks)] += float(v)
    total = sum(sums.values())
    return {t: (s / total if total else float("nan")) for t, s in sums.items()}


def block_shares(layer_totals: dict[str, float], n_blocks: int) -> list[float]:
    """Share of the summed influence in each transformer block ``[n_blocks]`` (signed,
    summing to 1 over the blocks when nothing lies outside them; NaN when the total is 0)."""
    sums = np.zeros(n_blocks)
    for name, v in layer_totals.items():
        m = _BLOCK.search(name)
        if m:
            sums[int(m[1])] += float(v)
    total = sum(layer_totals.values())
    return (sums / total).tolist() if total else [float("nan")] * n_blocks


# --------------------------------------------------------------------------- transfer


def crosslingual_transfer(source_scores: np.ndarray, target_scores: np.ndarray, eligible: np.ndarray,
                          k: int) -> tuple[float, float, np.ndarray]:
    """Influence of the source query's top-``k`` eligible sequences on the target query.

    Returns ``(ratio, percentile, rows)``: ``ratio`` = Σ target scores / Σ source scores
    of those rows; ``percentile`` = their mean percentile in the target query's scores
    over all sequences (0.5 = no better than a random sequence); ``rows`` the rows used.
    """
    rows = top_k(source_scores, k, eligible)
    denom = float(np.sum(np.asarray(source_scores)[rows]))
    ratio = float(np.sum(np.asarray(target_scores)[rows]) / denom) if denom > 0 else float("nan")
    return ratio, float(np.mean(percentile_in(target_scores, rows))), rows


# --------------------------------------------------------------------------- confidence intervals


def bootstrap_ci(values: np.ndarray, stat: Callable[[np.ndarray], float] = np.mean, *, n_boot: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``(estimate, low, high)``: ``stat`` of ``values`` and its percentile-bootstrap
    interval, resampling the first axis (queries) with replacement. Rows with a NaN are
    dropped first; all NaN if none is left."""
    values = np.asarray(values, np.float64)
    keep = ~np.isnan(values).reshape(len(values), -1).any(axis=1) if len(values) else np.zeros(0, bool)
    values = values[keep]
    if not len(values):
        return (float("nan"),) * 3
    estimate = float(stat(values))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    boots = np.array([stat(values[i]) for i in idx], np.float64)
    boots = boots[np.isfinite(boots)]
    if not len(boots):
        return estimate, float("nan"), float("nan")
    tail = (1 - level) / 2
    return estimate, float(np.quantile(boots, tail)), float(np.quantile(boots, 1 - tail))


def ratio_of_sums(pairs: np.ndarray) -> float:
    """Σ pairs[:, 1] / Σ pairs[:, 0] (e.g. reversed ÷ forward influence over facts);
    NaN when the denominator is not positive."""
    denom = float(np.sum(pairs[:, 0]))
    return float(np.sum(pairs[:, 1]) / denom) if denom > 0 else float("nan")


# --------------------------------------------------------------------------- semantic source


def reciprocal_rank(scores: np.ndarray, rows: Sequence[int]) -> float:
    """1 / (best rank among ``rows``): 1 when a source row scores highest, NaN when
    ``rows`` is empty. Averaged over queries this is the mean reciprocal rank (MRR)."""
    if not len(rows):
        return float("nan")
    return 1.0 / float(ranks_of(scores, rows).min())


def chance_mrr(n: int, k: int) -> float:
    """Expected reciprocal rank of the best of ``k`` source rows among ``n`` sequences in a
    uniformly random order: sum over r of P(best rank = r) / r, P = C(n-r, k-1) / C(n, k)."""
    from math import comb

    total = comb(n, k)
    return float(sum(comb(n - r, k - 1) / total / r for r in range(1, n - k + 2)))


def recall_at_k(scores: np.ndarray, rows: Sequence[int], k: int) -> float:
    """Share of ``rows`` among the top ``k`` by score (ties by row, as :func:`top_k`);
    NaN when ``rows`` is empty."""
    if not len(rows):
        return float("nan")
    return float(np.isin(np.asarray(rows), top_k(scores, k)).mean())


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Partial rank correlation of ``x`` and ``y`` controlling for ``z`` (all ``[N]``): the
    Pearson correlation of the average ranks of ``x`` and ``y`` after removing from each its
    least-squares linear fit on the ranks of ``z``. Equals
    ``(r_xy - r_xz r_yz) / sqrt((1 - r_xz²)(1 - r_yz²))`` on the ranks. NaN when a residual
    is constant."""
    from scipy.stats import rankdata

    rx, ry, rz = (rankdata(np.asarray(v, np.float64)) for v in (x, y, z))
    design = np.column_stack([np.ones_like(rz), rz])

    def residual(r):
        coef, *_ = np.linalg.lstsq(design, r, rcond=None)
        return r - design @ coef

    ex, ey = residual(rx), residual(ry)
    if ex.std() < 1e-12 * max(1.0, rx.std()) or ey.std() < 1e-12 * max(1.0, ry.std()):
        return float("nan")
    return float(np.corrcoef(ex, ey)[0, 1])
