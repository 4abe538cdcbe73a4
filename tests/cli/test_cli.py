"""The command line: --help explains itself; the demo runs end to end."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

import influence as inf
from influence.cli import COMMANDS, build_parser, main


def test_help_lists_commands():
    text = build_parser().format_help()
    for command in ("demo", "train", "fit", "query", "digits"):
        assert command in text
    result = subprocess.run([sys.executable, "-m", "influence", "digits", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--strategy" in result.stdout and "digits" in result.stdout


def test_every_command_has_help():
    parser = build_parser()
    for command, (module, _) in COMMANDS.items():
        with pytest.raises(SystemExit) as stop:
            parser.parse_args([command, "--help"])
        assert stop.value.code == 0 and module.startswith("influence.cli.")


def test_a_missing_extra_is_named_not_raised(monkeypatch, capsys):
    real = importlib.util.find_spec

    def without_sklearn(name, *args):
        return None if name == "sklearn" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_sklearn)
    assert "[needs pip install 'jax-influence[experiments]']" in " ".join(build_parser().format_help().split())
    assert main(["digits", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == ("influence digits needs scikit-learn: "
                                               "pip install 'jax-influence[experiments]'")


def test_a_command_whose_module_cannot_be_imported_is_still_listed(monkeypatch, tmp_path, capsys):
    (tmp_path / "needs_matplotlib_cmd.py").write_text("import matplotlib_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(COMMANDS, "plots", ("needs_matplotlib_cmd", "draw things"))
    assert "plots" in build_parser().format_help()
    assert main(["plots", "--any", "args"]) == 2
    assert "influence plots needs matplotlib_that_is_not_installed" in capsys.readouterr().err


def test_digits_demo_end_to_end(tmp_path, capsys):
    code = main(["digits", "--out", str(tmp_path), "--n-train", "150", "--steps", "60", "--queries", "2", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "top helpful training images" in out and "figure:" in out
    scores = inf.Scores.load(tmp_path / "scores")
    assert scores.values.shape == (2, 150) and np.all(np.isfinite(scores.values))
    factors = inf.Factors.load(tmp_path / "factors")
    assert factors.strategy == "ekfac" and factors.metadata["n_examples"] == 150
    assert (tmp_path / "influence.png").stat().st_size > 10_000
