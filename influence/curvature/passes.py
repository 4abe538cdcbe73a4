"""A curvature pass: one streamed statistic of the training set, and what it gives.

Each strategy (:mod:`influence.curvature.strategies`) is the list of passes it needs;
:func:`influence.fit_factors` runs them in order through the one pass driver. A pass is
a :class:`CurvaturePass`: its jitted step adds one batch's sums to per-device slots of
an accumulator, and ``finish`` turns the totals into the layers' curvature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from influence.capture.objectives import has_directions
from influence.runtime.mesh import DATA, spec

# Static (hashable) arguments of every pass step.
CURVATURE_STATICS = ("graphdef", "layers", "task", "fisher", "mesh", "blocks")


class CurvaturePass(NamedTuple):
    """One statistic of the training set.

    Attributes:
      name: shown on the progress bar (``"<strategy>: <name>"``).
      index: fixed order of the pass within a fit; orders snapshots and seeds the pass's
        sampled targets (``fold_in(key, index)``), so it never changes.
      step: jitted ``(sums, *step_args, state, batch, example_mask, key, rows,
        **statics) -> (sums, token counts per layer or None, objective value)``, adding one
        batch to each device's slot of ``sums``; ``rows`` seeds the sampled targets
        (:func:`~influence.capture.objectives.example_keys`: each example's global row
        ``[B]``, or the batch index for a loss that takes one key).
      zeros: ``(layers, blocks, mesh) -> sums``, the empty per-device accumulator.
      step_args: ``(curvature, mesh) -> tuple``: what the step needs of the passes before
        it (e.g. the eigenbases), placed on the mesh.
      finish: ``(curvature, totals, n_tokens, n_examples, blocks, dtype) -> curvature``, from
        the summed slots (on the devices) of every layer.
    """

    name: str
    index: int
    step: Callable[..., Any]
    zeros: Callable[..., Any]
    step_args: Callable[..., tuple]
    finish: Callable[..., dict]


def g_spec(fisher: str):
    """Partitioning of ``g``: with several Fisher directions (exact, or several sampled
    draws) it is ``[K, B, T, d_out]``, so the batch axis is second."""
    return spec(None, DATA) if has_directions(fisher) else spec(DATA)
