"""Token-wise attribution statistics (experiments/tokenwise.py) on closed-form cases."""

import numpy as np
import pytest

from experiments.tokenwise import sequence_statistics, token_records


def test_even_spread_puts_a_tenth_on_the_top_tenth():
    terms = np.ones(20)
    out = sequence_statistics(terms, np.arange(20), np.ones(20), {0, 1})
    assert out["token_top10_share"] == pytest.approx(0.1)
    # positions predicting tokens 0 and 1 hold 2/20 of the influence and 2/20 of positions
    assert out["token_lexical_enrichment"] == pytest.approx(1.0)


def test_concentrated_influence_on_the_query_tokens():
    terms = np.zeros(10)
    terms[3] = 2.0  # all influence on the position predicting token 7
    terms[5] = -1.0  # negative terms count in |influence| but not in the positive share
    targets = np.array([0, 1, 2, 7, 4, 5, 6, 3, 8, 9])
    out = sequence_statistics(terms, targets, np.ones(10), {7, 8})
    assert out["token_top10_share"] == pytest.approx(2.0 / 3.0)
    # positive share on lexical positions 1.0, lexical positions 2/10 -> enrichment 5
    assert out["token_lexical_enrichment"] == pytest.approx(5.0)


def test_masked_positions_are_left_out():
    terms = np.array([5.0, 1.0, 1.0, 1.0])
    mask = np.array([0, 1, 1, 1])
    out = sequence_statistics(terms, np.array([9, 9, 1, 2]), mask, {9})
    assert out["token_top10_share"] == pytest.approx(1.0 / 3.0)  # top 10% of 3 positions = 1 position
    assert out["token_lexical_enrichment"] == pytest.approx(1.0)  # 1/3 of the influence, 1/3 of positions


def test_undefined_cases_are_nan_not_zero():
    out = sequence_statistics(np.zeros(4), np.arange(4), np.zeros(4), {1})
    assert np.isnan(out["token_top10_share"]) and np.isnan(out["token_lexical_enrichment"])
    out = sequence_statistics(np.ones(4), np.arange(4), np.ones(4), {0, 1, 2, 3})  # every position lexical
    assert np.isnan(out["token_lexical_enrichment"])


def test_records_average_over_each_querys_pairs():
    class Spec:
        def __init__(self, i):
            self.id = f"q{i}"

    terms = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pairs = np.array([[0, 4], [0, 5], [1, 4]])
    ids = np.array([[0, 1, 2], [0, 2, 1], [0, 1, 2]])
    mask = np.ones_like(ids)
    recs = token_records([Spec(0), Spec(1)], terms, pairs, ids, mask, [[1], [2]])
    # q0: pair 0 puts all on target 1 (lexical, share 1/2 -> 2); pair 1 all on target 1 too -> 2
    assert recs[0] == {"id": "q0", "token_top10_share": 1.0, "token_lexical_enrichment": pytest.approx(2.0)}
    assert recs[1]["token_top10_share"] == pytest.approx(0.5)
    assert recs[1]["token_lexical_enrichment"] == pytest.approx(1.0)
