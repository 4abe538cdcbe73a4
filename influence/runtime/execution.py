"""How a streamed pass runs: one validated settings object for every entry point.

``fit_factors``, ``pairwise_scores``, ``self_scores``, ``rank_training``, ``attribute`` and
the query engine (and the CLI through them) take the same six run settings. They live here, once,
with their documentation; each entry point accepts ``execution=Execution(...)`` or the
same names as keyword arguments (which build one)::

    run = inf.Execution(batch_size=128, checkpoint_dir="runs/x/ckpt")
    factors = inf.fit_factors(model, task, train, execution=run)
    scores = inf.pairwise_scores(model, task, factors, queries, train, batch_size=128)

None of them changes a result beyond float rounding: they decide speed, memory,
placement and what survives an interruption.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from influence.runtime.checkpoint import Checkpoint
from influence.runtime.mesh import MeshLike


@dataclasses.dataclass(frozen=True)
class Execution:
    """Run settings of a streamed pass (validated on construction).

    Attributes:
      batch_size: examples per jitted step, over all devices and processes; the last
        batch is zero-padded (padding rows weigh 0). A multiple of the mesh's data axis.
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

    batch_size: int = 32
    mesh: MeshLike = None
    progress: bool = True
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int = 100
    resume: bool = True

    def __post_init__(self):
        for name in ("batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("progress", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str | os.PathLike):
            raise TypeError(f"checkpoint_dir must be a path or None, got {type(self.checkpoint_dir).__name__}")

    @classmethod
    def of(cls, execution: Execution | None = None, options: Mapping[str, Any] | None = None) -> Execution:
        """``execution`` (default: the defaults) with ``options`` (keyword arguments of an
        entry point, named as the fields) applied on top."""
        base = cls() if execution is None else execution
        if not isinstance(base, Execution):
            raise TypeError(f"execution must be an influence.Execution, got {type(base).__name__}")
        options = dict(options or {})
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            fields = ", ".join(f.name for f in dataclasses.fields(cls))
            raise TypeError(f"unknown option(s) {unknown}; the run settings are: {fields}")
        return dataclasses.replace(base, **options) if options else base

    def checkpoint(self, kind: str, settings: dict[str, Any]) -> Checkpoint | None:
        """The pass's :class:`Checkpoint` (``None`` without ``checkpoint_dir``)."""
        if self.checkpoint_dir is None:
            return None
        return Checkpoint(self.checkpoint_dir, kind, settings, every=self.checkpoint_every, resume=self.resume)
