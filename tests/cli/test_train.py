"""The `influence train` sub-command: arguments, a tiny run end to end, clear errors."""

import argparse
import json

import pytest

from influence.cli import train as cli
from influence.lm import corpus
from tests.lm.helpers import docs


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=cli.__doc__)
    cli.configure(parser)
    return parser.parse_args(list(argv))


def test_help_describes_scales_and_example():
    parser = argparse.ArgumentParser(description=cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.configure(parser)
    text = parser.format_help()
    assert "--scale" in text and "influence train --scale small --out runs/small" in text
    with pytest.raises(SystemExit):
        parse("--scale", "tiny")  # --out is required


def test_tiny_run_on_local_files(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    for d in docs()[:6]:
        (folder / f"{d.doc_id.replace('/', '-')}.txt").write_text(d.text)
    args = parse("--scale", "tiny", "--out", str(tmp_path / "run"), "--corpus", str(folder), "--tokens", "2048",
                 "--vocab-size", "300", "--heldout-fraction", "0.2", "--quiet", "--prompt", "KING:")
    # Half the run first, as an interrupted run leaves it: the command says it resumes.
    from influence.lm.train import Trainer

    Trainer(cli.config_from_args(args), args.out).run(max_steps=4, progress=False)
    assert cli.run(args) == 0
    out, err = capsys.readouterr()
    assert "resuming from step 4 of 8" in err
    summary = json.loads(out[:out.rindex("}") + 1])
    assert summary["steps"] == 8 and summary["final_checkpoint"] == "checkpoints/step_0000008"
    assert "\nKING:" in out  # the prompt and its greedy continuation
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["train_config"]["corpus"] == str(folder) and info["tokenizer"]["vocab_size"] == 300
    # Same command again: finds the finished run and does no more steps.
    assert cli.run(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.split("\nKING:")[0])["steps"] == 8 and "already trained" in err


def test_errors_are_reported_not_raised(tmp_path, capsys, monkeypatch):
    assert cli.run(parse("--scale", "huge", "--out", str(tmp_path / "a"))) == 2
    assert "unknown scale 'huge'" in capsys.readouterr().err
    assert cli.run(parse("--scale", "tiny", "--out", str(tmp_path / "b"), "--corpus", str(tmp_path / "nope"))) == 2
    assert "unknown corpus" in capsys.readouterr().err
    monkeypatch.setattr(corpus, "FORTUNES_DIR", tmp_path / "no-fortunes")
    assert cli.run(parse("--scale", "tiny", "--out", str(tmp_path / "c"), "--corpus", "fortunes")) == 2
    assert capsys.readouterr().err.rstrip().endswith("apt-get install fortunes")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_registered_in_the_influence_command():
    import influence.cli

    assert influence.cli.COMMANDS["train"][0] == "influence.cli.train"
    assert callable(cli.configure) and callable(cli.run)
