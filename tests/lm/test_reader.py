"""influence.lm.reader: every corpus format gives the same sequences with provenance that
reproduces the source text; the cache resumes shard by shard; bad files get DataError."""

from __future__ import annotations

import csv
import json
import pathlib

import pytest

from influence.errors import DataError
from influence.lm import reader
from influence.pretrained import PretrainedTokenizer

DATA = pathlib.Path(__file__).parent.parent / "data" / "pretrained" / "gpt2"
DOCS = ["the quick brown fox jumps over the lazy dog. " * 4, "to be or not to be", "",
        "all that glitters is not gold; judge my vow!", "pack my box with five dozen liquor jugs, " * 3]


@pytest.fixture(scope="module")
def tokenizer():
    return PretrainedTokenizer.load(DATA, json.loads((DATA / "config.json").read_text()))


def _write_all(root: pathlib.Path) -> dict[str, pathlib.Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    root.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": root / "c.jsonl", "parquet": root / "c.parquet", "csv": root / "c.csv",
             "datasets": root / "ds", "text": root / "texts"}
    paths["jsonl"].write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    pq.write_table(pa.table({"text": DOCS}), paths["parquet"])
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows(enumerate(DOCS))
    Dataset.from_dict({"text": DOCS}).save_to_disk(str(paths["datasets"]))
    paths["text"].mkdir()
    for i, d in enumerate(DOCS):
        (paths["text"] / f"doc{i}.txt").write_text(d)
    return paths


def _targets_text(row) -> str:
    """The text of the tokens that are targets of a sequence, from their offsets."""
    return "".join(row["text"][s:e] for s, e, m in zip(row["token_starts"], row["token_ends"], row["loss_mask"]) if m)


def test_every_format_gives_the_same_sequences_and_they_reproduce_the_text(tmp_path, tokenizer):
    paths = _write_all(tmp_path)
    results = {kind: reader.read_corpus(p, tokenizer, seq_len=8) for kind, p in paths.items()}
    ids = {kind: r["input_ids"] for kind, r in results.items()}
    assert all(v == ids["jsonl"] for v in ids.values())
    data = results["jsonl"]
    assert data["doc_id"][0] == "c.jsonl:0" and results["text"]["doc_id"][0] == "doc0.txt"
    # Every target token of every document, in order, rebuilds the document exactly once.
    for doc_index, text in enumerate(DOCS):
        rows = [r for r in data if r["doc_index"] == doc_index]
        assert "".join(_targets_text(r) for r in rows) == text
        for r in rows:
            assert text[r["char_start"]:r["char_end"]] == r["text"]
            assert r["input_ids"][0] == (tokenizer.bos_id if r["chunk"] == 0 else r["input_ids"][0])
    assert sorted(set(data["doc_index"])) == [0, 1, 3, 4]  # the empty document has no sequence
    assert data["sequence_id"] == list(range(len(data)))
    truncated = reader.read_corpus(paths["jsonl"], tokenizer, seq_len=8, mode="truncate")
    assert truncated["doc_index"] == [0, 1, 3, 4] and truncated["input_ids"] == [
        r["input_ids"] for r in data if r["chunk"] == 0]


def test_cache_reuses_and_resumes_shard_by_shard(tmp_path, tokenizer, monkeypatch):
    path = _write_all(tmp_path / "data")["jsonl"]
    cache = tmp_path / "cache"
    first = reader.read_corpus(path, tokenizer, seq_len=8, cache_dir=cache, shard_documents=1)
    (folder,) = cache.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"] + [f"shard_{i:05d}" for i in range(4)]
    calls = []
    real = tokenizer.encode_with_offsets
    monkeypatch.setattr(tokenizer, "encode_with_offsets", lambda texts: calls.append(list(texts)) or real(texts))
    assert reader.read_corpus(path, tokenizer, seq_len=8, cache_dir=cache, shard_documents=1)["input_ids"] == \
        first["input_ids"]
    assert calls == []  # read from the cache
    # An interrupted run: the manifest and the last shard never written; only that shard is redone.
    (folder / "manifest.json").unlink()
    import shutil

    shutil.rmtree(folder / "shard_00003")
    again = reader.read_corpus(path, tokenizer, seq_len=8, cache_dir=cache, shard_documents=1)
    assert again["input_ids"] == first["input_ids"] and again["sequence_id"] == first["sequence_id"]
    assert calls == [[DOCS[4]]]
    # Other settings or data: another key.
    reader.read_corpus(path, tokenizer, seq_len=6, cache_dir=cache, shard_documents=1)
    assert len(list(cache.iterdir())) == 2


def test_bad_corpora_raise_data_error(tmp_path, tokenizer):
    cases = {"empty.jsonl": b"", "binary.txt": b"\x00\x01\x02", "bad.jsonl": b'{"text": "a"}\nnot json\n',
             "list.jsonl": b"[1, 2]\n", "nocol.jsonl": b'{"body": "a"}\n', "foreign.parquet": b"not parquet",
             "nocol.csv": b"a,b\n1,2\n", "latin.txt": "caf\u00e9".encode("latin-1")}
    messages = {"empty.jsonl": "no non-empty document", "binary.txt": "not a text file",
                "bad.jsonl": "line 2 is not JSON", "list.jsonl": "not a JSON object", "nocol.jsonl": "no column 'text'",
                "foreign.parquet": "not a Parquet", "nocol.csv": "no column 'text'", "latin.txt": "not UTF-8"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=messages[name]):
            reader.read_corpus(tmp_path / name, tokenizer, seq_len=8)
    with pytest.raises(DataError, match="does not exist"):
        reader.read_corpus(tmp_path / "nowhere", tokenizer, seq_len=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        reader.read_corpus(tmp_path / "empty", tokenizer, seq_len=8)
