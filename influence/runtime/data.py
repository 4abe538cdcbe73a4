"""Batching of user data into fixed-size, padded batches of numeric arrays.

Accepted inputs (see :func:`as_source`):
  * a dict of arrays holding the whole set (leading axis = examples);
  * a ``datasets.Dataset`` (numeric columns are used; strings such as metadata are
    ignored);
  * a list/tuple (or any re-iterable) of dict batches of any sizes, re-batched here;
  * a zero-argument callable returning a fresh iterable of dict batches (for data
    that is streamed from disk and must be read more than once);
  * a one-shot iterator of dict batches, accepted where a single pass is enough.

Every batch has exactly ``batch_size`` rows, so jitted functions compile once; the
last batch is padded with zeros and :class:`Batch.n_valid` says how many rows are
real. Memory never holds more than about two batches of the input.

Given a task (and the model), every batch is first checked by the task's
``validate`` hook on the host (label dtypes and ranges, target shapes): a value that is
wrong cannot raise inside a jitted function, so it is refused here, before the batch
is placed on a device.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from influence.errors import ConfigError, ConfigTypeError, DataError, TaskError


@dataclasses.dataclass(frozen=True)
class Batch:
    """A padded batch: ``arrays[k]`` has leading size ``batch_size``; rows at and after
    ``n_valid`` are padding. ``start`` is the index of the first row in the data set."""

    arrays: dict[str, np.ndarray]
    n_valid: int
    start: int

    @property
    def example_mask(self) -> np.ndarray:
        size = len(next(iter(self.arrays.values())))
        return (np.arange(size) < self.n_valid).astype(np.float32)




def check_hashable(task: Any) -> None:
    """``TypeError`` unless ``task`` is hashable (it is a static argument of jitted code)."""
    try:
        hash(task)
    except TypeError as e:
        raise ConfigTypeError(
            f"the task {type(task).__name__} is not hashable ({e}); tasks are static arguments of jitted functions: "
            "make it a frozen dataclass (@dataclasses.dataclass(frozen=True)) or give it __hash__") from None


def _array_like(value: Any) -> bool:
    """A numpy/JAX array (not a dict batch): what an ``(X, y)`` tuple holds."""
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, Mapping)


def _from_dataframe(data: Any) -> Any:
    """A pandas ``DataFrame`` as a dict of its columns' arrays (non-numeric columns are
    then ignored, as a ``datasets.Dataset``'s are); anything else as it is. pandas is
    not a dependency: it is looked up only when already imported."""
    pandas = sys.modules.get("pandas")
    if pandas is None or not isinstance(data, pandas.DataFrame):
        return data
    return {str(name): data[name].to_numpy() for name in data.columns}


def _numeric(value: Any) -> bool:
    arr = np.asarray(value) if not isinstance(value, np.ndarray) else value
    return arr.dtype.kind in "biuf"


def _select(arrays: Mapping[str, Any], fields: tuple[str, ...], optional: tuple[str, ...],
            where: str) -> dict[str, np.ndarray]:
    if fields:
        missing = [f for f in fields if f not in arrays]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}; available: {sorted(arrays)}")
        keys = list(fields) + [f for f in optional if f in arrays]
    else:
        keys = [k for k, v in arrays.items() if _numeric(v)]
    out = {}
    for k in keys:
        arr = np.asarray(arrays[k])
        if arr.dtype == object or not _numeric(arr):
            raise DataError(f"{where}: field {k!r} is not a numeric array (dtype {arr.dtype}); "
                            "pad ragged sequences first")
        out[k] = arr
    if not out:
        raise DataError(f"{where}: no numeric field to use")
    return out


def _num_rows(arrays: dict[str, np.ndarray], where: str) -> int:
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise DataError(f"{where}: fields have different numbers of rows: {sizes}")
    return next(iter(sizes.values()))


class DataSource:
    """A re-iterable stream of fixed-size padded :class:`Batch` es over a data set."""

    def __init__(self, data: Any, batch_size: int, fields: tuple[str, ...] = (), optional_fields: tuple[str, ...] = ()):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)
        self.fields = tuple(fields)
        self.optional_fields = tuple(optional_fields)
        self.check: BatchCheck | None = None
        self._consumed = False
        self.num_examples: int | None = None
        data = _from_dataframe(data)
        if isinstance(data, (list, tuple)) and data and all(_array_like(b) for b in data):
            names = self.fields if len(self.fields) == len(data) else tuple(f"field{i}" for i in range(len(data)))
            form = "{" + ", ".join(f"{n!r}: {v}" for n, v in zip(names, ("X", "y", "Z", "W")[: len(data)])) + "}"
            raise DataError(
                f"data is a {type(data).__name__} of {len(data)} arrays; give the arrays names: pass a dict "
                f"{form}" + (f" (the task reads the fields {list(self.fields)})" if self.fields else ""))
        self._data = data
        if isinstance(data, Mapping):
            arrays = _select(data, self.fields, self.optional_fields, "data")
            self.num_examples = _num_rows(arrays, "data")
            self._kind, self._arrays = "dict", arrays
        elif _is_hf_dataset(data):
            self.num_examples = len(data)
            self._kind = "dataset"
        elif callable(data):
            self._kind = "callable"
        elif isinstance(data, Iterable):
            self._kind = "iterator" if iter(data) is data else "iterable"
            if isinstance(data, (list, tuple)) and all(isinstance(b, Mapping) for b in data):
                self.num_examples = sum(
                    _num_rows(_select(b, self.fields, self.optional_fields, f"batch {i}"), f"batch {i}")
                    for i, b in enumerate(data))
        else:
            raise DataError(
                f"cannot read data of type {type(data).__name__}: pass a dict of arrays, a datasets.Dataset, "
                "a list of dict batches, or a callable returning an iterable of dict batches"
            )
        if self.num_examples == 0:
            raise DataError("the data set is empty")

    @property
    def num_batches(self) -> int | None:
        return None if self.num_examples is None else math.ceil(self.num_examples / self.batch_size)

    @property
    def single_pass(self) -> bool:
        return self._kind == "iterator"

    def _raw_chunks(self) -> Iterator[dict[str, np.ndarray]]:
        bs = self.batch_size
        if self._kind == "dict":
            for lo in range(0, self.num_examples, bs):
                yield {k: v[lo : lo + bs] for k, v in self._arrays.items()}
            return
        if self._kind == "dataset":
            ds = self._data
            columns = list(self.fields) + [c for c in self.optional_fields if c in ds.column_names]
            if not self.fields:
                columns = list(ds.column_names)
            missing = [c for c in columns if c not in ds.column_names]
            if missing:
                raise DataError(f"dataset: missing column(s) {missing}; available: {ds.column_names}")
            ds = ds.select_columns(columns).with_format("numpy")
            for lo in range(0, len(ds), bs):
                yield _select(ds[lo : lo + bs], self.fields, self.optional_fields, f"dataset rows {lo}:{lo + bs}")
            return
        if self._kind == "iterator":
            if self._consumed:
                raise DataError(
                    "this data is a one-shot iterator and was already consumed; this operation reads the data "
                    "more than once: pass a list, a datasets.Dataset, or a callable returning a fresh iterator"
                )
            self._consumed = True
            source = self._data
        else:
            source = self._data() if self._kind == "callable" else self._data
        for i, chunk in enumerate(source):
            if not isinstance(chunk, Mapping):
                raise DataError(f"batch {i} is a {type(chunk).__name__}, expected a dict of arrays")
            yield _select(chunk, self.fields, self.optional_fields, f"batch {i}")

    def __iter__(self) -> Iterator[Batch]:
        """Yield batches of exactly ``batch_size`` rows (the last one zero-padded)."""
        bs = self.batch_size
        pending: list[dict[str, np.ndarray]] = []
        pending_rows = 0
        start = 0
        signature = None
        for i, chunk in enumerate(self._raw_chunks()):
            rows = _num_rows(chunk, f"batch {i}")
            sig = {k: (v.shape[1:], v.dtype.kind) for k, v in chunk.items()}
            if signature is None:
                signature = sig
            elif sig != signature:
                raise DataError(
                    f"batch {i} does not match earlier batches: fields/shapes {_describe(sig)} vs "
                    f"{_describe(signature)}"
                )
            if rows == 0:
                continue
            pending.append(chunk)
            pending_rows += rows
            while pending_rows >= bs:
                merged = _concat(pending)
                yield self._checked(Batch({k: v[:bs] for k, v in merged.items()}, bs, start))
                start += bs
                rest = {k: v[bs:] for k, v in merged.items()}
                pending_rows -= bs
                pending = [rest] if pending_rows else []
        if pending_rows:
            merged = _concat(pending)
            yield self._checked(Batch(_pad(merged, bs), pending_rows, start))
            start += pending_rows
        if start == 0:
            raise DataError("the data set is empty")
        if self.num_examples is None:
            self.num_examples = start

    def _checked(self, batch: Batch) -> Batch:
        """``batch``, after the task's check (a :class:`DataError` if it refuses it)."""
        if self.check is not None:
            self.check(batch, batch.start // self.batch_size)
        return batch


class BatchCheck:
    """Runs ``task.validate(arrays, output_shape, first_row=...)`` on the real rows of each
    host batch; a ``ValueError`` it raises becomes a :class:`DataError` naming the batch.

    ``output_shape`` is that of ``task.outputs(model, batch)`` (e.g. ``[B, T, K]`` for
    an :class:`~influence.tasks.OutputTask`), found once with ``jax.eval_shape`` (a
    trace, no computation), or ``None`` without a model or ``outputs``. If that forward
    pass fails, nothing is checked here: the pass runs the same forward and reports the
    failure with the batch's shapes, the more telling error."""

    _UNKNOWN = object()
    _FAILED = object()

    def __init__(self, task: Any, model: Any = None, queries: bool = False):
        self.task = task
        self.model = model
        self.queries = queries
        self.output_shape: Any = self._UNKNOWN

    def _check_loss_shape(self, arrays: dict[str, np.ndarray]) -> None:
        """:class:`TaskError` unless the task's loss (the measurement, for queries) is one
        number per example, ``[B]``: a ``[B, 1]`` or a mean would be accepted by the sums
        and silently give wrong scores. Traced once (``jax.eval_shape``); a forward pass
        that fails is left for the pass to report in context."""
        if self.model is None:
            return
        graphdef, state = nnx.split(self.model)
        name = "measurement" if self.queries else "loss"
        method = getattr(self.task, name)

        def value(state, batch):
            return method(nnx.merge(graphdef, state), batch)

        try:
            shape = tuple(jax.eval_shape(value, state, arrays).shape)
        except Exception:
            return
        size = len(next(iter(arrays.values())))
        if shape != (size,):
            raise TaskError(
                f"{type(self.task).__name__}.{name} must return one number per example, shape [B] = [{size}]; it "
                f"returned shape {list(shape)}. Losses are per-example sums over tokens/outputs (not means over "
                "the batch): drop trailing axes of size 1 and sum, do not average, over the batch")

    def _check_query_mask(self, arrays: dict[str, np.ndarray], first_row: int) -> None:
        """:class:`DataError` if a query's measurement counts no token (its ``output_mask``,
        e.g. a ``loss_mask`` that is all zero after the prompt): its gradient, and so every
        score, would be zero."""
        output_mask = getattr(self.task, "output_mask", None)
        if output_mask is None or not isinstance(self.output_shape, tuple):
            return
        rows = len(next(iter(arrays.values())))
        mask = np.asarray(output_mask(arrays, jax.numpy.zeros((rows, *self.output_shape[1:]), np.float32)))
        empty = np.flatnonzero(~mask.reshape(rows, -1).any(axis=1))
        if empty.size:
            listed = ", ".join(str(first_row + r) for r in empty[:10]) + (" ..." if empty.size > 10 else "")
            raise DataError(
                f"query row(s) {listed} measure nothing: their loss mask is all zero where the measurement is "
                "taken (for a causal LM, positions 1.. of loss_mask), so every score would be 0. Mark the "
                "completion's tokens with 1 in the mask, or drop these queries")

    def _shape(self, arrays: dict[str, np.ndarray]) -> tuple[int, ...] | None:
        outputs = getattr(self.task, "outputs", None)
        if self.model is None or outputs is None:
            return None
        graphdef, state = nnx.split(self.model)

        def forward(state, batch):
            return outputs(nnx.merge(graphdef, state), batch)

        try:
            return tuple(jax.eval_shape(forward, state, arrays).shape)
        except Exception:
            return self._FAILED

    def __call__(self, batch: Batch, index: int) -> None:
        if self.output_shape is self._UNKNOWN:
            self.output_shape = self._shape(batch.arrays)
            self._check_loss_shape(batch.arrays)
        if self.output_shape is self._FAILED:
            return
        arrays = {k: v[: batch.n_valid] for k, v in batch.arrays.items()}
        try:
            self.task.validate(arrays, self.output_shape, first_row=batch.start)
        except DataError:
            raise
        except ValueError as e:
            raise DataError(f"batch {index}: {e}") from e
        if self.queries:
            self._check_query_mask(arrays, batch.start)


def _describe(sig) -> str:
    return "{" + ", ".join(f"{k}: trailing shape {s}" for k, (s, _) in sorted(sig.items())) + "}"


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(chunks) == 1:
        return chunks[0]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _pad(arrays: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    out = {}
    for k, v in arrays.items():
        pad = np.zeros((size - v.shape[0],) + v.shape[1:], v.dtype)
        out[k] = np.concatenate([v, pad])
    return out


def _is_hf_dataset(data: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(data, datasets.Dataset)


def as_source(data: Any, batch_size: int, task: Any = None, model: Any = None, *,
              queries: bool = False) -> DataSource:
    """Wrap user data in a :class:`DataSource`, keeping the fields ``task`` reads; each
    batch is checked by ``task.validate`` (with the output shape of ``model``, if given),
    and the first by the task's contract: a hashable task, a loss (for ``queries``, a
    measurement) of shape ``[B]``; for ``queries``, every row measuring some token."""
    if task is not None:
        check_hashable(task)
    if isinstance(data, DataSource):
        return data
    fields = tuple(getattr(task, "fields", ()) or ())
    optional = tuple(getattr(task, "optional_fields", ()) or ())
    source = DataSource(data, batch_size, fields, optional)
    if getattr(task, "validate", None) is not None:
        source.check = BatchCheck(task, model, queries)
    return source



def num_rows(data: Any) -> int:
    """Rows of a dict of arrays or a sized data set (``datasets.Dataset``, list)."""
    if isinstance(data, Mapping):
        return len(next(iter(data.values())))
    return len(data)


def select_rows(data: Any, rows: np.ndarray) -> Any:
    """The rows ``rows`` (in that order) of a dict of arrays or a ``datasets.Dataset``."""
    if isinstance(data, Mapping):
        return {k: np.asarray(v)[rows] for k, v in data.items()}
    if hasattr(data, "select"):
        return data.select(np.asarray(rows).tolist())
    raise DataError("selecting rows (a prefilter, attribution) needs data that can be indexed: a dict of arrays or "
                    "a datasets.Dataset")


def first_row(data: Any, task: Any = None) -> tuple[dict[str, np.ndarray] | None, int | None]:
    """``(first example as a one-row batch of the fields task reads, number of examples)``
    of ``data``, without consuming it: ``(None, None)`` for a one-shot iterator (read
    once, it cannot be peeked at); the count is ``None`` where the data does not say."""
    if isinstance(data, DataSource):
        data = data._data
    fields = tuple(getattr(task, "fields", ()) or ())
    optional = tuple(getattr(task, "optional_fields", ()) or ())
    source = DataSource(data, 1, fields, optional)
    if source.single_pass:
        return None, None
    chunk = next(source._raw_chunks(), None)
    if chunk is None:
        raise DataError("the data set is empty")
    return {k: np.asarray(v[:1]) for k, v in chunk.items()}, source.num_examples
