"""The curvature strategies, each the list of passes it needs (one registry line each).

============ ======================= ===========================================
strategy     passes                  curvature per layer
============ ======================= ===========================================
identity     —                       none: plain gradient dot products
diagonal     eigenvalues             Λ = E_n[DW_n²] in the parameter basis
kfac         covariances             eig(A), eig(S), Λ = T̄·e_A e_Sᵀ
ekfac        covariances, eigenvalues eig(A), eig(S), Λ = E_n[(Q_Aᵀ DW_n Q_S)²]
============ ======================= ===========================================

Every strategy preconditions with the same formula, Q_A [(Q_Aᵀ V Q_S) / (Λ + λ)] Q_Sᵀ
(:func:`influence.curvature.layer.precondition`), so a new strategy is a new list of
passes here, plus a pass module if it needs a new statistic.
"""

from __future__ import annotations

import dataclasses

from influence.curvature.covariance import COVARIANCES
from influence.curvature.eigenvalues import EIGENVALUES
from influence.curvature.passes import CurvaturePass
from influence.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A curvature approximation: its name and the passes over the data that fit it."""

    name: str
    passes: tuple[CurvaturePass, ...]
    summary: str


STRATEGIES: dict[str, Strategy] = {
    "identity": Strategy("identity", (), "no curvature: plain gradient dot products"),
    "diagonal": Strategy("diagonal", (EIGENVALUES,), "diagonal Gauss-Newton in the parameter basis"),
    "kfac": Strategy("kfac", (COVARIANCES,), "Kronecker-factored A ⊗ S"),
    "ekfac": Strategy("ekfac", (COVARIANCES, EIGENVALUES), "K-FAC eigenbasis with refitted eigenvalues"),
}


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; expected one of {tuple(STRATEGIES)}")
    return STRATEGIES[name]
