"""The proximal Bregman response function (PBRF; Bae et al. 2022), optimised exactly.

Influence functions on a network that is not at a unique optimum approximate the response
of the *proximal Bregman objective* around the final weights θ_s, for upweighting one
training example m by ε:

    θ_ε = argmin_θ (1/N) Σ_n D_ℓ(f(θ, x_n), f(θ_s, x_n)) + ε L_m(θ) + (λ/2) ‖θ − θ_s‖²,

with D_ℓ the Bregman divergence of the loss in the model outputs (for softmax
cross-entropy, KL(p_s ‖ p); for the squared error, ½‖f − f_s‖²). Its Hessian at θ_s is the
Gauss-Newton matrix G plus λI, so to first order θ_ε − θ_s = −ε (G + λI)⁻¹ ∇L_m: the
quantity every strategy approximates.

This module finds θ_ε itself, for many examples at once, by a preconditioned Newton
iteration θ ← θ − t (G + λI)⁻¹ ∇J(θ) with the exact G at θ_s (from
:func:`influence.reference.exact.gauss_newton`) and a backtracking step t, in float64. The fixed
point is where ∇J = 0, i.e. the true minimiser whatever the preconditioner; the
iteration stops when the relative gradient norm is below ``tol``. Only the tracked layers' parameters move; memory is
O(P²), so use it on models with a few thousand tracked parameters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from influence.capture.tracking import LayerFilter, track
from influence.reference.exact import flatten, gauss_newton, layer_weights, model_at, require_output_task


class PBRFResult(NamedTuple):
    """``delta [K, P]``: θ_ε − θ_s per upweighted example (flat layout of
    :mod:`influence.reference.exact`); ``linear [K, P]``: the first-order response
    −ε (G + λI)⁻¹ ∇L_m; ``residual [K]``: final ‖∇J‖ / ‖ε ∇L_m‖; ``iterations``: the
    most any chunk took; ``tol`` the requested relative gradient norm."""

    delta: np.ndarray
    linear: np.ndarray
    residual: np.ndarray
    iterations: int
    tol: float

    @property
    def converged(self) -> np.ndarray:
        """``[K]`` bool: the PBRF was optimised to the requested tolerance."""
        return self.residual <= self.tol


def _as_jnp(data: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in data.items()}


def pbrf(
    model: Any,
    task: Any,
    train: dict[str, np.ndarray],
    points: np.ndarray,
    *,
    epsilon: float | np.ndarray,
    damping: float,
    layers: LayerFilter = None,
    gauss_newton_matrix: np.ndarray | None = None,
    max_iterations: int = 50,
    tol: float = 1e-6,
    chunk: int = 64,
) -> PBRFResult:
    """Optimise the PBRF for upweighting each training example in ``points`` by ``epsilon``.

    Args:
      model, task: a model at its final weights and an :class:`influence.tasks.OutputTask`
        (the Bregman divergence is that of ``task.family.loss`` in the outputs).
      train: the whole training set (a dict of arrays ``[N, ...]``).
      points: indices ``[K]`` of the examples to upweight (one PBRF each).
      epsilon: upweighting (negative to downweight; ``-1/N`` is removal), one for all
        or one per point ``[K]``.
      damping: λ of the proximity term (the influence scores' damping).
      gauss_newton_matrix: the exact G ``[P, P]`` of ``train`` if already computed.
      max_iterations, tol: the Newton iteration stops at relative gradient norm ``tol``.
      chunk: examples optimised together (memory ∝ chunk · N · outputs).

    Returns:
      :class:`PBRFResult`. Check ``converged``: where ε L_m's curvature outweighs
      G + λI (large |ε|, small λ, and removal, ε < 0, which subtracts curvature), the
      objective is far from quadratic or has no minimiser near θ_s, and the iteration
      stops at ``max_iterations`` without reaching ``tol``.
    """
    require_output_task(task, "the PBRF")
    tracked = track(model, layers)
    n = len(next(iter(train.values())))
    gn = gauss_newton(model, task, train, layers=layers) if gauss_newton_matrix is None else gauss_newton_matrix
    epsilons = np.broadcast_to(np.asarray(epsilon, np.float64), (len(points),))
    factor = scipy.linalg.cho_factor(gn + damping * np.eye(gn.shape[0]))
    with jax.enable_x64(True):
        data = _as_jnp({k: np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f" else v
                        for k, v in train.items()})
        theta_s = jnp.asarray(flatten(tracked, layer_weights(tracked)), jnp.float64)

        def outputs(theta):
            return task.outputs(model_at(tracked, theta), data)

        f_s = outputs(theta_s)
        mask = task.output_mask(data, f_s)
        targets = task.targets(data)

        def loss_of(f):
            return jnp.sum(task.family.loss(f, targets, mask))

        g_s = jax.grad(loss_of)(f_s)

        def objective(theta, point, eps):
            # Σ_n D_ℓ(f_n, f_s,n) up to a constant: ℓ(f) − ⟨∇ℓ(f_s), f⟩ has the same gradient,
            # ∇ℓ(f) − ∇ℓ(f_s), without the cancellation of subtracting ℓ(f_s).
            f = outputs(theta)
            bregman = (loss_of(f) - jnp.sum(g_s * f)) / n
            example = {k: jax.lax.dynamic_slice_in_dim(v, point, 1) for k, v in data.items()}
            upweight = task.loss(model_at(tracked, theta), example)[0]
            return bregman + eps * upweight + 0.5 * damping * jnp.sum((theta - theta_s) ** 2)

        grad = jax.jit(jax.vmap(jax.grad(objective)))
        value = jax.jit(jax.vmap(objective))

        def solve(g):
            return scipy.linalg.cho_solve(factor, np.asarray(g).T).T

        deltas, linears, residuals, iterations = [], [], [], 0
        for lo in range(0, len(points), chunk):
            args = (jnp.asarray(points[lo : lo + chunk]), jnp.asarray(epsilons[lo : lo + chunk]))
            theta = jnp.broadcast_to(theta_s, (len(args[0]), theta_s.size))
            g0 = np.asarray(grad(theta, *args))  # = ε ∇L_m at θ_s
            scale = np.linalg.norm(g0, axis=1)
            g, it = g0, 0
            while it < max_iterations:
                theta = _line_search(value, theta, args, g, -solve(g))
                it += 1
                g = np.asarray(grad(theta, *args))
                if np.all(np.linalg.norm(g, axis=1) <= tol * scale):
                    break
            residual = np.linalg.norm(g, axis=1) / scale
            deltas.append(np.asarray(theta - theta_s))
            linears.append(-solve(g0))
            residuals.append(residual)
            iterations = max(iterations, it)
    return PBRFResult(np.concatenate(deltas), np.concatenate(linears), np.concatenate(residuals), iterations, tol)


def _line_search(value, theta, args, g: np.ndarray, direction: np.ndarray, max_halvings: int = 30):
    """θ + t·d per example with the largest t in {1, ½, ¼, …} meeting Armijo's condition.

    The preconditioned Newton direction d = −(G + λI)⁻¹ ∇J is always a descent direction,
    but far from quadratic (ε L_m's curvature exceeding λ where G is flat) a full step
    overshoots; halving keeps every step a decrease, so the iteration converges to a
    minimiser instead of diverging.
    """
    d = jnp.asarray(direction)
    j0 = np.asarray(value(theta, *args))
    slope = np.sum(g * direction, axis=1)
    t = np.ones(len(j0))
    for _ in range(max_halvings):
        decrease = np.asarray(value(theta + jnp.asarray(t)[:, None] * d, *args)) - j0
        # a predicted decrease below float64 resolution of J cannot be checked: take the step
        ok = (decrease <= 1e-4 * t * slope) | (-t * slope < 1e-11 * np.maximum(np.abs(j0), 1.0))
        if ok.all():
            break
        t = np.where(ok, t, 0.5 * t)
    return theta + jnp.asarray(t)[:, None] * d


def measurement_changes(model: Any, task: Any, queries: dict[str, np.ndarray], delta: np.ndarray,
                        layers: LayerFilter = None) -> np.ndarray:
    """``m_q(θ_s + δ_k) − m_q(θ_s)`` for each response ``delta [K, P]``: ``[K, Q]`` (float64)."""
    tracked = track(model, layers)
    with jax.enable_x64(True):
        data = _as_jnp({k: np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f" else v
                        for k, v in queries.items()})
        theta_s = jnp.asarray(flatten(tracked, layer_weights(tracked)), jnp.float64)
        measure = jax.jit(jax.vmap(lambda th: task.measurement(model_at(tracked, th), data)))
        base = measure(theta_s[None])[0]
        return np.asarray(measure(theta_s + jnp.asarray(delta)) - base)
