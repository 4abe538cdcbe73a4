"""Capture: which layers are tracked, and their inputs ``a`` and output gradients ``g``.

* :mod:`.tracking`: :func:`track` clones a model and hooks its tracked layers;
  :func:`capture` runs a pure objective and returns ``(value, a, g)`` per layer.
* :mod:`.objectives`: what is differentiated in each pass (sampled/empirical/exact
  Fisher, the query measurement) and the token weights of the factors.
"""

from influence.capture.objectives import layer_gradients, token_weights
from influence.capture.tracking import LayerFilter, LayerInfo, TrackedModel, capture, model_fingerprint, track

__all__ = ["LayerFilter", "LayerInfo", "TrackedModel", "capture", "layer_gradients", "model_fingerprint",
           "token_weights", "track"]
