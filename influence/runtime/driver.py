"""The one resumable pass driver: every streamed pass over a data set runs through it.

A pass (the covariance and eigenvalue passes of a fit, score collection, top-k ranking,
an index build) is an :class:`Accumulator`: an ``init / update / finalize`` triple over a
state, optax-style, plus how that state is saved in and restored from a snapshot.
:func:`run_pass` owns everything else, once: placing each batch on the device mesh
(:class:`BatchStream`), progress, periodic and on-interrupt snapshots, resuming from a
snapshot (the batches before it are re-read, not computed, and checked against its data
chain), and counting the real rows. So no completed batch is lost or computed twice,
whatever the pass computes; the resume tests test this driver once.

With several processes the stream keeps them in step: a process whose data is exhausted
feeds empty (fully masked) batches until every process is done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from influence.errors import DataError
from influence.runtime import io
from influence.runtime.checkpoint import Checkpoint, DataChain
from influence.runtime.data import Batch, DataSource
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
                yield Step(index, batch, shard_batch(batch.arrays, self.mesh),
                           shard_batch(batch.example_mask, self.mesh))
                index += 1
                bar.update(1)
        finally:
            bar.close()



class Accumulator(NamedTuple):
    """What one pass computes, as functions over its state (any pytree or NamedTuple).

    Attributes:
      init: ``() -> state``, the state before the first batch.
      update: ``(state, step) -> state``: fold in one :class:`Step`. Dispatch device work
        and return; a host sync here costs a round trip per batch.
      finalize: ``state -> result``, when every batch is in.
      save: ``(state, checkpoint) -> (state, json, arrays)`` for a snapshot: the state
        (possibly with host-side work folded in), JSON-serialisable facts and numpy arrays
        that :attr:`restore` rebuilds it from. It may write side files through
        ``checkpoint.chunk_file``. Needed only with a checkpoint.
      restore: ``(json, arrays, checkpoint) -> state``, inverse of ``save``.
      abort: ``state -> None``: clean up after a failure when there is no checkpoint
        (e.g. remove a partial output file).
    """

    init: Callable[[], Any]
    update: Callable[[Any, Step], Any]
    finalize: Callable[[Any], Any]
    save: Callable[[Any, Checkpoint], tuple[Any, dict, dict[str, np.ndarray]]] | None = None
    restore: Callable[[dict, dict[str, np.ndarray], Checkpoint], Any] | None = None
    abort: Callable[[Any], None] | None = None


class PassResult(NamedTuple):
    """``value``: what the accumulator finalised to; ``n_examples``: the real rows of this
    process over the whole pass (the part before a resume included)."""

    value: Any
    n_examples: int


def save_on_interrupt(snapshot: Callable[[], None]) -> None:
    """Keep the completed batches of an interrupted pass (best effort: a failed device
    computation or a NaN leaves the last periodic snapshot in place)."""
    try:
        snapshot()
    except Exception as e:
        log.warning("could not save a checkpoint after the interruption: %s", e)


def run_pass(accumulator: Accumulator, source: DataSource, mesh: Mesh, *, checkpoint: Checkpoint | None = None,
             resumed: tuple[dict, dict] | None = None, pass_index: int = 0, keep: dict[str, np.ndarray] | None = None,
             save_at_start: bool = False, desc: str = "", progress: bool = True) -> PassResult:
    """Stream every batch of ``source`` through ``accumulator``.

    Args:
      checkpoint: snapshot every ``checkpoint.every`` batches, on an exception (then
        re-raised) and at the end; ``None``: no snapshots (``accumulator.abort`` runs
        on an exception).
      resumed: ``(progress, arrays)`` of a snapshot of this pass (``checkpoint.load()``),
        to continue from; ``None`` starts at the first batch.
      pass_index: orders the snapshots of a run with several passes: a snapshot's
        position is ``(pass_index, next batch)``.
      keep: arrays saved in every snapshot besides the state (results of earlier passes,
        so a run interrupted in this pass need not redo them).
      save_at_start: snapshot before the first batch (so that ``keep`` is on disk even
        if this pass saves nothing else).
    """
    state = accumulator.init()
    start, consumed, chain, before = 0, None, "", 0
    if resumed is not None:
        saved, arrays = resumed
        start, consumed, chain, before = saved["next"], saved["consumed"], saved["chain"], saved["n_examples"]
        state = accumulator.restore(saved["state"], arrays, checkpoint)
    stream = BatchStream(source, mesh, start=start, consumed=consumed, chain=chain, checkpoint=checkpoint,
                         desc=desc, progress=progress)
    position = (start, stream.consumed, chain, 0)  # next index, batches read, data chain, rows: after the last step

    def snapshot() -> None:
        nonlocal state
        state, facts, arrays = accumulator.save(state, checkpoint)
        index, n_read, data_chain, rows = position
        saved = {"pass": pass_index, "next": index, "consumed": n_read, "chain": data_chain,
                 "n_examples": before + rows, "state": facts}
        checkpoint.save((pass_index, index), saved, {**arrays, **(keep or {})})

    if checkpoint is not None and resumed is None and save_at_start:
        snapshot()
    try:
        for step in stream:
            state = accumulator.update(state, step)
            position = (step.index + 1, stream.consumed, stream.chain.value, stream.n_examples)
            if checkpoint is not None and (step.index + 1) % checkpoint.every == 0:
                snapshot()
    except BaseException:
        if checkpoint is not None:
            save_on_interrupt(snapshot)
        elif accumulator.abort is not None:
            accumulator.abort(state)
        raise
    if checkpoint is not None:
        snapshot()
    return PassResult(accumulator.finalize(state), before + stream.n_examples)


# --- an accumulator shared by the scoring passes -------------------------------------

_CHUNK_KIND = "influence-score-chunk"


FETCH_ELEMENTS = 2**24
"""Most numbers (64 MiB of float32) of :func:`concatenate`'s outputs left on the device
before they are fetched to the host together (one sync for many steps)."""


class _Concatenated(NamedTuple):
    saved: tuple[np.ndarray, ...]  # outputs up to the last chunk file (all of them, without checkpoint)
    recent: tuple[np.ndarray, ...]  # outputs since, on the host
    inflight: tuple[tuple[Any, int], ...]  # device outputs not fetched yet, with their real rows
    chunks: tuple[str, ...]  # names of the chunk files written


def _fetched(state: _Concatenated) -> _Concatenated:
    if not state.inflight:
        return state
    outs = jax.device_get([out for out, _ in state.inflight])  # one wait for every step in flight
    recent = state.recent + tuple(np.asarray(out)[..., :n] for out, (_, n) in zip(outs, state.inflight))
    return state._replace(recent=recent, inflight=())


def concatenate(run_step: Callable[[Step], Any], fetch_elements: int | None = None) -> Accumulator:
    """An accumulator of ``run_step``'s ``[..., B]`` outputs over the real rows: finalises
    to ``[..., n_rows]`` numpy. The outputs stay on the device, the host never waiting
    on a step, and are fetched together when they hold more than ``fetch_elements``
    numbers (default :data:`FETCH_ELEMENTS`), at a snapshot and at the end. In a
    snapshot, the outputs since the previous one go to a chunk file; a resumed pass
    reloads the chunks."""
    limit = FETCH_ELEMENTS if fetch_elements is None else fetch_elements

    def update(state, step):
        out = run_step(step)
        state = state._replace(inflight=state.inflight + ((out, step.batch.n_valid),))
        if sum(int(np.prod(o.shape)) for o, _ in state.inflight) > limit:
            state = _fetched(state)
        return state

    def save(state, checkpoint):
        state = _fetched(state)
        if state.recent:
            name = f"chunk-{len(state.chunks):09d}"
            values = np.concatenate(state.recent, axis=-1)
            io.save_arrays(checkpoint.chunk_file(name), _CHUNK_KIND, {"values": values}, {})
            state = _Concatenated(state.saved + (values,), (), (), state.chunks + (name,))
        return state, {"chunks": list(state.chunks)}, {}

    def restore(facts, arrays, checkpoint):
        chunks = tuple(facts["chunks"])
        saved = tuple(io.load_arrays(checkpoint.chunk_file(name), _CHUNK_KIND)[0]["values"] for name in chunks)
        return _Concatenated(saved, (), (), chunks)

    def finalize(state):
        state = _fetched(state)
        return np.concatenate(state.saved + state.recent, axis=-1)

    return Accumulator(lambda: _Concatenated((), (), (), ()), update, finalize, save, restore)
