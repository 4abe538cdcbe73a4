"""Persistence of factors and scores: round trips, atomicity, clear errors."""

import os

import numpy as np
import pytest
from flax import nnx

import influence as inf
from influence import tasks
from influence.runtime import io
from influence.runtime.io import FileFormatError
from influence.testing import MLP, trained_mlp


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


def _rewritten(tmp_path, factors, edit):
    """A factors file whose arrays or header ``edit(arrays, metadata)`` changed, written with
    a checksum that matches: only the structure checks of ``Factors.load`` can catch it."""
    arrays, metadata = io.load_arrays(factors.save(tmp_path / "good.npz"), "influence-factors")
    edit(arrays, metadata)
    io.save_arrays(tmp_path / "edited.npz", "influence-factors", arrays, metadata)
    return tmp_path / "edited.npz"


@pytest.mark.parametrize("key", ["strategy", "layers"])
def test_header_without_strategy_or_layers_is_a_file_format_error(tmp_path, fitted, key):
    *_, factors = fitted
    path = _rewritten(tmp_path, factors, lambda arrays, metadata: metadata.pop(key))
    with pytest.raises(FileFormatError, match=f"the header has no '{key}'"):
        inf.Factors.load(path)


def test_wrong_shape_missing_or_unexpected_array_is_named(tmp_path, fitted):
    *_, factors = fitted

    def shorter(arrays, metadata):
        arrays["l1/q_a"] = arrays["l1/q_a"][:-1]

    with pytest.raises(FileFormatError,
                       match=r"array 'l1/q_a' has shape \(64, 65\), expected \(65, 65\) for its layer"):
        inf.Factors.load(_rewritten(tmp_path, factors, shorter))
    with pytest.raises(FileFormatError, match=r"array 'l2/eigenvalues' is missing \(ekfac factors need it\)"):
        inf.Factors.load(_rewritten(tmp_path, factors, lambda arrays, metadata: arrays.pop("l2/eigenvalues")))

    def extra(arrays, metadata):
        arrays["l3/q_a"] = np.eye(3, dtype=np.float32)

    with pytest.raises(FileFormatError, match="unexpected array 'l3/q_a'"):
        inf.Factors.load(_rewritten(tmp_path, factors, extra))

    def unknown(arrays, metadata):
        metadata["strategy"] = "tracin"

    with pytest.raises(FileFormatError, match="unknown strategy 'tracin' in the header"):
        inf.Factors.load(_rewritten(tmp_path, factors, unknown))


def test_blocked_factors_check_each_block(tmp_path, fitted):
    model, data, _, _ = fitted
    factors = inf.fit_factors(model, tasks.Classification(), data, strategy="kfac", blocks={"l1": (2, 1)},
                              progress=False)
    loaded = inf.Factors.load(factors.save(tmp_path / "blocked.npz"))
    assert [b.shape for b in loaded.layers["l1"].q_a] == [(33, 33), (32, 32)]
    assert [b.shape for b in loaded.layers["l1"].q_s] == [(16, 16)]  # a split layer keeps one block on its other side

    def swapped(arrays, metadata):
        arrays["l1/q_a/0"], arrays["l1/q_a/1"] = arrays["l1/q_a/1"], arrays["l1/q_a/0"]

    with pytest.raises(FileFormatError, match=r"array 'l1/q_a/0' has shape \(32, 32\), expected \(33, 33\)"):
        inf.Factors.load(_rewritten(tmp_path, factors, swapped))


def test_scores_file_with_inconsistent_arrays_is_a_file_format_error(tmp_path):
    path = tmp_path / "s.npz"
    io.save_arrays(path, "influence-scores", {"values": np.zeros((2, 3), np.float32),
                                              "per_layer/l1": np.zeros((2, 4), np.float32)}, {})
    with pytest.raises(FileFormatError, match=r"'per_layer/l1' has shape \(2, 4\), expected \(2, 3\)"):
        inf.Scores.load(path)
    io.save_arrays(path, "influence-scores", {"scores": np.zeros((2, 3), np.float32)}, {})
    with pytest.raises(FileFormatError, match="array 'values' is missing"):
        inf.Scores.load(path)


def test_files_and_folders_get_the_umask_not_owner_only_permissions(tmp_path, fitted):
    *_, factors = fitted
    old = os.umask(0o027)
    try:
        path = factors.save(tmp_path / "f.npz")
        with io.atomic_path(tmp_path / "folder", directory=True) as tmp:
            (tmp / "inside").write_text("x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o750
