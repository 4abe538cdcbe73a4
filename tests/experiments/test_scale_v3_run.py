"""``python -m experiments.scale_v3 run`` (issue 26) end to end on a synthetic slice (two
sizes, one seed, a two-value learning-rate sweep capped at two training steps): the sweep
picks the lowest held-out loss, every run has EK-FAC at lambda x {0.1, 1, 10} and the
identity curvature, influence / BM25 / chance metrics per query agree with what the data
force (verbatim sources ranked first by BM25, chance = the closed form), a spent time
budget stops with status 75 and the next call resumes without recomputing, and the
archive decodes finite. Plus fast tests of the pieces (metrics, endpoint, verdict)."""

import dataclasses
import json
import random

import numpy as np
import pytest

from experiments import metrics as M
from experiments.archive import read_scores
from experiments.query_set import QuerySpec
from experiments.scale_v2 import TINY
from experiments.scale_v3 import (
    EXIT_RESUME,
    PARTIAL_FAIL,
    PARTIAL_PASS,
    V3_TINY,
    V3Data,
    choose_lr,
    endpoint_v3,
    query_metrics,
    rank_table,
    recompute_means,
    render_v3_report,
    run_all,
    v3_verdict,
)
from influence.lm import Document

EN = "lord god earth heaven light day night water land sea man woman king city house son father".split()
ES = "señor dios tierra cielo luz día noche agua mar hombre mujer rey ciudad casa hijo padre".split()


def _doc(doc_id, words, rng, n_verses=8, source="kjv", genre="en"):
    text, spans = "", []
    for i in range(1, n_verses + 1):
        v = " ".join(rng.choice(words) for _ in range(6)) + f" {doc_id} {i}."
        spans.append((len(text), len(text) + len(v), f"{doc_id}:{i}"))
        text += v + "\n"
    return Document(doc_id, text, source=source, title=doc_id, genre=genre, section=doc_id, spans=spans)


def _slice():
    """Twelve English and twelve Spanish documents (~60 windows of 64 tokens), two held
    out; queries: a verse of each Spanish document re-worded in English (``translated``),
    and the verbatim verses of English documents (``bm25_first``: BM25 must rank them first)."""
    rng = random.Random(0)
    en = [_doc(f"en{i}", EN, rng) for i in range(12)]
    es = [_doc(f"es{i}", ES, rng, source="sparv", genre="es") for i in range(12)]
    held = [_doc("held0", EN, rng), _doc("held1", ES, rng, source="sparv", genre="es")]
    queries = []
    for i, d in enumerate(es):
        start, end, _ = d.spans[3]
        verse = d.text[start:end]
        english = " ".join(EN[ES.index(w)] if w in ES else w for w in verse.split())
        queries.append(QuerySpec(f"tro-{i:03d}", "translated", "and then\n", english, source_text=verse,
                                 source_doc=d.doc_id))
    for i, d in enumerate(en):
        start, end, _ = d.spans[2]
        verse = d.text[start:end]
        queries.append(QuerySpec(f"cand-{i}", "bm25_first", verse[:20], verse[20:], source_text=verse,
                                 source_doc=d.doc_id))
    return V3Data([*en, *es], held, queries, hard=["top10"])


SMOKE = dataclasses.replace(
    V3_TINY, name="v3-smoke", base=dataclasses.replace(TINY, vocab_size=300, seq_len=64, batch_size=16, n_boot=50),
    scales=("tiny", "mini"), seeds_small=1, lr_multipliers=(0.5, 2.0), max_steps=2)


def test_query_metrics_and_verdict_rules():
    scores = np.array([[0.1, 0.9, 0.3, 0.2], [0.5, 0.4, 0.3, 0.2]])
    m = query_metrics(scores, [np.array([2]), np.array([], int)], k=2)
    assert m[0]["rr"] == pytest.approx(1 / 2) and m[0]["recall2"] == 1.0
    assert np.isnan(m[1]["rr"]) and np.isnan(m[1]["recall2"])
    sweep = [{"lr_multiplier": 0.5, "regime": {"heldout_loss": 3.0}},
             {"lr_multiplier": 1.0, "regime": {"heldout_loss": 2.5}},
             {"lr_multiplier": 2.0, "regime": {"heldout_loss": 2.7}}]
    assert choose_lr(sweep) == 1.0
    ci = {"value": 0.1, "low": 0.05, "high": 0.2}
    ok = {"role": "paper claim", "n_queries": 40, "scales": ["a", "b"],
          "per_scale": [{"influence_minus_bm25": ci}] * 2, "slope_per_decade": ci}
    assert v3_verdict(ok)[0] == "reproduces the paper"
    assert "n = 29" in v3_verdict({**ok, "n_queries": 29})[1]
    assert "does not beat BM25" in v3_verdict({**ok, "per_scale": [{"influence_minus_bm25": {**ci, "low": -0.01}}]})[1]
    assert "does not grow" in v3_verdict({**ok, "slope_per_decade": {**ci, "low": -0.1}})[1]
    assert v3_verdict({**ok, "role": "positive control"})[0].startswith("positive control, not a test")


def _fake_run(scale, params, rrs, bm25):
    recs = [{"id": f"q{i}", "kind": "translated", "n_rows": 1, "bm25_rr": b, "bm25_recall10": 0.0,
             "chance_rr": 0.01, "chance_recall10": 0.1, "influence": {"identity": {"rr": r, "recall10": 1.0}}}
            for i, (r, b) in enumerate(zip(rrs, bm25))]
    return {"scale": scale, "params": {"total": params}, "metrics": {"records": recs}}


def test_endpoint_intervals_and_slope_follow_the_records():
    rng = np.random.default_rng(0)
    bm = rng.uniform(0, 0.1, 40)
    runs = {"a": [_fake_run("a", 10 ** 5, bm + 0.1, bm)], "b": [_fake_run("b", 10 ** 6, bm + 0.3, bm)]}
    e = endpoint_v3("translated", "paper claim", ("translated",), runs, "identity", n_boot=200)
    assert e["n_queries"] == 40 and [c["scale"] for c in e["per_scale"]] == ["a", "b"]
    assert e["per_scale"][0]["influence_minus_bm25"]["value"] == pytest.approx(0.1)
    assert e["per_scale"][1]["influence_mrr"]["value"] == pytest.approx(np.mean(bm) + 0.3)
    assert e["slope_per_decade"]["value"] == pytest.approx(0.2)  # +0.2 over one decade of parameters
    assert e["verdict"] == "reproduces the paper"
    flat = {"a": runs["a"], "b": [_fake_run("b", 10 ** 6, bm + 0.1, bm)]}
    assert endpoint_v3("translated", "paper claim", ("translated",), flat, "identity", n_boot=200)[
        "verdict"] == "does not reproduce"


@pytest.mark.slow  # 36 s on 2 cores at load 2.7, ~3 min at load 8-12 (compiling two sizes and 4 scorings)
def test_run_end_to_end_on_a_synthetic_slice(tmp_path):
    data = _slice()
    out = tmp_path / "v3"
    assert run_all(SMOKE, out, data, time_budget=0, log=lambda m: None) == EXIT_RESUME
    assert not (out / "results.json").exists()
    assert run_all(SMOKE, out, data, publish=tmp_path / "pub", log=lambda m: None) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["status"].startswith("smoke run") and [s["scale"] for s in r["sizes"]] == ["tiny", "mini"]
    for s in r["sizes"]:
        losses = {x["lr_multiplier"]: x["heldout_loss"] for x in s["sweep"]}
        assert sorted(losses) == [0.5, 2.0] and s["chosen_lr_multiplier"] == min(losses, key=losses.get)
        assert s["budget"]["tokens_trained"] == 2 * 16 * 64
    t = r["validation"]["tiny-seed0"]["tail_patch"]  # SMOKE validates at tiny (V3_TINY.validate_scales)
    assert list(r["validation"]) == ["tiny-seed0"] and t["k"] == TINY.tail_k
    assert [q["id"] for q in t["queries"]] == [f"tro-{i:03d}" for i in range(TINY.tail_queries)]
    diffs = [q["delta_top"] - q["delta_random"] for q in t["queries"]]
    assert np.isfinite(diffs).all() and t["mean_delta_top_minus_random"] == pytest.approx(np.mean(diffs), rel=1e-3)
    assert set(r["endpoints"]) == {"ekfac-x0.1", "ekfac-x1", "ekfac-x10", "identity"}
    for eps in r["endpoints"].values():
        by = {e["name"]: e for e in eps}
        assert by["translated"]["n_queries"] == 12 and by["bm25_first"]["n_queries"] == 12
        assert by["translated"]["verdict"] == "does not reproduce" and "n = 12" in by["translated"]["reason"]
        for c in by["bm25_first"]["per_scale"]:
            # Verbatim sources: BM25 ranks them first (bar a verse cut by a window boundary).
            assert c["bm25_mrr"]["value"] > 0.9
            assert 0 < c["influence_mrr"]["value"] <= 1
        for c in by["translated"]["per_scale"]:
            assert c["bm25_mrr"]["value"] < 0.5  # English against Spanish: little to match
    # Chance is the closed form over the run's training windows.
    m = json.loads((out / "tiny-seed0-lr" f"{r['sizes'][0]['chosen_lr_multiplier']:g}" / "v3-metrics.json")
                   .read_text())["metrics"]
    rec = m["records"][0]
    assert rec["chance_rr"] == pytest.approx(M.chance_mrr(m["n_train"], rec["n_rows"]))
    # Damping changes the scores (x0.1 and x10 are not the same matrix).
    arch, lost = read_scores(out)
    assert len(arch) == 2 * 4 and all(np.isfinite(v).all() and not lost[k].any() for k, v in arch.items())
    assert not np.allclose(arch["tiny-seed0-ekfac-x0.1"], arch["tiny-seed0-ekfac-x10"])
    assert (tmp_path / "pub" / "results.json").exists() and not (tmp_path / "pub" / "scores.npz").exists()
    assert "| translated | paper claim | 12 | tiny |" in (out / "report.md").read_text()
    assert render_v3_report(r) == (out / "report.md").read_text()
    # A rerun reuses every cached step.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("v3-metrics.json")}
    assert run_all(SMOKE, out, data, time_budget=60, log=lambda m: None) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("v3-metrics.json")}


def test_cli_run_passes_the_overrides(monkeypatch, tmp_path):
    import experiments.scale_v3 as v3

    seen = {}
    monkeypatch.setattr(v3, "v3_data", lambda cfg, out, log: "data")

    def fake_run_all(cfg, out, data, **kw):
        seen.update(cfg=cfg, out=out, data=data, **kw)
        return EXIT_RESUME

    monkeypatch.setattr(v3, "run_all", fake_run_all)
    argv = ["run", "--config", "v3-gpu", "--out", str(tmp_path), "--sizes", "small", "medium", "--seeds", "0",
            "--lr-multipliers", "1", "--max-steps", "3", "--time-budget", "5", "--publish", str(tmp_path / "p")]
    assert v3.main(argv) == EXIT_RESUME  # the status of run_all, 75 while unfinished
    cfg = seen["cfg"]
    assert cfg.scales == ("small", "medium") and cfg.lr_multipliers == (1.0,) and cfg.max_steps == 3
    assert cfg.base == v3.V3_GPU.base and seen["seeds"] == [0] and seen["time_budget"] == 5.0
    assert seen["publish"] == tmp_path / "p" and seen["command"].startswith("python -m experiments.scale_v3 run")


def test_gpu_script_runs_the_v3_gpu_ladder_resumably():
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "experiments" / "run_gpu_v3.sh"
    text = script.read_text()
    assert script.stat().st_mode & 0o111 and "NOT RUN YET" in text
    assert 'CONFIG="${CONFIG:-v3-gpu}"' in text and "python -m experiments.scale_v3 run" in text
    assert "--time-budget" in text and "exit status 75" in text


def test_v3_block_says_not_run_until_results_are_published(tmp_path):
    from pathlib import Path

    from experiments.render import V3_DESIGN, v3_block

    folder = tmp_path / "scale-v3"
    folder.mkdir()
    (folder / "design.json").write_text(Path(V3_DESIGN).read_text())
    assert v3_block(folder / "design.json").startswith("**Not run yet:** no v3 model has been trained")
    (folder / "results.json").write_text("{}")
    assert v3_block(folder / "design.json").startswith("**Run:** results in `scale-v3/results.json`")
    (folder / "results.json").write_text('{"partial": true}')
    assert v3_block(folder / "design.json").startswith("**Partial run:** results in `scale-v3/results.json`")
    published = (Path(V3_DESIGN).parent / "results.json").exists()  # the repo's: a partial CPU run, or none
    assert v3_block(V3_DESIGN).startswith("**Partial run:**" if published else "**Not run yet:**")


@pytest.mark.slow  # 34 s on 2 cores at load ~2: the v3-tiny design (corpora, tokenizer, BM25)
@pytest.mark.skipif(__import__("shutil").which("diatheke") is None,
                    reason="needs diatheke with sword-text-kjv/sparv/web (.ci/apt-packages.txt)")
def test_gpu_script_at_v3_tiny_stops_on_its_budget_and_keeps_the_design(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "CONFIG": "v3-tiny", "OUT": str(tmp_path / "v3"), "PUBLISH": str(tmp_path / "pub"),
           "TIME_BUDGET": "0", "PYTHONPATH": str(root)}
    rc = subprocess.run([str(root / "experiments" / "run_gpu_v3.sh")], env=env, cwd=root, check=False).returncode
    assert rc == EXIT_RESUME  # the budget is spent before the first training step
    d = json.loads((tmp_path / "v3" / "design.json").read_text())["design"]
    assert d["config"] == "v3-tiny" and d["translated"]["n"] == V3_TINY.n_translated
    assert not (tmp_path / "v3" / "results.json").exists() and not (tmp_path / "pub").exists()


def test_the_cached_design_is_keyed_by_the_data_not_the_sizes():
    from experiments.scale_v3 import V3, _data_key

    assert _data_key(V3) == _data_key(dataclasses.replace(V3, scales=("tiny",), max_steps=2, lr_multipliers=(1.0,)))
    assert _data_key(V3) != _data_key(dataclasses.replace(V3, n_translated=150))
    assert _data_key(V3) != _data_key(dataclasses.replace(V3, translated_only=("Luke 15-16",)))


@pytest.mark.slow  # 32 s at load ~5 on 2 cores (two fits and three scoring passes compile)
@pytest.mark.filterwarnings("ignore::influence.UntrackedParametersWarning")
def test_fused_scores_equal_pairwise_scores_per_variant():
    """One training pass for EK-FAC at three dampings and the identity (the v3 runs) gives
    each variant's pairwise_scores: a wrong query slice, damping or curvature would not."""
    import influence as inf
    from experiments.scale_v3 import fused_scores
    from influence import tasks
    from influence.testing import trained_lm

    model, data, queries = trained_lm()
    task = tasks.CausalLM()
    ekfac = inf.fit_factors(model, task, data, strategy="ekfac", layers="mlp_in", progress=False)
    ident = inf.fit_factors(model, task, data, strategy="identity", layers="mlp_in", progress=False)
    lam = float(np.mean([ekfac.damping(n) for n in ekfac.layer_names]))
    plan = {"x0.1": (ekfac, 0.1 * lam), "x10": (ekfac, 10 * lam), "identity": (ident, None)}
    got = fused_scores(model, task, plan, queries, data, batch_size=8)
    for name in ("x10", "identity"):  # one EK-FAC damping and the identity against the library's scorer
        factors, damping = plan[name]
        want = np.asarray(inf.pairwise_scores(model, task, factors, queries, data, damping=damping, batch_size=8,
                                              progress=False).values)
        assert got[name][0].shape == want.shape
        np.testing.assert_allclose(got[name][0], want, rtol=2e-4, atol=1e-5 * np.abs(want).max())
    # x0.1 is its own slice: the dampings differ enough to change the scores.
    assert not np.allclose(got["x0.1"][0], got["x10"][0], rtol=1e-2)


def test_partial_ladder_verdicts_never_say_reproduces():
    ci = {"value": 0.1, "low": 0.05, "high": 0.2}
    ok = {"role": "paper claim", "n_queries": 40, "scales": ["tiny", "mini"],
          "per_scale": [{"influence_minus_bm25": ci}] * 2, "slope_per_decade": ci}
    assert v3_verdict(ok, "mini")[0] == "reproduces the paper"  # the run reached the design's largest size
    verdict, reason = v3_verdict(ok, "xl")
    assert verdict == PARTIAL_PASS and "reproduces the paper" not in verdict and "up to xl" in reason
    assert v3_verdict({**ok, "slope_per_decade": {**ci, "low": -0.1}}, "xl") == (
        PARTIAL_FAIL, "influence beats BM25 at mini but the difference does not grow with size (slope interval not "
        "above 0)")
    assert v3_verdict({**ok, "n_queries": 12}, "xl") == (PARTIAL_FAIL, "n = 12 < 30 queries")


def test_rank_table_recomputes_every_point_value():
    rng = np.random.default_rng(1)
    bm = 1 / rng.integers(1, 50, 40)
    runs = {"a": [_fake_run("a", 10 ** 5, 1 / rng.integers(1, 9, 40), bm) for _ in range(2)],
            "b": [_fake_run("b", 10 ** 6, 1 / rng.integers(1, 5, 40), bm)]}
    for rs in runs.values():
        for seed, r in enumerate(rs):
            r.update(seed=seed)
            r["metrics"].update(n_train=500, variants=["identity"])
            for rec in r["metrics"]["records"]:
                rec["chance_rr"] = M.chance_mrr(500, 1)
    table = rank_table(runs)
    assert list(table["runs"]) == ["a-seed0", "a-seed1", "b-seed0"] and table["runs"]["a-seed0"]["n_train"] == 500
    assert all(isinstance(x, int) for x in table["runs"]["b-seed0"]["identity"]["rank"])
    e = endpoint_v3("translated", "paper claim", ("translated",), runs, "identity", n_boot=20)
    results = {"endpoints": {"identity": [e]}}
    got = recompute_means(json.loads(json.dumps(results)), json.loads(json.dumps(table)))
    for c in e["per_scale"]:
        for m in ("influence_mrr", "bm25_mrr", "chance_mrr", "influence_minus_bm25"):
            assert got[("identity", "translated", c["scale"], m)] == pytest.approx(c[m]["value"], rel=1e-9)
    runs["b"][0]["metrics"]["records"][0]["n_rows"] = 2  # another query set: refused, not mixed
    with pytest.raises(ValueError, match="other queries"):
        rank_table(runs)
