"""inf.validate: rows and intervals per method and retraining, cache reuse, the top-k
check, and the `influence validate` command."""

import json

import numpy as np
import pytest

from influence.cli import main
from influence.cli.validate import digits_run
from influence.reference import lds
from influence.reference.validate import bootstrap_interval, validate


def test_bootstrap_interval_brackets_the_mean():
    values = np.random.default_rng(0).normal(0.5, 0.1, 40)
    low, high = bootstrap_interval(np.concatenate([values, [np.nan]]))
    assert low < values.mean() < high and high - low < 0.1


@pytest.mark.slow
def test_validate_rows_cache_and_top_k(tmp_path, monkeypatch):
    run, task, queries, key = digits_run(n_train=40, n_queries=4, steps=15)
    calls = []
    original = lds.retrained_measurements

    def counting(retrain, masks, seeds, cache=None, **kw):
        calls.append(len(cache.missing(list(range(len(masks))), list(seeds))) if cache is not None else -1)
        return original(retrain, masks, seeds, cache, **kw)

    monkeypatch.setattr("influence.reference.validate.retrained_measurements", counting)
    kwargs = dict(methods=("identity", "metagradient"), n_subsets=8, reseeds=(1,), top_k_fraction=0.05,
                  cache_dir=tmp_path, run_key=key, batch_size=20)
    result = validate(run, task, queries, **kwargs)
    assert [(r["method"], r["retraining"]) for r in result.rows] == [
        ("identity", "deterministic"), ("identity", "reseeded"),
        ("metagradient", "deterministic"), ("metagradient", "reseeded")]
    for row in result.rows:
        assert -1 <= row["low"] <= row["lds"] <= row["high"] <= 1
    assert set(result.cost) == {"identity", "metagradient"} and result.cost["metagradient"]["training_runs"] > 0
    assert result.top_k["metagradient"]["k"] == 2
    # removing each query's most helpful examples raises its loss more than random removals
    assert result.top_k["metagradient"]["top_k"] > result.top_k["metagradient"]["random"]
    assert "| metagradient |" in result.table()
    assert calls[:2] == [8, 8]  # the subsets were retrained once ...
    calls.clear()
    again = validate(run, task, queries, **kwargs)
    assert calls[:2] == [0, 0]  # ... and come from the cache the second time
    assert again.rows == result.rows


@pytest.mark.slow
def test_validate_command_digits(tmp_path, capsys):
    code = main(["validate", "--digits", "--n-train", "40", "--queries", "3", "--steps", "15", "--subsets", "6",
                 "--reseeds", "1", "--checkpoints", "2", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    for method in ("ekfac", "identity", "metagradient", "trajectory", "trackstar"):
        assert f"| {method} |" in out
    data = json.loads((tmp_path / "validate.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"ekfac", "identity", "metagradient", "trajectory", "trackstar"}
    assert (tmp_path / "validate.png").stat().st_size > 5_000 and (tmp_path / "validate.md").exists()


def test_validate_command_refuses_bad_arguments(tmp_path, capsys):
    assert main(["validate", "--out", str(tmp_path)]) == 2
    assert "either a run folder or --digits" in capsys.readouterr().err
    assert main(["validate", "--digits", "--methods", "ekfac,magic", "--out", str(tmp_path)]) == 2
    assert "unknown --methods ['magic']" in capsys.readouterr().err


@pytest.mark.slow
def test_validate_command_on_an_influence_train_run(tmp_path, capsys):
    """`influence validate RUN`: a subset of a trained LM run's sequences, retrained with its recipe."""
    from influence.lm import Trainer
    from tests.lm.helpers import docs, tiny_config

    run_dir = tmp_path / "run"
    Trainer(tiny_config(tokens=8 * 32 * 4), run_dir, docs()).run(progress=False)
    out = tmp_path / "out"
    code = main(["validate", str(run_dir), "--n-train", "16", "--queries", "2", "--steps", "4", "--subsets", "4",
                 "--reseeds", "1", "--methods", "identity,metagradient", "--top-k", "0", "--out", str(out),
                 "--quiet"])
    assert code == 0
    data = json.loads((out / "validate.json").read_text())
    assert data["settings"]["n_train"] == 16 and data["settings"]["steps"] == 4
    assert {r["method"] for r in data["rows"]} == {"identity", "metagradient"}
