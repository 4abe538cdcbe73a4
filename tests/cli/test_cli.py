"""The command line: --help explains itself; the demo runs end to end."""

import subprocess
import sys

import numpy as np

import influence as inf
from influence.cli import build_parser, main


def test_help_lists_commands():
    text = build_parser().format_help()
    for command in ("demo", "train", "fit", "query", "digits"):
        assert command in text
    result = subprocess.run([sys.executable, "-m", "influence", "digits", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--strategy" in result.stdout and "digits" in result.stdout


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
