"""The pass driver on its own: a toy accumulator streamed, interrupted and resumed.

Every pass of the library (curvature passes, score collection, ranking) runs through
``run_pass``; these tests pin its contract once: no completed batch is lost or computed
twice, a torn snapshot falls back to the older one, other data is refused, and the rows
are counted across a resume. tests/runtime/test_resume.py checks each accumulator.
"""

from typing import NamedTuple

import numpy as np
import pytest

from influence.errors import CheckpointMismatch
from influence.runtime.checkpoint import Checkpoint
from influence.runtime.data import as_source
from influence.runtime.driver import Accumulator, BatchStream, concatenate, run_pass
from influence.runtime.mesh import resolve_mesh

BATCH, N = 4, 30  # 8 batches, the last one padded (2 real rows)


class Interrupted(RuntimeError):
    pass


class Total(NamedTuple):
    total: np.ndarray  # running Σ x over real rows, float64 [3]
    seen: tuple  # batch indices folded in, in order


def _data(seed=0):
    x = np.random.default_rng(seed).normal(size=(N, 3)).astype(np.float32)
    return {"x": x}


def _summing(calls: list) -> Accumulator:
    """Σ of the real rows of ``x``; ``calls`` records every batch index it computes."""

    def update(state, step):
        calls.append(step.index)
        x = np.asarray(step.batch.arrays["x"], np.float64)[: step.batch.n_valid]
        return Total(state.total + x.sum(axis=0), state.seen + (step.index,))

    def save(state, checkpoint):
        return state, {"seen": list(state.seen)}, {"total": state.total}

    def restore(facts, arrays, checkpoint):
        return Total(arrays["total"], tuple(facts["seen"]))

    return Accumulator(lambda: Total(np.zeros(3), ()), update, lambda s: s, save, restore)


def _failing(data, fail_at: dict[int, int]):
    """A callable source whose c-th call raises before batch ``fail_at[c]``."""
    calls = []

    def batches():
        calls.append(1)
        stop = fail_at.get(len(calls))
        for i, lo in enumerate(range(0, N, BATCH)):
            if i == stop:
                raise Interrupted
            yield {k: v[lo : lo + BATCH] for k, v in data.items()}

    return batches


def _run(source, calls, checkpoint=None, **kwargs):
    resumed = checkpoint.load() if checkpoint is not None else None
    return run_pass(_summing(calls), as_source(source, BATCH), resolve_mesh(None), checkpoint=checkpoint,
                    resumed=resumed, progress=False, **kwargs)


def test_uninterrupted_pass_sums_every_real_row_once():
    data, calls = _data(), []
    result = _run(data, calls)
    np.testing.assert_allclose(result.value.total, data["x"].astype(np.float64).sum(axis=0), rtol=1e-12)
    assert calls == list(range(8)) and result.n_examples == N


def test_interrupted_pass_resumes_without_losing_or_redoing_a_batch(tmp_path):
    data, calls = _data(), []
    reference = _run(data, [])
    source = _failing(data, {1: 5, 2: 7})
    with pytest.raises(Interrupted):
        _run(source, calls, Checkpoint(tmp_path, "toy", {"s": 1}, every=3))
    assert calls == [0, 1, 2, 3, 4]  # the snapshot on interruption keeps batches 0-4
    with pytest.raises(Interrupted):
        _run(source, calls, Checkpoint(tmp_path, "toy", {"s": 1}, every=3))
    assert calls[5:] == [5, 6]
    result = _run(source, calls, Checkpoint(tmp_path, "toy", {"s": 1}, every=3))
    assert calls[7:] == [7]  # each batch computed exactly once over three calls
    assert result.value.seen == tuple(range(8))
    np.testing.assert_array_equal(result.value.total, reference.value.total)  # same order of additions: bit-equal
    assert result.n_examples == N  # rows before the resume are counted too
    # a finished pass resumes to the same result without computing anything
    again = _run(source, calls, Checkpoint(tmp_path, "toy", {"s": 1}, every=3))
    assert calls[8:] == [] and again.value.seen == tuple(range(8))


def test_torn_snapshot_falls_back_to_the_older_generation(tmp_path):
    data, calls = _data(), []
    source = _failing(data, {1: 7})
    with pytest.raises(Interrupted):
        _run(source, calls, Checkpoint(tmp_path, "toy", {}, every=2))
    newest = max(tmp_path.glob("toy-p0-*.npz"), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(newest.read_bytes()[:50])
    result = _run(source, calls, Checkpoint(tmp_path, "toy", {}, every=2))
    assert calls[7:] == [6, 7]  # the older snapshot was at batch 6
    np.testing.assert_array_equal(result.value.total, _run(data, []).value.total)


def test_other_data_or_settings_are_refused(tmp_path):
    data = _data()
    with pytest.raises(Interrupted):
        _run(_failing(data, {1: 4}), [], Checkpoint(tmp_path, "toy", {"s": 1}, every=2))
    with pytest.raises(CheckpointMismatch, match="differ"):
        _run(_data(seed=1), [], Checkpoint(tmp_path, "toy", {"s": 1}, every=2))
    with pytest.raises(CheckpointMismatch, match=r"\['s'\]"):
        _run(data, [], Checkpoint(tmp_path, "toy", {"s": 2}, every=2))
    fresh = _run(data, [], Checkpoint(tmp_path, "toy", {"s": 2}, every=2, resume=False))
    assert fresh.value.seen == tuple(range(8))


def test_kept_arrays_and_pass_index_are_in_every_snapshot(tmp_path):
    checkpoint = Checkpoint(tmp_path, "toy", {}, every=100)
    keep = {"earlier/result": np.arange(3.0)}
    with pytest.raises(Interrupted):
        _run(_failing(_data(), {1: 0}), [], checkpoint, pass_index=1, keep=keep, save_at_start=True)
    saved, arrays = Checkpoint(tmp_path, "toy", {}).load()
    assert saved["pass"] == 1 and saved["next"] == 0  # saved before the first batch
    np.testing.assert_array_equal(arrays["earlier/result"], keep["earlier/result"])


def test_abort_runs_only_without_a_checkpoint(tmp_path):
    aborted = []
    base = _summing([])
    accumulator = base._replace(abort=lambda state: aborted.append(len(state.seen)))
    source = as_source(_failing(_data(), {1: 3, 2: 3}), BATCH)
    with pytest.raises(Interrupted):
        run_pass(accumulator, source, resolve_mesh(None), progress=False)
    assert aborted == [3]
    with pytest.raises(Interrupted):
        run_pass(accumulator, source, resolve_mesh(None), checkpoint=Checkpoint(tmp_path, "toy", {}), progress=False)
    assert aborted == [3]  # with a checkpoint the snapshot keeps the work instead


def test_concatenate_collects_real_rows_across_a_resume(tmp_path):
    data = _data()

    def rows(step):
        return step.arrays["x"].T  # [3, B] on the device

    full = run_pass(concatenate(rows), as_source(data, BATCH), resolve_mesh(None), progress=False).value
    np.testing.assert_array_equal(full, data["x"].T)  # padding rows dropped
    source = as_source(_failing(data, {1: 5}), BATCH)
    checkpoint = Checkpoint(tmp_path, "rows", {}, every=2)
    with pytest.raises(Interrupted):
        run_pass(concatenate(rows), source, resolve_mesh(None), checkpoint=checkpoint, progress=False)
    checkpoint = Checkpoint(tmp_path, "rows", {}, every=2)
    resumed = run_pass(concatenate(rows), source, resolve_mesh(None), checkpoint=checkpoint,
                       resumed=checkpoint.load(), progress=False).value
    np.testing.assert_array_equal(resumed, full)


@pytest.mark.parametrize("fetch_elements,fetched_after", [
    (0, [1, 2, 3, 4, 5, 6, 7, 8]),  # a fetch after every step
    (12, [0, 2, 2, 4, 4, 6, 6, 8]),  # one step's 12 numbers may wait: every second step
    (10**9, [0] * 8),  # nothing fetched before the end
])
def test_concatenate_keeps_outputs_on_the_device_until_a_fetch(fetch_elements, fetched_after):
    """No host sync per step: outputs wait on the device and are fetched together once
    more than ``fetch_elements`` numbers are in flight, with the same result."""
    data = _data()

    def rows(step):
        return step.arrays["x"].T  # [3, B]: 12 numbers per step

    accumulator = concatenate(rows, fetch_elements=fetch_elements)
    state, fetched = accumulator.init(), []
    for step in BatchStream(as_source(data, BATCH), resolve_mesh(None), progress=False):
        state = accumulator.update(state, step)
        fetched.append(len(state.recent))
    assert fetched == fetched_after
    np.testing.assert_array_equal(accumulator.finalize(state), data["x"].T)
