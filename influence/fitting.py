"""The streamed passes of :func:`influence.fit_factors`: data-parallel and resumable.

Each pass runs one jitted step per batch. The step captures the tracked layers' inputs
and output gradients on the global batch (partitioned by ``jit`` over the mesh's data
axis), then each device adds the sums over *its* rows to its own slot of a
``[n_data, ...]`` accumulator (:func:`influence.runtime.mesh.local`). The slots are added
once, when the pass ends (:func:`influence.runtime.mesh.reduce_slots`), before the
eigendecompositions. With a checkpoint, the slots, counts and data position are saved
every few batches, and a pass restarts from its last snapshot.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from influence.runtime.checkpoint import Checkpoint, CheckpointMismatch
from influence.curvature.accumulate import covariance_sums, eigenvalue_sums
from influence.curvature.blocks import LayerBlocks, covariance_block_sums
from influence.runtime.data import DataSource
from influence.capture.objectives import layer_gradients, token_weights
from influence.runtime.mesh import (
    DATA,
    all_processes_sum,
    local,
    local_slots,
    per_device_to_host,
    put_per_device,
    replicate,
    spans_processes,
    spec,
    to_host,
    zeros_per_device,
)
from influence.runtime.stream import BatchStream, drive

_STATIC = ("graphdef", "layers", "task", "fisher", "mesh", "blocks")
COVARIANCE_PASS, EIGENVALUE_PASS = 0, 1


def _g_spec(fisher: str):
    # With several Fisher directions, g is [K, B, T, d_out]: the batch axis is second.
    return spec(None, DATA) if fisher == "exact" else spec(DATA)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnums=(0,))
def _covariance_step(sums, state, batch, example_mask, key, index, *, graphdef, layers, task, fisher, mesh, blocks):
    """Add one batch's token covariance sums to each device's slot.

    ``sums[name] = (A [n_data, d_a, d_a], S [n_data, d_out, d_out])`` (tuples of diagonal
    blocks for a split layer). Returns the new sums, the global count of weighted tokens
    per layer and the objective's value."""
    value, a, g = layer_gradients(graphdef, state, layers, task, fisher, batch, example_mask,
                                  jax.random.fold_in(key, index))
    weights = {i.name: token_weights(task, batch, example_mask, a[i.name]) for i in layers}

    def per_device(a, g, w):
        out = {}
        for info, layer_blocks in zip(layers, blocks):
            n = info.name
            if layer_blocks.dense:
                pair = covariance_sums(a[n], g[n], w[n])
            else:
                pair = covariance_block_sums(a[n], g[n], w[n], layer_blocks)
            out[n] = jax.tree.map(lambda x: x[None], pair)
        return out

    new = local(per_device, mesh, (spec(DATA), _g_spec(fisher), spec(DATA)), spec(DATA))(a, g, weights)
    counts = {name: jnp.sum(w) for name, w in weights.items()}
    return jax.tree.map(jnp.add, sums, new), counts, jnp.sum(value)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnums=(0,))
def _eigenvalue_step(sums, rotations, state, batch, example_mask, key, index, *, graphdef, layers, task, fisher, mesh,
                     blocks):
    """Add one batch's Σ_b (Q_Aᵀ DW_b Q_S)² ``[n_data, d_a, d_out]`` to each device's slot
    (no rotation for the diagonal strategy: ``rotations[name] = (None, None)``)."""
    value, a, g = layer_gradients(graphdef, state, layers, task, fisher, batch, example_mask,
                                  jax.random.fold_in(key, index))

    def per_device(a, g, mask, rotations):
        return {i.name: eigenvalue_sums(a[i.name], g[i.name], mask, *rotations[i.name])[None] for i in layers}

    new = local(per_device, mesh, (spec(DATA), _g_spec(fisher), spec(DATA), spec()), spec(DATA))(
        a, g, example_mask, rotations)
    return jax.tree.map(jnp.add, sums, new), jnp.sum(value)


STEPS = {COVARIANCE_PASS: _covariance_step, EIGENVALUE_PASS: _eigenvalue_step}


def covariance_zeros(layers, blocks: dict[str, LayerBlocks], mesh: Mesh) -> dict:
    """Per-device slots for A and S (the diagonal blocks only, for a split layer)."""
    out = {}
    for info in layers:
        b = blocks[info.name]
        if b.dense:
            out[info.name] = (zeros_per_device((info.d_a, info.d_a), mesh), zeros_per_device((info.d_out, info.d_out), mesh))
        else:
            a = tuple(zeros_per_device((hi - lo, hi - lo), mesh) for lo, hi in zip(b.a, b.a[1:]))
            s = tuple(zeros_per_device((hi - lo, hi - lo), mesh) for lo, hi in zip(b.s, b.s[1:]))
            out[info.name] = (a, s)
    return out


def eigenvalue_zeros(layers, mesh: Mesh) -> dict:
    return {info.name: zeros_per_device((info.d_a, info.d_out), mesh) for info in layers}


class PassResult(NamedTuple):
    """A finished pass: per-device sums (on the mesh), weighted token counts per layer
    (covariance pass; float64, all processes) and the number of examples (all processes)."""

    sums: Any
    n_tokens: dict[str, float] | None
    n_examples: int


def _restore_slots(template: Any, arrays: dict[str, np.ndarray], mesh: Mesh) -> Any:
    """Per-device sums from a snapshot. Saved with another number of devices (one
    process), the slots are added and the total goes to the first slot: equal sums, to
    rounding."""
    leaves, treedef = jax.tree.flatten(template)
    slots = local_slots(mesh)
    restored = []
    for i, leaf in enumerate(leaves):
        saved = arrays[f"sums/{i}"]
        if saved.shape[1:] != leaf.shape[1:]:
            raise CheckpointMismatch(f"checkpoint sums {i} have shape {saved.shape[1:]}, expected {leaf.shape[1:]}")
        if saved.shape[0] != slots:
            if spans_processes(mesh):
                raise CheckpointMismatch(
                    f"the checkpoint was taken with {saved.shape[0]} devices on this process, now {slots}; "
                    "resume several processes with the same devices")
            folded = np.zeros((slots, *saved.shape[1:]), saved.dtype)
            folded[0] = saved.sum(axis=0, dtype=np.float64)
            saved = folded
        restored.append(put_per_device(saved, mesh))
    return jax.tree.unflatten(treedef, restored)


def run_pass(
    pass_id: int,
    sums: Any,
    extra: tuple,
    *,
    tracked,
    task,
    fisher: str,
    source: DataSource,
    mesh: Mesh,
    key: jax.Array,
    blocks: tuple[LayerBlocks, ...],
    desc: str,
    progress: bool,
    checkpoint: Checkpoint | None = None,
    resumed: tuple[dict, dict] | None = None,
    snapshot_arrays: Callable[[], dict[str, np.ndarray]] = dict,
) -> PassResult:
    """Stream every batch of ``source`` through the pass's step.

    Args:
      sums: zero accumulators (replaced by the snapshot's when resuming).
      extra: further step arguments before the model state (the rotations of the
        eigenvalue pass).
      resumed: ``(progress, arrays)`` of a snapshot of this pass, or ``None``.
      snapshot_arrays: arrays saved with each snapshot besides the sums (the previous
        pass's results).
    """
    step = STEPS[pass_id]
    start, consumed, chain, n_examples, totals = 0, None, "", 0, None
    if resumed is not None:
        state, arrays = resumed
        start, consumed, chain = state["next"], state["consumed"], state["chain"]
        n_examples, totals = state["n_examples"], state["n_tokens"]
        sums = _restore_slots(sums, arrays, mesh)
    stream = BatchStream(source, mesh, start=start, consumed=consumed, chain=chain, checkpoint=checkpoint,
                         desc=desc, progress=progress)
    pass_key = replicate(jax.random.fold_in(key, pass_id), mesh)
    statics = dict(graphdef=tracked.graphdef, layers=tracked.layers, task=task, fisher=fisher, mesh=mesh, blocks=blocks)
    pending: list[tuple[int, Any, Any]] = []  # (batch index, objective value, token counts) not yet checked
    done = (start, stream.consumed, chain, 0)  # next index, real batches read, data chain, rows: as of the last completed step

    def settle() -> None:
        """Check the objective of the pending batches and fold their token counts in."""
        nonlocal totals
        for index, value, counts in pending:
            if not np.isfinite(to_host(value)):
                lo = index * source.batch_size
                raise FloatingPointError(
                    f"the {'objective' if fisher != 'exact' else 'Fisher directions'} is NaN/Inf on batch {index} "
                    f"(examples {lo}..{lo + source.batch_size - 1}); check the inputs and the model's weights"
                )
            if counts is not None:
                totals = totals or {name: 0.0 for name in counts}
                for name, c in counts.items():
                    totals[name] += float(to_host(c))
        pending.clear()

    def snapshot() -> None:
        settle()
        index, n_read, data_chain, rows = done
        state = {"pass": pass_id, "next": index, "consumed": n_read, "chain": data_chain,
                 "n_examples": n_examples + rows, "n_tokens": totals}
        arrays = {f"sums/{i}": per_device_to_host(leaf) for i, leaf in enumerate(jax.tree.leaves(sums))}
        checkpoint.save((pass_id, index), state, {**arrays, **snapshot_arrays()})

    if checkpoint is not None and resumed is None and pass_id == EIGENVALUE_PASS:
        snapshot()  # the covariance pass's results are kept even if this pass saves nothing else
    def body(s) -> None:
        nonlocal sums, done
        out = step(sums, *extra, tracked.state, s.arrays, s.example_mask, pass_key,
                   replicate(np.int32(s.index), mesh), **statics)
        sums = out[0]
        pending.append((s.index, out[-1], out[1] if len(out) == 3 else None))
        done = (s.index + 1, stream.consumed, stream.chain.value, stream.n_examples)

    drive(stream, checkpoint, body, snapshot)
    settle()
    total_examples = int(all_processes_sum(np.array(n_examples + stream.n_examples, np.int64)))
    return PassResult(sums, totals, total_examples)
