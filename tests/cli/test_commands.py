"""The run-based commands end to end on a tiny language model: fit, query, demo."""

import json

import pytest

from influence.cli import main
from influence.lm import Trainer
from tests.lm.helpers import tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    Trainer(tiny_config(corpus="shakespeare:macbeth"), out).run(progress=False)
    return out


def test_query_without_factors_says_how_to_fit_them(run_dir, capsys):
    code = main(["query", "--run", str(run_dir), "--prompt", "MACBETH:\\n", "--completion", "Is this a dagger", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no ekfac factors" in err and f"influence fit --run {run_dir} --strategy ekfac --layers mlp" in err


def test_fit_then_query_writes_reports(run_dir, tmp_path, capsys):
    assert main(["fit", "--run", str(run_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "fitted ekfac" in out and "blocks.0.mlp.fc_in" in out
    assert main(["fit", "--run", str(run_dir), "--quiet"]) == 0
    assert "already fitted" in capsys.readouterr().out
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "dagger", "prompt": "MACBETH:\\n", "completion": "Is this a dagger which I see"}\n'
                       '{"prompt": "LADY MACBETH:\\n", "completion": "Out, damned spot!"}\n')
    code = main(["query", "--run", str(run_dir), "--queries", str(queries), "-k", "3", "--quiet",
                 "--html", str(tmp_path / "r.html"), "--json", str(tmp_path / "r.json"), "--query-rank", "4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "== dagger" in out and "Macbeth" in out
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [len(r["influences"]) for r in results] == [3, 3]
    assert results[0]["influences"][0]["metadata"]["title"] == "Macbeth"
    page = (tmp_path / "r.html").read_text()
    assert page.count('<div class="seq">') == 6 and "dagger" in page


def test_query_errors_are_clear(run_dir, capsys):
    main(["fit", "--run", str(run_dir), "--quiet"])
    capsys.readouterr()
    long = "word " * 100
    assert main(["query", "--run", str(run_dir), "--prompt", long, "--completion", "x", "--quiet"]) == 2
    assert "exceed the model's context of 32 tokens" in capsys.readouterr().err
    assert main(["query", "--run", str(run_dir), "--prompt", "A", "--completion", "", "--quiet"]) == 2
    assert "completion is empty" in capsys.readouterr().err
    assert main(["query", "--run", str(run_dir / "missing"), "--prompt", "A", "--completion", "b"]) == 2
    assert "not a training run" in capsys.readouterr().err
    assert main(["query", "--run", str(run_dir), "--prompt", "A", "--quiet"]) == 2
    assert "--prompt needs --completion" in capsys.readouterr().err


def test_demo_end_to_end_and_reuse(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path / "demo"), "--plays", "macbeth", "--scale", "tiny", "--tokens", "12000",
            "--vocab-size", "300", "-k", "2", "--quiet"]
    assert main(args) == 2  # the built-in queries do not fit the tiny model's 32-token context
    assert "exceed the model's context of 32 tokens" in capsys.readouterr().err
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "witches", "prompt": "ALL:\\n", "completion": "Double, double toil and trouble"}\n')
    args += ["--queries", str(queries)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "reusing the trained model" in out and "== witches" in out
    assert (tmp_path / "demo" / "report.html").stat().st_size > 5000
    assert main(args) == 0
    assert "reusing ekfac factors" in capsys.readouterr().out


def test_fit_options_blocks_and_devices(run_dir, capsys):
    args = ["fit", "--run", str(run_dir), "--strategy", "kfac", "--blocks", "2", "--devices", "1", "--quiet"]
    assert main(args) == 0
    assert "fitted kfac" in capsys.readouterr().out
    folder = run_dir / "factors" / "kfac-mlp"
    assert sorted(p.name for p in folder.iterdir()) == ["factors.npz"]  # the resume checkpoint is cleaned up
    code = main(["query", "--run", str(run_dir), "--strategy", "kfac", "--prompt", "MACBETH:\\n",
                 "--completion", "So foul and fair", "-k", "2", "--devices", "1", "--quiet"])
    assert code == 0 and "scored 1 queries" in capsys.readouterr().out
