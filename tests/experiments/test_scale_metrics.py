"""Metric functions of the scale experiment (experiments/metrics.py, powerlaw.py),
checked against hand-computed cases and distributions with known answers."""

import math

import numpy as np
import pytest

from experiments import metrics as M
from experiments.powerlaw import alpha_mle, fit_power_law, ks_distance, sample_power_law


def test_top_share_hand_computed():
    # N = 200 -> the top ceil(0.01 * 200) = 2 hold 10 + 5 of the positive mass 10 + 5 + 3 + 2.
    scores = np.zeros(200)
    scores[:6] = [10, 5, 3, 2, -4, -100]
    assert M.top_share(scores, 0.01) == pytest.approx(15 / 20)
    # N = 150 -> ceil(1.5) = 2 as well; equal scores give exactly k / N.
    assert M.top_share(np.ones(150), 0.01) == pytest.approx(2 / 150)
    assert math.isnan(M.top_share(-np.ones(10)))


def test_ranks_ties_take_the_best_rank():
    scores = np.array([3.0, 5.0, 5.0, 1.0])
    assert M.ranks_of(scores, [1, 2, 3, 0]).tolist() == [1, 1, 4, 3]


def test_top_k_best_first_ties_by_row_and_eligibility():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 9.0])
    assert M.top_k(scores, 3).tolist() == [4, 1, 2]
    eligible = np.array([True, True, False, True, False])
    assert M.top_k(scores, 2, eligible).tolist() == [1, 3]
    assert M.top_k(scores, 10, eligible).tolist() == [1, 3, 0]  # never an ineligible row


def test_percentile_in():
    values = np.array([4.0, 1.0, 3.0, 2.0])
    assert M.percentile_in(values, [0, 1, 2]).tolist() == [0.75, 0.0, 0.5]


def test_ngram_jaccard_hand_computed():
    assert M.ngrams("The cat, the hat!", 2) == {("the", "cat"), ("cat", "the"), ("the", "hat")}
    j = M.ngram_jaccard("the cat sat", ["the cat ran", "a dog", ""], 1)
    assert j.tolist() == pytest.approx([2 / 4, 0.0, 0.0])
    assert M.ngram_jaccard("the cat sat", ["The CAT ran"], 2).tolist() == pytest.approx([1 / 3])
    assert M.jaccard(set(), set()) == 0.0


def test_speaker_match_and_agreement():
    assert M.speaker_match("First Witch; MACBETH", "Witch")
    assert not M.speaker_match("MACBETH; BANQUO", "Witch")
    assert not M.speaker_match("", "Witch")
    assert M.agreement(["a", "b", "a", "c"], "a") == 0.5
    assert M.agreement(["First Witch", "ROSS"], "Witch", M.speaker_match) == 0.5
    assert math.isnan(M.agreement([], "a"))


@pytest.mark.parametrize("n_blocks, expected", [
    (1, ["middle"]),
    (2, ["lower", "upper"]),
    (3, ["lower", "middle", "upper"]),
    (5, ["lower", "lower", "middle", "upper", "upper"]),
])
def test_layer_thirds_by_relative_depth(n_blocks, expected):
    got = [M.layer_third(f"blocks.{i}.mlp.fc_in", n_blocks) for i in range(n_blocks)]
    assert got == expected
    assert M.layer_third("lm_head", n_blocks) == "upper"


def test_third_shares_hand_computed():
    totals = {"blocks.0.mlp.fc_in": 2.0, "blocks.0.mlp.fc_out": 1.0, "blocks.1.attn.qkv": 3.0,
              "blocks.2.mlp.fc_in": -2.0}
    shares = M.third_shares(totals, 3)
    assert shares == pytest.approx({"lower": 3 / 4, "middle": 3 / 4, "upper": -2 / 4})
    assert sum(shares.values()) == pytest.approx(1.0)


def test_crosslingual_transfer_hand_computed():
    source = np.array([5.0, 4.0, 3.0, 0.0, -1.0])
    target = np.array([1.0, 2.0, -1.0, 10.0, 0.0])
    eligible = np.array([True, False, True, True, True])
    ratio, pct, rows = M.crosslingual_transfer(source, target, eligible, 2)
    assert rows.tolist() == [0, 2]  # row 1 is not eligible (another language)
    assert ratio == pytest.approx((1 - 1) / (5 + 3))
    assert pct == pytest.approx((2 / 5 + 0 / 5) / 2)  # row 0's target 1 beats {-1, 0}; row 2's beats none


def test_bootstrap_ci_constant_and_normal():
    assert M.bootstrap_ci(np.full(20, 3.0)) == (3.0, 3.0, 3.0)
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 1.0, 400)
    est, lo, hi = M.bootstrap_ci(x, n_boot=2000, seed=3)
    assert est == pytest.approx(x.mean())
    # The percentile interval of a mean of 400 unit-variance draws is about ±1.96/20 wide.
    assert (hi - lo) == pytest.approx(2 * 1.96 / 20, rel=0.15)
    assert lo < 2.0 < hi
    # NaN rows are dropped, not propagated.
    assert M.bootstrap_ci(np.array([1.0, np.nan, 3.0]), n_boot=50)[0] == 2.0
    assert all(math.isnan(v) for v in M.bootstrap_ci(np.array([np.nan])))


def test_ratio_of_sums_and_its_interval():
    pairs = np.array([[2.0, 1.0], [4.0, 0.0], [2.0, 1.0]])  # (forward, reversed) per fact
    assert M.ratio_of_sums(pairs) == pytest.approx(2 / 8)
    est, lo, hi = M.bootstrap_ci(pairs, M.ratio_of_sums, n_boot=500)
    assert est == pytest.approx(0.25) and 0.0 <= lo <= est <= hi <= 0.5
    assert math.isnan(M.ratio_of_sums(np.array([[-1.0, 2.0]])))


# --------------------------------------------------------------------------- power law


def test_alpha_mle_and_ks_distance_hand_computed():
    tail = np.array([1.0, math.e, math.e ** 2])
    assert alpha_mle(tail, 1.0) == pytest.approx(1 + 3 / (0 + 1 + 2))
    # CDF 1 - 1/x at x = 1, 2 is 0, 0.5; the empirical steps are 0.5, 1.0 -> D = 0.5.
    assert ks_distance(np.array([1.0, 2.0]), 1.0, 2.0) == pytest.approx(0.5)


def test_power_law_tail_above_a_uniform_body_is_recovered():
    rng = np.random.default_rng(0)
    tail = sample_power_law(2000, 2.5, 1.0, rng)
    body = rng.uniform(0.05, 1.0, 3000)
    fit = fit_power_law(np.concatenate([body, tail, -tail]), n_boot=60, seed=0)  # negatives are ignored
    assert fit.alpha == pytest.approx(2.5, abs=0.12)
    assert 0.8 < fit.xmin < 1.5
    assert fit.n_tail == pytest.approx(2000, rel=0.25)
    assert fit.p_value > 0.1  # a true power-law tail is not rejected


def test_exponential_tail_is_rejected():
    x = np.random.default_rng(1).exponential(1.0, 4000)
    fit = fit_power_law(x, n_boot=60, seed=0)
    assert fit.p_value < 0.05


def test_power_law_needs_enough_positive_values():
    with pytest.raises(ValueError, match="at least 50"):
        fit_power_law(np.r_[np.ones(10), -np.ones(100)])


def test_block_shares_hand_computed():
    totals = {"blocks.0.mlp.fc_in": 2.0, "blocks.0.attn.qkv": 1.0, "blocks.1.mlp.fc_out": -1.0, "lm_head": 2.0}
    assert M.block_shares(totals, 2) == pytest.approx([3 / 4, -1 / 4])  # the head's share is in the total only
    assert all(math.isnan(v) for v in M.block_shares({"blocks.0.mlp.fc_in": 0.0}, 1))


def test_spearman_hand_computed():
    assert M.spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0])) == pytest.approx(0.5)
    assert M.spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([4.0, 3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert math.isnan(M.spearman(np.ones(3), np.arange(3.0)))
