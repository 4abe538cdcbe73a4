"""Atomic, self-describing array files: ``.npz`` with an embedded JSON header.

A file is written to a temporary name in the same directory, flushed to disk, then
renamed over the target, so a crash never leaves a half-written file under the real
name. Every file carries a ``kind`` tag, the package version and a SHA-256 of its
arrays; reading a truncated, corrupt or foreign file raises :class:`FileFormatError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import os
import shutil
import struct
import tempfile
import tokenize
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from influence._version import __version__
from influence.errors import FileFormatError

_HEADER = "__header__"

# What numpy's and zipfile's readers raise on a corrupt or truncated file (found by the
# bit-flip and truncation fuzz of tests/runtime/test_fuzz.py): a flipped compression
# method is NotImplementedError, a flipped encryption flag RuntimeError, a flipped
# length ValueError or struct.error, a damaged .npy header dict SyntaxError or
# tokenize.TokenError (numpy parses it with ast.literal_eval), a damaged deflate stream
# zlib.error.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, struct.error, OSError, EOFError, ValueError, KeyError, TypeError,
                IndexError, OverflowError, RuntimeError, NotImplementedError, SyntaxError, tokenize.TokenError,
                MemoryError)


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (``os.umask``
    sets it, so reading it that way briefly gives other threads a mask of 0)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def hash_arrays(h, items: Iterable[tuple[str, Any]]) -> None:
    """Feed named arrays into the hash ``h``: each array's name, dtype, shape and bytes.
    The one array digest of the library (file checksums, settings digests, data chains)."""
    for name, value in items:
        arr = np.ascontiguousarray(np.asarray(value))
        h.update(name.encode())
        h.update(str((arr.dtype.str, arr.shape)).encode())
        h.update(arr.tobytes())


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    hash_arrays(h, ((name, arrays[name]) for name in sorted(arrays)))
    return h.hexdigest()


def digest_arrays(tree: Any) -> str:
    """SHA-256 (first 16 hex digits) of every array in a pytree: paths, values, shapes, dtypes."""
    import jax

    h = hashlib.sha256()
    hash_arrays(h, ((jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)))
    return h.hexdigest()[:16]


def canonical_json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, keys sorted, other objects
    their ``str``): what settings are compared as."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (a file, or an empty folder with
    ``directory=True``); when the block ends without an exception it is renamed over
    ``path`` (an existing folder is replaced), otherwise removed. The one way the library
    writes anything that must never be seen half-written. The result has the permissions
    ``open`` would give it (0o666, a folder 0o777, less the process umask), not the
    owner-only ones of a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
        yield tmp
        if directory:
            if path.exists():
                shutil.rmtree(path)
        else:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=indent, ensure_ascii=False).encode())


def save_arrays(path: str | os.PathLike, kind: str, arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> None:
    """Atomically write ``arrays`` and JSON-serialisable ``metadata`` as a tagged ``.npz``."""
    header = {"kind": kind, "version": __version__, "sha256": _digest(arrays), "metadata": metadata}
    buf = _io.BytesIO()
    payload = {name: np.asarray(arr) for name, arr in arrays.items()}
    payload[_HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(buf, **payload)
    atomic_write_bytes(path, buf.getvalue())


def stored_digest(path: str | os.PathLike) -> str | None:
    """The SHA-256 of the arrays of a :func:`save_arrays` file (names, dtypes, shapes and
    bytes), read from its header without loading the arrays; ``None`` for a file without
    a header. :func:`load_arrays` refuses a file whose arrays do not match it, so it
    identifies the file's content."""
    with np.load(path, allow_pickle=False) as npz:
        if _HEADER not in npz.files:
            return None
        return json.loads(npz[_HEADER].tobytes().decode()).get("sha256")


def load_arrays(path: str | os.PathLike, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a file written by :func:`save_arrays`, checking its kind and checksum.

    Raises :class:`FileFormatError` for a missing, truncated, corrupt or foreign file,
    whatever the readers underneath raise; returns ``(arrays, metadata)`` only for a file
    whose arrays match the checksum in its header."""
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path}: no such file")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise FileFormatError(f"{path}: not a file written by influence (a bare .npy array, not an .npz)")
        with npz:
            if _HEADER not in npz.files:
                raise FileFormatError(f"{path}: not a file written by influence (no header)")
            header = json.loads(npz[_HEADER].tobytes().decode())
            arrays = {name: npz[name] for name in npz.files if name != _HEADER}
    except FileFormatError:
        raise
    except _READ_ERRORS as e:  # json.JSONDecodeError is a ValueError
        raise FileFormatError(f"{path}: truncated or corrupt file ({type(e).__name__}: {e})") from e
    if not isinstance(header, dict) or not isinstance(header.get("metadata", {}), dict):
        raise FileFormatError(f"{path}: corrupt header (not a JSON object with a metadata object)")
    if header.get("kind") != kind:
        raise FileFormatError(f"{path}: holds {header.get('kind')!r}, expected {kind!r}")
    if _digest(arrays) != header.get("sha256"):
        raise FileFormatError(f"{path}: checksum mismatch; the file is corrupt")
    metadata = dict(header.get("metadata", {}))
    metadata.setdefault("version", header.get("version"))
    return arrays, metadata
