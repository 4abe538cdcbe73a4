"""`influence fit|index|query --model DIR --data PATH` end to end on a tiny GPT-2 that the
test writes in the Hugging Face format, with a JSONL corpus: the workspace is keyed by the
model's and data's fingerprints, --run reopens it, the query ranks source texts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

import influence.pretrained as hf
from influence.cli import main
from tests.helpers import PROVERBS, byte_level_bpe

DOCS = PROVERBS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    tok = byte_level_bpe(DOCS)
    arch = hf.ArchConfig(family="gpt2", model_type="gpt2", vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2,
                         n_heads=4, n_kv_heads=4, head_dim=8, d_mlp=64, context_length=32, norm="layernorm",
                         norm_eps=1e-5, activation="gelu_new", gated_mlp=False, parallel_residual=False,
                         tied_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True, bos_token_id=0,
                         eos_token_id=0)
    model_dir = hf.save_pretrained(hf.PretrainedLM(arch, rngs=nnx.Rngs(0)), root / "tiny-gpt2",
                                   tokenizer_json=tok.to_str())
    data = root / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return root, model_dir, data


@pytest.mark.slow  # two fit passes, a query and an attribution, each compiled: ~1 min on a loaded 2-core CPU
def test_fit_then_query_ranks_source_texts(checkpoint, capsys):
    root, model_dir, data = checkpoint
    source = ["--model", str(model_dir), "--data", str(data), "--workspaces", str(root / "ws"), "--seq-len", "16"]
    assert main(["fit", *source, "--layers", "mlp", "--quiet"]) == 0
    out = capsys.readouterr().out
    (workspace,) = (root / "ws").iterdir()
    assert workspace.name.startswith("tiny-gpt2-") and "__corpus.jsonl-" in workspace.name
    assert f"--run {workspace}" in out and "fitted ekfac" in out
    info = json.loads((workspace / "run.json").read_text())
    assert info["model"]["fingerprint"] == hf.fingerprint(model_dir) and info["data"]["documents"] == len(DOCS)
    # The same model and data reopen the same workspace (factors already there).
    assert main(["fit", *source, "--quiet"]) == 0
    assert "already fitted" in capsys.readouterr().out
    # An index of the workspace's training gradients answers the query below.
    assert main(["index", "--run", str(workspace), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "fidelity not measured" in out  # a corpus has no held-out split
    assert "chosen from a probe of" in out and "of the full bytes" in out  # the default says what it measured
    html, js = root / "report.html", root / "results.json"
    query = DOCS[2]
    assert main(["query", "--run", str(workspace), "--prompt", query[:9], "--completion", query[9:], "-k", "3",
                 "--html", str(html), "--json", str(js), "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = json.loads(js.read_text())
    assert "index" in str(results["info"]["answered by"])
    top = results["results"][0]["influences"]
    assert len(top) == 3
    texts = [t["text"] for t in top]
    assert all(any(t in d for d in DOCS) for t in texts)  # source text, from the corpus' own characters
    assert all(t["metadata"]["doc_id"].startswith("corpus.jsonl:") for t in top)
    # The query's own text is among the most influential sequences of a random-weight model.
    assert any("to be or not" in t for t in texts), texts
    assert "corpus.jsonl:2" in html.read_text() and "corpus.jsonl:" in printed


def test_workspace_opens_as_a_run(checkpoint, tmp_path):
    from influence.lm.run import factor_settings, load_run
    from influence.lm.workspace import open_workspace

    root, model_dir, data = checkpoint
    folder = open_workspace(model_dir, data, root=tmp_path, seq_len=16)
    assert open_workspace(model_dir, data, root=tmp_path, seq_len=16) == folder
    assert open_workspace(model_dir, data, root=tmp_path, seq_len=12) != folder  # settings key the folder
    run = load_run(folder)
    assert run.step == 0 and len(run.train) == factor_settings(folder)["sequences"] >= len(DOCS)
    assert run.train[0]["text"] == DOCS[0][: len(run.train[0]["text"])]
    ids = np.asarray(run.train.with_format("numpy")["input_ids"][:2])
    assert np.asarray(run.model(ids)).shape == (2, 16, run.tokenizer.vocab_size)


def test_a_workspace_whose_checkpoint_changed_is_refused(checkpoint, tmp_path):
    import shutil

    from influence.errors import CheckpointError
    from influence.lm.run import load_run
    from influence.lm.workspace import open_workspace

    _, model_dir, data = checkpoint
    moved = shutil.copytree(model_dir, tmp_path / "model")
    folder = open_workspace(moved, data, root=tmp_path / "ws", seq_len=16)
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 1e-6}))
    with pytest.raises(CheckpointError, match="gone or its weights or config.json changed"):
        load_run(folder)


def test_bad_inputs_fail_with_a_message(checkpoint, tmp_path, capsys):
    root, model_dir, data = checkpoint
    assert main(["fit", "--model", str(model_dir), "--quiet"]) == 2
    assert "both --model DIR and --data PATH" in capsys.readouterr().err
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((model_dir / "config.json").read_text())
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "bin" / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    assert main(["fit", "--model", str(tmp_path / "bin"), "--data", str(data), "--workspaces",
                 str(tmp_path / "ws"), "--quiet"]) == 2
    assert "only PyTorch pickles" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["fit", "--model", str(model_dir), "--data", str(empty), "--workspaces", str(tmp_path / "ws"),
                 "--quiet"]) == 2
    assert "no non-empty document" in capsys.readouterr().err
    np.testing.assert_equal(sorted(p.name for p in (tmp_path / "ws").glob("*/run.json")), [])
