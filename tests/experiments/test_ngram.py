"""The Kneser-Ney baseline of the held-out loss (experiments/ngram.py): every conditional
is a distribution over the vocabulary, a hand-computed bigram value, and the orders rank
as they must on text with structure."""

import numpy as np
import pytest

from experiments.ngram import KneserNey


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_conditional_sums_to_one(order):
    rng = np.random.default_rng(order)
    windows = [rng.integers(0, 7, size=rng.integers(2, 30)) for _ in range(20)]
    lm = KneserNey(windows, order, vocab_size=9)  # tokens 7, 8 never seen
    for ctx in ([], [3], [1, 2], [8, 8, 8], list(windows[0][:5])):
        p = np.array([lm.prob(ctx, w) for w in range(9)])
        assert (p > 0).all() and p.sum() == pytest.approx(1.0, abs=1e-12)


def test_bigram_matches_the_formula_by_hand():
    # Windows "a b a c" and "b a": bigrams ab, ba, ac, ba; D = 0.5, vocabulary 4 (a..d = 0..3).
    lm = KneserNey([np.array([0, 1, 0, 2]), np.array([1, 0])], 2, vocab_size=4, discount=0.5)
    # Unigram continuation counts: a is preceded by {b} -> 1; b by {a} -> 1; c by {a} -> 1; total 3, types 3.
    # b starts a window too, but has a left context elsewhere, so its count stays 1.
    p_uni_a = (1 - 0.5) / 3 + 0.5 * 3 / 3 * 0.25
    # Context b: c(b a) = 2, c(b •) = 2, one type.
    assert lm.prob([1], 0) == pytest.approx((2 - 0.5) / 2 + 0.5 * 1 / 2 * p_uni_a)
    p_uni_d = 0.5 * 3 / 3 * 0.25
    assert lm.prob([1], 3) == pytest.approx(0.5 * 1 / 2 * p_uni_d)
    assert lm.prob([3], 0) == pytest.approx(p_uni_a)  # unseen context: the unigram's estimate


def test_higher_orders_fit_structured_text_better():
    rng = np.random.default_rng(0)
    phrase = [1, 5, 2, 7, 3, 6, 4]  # a repeated phrase with noise: context predicts the next token
    windows = [np.array([t if rng.random() > 0.1 else rng.integers(0, 8) for t in phrase * 4]) for _ in range(40)]
    held = windows[30:]
    nats = [KneserNey(windows[:30], n, 8).nats(held) for n in (1, 2, 3)]
    assert nats[0] > nats[1] + 0.5 and nats[1] >= nats[2] - 0.05
    with pytest.raises(ValueError, match="order"):
        KneserNey(windows, 0, 8)
