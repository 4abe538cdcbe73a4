"""Power-law fit of the upper tail of a distribution (Clauset, Shalizi & Newman 2009,
"Power-law distributions in empirical data", SIAM Review 51(4)), continuous case.

For a tail ``x >= x_min`` the density is ``p(x) = (α-1)/x_min · (x/x_min)^(-α)``. The
maximum-likelihood exponent is ``α = 1 + n / Σ ln(x_i / x_min)``; ``x_min`` is the value
that minimises the Kolmogorov-Smirnov distance ``D`` between the tail's empirical CDF and
the fitted one. The goodness-of-fit p-value is the fraction of semi-parametric bootstrap
data sets (body resampled from the data below ``x_min``, tail drawn from the fitted power
law, in the observed proportions) whose own best fit has ``D`` at least as large; CSN
call the power law plausible when p > 0.1.

Documented simplification: ``x_min`` is searched among at most ``max_candidates``
quantiles of the data (not every distinct value), keeping at least ``min_tail`` points in
the tail; the bootstrap data sets are refitted with the same search.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """``alpha``: exponent of the density; ``xmin``: start of the tail; ``n_tail``: points
    in it; ``ks``: KS distance of the fit; ``p_value``: bootstrap p (NaN if not computed)."""

    alpha: float
    xmin: float
    n_tail: int
    ks: float
    p_value: float = float("nan")


def alpha_mle(tail: np.ndarray, xmin: float) -> float:
    """Continuous MLE ``1 + n / Σ ln(x/xmin)`` of a tail whose points are all >= xmin."""
    logs = np.log(tail / xmin).sum()
    return float("inf") if logs <= 0 else 1.0 + len(tail) / logs


def ks_distance(tail_sorted: np.ndarray, xmin: float, alpha: float) -> float:
    """Largest gap between the empirical CDF of ``tail_sorted`` (ascending, >= xmin) and
    the power-law CDF ``1 - (x/xmin)^(1-α)``, on both sides of each step."""
    n = len(tail_sorted)
    model = 1.0 - (tail_sorted / xmin) ** (1.0 - alpha)
    steps = np.arange(1, n + 1) / n
    return float(max(np.max(np.abs(model - steps)), np.max(np.abs(model - (steps - 1.0 / n)))))


def _best_fit(x_sorted: np.ndarray, max_candidates: int, min_tail: int) -> tuple[float, float, int, float]:
    """(alpha, xmin, n_tail, ks) minimising ks over quantile candidates of ascending data."""
    n = len(x_sorted)
    last = n - min_tail  # largest start index that leaves min_tail points
    starts = np.unique(np.linspace(0, last, min(max_candidates, last + 1)).astype(int))
    best = (float("nan"), float("nan"), 0, float("inf"))
    for s in starts:
        xmin = x_sorted[s]
        s = int(np.searchsorted(x_sorted, xmin, side="left"))  # ties: the tail takes every x >= xmin
        tail = x_sorted[s:]
        alpha = alpha_mle(tail, xmin)
        if not np.isfinite(alpha):
            continue
        d = ks_distance(tail, xmin, alpha)
        if d < best[3]:
            best = (alpha, float(xmin), len(tail), d)
    return best


def sample_power_law(n: int, alpha: float, xmin: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws from the continuous power law by inverse CDF."""
    return xmin * (1.0 - rng.random(n)) ** (-1.0 / (alpha - 1.0))


def fit_power_law(x: np.ndarray, *, max_candidates: int = 100, min_tail: int = 50, n_boot: int = 0,
                  seed: int = 0) -> PowerLawFit:
    """Fit the upper tail of the positive values of ``x`` (any shape; non-positive and
    non-finite values are dropped). With ``n_boot > 0``, also the CSN p-value from that
    many bootstrap data sets.

    Raises:
      ValueError: fewer than ``min_tail`` positive values.
    """
    x = np.sort(np.asarray(x, np.float64).ravel())
    x = x[np.isfinite(x) & (x > 0)]
    if len(x) < min_tail:
        raise ValueError(f"a power-law fit needs at least {min_tail} positive values, got {len(x)}")
    alpha, xmin, n_tail, ks = _best_fit(x, max_candidates, min_tail)
    p = float("nan")
    if n_boot > 0 and np.isfinite(alpha):
        rng = np.random.default_rng(seed)
        body = x[x < xmin]
        n = len(x)
        hits = 0
        for _ in range(n_boot):
            n_t = rng.binomial(n, n_tail / n) if len(body) else n
            synthetic = np.concatenate([rng.choice(body, n - n_t) if n - n_t else np.zeros(0),
                                        sample_power_law(n_t, alpha, xmin, rng)])
            synthetic.sort()
            hits += _best_fit(synthetic, max_candidates, min_tail)[3] >= ks
        p = hits / n_boot
    return PowerLawFit(alpha, xmin, n_tail, ks, p)
