"""Curvature approximations of the damped Gauss-Newton matrix, one block per layer.

Every strategy yields, per tracked layer, the same three arrays (:class:`LayerCurvature`):
eigenvector matrices ``Q_A`` and ``Q_S`` (or none) and eigenvalues ``Λ`` (or none), so
preconditioning is one formula, ``Q_A [(Q_Aᵀ V Q_S) / (Λ + λ)] Q_Sᵀ``:

============ ============= ============= ==============================================
strategy     Q_A, Q_S      Λ             fitted by
============ ============= ============= ==============================================
identity     —             —             nothing (plain gradient dot products)
diagonal     —             E_n[DW_n²]    one pass of per-example gradients
kfac         eig(A), eig(S) T̄·e_A e_Sᵀ   one pass of token covariances A, S
ekfac        eig(A), eig(S) E_n[(Q_AᵀDW_nQ_S)²]  covariance pass, then eigenvalue pass
============ ============= ============= ==============================================
"""

from influence.curvature.layer import LayerCurvature, default_damping, precondition

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")

__all__ = ["STRATEGIES", "LayerCurvature", "default_damping", "precondition"]
