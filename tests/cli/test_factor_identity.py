"""Factors are tied to the content of the weights they were fitted on (a SHA-256 in
settings.json), not only to the checkpoint's step, and to their strategy: stale or
mismatched factors are refused, never used silently."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from influence.cli import main
from influence.lm import checkpoint as ckpt
from influence.lm import load_run
from influence.lm.run import FACTORS, fitted_factors, weights_digest

FIT = ["--quiet", "--max-sequences", "8"]


@pytest.fixture
def run_dir(trained_run):
    """The session's trained run (tests/cli/conftest.py); each test copies it before writing."""
    return trained_run


def _query(run, *extra):
    return main(["query", "--run", str(run), "--prompt", "MACBETH:\\n", "--completion", "So foul", "-k", "2",
                 "--quiet", "--no-index", *extra])


def _overwrite_weights(run, scale: float) -> None:
    """Rewrite the newest checkpoint's weights in place, at the same step (as a user
    copying other weights over it would)."""
    loaded = load_run(run)
    _, params, _ = nnx.split(loaded.model, nnx.Param, ...)
    params = jax.tree_util.tree_map(lambda p: p * scale, params)
    ckpt.save_tree(ckpt.list_checkpoints(run / "checkpoints")[loaded.step] / "params.npz", params, ckpt.PARAMS_KIND)


def test_weights_digest_follows_content_not_file(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    step = load_run(run).step
    before = weights_digest(run, step)
    assert len(before) == 64 and int(before, 16) >= 0
    _overwrite_weights(run, 1.0)  # the same values written again: the same digest
    assert weights_digest(run, step) == before
    _overwrite_weights(run, 1.001)
    assert weights_digest(run, step) != before


def test_factors_of_overwritten_weights_are_refused(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["fit", "--run", str(run), "--strategy", "kfac", *FIT]) == 0
    (folder, settings), = fitted_factors(run)
    assert settings["weights_digest"] == weights_digest(run, load_run(run).step)
    assert _query(run, "--strategy", "kfac") == 0
    out = capsys.readouterr().out
    answered = json.dumps(settings["weights_digest"][:12])[1:-1]
    assert answered in out  # the note naming the factors used shows which weights they are of

    _overwrite_weights(run, 1.01)  # same step, other weights
    assert _query(run, "--strategy", "kfac") == 2
    err = capsys.readouterr().err
    assert "were fitted on other weights than the run's checkpoint" in err and "--force" in err
    assert _query(run, "--strategy", "kfac", "--factors", folder.name) == 2
    assert "were fitted on other weights" in capsys.readouterr().err
    assert main(["fit", "--run", str(run), "--strategy", "kfac", *FIT]) == 2  # not "already fitted"
    assert "is not the settings asked for" in capsys.readouterr().err
    assert main(["fit", "--run", str(run), "--strategy", "kfac", *FIT, "--force"]) == 0
    assert fitted_factors(run)[0][1]["weights_digest"] == weights_digest(run, load_run(run).step)


def test_a_strategy_that_does_not_match_the_chosen_factors_is_refused(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns(FACTORS))
    assert main(["fit", "--run", str(run), "--strategy", "ekfac", *FIT]) == 0
    (folder, _), = fitted_factors(run)
    capsys.readouterr()
    assert _query(run, "--strategy", "kfac", "--factors", folder.name) == 2
    err = capsys.readouterr().err
    assert f"--strategy kfac was asked for, but {folder} holds ekfac factors" in err
    # Without --strategy, the chosen folder decides (the default does not count as asked for).
    assert _query(run, "--factors", folder.name, "--json", str(tmp_path / "r.json")) == 0
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["info"]["strategy"] == "ekfac"
    assert written["info"]["weights digest"] == weights_digest(run, load_run(run).step)  # results say which weights
    assert np.isfinite([i["score"] for r in written["results"] for i in r["influences"]]).all()
