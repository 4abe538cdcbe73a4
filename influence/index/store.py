"""The on-disk gradient index: memory-mapped ``.npy`` shards and a JSON manifest.

A folder::

    manifest.json        what the index holds and what it was built from (below)
    maps.npz             the compression's side maps (checksummed, runtime.io)
    shards/s<segment>-<shard>-l<layer>.npy       stored rows [rows, k_a·k_s] of one layer
    shards/s<segment>-<shard>-l<layer>.scale.npy int8 only: float32 scales [rows]

The manifest records the model (structure fingerprint and weights digest), the task,
the factors' digest, the compression, each layer's sizes, every shard with its rows
and, per file, its size in bytes and SHA-256, and per shard a digest of its training
rows. Row ``r`` of the index is training sequence ``row_offset + r``.

Shards are written atomically as they fill and the manifest last, atomically: a folder
without a manifest is not an index, and an index lists only complete shards. A shard
whose size differs from its entry (a torn or truncated file) is refused on open; its
SHA-256 is checked by :meth:`Index.verify`. Using an index with another model, factors,
task or data is refused with a message naming what differs.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from influence.errors import DataError, FileFormatError, InfluenceError, ModelMismatch
from influence.index.compress import FILE_DTYPES, LEVELS, MAP_KEYS, Compression, row_bytes, stored_width
from influence.runtime import io
from influence.runtime.data import as_source

KIND = "influence-index"
FORMAT = 1
MANIFEST = "manifest.json"
MAPS = "maps.npz"
MAPS_KIND = "influence-index-maps"
SHARDS = "shards"


def task_id(task: Any) -> str:
    """What identifies a task in a manifest: its repr for a dataclass (fields included),
    else its class."""
    import dataclasses

    if dataclasses.is_dataclass(task):
        return repr(task)
    return f"{type(task).__module__}.{type(task).__qualname__}"


def row_digests(arrays: dict[str, np.ndarray], n_valid: int) -> np.ndarray:
    """SHA-256 of each of the first ``n_valid`` rows of a batch, ``uint8 [n_valid, 32]``:
    every field (sorted by name) with its dtype, row shape and bytes. Independent of how
    the data is batched."""
    out = np.zeros((n_valid, 32), np.uint8)
    fields = [(name, np.ascontiguousarray(arrays[name][:n_valid])) for name in sorted(arrays)]
    for i in range(n_valid):
        h = hashlib.sha256()
        for name, arr in fields:
            h.update(name.encode())
            h.update(str((arr.dtype.str, arr.shape[1:])).encode())
            h.update(arr[i].tobytes())
        out[i] = np.frombuffer(h.digest(), np.uint8)
    return out


def rows_digest(digests: np.ndarray) -> str:
    """One digest of consecutive rows from their :func:`row_digests`."""
    return hashlib.sha256(np.ascontiguousarray(digests, np.uint8).tobytes()).hexdigest()[:32]


def npy_bytes(array: np.ndarray) -> bytes:
    buf = _io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_file(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` atomically; its manifest entry (size and SHA-256)."""
    io.atomic_write_bytes(path, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class Index:
    """An opened index (read-only): the manifest, the maps, memory-mapped shards.

    Attributes:
      path: the index folder.
      manifest: its parsed ``manifest.json``.
      compression: the :class:`~influence.index.compress.Compression` it was built with.
      maps: ``{layer: {"a": ..., "s": ..., ...}}`` the compression's maps (keys among
        :data:`~influence.index.compress.MAP_KEYS`; empty for ``"none"``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        file = self.path / MANIFEST
        if not file.is_file():
            raise FileFormatError(f"{self.path}: no {MANIFEST}; not an index (or its build has not finished: run "
                                  "build_index again with the same arguments to resume it)")
        try:
            manifest = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise FileFormatError(f"{file}: unreadable manifest ({e})") from e
        if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
            raise FileFormatError(f"{file}: not an influence index manifest")
        if manifest.get("format") != FORMAT:
            raise FileFormatError(f"{file}: index format {manifest.get('format')}, this version reads {FORMAT}")
        self.manifest = manifest
        self.compression = Compression(**manifest["compression"])
        arrays, _ = io.load_arrays(self.path / MAPS, MAPS_KIND)
        self.maps = {info["name"]: {side: arrays[f"{info['name']}/{side}"] for side in MAP_KEYS
                                    if f"{info['name']}/{side}" in arrays} for info in self.layers}
        self._check_files()

    def __repr__(self) -> str:
        return (f"Index({str(self.path)!r}, rows={self.n_rows}, compression={str(self.compression)!r}, "
                f"bytes_per_sequence={self.bytes_per_sequence})")

    @property
    def layers(self) -> list[dict[str, Any]]:
        """Per tracked layer: ``name``, ``d_a``, ``d_out``, ``k_a``, ``k_s``, ``rank`` (c, or 0)
        and ``width`` (numbers stored per row: ``k_a·k_s``, ``c·(d_a + d_out)``, or the
        coordinates a selection keeps, with ``k_a = d_a``, ``k_s = d_out``)."""
        return self.manifest["layers"]

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def row_offset(self) -> int:
        return int(self.manifest["row_offset"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def bytes(self) -> int:
        """Bytes of every file the index writes: its shards, maps and manifest."""
        shards = sum(f["bytes"] for shard in self.shards for f in shard["files"])
        return shards + (self.path / MAPS).stat().st_size + (self.path / MANIFEST).stat().st_size

    @property
    def chosen(self) -> dict[str, Any] | None:
        """What a ``"fidelity"`` choice measured at build time (``None`` otherwise): the
        target, the probe's mean and least top-10 agreement with exact scores, whether the
        target was reached, bytes per sequence and each layer's kept share and agreement
        (:mod:`influence.index.choose`)."""
        return self.manifest.get("chosen")

    @property
    def bytes_per_sequence(self) -> float:
        """Stored bytes per training sequence (data and scales, headers excluded)."""
        dtype = self.compression.dtype
        return float(sum(row_bytes(layer["width"], dtype) for layer in self.layers))

    def _check_files(self) -> None:
        expected = 0
        for shard in self.shards:
            lo, hi = shard["rows"]
            if lo != expected:
                raise FileFormatError(f"{self.path}: the shards do not tile the rows (a shard starts at {lo}, "
                                      f"expected {expected})")
            expected = hi
            for entry in shard["files"]:
                file = self.path / entry["file"]
                size = file.stat().st_size if file.is_file() else None
                if size != entry["bytes"]:
                    raise FileFormatError(
                        f"{file}: {'missing' if size is None else f'{size} bytes'}, the manifest says "
                        f"{entry['bytes']}: a torn or truncated shard; rebuild the index (build_index(..., "
                        "overwrite=True))")
        if expected != self.n_rows:
            raise FileFormatError(f"{self.path}: the shards hold {expected} rows, the manifest says {self.n_rows}")

    def verify(self) -> None:
        """Check every shard file's SHA-256 against the manifest (reads the whole index);
        :class:`FileFormatError` naming the first that differs."""
        for shard in self.shards:
            for entry in shard["files"]:
                file = self.path / entry["file"]
                h = hashlib.sha256()
                with open(file, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        h.update(block)
                if h.hexdigest() != entry["sha256"]:
                    raise FileFormatError(f"{file}: checksum mismatch; the shard is corrupt: rebuild the index")

    def layer_arrays(self, shard: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Memory-mapped ``(data [rows, D], scales [rows] or None)`` of one shard, per layer."""
        by_layer: dict[int, list] = {}
        for entry in shard["files"]:
            by_layer.setdefault(entry["layer"], []).append(entry)
        out = []
        rows = shard["rows"][1] - shard["rows"][0]
        for i, layer in enumerate(self.layers):
            data = scale = None
            for entry in by_layer.get(i, []):
                try:
                    arr = np.load(self.path / entry["file"], mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise FileFormatError(f"{self.path / entry['file']}: unreadable shard ({e})") from e
                if entry.get("scale"):
                    scale = arr
                else:
                    data = arr
            width = stored_width(layer["width"], self.compression.dtype)
            if (data is None or data.shape != (rows, width)
                    or data.dtype != np.dtype(FILE_DTYPES[self.compression.dtype])):
                raise FileFormatError(f"{self.path}: shard rows {shard['rows']} of layer {layer['name']!r}: expected "
                                      f"{FILE_DTYPES[self.compression.dtype].__name__} [{rows}, {width}], found "
                                      f"{None if data is None else (data.dtype, data.shape)}")
            if self.compression.dtype in LEVELS and (scale is None or scale.shape != (rows,)):
                raise FileFormatError(f"{self.path}: shard rows {shard['rows']} of layer {layer['name']!r} has no "
                                      f"{self.compression.dtype} scales of its rows")
            out.append((data, scale))
        return out

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, int, list[tuple[np.ndarray, np.ndarray | None]]]]:
        """``(first row, rows, per layer (data, scales))`` of at most ``chunk_rows`` rows
        at a time, in row order (rows of this index, ``row_offset`` not added)."""
        for shard in self.shards:
            lo, hi = shard["rows"]
            arrays = self.layer_arrays(shard)
            will_need(arrays, 0, min(chunk_rows, hi - lo))
            for start in range(lo, hi, chunk_rows):
                stop = min(start + chunk_rows, hi)
                if stop < hi:  # the disk reads the next chunk while this one is scored
                    will_need(arrays, stop - lo, min(stop + chunk_rows, hi) - lo)
                yield start, stop - start, [(d[start - lo:stop - lo], None if s is None else s[start - lo:stop - lo])
                                            for d, s in arrays]

    # --- what it was built from -----------------------------------------------------

    def differences(self, built_from: dict[str, Any]) -> list[str]:
        """What differs between this index's ``built_from`` and ``built_from`` (model,
        weights, task, factors), as phrases for a message."""
        ours = self.manifest["built_from"]
        labels = {"fingerprint": "the model's structure", "weights": "the model's weights", "task": "the task",
                  "factors": "the factors", "strategy": "the factors' strategy", "layers": "the tracked layers"}
        return [f"{labels.get(key, key)} ({ours.get(key)!r} in the index, {built_from.get(key)!r} now)"
                for key in labels if io.canonical_json(ours.get(key)) != io.canonical_json(built_from.get(key))]

    def check(self, built_from: dict[str, Any]) -> None:
        """Refuse an index built from another model, task or factors, saying which."""
        problems = self.differences(built_from)
        if not problems:
            return
        model = any(p.startswith(("the model", "the tracked")) for p in problems)
        error = ModelMismatch if model else InfluenceError
        raise error(f"the index at {self.path} was built from another "
                    f"{'model' if model else 'task or factors'}: it differs in " + "; ".join(problems)
                    + ". Build an index for these (influence.build_index), or score without index=")


def will_need(arrays: list[tuple[np.ndarray, np.ndarray | None]], lo: int, hi: int) -> None:
    """Ask the kernel to start reading rows ``lo..hi-1`` of a shard's memory-mapped
    arrays (``posix_fadvise(WILLNEED)``: it returns at once and the pages arrive while
    the caller works, so a cold scan overlaps its reads with its scoring). A no-op where
    the call or the file is not there."""
    advise = getattr(os, "posix_fadvise", None)
    for arr in (a for pair in arrays for a in pair):
        if advise is None or not isinstance(arr, np.memmap) or arr.filename is None:
            continue
        stride = arr.strides[0]
        try:
            fd = os.open(arr.filename, os.O_RDONLY)
            try:
                advise(fd, arr.offset + lo * stride, (hi - lo) * stride, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:  # a hint only: the scan reads the rows anyway
            pass


_CHECK_BATCH = 256


def check_data(parts: list[Index], train: Any, task: Any, batch_size: int | None) -> None:
    """Refuse ``train`` unless its rows are those the index parts were built on (their
    shards' row digests; reads the data, computes nothing on the model): a
    :class:`DataError` saying how it differs."""
    bounds = []  # (global lo, global hi, digest) of every shard, in row order
    for part in parts:
        bounds += [(part.row_offset + s["rows"][0], part.row_offset + s["rows"][1], s["data"]) for s in part.shards]
    total = bounds[-1][1] if bounds else 0
    pending = np.zeros((0, 32), np.uint8)
    shard = 0
    rows = 0
    for batch in as_source(train, batch_size or _CHECK_BATCH, task):  # read only: any batch size hashes the same rows
        rows += batch.n_valid
        pending = np.concatenate([pending, row_digests(batch.arrays, batch.n_valid)])
        while shard < len(bounds) and len(pending) >= bounds[shard][1] - bounds[shard][0]:
            lo, hi, expected = bounds[shard]
            if rows_digest(pending[:hi - lo]) != expected:
                raise DataError(f"the index was built on other data: training rows {lo}..{hi - 1} differ from those "
                                f"the index at {parts[0].path} holds; pass the training set it was built on, or "
                                "rebuild it")
            pending, shard = pending[hi - lo:], shard + 1
    if rows != total:
        raise DataError(f"the index at {parts[0].path} holds {total} training rows, the data has {rows}; pass the "
                        "training set it was built on (an appended index covers the appended rows too)")


def open_parts(index: Any) -> list[Index]:
    """The parts of ``index`` in row order: an :class:`Index`, a path (an index folder,
    or a folder of ``part-*`` index folders, one per host), or a list of those. Their rows
    must tile ``0..N-1`` (each part's ``row_offset``)."""
    items = index if isinstance(index, list | tuple) else [index]
    parts: list[Index] = []
    for item in items:
        if isinstance(item, Index):
            parts.append(item)
            continue
        path = Path(item)
        if (path / MANIFEST).is_file() or not path.is_dir():
            parts.append(Index(path))
            continue
        found = sorted(p for p in path.glob("part-*") if (p / MANIFEST).is_file())
        if not found:
            raise FileFormatError(f"{path}: no {MANIFEST} and no part-*/{MANIFEST}; not an index")
        parts += [Index(p) for p in found]
    parts.sort(key=lambda p: p.row_offset)
    expected = 0
    for part in parts:
        if part.row_offset != expected:
            raise DataError(f"the index parts do not tile the training rows: {part.path} starts at row "
                            f"{part.row_offset}, expected {expected} (a host's part is missing or duplicated)")
        expected += part.n_rows
    first = parts[0]
    for part in parts[1:]:
        if part.manifest["built_from"] != first.manifest["built_from"] or part.compression != first.compression:
            raise InfluenceError(f"the index parts {first.path} and {part.path} were built from other models, factors "
                                 "or compressions; build every part with the same ones")
        if any(not np.array_equal(part.maps[n][s], first.maps[n][s]) for n in first.maps for s in first.maps[n]):
            raise InfluenceError(f"the index parts {first.path} and {part.path} have other compression maps (a "
                                 "'fidelity' choice depends on the rows it samples): build every part with "
                                 "compression=<the first part's Index>, which reuses its maps")
    return parts
