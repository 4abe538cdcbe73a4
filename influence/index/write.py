"""Writing an index: one resumable pass over the training set through the pass driver.

The compression and its maps are chosen before (:mod:`influence.index.choose`); this
module only writes what they say (:func:`write_index`).

Each batch's layer inputs ``a`` and output gradients ``g`` are captured as for scoring,
mapped to the stored rows ``C = Σ_t (ā_t E_A)ᵀ (g_t E_S)`` of every tracked layer
(:mod:`influence.index.compress`) and encoded in the storage dtype on the device. The
host buffers them and writes a shard every ``shard_rows`` rows, so shard boundaries
depend on rows only: an interrupted build, resumed, writes byte-identical shards. A
snapshot keeps the shards written so far and the buffered rows (a chunk file of the
checkpoint); the manifest is written last, atomically.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from influence._version import __version__
from influence.capture.objectives import layer_gradients
from influence.errors import CheckpointMismatch, NonFiniteError
from influence.factors import Factors, curvature_arrays
from influence.index.compress import (
    MAP_KEYS,
    Compression,
    LayerMap,
    encode,
    encode_numpy,
    map_training,
    rank_rows,
)
from influence.index.store import (
    FORMAT,
    KIND,
    MANIFEST,
    MAPS,
    MAPS_KIND,
    SHARDS,
    Index,
    npy_bytes,
    row_digests,
    rows_digest,
    task_id,
    write_file,
)
from influence.runtime import io
from influence.runtime.data import as_source
from influence.runtime.driver import Accumulator, run_pass
from influence.runtime.execution import Execution
from influence.runtime.io import digest_arrays
from influence.runtime.mesh import replicate
from influence.scoring.preconditioned import GRADIENT_STATICS, prepare, scoring_batch, scoring_mesh

log = logging.getLogger(__name__)

DEFAULT_SHARD_ROWS = 4096
_BUFFER_KIND = "influence-index-buffer"
_BUILD_DIR = ".build"


@functools.partial(jax.jit, static_argnames=GRADIENT_STATICS + ("dtype", "rank"))
def _build_step(maps, state, batch, example_mask, *, graphdef, layers, task, kind, dtype, rank):
    """Stored rows of one batch per layer (``encode`` d), and whether each row is finite."""
    _, a, g = layer_gradients(graphdef, state, layers, task, kind, batch, example_mask)
    rows = {i.name: map_training(a[i.name], g[i.name], maps[i.name], rank) for i in layers}
    finite = functools.reduce(lambda x, y: x & y, [jnp.all(jnp.isfinite(c), axis=-1)
                                                   for c in rows.values()])
    if rank:  # factorised and encoded on the host (index.compress.rank_rows)
        return {name: (c,) for name, c in rows.items()}, finite
    return {name: encode(c, dtype) for name, c in rows.items()}, finite


def built_from(tracked, factors: Factors, task) -> dict[str, Any]:
    """What an index depends on, as its manifest records it."""
    return {"fingerprint": tracked.fingerprint, "weights": digest_arrays(tracked.state), "task": task_id(task),
            "factors": digest_arrays(curvature_arrays(factors.layers)), "strategy": factors.strategy,
            "layers": list(tracked.layer_names)}


def device_maps(factors: Factors, curvature, maps: dict[str, dict[str, np.ndarray]], mesh) -> dict[str, LayerMap]:
    """Each layer's :class:`LayerMap` on the mesh (rotations from the replicated curvature)."""
    out = {}
    for name in factors.layer_names:
        m = maps.get(name, {})
        out[name] = LayerMap(curvature[name].q_a, curvature[name].q_s,
                             *(None if side not in m else replicate(jnp.asarray(m[side]), mesh)
                               for side in MAP_KEYS))
    return out


class _Writer:
    """The host side of a build: buffered rows, the shards written, the checks."""

    def __init__(self, path: Path, names: list[str], dtype: str, shard_rows: int, segment: int, row_start: int,
                 rank: int = 0, sizes: dict[str, tuple[int, int]] | None = None, ranks: dict[str, int] | None = None):
        self.path, self.names, self.dtype = path, names, dtype
        self.rank, self.sizes = rank, sizes or {}
        # rank-c: the rank stored per layer, min(c, T, d_a, d_out) once the tokens per example T are seen
        # (a gradient of T tokens has rank ≤ T: more columns would be zeros); an append keeps the index's
        self.ranks: dict[str, int] = dict(ranks or {})
        self.shard_rows, self.segment, self.row_start = shard_rows, segment, row_start
        self.shards: list[dict[str, Any]] = []
        self.buffer: list[dict[str, tuple]] = []
        self.digests: list[np.ndarray] = []
        self.inflight = None
        self.written = 0  # rows of this segment in shards

    @property
    def buffered(self) -> int:
        return sum(len(d) for d in self.digests)

    def add(self, out, finite, batch) -> None:
        """Keep a step's device output, fetching the previous one (the device runs ahead)."""
        self.fetch()
        self.inflight = (out, finite, batch.n_valid, row_digests(batch.arrays, batch.n_valid))

    def fetch(self) -> None:
        if self.inflight is None:
            return
        out, finite, n, digests = self.inflight
        self.inflight = None
        ok = np.asarray(finite)[:n]
        if not ok.all():
            row = self.row_start + self.written + self.buffered + int(np.argmin(ok))
            raise NonFiniteError(f"the training gradient of row {row} is NaN/Inf (the model's weights are "
                                     "finite); check that row's inputs and labels")
        host = {name: tuple(np.asarray(p)[:n] for p in parts) for name, parts in out.items()}
        if self.rank:
            for name, parts in host.items():
                if name not in self.ranks:
                    d_a, d_out = self.sizes[name]
                    self.ranks[name] = min(self.rank, parts[0].shape[1] // (d_a + d_out), d_a, d_out)
            host = {name: encode_numpy(rank_rows(parts[0], *self.sizes[name], self.ranks[name]), self.dtype)
                    for name, parts in host.items()}
        self.buffer.append(host)
        self.digests.append(digests)
        while self.buffered >= self.shard_rows:
            self.write_shard(self.shard_rows)

    def _joined(self) -> tuple[dict[str, tuple], np.ndarray]:
        width = {name: len(self.buffer[0][name]) for name in self.names}  # (data,) or (data, scales)
        joined = {name: tuple(np.concatenate([b[name][i] for b in self.buffer]) for i in range(width[name]))
                  for name in self.names}
        return joined, np.concatenate(self.digests)

    def write_shard(self, rows: int) -> None:
        joined, digests = self._joined()
        number = len(self.shards)
        lo = self.row_start + self.written
        files = []
        for i, name in enumerate(self.names):
            parts = joined[name]
            stem = f"{SHARDS}/s{self.segment:03d}-{number:06d}-l{i:02d}"
            files.append({"layer": i, "file": f"{stem}.npy", **write_file(self.path / f"{stem}.npy",
                                                                         npy_bytes(parts[0][:rows]))})
            if len(parts) > 1:
                files.append({"layer": i, "file": f"{stem}.scale.npy", "scale": True,
                              **write_file(self.path / f"{stem}.scale.npy", npy_bytes(parts[1][:rows]))})
        self.shards.append({"rows": [lo, lo + rows], "files": files, "data": rows_digest(digests[:rows])})
        self.written += rows
        rest = {name: tuple(p[rows:] for p in parts) for name, parts in joined.items()}
        self.buffer = [rest] if len(digests) > rows else []
        self.digests = [digests[rows:]] if len(digests) > rows else []

    def save(self, checkpoint):
        self.fetch()
        name = None
        if self.buffered:
            joined, digests = self._joined()
            name = f"buffer-{self.written + self.buffered:012d}"
            arrays = {f"{i}/{j}": p for i, n in enumerate(self.names) for j, p in enumerate(joined[n])}
            io.save_arrays(checkpoint.chunk_file(name), _BUFFER_KIND, {**arrays, "digests": digests}, {})
        return {"shards": self.shards, "written": self.written, "buffer": name, "ranks": self.ranks}

    def restore(self, facts, checkpoint) -> None:
        for shard in facts["shards"]:
            for entry in shard["files"]:
                file = self.path / entry["file"]
                if not file.is_file() or file.stat().st_size != entry["bytes"]:
                    raise CheckpointMismatch(f"{file}: a shard the build's snapshot lists is missing or torn; rebuild "
                                             "with resume=False")
        self.shards, self.written = list(facts["shards"]), int(facts["written"])
        self.ranks = {name: int(r) for name, r in facts.get("ranks", {}).items()}
        if facts["buffer"] is not None:
            arrays, _ = io.load_arrays(checkpoint.chunk_file(facts["buffer"]), _BUFFER_KIND)
            count = {i: sum(1 for k in arrays if k.startswith(f"{i}/")) for i in range(len(self.names))}
            self.buffer = [{n: tuple(arrays[f"{i}/{j}"] for j in range(count[i])) for i, n in enumerate(self.names)}]
            self.digests = [arrays["digests"]]

    def finish(self) -> list[dict[str, Any]]:
        self.fetch()
        if self.buffered:
            self.write_shard(self.buffered)
        return self.shards


def write_index(model, task, factors: Factors, train: Any, *, path: Path, comp: Compression,
                maps: dict[str, dict[str, np.ndarray]], previous: Index | None, run: Execution,
                shard_rows: int = DEFAULT_SHARD_ROWS, row_offset: int = 0, chosen: dict | None = None) -> Index:
    """Write (or append to) the index at ``path``: stored rows of ``train`` compressed as
    ``comp`` with ``maps`` (:func:`influence.index.choose.choose_compression`), resumable;
    the manifest last, with ``chosen`` (what the choice measured) if given. ``previous``:
    the index appended to."""
    mesh = scoring_mesh(run.mesh, run.batch_size)
    tracked, curvature, _ = prepare(model, factors, 0.0, mesh)  # damping is chosen at query time
    origin = built_from(tracked, factors, task)
    if previous is not None:
        previous.check(origin)
        segment, row_start, row_offset = len(previous.manifest["segments"]), previous.n_rows, previous.row_offset
    else:
        segment, row_start = 0, 0
    (path / SHARDS).mkdir(parents=True, exist_ok=True)
    if previous is None:
        io.save_arrays(path / MAPS, MAPS_KIND, {f"{n}/{s}": m for n, sides in maps.items() for s, m in sides.items()},
                       {"compression": comp.as_dict()})
    def layer_entries(ranks: dict[str, int]) -> list[dict[str, Any]]:
        layers = []
        for info in tracked.layers:
            m = maps[info.name]
            k_a = info.d_a if "a" not in m else (len(m["a"]) if m["a"].ndim == 1 else m["a"].shape[1])
            k_s = info.d_out if "s" not in m else (len(m["s"]) if m["s"].ndim == 1 else m["s"].shape[1])
            rank = ranks.get(info.name, min(comp.rank, info.d_a, info.d_out)) if comp.method == "rank" else 0
            width = (rank * (info.d_a + info.d_out) if comp.method == "rank"
                     else len(m["keep"]) if "keep" in m else len(m["bucket"]) if "bucket" in m
                     else int(k_a) * int(k_s))
            layers.append({"name": info.name, "d_a": info.d_a, "d_out": info.d_out, "k_a": int(k_a),
                           "k_s": int(k_s), "rank": rank, "width": width})
        assert comp.method != "none" or all(lay["k_a"] == lay["d_a"] for lay in layers)
        return layers

    on_mesh = device_maps(factors, curvature, maps, mesh)

    run = scoring_batch(run, tracked, task, train, mesh)  # batch_size=None: from the memory budget, as for scoring
    source = as_source(train, run.batch_size, task, model)
    own_checkpoint = run.checkpoint_dir is None
    settings = {**origin, "compression": comp.as_dict(), "shard_rows": shard_rows, "segment": segment,
                "row_start": row_start, "batch_size": run.batch_size, "maps": digest_arrays(maps)}
    checkpoint = (run if not own_checkpoint else _with_dir(run, path / _BUILD_DIR)).checkpoint("index", settings)
    try:
        resumed = checkpoint.load()
    except CheckpointMismatch as e:
        if not own_checkpoint:
            raise
        # The index's own snapshots of an abandoned build with other settings: start afresh.
        log.warning("starting the index build afresh: %s", e)
        shutil.rmtree(path / _BUILD_DIR, ignore_errors=True)
        checkpoint = _with_dir(run, path / _BUILD_DIR).checkpoint("index", settings)
        resumed = None
    writer = _Writer(path, list(tracked.layer_names), comp.dtype, shard_rows, segment, row_start, comp.rank,
                     {info.name: (info.d_a, info.d_out) for info in tracked.layers},
                     {la["name"]: la["rank"] for la in previous.layers} if previous is not None and comp.rank else None)
    if resumed is None:  # a fresh start: shards of this segment from an abandoned build are stale
        for stale in (path / SHARDS).glob(f"s{segment:03d}-*"):
            stale.unlink()

    def update(w, step):
        out, finite = _build_step(on_mesh, tracked.state, step.arrays, step.example_mask, graphdef=tracked.graphdef,
                                  layers=tracked.layers, task=task, kind="empirical", dtype=comp.dtype,
                                  rank=comp.rank)
        w.add(out, finite, step.batch)
        return w

    def save(w, checkpoint):
        return w, w.save(checkpoint), {}

    def restore(facts, arrays, checkpoint):
        writer.restore(facts, checkpoint)
        return writer

    accumulator = Accumulator(lambda: writer, update, lambda w: w.finish(), save, restore)
    shards = run_pass(accumulator, source, mesh, checkpoint=checkpoint, resumed=resumed, desc="index",
                      progress=run.progress).value
    n_new = sum(s["rows"][1] - s["rows"][0] for s in shards)
    old_shards = previous.shards if previous is not None else []
    all_shards = old_shards + shards
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    manifest = {
        "kind": KIND, "format": FORMAT, "version": __version__, "built_from": origin,
        "compression": comp.as_dict(), "layers": layer_entries(writer.ranks), "row_offset": row_offset,
        "n_rows": row_start + n_new,
        "segments": (previous.manifest["segments"] if previous is not None else [])
        + [{"rows": [row_start, row_start + n_new], "created": now}],
        "shards": all_shards,
        "data": hashlib.sha256("".join(s["data"] for s in all_shards).encode()).hexdigest()[:32],
        "rows": f"row r of the index is training sequence row_offset + r = {row_offset} + r",
        "created": previous.manifest["created"] if previous is not None else now,
    }
    if chosen is None and previous is not None:  # an append keeps what the first build measured
        chosen = previous.manifest.get("chosen")
    if chosen is not None:
        manifest["chosen"] = chosen
    io.atomic_write_json(path / MANIFEST, manifest)
    if own_checkpoint:
        shutil.rmtree(path / _BUILD_DIR, ignore_errors=True)
    else:
        for stale in Path(run.checkpoint_dir).glob("index-p*-buffer-*.npz"):
            stale.unlink()
    return Index(path)


def _with_dir(run: Execution, directory: Path) -> Execution:
    import dataclasses

    return dataclasses.replace(run, checkpoint_dir=directory)


