"""The run-based commands end to end on a tiny language model: fit, query, demo."""

import json
import shutil

import pytest

from influence.cli import main
from influence.lm.run import factors_dir
from tests.cli.conftest import SCENES


@pytest.fixture(scope="module")
def run_dir(trained_run, tmp_path_factory):
    """The session's trained run (tests/cli/conftest.py), copied: these tests fit into it."""
    out = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(trained_run, out)
    return out


def test_query_without_factors_says_how_to_fit_them(run_dir, capsys):
    code = main(["query", "--run", str(run_dir), "--prompt", "MACBETH:\\n", "--completion", "Is this a dagger",
                 "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no ekfac factors" in err and f"influence fit --run {run_dir} --strategy ekfac --layers mlp" in err


def test_fit_then_query_writes_reports(run_dir, tmp_path, capsys):
    assert main(["fit", "--run", str(run_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "fitted ekfac" in out and "blocks.0.mlp.fc_in" in out and "starting: " in out
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


def test_demo_end_to_end_and_reuse(tmp_path, capsys, monkeypatch):
    import importlib

    # The demo reads the whole play: its first scenes take every step of the demo, faster.
    train_module = importlib.import_module("influence.lm.train")  # influence.lm.train is also a function
    real = train_module.load_corpus
    monkeypatch.setattr(train_module, "load_corpus", lambda spec: real(spec)[:SCENES])
    args = ["demo", "--out", str(tmp_path / "demo"), "--plays", "macbeth", "--scale", "tiny", "--tokens", "12000",
            "--vocab-size", "300", "-k", "2", "--quiet"]
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "witches", "prompt": "ALL:\\n", "completion": "Double, double toil and trouble"}\n')
    assert main([*args, "--queries", str(queries)]) == 0
    out = capsys.readouterr().out
    assert "training a tiny model" in out and "fitted ekfac factors" in out and "== witches" in out
    report = tmp_path / "demo" / "report.html"
    assert report.stat().st_size > 5000
    assert out.count(str(report)) == 1  # the report's path, once
    # Again, with the built-in queries: the model and factors are reused, and the queries,
    # which do not fit the tiny model's 32-token context, are refused.
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "reusing the trained model" in captured.out and "reusing ekfac factors" in captured.out
    assert "exceed the model's context of 32 tokens" in captured.err


def test_fit_options_blocks_and_devices(run_dir, capsys):
    args = ["fit", "--run", str(run_dir), "--strategy", "kfac", "--blocks", "2", "--devices", "1", "--quiet"]
    assert main(args) == 0
    assert "fitted kfac" in capsys.readouterr().out
    folder = factors_dir(run_dir, "kfac", "mlp", blocks=2)
    assert folder.name.startswith("kfac-mlp-")
    # the resume checkpoint is cleaned up; the settings stay beside the factors
    assert sorted(p.name for p in folder.iterdir()) == ["factors.npz", "settings.json"]
    code = main(["query", "--run", str(run_dir), "--strategy", "kfac", "--prompt", "MACBETH:\\n",
                 "--completion", "So foul and fair", "-k", "2", "--devices", "1", "--quiet"])
    assert code == 0 and "scored 1 queries" in capsys.readouterr().out


def _query(run_dir, *extra):
    return main(["query", "--run", str(run_dir), "--prompt", "MACBETH:\\n", "--completion", "So foul", "-k", "2",
                 "--quiet", *extra])


def test_factors_are_keyed_by_every_setting(run_dir, capsys, monkeypatch):
    import jax

    import influence.lm.run as lm_run
    from influence.factors import Factors

    # kfac on 8 sequences: one cheap pass per fit; the folder key does not depend on the strategy.
    fit = ["fit", "--run", str(run_dir), "--quiet", "--strategy", "kfac", "--max-sequences", "8"]
    assert main([*fit, "--layers", "mlp.fc_in"]) == 0
    capsys.readouterr()
    # Another selection that sanitises to the same characters: a new fit (queried below).
    assert main([*fit, "--layers", "mlp|fc_in"]) == 0
    assert "fitted kfac" in capsys.readouterr().out
    # Another Fisher, seed or data: new fits, each given its setting. The fit itself is
    # recorded, not run (this test is about the keys; the fits are tested elsewhere): it
    # returns the factors above, which the command saves in the new folder.
    fitted = Factors.load(factors_dir(run_dir, "kfac", "mlp.fc_in", max_sequences=8))
    calls = []

    def recorded(model, task, train, **kwargs):
        calls.append((len(train), kwargs["fisher"], jax.random.key_data(kwargs["key"]).tolist()))
        return fitted

    with monkeypatch.context() as m:
        m.setattr(lm_run, "fit_factors", recorded)
        for other in (["--fisher", "empirical"], ["--seed", "1"], ["--max-sequences", "4"]):
            assert main([*fit, "--layers", "mlp.fc_in", *other]) == 0
            assert "fitted kfac" in capsys.readouterr().out, other
    key = [jax.random.key_data(jax.random.key(seed)).tolist() for seed in (0, 1)]
    assert calls == [(8, "empirical", key[0]), (8, "sampled", key[1]), (4, "sampled", key[0])]
    assert main([*fit, "--layers", "mlp.fc_in"]) == 0
    assert "already fitted" in capsys.readouterr().out
    folder = factors_dir(run_dir, "kfac", "mlp.fc_in", max_sequences=8)
    settings = json.loads((folder / "settings.json").read_text())
    assert settings == {"strategy": "kfac", "layers": "mlp.fc_in", "fisher": "sampled", "seed": 0, "sequences": 8,
                        "blocks": None, "factor_dtype": "float32", "step": settings["step"],
                        "weights_digest": settings["weights_digest"]}
    assert folder.name.startswith("kfac-mlp_fc_in-") and folder != factors_dir(run_dir, "kfac", "mlp|fc_in",
                                                                               max_sequences=8)
    # Several sets for these layers, none with the default settings: query lists them, uses none.
    assert _query(run_dir, "--strategy", "kfac", "--layers", "mlp.fc_in") == 2
    err = capsys.readouterr().err
    assert "4 sets of kfac factors for layers 'mlp.fc_in'" in err and f"--factors {folder.name}" in err
    assert f"influence fit --run {run_dir} --strategy kfac --layers mlp.fc_in" in err
    assert _query(run_dir, "--strategy", "kfac", "--layers", "mlp.fc_in", "--factors", folder.name) == 0
    assert f"using the factors in {folder}" in capsys.readouterr().out
    # One set only: used, and named.
    assert _query(run_dir, "--strategy", "kfac", "--layers", "mlp|fc_in") == 0
    assert "using the only kfac factors fitted for layers 'mlp|fc_in': fisher=sampled" in capsys.readouterr().out
    # A folder whose settings.json says something else is refused, not reused.
    (folder / "settings.json").write_text(json.dumps({**settings, "fisher": "empirical"}))
    assert main([*fit, "--layers", "mlp.fc_in"]) == 2
    assert "is not the settings asked for" in capsys.readouterr().err


def test_old_style_factors_folder_is_not_reused(run_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("factors"))
    assert main(["fit", "--run", str(run), "--quiet", "--strategy", "kfac", "--max-sequences", "8"]) == 0
    new = factors_dir(run, "kfac", "mlp", max_sequences=8)
    (new / "settings.json").unlink()
    new.rename(run / "factors" / "kfac-mlp")  # the layout of earlier versions
    capsys.readouterr()
    assert _query(run, "--strategy", "kfac") == 2
    err = capsys.readouterr().err
    assert "kfac-mlp: factors without the settings.json" in err and "unless chosen with --factors kfac-mlp" in err
    assert f"fit them again with:\n  influence fit --run {run} --strategy kfac --layers mlp" in err
    # Chosen by name they are used, with a note that what they were fitted with is unknown.
    assert _query(run, "--strategy", "kfac", "--factors", "kfac-mlp") == 0
    assert "kfac-mlp, which has no settings.json" in capsys.readouterr().out


def test_scale_experiment_factors_say_what_they_hold_and_the_cli_offers_them(run_dir, tmp_path, capsys):
    """experiments.scale_runs.fit writes settings.json (layers '\\.mlp\\.', the weights' step):
    a query for the CLI's default layer selection names them as a --factors choice, and
    factors of another checkpoint's weights are refused."""
    import shutil

    from experiments import scale_runs
    from influence.lm import load_run
    from influence.lm.run import factor_settings, read_settings

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("factors"))
    loaded = load_run(run)
    scale_runs.fit(run, loaded, "mlp", r"\.mlp\.", 0, lambda *a: None)
    assert read_settings(run / "factors" / "ekfac-mlp") == factor_settings(run, "ekfac", r"\.mlp\.",
                                                                           step=loaded.step)
    capsys.readouterr()
    assert _query(run) == 2
    err = capsys.readouterr().err
    assert "--factors ekfac-mlp   (layers '\\.mlp\\.'" in err
    assert _query(run, "--factors", "ekfac-mlp") == 0
    assert f"using the factors in {run / 'factors' / 'ekfac-mlp'} (fisher=sampled" in capsys.readouterr().out
    settings = run / "factors" / "ekfac-mlp" / "settings.json"  # as a mid-training checkpoint's factors say
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "step": loaded.step - 1}))
    assert _query(run, "--factors", "ekfac-mlp") == 2
    assert f"were fitted on the weights of step {loaded.step - 1}" in capsys.readouterr().err


def test_interrupted_fit_can_be_restarted(run_dir, monkeypatch, capsys):
    import influence.lm.run as lm_run
    from influence.runtime.checkpoint import Checkpoint

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    fit = ["fit", "--run", str(run_dir), "--quiet", "--max-sequences", "8", "--strategy", "kfac"]
    with monkeypatch.context() as m:
        m.setattr(lm_run, "fit_factors", interrupted)
        assert main(fit) == 130
    assert capsys.readouterr().err.strip() == ("influence fit: error: interrupted; running the same command again "
                                               "resumes the fit from its checkpoint")
    # A snapshot left by a fit of these settings with another batch size blocks a resume, not a restart.
    checkpoint = factors_dir(run_dir, "kfac", "mlp", max_sequences=8) / "checkpoint"
    Checkpoint(checkpoint, "factors", {"batch_size": 4}).save((0, 1), {}, {})
    assert main(fit) == 2
    out, err = capsys.readouterr()
    assert f"resuming from {checkpoint}" in out
    assert "holds a factors checkpoint of another run" in err and "add --restart" in err
    assert "resume=False" not in err
    assert main([*fit, "--restart"]) == 0
    assert "fitted kfac" in capsys.readouterr().out and not checkpoint.exists()
    Checkpoint(checkpoint, "factors", {"batch_size": 4}).save((0, 1), {}, {})
    assert main([*fit, "--force"]) == 0  # --force refits, and so discards the checkpoint too
    assert "fitted kfac" in capsys.readouterr().out and not checkpoint.exists()


def test_wrongly_typed_queries_are_refused(run_dir, tmp_path, capsys):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"prompt": 123, "completion": null}\n')
    assert main(["query", "--run", str(run_dir), "--queries", str(queries), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (f"influence query: error: {queries}:1: 'prompt' must be a string, "
                                               "got int 123")


def test_outputs_are_checked_before_any_work(run_dir, tmp_path, capsys):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    missing_run = str(tmp_path / "no-run")  # would fail later: the output is checked first
    cases = [
        (["query", "--run", missing_run, "--prompt", "A", "--completion", "b", "--html", str(folder)],
         f"--html {folder} is a folder; give a file name"),
        (["query", "--run", missing_run, "--prompt", "A", "--completion", "b", "--json", str(a_file / "r.json")],
         f"--json {a_file / 'r.json'}: {a_file} is a file, not a folder"),
        (["query", "--run", missing_run, "--prompt", "A", "--completion", "b", "--scores", str(folder)],
         f"--scores {folder} is a folder"),
        (["digits", "--out", str(a_file), "--quiet"], f"--out {a_file} is a file; give a folder"),
        (["train", "--scale", "tiny", "--out", str(a_file / "run")], f"{a_file} is a file, not a folder"),
        (["demo", "--out", str(a_file), "--quiet"], f"--out {a_file} is a file; give a folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"influence {argv[0]}: error: ") and message in err and err.count("\n") == 1, err


def test_library_errors_are_one_line_and_tracebacks_need_debug(run_dir, tmp_path, capsys):
    assert main(["fit", "--run", str(run_dir), "--layers", "mlp(", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        "influence fit: error: --layers 'mlp(' is not a valid regular expression: missing ), unterminated")
    assert main(["query", "--run", str(run_dir), "--queries", str(tmp_path), "--quiet"]) == 2  # IsADirectoryError
    err = capsys.readouterr().err
    assert err.startswith("influence query: error: [Errno 21] Is a directory") and err.count("\n") == 1
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert main(["query", "--run", str(a_file / "run"), "--queries", str(a_file / "q"), "--quiet"]) == 2
    assert "Not a directory" in capsys.readouterr().err  # NotADirectoryError
    with pytest.raises(ValueError, match="not a valid regular expression"):
        main(["fit", "--run", str(run_dir), "--layers", "mlp(", "--debug"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        main(["--debug", "fit", "--run", str(run_dir), "--layers", "mlp("])


def test_query_on_a_model_with_nan_weights_fails(run_dir, monkeypatch, capsys):
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import influence.lm.run as lm_run

    main(["fit", "--run", str(run_dir), "--quiet"])
    capsys.readouterr()
    real = lm_run.load_run

    def nan_weights(path, step=None):
        run = real(path, step)
        graphdef, params, rest = nnx.split(run.model, nnx.Param, ...)
        return dataclasses.replace(run, model=nnx.merge(graphdef, jax.tree.map(lambda p: p * jnp.nan, params), rest))

    monkeypatch.setattr(lm_run, "load_run", nan_weights)
    assert _query(run_dir, "--html", str(run_dir / "nan.html")) == 3
    captured = capsys.readouterr()
    assert "influence query: error: query 0: the completion's loss is nan" in captured.err
    assert "rank" not in captured.out and not (run_dir / "nan.html").exists()
