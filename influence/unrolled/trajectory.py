"""Trajectory scores: influence measured at K checkpoints of a training run, combined.

The final-weights estimate (EK-FAC at θ_T) misleads when the run has not converged, was
stopped early or fine-tunes: what an example did to the query happened along the way.
:func:`trajectory_scores` scores at checkpoints ``t_1 < … < t_K`` of the run (chosen, or
``K`` evenly spaced ending at ``T``) and sums them with **learning-rate-share weights**

    score(q, n) = Σ_k c_k · score_k(q, n),   c_k = Σ_{t_{k-1} < t ≤ t_k} η_t / Σ_{t ≤ t_K} η_t,

(``t_0 = 0``, ``η_t`` the step's learning rate; uniform when the run has no schedule), so a
checkpoint counts by how much of the run's movement its segment holds. This is a
documented alternative to SOURCE's segment formula (Bae et al. 2024), which replaces each
segment's inverse curvature by an average of ``(I − exp(−η_k T_k G_k)) G_k⁻¹`` and its
gradients by segment averages: not implemented here. With ``K = 1`` at ``T`` it is the
final-weights score.

The score at one checkpoint is one of:

* any fitted strategy (``"ekfac"``, ``"kfac"``, ``"identity"``, …): :func:`influence.fit_factors`
  and :func:`influence.pairwise_scores` on the checkpoint's model (tracked layers);
* ``"adam"``: the optimizer's own preconditioner,
  ``∇m_qᵀ diag(1 / (√ν_t + λ)) ∇L_n`` over every parameter, with ν_t the second-moment
  estimate stored in the optimizer state at the checkpoint (as stored: no bias
  correction) and λ = ``damping`` (default 1e-8, Adam's ε). The checkpoint's Adam step
  direction, as in TracIn with Adam / TrackStar's optimizer-state correction.

``normalize=True`` (TrackStar, Chang et al. 2024) divides each score by the norms of both
sides in the same metric, ``s(q,n) / √(s(q,q) s(n,n))``: a cosine, so examples with large
gradients (outliers, long sequences) do not dominate every query's list. For a fitted
strategy the norms are self-influences (:func:`influence.self_scores`) of the training
examples and of the queries' measurements, at the same damping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influence.errors import InfluenceError, NonFiniteError
from influence.fit import fit_factors
from influence.scoring.pairwise import pairwise_scores
from influence.scoring.results import Scores
from influence.scoring.self_influence import self_scores
from influence.tasks import Task
from influence.unrolled.metagradient import TrainingRun, states_at


def even_checkpoints(total_steps: int, k: int) -> list[int]:
    """``k`` evenly spaced steps in ``1..total_steps``, the last one ``total_steps``."""
    if k < 1:
        raise InfluenceError(f"need at least one checkpoint, got {k}")
    return sorted({max(1, round(total_steps * (i + 1) / k)) for i in range(k)})


def lr_share_weights(checkpoints: Sequence[int], learning_rates: np.ndarray | None) -> np.ndarray:
    """``c_k [K]``: the share of ``Σ η_t`` (steps ``1..t_K``) in each checkpoint's segment
    ``(t_{k-1}, t_k]``; ``learning_rates [T]`` (step t's rate at index t−1), or ``None``
    for uniform rates."""
    ends = np.asarray(sorted(checkpoints))
    lr = np.ones(ends[-1]) if learning_rates is None else np.asarray(learning_rates, np.float64)[: ends[-1]]
    cum = np.concatenate([[0.0], np.cumsum(lr)])
    seg = cum[ends] - cum[np.concatenate([[0], ends[:-1]])]
    if cum[ends[-1]] <= 0:
        raise InfluenceError("the learning rates up to the last checkpoint sum to zero")
    return seg / cum[ends[-1]]


class _MeasurementAsLoss(Task):
    """A task whose loss is another task's measurement (query self-influence)."""

    def __init__(self, task: Any):
        self.task, self.fields, self.optional_fields = task, task.fields, task.optional_fields

    def loss(self, model, batch, sample_key=None):
        return self.task.measurement(model, batch)


def _fitted_scores(model, task, queries, train, strategy, damping, normalize, key, batch_size, fit_data):
    factors = fit_factors(model, task, train if fit_data is None else fit_data, strategy=strategy, key=key,
                          batch_size=batch_size)
    values = np.asarray(pairwise_scores(model, task, factors, queries, train, damping=damping,
                                        batch_size=batch_size).values, np.float64)
    if normalize:
        train_self = np.asarray(self_scores(model, task, factors, train, damping=damping,
                                            batch_size=batch_size).values, np.float64)
        query_self = np.asarray(self_scores(model, _MeasurementAsLoss(task), factors, queries, damping=damping,
                                            batch_size=batch_size).values, np.float64)
        values = values / np.sqrt(np.maximum(np.outer(query_self, train_self), 1e-300))
    return values


def per_example_gradients(run: TrainingRun, params, task: Any, data: dict, measurement: bool,
                          chunk: int = 64) -> np.ndarray:
    """Gradients of each example's loss (or measurement) in every parameter of the run,
    float ``[N, P]`` (``jax.flatten_util.ravel_pytree`` order), ``chunk`` examples at a time."""
    _, unravel = ravel_pytree(params)

    def one(p, example):
        batch = jax.tree.map(lambda x: x[None], example)
        fn = task.measurement if measurement else task.loss
        return ravel_pytree(jax.grad(lambda p: fn(run.model(p), batch)[0])(p))[0]

    grads = jax.jit(jax.vmap(one, in_axes=(None, 0)))
    data = {k: jnp.asarray(v) for k, v in data.items()}
    n = len(next(iter(data.values())))
    return np.concatenate([np.asarray(grads(params, {k: v[lo:lo + chunk] for k, v in data.items()}))
                           for lo in range(0, n, chunk)])


def adam_nu(state) -> Any:
    """The second-moment estimate ν of the (first) Adam-like transformation in an optax
    state, as a parameter pytree (``InfluenceError`` if the state has none)."""
    for leaf in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "nu") and hasattr(x, "mu")):
        if hasattr(leaf, "nu"):
            return leaf.nu
    raise InfluenceError("the optimizer state holds no Adam second moment ν (no state with .nu): "
                         "strategy='adam' needs an Adam-like optimizer (optax.adam, adamw, ...)")


def _adam_scores(run, params, state, task, queries, train, damping, normalize):
    nu = ravel_pytree(adam_nu(state))[0]
    scale = np.asarray(1.0 / (jnp.sqrt(nu) + damping), np.float64)
    gq = per_example_gradients(run, params, task, queries, measurement=True).astype(np.float64)
    gn = per_example_gradients(run, params, task, train, measurement=False).astype(np.float64)
    values = (gq * scale) @ gn.T
    if normalize:
        qn = np.sqrt(np.einsum("qp,p,qp->q", gq, scale, gq))
        nn = np.sqrt(np.einsum("np,p,np->n", gn, scale, gn))
        values = values / np.maximum(np.outer(qn, nn), 1e-300)
    return values


def trajectory_scores(run: TrainingRun, task: Any, queries: dict, train: dict | None = None, *,
                      checkpoints: Sequence[int] | None = None, n_checkpoints: int = 4, strategy: str = "ekfac",
                      normalize: bool = False, damping: float | None = None, learning_rates: np.ndarray | None = None,
                      seed: int = 0, w=None, key: jax.Array | None = None, batch_size: int = 64,
                      fit_data: Any = None) -> Scores:
    """Scores ``[Q, N]`` combined over checkpoints of ``run`` (module docstring).

    Args:
      task: the training loss and the query measurement (a :class:`influence.Task`).
      queries: query examples (dict of arrays ``[Q, ...]``).
      train: training examples to score (default the run's data, all ``N``).
      checkpoints: steps in ``1..T`` (``T`` = the run's length); default ``n_checkpoints``
        evenly spaced ones ending at ``T``.
      strategy: a fitted strategy (``"ekfac"``, …) or ``"adam"``.
      normalize: unit-normalised (cosine) scores, TrackStar-style.
      damping: as :func:`influence.pairwise_scores` for fitted strategies (default theirs);
        λ in ``1/(√ν + λ)`` for ``"adam"`` (default 1e-8).
      learning_rates: ``[T]`` each step's rate (default ``run.schedule`` when the run has
        one — :func:`influence.unrolled.lm_run` has — else uniform).
      key: the sampled Fisher's key for fitted strategies (default ``PRNGKey(0)``).
      fit_data: what to fit the curvature on (default ``train``).

    Returns:
      :class:`influence.Scores` (score > 0: upweighting the example lowers the query's
      measurement); metadata has the checkpoints and their weights.
    """
    train = run.data if train is None else train
    total = run.steps(seed).shape[0]
    checkpoints = even_checkpoints(total, n_checkpoints) if checkpoints is None else sorted(set(checkpoints))
    if not checkpoints or checkpoints[0] < 1 or checkpoints[-1] > total:
        raise InfluenceError(f"checkpoints must be steps in 1..{total}, got {list(checkpoints)}")
    if learning_rates is None and getattr(run, "schedule", None) is not None:
        learning_rates = np.asarray([float(run.schedule(t)) for t in range(total)])
    weights = lr_share_weights(checkpoints, learning_rates)
    key = jax.random.PRNGKey(0) if key is None else key
    states = states_at(run, checkpoints, w=w, seed=seed)
    total_scores = 0.0
    for c, (params, state) in zip(weights, states):
        if c == 0:
            continue
        if strategy == "adam":
            lam = 1e-8 if damping is None else damping
            values = _adam_scores(run, params, state, task, queries, train, lam, normalize)
        else:
            values = _fitted_scores(run.model(params), task, queries, train, strategy, damping, normalize, key,
                                    batch_size, fit_data)
        total_scores = total_scores + c * values
    if not np.all(np.isfinite(total_scores)):
        raise NonFiniteError("trajectory scores have NaN/Inf: check the run (train(run)) and the damping")
    return Scores(np.asarray(total_scores, np.float32), None, {
        "strategy": f"trajectory-{strategy}", "checkpoints": [int(t) for t in checkpoints],
        "checkpoint_weights": [round(float(c), 6) for c in weights], "normalize": bool(normalize),
        "weighting": "learning-rate share" if learning_rates is not None else "uniform (steps)",
        "n_train": int(len(next(iter(train.values())))), "damping": damping})


__all__ = ["adam_nu", "even_checkpoints", "lr_share_weights", "per_example_gradients", "trajectory_scores"]
