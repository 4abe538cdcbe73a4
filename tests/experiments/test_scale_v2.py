"""The v2 scale experiment's parts on synthetic data with known answers: the WEB verse
reader, the generated query set and insertions, the semantic-source metrics, and the
nested bootstrap statistics and endpoints."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments import metrics as M
from experiments import stats as S
from experiments.analysis import Context, TrainingTable, query_records
from experiments.insertions import insertion_documents
from experiments.queries_v2 import (
    QueryCounts,
    build_query_set,
    embedded_insertion_documents,
    generate_insertions,
    insertion_queries,
    semantic_queries,
)
from influence.lm import Document
from influence.lm.corpus import VERSE_MODULES, bible_verses, parse_verses
from influence.query.bm25 import words

HAVE_WEB = shutil.which("diatheke") is not None and any(
    Path(d, "engWEB2015eb").exists() for d in ("/usr/share/sword/modules/texts/ztext",))

# --------------------------------------------------------------------------- WEB reader


def test_parse_verses_joins_lines_and_drops_footnotes_headings_and_markup():
    out = ("Genesis 1:1: In the beginning, God [1:1 The Hebrew word rendered\n“God” is Elohim.] created the heavens.\n"
           "Genesis 1:2: The earth was formless.\n"
           "A Psalm by David.\n"
           "  Psalms 23:1: Yahweh is my shepherd;\n"
           "I shall lack nothing. \n\n"
           "A Psalm by David.\n"
           "  Psalms 23:2: He makes me lie <H7257> down.\n\n"
           '<title canonical="true" type="psalm">A psalm.</title> <lg sID="g1"/>Romans 1:1: Paul, a servant.\n'
           "(engWEB2015eb)\n")
    assert parse_verses(out) == {
        "Genesis 1:1": "In the beginning, God created the heavens.",
        "Genesis 1:2": "The earth was formless.",
        "Psalms 23:1": "Yahweh is my shepherd; I shall lack nothing.",
        "Psalms 23:2": "He makes me lie down.",
        "Romans 1:1": "Paul, a servant.",
    }
    with pytest.raises(ValueError, match="unknown translation"):
        bible_verses("vulgate")
    assert VERSE_MODULES["web"][1] == "sword-text-web"


@pytest.mark.slow  # default-suite time (reads two whole Bibles)
@pytest.mark.skipif(not HAVE_WEB, reason="needs diatheke and Debian's sword-text-web (listed in .ci/apt-packages.txt)")
def test_web_and_kjv_are_verse_aligned():
    web, kjv = bible_verses("web"), bible_verses("kjv")
    both = [v for v in kjv if web.get(v) and kjv[v]]
    assert len(both) >= 31_000  # 31,095 of the KJV's 31,102 verses have a WEB rendering
    assert web["John 3:16"].startswith("For God so loved the world, that he gave his only born Son,")
    assert kjv["Psalms 23:1"] == "The LORD is my shepherd; I shall not want."
    assert web["Psalms 23:1"] == "Yahweh is my shepherd; I shall lack nothing."
    assert not any("[" in web[v] or "<" in web[v] for v in both)


# --------------------------------------------------------------------------- synthetic corpus


def _chapter(source: str, book: str, chapter: int, verses: list[str], lang: str = "en") -> Document:
    head = f"{book} {chapter}"
    text, spans = head, []
    for i, v in enumerate(verses, start=1):
        start = len(text) + 1
        text += f"\n{i} {v}"
        spans.append((start, len(text), f"{head}:{i}"))
    return Document(doc_id=f"{source}/{head}", text=text, source=source, title=book, genre=lang, section=head,
                    spans=spans)


def _play(play: str, speeches: list[tuple[str, str]]) -> Document:
    text, spans = "ACT I. SCENE I.", []
    for speaker, body in speeches:
        start = len(text) + 2
        text += f"\n\n{speaker}:\n{body}"
        spans.append((start, len(text), speaker))
    return Document(doc_id=f"{play}/000", text=text, source="shakespeare", title=play, genre="tragedies",
                    section="ACT I. SCENE I.", spans=spans)


KJV = [f"And the sower went forth to sow field number {i} unto the end." for i in range(1, 13)]
WEB = [f"The farmer went out to plant plot {i} to its end." for i in range(1, 13)]


def _corpus():
    kjv = [_chapter("kjv", "Genesis", 1, KJV), _chapter("sparv", "Genesis", 1, [f"Y el sembrador {i}." for i in
                                                                                  range(1, 13)], "es")]
    web = {f"Genesis 1:{i}": w for i, w in enumerate(WEB, start=1)}
    plays = [_play("Macbeth", [("MACBETH", f"line {i} of mine\nand line {i} more of it") for i in range(8)])]
    held = [_play("Othello", [("IAGO", f"held {i} words here\nand held {i} more words") for i in range(8)])]
    return kjv + plays, held, web


def test_semantic_queries_pair_web_renderings_with_their_kjv_source():
    train, _, web = _corpus()
    specs = semantic_queries(train, web, n=6, n_control=3, seed=1)
    sem = [s for s in specs if s.kind == "semantic"]
    ctl = [s for s in specs if s.kind == "semantic_control"]
    assert len(sem) == 6 and len(ctl) == 3
    for s in sem:
        i = int(s.verse.split(":")[1])
        assert i >= 2 and s.completion == WEB[i - 1] and s.source_text == KJV[i - 1]
        assert s.prompt.strip() and WEB[i - 2].endswith(s.prompt.strip())  # the preceding WEB verse's end
        assert s.source_doc == "kjv/Genesis 1"
        assert "genesis" not in words(s.text)  # no reference for BM25 to match the chapter heading with
    by_verse = {s.verse: s for s in sem}
    for c in ctl:  # the control is the same verse in the KJV's words
        assert c.verse in by_verse and c.completion == c.source_text == by_verse[c.verse].source_text
    assert specs == semantic_queries(train, web, n=6, n_control=3, seed=1)  # deterministic
    with pytest.raises(ValueError, match="only 11 training KJV verses"):
        semantic_queries(train, web, n=20, n_control=1)


def test_generated_insertions_have_disjoint_invented_vocabularies():
    spec = generate_insertions(12, 8, 9, copies=(1, 2, 4), avoid={"brana", "stolen"}, seed=3)
    canary_words = [set(c["text"].split()) for c in spec["canaries"]]
    assert all(len(w) == 8 for w in canary_words)
    assert sum(len(w) for w in canary_words) == len(set().union(*canary_words))  # disjoint across canaries
    fact_words = {w for f in spec["facts_once"] for w in words(f["text"])}
    assert not fact_words & set().union(*canary_words)
    assert [c["copies"] for c in spec["canaries"]] == [1, 2, 4] * 3
    for f in spec["facts_order"]:
        assert sorted(words(f["forward"])) == sorted(words(f["reversed"])) and f["forward"] != f["reversed"]
    queries = insertion_queries(spec)
    once = {f["id"]: f["text"] for f in spec["facts_once"]}
    for q in queries:
        assert q.prompt and q.completion.strip()
        if q.kind == "fact_once":
            assert q.text == once[q.insertion] and len(q.completion.split()) == 2  # the invented name
    assert generate_insertions(12, 8, 9, copies=(1, 2, 4), avoid={"brana", "stolen"}, seed=3) == spec
    assert generate_insertions(12, 8, 9, seed=4) != spec


def test_embedded_insertions_sit_in_host_passages_of_corpus_length():
    spec = generate_insertions(3, 2, 2, copies=(1, 3))
    hosts = [_play("Coriolanus", [("MENENIUS", "\n".join(f"host line {i} of {j} with some words" for i in range(12)))
                                  for j in range(10)])]
    docs = embedded_insertion_documents(spec, hosts, words=30)
    bare = insertion_documents(spec)
    assert [(d.doc_id, d.genre, d.title) for d in docs] == [(d.doc_id, d.genre, d.title) for d in bare]
    for d, b in zip(docs, bare):
        assert f"\n{b.text}\n" in d.text and 30 <= len(d.text.split()) - len(b.text.split()) <= 45
    copies = [d.text for d in docs if d.title == spec["canaries"][1]["id"]]
    assert len(copies) == 3 and len(set(copies)) == 1  # a canary's copies stay identical
    passages = {d.text.replace(b.text, "") for d, b in zip(docs, bare)}
    assert len(passages) == len(docs) - 2  # every other insertion has a passage of its own
    with pytest.raises(ValueError, match="host passages"):
        embedded_insertion_documents(spec, hosts[:1], words=400)


def test_build_query_set_gives_every_kind_a_prompt():
    train, held, web = _corpus()
    spec = generate_insertions(3, 3, 3)
    specs = build_query_set(train, held, web, spec,
                            QueryCounts(semantic=5, semantic_control=2, memorised=4, style=4, crosslingual=3))
    kinds = [s.kind for s in specs]
    assert {k: kinds.count(k) for k in set(kinds)} == {"semantic": 5, "semantic_control": 2, "memorised": 4,
                                                       "style": 4, "crosslingual": 6, "fact_once": 3,
                                                       "fact_order": 3, "canary": 3}
    assert all(s.prompt.strip() for s in specs)
    mem = [s for s in specs if s.kind == "memorised"]
    assert all(s.prompt.startswith("MACBETH:\n") and s.source_text.endswith(s.completion) for s in mem)
    assert all(s.title == "Othello" for s in specs if s.kind == "style")


# --------------------------------------------------------------------------- semantic metrics


def test_reciprocal_rank_and_recall():
    s = np.array([0.1, 0.9, 0.5, 0.7, 0.2])
    assert M.reciprocal_rank(s, [2]) == pytest.approx(1 / 3)
    assert M.reciprocal_rank(s, [0, 3]) == pytest.approx(1 / 2)
    assert np.isnan(M.reciprocal_rank(s, []))
    assert M.recall_at_k(s, [1, 2, 0], 2) == pytest.approx(1 / 3)
    assert M.recall_at_k(s, [1, 3], 2) == 1.0


def test_partial_spearman_matches_the_closed_form_and_removes_a_shared_cause():
    rng = np.random.default_rng(0)
    z = rng.normal(size=4000)
    x, y = z + rng.normal(size=4000), z + rng.normal(size=4000)
    assert M.spearman(x, y) > 0.4
    assert abs(M.partial_spearman(x, y, z)) < 0.05  # x and y share only z
    w = rng.normal(size=4000)
    x2, y2 = x + w, y + w
    rxy, rxz, ryz = M.spearman(x2, y2), M.spearman(x2, z), M.spearman(y2, z)
    closed = (rxy - rxz * ryz) / np.sqrt((1 - rxz**2) * (1 - ryz**2))
    assert M.partial_spearman(x2, y2, z) == pytest.approx(closed, abs=1e-10)
    assert M.partial_spearman(x2, y2, z) > 0.2
    assert np.isnan(M.partial_spearman(x, z, z))


def test_semantic_records_rank_the_source_by_influence_and_by_bm25():
    train, _, web = _corpus()
    texts = ["Genesis 1\n1 " + "\n".join(f"{i} {v}" for i, v in enumerate(KJV[:6], 1)),
             "\n".join(f"{i} {v}" for i, v in enumerate(KJV[6:], 7)),
             "MACBETH:\nline 1 of mine", "The farmer went out to plant plot 5 to its end."]
    table = TrainingTable(text=texts, title=["Genesis", "Genesis", "Macbeth", "x"], genre=["en", "en", "t", "x"],
                          speakers=["", "", "MACBETH", ""], doc_id=["kjv/Genesis 1", "kjv/Genesis 1", "m/0", "x/0"],
                          source=["kjv", "kjv", "shakespeare", "insertion"], chunk=[0, 1, 0, 0])
    assert table.rows_holding("kjv/Genesis 1", KJV[4]).tolist() == [0]
    assert table.rows_holding("kjv/Genesis 1", KJV[6]).tolist() == [1]
    assert table.rows_holding("kjv/Genesis 1", KJV[5] + " " + KJV[6]).tolist() == [0, 1]  # cut by a window
    specs = [s for s in semantic_queries(train, web, n=11, n_control=0) if s.verse == "Genesis 1:5"]
    scores = np.array([[0.5, 0.1, 0.9, 0.2]])  # the source (row 0) ranks 2nd by influence
    lower, upper = np.array([[0.1, 0.0, 0.0, 0.0]]), np.array([[0.4, 0.1, 0.9, 0.2]])
    rec = query_records(specs, scores, {"blocks.0.mlp": lower, "blocks.2.mlp": upper}, Context.build(table),
                        n_blocks=3, k=2, powerlaw_boot=0)[0]
    assert rec["semantic_rr_lower"] == 1.0 and rec["semantic_rr_upper"] == 0.5  # restricted to a layer group
    assert "semantic_rr_middle" not in rec  # no layer in the middle third
    assert rec["semantic_rows"] == [0] and rec["semantic_rank"] == 2 and rec["semantic_rr"] == 0.5
    assert rec["semantic_bm25_rank"] == 2  # BM25 prefers the verbatim WEB sentence (row 3)
    assert "semantic_rr_bm25_miss" not in rec  # BM25 found the source (rank 2 <= 10)
    assert rec["semantic_recall10"] == 1.0
    assert rec["semantic_rr_minus_bm25"] == pytest.approx(0.0)
    assert np.isfinite(rec["semantic_partial"])


# --------------------------------------------------------------------------- statistics


def test_nested_bootstrap_known_answers():
    const = [np.full((3, 20), 2.0), np.full((2, 20), 5.0)]
    means = S.scale_means(const, n_boot=200)
    assert [(m.value, m.low, m.high) for m in means] == [(2.0, 2.0, 2.0), (5.0, 5.0, 5.0)]
    # Noiseless linear trend in log10(params): the slope is exact, every draw agrees.
    x = np.array([4.0, 5.0, 6.0])
    vals = [np.full((3, 10), 0.1 + 0.05 * xi) for xi in x]
    s = S.slope_vs(x, vals, n_boot=200)
    assert s.value == pytest.approx(0.05) and s.high - s.low < 1e-12
    # Against a per-seed covariate: y = 2 * held-out loss exactly.
    cov = [np.array([3.0, 3.2, 3.1]), np.array([2.0, 2.4]), np.array([1.5])]
    vals = [np.repeat(2 * c[:, None], 7, axis=1) for c in cov]
    s = S.slope_vs_covariate(cov, vals, n_boot=300)
    assert s.value == pytest.approx(2.0) and s.low == pytest.approx(2.0) and s.high == pytest.approx(2.0)


def test_bootstrap_width_matches_the_standard_error_and_grows_with_seed_noise():
    rng = np.random.default_rng(1)
    q = rng.normal(0, 1, size=200)
    one_seed = [q[None, :]]
    m = S.scale_means(one_seed, n_boot=3000, seed=2)[0]
    half_width = (m.high - m.low) / 2
    assert half_width == pytest.approx(1.96 * q.std() / np.sqrt(len(q)), rel=0.12)
    # Seed-level noise (a per-seed offset) widens the interval; queries alone do not see it.
    offsets = np.array([-0.5, 0.0, 0.5])[:, None]
    noisy = [q[None, :] + offsets]
    assert S.scale_means(noisy, n_boot=3000, seed=2)[0].high - S.scale_means(noisy, n_boot=3000, seed=2)[0].low > \
        1.5 * (m.high - m.low)


def test_pairing_over_queries_cancels_shared_query_effects():
    rng = np.random.default_rng(3)
    query_effect = rng.normal(0, 5, size=60)  # large, shared by both scales
    a = (query_effect + rng.normal(0, 0.1, 60))[None, :]
    b = (query_effect + 1.0 + rng.normal(0, 0.1, 60))[None, :]
    d = S.difference([a, b], 0, 1, n_boot=2000)
    assert d.value == pytest.approx(1.0, abs=0.05) and d.high - d.low < 0.1  # unpaired width would be ~5
    with pytest.raises(ValueError, match="same queries"):
        S.scale_means([np.zeros((1, 3)), np.zeros((1, 4))])


def test_order_asymmetry_and_endpoint_verdicts():
    assert S.order_asymmetry(3.0, 1.0) == 0.5
    assert S.order_asymmetry(2.0, -2.0) == 1.0
    assert np.isnan(S.order_asymmetry(0.0, 0.0))
    rng = np.random.default_rng(4)

    def cell(scale, params, level, seeds=3):
        recs = [[{"id": f"q{j}", "kind": "semantic", "semantic_rr_minus_bm25": level + rng.normal(0, 0.02)}
                 for j in range(30)] for _ in range(seeds)]
        return {"scale": scale, "params": params, "heldout": np.full(seeds, 5.0 - np.log10(params) / 2),
                "records": recs}

    ep = S.ENDPOINTS[0]
    rising = S.evaluate_endpoint(ep, [cell("a", 1e4, 0.0), cell("b", 1e5, 0.1), cell("c", 1e6, 0.2)], n_boot=300)
    assert rising["slope_log10_params"]["value"] == pytest.approx(0.1, abs=0.01)
    assert rising["verdict"].startswith("grows") and rising["reproduces"] is True
    assert rising["slope_heldout_loss"]["value"] == pytest.approx(-0.2, abs=0.02)
    flat = S.evaluate_endpoint(ep, [cell("a", 1e4, 0.0), cell("b", 1e5, 0.0)], n_boot=300)
    assert flat["verdict"].startswith("no trend") and flat["reproduces"] is False
    assert S.evaluate_endpoint(S.ENDPOINTS[3], [cell("a", 1e4, 0.0)], n_boot=10)["verdict"] == "no data"


# --------------------------------------------------------------------------- configurations


def test_v2_configs_fix_epochs_seeds_and_span_the_ladder():
    from flax import nnx

    from experiments.scale_v2 import FULL, GPU, V2_CONFIGS
    from influence.lm import LADDER, init_model, parameter_counts

    for cfg in V2_CONFIGS.values():
        assert set(cfg.scales) <= set(LADDER) and set(cfg.validate_scales) <= set(cfg.scales)
        assert 0 < cfg.epochs <= 4 and cfg.fisher == "sampled"
        assert cfg.fisher_seed not in cfg.seeds  # the Fisher's sampling key is not a training seed
        assert not set(cfg.host_plays) & (set(cfg.mixture.plays) | set(cfg.mixture.heldout_plays))
    for cfg in (FULL, GPU):
        assert len(cfg.seeds) >= 3 and len(cfg.validate_scales) >= 2
        assert cfg.counts.semantic >= 100 and min(cfg.counts.semantic_control, cfg.counts.memorised,
                                                  cfg.counts.style, cfg.counts.crosslingual) >= 50
        assert min(cfg.insertions) >= 50
    n = [parameter_counts(nnx.eval_shape(lambda s=s: init_model(LADDER[s].config(GPU.vocab_size, GPU.seq_len))))
         ["non_embedding"] for s in (GPU.scales[0], GPU.scales[-1])]
    assert n[0] < 1e6 < 30e6 < n[1]  # the accelerator ladder: below 1M to above 30M non-embedding parameters


@pytest.mark.skipif(not HAVE_WEB, reason="needs diatheke and Debian's sword-text-web (listed in .ci/apt-packages.txt)")
def test_full_v2_query_set_builds_from_its_mix():
    from experiments.scale_v2 import FULL, documents

    train, held, spec, specs = documents(FULL)
    kinds = [s.kind for s in specs]
    assert kinds.count("semantic") >= 100 and all(kinds.count(k) >= 50 for k in set(kinds) - {"semantic"})
    assert all(s.prompt.strip() and s.completion.strip() for s in specs)
    text = {w for d in train if d.source != "insertion" for w in words(d.text)}
    invented = {w for c in spec["canaries"] for w in c["text"].split()}
    assert not invented & text  # canary words occur nowhere else in training
    kjv = {d.doc_id: d.text for d in train if d.source == "kjv"}
    for s in specs:
        if s.kind in ("semantic", "semantic_control"):
            assert s.source_text in kjv[s.source_doc]
