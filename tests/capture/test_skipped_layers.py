"""A grouped (depthwise) convolution is skipped by the default selection, with why, instead
of stopping the fit; named in a list it is still an error."""

import numpy as np
import pytest
from flax import nnx

import influence as inf
from influence import tasks
from influence.capture.tracking import track


class Depthwise(nnx.Module):
    def __init__(self):
        self.dw = nnx.Conv(2, 2, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))
        self.pw = nnx.Conv(2, 3, (1, 1), rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.pw(nnx.relu(self.dw(x))).mean(axis=(1, 2))


def test_depthwise_conv_is_skipped_with_its_reason_and_the_fit_runs():
    model = Depthwise()
    tracked = track(model)
    assert tracked.layer_names == ("pw",) and "grouped convolution" in tracked.untracked.skipped["dw"]
    rs = np.random.RandomState(0)
    data = {"x": rs.randn(6, 5, 5, 2).astype(np.float32), "y": rs.randint(0, 3, 6).astype(np.int32)}
    with pytest.warns(inf.UntrackedParametersWarning, match="Skipped layer 'dw' is a grouped convolution"):
        factors = inf.fit_factors(model, tasks.Classification(), data, strategy="identity", progress=False)
    assert "grouped" in factors.metadata["untracked"]["skipped"]["dw"]
    assert factors.metadata["untracked"]["modules"]["dw"] == 2 * 9 + 2
    with pytest.raises(inf.TrackingError, match="grouped convolution.*exclude it with layers"):
        track(model, ["dw", "pw"])
