"""Token-wise and layer-wise attribution of chosen (query, training row) scores.

A training sequence's score against query q is Σ_layers Σ_t ā_tᵀ P_q g_t; its terms per
layer and token position are the attribution, and they sum to the score. Only the rows
asked for are recomputed (e.g. the top-k of a ranking), reusing its preconditioned
queries.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from influence.capture.objectives import layer_gradients
from influence.capture.tracking import track
from influence.errors import NonFiniteError
from influence.factors import Factors, check_finite_weights
from influence.runtime.data import as_source, select_rows
from influence.runtime.driver import concatenate, run_pass
from influence.runtime.execution import Execution
from influence.scoring.contractions import token_scores
from influence.scoring.preconditioned import scoring_batch, scoring_mesh
from influence.scoring.ranking import Ranking


@functools.partial(jax.jit, static_argnames=("graphdef", "layers", "task"))
def _attribution_step(queries, state, batch, example_mask, *, graphdef, layers, task):
    _, a, g = layer_gradients(graphdef, state, layers, task, "empirical", batch, example_mask)
    return jnp.stack([token_scores(a[i.name], g[i.name], queries[i.name]) for i in layers], axis=1)  # [B, L, T]


class Attribution(NamedTuple):
    """Per (query, training row) pair: ``per_layer_token [P, L, T]`` terms of the score.

    ``token = per_layer_token.sum(1)`` ``[P, T]`` (token-wise), ``layer =
    per_layer_token.sum(2)`` ``[P, L]`` (layer-wise); both sum to the pair's score.
    Token t's term is ā_tᵀ P_q g_t at position t of the training sequence, i.e. mostly the
    influence of predicting token t+1 there.
    """

    per_layer_token: np.ndarray
    layer_names: tuple[str, ...]

    @property
    def token(self) -> np.ndarray:
        return self.per_layer_token.sum(axis=1)

    @property
    def layer(self) -> np.ndarray:
        return self.per_layer_token.sum(axis=2)

    @property
    def total(self) -> np.ndarray:
        return self.per_layer_token.sum(axis=(1, 2))


def attribute(model, task, factors: Factors, ranking: Ranking, train: Any, pairs: np.ndarray, *,
              execution: Execution | None = None, **options: Any) -> Attribution:
    """Token-wise and layer-wise split of the scores of ``pairs`` ``[P, 2]`` of (query index,
    training row), using the query gradients kept in ``ranking``. Only those rows are read
    and recomputed (one pass over them; ``execution``: :class:`influence.Execution`)."""
    run = Execution.of(execution, options)
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    mesh = scoring_mesh(run.mesh, run.batch_size)
    factors.check_compatible(model)
    tracked = track(model, list(factors.layer_names))
    check_finite_weights(tracked.state)
    rows = select_rows(train, pairs[:, 1])
    run = scoring_batch(run, tracked, task, rows, mesh, per_example_gradients=True)  # one query [d_a, d_out] per row
    source = as_source(rows, run.batch_size, task, model)

    def terms(step):
        q = pairs[step.batch.start : step.batch.start + step.batch.n_valid, 0]
        q = np.concatenate([q, np.zeros(source.batch_size - len(q), np.int64)])
        per_query = {name: lq.take(jnp.asarray(q)) for name, lq in ranking.queries.items()}
        out = _attribution_step(per_query, tracked.state, step.arrays, step.example_mask,
                                graphdef=tracked.graphdef, layers=tracked.layers, task=task)
        return jnp.moveaxis(out, 0, -1)  # [L, T, B]: rows last, as the accumulator concatenates

    collected = np.moveaxis(run_pass(concatenate(terms), source, mesh, desc="attribution",
                                     progress=run.progress).value, -1, 0)  # [P, L, T]
    finite = np.isfinite(collected).reshape(len(collected), -1).all(axis=1)
    if not finite.all():
        query, row = pairs[int(np.argmin(finite))]
        raise NonFiniteError(f"the attribution of training row {row} to query {query} is NaN/Inf: its loss or "
                                 "training gradient is not finite; check that row's inputs and labels")
    return Attribution(collected, tracked.layer_names)
