"""Streaming the batches of a pass onto a device mesh, from a resume point.

:class:`BatchStream` turns a :class:`~influence.runtime.data.DataSource` into the steps of a
pass: each host batch is placed on the mesh with its batch axis split over the data axis.
It starts at a given batch index (re-reading, not computing, the batches before it and
checking them against a checkpoint's data chain), keeps the chain up to date when a
checkpoint needs it, and, with several processes, keeps them in step: a process whose
data is exhausted feeds empty (fully masked) batches until every process is done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from influence.runtime import io
from influence.runtime.checkpoint import Checkpoint, DataChain
from influence.runtime.data import Batch, DataError, DataSource
from influence.runtime.mesh import all_processes_sum, shard_batch, spans_processes

log = logging.getLogger(__name__)


class Step(NamedTuple):
    """One batch of a pass: its index, the host batch, and its arrays on the mesh."""

    index: int
    batch: Batch
    arrays: Any
    example_mask: Any


def _empty_like(batch: Batch) -> Batch:
    return Batch({k: np.zeros_like(v) for k, v in batch.arrays.items()}, 0, -1)


class BatchStream:
    """Iterate the steps of one pass.

    Args:
      source: the batches (of this process's rows, with several processes).
      mesh: where to place them.
      start: index of the first step to compute.
      consumed: how many of this process's batches the steps before ``start`` read
        (``start`` in one process; fewer where a process ran out early). They are
        re-read, not computed, and checked against ``chain`` by ``checkpoint``.
      chain: the data chain of those batches, from the checkpoint.
      checkpoint: the run's :class:`Checkpoint`, or ``None`` (then no hashing).
    """

    def __init__(self, source: DataSource, mesh: Mesh, *, start: int = 0, consumed: int | None = None, chain: str = "",
                 checkpoint: Checkpoint | None = None, desc: str = "", progress: bool = True):
        self.source = source
        self.mesh = mesh
        self.start = start
        self.consumed = start if consumed is None else consumed  # this process's real batches read so far
        self.chain = DataChain(chain)
        self.checkpoint = checkpoint
        self.desc = desc
        self.progress = progress
        self.n_examples = 0  # real rows of this process computed in this call

    def __iter__(self) -> Iterator[Step]:
        batches = iter(self.source)
        if self.consumed:
            self.chain = self.checkpoint.skip(batches, self.consumed, self.chain.value)
        bar = tqdm(total=self.source.num_batches, initial=self.start, desc=self.desc, unit="batch",
                   disable=not self.progress, leave=False)
        multi = spans_processes(self.mesh)
        template = None
        index = self.start
        try:
            while True:
                batch = next(batches, None)
                if multi:
                    if int(all_processes_sum(np.array(batch is not None, np.int64))) == 0:
                        break
                    if batch is None:
                        if template is None:
                            raise DataError("this process has no data while others have; give every process rows")
                        batch = _empty_like(template)
                elif batch is None:
                    break
                template = template or batch
                if batch.n_valid:
                    self.consumed += 1
                    if self.checkpoint is not None:
                        self.chain.update(batch.arrays, batch.n_valid)
                self.n_examples += batch.n_valid
                yield Step(index, batch, shard_batch(batch.arrays, self.mesh), shard_batch(batch.example_mask, self.mesh))
                index += 1
                bar.update(1)
        finally:
            bar.close()


_CHUNK_KIND = "influence-score-chunk"


def save_on_interrupt(snapshot: Callable[[], None]) -> None:
    """Keep the completed batches of an interrupted pass (best effort: a failed device
    computation or a NaN leaves the last periodic snapshot in place)."""
    try:
        snapshot()
    except Exception as e:  # noqa: BLE001 - the caller re-raises the interruption itself
        log.warning("could not save a checkpoint after the interruption: %s", e)


def drive(stream: BatchStream, checkpoint: Checkpoint | None, body: Callable[[Step], None],
          snapshot: Callable[[], None], on_abort: Callable[[], None] | None = None) -> None:
    """Run ``body`` on every step of a pass; with a checkpoint, ``snapshot()`` after every
    ``checkpoint.every`` steps, on an exception (best effort, then re-raised) and at the
    end. Without one, ``on_abort()`` cleans up after an exception."""
    try:
        for step in stream:
            body(step)
            if checkpoint is not None and (step.index + 1) % checkpoint.every == 0:
                snapshot()
    except BaseException:
        if checkpoint is not None:
            save_on_interrupt(snapshot)
        elif on_abort is not None:
            on_abort()
        raise
    if checkpoint is not None:
        snapshot()


def collect(run_step: Callable[[Step], Any], source: DataSource, mesh: Mesh, *, checkpoint: Checkpoint | None = None,
            desc: str = "", progress: bool = True) -> np.ndarray:
    """Run ``run_step`` on every batch and concatenate its ``[..., B]`` outputs over the
    real rows: ``[..., n_rows]`` numpy.

    With a checkpoint, the outputs since the last snapshot are written as a chunk file
    before each snapshot, and a resumed call reloads the chunks and goes on from the
    snapshot's batch.
    """
    host: list[np.ndarray] = []  # outputs up to the last chunk written (or all, without checkpoint)
    recent: list[np.ndarray] = []  # outputs since
    chunks: list[str] = []
    start, consumed, chain = 0, None, ""
    resumed = checkpoint.load() if checkpoint is not None else None
    if resumed is not None:
        state, _ = resumed
        start, consumed, chain, chunks = state["next"], state["consumed"], state["chain"], list(state["chunks"])
        host = [io.load_arrays(checkpoint.chunk_file(name), _CHUNK_KIND)[0]["values"] for name in chunks]
    stream = BatchStream(source, mesh, start=start, consumed=consumed, chain=chain, checkpoint=checkpoint,
                         desc=desc, progress=progress)
    inflight: list[tuple[Any, int]] = []  # the last step's device output, fetched after the next is dispatched
    done = (start, stream.consumed, chain)

    def fetch() -> None:
        for out, n_valid in inflight:
            recent.append(np.asarray(out)[..., :n_valid])
        inflight.clear()

    def snapshot() -> None:
        fetch()
        index, n_read, data_chain = done
        if recent:
            name = f"chunk-{index:09d}"
            values = np.concatenate(recent, axis=-1)
            io.save_arrays(checkpoint.chunk_file(name), _CHUNK_KIND, {"values": values}, {})
            host.append(values)
            chunks.append(name)
            recent.clear()
        checkpoint.save((0, index), {"next": index, "consumed": n_read, "chain": data_chain, "chunks": chunks}, {})

    def body(step: Step) -> None:
        nonlocal done
        out = run_step(step)
        fetch()
        inflight.append((out, step.batch.n_valid))
        done = (step.index + 1, stream.consumed, stream.chain.value)

    drive(stream, checkpoint, body, snapshot)
    fetch()
    return np.concatenate(host + recent, axis=-1)
