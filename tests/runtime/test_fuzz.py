"""Random bit flips and truncations of a factors file and of a scores file: every
damaged file raises FileFormatError or loads exactly the data written (a flip in a
byte the readers ignore), never different data and never another exception."""

import collections
import io as _io
import zipfile

import numpy as np
import pytest

import influence as inf
from influence.curvature import LayerCurvature
from influence.runtime.io import FileFormatError

N_DAMAGED = 800  # per file: ~40% flips in the zip and .npy headers, ~45% anywhere, ~15% truncations


def _orthogonal(rng, d):
    return np.linalg.qr(rng.normal(size=(d, d)))[0].astype(np.float32)


def _factors() -> inf.Factors:
    """Small EK-FAC factors, one dense layer and one split into blocks (no fit needed).
    Some arrays exceed zipfile's 4 KiB read-ahead, so numpy parses their .npy headers
    before the zip CRC is checked (in a small member the CRC catches every flip first)."""
    rng = np.random.default_rng(0)

    def layer(d_a, d_out, a_blocks=None):
        q_a = tuple(_orthogonal(rng, m) for m in a_blocks) if a_blocks else _orthogonal(rng, d_a)
        q_s = (_orthogonal(rng, d_out),) if a_blocks else _orthogonal(rng, d_out)
        return LayerCurvature(q_a, q_s, rng.random((d_a, d_out), np.float32), rng.random(d_a, np.float32),
                              rng.random(d_out, np.float32))

    metadata = {"layers": [{"name": "l1", "d_in": 32, "d_out": 40, "has_bias": True},
                           {"name": "l2", "d_in": 4, "d_out": 3, "has_bias": False}],
                "blocks": {"l2": {"a": [0, 2, 4], "s": [0, 3]}}, "fisher": "sampled", "dtype": "float32",
                "n_examples": 10, "n_tokens": None, "fingerprint": "f"}
    return inf.Factors("ekfac", {"l1": layer(33, 40), "l2": layer(4, 3, (2, 2))}, metadata)


def _structure(raw: bytes) -> np.ndarray:
    """Byte offsets of the zip local headers (with each member's .npy header after them)
    and of the central directory: where a flip reaches the readers' parsing code."""
    spots = []
    for info in zipfile.ZipFile(_io.BytesIO(raw)).infolist():
        spots.extend(range(info.header_offset, min(len(raw), info.header_offset + 30 + len(info.filename) + 128)))
    spots.extend(range(raw.find(b"PK\x01\x02"), len(raw)))
    return np.unique(spots)


def _fuzz(path, load, same, seed):
    raw = path.read_bytes()
    structure = _structure(raw)
    rng = np.random.default_rng(seed)
    damaged = path.with_name("damaged.npz")
    outcomes = collections.Counter()
    for _ in range(N_DAMAGED):
        r = rng.random()
        if r < 0.15:
            data = raw[: rng.integers(0, len(raw))]
        else:
            data = bytearray(raw)
            pos = rng.choice(structure) if r < 0.55 else rng.integers(0, len(raw))
            data[pos] ^= 1 << int(rng.integers(0, 8))
        damaged.write_bytes(bytes(data))
        try:
            loaded = load(damaged)
        except FileFormatError as e:
            outcomes[type(e.__cause__).__name__ if e.__cause__ is not None else "FileFormatError"] += 1
            continue
        assert same(loaded), f"a damaged file loaded different data (outcomes so far {dict(outcomes)})"
        outcomes["identical"] += 1
    return outcomes


def _check_outcomes(outcomes):
    # the fuzz reached the zip structure, the .npy headers and the payload: several kinds of
    # failure underneath, caught as FileFormatError, and some flips the readers ignore
    assert outcomes["identical"] > 0 and outcomes["BadZipFile"] > 0 and outcomes["FileFormatError"] > 0
    assert len(set(outcomes) - {"identical", "FileFormatError"}) >= 4, outcomes


def test_damaged_factors_files_raise_file_format_error_or_load_identical(tmp_path):
    factors = _factors()
    path = factors.save(tmp_path / "factors.npz")
    metadata = inf.Factors.load(path).metadata

    def same(loaded):
        if loaded.strategy != factors.strategy or loaded.metadata != metadata:
            return False
        for name, curv in factors.layers.items():
            for x, y in zip(curv, loaded.layers[name]):
                xs, ys = (x, y) if isinstance(x, tuple) else ((x,), (y,))
                if len(xs) != len(ys) or not all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(xs, ys)):
                    return False
        return True

    _check_outcomes(_fuzz(path, inf.Factors.load, same, seed=0))


@pytest.mark.parametrize("kind", [inf.Scores, inf.SelfScores])
def test_damaged_scores_files_raise_file_format_error_or_load_identical(tmp_path, kind):
    rng = np.random.default_rng(1)
    shape = (3, 400) if kind is inf.Scores else (1200,)  # over zipfile's 4 KiB read-ahead (see _factors)
    per_layer = {"l1": rng.normal(size=shape).astype(np.float32), "l2": rng.normal(size=shape).astype(np.float32)}
    scores = kind(per_layer["l1"] + per_layer["l2"], per_layer, {"strategy": "ekfac", "damping": {"l1": 0.1}})
    path = scores.save(tmp_path / "scores.npz")
    metadata = kind.load(path).metadata

    def same(loaded):
        return (type(loaded) is kind and np.array_equal(loaded.values, scores.values)
                and loaded.values.dtype == scores.values.dtype and set(loaded.per_layer) == set(per_layer)
                and all(np.array_equal(loaded.per_layer[k], v) for k, v in per_layer.items())
                and loaded.metadata == metadata)

    _check_outcomes(_fuzz(path, kind.load, same, seed=2))
