"""Random streams (``nnx.Rngs``) drawn in a model's forward pass, held fixed.

A model may draw random numbers when it runs: a stored ``nnx.Rngs`` called in
``__call__`` (noise, stochastic depth), or Dropout the user's code leaves on with
``deterministic=False``. Each draw advances an ``nnx.RngCount`` variable, an in-place
update that flax refuses across trace levels (``TraceContextError``) when a Variable made
in one trace (e.g. the jitted step's) is updated in another (``jax.eval_shape``,
``jax.vjp``). Influence is of one fixed function, so the library holds the streams fixed:

* the stream state (keys and counts) is part of the model state that is an *input* of
  every pure function, and is never returned: every forward pass starts from the stored
  counts and draws the same numbers;
* :func:`fresh` re-creates the state's Variables in the current trace before a merge, so
  the in-trace count updates are legal (and then discarded).

Limitation: a draw shaped like the batch (Dropout's mask ``[B, ...]``) is fixed per batch
*position*, not per example: example n gets the mask of its row within its batch, so its
scores depend on ``batch_size``. A draw that does not span the batch (noise of shape
``[d]``, a per-layer skip) is the same for every example and batch size. Turn Dropout off
(the library's clone is in eval mode; only an explicit ``deterministic=False`` in the
model's code keeps it on) for scores that do not depend on the batching.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from influence.errors import RandomStreamsWarning

__all__ = ["drawn_streams", "fresh", "stream_names", "warn_streams"]


def fresh(state: Any) -> Any:
    """``state`` with every Variable re-created in the current trace (same values).

    A Variable records the trace it was made in and may only be updated there; merging
    ``fresh(state)`` inside a transformation gives a model whose ``nnx.Rngs`` can draw
    (their counts advance inside the function and are discarded with it)."""
    return jax.tree.map(lambda x: x, state)


def stream_names(state: Any) -> list[str]:
    """Dotted paths of the ``nnx.Rngs`` streams in ``state`` (e.g. ``"rngs.noise"``), sorted."""
    return sorted(".".join(str(p) for p in path[:-1]) for path, leaf in nnx.to_flat_state(state)
                  if isinstance(leaf, nnx.RngCount))


def drawn_streams(graphdef: Any, state: Any, forward: Callable[[nnx.Module], Any]) -> list[str]:
    """The streams that ``forward(model)`` draws from (traced once, nothing computed): those
    whose count the forward pass advances. ``[]`` when it draws none or fails to trace
    (the pass then reports the failure in context)."""
    drawn: list[str] = []

    def run(state):
        model = nnx.merge(graphdef, fresh(state))
        counts = nnx.to_flat_state(nnx.state(model, nnx.RngCount))
        before = {path: leaf.get_value() for path, leaf in counts}
        forward(model)
        drawn.extend(".".join(str(p) for p in path[:-1]) for path, leaf in counts
                     if leaf.get_value() is not before[path])

    try:
        jax.eval_shape(run, state)
    except Exception:  # the forward fails: the pass runs it and reports the failure with the batch's shapes
        return []
    # a ToNNX wrapper draws a key from its own streams at every call to hand to Linen's
    # apply, whether Linen uses it or not: not a draw of the model's (Linen's Dropout left
    # on would use it; its rng is then held fixed all the same)
    return sorted({name for name in drawn if "to_nnx__rngs" not in name})


def warn_streams(streams: list[str], stacklevel: int = 2) -> None:
    """Warn (:class:`~influence.errors.RandomStreamsWarning`) that the forward pass draws from
    ``streams`` and that they are held fixed; nothing when there are none."""
    if not streams:
        return
    warnings.warn(
        f"the model's forward pass draws random numbers from nnx.Rngs stream(s) {', '.join(streams)}; they are held "
        "fixed (every forward pass starts from the stored stream state), so the fit and the scores are "
        "deterministic, of the model with these draws. A draw shaped like the batch (Dropout with "
        "deterministic=False) is fixed per batch position, so scores then depend on batch_size: turn it off for "
        "influence. Listed in Factors.metadata['rng_streams']; silence with "
        "warnings.simplefilter('ignore', influence.RandomStreamsWarning).",
        RandomStreamsWarning, stacklevel=stacklevel + 1)
