"""The scale experiment's data and assembly: the versioned query set and insertions, the
training mix, per-query records from a hand-made score matrix, tables and the gallery."""

import json
import re
import shutil

import numpy as np
import pytest

from experiments import analysis
from experiments.gallery import write_gallery
from experiments.insertions import insertion_documents, insertion_rows, load_insertions
from experiments.mixture import chapter_names, language_of, pin_heldout
from experiments.query_set import V1_KINDS, load_queries, parse_query
from experiments.scale_comparison import CONFIGS, FAST, FULL_V1
from experiments.summary import FAMILIES, derived_fields, summarise
from experiments.tables import family_table, params_label
from influence.lm import Document
from influence.lm.sequences import heldout_groups
from influence.query.bm25 import words

HAVE_BIBLE = shutil.which("diatheke") is not None


# --------------------------------------------------------------------------- query set and insertions


def test_query_set_has_every_kind_and_consistent_insertions():
    specs = load_queries()
    assert len(specs) >= 30
    counts = {k: sum(s.kind == k for s in specs) for k in V1_KINDS}
    assert all(n >= 4 for n in counts.values()), counts
    spec = load_insertions()
    once = {f["id"]: f["text"] for f in spec["facts_once"]}
    order = {f["id"]: f for f in spec["facts_order"]}
    canaries = {c["id"]: c["text"] for c in spec["canaries"]}
    for s in specs:
        # An inserted fact is asked in its forward order: prompt + completion is the forward text.
        if s.kind == "fact_once":
            assert s.text == once[s.insertion]
        elif s.kind == "fact_order":
            assert s.text == order[s.insertion]["forward"]
            assert sorted(words(order[s.insertion]["reversed"])) == sorted(words(s.text))  # same words, other order
        elif s.kind == "canary":
            assert s.text == canaries[s.insertion]
    pairs = {}
    for s in specs:
        if s.kind == "crosslingual":
            pairs.setdefault(s.pair, set()).add(s.lang)
    assert pairs and all(langs == {"en", "es"} for langs in pairs.values())


def test_query_validation_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="needs \\['insertion'\\]"):
        parse_query({"id": "x", "kind": "canary", "prompt": "a", "completion": "b"})
    with pytest.raises(ValueError, match="unknown kind"):
        parse_query({"id": "x", "kind": "poem", "prompt": "a", "completion": "b"})
    path = tmp_path / "q.jsonl"
    line = json.dumps({"id": "x", "kind": "style", "prompt": "A:\n", "completion": "b", "title": "t", "genre": "g",
                       "speaker": "A"})
    path.write_text(line + "\n" + line + "\n")
    with pytest.raises(ValueError, match="duplicate query ids"):
        load_queries(path)
    with pytest.raises(ValueError, match="no queries with ids"):
        load_queries(ids=["nope"])


def test_insertion_documents_and_their_rows():
    spec = load_insertions()
    docs = insertion_documents(spec)
    n_copies = sum(c["copies"] for c in spec["canaries"])
    assert len(docs) == len(spec["facts_once"]) + 2 * len(spec["facts_order"]) + n_copies
    ids = ["hamlet/000", *[d.doc_id for d in docs]]
    rows = insertion_rows(ids)
    assert rows[("once-bell", "once")] == [1]
    fwd, rev = rows[("order-duke", "forward")], rows[("order-duke", "reversed")]
    assert len(fwd) == len(rev) == 1 and docs[fwd[0] - 1].text.startswith("The first duke")
    assert len(rows[("canary-e", "copy")]) == 16


def test_configs_use_known_queries_and_scales():
    from influence.lm import LADDER, parameter_counts

    ids = {s.id for s in load_queries()}
    for cfg in CONFIGS.values():
        assert set(cfg.query_ids or ()) <= ids and set(cfg.gallery_ids) <= ids
        assert {s for s, _ in cfg.runs} <= set(cfg.tokens) <= set(LADDER)
    # The full configuration spans >= 4 scales and >= 30x non-embedding parameters.
    scales = sorted({s for s, _ in FULL_V1.runs}, key=lambda s: LADDER[s].d_model)
    assert len(scales) >= 4
    from flax import nnx

    from influence.lm import init_model

    n = [parameter_counts(nnx.eval_shape(lambda s=s: init_model(LADDER[s].config(FULL_V1.vocab_size, FULL_V1.seq_len))))
         ["non_embedding"] for s in (scales[0], scales[-1])]
    assert n[1] / n[0] >= 30


# --------------------------------------------------------------------------- the training mix


def test_chapter_names():
    assert chapter_names(["Genesis 1-3", "Psalms 23"]) == ["Genesis 1", "Genesis 2", "Genesis 3", "Psalms 23"]
    with pytest.raises(ValueError, match="bad chapter"):
        chapter_names(["Genesis"])


def test_pin_heldout_holds_out_exactly_the_given_documents():
    train = [Document(doc_id=f"play/{i:03d}", text="x") for i in range(200)]
    held = [Document(doc_id=f"other/{i}", text="y") for i in range(5)]
    for seed in (0, 1):
        docs, fraction = pin_heldout(train, held, seed)
        got = heldout_groups(docs, fraction, "doc", seed)
        assert len(got) == 5 and all(g.startswith("other/") for g in got)
        assert [d.doc_id for d in docs[:200]] == [d.doc_id for d in train]


def test_language_of():
    assert [language_of(*x) for x in [("kjv", "en"), ("sparv", "es"), ("shakespeare", "tragedies"),
                                      ("insertion", "canary"), ("files", "")]] == ["en", "es", "en", "en", "other"]


@pytest.mark.skipif(not HAVE_BIBLE, reason="needs Debian's diatheke and sword-text-kjv/sparv")
@pytest.mark.parametrize("cfg", [FAST, FULL_V1], ids=["fast", "full"])
def test_every_query_source_is_in_its_training_mix(cfg):
    from experiments.mixture import heldout_documents, training_documents

    docs = training_documents(cfg.mixture)
    def squash(t):
        return re.sub(r"\s+", " ", t)
    texts = [squash(d.text) for d in docs]
    for s in load_queries(ids=cfg.query_ids):
        if s.source_text:
            assert any(squash(s.source_text) in t for t in texts), s.id
    # Invented names occur only in their insertion documents; held-out text is not trained on.
    for name in ("Corvania", "Vesperine", "Greywhisper", "Marrowind"):
        assert [d.source for d in docs if name in d.text] == ["insertion"] * sum(name in d.text for d in docs)
        assert sum(name in d.text for d in docs) >= 1
    held = heldout_documents(cfg.mixture)
    assert not {d.text for d in held} & {d.text for d in docs}
    # English and Spanish chapters are separate documents: no document holds both languages.
    assert not any("In the beginning" in d.text and "principio" in d.text for d in docs)


# --------------------------------------------------------------------------- records from a score matrix


def _table():
    rows = [  # text, title, genre, speakers, doc_id, source, chunk
        ("HAMLET:\nTo be, or not to be: that is the question", "Hamlet", "tragedies", "HAMLET", "hamlet/007",
         "shakespeare", 3),
        ("KING HENRY V:\nOnce more unto the breach", "Henry V", "histories", "KING HENRY V", "henry-v/009",
         "shakespeare", 1),
        ("The first duke of Corvania was Aldric Venmoor.", "order-duke", "fact_forward", "",
         "insert/order-duke/forward", "insertion", 0),
        ("Aldric Venmoor was the first duke of Corvania.", "order-duke", "fact_reversed", "",
         "insert/order-duke/reversed", "insertion", 0),
        ("In the beginning God created the heaven", "Genesis", "en", "Genesis 1:1", "kjv/Genesis 1", "kjv", 0),
        ("EN el principio crió Dios los cielos", "Genesis", "es", "Genesis 1:1", "sparv/Genesis 1", "sparv", 0),
        ("HAMLET:\nAy, there's the rub", "Hamlet", "tragedies", "HAMLET; OPHELIA", "hamlet/007", "shakespeare", 4),
        ("lilac jasper drizzle tunnel willow nickel ember harbor", "canary-e", "canary", "", "insert/canary-e/copy00",
         "insertion", 0),
        ("lilac jasper drizzle tunnel willow nickel ember harbor", "canary-e", "canary", "", "insert/canary-e/copy01",
         "insertion", 0),
    ]
    cols = list(zip(*rows))
    return analysis.TrainingTable(*[list(c) for c in cols])


def test_query_records_from_a_hand_made_score_matrix():
    specs = [parse_query(r) for r in [
        {"id": "mem", "kind": "memorised", "prompt": "HAMLET:\nTo be,", "completion": " or not to be",
         "source_text": "To be, or not to be", "title": "Hamlet", "genre": "tragedies", "speaker": "HAMLET"},
        {"id": "duke", "kind": "fact_order", "prompt": "The first duke of Corvania was",
         "completion": " Aldric Venmoor.", "insertion": "order-duke"},
        {"id": "xl-en", "kind": "crosslingual", "prompt": "In the beginning", "completion": " God created",
         "pair": "g", "lang": "en", "source_text": "In the beginning God"},
        {"id": "xl-es", "kind": "crosslingual", "prompt": "EN el principio", "completion": " crió Dios",
         "pair": "g", "lang": "es", "source_text": "EN el principio"},
        {"id": "can", "kind": "canary", "prompt": "lilac jasper drizzle tunnel",
         "completion": " willow nickel ember harbor", "insertion": "canary-e"},
    ]]
    values = np.array([
        [9, 1, 0, 0, 0, 0, 5, 0, 0],
        [0, 0, 4, 1, 2, 0, 0, 0, 0],
        [1, 0, 0, 0, 8, 6, 2, 0, 0],   # top English rows (k=2): 4 then 6; row 5 is Spanish
        [0, 0, 0, 0, 3, 9, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 7, 2],
    ], float)
    # Two layers, blocks 0 and 1 of a 2-block model: lower gets 3/4 of every score.
    per_layer = {"blocks.0.mlp.fc_in": 0.75 * values, "blocks.1.mlp.fc_in": 0.25 * values}
    ctx = analysis.Context.build(_table())
    recs = {r["id"]: r for r in analysis.query_records(specs, values, per_layer, ctx, n_blocks=2, k=2, powerlaw_boot=0)}
    mem = recs["mem"]
    assert mem["top_rows"] == [0, 6] and mem["source_rank"] == 1 and mem["source_bm25_rank"] == 1
    assert mem["bm25_spearman"] > 0.5  # the Hamlet rows score highest under both
    assert mem["doc_start_top"] == 0.0 and mem["doc_start_all"] == pytest.approx(6 / 9)
    assert mem["same_title"] == 1.0 and mem["same_speaker"] == 1.0 and mem["same_title_base"] == pytest.approx(2 / 9)
    assert mem["layer_lower"] == pytest.approx(0.75) and mem["layer_middle"] == 0
    assert mem["layer_upper"] == pytest.approx(0.25)
    duke = recs["duke"]
    assert (duke["forward_score"], duke["reversed_score"], duke["forward_rank"], duke["reversed_rank"]) == (4, 1, 1, 3)
    en = recs["xl-en"]
    assert en["transfer_ratio"] == pytest.approx((3 + 1) / (8 + 2))  # rows 4 and 6 on the Spanish query
    assert en["transfer_pct"] == pytest.approx((7 / 9 + 6 / 9) / 2)
    assert recs["xl-es"]["transfer_back_ratio"] == pytest.approx(6 / 9)  # es -> en: only row 5 is Spanish
    assert "transfer_ratio" not in recs["xl-es"]
    assert "transfer_pct_control" not in en  # one pair: no other verse to compare with
    can = recs["can"]
    assert (can["copies"], can["insertion_rank"], can["canary_precision"]) == (2, 1, 1.0)
    assert "alpha" not in mem  # fewer than 50 positive scores: no tail to fit
    derived_fields(list(recs.values()), n_train=9)
    assert recs["duke"]["forward_wins"] == 1.0 and recs["can"]["canary_rank_x2"] == 1
    assert mem["source_top1pct"] == 1.0


def test_rows_containing_finds_a_line_cut_by_a_window():
    table = analysis.TrainingTable(["HAMLET:\nTo be, or not", "to be: that is"], *[["", ""]] * 5, [0, 1])
    assert table.rows_containing("To be, or not to be").tolist() == [0]  # by its first half
    assert table.rows_containing("To be,   or\nnot").tolist() == [0]  # white space folded
    assert table.rows_containing("Ay, the rub: to be: that is").tolist() == [1]  # else its second half
    assert table.rows_containing("absent words here").tolist() == []


def test_summary_table_and_labels():
    recs = [{"kind": "fact_order", "forward_score": f, "reversed_score": r} for f, r in [(4, 1), (2, 1), (2, 0)]]
    derived_fields(recs, 100)
    est = summarise(recs, "order", n_boot=200)
    assert est["reversed ÷ forward (Σ over facts)"].value == pytest.approx(2 / 8)
    assert est["share of facts with forward > reversed"].value == 1.0
    run = {"scale": "mini", "seed": 0, "params": {"non_embedding": 100_096}, "variants": {"mlp": recs}}
    table = family_table([run], "order", "mlp", n_boot=200)
    assert "mini s0 (100k)" in table and "| reversed ÷ forward (Σ over facts) | 3 | 0.25 [" in table
    assert params_label(2_224_704) == "2.22M" and params_label(12_768) == "12.8k"
    assert set(FAMILIES) >= {"sparsity", "surface", "thematic", "layers", "order", "crosslingual", "canaries"}


def test_gallery_is_self_contained_and_marks_shared_words(tmp_path):
    spec = parse_query({"id": "q<1>", "kind": "style", "prompt": "KING:\n", "completion": "Our crown", "title": "t",
                        "genre": "g", "speaker": "KING"})
    runs = [{"scale": "tiny", "seed": 0, "params": {"non_embedding": 12_768}}]
    path = write_gallery(tmp_path / "g.html", [spec], runs, {(0, "q<1>"): [(1.5, "Henry V", "our <crown> & realm")]})
    page = path.read_text()
    assert "q&lt;1&gt;" in page and "<b>our</b> &lt;<b>crown</b>&gt; &amp; realm" in page
    assert "<script" not in page and "http" not in page
