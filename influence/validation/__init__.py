"""Validation of influence scores against what they are meant to predict.

* :mod:`influence.validation.lds`: linear datamodeling score against retrained models,
  with subset sampling and a cache of retrained measurements.
* :mod:`influence.validation.training`: many small models trained side by side (vmap).
* :mod:`influence.validation.pbrf`: the proximal Bregman response function (Bae et al. 2022).
* :mod:`influence.validation.ihvp`: exact Gauss-Newton-vector products and conjugate gradient.
"""
