"""Any text corpus → fixed-length training sequences with provenance, tokenized with the
model's own tokenizer and cached on disk.

Sources (:func:`iter_documents`), each read one document at a time:

* a ``datasets`` folder (``save_to_disk``; Arrow, memory-mapped; a ``DatasetDict``'s
  ``split``, default ``train``),
* ``.jsonl`` / ``.json`` (one JSON object per line), ``.parquet`` (record batches), ``.csv``,
  each with a ``text_column`` (default ``text``),
* ``.txt`` / ``.md`` or any other file: the whole file is one document,
* a folder of such files (sorted by name).

Each document becomes ``[bos] + tokens``, cut into windows of ``seq_len`` tokens with stride
``seq_len - 1`` (``mode="window"``: every token a target exactly once) or only the first
window (``mode="truncate"``), padded with the pad id, as :mod:`influence.lm.sequences` does.
Columns: ``input_ids`` int32 ``[T]``, ``loss_mask`` int8 ``[T]``, ``token_starts`` /
``token_ends`` int32 ``[T]`` (character range of each token in ``text``), ``doc_index``
(int, in corpus order), ``doc_id`` (``<file>:<row>``), ``title`` (the same, for reports),
``source`` (file), ``chunk``, ``text`` (the window's exact text), ``char_start`` /
``char_end`` (its range in the document), ``target_char_start``, ``sequence_id``.

Cache (:func:`read_corpus` with ``cache_dir``): ``<cache_dir>/<key>/`` where ``key`` hashes
the data's bytes (:func:`data_fingerprint`), the tokenizer and the settings; documents are
tokenized ``shard_documents`` at a time into ``shard_NNNNN`` folders, each written
atomically, so an interrupted run resumes at the first missing shard; ``manifest.json`` is
written last.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pathlib
from collections.abc import Iterator

from influence.errors import ConfigError, DataError
from influence.runtime import io

from .sequences import _windows

CACHE_VERSION = 1
DATA_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}
MODES = ("window", "truncate")


def _is_datasets_folder(path: pathlib.Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json",
                                                                 "dataset_dict.json"))


def data_files(path: str | os.PathLike) -> list[pathlib.Path]:
    """The files a corpus path consists of (sorted), for fingerprinting.

    Raises:
      DataError: the path does not exist, or is an empty folder.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"corpus {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"corpus folder {path} holds no files")
    return files


def data_fingerprint(path: str | os.PathLike) -> str:
    """16 hex digits of SHA-256 over every file's relative name and bytes: the same data
    gives the same fingerprint wherever it lies."""
    path = pathlib.Path(path)
    h = hashlib.sha256()
    for file in data_files(path):
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def _text(value, where: str, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} holds {type(value).__name__}, not text")
    return value


def _missing_column(where: str, column: str, columns) -> str:
    return (f"{where} has no column {column!r}; its columns are {sorted(columns)} "
            f"(choose one with text_column= / --text-column)")


def _iter_file(file: pathlib.Path, column: str) -> Iterator[tuple[str, str]]:
    kind = DATA_SUFFIXES.get(file.suffix.lower(), "text")
    if kind == "jsonl":
        with open(file, encoding="utf-8") as f:
            try:
                for row, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError as e:
                        raise DataError(f"{file} line {row + 1} is not JSON ({e}); a .jsonl corpus holds one "
                                        f"JSON object per line") from None
                    if not isinstance(record, dict):
                        raise DataError(f"{file} line {row + 1} is not a JSON object")
                    if column not in record:
                        raise DataError(_missing_column(f"{file} line {row + 1}", column, record))
                    yield f"{file.name}:{row}", _text(record[column], f"{file} line {row + 1}", column)
            except UnicodeDecodeError as e:
                raise DataError(f"{file} is not UTF-8 text ({e})") from None
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            reader = pq.ParquetFile(file)
        except Exception as e:  # pyarrow raises ArrowInvalid (an Exception) on foreign files
            raise DataError(f"{file} is not a Parquet file ({e})") from None
        if column not in reader.schema_arrow.names:
            raise DataError(_missing_column(str(file), column, reader.schema_arrow.names))
        row = 0
        for batch in reader.iter_batches(columns=[column], batch_size=1024):
            for value in batch.column(0).to_pylist():
                yield f"{file.name}:{row}", _text(value, f"{file} row {row}", column)
                row += 1
    elif kind == "csv":
        csv.field_size_limit(1 << 30)
        try:
            with open(file, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or column not in reader.fieldnames:
                    raise DataError(_missing_column(str(file), column, reader.fieldnames or []))
                for row, record in enumerate(reader):
                    yield f"{file.name}:{row}", _text(record[column], f"{file} row {row}", column)
        except UnicodeDecodeError as e:
            raise DataError(f"{file} is not UTF-8 text ({e})") from None
    else:
        data = file.read_bytes()
        if b"\0" in data[:8192]:
            raise DataError(f"{file} is not a text file (it holds NUL bytes); corpora are .txt, .jsonl, .parquet, "
                            f".csv files or a datasets folder")
        try:
            yield file.name, data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{file} is not UTF-8 text ({e})") from None


def iter_documents(path: str | os.PathLike, text_column: str = "text",
                   split: str = "train") -> Iterator[tuple[str, str, str]]:
    """``(doc_id, source, text)`` of every document of the corpus at ``path``, streamed.

    Raises:
      DataError: a missing path, an empty folder, a file that is not of its kind, no
        ``text_column``, or a non-text value in it.
    """
    path = pathlib.Path(path)
    if _is_datasets_folder(path):
        from datasets import DatasetDict, load_from_disk

        try:
            data = load_from_disk(str(path))
        except Exception as e:  # datasets raises FileNotFoundError or its own errors on foreign folders
            raise DataError(f"{path} is not a readable datasets folder ({e})") from None
        if isinstance(data, DatasetDict):
            if split not in data:
                raise DataError(f"{path} has no split {split!r}; its splits are {sorted(data)}")
            data = data[split]
        if text_column not in data.column_names:
            raise DataError(_missing_column(str(path), text_column, data.column_names))
        column = data.select_columns([text_column])
        for start in range(0, len(column), 1024):
            for i, value in enumerate(column[start:start + 1024][text_column]):
                yield f"{path.name}:{start + i}", path.name, _text(value, f"{path} row {start + i}", text_column)
        return
    for file in data_files(path):
        for doc_id, text in _iter_file(file, text_column):
            yield doc_id, file.name, text


def _features(seq_len: int):
    from datasets import Features, List, Value

    def ints(dtype: str):
        return List(Value(dtype), length=seq_len)

    return Features({"input_ids": ints("int32"), "loss_mask": ints("int8"), "token_starts": ints("int32"),
                     "token_ends": ints("int32"), "doc_index": Value("int64"), "doc_id": Value("string"),
                     "title": Value("string"), "source": Value("string"), "chunk": Value("int32"),
                     "text": Value("string"), "char_start": Value("int32"), "char_end": Value("int32"),
                     "target_char_start": Value("int32"), "sequence_id": Value("int64")})


def _sequences(docs: list[tuple[int, str, str, str]], tokenizer, seq_len: int, mode: str, first_id: int) -> dict:
    """Columns of the sequences of ``docs`` (``(doc_index, doc_id, source, text)``)."""
    out: dict[str, list] = {k: [] for k in _features(seq_len)}
    encoded = tokenizer.encode_with_offsets([d[3] for d in docs])
    pad = tokenizer.pad_id
    for (doc_index, doc_id, source, text), (ids, offsets) in zip(docs, encoded):
        ids = [tokenizer.bos_id, *ids]
        offsets = [(0, 0), *offsets]
        for chunk, start, stop in _windows(len(ids), seq_len):
            if mode == "truncate" and chunk > 0:
                break
            n = stop - start
            c0 = offsets[start][0] if start > 0 else 0
            c1 = offsets[stop - 1][1]
            rel = [(a - c0, b - c0) if k + start > 0 else (0, 0) for k, (a, b) in enumerate(offsets[start:stop])]
            out["input_ids"].append(ids[start:stop] + [pad] * (seq_len - n))
            out["loss_mask"].append([0] + [1] * (n - 1) + [0] * (seq_len - n))
            out["token_starts"].append([a for a, _ in rel] + [0] * (seq_len - n))
            out["token_ends"].append([b for _, b in rel] + [0] * (seq_len - n))
            out["doc_index"].append(doc_index)
            out["doc_id"].append(doc_id)
            out["title"].append(doc_id)
            out["source"].append(source)
            out["chunk"].append(chunk)
            out["text"].append(text[c0:c1])
            out["char_start"].append(c0)
            out["char_end"].append(c1)
            out["target_char_start"].append(offsets[start + 1][0])
            out["sequence_id"].append(first_id + len(out["sequence_id"]))
    return out


def cache_key(data: str, tokenizer_fingerprint: str, settings: dict) -> str:
    text = json.dumps({"data": data, "tokenizer": tokenizer_fingerprint, "v": CACHE_VERSION, **settings},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def corpus_settings(seq_len: int, text_column: str = "text", mode: str = "window", split: str = "train",
                    max_documents: int | None = None, shard_documents: int = 1000) -> dict:
    """Every setting that changes :func:`read_corpus`'s sequences (its cache key's part)."""
    return {"seq_len": int(seq_len), "text_column": text_column, "mode": mode, "split": split,
            "max_documents": None if max_documents is None else int(max_documents),
            "shard_documents": int(shard_documents)}


def cache_folder(cache_dir: str | os.PathLike, data: str, tokenizer, settings: dict) -> pathlib.Path:
    """Where :func:`read_corpus` caches the corpus of fingerprint ``data`` (see
    :func:`data_fingerprint`) tokenized by ``tokenizer`` with ``settings`` (of
    :func:`corpus_settings`)."""
    return pathlib.Path(cache_dir) / cache_key(data, tokenizer.fingerprint(), settings)


def load_cached(folder: str | os.PathLike):
    """The sequences :func:`read_corpus` cached in ``folder`` (one of ``cache_dir``'s).

    Raises:
      DataError: the folder holds no complete cache (``manifest.json`` is written last).
    """
    from datasets import load_from_disk

    folder = pathlib.Path(folder)
    if not (folder / "manifest.json").is_file():
        raise DataError(f"{folder} holds no complete tokenized corpus (no manifest.json); read the corpus again")
    manifest = json.loads((folder / "manifest.json").read_text())
    return _concatenate([load_from_disk(str(folder / s)) for s in manifest["shards"]])


def read_corpus(path: str | os.PathLike, tokenizer, *, seq_len: int, text_column: str = "text",
                mode: str = "window", split: str = "train", max_documents: int | None = None,
                cache_dir: str | os.PathLike | None = None, shard_documents: int = 1000,
                fingerprint: str | None = None):
    """Training sequences (a ``datasets.Dataset``, columns in the module docstring) of the
    corpus at ``path``, tokenized with ``tokenizer`` (``encode_with_offsets``, ``bos_id``,
    ``pad_id``, ``fingerprint``; e.g. :class:`influence.pretrained.PretrainedTokenizer`).

    Args:
      seq_len: tokens per sequence (the model's context or less), at least 2.
      mode: ``"window"`` (every token of every document, in overlapping windows) or
        ``"truncate"`` (each document's first ``seq_len`` tokens only).
      max_documents: read only the first N documents.
      cache_dir: keep the tokenized shards there, keyed by data, tokenizer and settings;
        a later call with the same key reads them, an interrupted one resumes.
      shard_documents: documents per cached shard (bounds memory while tokenizing).
      fingerprint: :func:`data_fingerprint` of ``path``, if known (saves hashing it again).

    Raises:
      DataError: see :func:`iter_documents`; a corpus without any non-empty document.
    """
    from datasets import Dataset, load_from_disk

    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2 (one context token and one target), got {seq_len}")
    settings = corpus_settings(seq_len, text_column, mode, split, max_documents, shard_documents)
    folder = None
    if cache_dir is not None:
        folder = cache_folder(cache_dir, fingerprint or data_fingerprint(path), tokenizer, settings)
        if (folder / "manifest.json").is_file():
            return load_cached(folder)
    features = _features(seq_len)
    shards, parts, batch = [], [], []
    n_sequences = n_docs = 0

    def flush(batch: list) -> None:
        nonlocal n_sequences
        name = f"shard_{len(shards):05d}"
        shards.append(name)
        if folder is not None and (folder / name / "done.json").is_file():  # written by an interrupted run
            part = load_from_disk(str(folder / name))
        else:
            part = Dataset.from_dict(_sequences(batch, tokenizer, seq_len, mode, n_sequences), features=features)
            if folder is not None:
                with io.atomic_path(folder / name, directory=True) as tmp:
                    part.save_to_disk(str(tmp))
                    (tmp / "done.json").write_text(json.dumps({"sequences": len(part)}))
                part = load_from_disk(str(folder / name))
        n_sequences += len(part)
        parts.append(part)

    for doc_id, source, text in iter_documents(path, text_column, split):
        if max_documents is not None and n_docs >= max_documents:
            break
        if text:
            batch.append((n_docs, doc_id, source, text))
        n_docs += 1
        if len(batch) >= shard_documents:
            # A resumed run skips tokenizing shards it finds complete (flush reloads them).
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if n_sequences == 0:
        raise DataError(f"corpus {path} has no non-empty document in column {text_column!r}")
    if folder is not None:
        io.atomic_write_json(folder / "manifest.json", {"shards": shards, "sequences": n_sequences,
                                                        "documents": n_docs, "settings": settings,
                                                        "path": str(path)})
    return _concatenate(parts)


def _concatenate(parts: list):
    from datasets import concatenate_datasets

    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
