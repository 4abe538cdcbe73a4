"""The one consumer of score blocks (influence.scoring.blocks) against numpy: the running
top-k over blocks of any size, with candidates, ties and the score file."""

import jax.numpy as jnp
import numpy as np
import pytest

from influence.runtime.mesh import resolve_mesh
from influence.scoring.blocks import TopK, collect_scores


def _reference(scores, allowed, k):
    """Per query the ``k`` allowed rows of highest score, the lower row first on ties."""
    rows, values = [], []
    for s, a in zip(scores, allowed):
        order = sorted(np.flatnonzero(a), key=lambda r: (-s[r], r))[:k]
        rows.append(order + [-1] * (k - len(order)))
        values.append([s[r] for r in order] + [-np.inf] * (k - len(order)))
    return np.array(rows), np.array(values, np.float32)


def _blocks(scores, sizes, layers=1):
    start = 0
    for n in sizes:
        block = np.stack([scores[:, start:start + n] / layers] * layers)  # [L, Q, n], summing to the scores
        yield start, n, jnp.asarray(block)
        start += n


@pytest.mark.parametrize("with_candidates", [False, True])
def test_top_k_of_blocks_is_the_sorted_allowed_rows(with_candidates, tmp_path):
    rng = np.random.default_rng(0)
    n_query, n_rows, k = 3, 37, 5
    scores = rng.integers(-4, 5, (n_query, n_rows)).astype(np.float32)  # many ties
    candidates = [np.sort(rng.choice(n_rows, 9, replace=False)) for _ in range(n_query)] if with_candidates else None
    allowed = (np.ones_like(scores, bool) if candidates is None
               else np.stack([np.isin(np.arange(n_rows), c) for c in candidates]))
    top = TopK(k, n_query, n_query, resolve_mesh(None), n_rows=n_rows, candidates=candidates,
               scores_path=tmp_path / "all.npy")
    idx, values = top.consume(_blocks(scores, [8, 1, 13, 15], layers=2))
    expected_rows, expected_values = _reference(scores, allowed, k)
    np.testing.assert_array_equal(idx, expected_rows)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(np.load(tmp_path / "all.npy"), np.where(allowed, scores, -np.inf))


def test_a_failing_block_leaves_no_score_file(tmp_path):
    def failing():
        yield 0, 4, jnp.zeros((1, 2, 4))
        raise RuntimeError("interrupted")

    top = TopK(3, 2, 2, resolve_mesh(None), n_rows=8, scores_path=tmp_path / "all.npy")
    with pytest.raises(RuntimeError):
        top.consume(failing())
    assert list(tmp_path.iterdir()) == []


def test_collected_blocks_and_a_nan_row_is_named():
    from influence.scoring.finite import RowCheck

    scores = np.arange(2 * 10, dtype=np.float32).reshape(2, 10)
    np.testing.assert_array_equal(collect_scores(_blocks(scores, [4, 6]))[0], scores)
    scores[1, 6] = np.nan
    with pytest.raises(FloatingPointError, match="training row 6 is NaN/Inf: rebuild"):
        collect_scores(_blocks(scores, [4, 6]), RowCheck(1, advice="rebuild"))
