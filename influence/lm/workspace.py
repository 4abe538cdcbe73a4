"""A workspace: a pretrained checkpoint folder and a text corpus studied together, in a
folder that every command opens like a training run (``influence fit|index|query --run``).

Layout of ``<root>/<model>-<model fingerprint>__<data>-<data fingerprint>-<settings>/``::

    run.json     {"kind": "pretrained", "model": {path, fingerprint, config}, "data": {path,
                 fingerprint, settings, train_sequences, documents}}
    tokens/      the tokenized corpus (influence.lm.reader's cache: shards, manifest.json)
    factors/     fitted factors, index and results, as in a run folder

The folder name is keyed by the fingerprints of the weights' and the data's bytes and by
the corpus settings (sequence length, text column, window or truncate), so another
checkpoint, corpus or setting never reuses it. Its ``step`` is 0 (one set of weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re

from influence.errors import CheckpointError, ConfigError
from influence.runtime import io

from . import reader

KIND = "pretrained"
DEFAULT_ROOT = pathlib.Path("runs") / "workspaces"


def _name(path: pathlib.Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", path.resolve().name)[:32] or "data"


def open_workspace(model_dir: str | os.PathLike, data: str | os.PathLike, *, root: str | os.PathLike = DEFAULT_ROOT,
                   seq_len: int | None = None, text_column: str = "text", mode: str = "window",
                   split: str = "train", max_documents: int | None = None) -> pathlib.Path:
    """The workspace folder of ``model_dir`` (a Hugging Face checkpoint folder) and the
    corpus ``data`` (see :mod:`influence.lm.reader`), created and tokenized if new.

    ``seq_len`` defaults to the model's context length (capped at 512 tokens). Raises
    :class:`~influence.errors.CheckpointError` for a folder that cannot be loaded and
    :class:`~influence.errors.DataError` for a corpus that cannot be read.
    """
    from influence.pretrained import PretrainedTokenizer, fingerprint, load_config

    model_dir, data = pathlib.Path(model_dir), pathlib.Path(data)
    arch, raw = load_config(model_dir)
    tokenizer = PretrainedTokenizer.load(model_dir, raw)
    seq_len = int(seq_len or min(arch.context_length, 512))
    if not 2 <= seq_len <= arch.context_length:
        raise ConfigError(f"seq_len {seq_len} must be between 2 and the model's context length {arch.context_length}")
    settings = reader.corpus_settings(seq_len, text_column, mode, split, max_documents)
    model_fp, data_fp = fingerprint(model_dir), reader.data_fingerprint(data)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    folder = pathlib.Path(root) / f"{_name(model_dir)}-{model_fp[:8]}__{_name(data)}-{data_fp[:8]}-{digest}"
    info_file = folder / "run.json"
    if info_file.is_file():
        return folder
    sequences = reader.read_corpus(data, tokenizer, cache_dir=folder / "tokens", fingerprint=data_fp, **settings)
    tokens = reader.cache_folder(folder / "tokens", data_fp, tokenizer, settings)
    manifest = json.loads((tokens / "manifest.json").read_text())
    info = {"kind": KIND,
            "model": {"path": str(model_dir.resolve()), "fingerprint": model_fp, "config": arch.to_dict()},
            "data": {"path": str(data.resolve()), "fingerprint": data_fp, "settings": settings, "tokens": tokens.name,
                     "train_sequences": len(sequences), "documents": manifest["documents"]}}
    io.atomic_write_json(info_file, info)
    return folder


def workspace_parts(path: str | os.PathLike, info: dict | None = None) -> dict:
    """The fields of the :class:`influence.lm.run.Run` of a workspace folder (which
    ``load_run`` builds from them): the pretrained model, its tokenizer, the corpus'
    sequences as ``train`` (``heldout`` and ``documents`` empty), ``step`` 0.

    Raises:
      CheckpointError: the checkpoint folder moved or its weights changed since the
        workspace was made (another fingerprint).
    """
    from datasets import Dataset

    from influence.pretrained import PretrainedTokenizer, fingerprint, load_config, load_model

    path = pathlib.Path(path)
    info = info or json.loads((path / "run.json").read_text())
    model_dir = pathlib.Path(info["model"]["path"])
    if not model_dir.is_dir() or fingerprint(model_dir) != info["model"]["fingerprint"]:
        raise CheckpointError(f"workspace {path} was made for the checkpoint {model_dir} (fingerprint "
                              f"{info['model']['fingerprint']}); that folder is gone or its weights or config.json "
                              f"changed: open a new workspace with --model and --data")
    model, arch = load_model(model_dir)
    _, raw = load_config(model_dir)
    tokenizer = PretrainedTokenizer.load(model_dir, raw)
    train = reader.load_cached(path / "tokens" / info["data"]["tokens"])
    empty = Dataset.from_dict({k: [] for k in train.features}, features=train.features)
    return {"path": path, "model": model, "tokenizer": tokenizer, "config": arch, "train": train, "heldout": empty,
            "documents": empty, "info": info, "state": {"step": 0}, "step": 0}
