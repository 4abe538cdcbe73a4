"""Inverse-Hessian-vector products the slow, exact way: damped Gauss-Newton-vector products
by forward- and reverse-mode autodiff, and (preconditioned) conjugate gradient.

For the tracked layers' parameters θ (flat layout of :mod:`influence.reference.exact`) and data of N
examples,

    (G + D) v = (1/N) Σ_n J_nᵀ H_n (J_n v) + D v,

with ``J_n v`` a ``jax.jvp`` of the model outputs, ``H_n`` the Hessian of the task's
``family.loss`` in the outputs (applied by a ``jax.jvp`` of its gradient, so any
:class:`influence.tasks.OutputTask` works) and ``Jᵀ`` a ``jax.vjp``. Nothing of size P² is
formed, so this scales to models far larger than :func:`influence.reference.exact.gauss_newton`
allows. ``D`` is diagonal: each layer's damping λ_ℓ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from influence.capture.tracking import LayerFilter, track
from influence.curvature import LayerCurvature, precondition
from influence.reference.exact import flatten, layer_slices, layer_weights, model_at, require_output_task, unflatten
from influence.runtime.data import as_source


def damping_vector(model: Any, dampings: dict[str, float], layers: LayerFilter = None) -> np.ndarray:
    """The diagonal of ``D`` ``[P]``: layer ℓ's λ_ℓ on its parameters."""
    tracked = track(model, layers)
    out = np.zeros(sum(i.d_a * i.d_out for i in tracked.layers))
    for name, sl in layer_slices(tracked).items():
        out[sl] = dampings[name]
    return out


def _functional(model: Any, layers: LayerFilter):
    """``(tracked, theta, at)``: flat tracked weights ``theta [P]`` and ``at(theta, state)``,
    the model at ``theta`` with every other variable from ``state``. Passing ``theta``
    and ``state`` as arguments of jitted functions (instead of closing over them) keeps
    the weights out of the compiled program as constants, which XLA would otherwise
    spend minutes folding for a model with a large vocabulary."""
    tracked = track(model, layers)
    theta = flatten(tracked, layer_weights(tracked))

    def at(th, state):
        return model_at(dataclasses.replace(tracked, state=state), th)

    return tracked, theta, at


def gauss_newton_product(model: Any, task: Any, data: Any, *, layers: LayerFilter = None,
                         batch_size: int = 32) -> Callable[[np.ndarray], np.ndarray]:
    """``v [R, P] -> G v [R, P]`` (float32 arithmetic, float64 result) for the mean
    Gauss-Newton matrix of ``task`` on ``data``; ``R`` vectors go through each batch at once.

    ``task`` must be an :class:`influence.tasks.OutputTask` (``outputs``, ``targets``,
    ``output_mask``, ``family``).
    """
    require_output_task(task, "the Gauss-Newton-vector product")
    tracked, theta, at = _functional(model, layers)
    batches = [(b.arrays, b.example_mask) for b in as_source(data, batch_size, task)]
    n = sum(float(m.sum()) for _, m in batches)

    @jax.jit
    def batch_product(theta, state, vs, batch, example_mask):
        def outputs(th):
            return task.outputs(at(th, state), batch)

        f, jvp = jax.linearize(outputs, theta)
        _, vjp = jax.vjp(outputs, theta)
        mask = task.output_mask(batch, f) * example_mask[:, None]
        targets = task.targets(batch)

        def total_loss(out):
            return jnp.sum(task.family.loss(out, targets, mask))

        grad_f = jax.grad(total_loss)

        def one(v):
            jv = jvp(v)
            hjv = jax.jvp(grad_f, (f,), (jv,))[1]
            return vjp(hjv)[0]

        return jax.vmap(one)(vs)

    def product(v: np.ndarray) -> np.ndarray:
        vs = jnp.asarray(v, jnp.float32)
        total = np.zeros(v.shape, np.float64)
        for arrays, example_mask in batches:
            total += np.asarray(batch_product(theta, tracked.state, vs, arrays, example_mask), np.float64)
        return total / n

    return product


class CGResult(NamedTuple):
    """``x [R, P]``; ``residual [R]``: ‖A x − b‖ / ‖b‖ recomputed at the end; ``iterations``."""

    x: np.ndarray
    residual: np.ndarray
    iterations: int


def conjugate_gradient(matvec: Callable[[np.ndarray], np.ndarray], b: np.ndarray, *,
                       preconditioner: Callable[[np.ndarray], np.ndarray] | None = None,
                       tol: float = 1e-6, max_iterations: int = 500,
                       callback: Callable[[int, np.ndarray], None] | None = None) -> CGResult:
    """Solve ``A x = b`` for each row of ``b [R, P]`` by (preconditioned) conjugate gradient.

    ``A`` (``matvec``, row-wise) must be symmetric positive definite, ``preconditioner`` an
    SPD approximation of ``A⁻¹``. The preconditioner changes only the speed: the iteration
    stops when every row's recursively updated relative residual is below ``tol``;
    the returned ``residual`` is recomputed from ``x``. ``callback(iteration, relative
    residuals [R])`` is called after every iteration (progress reports).
    """
    b = np.asarray(b, np.float64)
    m = preconditioner or (lambda r: r)
    x = np.zeros_like(b)
    r = b.copy()
    z = m(r)
    p = z.copy()
    rz = np.sum(r * z, axis=1)
    b_norm = np.linalg.norm(b, axis=1)
    it = 0
    while it < max_iterations and np.any(np.linalg.norm(r, axis=1) > tol * b_norm):
        ap = matvec(p)
        active = np.linalg.norm(r, axis=1) > tol * b_norm  # converged rows stop moving
        alpha = np.where(active, rz / np.maximum(np.sum(p * ap, axis=1), 1e-300), 0.0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        z = m(r)
        rz_new = np.sum(r * z, axis=1)
        beta = np.where(active, rz_new / np.maximum(rz, 1e-300), 0.0)
        p = z + beta[:, None] * p
        rz = rz_new
        it += 1
        if callback is not None:
            callback(it, np.linalg.norm(r, axis=1) / b_norm)
    residual = np.linalg.norm(matvec(x) - b, axis=1) / b_norm
    return CGResult(x, residual, it)


def curvature_preconditioner(model: Any, curvature: dict[str, LayerCurvature], dampings: dict[str, float],
                             layers: LayerFilter = None) -> Callable[[np.ndarray], np.ndarray]:
    """``v [R, P] -> P(v)``: a strategy's damped inverse curvature on flat vectors (to
    speed up CG, or to compare it with the exact solve)."""
    tracked = track(model, layers)
    blocks = {name: LayerCurvature(*(None if x is None else jnp.asarray(x, jnp.float32) for x in c))
              for name, c in curvature.items()}

    @jax.jit
    def apply(v, blocks):  # the factors are arguments, not constants folded into the program
        per_layer = jax.vmap(lambda row: unflatten(tracked, row))(v)
        return flatten(tracked, {name: precondition(per_layer[name], blocks[name], dampings[name])
                                 for name in per_layer})

    return lambda v: np.asarray(apply(jnp.asarray(v, jnp.float32), blocks), np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of ``[R, P]`` arrays."""
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
