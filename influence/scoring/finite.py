"""NaN/Inf checks of the scoring passes: a non-finite input never becomes a silent NaN
score, a NaN column of ``pairwise_scores`` or a row dropped from a ranking.

The model's weights are checked once before a pass (``factors.check_finite_weights``),
the query gradients once when they are all in (they are few), and the training side
with a flag kept on the device: each batch folds the first non-finite row of its
outputs into one device scalar (a dispatch, no host sync), which is read at every
snapshot and at the end of the pass. Finite results are untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from influence.errors import NonFiniteError
from influence.runtime.data import Batch
from influence.runtime.driver import Accumulator


@jax.jit
def _finite_rows(stacked: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """``{layer: [Q]}``: whether each row of ``{layer: [Q, ...]}`` is all finite (one
    compiled call for every layer, not an eager op each)."""
    return {name: jnp.all(jnp.isfinite(v.reshape(v.shape[0], -1)), axis=1) for name, v in stacked.items()}


def _first_bad_rows(stacked: dict[str, jax.Array]) -> tuple[str, int] | None:
    """The first layer and row ``q`` of ``{layer: [Q, ...]}`` that is not all finite."""
    for name, finite in jax.device_get(_finite_rows(stacked)).items():
        if not finite.all():
            return name, int(np.argmin(finite))
    return None


def check_query_gradients(gradients: dict[str, jax.Array], preconditioned: dict[str, jax.Array],
                          dampings: dict[str, float]) -> None:
    """``FloatingPointError`` naming the query row and layer whose measurement gradient
    ``[Q, d_a, d_out]`` or preconditioned gradient is NaN/Inf."""
    bad = _first_bad_rows(gradients)
    if bad is not None:
        name, q = bad
        raise NonFiniteError(
            f"the measurement gradient of query {q} is NaN/Inf in layer {name!r} (the model's weights are finite); "
            "check that query's inputs and labels")
    bad = _first_bad_rows(preconditioned)
    if bad is not None:
        name, q = bad
        raise NonFiniteError(
            f"the preconditioned gradient of query {q} is NaN/Inf in layer {name!r} although its gradient is finite: "
            f"Λ + λ is 0 or too small there (damping {dampings[name]:.3g}); pass a larger damping=")


@jax.jit
def _fold_first_bad(found, out, n_valid, start):
    """``found`` (the first non-finite row so far, -1 if none) updated with ``out [..., B]``
    of the rows ``start..start+B-1`` (the first ``n_valid`` real)."""
    finite = jnp.all(jnp.isfinite(out.reshape(-1, out.shape[-1])), axis=0)
    finite = finite | (jnp.arange(out.shape[-1]) >= n_valid)
    first = start + jnp.argmin(finite).astype(jnp.int32)
    return jnp.where((found < 0) & ~jnp.all(finite), first, found)


class RowCheck:
    """The first training row whose scores are NaN/Inf, tracked on the device.

    ``batch_size``: rows per batch (to name the batch); ``to_row``: maps a row of the
    pass to the training row it is (e.g. through a candidate prefilter's row map);
    ``what``: what the outputs are, for the message; ``advice``: what to do instead of
    checking the row's inputs (e.g. rebuild an index whose stored rows are not finite)."""

    def __init__(self, batch_size: int, to_row: Callable[[int], int] | None = None, what: str = "score",
                 advice: str | None = None):
        self.batch_size = batch_size
        self.to_row = to_row
        self.what = what
        self.advice = advice
        self.found = None

    def update(self, out: jax.Array, batch: Batch) -> None:
        """Fold in one batch's outputs ``[..., B]`` (device work only)."""
        found = jnp.int32(-1) if self.found is None else self.found
        self.found = _fold_first_bad(found, out, np.int32(batch.n_valid), np.int32(batch.start))

    def check(self) -> None:
        """``FloatingPointError`` naming the first row with a non-finite output (one sync)."""
        if self.found is None:
            return
        row = int(self.found)
        if row < 0:
            return
        batch = row // self.batch_size
        name = row if self.to_row is None else self.to_row(row)
        if self.advice is not None:
            raise NonFiniteError(f"the {self.what} of training row {name} is NaN/Inf: {self.advice}")
        raise NonFiniteError(
            f"the {self.what} of training row {name} (batch {batch}, rows {batch * self.batch_size}.."
            f"{(batch + 1) * self.batch_size - 1} of the pass) is NaN/Inf: its loss or training gradient is not "
            "finite (the model's weights and the queries are); check that row's inputs and labels")

    def guard(self, accumulator: Accumulator, *, checkpointed: bool) -> Accumulator:
        """``accumulator`` checked before every snapshot (so none holds a NaN) and before
        it finalises. Without a checkpoint, a failed check runs its ``abort``."""
        inner_save, inner_finalize = accumulator.save, accumulator.finalize

        def save(state, checkpoint):
            self.check()
            return inner_save(state, checkpoint)

        def finalize(state):
            try:
                self.check()
            except FloatingPointError:
                if not checkpointed and accumulator.abort is not None:
                    accumulator.abort(state)
                raise
            return inner_finalize(state)

        return accumulator._replace(save=None if inner_save is None else save, finalize=finalize)
