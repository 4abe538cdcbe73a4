"""Atomic checkpoints of a training run.

A checkpoint is a folder ``<run>/checkpoints/step_NNNNNNN/`` holding

* ``params.npz`` and ``opt_state.npz``: every array leaf of the parameter and optimizer
  state pytrees, keyed by its ``jax.tree_util.keystr`` path;
* ``state.json``: training metadata (step, tokens seen, losses, timings, versions);
* copies of the run's ``run.json`` (configuration) and ``tokenizer.json``, so a checkpoint
  is usable on its own.

It is written into a hidden temporary folder and renamed into place, so an interruption
never leaves a half-written checkpoint under a real name; ``checkpoints/latest.json``
(replaced atomically) names the newest one.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np

LATEST = "latest.json"


def _key(path) -> str:
    """``keystr`` of a leaf path without flax's ``.value`` attribute step, so files do not
    depend on how a flax version flattens its Variables: ``['blocks'][0]['mlp']['fc_in']['kernel']``."""
    return jax.tree_util.keystr(path).replace(".value", "")


def _flatten(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_key(path): np.asarray(leaf) for path, leaf in leaves}


def save_tree(path: pathlib.Path, tree) -> None:
    """Write the array leaves of ``tree`` to an ``.npz`` file."""
    with open(path, "wb") as f:
        np.savez(f, **_flatten(tree))


def load_tree(path: pathlib.Path, template):
    """Arrays from :func:`save_tree` placed into the structure of ``template`` (same
    paths, shapes and dtypes required)."""
    with np.load(path) as data:
        stored = {k.replace(".value", ""): data[k] for k in data.files}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for key_path, leaf in leaves:
        key = _key(key_path)
        if key not in stored:
            raise ValueError(f"{path} has no array for {key}")
        arr = stored[key]
        if arr.shape != np.shape(leaf):
            raise ValueError(f"{path}: {key} has shape {arr.shape}, expected {np.shape(leaf)}")
        out.append(jax.numpy.asarray(arr, dtype=np.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def write_json(path: pathlib.Path, obj) -> None:
    """Replace ``path`` atomically with ``obj`` as JSON."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(ckpt_root: pathlib.Path, step: int, params, opt_state, state: dict,
                    run_files: list[pathlib.Path]) -> pathlib.Path:
    """Write checkpoint ``step`` atomically under ``ckpt_root`` and point ``latest.json``
    at it; ``run_files`` (config, tokenizer) are copied in. Returns the folder."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_name(step)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=ckpt_root))
    save_tree(tmp / "params.npz", params)
    save_tree(tmp / "opt_state.npz", opt_state)
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    for f in run_files:
        shutil.copy2(f, tmp / f.name)
    if final.exists():  # a re-run of the same step after an interruption
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json(ckpt_root / LATEST, {"step": step, "path": final.name})
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
    """Delete leftovers of interrupted writes and checkpoints whose step is not in ``keep``."""
    for p in ckpt_root.glob(".step_*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_root.glob(f".{LATEST}-*"):
        p.unlink(missing_ok=True)
    for step, p in list_checkpoints(ckpt_root).items():
        if step not in keep:
            shutil.rmtree(p)


def read_state(ckpt: pathlib.Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())
