"""``pairwise_scores(..., per_token=True)``: each training position's term of every score."""

from __future__ import annotations

import numpy as np
import pytest

import influence as inf
from influence import tasks, testing
from influence.scoring import pairwise


@pytest.fixture(scope="module")
def lm():
    model, train, queries = testing.trained_lm(n_train=16, steps=40)
    task = tasks.CausalLM()
    factors = inf.fit_factors(model, task, train, strategy="ekfac", fisher="empirical", progress=False)
    return model, task, factors, {k: v[:3] for k, v in queries.items()}, train


@pytest.mark.parametrize("query_rank", [None, 2])
def test_per_token_sums_to_values_and_equals_attribute(lm, query_rank):
    model, task, factors, queries, train = lm
    scores = inf.pairwise_scores(model, task, factors, queries, train, per_token=True, per_layer=True,
                                 query_rank=query_rank, batch_size=5, progress=False)
    q, n, t = scores.per_token.shape
    assert (q, n, t) == (3, 16, train["input_ids"].shape[1])
    scale = np.abs(scores.values).max()
    np.testing.assert_allclose(scores.per_token.sum(-1), scores.values, rtol=0, atol=1e-5 * scale)
    assert np.abs(scores.per_token[..., -1]).max() == 0  # the last position predicts nothing
    plain = inf.pairwise_scores(model, task, factors, queries, train, query_rank=query_rank, batch_size=5,
                                progress=False)
    np.testing.assert_allclose(scores.values, plain.values, rtol=0, atol=1e-6 * scale)  # unchanged, to rounding
    ranking = inf.rank_training(model, task, factors, queries, train, k=4, query_rank=query_rank, progress=False)
    pairs = np.array([(qi, ni) for qi in range(q) for ni in (0, 7, 15)])
    attribution = inf.attribute(model, task, factors, ranking, train, pairs, progress=False)
    np.testing.assert_allclose(scores.per_token[pairs[:, 0], pairs[:, 1]], attribution.token, rtol=0,
                               atol=1e-5 * scale)
    # a term that moves between positions (a transpose of T and N) would not match
    assert np.abs(scores.per_token).max() > 10 * 1e-5 * scale


def test_per_token_is_saved_and_loaded(lm, tmp_path):
    model, task, factors, queries, train = lm
    scores = inf.pairwise_scores(model, task, factors, queries, train, per_token=True, progress=False)
    loaded = inf.Scores.load(scores.save(tmp_path))
    np.testing.assert_array_equal(loaded.per_token, scores.per_token)
    assert loaded.metadata["per_token"]["tokens"] == train["input_ids"].shape[1]
    assert inf.pairwise_scores(model, task, factors, queries, train, progress=False).per_token is None


def test_per_token_above_the_limit_is_refused(lm, monkeypatch):
    model, task, factors, queries, train = lm
    monkeypatch.setattr(pairwise, "MAX_PER_TOKEN", 3 * 16 * 8 - 1)
    with pytest.raises(inf.InfluenceError, match=r"3 queries x 16 training rows x 8 tokens = 384 floats, above the "
                                                 r"limit of 383.*rank_training\(\.\.\.\) and attribute"):
        inf.pairwise_scores(model, task, factors, queries, train, per_token=True, progress=False)
