"""One layer's curvature block and the preconditioning formula shared by all strategies."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from influence.curvature import blocks
from influence.errors import DegenerateCurvature, NonFiniteError

DEFAULT_DAMPING_FACTOR = 0.1
# The smallest default damping: float32's smallest normal number, 2**-126 ≈ 1.2e-38. A
# smaller λ is a subnormal, which XLA flushes to zero on CPU (and most accelerators),
# making 1/(Λ + λ) infinite wherever Λ is 0; bfloat16 has the same exponent range.
DAMPING_FLOOR = float(np.finfo(np.float32).tiny)


class LayerCurvature(NamedTuple):
    """Curvature of one dense layer with augmented weight ``[d_a, d_out]``.

    Attributes:
      q_a: ``[d_a, d_a]`` eigenvectors (columns) of A = E[ā āᵀ], or ``None``; for a layer
        split into blocks (:mod:`influence.curvature.blocks`), a tuple of the diagonal
        blocks ``[m_i, m_i]`` of the block-diagonal eigenvector matrix.
      q_s: ``[d_out, d_out]`` eigenvectors (columns) of S = E[g gᵀ], or ``None``; a tuple
        of blocks likewise.
      eigenvalues: ``[d_a, d_out]`` Λ, the curvature in the (rotated) basis, or
        ``None`` for the identity strategy.
      a_eigenvalues, s_eigenvalues: eigenvalues of A ``[d_a]`` and S ``[d_out]``
        (kfac/ekfac only; kept for diagnostics).
    """

    q_a: np.ndarray | None = None
    q_s: np.ndarray | None = None
    eigenvalues: np.ndarray | None = None
    a_eigenvalues: np.ndarray | None = None
    s_eigenvalues: np.ndarray | None = None


def default_damping(curvature: LayerCurvature, factor: float = DEFAULT_DAMPING_FACTOR, name: str = "") -> float:
    """λ = factor × mean(Λ), the heuristic of Grosse et al. (2023); 0 without Λ.

    Raises :class:`~influence.errors.DegenerateCurvature` when mean(Λ) is 0 (the layer's
    gradients were all zero on the fitting data: the heuristic has no scale to go by)
    and ``FloatingPointError`` when it is not finite. A positive λ below
    :data:`DAMPING_FLOOR` (mean(Λ) < ~1.2e-37: gradients of order 1e-19 and less) is
    raised to that floor, with a warning: it would otherwise be flushed to zero on the
    device and divide by zero.
    """
    if curvature.eigenvalues is None:
        return 0.0
    layer = f"layer {name!r}" if name else "the layer"
    mean = float(np.mean(np.asarray(curvature.eigenvalues, np.float64)))
    if not np.isfinite(mean):
        raise NonFiniteError(f"{layer}: mean(Λ) is {mean}, so there is no default damping; the factors are not "
                                 "finite (refit them, or pass damping=)")
    if mean <= 0:
        raise DegenerateCurvature(
            f"{layer}: its curvature Λ is all zero (the layer's gradients were all zero on the fitting data), so the "
            f"default damping {factor} × mean(Λ) would be 0 and every score NaN; pass damping= (an absolute λ > 0), "
            "or track other layers (layers=)")
    damping = factor * mean
    if damping < DAMPING_FLOOR:
        warnings.warn(
            f"{layer}: the default damping {factor} × mean(Λ) = {damping:.3g} is below float32's smallest normal "
            f"number; using λ = {DAMPING_FLOOR:.3g} instead (the layer's gradients were nearly zero on the fitting "
            "data; pass damping= to choose λ)", RuntimeWarning, stacklevel=3)
        return DAMPING_FLOOR
    return damping


def rotate(v, q_a, q_s):
    """``Q_Aᵀ V Q_S`` for ``v [..., d_a, d_out]`` (block by block for split factors)."""
    if blocks.is_blocked(q_a) or blocks.is_blocked(q_s):
        return blocks.rotate(v, q_a, q_s)
    return jnp.einsum("ia,...ij,jb->...ab", q_a, v, q_s)


def unrotate(v, q_a, q_s):
    """``Q_A V Q_Sᵀ`` for ``v [..., d_a, d_out]`` (block by block for split factors)."""
    if blocks.is_blocked(q_a) or blocks.is_blocked(q_s):
        return blocks.unrotate(v, q_a, q_s)
    return jnp.einsum("ia,...ab,jb->...ij", q_a, v, q_s)


def map_arrays(curvature: LayerCurvature, fn) -> LayerCurvature:
    """Apply ``fn`` to every array of ``curvature`` (to each block of a split rotation)."""

    def one(x):
        if x is None:
            return None
        if blocks.is_blocked(x):
            return tuple(fn(b) for b in x)
        return fn(x)

    return LayerCurvature(*(one(x) for x in curvature))


def arrays_of(x) -> tuple:
    """The arrays of one field: ``()`` for None, the blocks of a split rotation, or ``(x,)``."""
    if x is None:
        return ()
    return tuple(x) if blocks.is_blocked(x) else (x,)


def precondition(v, curvature: LayerCurvature, damping: float):
    """Apply the damped inverse curvature to gradients ``v [..., d_a, d_out]``.

    Computes ``Q_A [(Q_Aᵀ V Q_S) / (Λ + λ)] Q_Sᵀ``, which equals
    ``(Q_A ⊗ Q_S) diag(vec Λ + λ)⁻¹ (Q_A ⊗ Q_S)ᵀ vec(V)`` with row-major ``vec``. (The
    paper's Eq. 21 prints the rotations transposed for its [d_out, d_in] layout.)
    Identity curvature returns ``v`` unchanged; ``damping`` is then ignored.
    """
    if curvature.eigenvalues is None:
        return v
    rotated = curvature.q_a is not None
    if rotated:
        v = rotate(v, curvature.q_a, curvature.q_s)
    v = v / (curvature.eigenvalues.astype(v.dtype) + damping)  # bfloat16 factors: divide in v's precision
    if rotated:
        v = unrotate(v, curvature.q_a, curvature.q_s)
    return v
