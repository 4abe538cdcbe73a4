"""``fit_factors``: the curvature of the damped Gauss-Newton matrix, fitted on the data.

The strategy (:mod:`influence.curvature.strategies`) names the passes over the training
set; each runs through the one pass driver (:func:`influence.runtime.driver.run_pass`),
data-parallel over a device mesh: the jitted step captures the tracked layers' inputs and
output gradients on the global batch (partitioned by ``jit`` over the mesh's data axis)
and each device adds the sums over *its* rows to its own slot of a ``[n_data, ...]``
accumulator. The slots are added once, when the pass ends, before the pass's finish
(e.g. the eigendecompositions). With a checkpoint, the slots, token counts and data
position are saved every few batches; an interrupted fit resumes in the pass it was in,
with the results of the earlier passes kept in the snapshot.
"""

from __future__ import annotations

import dataclasses
import datetime
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from influence.capture.objectives import bytes_per_example, choose_fisher, has_directions
from influence.capture.rest import REST
from influence.capture.streams import drawn_streams, warn_streams
from influence.capture.tracking import LayerFilter, track, trackable_infos, warn_untracked
from influence.curvature import LayerCurvature, get_strategy
from influence.curvature import blocks as blocks_
from influence.curvature.eigenvalues import EIGENVALUES
from influence.curvature.passes import CurvaturePass
from influence.errors import CheckpointMismatch, ConfigError, DataError, NonFiniteError
from influence.factors import (
    Factors,
    as_factor_dtype,
    check_finite_weights,
    curvature_arrays,
    curvature_from_arrays,
)
from influence.runtime.data import as_source
from influence.runtime.driver import Accumulator, run_pass
from influence.runtime.execution import Execution
from influence.runtime.io import digest_arrays
from influence.runtime.mesh import (
    all_processes_gather,
    all_processes_sum,
    data_mesh,
    describe_mesh,
    local_batch_size,
    local_slots,
    n_data,
    per_device_to_host,
    put_per_device,
    reduce_slots,
    replicate,
    shard_batch,
    spans_processes,
    to_host,
)

FISHER_KINDS = ("sampled", "empirical", "exact")


class _Sums(NamedTuple):
    """State of a curvature pass: per-device sums (on the mesh), the weighted token
    counts folded in so far (float64 per layer, or None), and the objective values and
    counts of the batches not yet checked (device scalars: checking them per batch would
    sync the host every step)."""

    sums: Any
    n_tokens: dict[str, float] | None
    pending: tuple


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


def _sample_rows(step, mesh: Mesh, mode: str, row_offset: int = 0):
    """What seeds a batch's sampled targets (:func:`example_keys`): the global row index of
    each example ``[B]`` (``row_offset`` + ``Batch.start`` + row), so that an example gets
    the same key whatever batch, device or host it falls in; or, for a loss that takes one
    key, the batch index."""
    if mode == "batch":
        return replicate(np.int32(step.index), mesh)
    size = len(step.batch.example_mask)
    return shard_batch(np.arange(size, dtype=np.int32) + np.int32(row_offset + max(step.batch.start, 0)), mesh)


HOST_ROW_STRIDE = 2**26
"""Rows set apart per process for the sample keys when some process's data has no
length: process p's rows are keyed from p × this."""


def _global_row_offset(source, mesh: Mesh) -> tuple[int, str]:
    """Where this process's rows start in the row order that keys the sampled draws, and
    how that order is defined. One process: 0. Several: the rows of the processes before
    this one (each process holds a contiguous share, in process order, as
    :func:`influence.hosts.host_shard` splits), so the draws are those of one process over
    all the data; when a process's data has no length, ``process index × HOST_ROW_STRIDE``
    (the draws stay distinct across hosts but depend on the host split)."""
    if not spans_processes(mesh):
        return 0, "global row"
    counts = all_processes_gather(np.array(-1 if source.num_examples is None else source.num_examples, np.int64))
    if (counts < 0).any():
        return (jax.process_index() * HOST_ROW_STRIDE,
                f"host row + process index x {HOST_ROW_STRIDE} (data of unknown length)")
    return int(counts[:jax.process_index()].sum()), "global row (the processes' rows in process order)"


def _pass_accumulator(curvature_pass: CurvaturePass, zeros, step_args: tuple, tracked, task, mesh: Mesh,
                      key, layer_blocks: tuple, batch_size: int, choice: dict) -> Accumulator:
    """The driver's view of one curvature pass: sums over the batches, NaN-checked.
    ``choice["fisher"]`` is the :class:`~influence.capture.objectives.FisherChoice` (the
    Fisher and how the task takes sampled keys), set on the first batch by the caller's
    check and shared by the passes."""
    pass_key = replicate(jax.random.fold_in(key, curvature_pass.index), mesh)
    statics = dict(graphdef=tracked.graphdef, layers=tracked.layers, task=task, mesh=mesh, blocks=layer_blocks)

    def update(state, step):
        if "fisher" not in choice:
            choice["fisher"] = choice.pop("check")(step.batch.arrays)
        rows = _sample_rows(step, mesh, choice["fisher"].key_mode, choice["row_offset"])
        sums, counts, value = curvature_pass.step(state.sums, *step_args, tracked.state, step.arrays,
                                                  step.example_mask, pass_key, rows, fisher=choice["fisher"].kind,
                                                  **statics)
        return _Sums(sums, state.n_tokens, state.pending + ((step.index, value, counts),))

    def settle(state):
        """Check the objective of the pending batches and fold their token counts in."""
        totals = state.n_tokens
        for index, value, counts in state.pending:
            if not np.isfinite(to_host(value)):
                lo = index * batch_size
                raise NonFiniteError(
                    f"the {'Fisher directions' if has_directions(choice['fisher'].kind) else 'objective'} is "
                    f"NaN/Inf on batch {index} "
                    f"(examples {lo}..{lo + batch_size - 1}); check the inputs and the model's weights"
                )
            if counts is not None:
                totals = totals or {name: 0.0 for name in counts}
                totals = {name: totals[name] + float(to_host(c)) for name, c in counts.items()}
        return _Sums(state.sums, totals, ())

    def save(state, checkpoint):
        state = settle(state)
        arrays = {f"sums/{i}": per_device_to_host(leaf) for i, leaf in enumerate(jax.tree.leaves(state.sums))}
        return state, {"n_tokens": state.n_tokens}, arrays

    def restore(facts, arrays, checkpoint):
        return _Sums(_restore_slots(zeros, arrays, mesh), facts["n_tokens"], ())

    return Accumulator(lambda: _Sums(zeros, None, ()), update, settle, save, restore)


def _earlier_results(curvature, n_tokens) -> dict[str, np.ndarray]:
    """What a snapshot of a later pass keeps of the earlier ones."""
    kept = curvature_arrays(curvature, prefix="curvature/")
    kept.update({f"n_tokens/{name}": np.float64(v) for name, v in (n_tokens or {}).items()})
    return kept


def _pass_layers(passes: tuple, layers: tuple) -> list[tuple[CurvaturePass, tuple]]:
    """Each pass with the layers it fits. ``~rest`` is diagonal whatever the strategy: left
    out of the covariance pass (its S would be R × R), fitted by the eigenvalue pass in the
    parameter basis; a strategy without that pass (K-FAC) gets one for ``~rest`` alone."""
    real = tuple(i for i in layers if i.name != REST)
    rest = tuple(i for i in layers if i.name == REST)
    out = [(p, layers if p is EIGENVALUES else real) for p in passes]
    if rest and passes and EIGENVALUES not in passes:
        out.append((EIGENVALUES, rest))
    return [(p, chosen) for p, chosen in out if chosen]


def _key_settings(key: jax.Array) -> list[int]:
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.asarray(data).ravel().tolist()


def fit_factors(
    model: nnx.Module,
    task: Any,
    data: Any,
    *,
    strategy: str = "ekfac",
    fisher: str | None = None,
    fisher_samples: int | None = None,
    key: jax.Array | None = None,
    layers: LayerFilter = None,
    blocks: Any = None,
    max_block_size: int | None = None,
    factor_dtype: Any = "float32",
    rest: str | None = "auto",
    execution: Execution | None = None,
    **options: Any,
) -> Factors:
    """Fit the curvature approximation ``strategy`` on ``data``.

    Args:
      model: a ``flax.nnx.Module`` at its final weights. The library works on a clone in
        eval mode (``model.eval()``: Dropout off, BatchNorm on its running statistics);
        ``model`` itself is untouched.
      task: an :class:`influence.Task` (e.g. ``tasks.Classification()``).
      data: training data: a dict of arrays, a ``datasets.Dataset``, a list of dict
        batches, or a callable returning an iterable of dict batches. With several
        processes, each passes its own shard (see :mod:`influence.scoring.hosts`).
      strategy: ``"identity"``, ``"diagonal"``, ``"kfac"`` or ``"ekfac"``
        (:mod:`influence.curvature.strategies`).
      fisher: ``"sampled"`` (targets drawn from the model: the true Fisher, which
        equals the Gauss-Newton matrix for the built-in losses), ``"empirical"`` (the
        data's labels) or ``"exact"`` (the exact expectation, when the task provides
        ``fisher_directions``; costs one backward pass per direction: per class of a
        classifier, per output and token). ``None`` (default) chooses by the task, on
        the first batch (:func:`influence.capture.objectives.choose_fisher`): the exact
        Fisher when it has at most 32 directions per example (classification with up
        to 32 classes, regression with up to 32 outputs), else the sampled Fisher with
        4 draws per example for one output per example, 1 for a sequence of T ≥ 4
        target tokens (a language model: each draw samples every token), else the
        empirical Fisher (a loss that cannot sample; warned). The rule comes from LDS
        and fit time measured on digits and a tiny LM (docs/benchmarks.md, "Which
        Fisher"); an explicit ``fisher`` is used as given.
        ``metadata["fisher"]``, ``["fisher_samples"]`` and ``["fisher_rule"]`` record
        the choice and why.
      fisher_samples: sampled draws per example (an int ≥ 1; only with the sampled
        Fisher): the Fisher is the mean over the draws, draw j of example n keyed by
        ``fold_in(key_n, j)``, ``key_n = fold_in(fold_in(key, pass), n)`` the example's
        one-draw key, so it does not depend on the batching either.
        Each draw costs one backward pass. Default: 1 with ``fisher="sampled"``, 4 when
        the default rule picks the sampled Fisher.
      key: PRNG key for sampled targets (default ``jax.random.key(0)``).
      layers: which layers to track (see :func:`influence.capture.track`): by default every
        ``nnx.Linear``, ``nnx.Conv``, ``nnx.ConvTranspose``, ``nnx.LinearGeneral`` and
        ``nnx.Einsum``, and the Linen ``nn.Dense``/``DenseGeneral``/``Conv``/``Einsum``
        inside an ``nnx.bridge.ToNNX`` (grouped convolutions are skipped, said). Parameters
        outside them are warned about once (:class:`influence.UntrackedParametersWarning`)
        and listed in ``metadata["untracked"]``.
      blocks: split layers' factors into diagonal blocks to bound their memory: an int,
        a pair ``(n_a, n_s)``, or ``{layer name or pattern: int or pair}``
        (see :func:`influence.curvature.blocks.resolve`).
      max_block_size: split every factor larger than this into blocks no larger.
      factor_dtype: ``"float32"`` or ``"bfloat16"``: the dtype the eigenbases and
        eigenvalues are kept in, on device and in the result (sums are accumulated in
        float32 and eigendecompositions run in float64 on the host either way).
      rest: what the parameters outside the tracked layers get (norm scales,
        embeddings, bare ``nnx.Param`` s, skipped layers): ``"diagonal"`` tracks them as
        the pseudo-layer ``"~rest"`` with the diagonal Gauss-Newton (Λ = E_n[g_n²], one
        per-example gradient per example: :mod:`influence.capture.rest`), whatever the
        strategy of the layers; ``None`` leaves them out (warned, and listed in
        ``metadata["untracked"]``). ``"auto"`` (default): ``"diagonal"`` only when the
        model has no trackable layer (a model of bare parameters), since per-example
        gradients of, e.g., an LM's embeddings cost vocabulary × width floats per
        example; ``None`` otherwise. ``metadata["rest"]`` records the choice.
      execution, **options: run settings (:class:`influence.Execution`: ``batch_size``,
        ``mesh``, ``progress``, ``checkpoint_dir``, ``checkpoint_every``, ``resume``), as an
        object or by name. A mesh may span hosts; the factors equal the one-device factors
        to rounding.

    Returns:
      :class:`Factors`; ``Q_A [d_a, d_a]``, ``Q_S [d_out, d_out]`` (tuples of diagonal
      blocks for a split layer), ``Λ [d_a, d_out]`` per layer as the strategy requires.
    """
    run = Execution.of(execution, options)
    chosen = get_strategy(strategy)
    if fisher is not None and fisher not in FISHER_KINDS:
        raise ConfigError(f"unknown fisher {fisher!r}; expected one of {FISHER_KINDS} or None (chosen by the task)")
    if fisher_samples is not None:
        if isinstance(fisher_samples, bool) or not isinstance(fisher_samples, int | np.integer) or fisher_samples < 1:
            raise ConfigError(f"fisher_samples must be an int >= 1 (sampled draws per example), got {fisher_samples!r}")
        if fisher not in (None, "sampled"):
            raise ConfigError(f"fisher_samples={fisher_samples} is the number of sampled draws per example; it does "
                             f"not apply to fisher={fisher!r}")
        fisher_samples = int(fisher_samples)
    dtype = as_factor_dtype(factor_dtype)
    mesh = data_mesh(run.mesh)
    if rest not in ("auto", "diagonal", None):
        raise ConfigError(f"unknown rest {rest!r}; expected 'diagonal', None or 'auto'")
    if rest == "auto":
        rest = None if trackable_infos(model) else "diagonal"
    tracked = track(model, layers, rest=rest == "diagonal")
    check_finite_weights(tracked.state)
    warn_untracked(tracked)
    key = jax.random.key(0) if key is None else key

    def per_example_bytes(row):  # of the Fisher the fit will use (K exact directions or k draws per example)
        if not chosen.passes:  # no curvature pass, no Fisher (and no warning about one)
            kind = "empirical"
        else:
            with warnings.catch_warnings():  # sizing only: the first batch's check says it, once
                warnings.simplefilter("ignore")
                kind = choose_fisher(nnx.merge(tracked.graphdef, tracked.state), task, row, key, fisher,
                                     fisher_samples).kind
        return bytes_per_example(tracked.graphdef, tracked.state, tracked.layers, task, kind, row)

    run = run.sized(data, task, per_example_bytes, multiple=n_data(mesh), even_out=not spans_processes(mesh))
    source = as_source(data, local_batch_size(run.batch_size, mesh), task, model)
    if len(chosen.passes) > 1 and source.single_pass:
        times = "twice" if len(chosen.passes) == 2 else f"{len(chosen.passes)} times"
        raise DataError(f"{strategy} reads the data {times}; pass a list, a datasets.Dataset or a callable, not a "
                        "one-shot iterator")
    layer_blocks = blocks_.resolve([i for i in tracked.layers if i.name != REST], blocks, max_block_size)
    layer_blocks.update(blocks_.resolve([i for i in tracked.layers if i.name == REST]))  # diagonal: never split
    metadata: dict[str, Any] = {
        "layers": [info._asdict() for info in tracked.layers],
        "fisher": fisher,
        "fisher_rule": "not used: the strategy has no curvature pass" if not chosen.passes else None,
        "fingerprint": tracked.fingerprint,
        "untracked": tracked.untracked.as_metadata(),
        "rest": ({"curvature": "diagonal", "parameters": tracked.kind(REST).d_out,
                  "paths": list(tracked.kind(REST).paths)} if REST in tracked.layer_names else None),
        "dtype": dtype.name,
        "batch_size": run.batch_size,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if blocks_.as_metadata(layer_blocks):
        metadata["blocks"] = blocks_.as_metadata(layer_blocks)
    curvature = {info.name: LayerCurvature() for info in tracked.layers}
    if not chosen.passes:
        return Factors(strategy, curvature, {**metadata, "n_examples": source.num_examples, "n_tokens": None})

    checkpoint = run.checkpoint("factors", {
        "strategy": strategy, "fisher": fisher if fisher is not None else "default", "batch_size": run.batch_size,
        "key": _key_settings(key), **({"fisher_samples": fisher_samples} if fisher_samples is not None else {}),
        "layers": metadata["layers"], "blocks": metadata.get("blocks"), "dtype": dtype.name,
        "model": tracked.fingerprint, "weights": digest_arrays(tracked.state), "processes": jax.process_count(),
        # sampled targets keyed by global row: a snapshot of the per-batch scheme must not be resumed
        **({"sample_keys": "per example row"} if fisher in ("sampled", None) else {}),
        **({"sample_rows": "offset by the rows of earlier processes"} if spans_processes(mesh) else {}),
    }) if run.checkpoint_dir is not None else None
    resumed = checkpoint.load() if checkpoint is not None else None
    resumed_pass = resumed[0]["pass"] if resumed is not None else None
    n_tokens = None
    if resumed_pass is not None and resumed_pass != chosen.passes[0].index:  # earlier passes finished before
        arrays = resumed[1]
        curvature = curvature_from_arrays(arrays, tracked.layer_names, dtype, prefix="curvature/")
        n_tokens = {name: float(arrays[f"n_tokens/{name}"]) for name in tracked.layer_names
                    if f"n_tokens/{name}" in arrays}
        n_tokens = n_tokens or None
    on_mesh = dataclasses.replace(tracked, state=replicate(tracked.state, mesh))

    def check(arrays):
        # streams the forward pass draws from are held fixed (capture.streams): said once, on the first batch
        choice["streams"] = drawn_streams(tracked.graphdef, tracked.state, lambda model: task.loss(model, arrays))
        warn_streams(choice["streams"], stacklevel=6)
        return choose_fisher(nnx.merge(tracked.graphdef, tracked.state), task, arrays, key, fisher, fisher_samples)

    row_offset, sample_rows = _global_row_offset(source, mesh)
    choice: dict[str, Any] = {"check": check, "row_offset": row_offset}
    for position, (curvature_pass, pass_layers) in enumerate(_pass_layers(chosen.passes, tracked.layers)):
        if resumed_pass is not None and curvature_pass.index < resumed_pass:
            continue
        ordered_blocks = tuple(layer_blocks[i.name] for i in pass_layers)
        zeros = curvature_pass.zeros(pass_layers, layer_blocks, mesh)
        accumulator = _pass_accumulator(curvature_pass, zeros, curvature_pass.step_args(curvature, mesh),
                                        dataclasses.replace(on_mesh, layers=pass_layers), task,
                                        mesh, key, ordered_blocks, source.batch_size, choice)
        result = run_pass(accumulator, source, mesh, checkpoint=checkpoint,
                          resumed=resumed if curvature_pass.index == resumed_pass else None,
                          pass_index=curvature_pass.index,
                          keep=_earlier_results(curvature, n_tokens) if position else None,
                          save_at_start=position > 0, desc=f"{strategy}: {curvature_pass.name}", progress=run.progress)
        state = result.value
        n_tokens = state.n_tokens if state.n_tokens is not None else n_tokens
        n_examples = int(all_processes_sum(np.array(result.n_examples, np.int64)))
        totals = reduce_slots(state.sums, mesh)
        del result, state
        # a pass returns the layers it fitted; the others (~rest, left to another pass) are kept
        curvature = {**curvature, **curvature_pass.finish(curvature, totals, n_tokens, n_examples, layer_blocks, dtype)}
        del totals
    metadata.update(n_examples=int(n_examples), n_tokens=n_tokens, mesh=describe_mesh(mesh))
    if choice.get("streams"):
        metadata["rng_streams"] = choice["streams"]
    if "fisher" in choice:
        used = choice["fisher"]
        metadata.update(fisher=used.fisher, fisher_rule=used.rule)
        if used.fisher == "sampled":
            metadata["fisher_samples"] = used.samples
            metadata["sample_keys"] = "per example" if used.key_mode == "example" else "per batch"
            if used.key_mode == "example":
                metadata["sample_rows"] = sample_rows
    return Factors(strategy, curvature, metadata)
