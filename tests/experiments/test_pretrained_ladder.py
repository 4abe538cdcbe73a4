"""`python -m experiments.pretrained_ladder` end to end on two tiny random-weight
GPT-NeoX (Pythia-shaped) checkpoints of increasing width that the test writes in the
Hugging Face format, with a JSONL corpus and queries: one result per checkpoint ordered
by size, sparsity recomputed from the stored scores, BM25 ranks checked by hand, per-
checkpoint results reused on a second run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

import influence as inf
import influence.pretrained as hf
from experiments.pretrained_ladder import main
from tests.helpers import PROVERBS, byte_level_bpe

DOCS = PROVERBS
QUERIES = [{"id": "verbatim", "prompt": "a stitch in time", "completion": " saves nine, said the tailor.",
            "source_text": "a stitch in time saves nine"},
           {"id": "new", "prompt": "the lazy cat", "completion": " saves a penny."}]


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder")
    tok = byte_level_bpe(DOCS)
    models = []
    # Given widest first: the ladder must order them by parameter count itself.
    for name, d in (("neox-wide", 32), ("neox-narrow", 16)):
        arch = hf.ArchConfig(family="neox", model_type="gpt_neox", vocab_size=tok.get_vocab_size(), d_model=d,
                             n_layers=3, n_heads=2, n_kv_heads=2, head_dim=d // 2, d_mlp=2 * d, context_length=32,
                             norm="layernorm", norm_eps=1e-5, activation="gelu", gated_mlp=False,
                             parallel_residual=True, tied_embeddings=False, qkv_bias=True, o_bias=True,
                             mlp_bias=True, rotary_dim=d // 4, bos_token_id=0, eos_token_id=0)
        models.append(hf.save_pretrained(hf.PretrainedLM(arch, rngs=nnx.Rngs(1)), root / name,
                                         tokenizer_json=tok.to_str()))
    data, queries = root / "corpus.jsonl", root / "queries.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    queries.write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    args = ["--models", *map(str, models), "--data", str(data), "--queries", str(queries), "--out",
            str(root / "out"), "--seq-len", "16", "--top-k", "3", "--token-k", "2"]
    assert main(args) == 0
    return root, args


@pytest.mark.slow  # two checkpoints fitted, scored and attributed: 30-70 s on a shared 2-core CPU
def test_one_result_per_checkpoint_ordered_by_size(ladder):
    root, _ = ladder
    results = json.loads((root / "out" / "results.json").read_text())
    ckpts = results["checkpoints"]
    assert [c["name"] for c in ckpts] == ["neox-narrow", "neox-wide"]
    assert ckpts[0]["parameters"] < ckpts[1]["parameters"]
    assert results["families"] == ["neox"] and results["queries"] == ["verbatim", "new"]
    for c in ckpts:
        assert sorted(c["tracked_layers"]) == [f"blocks.{i}.mlp.{p}" for i in range(3) for p in ("down", "up")]
        assert c["layer_set"] == "mlp"
        assert [q["id"] for q in c["queries"]] == ["verbatim", "new"]
    md = (root / "out" / "results.md").read_text()
    for group in ("### sparsity", "### BM25 vs influence", "### layer thirds", "### token-wise"):
        assert group in md
    # Each table lists the checkpoints in size order.
    assert md.index("| neox-narrow |") < md.index("| neox-wide |")


@pytest.mark.slow  # two checkpoints fitted, scored and attributed: 30-70 s on a shared 2-core CPU
def test_metrics_match_a_recomputation_from_the_stored_scores(ladder):
    from influence.lm.run import load_run
    from influence.query.bm25 import words

    root, _ = ladder
    for c in json.loads((root / "out" / "results.json").read_text())["checkpoints"]:
        scores = inf.Scores.load(f"{c['workspace']}/scores/{c['layer_set']}.npz")
        values = np.asarray(scores.values, np.float64)
        n = values.shape[1]
        assert n == c["sequences"] >= len(DOCS)
        for i, q in enumerate(c["queries"]):
            s = values[i]
            pos = np.sort(np.clip(s, 0, None))[::-1]
            # top-1% share of N < 100 sequences: the largest positive score over their sum.
            assert 0 <= q["top1_share"] <= 1
            np.testing.assert_allclose(q["top1_share"], pos[0] / pos.sum(), rtol=1e-5)
            np.testing.assert_allclose(q["positive_fraction"], np.mean(s > 0), rtol=1e-5)
            assert q["top_rows"] == list(np.argsort(-s, kind="stable")[:3])
            # The layer thirds of the top-3's influence, from the stored per-layer scores.
            thirds = {"lower": 0.0, "middle": 0.0, "upper": 0.0}
            for name, v in scores.per_layer.items():
                block = int(name.split(".")[1])
                thirds[("lower", "middle", "upper")[block]] += float(v[i, q["top_rows"]].sum())
            total = sum(thirds.values())
            for t, v in thirds.items():
                np.testing.assert_allclose(q[f"layer_{t}"], v / total, rtol=1e-4, atol=1e-6)
            assert 0 < q["token_top10_share"] <= 1
        # BM25 by hand: the verbatim query's words all occur in its source sequence only
        # ("stitch", "saves", "nine", "tailor" occur in no other document), so BM25 ranks it first.
        run = load_run(c["workspace"])
        (src,) = [r for r, t in enumerate(run.train["text"]) if "stitch" in t]
        assert all("stitch" not in words(t) for r, t in enumerate(run.train["text"]) if r != src)
        verbatim = c["queries"][0]
        assert verbatim["source_bm25_rank"] == 1
        # Influence of a random-weight model ranks the copied sequence first too (its score
        # was 1.7-3.6x the runner-up's when this test was written).
        assert verbatim["source_rank"] == 1, verbatim
        assert "source_rank" not in c["queries"][1]


@pytest.mark.slow  # two checkpoints fitted, scored and attributed: 30-70 s on a shared 2-core CPU
def test_rerun_reuses_each_checkpoint(ladder, capsys):
    root, args = ladder
    before = {p.name: p.stat().st_mtime_ns for p in (root / "out" / "checkpoints").iterdir()}
    assert main(args) == 0
    assert "results cached" in capsys.readouterr().err
    after = {p.name: p.stat().st_mtime_ns for p in (root / "out" / "checkpoints").iterdir()}
    assert before == after and len(after) == 2
    # Another analysis setting is another fingerprint: recomputed (from the cached scores).
    assert main([*args[:-1], "4"]) == 0
    assert "results cached" not in capsys.readouterr().err


# --------------------------------------------------------------------------- fast (default suite)


def test_queries_file_is_checked(tmp_path):
    from experiments.pretrained_ladder import load_ladder_queries

    good = tmp_path / "q.jsonl"
    good.write_text("".join(json.dumps(q) + "\n" for q in QUERIES) + "\n")
    specs = load_ladder_queries(good)
    assert [s.id for s in specs] == ["verbatim", "new"] and specs[0].source_text and specs[1].source_text is None
    assert specs[0].text == QUERIES[0]["prompt"] + QUERIES[0]["completion"]  # what BM25 compares
    for bad, message in (({"id": "a", "prompt": "p"}, "missing \\['completion'\\]"),
                         ({**QUERIES[0], "title": "x"}, "unknown \\['title'\\]")):
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=message):
            load_ladder_queries(tmp_path / "bad.jsonl")
    (tmp_path / "dup.jsonl").write_text(json.dumps(QUERIES[0]) + "\n" + json.dumps(QUERIES[0]) + "\n")
    with pytest.raises(ValueError, match="duplicate"):
        load_ladder_queries(tmp_path / "dup.jsonl")


def test_render_has_a_row_per_checkpoint_per_group():
    from experiments.pretrained_ladder import GROUPS, LadderConfig, _clean, render

    means = {"top1_share": 0.5, "bm25_spearman": float("nan")}
    results = [_clean({"name": n, "parameters": p, "means": means}) for n, p in (("small", 14_000_000),
                                                                               ("big", 410_000_000))]
    assert results[0]["means"]["bm25_spearman"] is None  # NaN is stored as null
    md = render(results, LadderConfig())
    assert md.count("| small | 14M |") == len(GROUPS) and md.count("| big | 410M |") == len(GROUPS)
    assert "| small | 14M | 0.5 | – | – |" in md  # sparsity: top-1% share, then the missing metrics
