"""Atomic, self-describing array files: ``.npz`` with an embedded JSON header.

A file is written to a temporary name in the same directory, flushed to disk, then
renamed over the target, so a crash never leaves a half-written file under the real
name. Every file carries a ``kind`` tag, the package version and a SHA-256 of its
arrays; reading a truncated, corrupt or foreign file raises :class:`FileFormatError`.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from influence.errors import FileFormatError

_HEADER = "__header__"




def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str((arr.dtype.str, arr.shape)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_arrays(path: str | os.PathLike, kind: str, arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> None:
    """Atomically write ``arrays`` and JSON-serialisable ``metadata`` as a tagged ``.npz``."""
    from influence import __version__

    header = {"kind": kind, "version": __version__, "sha256": _digest(arrays), "metadata": metadata}
    buf = _io.BytesIO()
    payload = {name: np.asarray(arr) for name, arr in arrays.items()}
    payload[_HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(buf, **payload)
    atomic_write_bytes(path, buf.getvalue())


def load_arrays(path: str | os.PathLike, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a file written by :func:`save_arrays`, checking its kind and checksum."""
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if _HEADER not in npz.files:
                raise FileFormatError(f"{path}: not a file written by influence (no header)")
            header = json.loads(npz[_HEADER].tobytes().decode())
            arrays = {name: npz[name] for name in npz.files if name != _HEADER}
    except FileFormatError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{path}: truncated or corrupt file ({type(e).__name__}: {e})") from e
    if header.get("kind") != kind:
        raise FileFormatError(f"{path}: holds {header.get('kind')!r}, expected {kind!r}")
    if _digest(arrays) != header.get("sha256"):
        raise FileFormatError(f"{path}: checksum mismatch; the file is corrupt")
    metadata = dict(header.get("metadata", {}))
    metadata.setdefault("version", header.get("version"))
    return arrays, metadata
