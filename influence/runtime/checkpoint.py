"""Resumable streamed passes: periodic atomic snapshots of a pass's running state.

A long pass over the training set (fitting factors, scoring) saves, every ``every``
batches and when it is interrupted by an exception, what it has accumulated: its sums or
top-k, the index of the next batch, and a *data chain*, a hash of every batch consumed so
far. A later call with the same ``checkpoint_dir`` re-reads (without computing) the
batches before that index, checks that they hash to the same chain, and continues from
there: no completed batch is computed twice and none is lost.

A snapshot also records the *settings* of the run (model structure and a digest of its
weights, strategy, batch size, key, factors, queries, ...). Resuming with other settings
or other data raises :class:`CheckpointMismatch` rather than mixing two runs.

Files: ``<dir>/<kind>-p<process>-<generation>.npz`` (two generations, written in turn
with :func:`influence.runtime.io.save_arrays`: a crash while writing one leaves the other), plus
any chunk files of a scoring pass. With several processes each writes its own, and all
resume from the newest position that every process has.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from influence.errors import CheckpointMismatch, ConfigError
from influence.runtime import io
from influence.runtime.mesh import all_processes_gather

log = logging.getLogger(__name__)

_KIND = "influence-checkpoint"




class DataChain:
    """A running hash of the batches of a pass: ``h_i = sha256(h_{i-1} ‖ batch_i)``.

    Its hex value after batch i identifies the data read so far, so a resumed pass can
    check that it re-reads the same batches without keeping them."""

    def __init__(self, value: str = ""):
        self.value = value

    def update(self, arrays: dict[str, np.ndarray], n_valid: int) -> str:
        h = hashlib.sha256(self.value.encode())
        h.update(str(n_valid).encode())
        io.hash_arrays(h, ((name, arrays[name][:n_valid]) for name in sorted(arrays)))
        self.value = h.hexdigest()
        return self.value


class Checkpoint:
    """Snapshots of one run in ``directory``.

    Args:
      directory: where the files go (created if needed).
      kind: what is checkpointed (``"factors"``, ``"scores"``, ``"self-scores"``,
        ``"ranking"``); one directory can hold one run of each kind.
      settings: JSON-serialisable facts that must match for a resume.
      every: save after this many completed batches (and on interruption).
      resume: ``True``: continue from a matching snapshot if there is one, refuse a
        mismatching one. ``False``: start afresh, replacing any snapshot.
    """

    def __init__(self, directory: str | os.PathLike, kind: str, settings: dict[str, Any], *, every: int = 100,
                 resume: bool = True):
        if every < 1:
            raise ConfigError(f"checkpoint_every must be a positive number of batches, got {every}")
        self.directory = Path(directory)
        self.kind = kind
        self.settings = io.canonical_json(settings)
        self.every = int(every)
        self.resume = resume
        self.process = jax.process_index()
        self._generation = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        if not resume:  # start afresh: no stale snapshot or chunk of this kind may be read later
            for stale in self.directory.glob(f"{kind}-p{self.process}-*.npz"):
                stale.unlink()

    def _file(self, generation: int) -> Path:
        return self.directory / f"{self.kind}-p{self.process}-{generation}.npz"

    def chunk_file(self, name: str) -> Path:
        """A file for a piece of a pass's output, owned by this process."""
        return self.directory / f"{self.kind}-p{self.process}-{name}.npz"

    def _read(self, generation: int):
        file = self._file(generation)
        if not file.exists():
            return None
        try:
            arrays, metadata = io.load_arrays(file, _KIND)
        except io.FileFormatError as e:  # a torn write: the other generation is used
            log.warning("ignoring unreadable checkpoint %s: %s", file, e)
            return None
        return arrays, metadata

    def load(self) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """``(progress, arrays)`` of the newest snapshot (every process's newest common
        one), or ``None`` when there is none or ``resume=False``.

        Raises:
          CheckpointMismatch: the snapshot was written by a run with other settings.
        """
        found = {}
        if self.resume:
            for generation in (0, 1):
                got = self._read(generation)
                if got is None:
                    continue
                arrays, metadata = got
                theirs = metadata.get("settings")
                if theirs != self.settings:
                    raise CheckpointMismatch(self._explain(theirs))
                found[tuple(metadata["progress"]["position"])] = (generation, metadata["progress"], arrays)
        # Processes resume together from a position each of them has saved.
        mine = sorted(found)[-2:]
        table = np.full((2, 2), -1, np.int64)
        for row, position in enumerate(mine):
            table[row] = position
        everyone = all_processes_gather(table)
        common = set(map(tuple, everyone[0].tolist()))
        for other in everyone[1:]:
            common &= set(map(tuple, other.tolist()))
        common.discard((-1, -1))
        if not common:
            return None
        generation, progress, arrays = found[max(common)]
        self._generation = 1 - generation  # overwrite the older snapshot next
        return progress, arrays

    def _explain(self, theirs: dict[str, Any] | None) -> str:
        theirs = theirs or {}
        keys = sorted(k for k in set(theirs) | set(self.settings) if theirs.get(k) != self.settings.get(k))
        return (
            f"{self.directory} holds a {self.kind} checkpoint of another run: it differs in {keys}. "
            "Use the same model, data and settings to resume, or pass resume=False (or another "
            "checkpoint_dir) to start afresh"
        )

    def save(self, position: tuple[int, int], progress: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Atomically write a snapshot; ``position = (pass, next batch)`` orders snapshots."""
        progress = {**progress, "position": [int(position[0]), int(position[1])]}
        metadata = {"settings": self.settings, "progress": progress}
        io.save_arrays(self._file(self._generation), _KIND, arrays, metadata)
        self._generation = 1 - self._generation

    def skip(self, source_iter, n_batches: int, chain: str) -> DataChain:
        """Re-read the first ``n_batches`` batches of a resumed pass and check that they are
        the data the snapshot was taken on; return the data chain to continue."""
        running = DataChain()
        for i in range(n_batches):
            batch = next(source_iter, None)
            if batch is None:
                raise CheckpointMismatch(
                    f"{self.directory}: the checkpoint had processed {n_batches} batches, but the data "
                    f"now has only {i}; resume with the same data, or pass resume=False"
                )
            running.update(batch.arrays, batch.n_valid)
        if running.value != chain:
            raise CheckpointMismatch(
                f"{self.directory}: the first {n_batches} batches of the data differ from those the "
                "checkpoint was taken on; resume with the same data (in the same order), or pass resume=False"
            )
        return running
