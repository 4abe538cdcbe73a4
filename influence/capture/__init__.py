"""Capture: which layers are tracked, and their inputs ``a`` and output gradients ``g``.

* :mod:`.kinds`: the trackable layer kinds (``nnx.Linear``, ``nnx.Conv``,
  ``nnx.LinearGeneral``, ``nnx.Einsum``), each as a matrix map on tokens;
* :mod:`.tracking`: :func:`track` clones a model and hooks its tracked layers, and says
  which parameters are left out;
* :mod:`.activations`: :func:`capture` runs a pure objective and returns ``(value, a, g)``;
* :mod:`.objectives`: what is differentiated in each pass (sampled/empirical/exact
  Fisher, the query measurement) and the token weights of the factors;
* :mod:`.per_example`: per-example weight gradients ``DW_b = Σ_t ā_bt g_btᵀ``, a chunk of
  examples at a time.
"""

from influence.capture.activations import capture
from influence.capture.kinds import LayerKind
from influence.capture.objectives import layer_gradients, token_weights
from influence.capture.tracking import (
           LayerFilter,
           LayerInfo,
           TrackedModel,
           model_fingerprint,
           track,
)

__all__ = ["LayerFilter", "LayerInfo", "LayerKind", "TrackedModel", "capture", "layer_gradients", "model_fingerprint",
           "token_weights", "track"]
