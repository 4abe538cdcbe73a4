"""Okapi BM25 over training texts: an optional prefilter of candidate sequences.

Grosse et al. (2023, §3.2) restrict influence scoring to the training sequences a
lexical retriever ranks highest for each query. That saves time but **biases the
result towards sequences sharing surface tokens with the query**: sequences that help
through meaning without shared words are never scored. The filter is off by default.

score(D, Q) = Σ_{w∈Q} idf(w) · tf(w, D)·(k₁ + 1) / (tf(w, D) + k₁·(1 − b + b·|D|/avgdl)),
idf(w) = ln(1 + (N − n(w) + 0.5) / (n(w) + 0.5)), with k₁ = 1.5 and b = 0.75.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import scipy.sparse as sp

from influence.errors import ConfigError

WORD_RE = re.compile(r"(\w+)", re.UNICODE)  # one group, so WORD_RE.split keeps the words


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits and underscore runs)."""
    return WORD_RE.findall(text.lower())


class BM25:
    """An index of ``documents`` (texts) for BM25 scoring.

    Args:
      documents: the training texts, in training-row order.
      k1, b: BM25 parameters.
      tokenize: text -> terms (default: lower-cased words).
    """

    def __init__(self, documents: Iterable[str], k1: float = 1.5, b: float = 0.75,
                 tokenize: Callable[[str], list[str]] = words):
        self.k1, self.b, self.tokenize = float(k1), float(b), tokenize
        vocab: dict[str, int] = {}
        rows, cols, counts, lengths = [], [], [], []
        for i, text in enumerate(documents):
            terms = tokenize(text)
            lengths.append(len(terms))
            ids, tf = np.unique([vocab.setdefault(t, len(vocab)) for t in terms], return_counts=True)
            rows.extend([i] * len(ids))
            cols.extend(ids.tolist())
            counts.extend(tf.tolist())
        if not lengths:
            raise ConfigError("BM25 needs at least one document")
        self.vocab = vocab
        self.n_docs = len(lengths)
        self.lengths = np.asarray(lengths, np.float64)
        tf = sp.csc_matrix((np.asarray(counts, np.float64), (rows, cols)), shape=(self.n_docs, max(len(vocab), 1)))
        df = np.diff(tf.indptr)
        self.idf = np.log1p((self.n_docs - df + 0.5) / (df + 0.5))
        avgdl = max(self.lengths.mean(), 1e-9)
        norm = self.k1 * (1.0 - self.b + self.b * self.lengths / avgdl)
        # Per-(document, term) BM25 weight, precomputed once: a query is then a sum of columns.
        weights = tf.tocoo()
        values = weights.data * (self.k1 + 1.0) / (weights.data + norm[weights.row]) * self.idf[weights.col]
        self.weights = sp.csc_matrix((values, (weights.row, weights.col)), shape=tf.shape)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query``, float64 ``[n_docs]`` (repeated query
        terms count once per occurrence, as in the sum over query terms)."""
        ids = [self.vocab[t] for t in self.tokenize(query) if t in self.vocab]
        if not ids:
            return np.zeros(self.n_docs)
        term_ids, reps = np.unique(ids, return_counts=True)
        return np.asarray(self.weights[:, term_ids] @ reps.astype(np.float64)).ravel()

    def top(self, query: str, m: int) -> np.ndarray:
        """Indices of the ``m`` highest-scoring documents, best first (ties by index)."""
        s = self.scores(query)
        m = min(m, self.n_docs)
        return np.lexsort((np.arange(self.n_docs), -s))[:m]

    def candidates(self, queries: Sequence[str], m: int) -> list[np.ndarray]:
        """Per query, the sorted indices of its top-``m`` documents (for ``rank_training``)."""
        return [np.sort(self.top(q, m)) for q in queries]
