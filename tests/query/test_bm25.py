"""BM25 against a direct evaluation of the formula."""

import math

import numpy as np
import pytest

from influence.query.bm25 import BM25, words

DOCS = [
    "To be, or not to be, that is the question.",
    "The quality of mercy is not strained.",
    "Now is the winter of our discontent.",
    "Be not afraid of greatness: some are born great.",
    "",
]


def _reference(docs, query, k1=1.5, b=0.75):
    toks = [words(d) for d in docs]
    n, avgdl = len(docs), np.mean([len(t) for t in toks])
    out = []
    for t in toks:
        s = 0.0
        for w in words(query):
            df = sum(w in d for d in toks)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = t.count(w)
            s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(t) / avgdl)) if tf else 0.0
        out.append(s)
    return np.array(out)


@pytest.mark.parametrize("query", ["to be or not", "mercy", "the THE winter", "unknown words only", "be great"])
def test_scores_match_the_formula(query):
    np.testing.assert_allclose(BM25(DOCS).scores(query), _reference(DOCS, query), rtol=1e-12, atol=1e-12)


def test_top_and_candidates():
    index = BM25(DOCS)
    assert index.top("winter discontent", 1).tolist() == [2]
    assert index.top("be", 2).tolist() == [0, 3]  # "be" twice in doc 0
    cands = index.candidates(["mercy", "greatness born"], 2)
    assert [c.tolist() for c in cands] == [sorted(index.top("mercy", 2).tolist()),
                                           sorted(index.top("greatness born", 2).tolist())]
    with pytest.raises(ValueError, match="at least one document"):
        BM25([])
