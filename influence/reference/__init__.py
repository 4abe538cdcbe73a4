"""References the approximations are checked against (validation tools, not the hot path).

* :mod:`.exact`: exact damped Gauss-Newton matrix, per-example gradients and influence
  for small models.
* :mod:`.ihvp`: exact Gauss-Newton-vector products and conjugate gradient.
* :mod:`.pbrf`: the proximal Bregman response function (Bae et al. 2022).
* :mod:`.lds`: linear datamodeling score against retrained models, with subset sampling
  and a cache of retrained measurements.
* :mod:`.training`: many small models trained side by side (vmap).
* :mod:`.validate`: LDS of every method on a run (``inf.validate``), imported on first use.
"""
from influence.reference import exact, ihvp, lds, pbrf, training  # noqa: F401  (inf.reference.exact, ...)
