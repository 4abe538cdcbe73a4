"""The score archive (experiments/archive.py): the scaled float16 format cannot overflow
and decodes every value finite, and v2's plain-float16 archive, whose overflowed entries
are ±inf, reads back with each entry restored from the results' top-k or declared lost."""

import json

import numpy as np
import pytest

from experiments.archive import REPAIRS, build_repairs, decode_rows, encode_rows, read_scores, write_scores
from experiments.render import V2_RESULTS
from influence.errors import DataError, FileFormatError

V2 = V2_RESULTS.parent


def _scores(rng, q=6, n=50):
    # Rows spanning 1e-3 to 1e9: plain float16 overflows above 65504, and loses the small rows.
    return rng.standard_normal((q, n)) * np.logspace(-3, 9, q)[:, None]


def test_scaled_float16_never_overflows_and_keeps_float16_precision(tmp_path):
    v = _scores(np.random.default_rng(0))
    with np.errstate(over="ignore"):
        assert np.isinf(v.astype(np.float16)).any()  # what v2's archive did
    m, e = encode_rows(v)
    assert m.dtype == np.float16 and e.dtype == np.int16 and e.shape == (6,)
    back = decode_rows(m, e)
    assert np.isfinite(back).all()
    # Within each row the error is float16's step at the row's scale: 2**-11 of the largest |value|.
    err = np.abs(back - v).max(axis=1) / np.abs(v).max(axis=1)
    assert (err <= 2.0 ** -11).all() and (err > 0).any()
    write_scores(tmp_path / "scores.npz", {"tiny-seed0-mlp": v})
    values, lost = read_scores(tmp_path)
    assert np.isfinite(values["tiny-seed0-mlp"]).all() and not lost["tiny-seed0-mlp"].any()
    np.testing.assert_allclose(values["tiny-seed0-mlp"], back)


def test_write_refuses_non_finite_scores(tmp_path):
    v = np.ones((2, 3))
    v[1, 2] = np.nan
    with pytest.raises(DataError, match="NaN or ±inf"):
        write_scores(tmp_path / "scores.npz", {"k": v})
    with pytest.raises(DataError, match=r"\[Q, N\]"):
        encode_rows(np.ones(3))


def test_legacy_float16_archive_is_repaired_from_the_top_k(tmp_path):
    a = np.zeros((2, 5), np.float16)
    a[0, 1], a[0, 3], a[1, 4] = np.inf, -np.inf, np.inf
    np.savez_compressed(tmp_path / "scores.npz", **{"tiny-seed0-mlp": a})
    results = {"runs": [{"scale": "tiny", "seed": 0, "variants": {"mlp": [
        {"top_rows": [1, 0], "top_scores": [70000.5, 0.0]}, {"top_rows": [0], "top_scores": [0.0]}]}}]}
    with pytest.raises(FileFormatError, match="±inf scores with no repair"):
        read_scores(tmp_path)
    rep = build_repairs(tmp_path / "scores.npz", results)
    assert rep["counts"] == {"restored": 1, "lost": 2}
    assert rep["lost"]["tiny-seed0-mlp"] == [[0, 3, -1], [1, 4, 1]]
    (tmp_path / REPAIRS).write_text(json.dumps(rep))
    values, lost = read_scores(tmp_path, verify=True)
    v, m = values["tiny-seed0-mlp"], lost["tiny-seed0-mlp"]
    assert v[0, 1] == np.float32(70000.5) and np.isnan(v[0, 3]) and np.isnan(v[1, 4])
    assert m.sum() == 2 and np.isfinite(v[~m]).all()
    np.savez_compressed(tmp_path / "scores.npz", **{"tiny-seed0-mlp": a[:1]})
    with pytest.raises(FileFormatError, match="another scores.npz"):
        read_scores(tmp_path, verify=True)


def test_v2_repairs_sidecar_matches_the_results():
    """Every restored value is the float32 top-k score of its query in results.json, and
    the sidecar stays small; one overflowed matrix, read back, is finite or declared lost."""
    rep = json.loads((V2 / REPAIRS).read_text())
    assert (V2 / REPAIRS).stat().st_size < 100_000
    results = json.loads((V2 / "results.json").read_text())
    recs = {f"{r['scale']}-seed{r['seed']}-mlp": r["variants"]["mlp"] for r in results["runs"]}
    for key, entries in rep["restored"].items():
        for q, row, value in entries:
            top = dict(zip(recs[key][q]["top_rows"], recs[key][q]["top_scores"]))
            assert top[row] == value and abs(value) > 65504
    for key, entries in rep["lost"].items():
        assert all(row not in recs[key][q]["top_rows"] for q, row, _ in entries)
    values, lost = read_scores(V2, ["small-seed2-mlp"])
    assert np.isfinite(values["small-seed2-mlp"][~lost["small-seed2-mlp"]]).all()
    assert len(rep["restored"]["small-seed2-mlp"]) == 26


@pytest.mark.slow
def test_every_v2_archived_value_is_finite_or_declared_lost():
    values, lost = read_scores(V2, verify=True)
    assert len(values) == 11
    assert sum(int(m.sum()) for m in lost.values()) == json.loads((V2 / REPAIRS).read_text())["counts"]["lost"]
    for key, v in values.items():
        assert np.isfinite(v[~lost[key]]).all() and np.isnan(v[lost[key]]).all(), key


@pytest.mark.slow
def test_recompute_reproduces_the_published_endpoints_and_its_file():
    from experiments.recompute import recompute
    from experiments.render import V2_RECOMPUTE
    from experiments.scale_v2 import _rounded

    rec = _rounded(recompute(V2, json.loads(V2_RESULTS.read_text())), 3)
    assert rec["verdicts_equal"] and rec["max_abs_diff"] < 0.02
    assert rec == json.loads(V2_RECOMPUTE.read_text())


def test_v2_runs_archive_their_scores_in_the_scaled_format(tmp_path):
    from experiments.scale_v2 import TINY, _archive_scores

    v = _scores(np.random.default_rng(1), q=3, n=7)
    (tmp_path / "tiny-seed0" / "scores").mkdir(parents=True)
    np.savez(tmp_path / "tiny-seed0" / "scores" / "mlp.npz", values=v)
    _archive_scores(TINY, tmp_path, [{"scale": "tiny", "seed": 0}, {"scale": "mini", "seed": 0}])  # mini: no scores
    values, lost = read_scores(tmp_path)
    assert list(values) == ["tiny-seed0-mlp"] and not lost["tiny-seed0-mlp"].any()
    np.testing.assert_allclose(values["tiny-seed0-mlp"], v, rtol=2.0 ** -11, atol=np.abs(v).max() * 2.0 ** -11)
