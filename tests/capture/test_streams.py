"""Forward passes that draw from nnx.Rngs streams: held fixed, so a noise model scores as
its twin with the same draws baked in as constants."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import influence as inf
from influence import tasks
from influence.errors import RandomStreamsWarning


class Noisy(nnx.Module):
    """An MLP that adds noise drawn from its own stored stream to its hidden layer."""

    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.l1 = nnx.Linear(4, 6, rngs=rngs)
        self.l2 = nnx.Linear(6, 3, rngs=rngs)
        self.rngs = nnx.Rngs(noise=7)

    def __call__(self, x):
        h = jax.nn.tanh(self.l1(x))
        return self.l2(h + 0.5 * jax.random.normal(self.rngs.noise(), h.shape[1:]))


class Fixed(nnx.Module):
    """The noise model's twin: the same weights, the first draw of the stream as a constant."""

    def __init__(self, noisy):
        self.l1, self.l2 = nnx.clone(noisy.l1), nnx.clone(noisy.l2)
        self.noise = nnx.Variable(0.5 * jax.random.normal(nnx.clone(noisy.rngs).noise(), (6,)))

    def __call__(self, x):
        return self.l2(jax.nn.tanh(self.l1(x)) + self.noise.get_value())


def _data(n=24, seed=0):
    rs = np.random.RandomState(seed)
    return {"x": rs.randn(n, 4).astype(np.float32), "y": rs.randint(0, 3, n).astype(np.int32)}


def test_noise_model_fits_and_scores_as_its_fixed_twin():
    noisy, data = Noisy(), _data()
    twin = Fixed(noisy)
    task = tasks.Classification()
    with pytest.warns(RandomStreamsWarning, match="rngs.noise"):
        f_noisy = inf.fit_factors(noisy, task, data, strategy="kfac", batch_size=8, progress=False)
    f_twin = inf.fit_factors(twin, task, data, strategy="kfac", batch_size=8, progress=False)
    assert f_noisy.metadata["rng_streams"] == ["rngs.noise"]
    assert "rng_streams" not in f_twin.metadata
    for name in ("l1", "l2"):
        np.testing.assert_allclose(f_noisy.layers[name].eigenvalues, f_twin.layers[name].eigenvalues,
                                   rtol=1e-4, atol=1e-7)
    s_noisy = inf.pairwise_scores(noisy, task, f_noisy, _data(5, 1), data, progress=False).values
    s_twin = inf.pairwise_scores(twin, task, f_twin, _data(5, 1), data, progress=False).values
    np.testing.assert_allclose(s_noisy, s_twin, rtol=1e-4, atol=1e-4 * np.abs(s_twin).max())
    # the noise matters: without it the outputs differ (so the comparison above can fail)
    plain = Fixed(noisy)
    plain.noise.set_value(jnp.zeros(6))
    assert np.abs(plain(data["x"]) - twin(data["x"])).max() > 0.1
    # the user's stream is not advanced
    assert int(noisy.rngs.noise.count.get_value()) == 0


class DropoutOn(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.l1 = nnx.Linear(4, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=3))
        self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(jax.nn.relu(self.l1(x)), deterministic=False))


@pytest.mark.slow
def test_dropout_left_on_is_deterministic_per_batch_position():
    model, data = DropoutOn(), _data(16)
    task = tasks.Classification()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomStreamsWarning)
        runs = [inf.fit_factors(model, task, data, strategy="kfac", batch_size=8, progress=False) for _ in range(2)]
        scores = [inf.pairwise_scores(model, task, runs[0], data, data, batch_size=b, progress=False).values
                  for b in (8, 8, 16)]
    assert runs[0].metadata["rng_streams"] == ["drop.rngs"]
    np.testing.assert_array_equal(runs[0].layers["l1"].q_a, runs[1].layers["l1"].q_a)
    np.testing.assert_array_equal(scores[0], scores[1])
    # the mask is fixed per batch position: another batch size gives other masks, other scores
    assert not np.allclose(scores[0], scores[2], rtol=1e-3)
