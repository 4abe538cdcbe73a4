"""Persistence of factors and scores: round trips, atomicity, clear errors."""

import os

import numpy as np
import pytest
from flax import nnx

import influence as inf
from influence import tasks
from influence.testing import MLP, trained_mlp
from influence.runtime.io import FileFormatError


@pytest.fixture(scope="module")
def fitted():
    model, data, queries = trained_mlp()
    factors = inf.fit_factors(model, tasks.Classification(), data, strategy="ekfac", progress=False)
    return model, data, queries, factors


def test_factors_round_trip_gives_identical_scores(tmp_path, fitted):
    model, data, queries, factors = fitted
    path = factors.save(tmp_path / "run" / "factors")
    assert path.name == "factors.npz" and path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["factors.npz"]  # no temp files left behind
    loaded = inf.Factors.load(tmp_path / "run" / "factors", model=model)
    assert loaded.strategy == "ekfac" and loaded.layer_names == factors.layer_names
    for key in ("n_examples", "fisher", "fingerprint", "layers", "n_tokens"):
        assert loaded.metadata[key] == factors.metadata[key]
    assert loaded.metadata["version"] == inf.__version__
    task = tasks.Classification()
    a = inf.pairwise_scores(model, task, factors, queries, data, progress=False).values
    b = inf.pairwise_scores(model, task, loaded, queries, data, progress=False).values
    np.testing.assert_array_equal(a, b)


def test_identity_factors_round_trip(tmp_path, fitted):
    model, data, _, _ = fitted
    factors = inf.fit_factors(model, tasks.Classification(), data, strategy="identity", progress=False)
    loaded = inf.Factors.load(factors.save(tmp_path / "f.npz"))
    assert loaded.strategy == "identity" and all(c.eigenvalues is None for c in loaded.layers.values())


def test_loading_into_another_model_is_refused(tmp_path, fitted):
    model, data, queries, factors = fitted
    factors.save(tmp_path)
    wider = MLP(hidden=32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="another structure"):
        inf.Factors.load(tmp_path, model=wider)
    with pytest.raises(ValueError, match="another structure"):
        inf.pairwise_scores(wider, tasks.Classification(), factors, queries, data, progress=False)


def test_truncated_corrupt_and_foreign_files_are_clear_errors(tmp_path, fitted):
    *_, factors = fitted
    path = factors.save(tmp_path / "good")
    raw = path.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FileFormatError, match="truncated or corrupt"):
        inf.Factors.load(tmp_path / "truncated.npz")
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    with pytest.raises(FileFormatError, match="not a file written by influence"):
        inf.Factors.load(tmp_path / "foreign.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(FileFormatError):
        inf.Factors.load(tmp_path / "text.npz")
    with pytest.raises(FileFormatError, match="no such file"):
        inf.Factors.load(tmp_path / "missing")
    scores = inf.Scores(np.zeros((2, 3), np.float32), None, {"strategy": "ekfac"})
    scores.save(tmp_path / "scores")
    with pytest.raises(FileFormatError, match="expected 'influence-factors'"):
        inf.Factors.load(tmp_path / "scores" / "scores.npz")


def test_flipped_byte_is_detected(tmp_path, fitted):
    *_, factors = fitted
    path = factors.save(tmp_path / "f.npz")
    raw = bytearray(path.read_bytes())
    # flip a byte in the middle of the array data (zip CRC or our checksum catches it)
    raw[len(raw) // 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(FileFormatError):
        inf.Factors.load(path)


def test_failed_write_keeps_the_previous_file(tmp_path, fitted, monkeypatch):
    *_, factors = fitted
    path = factors.save(tmp_path / "f.npz")
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        factors.save(tmp_path / "f.npz")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npz"]


def test_scores_round_trip_and_top_k(tmp_path, fitted):
    model, data, queries, factors = fitted
    scores = inf.pairwise_scores(model, tasks.Classification(), factors, queries, data, per_layer=True, progress=False)
    loaded = inf.Scores.load(scores.save(tmp_path / "scores"))
    np.testing.assert_array_equal(loaded.values, scores.values)
    assert set(loaded.per_layer) == set(scores.per_layer)
    assert loaded.metadata["strategy"] == "ekfac" and loaded.metadata["n_train"] == len(data["y"])
    idx, top = scores.top_k(5)
    np.testing.assert_array_equal(idx, np.argsort(-scores.values, axis=1)[:, :5])
    np.testing.assert_array_equal(top, np.sort(scores.values, axis=1)[:, ::-1][:, :5])
