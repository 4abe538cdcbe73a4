"""How a streamed pass runs: one validated settings object for every entry point.

``fit_factors``, ``pairwise_scores``, ``self_scores``, ``rank_training``, ``attribute`` and
the query engine (and the CLI through them) take the same seven run settings. They live here, once,
with their documentation; each entry point accepts ``execution=Execution(...)`` or the
same names as keyword arguments (which build one)::

    run = inf.Execution(batch_size=128, checkpoint_dir="runs/x/ckpt")
    factors = inf.fit_factors(model, task, train, execution=run)
    scores = inf.pairwise_scores(model, task, factors, queries, train, batch_size=128)

None of them changes a result beyond float rounding: they decide speed, memory,
placement and what survives an interruption.

By default (``batch_size=None``) each pass derives its batch size from
``memory_budget`` and what one example costs it (the tracked layers' inputs and output
gradients at the data's token count, see :func:`auto_batch_size`); the size chosen is in
the result's metadata (``"batch_size"``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax

from influence.errors import ConfigError, ConfigTypeError
from influence.runtime.checkpoint import Checkpoint
from influence.runtime.data import first_row
from influence.runtime.mesh import MeshLike


@dataclasses.dataclass(frozen=True)
class Execution:
    """Run settings of a streamed pass (validated on construction).

    Attributes:
      batch_size: examples per jitted step, over all devices and processes; the last
        batch is zero-padded (padding rows weigh 0). A multiple of the mesh's data axis.
        ``None`` (the default): chosen by each pass from ``memory_budget``
        (:func:`auto_batch_size`) and recorded in the result's metadata.
      memory_budget: what a step may hold when the batch size is chosen: bytes (an int),
        or a fraction in (0, 1] of the first device's memory (a float; where the device
        reports none, of :data:`CPU_MEMORY_BUDGET`). ``None``: :data:`CPU_MEMORY_BUDGET`
        on a CPU, :data:`DEVICE_MEMORY_FRACTION` of an accelerator's memory.
      mesh: devices, data-parallel: ``None`` (one device), an int (the first n local
        devices), a list of devices, or a ``jax.sharding.Mesh`` with axis ``"data"``
        (scoring also accepts ``("data", "query")``, which splits the queries). Fitting
        may span hosts; scoring uses one process's devices (see :mod:`influence.scoring.hosts`).
      progress: show progress bars.
      checkpoint_dir: save the pass's running state there every ``checkpoint_every``
        batches and on interruption, and resume from it when the same call is made
        again; another model, data or settings is refused with
        :class:`~influence.errors.CheckpointMismatch`.
      checkpoint_every: batches between snapshots (positive).
      resume: ``False`` discards a snapshot in ``checkpoint_dir`` and starts afresh.
    """

    batch_size: int | None = None
    mesh: MeshLike = None
    progress: bool = True
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int = 100
    resume: bool = True
    memory_budget: int | float | None = None

    def __post_init__(self):
        for name in ("batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if name == "batch_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer{' or None' if name == 'batch_size' else ''}, "
                                 f"got {value!r}")
        budget = self.memory_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0
                                   or (isinstance(budget, float) and budget > 1)):
            raise ConfigError(f"memory_budget must be a number of bytes (a positive int), a fraction in (0, 1] of the "
                             f"device's memory (a float) or None, got {budget!r}")
        for name in ("progress", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigTypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str | os.PathLike):
            raise ConfigTypeError(f"checkpoint_dir must be a path or None, got {type(self.checkpoint_dir).__name__}")

    @classmethod
    def of(cls, execution: Execution | None = None, options: Mapping[str, Any] | None = None) -> Execution:
        """``execution`` (default: the defaults) with ``options`` (keyword arguments of an
        entry point, named as the fields) applied on top."""
        base = cls() if execution is None else execution
        if not isinstance(base, Execution):
            raise ConfigTypeError(f"execution must be an influence.Execution, got {type(base).__name__}")
        options = dict(options or {})
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            fields = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ConfigTypeError(f"unknown option(s) {unknown}; the run settings are: {fields}")
        return dataclasses.replace(base, **options) if options else base

    def checkpoint(self, kind: str, settings: dict[str, Any]) -> Checkpoint | None:
        """The pass's :class:`Checkpoint` (``None`` without ``checkpoint_dir``)."""
        if self.checkpoint_dir is None:
            return None
        return Checkpoint(self.checkpoint_dir, kind, settings, every=self.checkpoint_every, resume=self.resume)

    def budget_bytes(self) -> int:
        """``memory_budget`` in bytes (see the attribute)."""
        if isinstance(self.memory_budget, int):
            return self.memory_budget
        device = jax.local_devices()[0]
        total = None
        if device.platform != "cpu":
            stats = device.memory_stats() or {}
            total = stats.get("bytes_limit")
        if total is None:
            return int(CPU_MEMORY_BUDGET * (self.memory_budget or 1.0))
        return int(total * (self.memory_budget or DEVICE_MEMORY_FRACTION))

    def sized(self, data: Any, task: Any, per_example_bytes: Callable[[dict], int], *, multiple: int = 1,
              even_out: bool = True, max_rows: Callable[[dict], int] | None = None) -> Execution:
        """This execution with ``batch_size`` set for a pass over ``data``: as given, or
        chosen by :func:`auto_batch_size` from :meth:`budget_bytes` and
        ``per_example_bytes(row)`` of the data's first example (a one-row batch).
        A one-shot iterator cannot be peeked at: it gets :data:`FALLBACK_BATCH` (a
        multiple of ``multiple``). ``even_out=False`` ignores the data's length (several
        processes must choose the same size for shards of different lengths). ``max_rows(row)``:
        a further cap from the pass (e.g. the rows its contraction takes at once)."""
        if self.batch_size is not None:
            return self
        row, n_examples = first_row(data, task)
        if row is None:
            size = max(multiple, FALLBACK_BATCH // multiple * multiple)
        else:
            most = MAX_AUTO_BATCH if max_rows is None else min(MAX_AUTO_BATCH, max_rows(row))
            size = auto_batch_size(self.budget_bytes(), per_example_bytes(row), n_examples if even_out else None,
                                   multiple, most=most)
        return dataclasses.replace(self, batch_size=size)


CPU_MEMORY_BUDGET = 512 * 2**20
"""Default ``memory_budget`` on a CPU (and where a device reports no memory): 512 MiB."""

DEVICE_MEMORY_FRACTION = 0.25
"""Default ``memory_budget`` on an accelerator: this fraction of its memory."""

FALLBACK_BATCH = 32
"""The batch size chosen for data that cannot be looked at before the pass (a one-shot
iterator)."""

MAX_AUTO_BATCH = 1024
"""Most examples per step :func:`auto_batch_size` chooses (beyond it a step gains
nothing from its size and a progress bar or checkpoint moves too rarely)."""


def auto_batch_size(budget_bytes: int, per_example_bytes: int, n_examples: int | None, multiple: int = 1, *,
                    most: int = MAX_AUTO_BATCH) -> int:
    """The batch size of a pass: as many examples as ``budget_bytes`` holds at
    ``per_example_bytes`` each (at most ``most``, at least one per device),
    then evened out over the batches the data set needs (so the last one is not mostly
    padding), a multiple of ``multiple`` (the mesh's data axis).

    ``per_example_bytes`` is the caller's estimate of what one example costs a step
    (:func:`influence.capture.objectives.bytes_per_example`)."""
    most = max(1, min(most, budget_bytes // max(int(per_example_bytes), 1)))
    most = max(multiple, most // multiple * multiple)
    if n_examples:
        batches = math.ceil(n_examples / most)
        most = min(most, math.ceil(math.ceil(n_examples / batches) / multiple) * multiple)
    return int(most)
