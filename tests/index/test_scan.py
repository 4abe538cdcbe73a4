"""The index scan's blocked product against numpy: every stored dtype, blocks of columns
that do not divide the row (the last one overlapping), int4 of an odd width."""

import jax
import numpy as np
import pytest

from influence.index import source
from influence.index.compress import decode_numpy, encode_numpy


@pytest.fixture
def small_blocks(monkeypatch):
    """A block size of a few columns, so that one chunk is scanned in several blocks."""
    monkeypatch.setattr(source, "BLOCK_BYTES", 4 * 2 * 7 * 5)  # 5 int4 columns of 7 rows
    jax.clear_caches()  # the block size is read when the scan is traced
    yield
    jax.clear_caches()


@pytest.mark.parametrize("dtype", ["int4", "int8", "bfloat16", "float32"])
@pytest.mark.parametrize("n_query", [1, 3])
def test_blocked_scan_equals_numpy(small_blocks, dtype, n_query):
    rng = np.random.default_rng(0)
    widths = (23, 8, 1)  # odd (int4's padding column), a whole number of blocks, a single column
    stored = [encode_numpy(rng.standard_normal((7, w)), dtype) for w in widths]
    keys = tuple(rng.standard_normal((n_query, w)).astype(np.float32) for w in widths)
    chunk = tuple(tuple(p for p in parts if p is not None) for parts in stored)
    per_layer = source._chunk_scores(keys, chunk, dtype=dtype, keep_layers=True, shapes=(None,) * len(widths))
    for i, (parts, key, w) in enumerate(zip(stored, keys, widths)):
        rows = decode_numpy(parts[0], parts[1] if len(parts) > 1 else None, dtype, w)
        expected = key.astype(np.float64) @ rows.astype(np.float64).T
        np.testing.assert_allclose(np.asarray(per_layer[i]), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    summed = source._chunk_scores(keys, chunk, dtype=dtype, keep_layers=False, shapes=(None,) * len(widths))
    np.testing.assert_allclose(np.asarray(summed[0]), np.asarray(per_layer).sum(0), rtol=1e-6, atol=1e-6)
