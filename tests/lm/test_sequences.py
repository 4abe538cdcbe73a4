"""Sequence building: fixed length, masks, metadata, held-out splits, caching, and no lost text."""

import functools

import numpy as np
import pytest

from influence.lm import as_arrays, build_splits, token_display_spans
from influence.lm.sequences import describe
from tests.lm.helpers import bpe, docs

T = 64


@functools.cache
def splits(split_by="doc"):
    return build_splits(docs(), bpe(), seq_len=T, heldout_fraction=0.2, split_by=split_by)


def test_columns_types_and_masks():
    data = splits()
    train = data["train"]
    assert str(train.features["input_ids"].feature.dtype) == "int32"
    assert str(train.features["loss_mask"].feature.dtype) == "int8"
    for name in ("sequence_id", "doc_id", "title", "genre", "section", "speakers", "char_start", "char_end", "text"):
        assert name in train.column_names
    ids, mask = as_arrays(train)
    assert ids.shape == mask.shape == (len(train), T) and ids.dtype == np.int32
    assert (mask[:, 0] == 0).all()
    real = np.array([[tok != bpe().pad_id for tok in row] for row in ids])
    assert (mask[:, 1:] <= real[:, 1:]).all() and (ids[~real] == bpe().pad_id).all()
    assert (mask[:, 1:] == real[:, 1:]).all()  # every real token after position 0 is a target
    ids_all = np.concatenate([data["train"]["sequence_id"], data["heldout"]["sequence_id"]])
    assert len(np.unique(ids_all)) == len(ids_all)


def test_every_document_is_recovered_from_its_targets():
    """Never lose text: the target tokens of a document's windows tile its text exactly."""
    data = splits()
    texts = dict(zip(data["documents"]["doc_id"], data["documents"]["text"]))
    pieces: dict[str, list] = {d: [] for d in texts}
    for split in ("train", "heldout"):
        for row in data[split]:
            doc = texts[row["doc_id"]]
            assert row["text"] == doc[row["char_start"]:row["char_end"]]
            assert bpe().decode(row["input_ids"]) == row["text"]
            offsets = [(row["char_start"] + a, row["char_start"] + b)
                       for a, b, m in zip(row["token_starts"], row["token_ends"], row["loss_mask"]) if m]
            assert offsets[0][0] == row["target_char_start"]
            pieces[row["doc_id"]].append((row["chunk"], offsets))
    for doc_id, text in texts.items():
        offsets = [o for _, chunk in sorted(pieces[doc_id]) for o in chunk]
        assert "".join(text[a:b] for a, b in token_display_spans(offsets)) == text


def test_metadata_traces_sequences_to_scenes_and_speakers():
    data = splits()
    spans = {r["doc_id"]: list(zip(r["span_starts"], r["span_ends"], r["span_labels"])) for r in data["documents"]}
    first = next(r for s in ("train", "heldout") for r in data[s] if r["doc_id"] == "macbeth/000")
    assert first["title"] == "Macbeth" and first["genre"] == "tragedies" and first["chunk"] == 0
    assert first["section"] == "ACT I. SCENE I. A desert place."
    assert first["speakers"].split("; ")[0] == "First Witch" and "First Witch:\nWhen shall we three" in first["text"]
    assert describe(first).startswith("Macbeth (tragedies), ACT I. SCENE I. A desert place., chars 0-")
    for row in data["train"].select(range(0, len(data["train"]), 7)):
        touched = [lab for a, b, lab in spans[row["doc_id"]] if a < row["char_end"] and b > row["char_start"]]
        assert row["speakers"] == "; ".join(dict.fromkeys(touched))


@pytest.mark.parametrize("split_by,column", [("doc", "doc_id"), ("title", "title")])
def test_heldout_split_keeps_units_whole(split_by, column):
    data = splits(split_by)
    train, held = set(data["train"][column]), set(data["heldout"][column])
    assert held and train and not train & held
    docs_split = dict(zip(data["documents"]["doc_id"], data["documents"]["split"]))
    assert all(docs_split[d] == "heldout" for d in data["heldout"]["doc_id"])


def test_cache_is_reused_and_keyed_by_settings(tmp_path):
    first = build_splits(docs()[:4], bpe(), seq_len=T, cache_dir=tmp_path / "data")
    assert (tmp_path / "data" / "meta.json").exists()
    again = build_splits(docs()[:4], bpe(), seq_len=T, cache_dir=tmp_path / "data")
    assert again["train"]["sequence_id"] == first["train"]["sequence_id"]
    assert again["train"].cache_files  # memory-mapped from the saved copy
    other = build_splits(docs()[:4], bpe(), seq_len=T // 2, cache_dir=tmp_path / "data")
    assert len(other["train"][0]["input_ids"]) == T // 2


def test_bad_split_settings():
    with pytest.raises(ValueError, match="unknown split unit"):
        build_splits(docs()[:2], bpe(), split_by="speaker")
    with pytest.raises(ValueError, match="heldout fraction"):
        build_splits(docs()[:2], bpe(), heldout_fraction=1.0)
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        build_splits(docs()[:2], bpe(), seq_len=1)
    with pytest.raises(ValueError, match="ids must be unique; 'the-tempest/000'"):
        build_splits([docs()[0], docs()[0]], bpe())


def test_empty_heldout_split_is_saved_and_reloaded(tmp_path):
    # datasets saves an empty split with no data shards, which load_from_disk cannot read.
    from influence.lm.sequences import load_splits

    built = build_splits(docs(), bpe(), seq_len=T, heldout_fraction=0.0, cache_dir=tmp_path / "data")
    loaded = load_splits(tmp_path / "data")
    assert len(built["heldout"]) == len(loaded["heldout"]) == 0
    assert loaded["heldout"].features == built["train"].features
    assert loaded["train"]["input_ids"] == built["train"]["input_ids"]
    again = build_splits(docs(), bpe(), seq_len=T, heldout_fraction=0.0, cache_dir=tmp_path / "data")  # cache hit
    assert len(again["heldout"]) == 0 and len(again["train"]) == len(built["train"])
