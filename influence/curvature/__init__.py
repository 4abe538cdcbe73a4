"""Curvature approximations of the damped Gauss-Newton matrix, one block per layer.

Every strategy yields, per tracked layer, the same arrays (:class:`LayerCurvature`):
eigenvector matrices ``Q_A`` and ``Q_S`` (or none) and eigenvalues ``Λ`` (or none), so
preconditioning is one formula, ``Q_A [(Q_Aᵀ V Q_S) / (Λ + λ)] Q_Sᵀ``.

* :mod:`.strategies`: identity, diagonal, kfac, ekfac as lists of passes;
* :mod:`.covariance`, :mod:`.eigenvalues`: the two passes (a jitted step each, and how
  their totals become curvature); :mod:`.passes`: what a pass is;
* :mod:`.layer`: :class:`LayerCurvature` and the preconditioning formula;
* :mod:`.blocks`: within-layer block-diagonal factors for wide layers.
"""

from influence.curvature.layer import LayerCurvature, default_damping, precondition
from influence.curvature.strategies import STRATEGIES, Strategy, get_strategy

__all__ = ["STRATEGIES", "LayerCurvature", "Strategy", "default_damping", "get_strategy", "precondition"]
