"""Streaming top-k, low-rank query batching and attribution against the full score matrix."""

import numpy as np
import pytest
from scipy.stats import pearsonr

import influence as inf
from influence import tasks
from influence.scoring.attribution import attribute
from influence.scoring.ranking import rank_training
from influence.testing import trained_lm


@pytest.fixture(scope="module")
def lm():
    model, data, queries = trained_lm()
    task = tasks.CausalLM()
    # empirical Fisher: the score error of rank-r queries need not fall with r (only the
    # queries' own error must); with these factors it falls with a margin (0.38, 0.16,
    # 0.04 at r = 1, 2, 4), while sampled factors give either order depending on the key
    factors = inf.fit_factors(model, task, data, strategy="ekfac", fisher="empirical", progress=False)
    full = inf.pairwise_scores(model, task, factors, queries, data, progress=False).values
    return model, task, data, queries, factors, full


def test_top_k_equals_argsort_of_the_full_score_matrix(lm, tmp_path):
    model, task, data, queries, factors, full = lm
    ranking = rank_training(model, task, factors, queries, data, k=5, batch_size=7, progress=False,
                            scores_path=tmp_path / "all.npy")
    expected = np.argsort(-full, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(ranking.indices, expected)
    np.testing.assert_allclose(ranking.scores, np.take_along_axis(full, expected, 1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "all.npy"), full, rtol=1e-4, atol=1e-6 * np.abs(full).max())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.npy"]
    assert ranking.n_train == len(data["input_ids"])


def test_k_larger_than_the_training_set(lm):
    model, task, data, queries, factors, full = lm
    small = {k: v[:3] for k, v in data.items()}
    ranking = rank_training(model, task, factors, queries, small, k=10, progress=False)
    assert ranking.indices.shape == (len(full), 3)
    np.testing.assert_array_equal(ranking.indices, np.argsort(-full[:, :3], axis=1, kind="stable"))


def test_low_rank_scores_converge_to_full_rank(lm):
    model, task, data, queries, factors, full = lm
    errors = []
    for rank in (1, 2, 4, 16):  # 16 = min(d_a, d_out) of every layer here: exact
        values = inf.pairwise_scores(model, task, factors, queries, data, query_rank=rank, progress=False).values
        errors.append(np.linalg.norm(values - full) / np.linalg.norm(full))
    assert errors[-1] < 1e-4
    assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 10 * errors[-1]
    low = inf.pairwise_scores(model, task, factors, queries, data, query_rank=4, progress=False).values
    assert pearsonr(low.ravel(), full.ravel())[0] > 0.8


def test_candidates_restrict_the_ranking(lm):
    model, task, data, queries, factors, full = lm
    rng = np.random.default_rng(0)
    candidates = [np.sort(rng.choice(len(data["input_ids"]), size=6, replace=False)) for _ in range(len(full))]
    ranking = rank_training(model, task, factors, queries, data, k=4, candidates=candidates, batch_size=4,
                            progress=False)
    for q, cands in enumerate(candidates):
        expected = cands[np.argsort(-full[q, cands], kind="stable")[:4]]
        np.testing.assert_array_equal(ranking.indices[q], expected)
    few = [c[:2] for c in candidates]
    ranking = rank_training(model, task, factors, queries, data, k=4, candidates=few, progress=False)
    assert np.all(ranking.indices[:, 2:] == -1) and np.all(np.isneginf(ranking.scores[:, 2:]))


@pytest.mark.parametrize("query_rank", [None, 3])
def test_token_and_layer_attributions_sum_to_the_score(lm, query_rank):
    model, task, data, queries, factors, full = lm
    ranking = rank_training(model, task, factors, queries, data, k=3, query_rank=query_rank, progress=False)
    pairs = np.array([(q, int(n)) for q in range(len(full)) for n in ranking.indices[q]])
    attribution = attribute(model, task, factors, ranking, data, pairs, batch_size=5)
    expected = np.array([ranking.scores[q, j] for q in range(len(full)) for j in range(3)])
    np.testing.assert_allclose(attribution.token.sum(1), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(attribution.layer.sum(1), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert attribution.layer_names == factors.layer_names
    # padding and the last position carry no score
    mask = data["loss_mask"][pairs[:, 1]]
    for p, row_mask in enumerate(mask):
        last = np.flatnonzero(row_mask).max()
        assert np.all(attribution.token[p, last:] == 0)
