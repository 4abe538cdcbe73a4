"""Atomic checkpoints of a training run.

A checkpoint is a folder ``<run>/checkpoints/step_NNNNNNN/`` holding

* ``params.npz`` and ``opt_state.npz``: every array leaf of the parameter and optimizer
  state pytrees, keyed by its ``jax.tree_util.keystr`` path, in the library's checksummed
  format (:func:`influence.runtime.io.save_arrays`, kinds :data:`PARAMS_KIND` and
  :data:`OPT_STATE_KIND`); plain ``.npz`` files of runs written before that still load;
* ``state.json``: training metadata (step, tokens seen, losses, timings, versions);
* copies of the run's ``run.json`` (configuration) and ``tokenizer.json``, so a checkpoint
  is usable on its own.

It is written into a hidden temporary folder and renamed into place
(:func:`influence.runtime.io.atomic_path`), so an interruption never leaves a half-written
checkpoint under a real name; ``checkpoints/latest.json`` (replaced atomically) names the
newest one.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import zipfile

import jax
import numpy as np

from influence.errors import ConfigError, FileFormatError
from influence.runtime import io

LATEST = "latest.json"
PARAMS_KIND = "influence-lm-params"
OPT_STATE_KIND = "influence-lm-opt-state"
# The entry io.save_arrays adds to every file; its absence marks a file of an older run.
_HEADER = "__header__"


def _key(path) -> str:
    """``keystr`` of a leaf path without flax's ``.value`` attribute step, so files do not
    depend on how a flax version flattens its Variables: ``['blocks'][0]['mlp']['fc_in']['kernel']``."""
    return jax.tree_util.keystr(path).replace(".value", "")


def _flatten(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_key(path): np.asarray(leaf) for path, leaf in leaves}


def save_tree(path: pathlib.Path, tree, kind: str) -> None:
    """Write the array leaves of ``tree`` to a checksummed ``.npz`` of ``kind``
    (:data:`PARAMS_KIND` or :data:`OPT_STATE_KIND`), atomically."""
    arrays = _flatten(tree)
    io.save_arrays(path, kind, arrays, {})


def _read_arrays(path: pathlib.Path, kind: str) -> dict[str, np.ndarray]:
    """The arrays of a :func:`save_tree` file, or of a plain ``.npz`` written before files
    carried a header (runs trained with earlier versions).

    Raises:
      FileFormatError: a missing, truncated or corrupt file, or one of another kind.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            if _HEADER not in npz.files:
                return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise FileFormatError(f"{path}: missing, truncated or corrupt file ({type(e).__name__}: {e})") from e
    return io.load_arrays(path, kind)[0]


def load_tree(path: pathlib.Path, template, kind: str):
    """Arrays from :func:`save_tree` placed into the structure of ``template`` (same
    paths, shapes and dtypes required)."""
    stored = {k.replace(".value", ""): v for k, v in _read_arrays(path, kind).items()}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for key_path, leaf in leaves:
        key = _key(key_path)
        if key not in stored:
            raise ConfigError(f"{path} has no array for {key}")
        arr = stored[key]
        if arr.shape != np.shape(leaf):
            raise ConfigError(f"{path}: {key} has shape {arr.shape}, expected {np.shape(leaf)}")
        out.append(jax.numpy.asarray(arr, dtype=np.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(ckpt_root: pathlib.Path, step: int, params, opt_state, state: dict,
                    run_files: list[pathlib.Path]) -> pathlib.Path:
    """Write checkpoint ``step`` atomically under ``ckpt_root`` and point ``latest.json``
    at it; ``run_files`` (config, tokenizer) are copied in. Returns the folder."""
    final = ckpt_root / step_name(step)
    # atomic_path replaces a folder left by a re-run of the same step after an interruption.
    with io.atomic_path(final, directory=True) as tmp:
        save_tree(tmp / "params.npz", params, PARAMS_KIND)
        save_tree(tmp / "opt_state.npz", opt_state, OPT_STATE_KIND)
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        for f in run_files:
            shutil.copy2(f, tmp / f.name)
    io.atomic_write_json(ckpt_root / LATEST, {"step": step, "path": final.name})
    return final


def latest_checkpoint(ckpt_root: pathlib.Path) -> pathlib.Path | None:
    """The folder named by ``latest.json``, or None when there is no checkpoint."""
    pointer = ckpt_root / LATEST
    if not pointer.exists():
        return None
    path = ckpt_root / json.loads(pointer.read_text())["path"]
    return path if path.exists() else None


def list_checkpoints(ckpt_root: pathlib.Path) -> dict[int, pathlib.Path]:
    """Completed checkpoints by step (temporary folders are ignored)."""
    if not ckpt_root.exists():
        return {}
    return {int(p.name.split("_")[1]): p for p in sorted(ckpt_root.glob("step_*")) if p.is_dir()}


def remove_stale(ckpt_root: pathlib.Path, keep: set[int]) -> None:
    """Delete leftovers of interrupted writes and checkpoints whose step is not in ``keep``.

    Leftovers carry :func:`influence.runtime.io.atomic_path`'s temporary names:
    ``.step_NNNNNNN-*`` folders and ``.latest.json.*.tmp`` files (``.latest.json-*``: the
    name earlier versions used)."""
    for p in ckpt_root.glob(".step_*-*"):
        shutil.rmtree(p, ignore_errors=True)
    for pattern in (f".{LATEST}.*.tmp", f".{LATEST}-*"):
        for p in ckpt_root.glob(pattern):
            p.unlink(missing_ok=True)
    for step, p in list_checkpoints(ckpt_root).items():
        if step not in keep:
            shutil.rmtree(p)


def read_state(ckpt: pathlib.Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())
