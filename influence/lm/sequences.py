"""Fixed-length training sequences with provenance, built with ``datasets``.

Each document becomes ``[<|doc|>] + tokens`` cut into windows of ``seq_len`` tokens with a
stride of ``seq_len - 1``: consecutive windows share one token, so every real token of a
document is a prediction target in exactly one sequence (position 0 of a window is only
context). The last window of a document is padded with the pad id.

Columns of a sequence dataset (one row per sequence):

* ``input_ids`` int32 [T], ``loss_mask`` int8 [T] (1 iff token t is a real token predicted
  as a target; ``loss_mask[0] == 0``).
* ``sequence_id`` int64, unique across splits and stable for a given corpus, tokenizer and
  settings (documents in corpus order, windows in text order).
* provenance: ``doc_id``, ``source``, ``title``, ``genre``, ``section``, ``speakers`` (the
  labels of the document spans the window touches, joined by ``"; "``), ``chunk`` (window
  index in its document), ``text`` (the window's exact text), ``char_start``/``char_end``
  (its range in the document text), ``target_char_start`` (where its first target token
  starts), ``token_starts``/``token_ends`` int32 [T] (each token's character range in
  ``text``; (0, 0) for ``<|doc|>`` and padding).

Splits hold out whole documents (scenes), titles (plays) or sections, chosen by a seeded
hash of the group name so the choice does not depend on corpus order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from datasets import Dataset, DatasetDict, DatasetInfo, Features, List, Value, load_from_disk

from influence.errors import ConfigError
from influence.runtime import io

from .corpus import Document
from .tokenizer import Tokenizer

CACHE_VERSION = 1
SPLIT_KEYS = {"doc": "doc_id", "title": "title", "section": "section"}
_DOC_META = ("doc_id", "source", "title", "genre", "section")


def documents_dataset(docs: Sequence[Document]) -> Dataset:
    """One row per document: metadata, ``text`` and its spans as three parallel lists."""
    cols: dict[str, list] = {k: [getattr(d, k) for d in docs] for k in (*_DOC_META, "text")}
    cols["span_starts"] = [[s[0] for s in d.spans] for d in docs]
    cols["span_ends"] = [[s[1] for s in d.spans] for d in docs]
    cols["span_labels"] = [[s[2] for s in d.spans] for d in docs]
    features = Features({**{k: Value("string") for k in (*_DOC_META, "text")},
                         "span_starts": List(Value("int32")), "span_ends": List(Value("int32")),
                         "span_labels": List(Value("string"))})
    return Dataset.from_dict(cols, features=features)


def heldout_groups(docs: Sequence[Document], fraction: float, by: str = "doc", seed: int = 0) -> set[str]:
    """Names of the groups (documents, titles or sections) held out: the
    ``ceil(fraction * n_groups)`` groups with the smallest seeded hash (none if fraction is 0)."""
    if by not in SPLIT_KEYS:
        raise ConfigError(f"unknown split unit {by!r}; choose one of {sorted(SPLIT_KEYS)}")
    if not 0 <= fraction < 1:
        raise ConfigError(f"heldout fraction must be in [0, 1), got {fraction}")
    groups = sorted({getattr(d, SPLIT_KEYS[by]) for d in docs})
    ranked = sorted(groups, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    return set(ranked[: math.ceil(fraction * len(groups))])


def sequence_features(seq_len: int) -> Features:
    """Column types of a sequence dataset (``sequence_id`` is added after the ``.map``)."""
    def ints(dtype: str) -> List:
        return List(Value(dtype), length=seq_len)

    return Features({
        "input_ids": ints("int32"), "loss_mask": ints("int8"),
        "token_starts": ints("int32"), "token_ends": ints("int32"),
        **{k: Value("string") for k in _DOC_META}, "speakers": Value("string"), "chunk": Value("int32"),
        "text": Value("string"), "char_start": Value("int32"), "char_end": Value("int32"),
        "target_char_start": Value("int32"),
    })


def _windows(n_ids: int, seq_len: int):
    """Yield ``(chunk, start, stop)`` token windows over ``n_ids`` ids (the first being
    ``<|doc|>``), stride ``seq_len - 1``, until every id from index 1 on is a target once;
    an empty document yields none."""
    for chunk, start in enumerate(range(0, n_ids - 1, seq_len - 1)):
        yield chunk, start, min(start + seq_len, n_ids)


def _chunk_batch(batch: dict, tokenizer: Tokenizer, seq_len: int) -> dict:
    """Batched ``.map`` body: documents in, sequences out (row count changes)."""
    out: dict[str, list] = {k: [] for k in sequence_features(seq_len)}
    encoded = tokenizer.encode_with_offsets(batch["text"])
    pad = tokenizer.pad_id
    for i, (ids, offsets) in enumerate(encoded):
        text = batch["text"][i]
        ids = [tokenizer.bos_id, *ids]
        offsets = [(0, 0), *offsets]
        spans = list(zip(batch["span_starts"][i], batch["span_ends"][i], batch["span_labels"][i]))
        for chunk, start, stop in _windows(len(ids), seq_len):
            n = stop - start
            c0 = offsets[start][0] if start > 0 else 0  # window 0 begins with <|doc|>
            c1 = offsets[stop - 1][1]
            labels = list(dict.fromkeys(lab for a, b, lab in spans if a < c1 and b > c0))
            rel = [(a - c0, b - c0) if k + start > 0 else (0, 0) for k, (a, b) in enumerate(offsets[start:stop])]
            out["input_ids"].append(ids[start:stop] + [pad] * (seq_len - n))
            out["loss_mask"].append([0] + [1] * (n - 1) + [0] * (seq_len - n))
            out["token_starts"].append([a for a, _ in rel] + [0] * (seq_len - n))
            out["token_ends"].append([b for _, b in rel] + [0] * (seq_len - n))
            for k in _DOC_META:
                out[k].append(batch[k][i])
            out["speakers"].append("; ".join(labels))
            out["chunk"].append(chunk)
            out["text"].append(text[c0:c1])
            out["char_start"].append(c0)
            out["char_end"].append(c1)
            out["target_char_start"].append(offsets[start + 1][0])
    return out


def build_sequences(documents: Dataset, tokenizer: Tokenizer, seq_len: int = 128) -> Dataset:
    """Sequences of every document in ``documents`` (a :func:`documents_dataset`), with
    ``sequence_id`` numbering them in order."""
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2 (one context token and one target), got {seq_len}")
    seqs = documents.map(_chunk_batch, batched=True, batch_size=64, remove_columns=documents.column_names,
                         features=sequence_features(seq_len),
                         fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len}, desc="windows")
    return seqs.add_column("sequence_id", np.arange(len(seqs), dtype=np.int64))


def _fingerprint(docs: Sequence[Document], tokenizer: Tokenizer, settings: dict) -> str:
    h = hashlib.sha256(json.dumps({**settings, "v": CACHE_VERSION, "tok": tokenizer.fingerprint()},
                                  sort_keys=True).encode())
    for d in docs:
        h.update(json.dumps([d.doc_id, d.title, d.genre, d.section, d.text, d.spans]).encode())
    return h.hexdigest()[:16]


def build_splits(docs: Sequence[Document], tokenizer: Tokenizer, seq_len: int = 128,
                 heldout_fraction: float = 0.05, split_by: str = "doc", seed: int = 0,
                 cache_dir: str | os.PathLike | None = None) -> DatasetDict:
    """``DatasetDict`` with ``train`` and ``heldout`` sequences and the ``documents`` they
    come from (with a ``split`` column).

    With ``cache_dir``, the result is saved there (``save_to_disk``, written to a temporary
    folder and renamed into place) and reloaded on the next call with the same corpus,
    tokenizer and settings.
    """
    settings = {"seq_len": seq_len, "heldout_fraction": heldout_fraction, "split_by": split_by, "seed": seed}
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"document ids must be unique; {dup!r} appears more than once")
    held = heldout_groups(docs, heldout_fraction, split_by, seed)
    fingerprint = _fingerprint(docs, tokenizer, settings)
    if cache_dir is not None:
        cached = _load_cached(pathlib.Path(cache_dir), fingerprint)
        if cached is not None:
            return cached
    documents = documents_dataset(docs)
    key = SPLIT_KEYS[split_by]
    documents = documents.add_column("split", ["heldout" if v in held else "train" for v in documents[key]])
    seqs = build_sequences(documents, tokenizer, seq_len)
    split_of = dict(zip(documents["doc_id"], documents["split"]))
    is_held = np.array([split_of[d] == "heldout" for d in seqs["doc_id"]])
    result = DatasetDict({"train": seqs.select(np.flatnonzero(~is_held)),
                          "heldout": seqs.select(np.flatnonzero(is_held)), "documents": documents})
    if cache_dir is not None:
        _save_cached(result, pathlib.Path(cache_dir), {**settings, "fingerprint": fingerprint})
    return result


def _load_cached(cache_dir: pathlib.Path, fingerprint: str) -> DatasetDict | None:
    meta = cache_dir / "meta.json"
    if meta.exists() and json.loads(meta.read_text()).get("fingerprint") == fingerprint:
        return load_splits(cache_dir)
    return None


def _save_cached(data: DatasetDict, cache_dir: pathlib.Path, meta: dict) -> None:
    # atomic_path replaces a stale cache (other settings) only once the new one is complete.
    with io.atomic_path(cache_dir, directory=True) as tmp:
        data.save_to_disk(str(tmp))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def load_splits(cache_dir: str | os.PathLike) -> DatasetDict:
    """The ``DatasetDict`` saved by :func:`build_splits` in ``cache_dir``.

    An empty split (``heldout_fraction=0``) is saved by ``datasets`` with no data shards,
    which ``load_from_disk`` cannot read back; it is rebuilt here, empty, from its saved
    features.
    """
    cache_dir = pathlib.Path(cache_dir)
    names = json.loads((cache_dir / "dataset_dict.json").read_text())["splits"]
    return DatasetDict({name: _load_split(cache_dir / name) for name in names})


def _load_split(path: pathlib.Path) -> Dataset:
    if json.loads((path / "state.json").read_text()).get("_data_files"):
        return load_from_disk(str(path))
    features = DatasetInfo.from_directory(str(path)).features
    return Dataset.from_dict({name: [] for name in features}, features=features)


def as_arrays(data: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids int32 [N, T], loss_mask int32 [N, T])`` of a sequence dataset, in memory."""
    table = data.with_format("numpy")
    return (np.asarray(table["input_ids"], dtype=np.int32), np.asarray(table["loss_mask"], dtype=np.int32))


def describe(row: dict) -> str:
    """One line saying where a sequence comes from, e.g.
    ``"Macbeth (tragedies), ACT I. SCENE I. A desert place., chars 0-412, speakers: First Witch"``."""
    where = ", ".join(x for x in (f"{row['title']} ({row['genre']})" if row["genre"] else row["title"],
                                  row["section"]) if x)
    who = f", speakers: {row['speakers']}" if row["speakers"] else ""
    return f"{where or row['doc_id']}, chars {row['char_start']}-{row['char_end']}{who}"
