"""The integer codes of the index (int8, int4 packed two to a byte) checked with a decoder
written here in plain numpy from the documented format, not the library's own: numbers
in [-levels, levels] with levels 127 (int8) or 7 (int4), one float32 scale max|c|/levels
per row; int4 column j in the low nibble of byte j, column j + ⌈D/2⌉ in its high nibble,
two's complement. decode(encode(c)) must be within scale/2 of c everywhere, at each row's
largest positive and most negative entries included (where an off-by-one level wraps)."""

import jax.numpy as jnp
import numpy as np
import pytest

from influence.index.compress import decode, decode_numpy, encode, encode_numpy

LEVELS = {"int8": 127, "int4": 7}


def _nibble(n: np.ndarray) -> np.ndarray:
    """4-bit two's complement, by hand: 0..7 → 0..7, 8..15 → -8..-1."""
    n = n.astype(np.int64)
    return np.where(n >= 8, n - 16, n)


def reference_decode(data: np.ndarray, scale: np.ndarray, dtype: str, width: int) -> np.ndarray:
    data = np.asarray(data)
    if dtype == "int8":
        ints = data.view(np.int8).astype(np.int64)
    else:
        raw = data.astype(np.uint8).astype(np.int64)
        ints = np.concatenate([_nibble(raw & 0xF), _nibble(raw >> 4)], axis=1)
    return (ints[:, :width] * np.asarray(scale, np.float64)[:, None]).astype(np.float64)


def _rows(rng) -> np.ndarray:
    c = rng.normal(size=(6, 9)).astype(np.float32)  # odd width: int4's padding column is exercised
    c[0] = [0.5, -0.2, 1.0, 0.1, 0, 0, 0, 0, 0]  # the issue's example: its maximum is positive
    c[1] = -c[0]  # ... and negative
    c[2, 4] = 0.0
    c[3] *= 1e-3
    return c


@pytest.mark.parametrize("dtype", ["int4", "int8"])
@pytest.mark.parametrize("backend", ["jax", "numpy"])
def test_integer_codes_round_trip_within_half_a_step(dtype, backend):
    c = _rows(np.random.default_rng(0))
    data, scale = (encode(jnp.asarray(c), dtype) if backend == "jax" else encode_numpy(c, dtype))
    data, scale = np.asarray(data), np.asarray(scale)
    width = c.shape[1]
    # The stored scale is the documented max|c| / levels.
    np.testing.assert_allclose(scale, np.abs(c).max(axis=1) / LEVELS[dtype], rtol=1e-6)
    got = reference_decode(data, scale, dtype, width)
    bound = scale[:, None] / 2 * (1 + 1e-5) + 1e-12
    assert np.all(np.abs(got - c) <= bound), np.abs(got - c).max()
    # Each row's largest |c| is ±levels × scale exactly: where a level too many wraps
    # around (rows 0 and 1 have it positive and negative).
    rows, extreme = np.arange(len(c)), np.argmax(np.abs(c), axis=1)
    assert c[0, extreme[0]] > 0 > c[1, extreme[1]]
    np.testing.assert_allclose(got[rows, extreme], c[rows, extreme], rtol=1e-5, atol=1e-12)
    # The library's decoders agree with this one.
    np.testing.assert_allclose(decode_numpy(data, scale, dtype, width), got, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(np.asarray(decode((jnp.asarray(data), jnp.asarray(scale)), dtype))[:, :width], got,
                               rtol=1e-6, atol=1e-12)


def test_the_issues_int4_example_decodes_to_itself():
    c = np.array([[0.5, -0.2, 1.0, 0.1]], np.float32)
    data, scale = encode_numpy(c, "int4")
    got = reference_decode(data, scale, "int4", 4)
    # levels 7, scale 1/7: every number within 1/14 of its value, the largest exactly
    # (with 8 levels, +8 would wrap to -8 in four bits: 1.0 would come back as -1.0).
    assert np.all(np.abs(got - c) <= 1 / 14 + 1e-6) and got[0, 2] == pytest.approx(1.0, rel=1e-6)
