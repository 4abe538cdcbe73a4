"""Training many small models at once, for retraining-based validation (LDS, PBRF checks).

Models are flax NNX modules taken apart into ``(graphdef, params, rest)``; ``K`` of them
share one graphdef and are trained side by side by a ``jax.vmap``-ed optimizer step, which
on a CPU is several times faster than training them one after the other when each step is
small. Each model may see its own batch (its own subset of the training set, its own batch
order) and start from its own initial weights (its seed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def stack_models(make_model: Callable[[int], nnx.Module], seeds: Sequence[int]):
    """``(graphdef, params, rest)`` of ``make_model(seed)`` for each seed, params stacked
    on a leading axis ``[K, ...]``; ``rest`` (non-parameter state) comes from the first."""
    parts = [nnx.split(make_model(int(s)), nnx.Param, ...) for s in seeds]
    graphdef, _, rest = parts[0]
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[p for _, p, _ in parts])
    return graphdef, params, rest


def unstack(params, k: int):
    """Model ``k``'s parameters out of a stacked tree."""
    return jax.tree.map(lambda x: x[k], params)


def fit_many(
    graphdef: nnx.GraphDef,
    params: Any,
    rest: Any,
    tx: optax.GradientTransformation,
    loss_fn: Callable[[nnx.Module, Any, Any], jax.Array],
    shared: Any,
    per_model: Callable[[int], Any],
    steps: int,
    weight_decay: float = 0.0,
) -> Any:
    """Train ``K`` models (params stacked ``[K, ...]``) for ``steps`` optimizer steps.

    Args:
      loss_fn: ``(model, shared, mine) -> scalar`` objective of one model, where ``shared``
        is the same for every model (e.g. the whole training set) and ``mine`` is that
        model's slice of ``per_model(step)`` (e.g. its example weights or batch).
      per_model: ``step -> pytree`` with a leading ``[K]`` axis (constant or per step).
      weight_decay: adds ``weight_decay · ‖θ‖²`` (sum of squares of every parameter) to
        the objective, as :func:`influence.testing.train` does.

    Returns:
      the trained parameters, stacked ``[K, ...]``.
    """

    def objective(p, shared, mine):
        reg = sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
        return loss_fn(nnx.merge(graphdef, p, rest), shared, mine) + weight_decay * reg

    def one_step(p, opt_state, shared, mine):
        grads = jax.grad(objective)(p, shared, mine)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    step_fn = jax.jit(jax.vmap(one_step, in_axes=(0, 0, None, 0)), donate_argnums=(0, 1))
    opt_state = jax.vmap(tx.init)(params)
    for step in range(steps):
        params, opt_state = step_fn(params, opt_state, shared, per_model(step))
    return params


def evaluate_many(graphdef: nnx.GraphDef, params: Any, rest: Any, fn: Callable[[nnx.Module, Any], jax.Array],
                  data: Any) -> np.ndarray:
    """``fn(model, data)`` for each of the stacked models, ``[K, ...]`` numpy."""
    run = jax.jit(jax.vmap(lambda p, d: fn(nnx.merge(graphdef, p, rest), d), in_axes=(0, None)))
    return np.asarray(run(params, data))


def model_from(graphdef: nnx.GraphDef, params: Any, rest: Any, k: int = 0) -> nnx.Module:
    """Model ``k`` of a stacked set, as an ordinary NNX module."""
    return nnx.merge(graphdef, unstack(params, k), rest)


def weighted_mean_loss(task: Any) -> Callable[[nnx.Module, dict, jax.Array], jax.Array]:
    """Objective ``Σ_n w_n L_n / Σ_n w_n`` of a task's per-example losses ``L_n`` over the
    whole training set ``shared`` with one model's example weights ``w [N]`` (0/1 for a
    subset, all ones for the full set)."""

    def loss(model, data, weights):
        return jnp.sum(task.loss(model, data) * weights) / jnp.sum(weights)

    return loss
