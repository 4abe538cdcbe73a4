"""The v3 design (experiments/v3_data.py, experiments/scale_v3.py), declared before any
run: translated-only queries and their names-masked twins, BM25 strata and the declared
hard stratum, the token-budget rule, the ladder's span and seeds."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments.scale_v3 import V3, V3_CONFIGS, V3_GPU, V3_TINY, parameters, plan, token_budget
from experiments.v3_data import (
    MASK,
    declare_hard,
    mask_names,
    select_strata,
    shared_names,
    stratum_of,
    translated_queries,
)
from influence.lm import Document

ROOT = Path(__file__).resolve().parents[2]


def _chapter(doc_id, section, verses, genre="es"):
    text, spans, pos = "", [], 0
    for i, v in enumerate(verses, 1):
        piece = f"{i} {v}\n"
        spans.append((pos, pos + len(piece) - 1, f"{section}:{i}"))
        text += piece
        pos += len(piece)
    return Document(doc_id, text, source="sparv", title=section.split()[0], genre=genre, section=section, spans=spans)


def test_names_shared_across_languages_are_masked_accents_ignored():
    en, es = "Then Jesus said to Peter and the Lord", "Entonces Jesús dijo a Pedro y el Señor"
    assert shared_names(en, es) == {"Jesus"}  # Peter/Pedro and Lord/Señor are not shared words
    assert mask_names("Jesus wept. Jesusalem", {"Jesus"}) == f"{MASK} wept. Jesusalem"
    assert mask_names("unchanged", set()) == "unchanged"


def test_translated_queries_point_at_the_spanish_source_with_masked_twins():
    doc = _chapter("sparv-Mark-9", "Mark 9", ["Y Jesús fue.", "Y Jesús habló a Moisés.", "Y todos callaron."])
    web = {"Mark 9:1": "And Jesus went.", "Mark 9:2": "And Jesus spoke to Moses.", "Mark 9:3": "All were silent."}
    qs = translated_queries([doc], web, 2, seed=0)
    assert [q.kind for q in qs] == ["translated", "translated_masked"] * 2
    first = qs[0]
    assert first.source_doc == "sparv-Mark-9" and first.genre == "es"
    assert first.completion == web[first.verse] and first.source_text in doc.text
    twin = next(q for q in qs if q.id == "trm-" + first.id[4:])
    assert "Jesus" not in twin.text and MASK in twin.text and twin.source_text == first.source_text
    with pytest.raises(ValueError, match="only 2 translated-only verses"):
        translated_queries([doc], web, 3)


def test_strata_and_the_declared_hard_stratum():
    assert [stratum_of(r) for r in (1, 2, 10, 11, 100, 101)] == ["first", "top10", "top10", "outside10",
                                                                  "outside10", "outside100"]
    hard, why = declare_hard({"first": 500, "top10": 90, "outside10": 25, "outside100": 8})
    assert hard == ["top10", "outside10", "outside100"] and "only 33 sources" in why and "n = 123" in why
    hard, why = declare_hard({"first": 5, "top10": 1, "outside10": 80, "outside100": 30})
    assert hard == ["outside10", "outside100"] and "n = 110" in why
    strata = {"first": [(f"v{i}", 1) for i in range(10)], "top10": [("a", 3)]}
    chosen = select_strata(strata, 4, seed=0)
    assert len(chosen["first"]) == 4 and chosen["top10"] == ["a"] and chosen == select_strata(strata, 4, seed=0)


def test_token_budget_rule():
    # 20 tokens per parameter within [1, 4] epochs; clipped at either end.
    assert token_budget(V3, 100_000, 1_000_000)["rule"] == "20 tokens per parameter"
    b = token_budget(V3, 100_000, 1_000_000)
    assert b["tokens"] == 2_000_000 and b["epochs"] == 2.0
    assert token_budget(V3, 1_000, 1_000_000)["epochs"] == 1.0
    capped = token_budget(V3, 10_000_000, 1_000_000)
    assert capped["epochs"] == 4.0 and capped["rule"] == "max epochs (capped)"


def test_closed_form_parameter_counts_are_the_models():
    from flax import nnx

    from influence.lm import LADDER, init_model, parameter_counts

    for scale in ("tiny", "small"):
        shape = nnx.eval_shape(lambda s=scale: init_model(LADDER[s].config(V3.base.vocab_size, V3.base.seq_len)))
        assert parameters(scale, V3) == parameter_counts(shape)


def test_ladders_span_and_seeds():
    for cfg, span in ((V3, 100), (V3_GPU, 30)):
        totals = [parameters(s, cfg)["total"] for s in cfg.scales]
        assert totals == sorted(totals) and totals[-1] / totals[0] >= span
    assert parameters("xxxl", V3_GPU)["total"] >= 100_000_000
    assert V3.seeds("small") == (0, 1, 2, 3, 4) and V3.seeds("medium") == (0, 1, 2)
    assert len(V3.lr_multipliers) >= 3 and V3.damping_multipliers == (0.1, 1.0, 10.0)
    assert "identity" in V3.curvatures and V3.n_translated >= 150
    p = plan(V3)
    assert sum(r["step"] == "lr sweep" for r in p) == 3 * len(V3.scales)
    assert set(V3_CONFIGS) == {"v3-tiny", "v3", "v3-gpu"}


def test_published_design_is_the_declared_config():
    d = json.loads((ROOT / "docs" / "experiments" / "scale-v3" / "design.json").read_text())
    assert d["config"] == "v3" and d["status"].startswith("declared")
    # Written from the configuration as it stands (rerun the design command after changing it).
    assert d["data"]["plays"] == list(V3.base.mixture.plays) and d["data"]["bible"] == list(V3.base.mixture.bible)
    assert d["data"]["translated_only_chapters"] == list(V3.translated_only)
    assert [x["scale"] for x in d["ladder"]] == list(V3.scales) and d["span_total_params"] >= 100
    assert d["translated"]["n"] >= 150 and d["translated"]["meets_n_min"]
    assert d["bm25_strata"]["hard_n"] >= 100
    assert d["robustness"]["damping_multipliers"] == [0.1, 1.0, 10.0]


HAVE_BIBLE = shutil.which("diatheke") is not None


@pytest.mark.slow  # about a minute on 2 shared cores: corpora, tokenizer, BM25 over the windows
@pytest.mark.skipif(not HAVE_BIBLE, reason="needs diatheke with sword-text-kjv/sparv/web (.ci/apt-packages.txt)")
def test_v3_tiny_design_end_to_end(tmp_path):
    from experiments.scale_v3 import design

    d = design(V3_TINY, tmp_path)
    assert d["translated"]["n"] == V3_TINY.n_translated  # every Spanish source found in a training window
    assert d["data"]["kjv_removed"] == ["Psalms 24"]
    assert 0 < d["translated"]["bm25_mrr"] < 0.5 and d["translated"]["bm25_mrr_masked"] <= d["translated"]["bm25_mrr"]
    s = d["bm25_strata"]["summary"]
    assert sum(v["n"] for v in s.values()) <= d["bm25_strata"]["candidates"] and s["first"]["n"] > 0
    assert np.isfinite(d["span_total_params"])
