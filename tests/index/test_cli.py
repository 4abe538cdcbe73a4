"""`influence index` then `influence query` end to end on a tiny run: the query answers
from the index (and says so), --no-index rescans, both give the same top sequences."""

import json

import pytest

from influence.cli import main
from influence.lm import Trainer
from tests.lm.helpers import tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # fewer steps than the CLI tests' run: only the index path is under test here
    Trainer(tiny_config(corpus="shakespeare:macbeth", tokens=8 * 32 * 12, eval_every=4, checkpoint_every=4),
            out).run(progress=False)
    assert main(["fit", "--run", str(out), "--quiet"]) == 0
    return out


def test_index_then_query_answers_from_it_and_no_index_rescans(run_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["index", "--run", str(run_dir), "--compression", "none", "--check", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "indexed" in out and "fidelity against a rescan" in out and "top-10 overlap 1.00" in out
    assert "starting: " in out
    assert main(["index", "--run", str(run_dir), "--compression", "none", "--quiet"]) == 0
    assert "already built" in capsys.readouterr().out
    query = ["query", "--run", str(run_dir), "--prompt", "MACBETH:\\n", "--completion", "Is this a dagger", "-k", "3",
             "--quiet"]
    assert main([*query, "--json", str(tmp_path / "index.json"), "--html", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    assert "answering from the index at" in out
    assert main([*query, "--no-index", "--json", str(tmp_path / "rescan.json")]) == 0
    assert "answering from the index" not in capsys.readouterr().out
    answered, rescanned = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("index", "rescan"))
    rows = [[i["row"] for i in r["influences"]] for r in answered["results"]]
    assert rows == [[i["row"] for i in r["influences"]] for r in rescanned["results"]]
    page = (tmp_path / "r.html").read_text()
    assert "answered by" in page and "top-10 overlap 1.00" in page
    assert main(["index", "--run", str(run_dir), "--compression", "nonsense", "--quiet"]) == 2
