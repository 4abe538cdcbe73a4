"""Sharded fitting and scoring on four CPU host devices against one device.

Run by ``tests/runtime/test_multidevice.py`` in a separate pytest process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the main test process keeps one
device). By hand::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python -m pytest -o python_files='check_*.py' tests/runtime/multidevice
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import influence as inf
from influence import tasks
from influence.scoring.ranking import rank_training
from influence.testing import MLP, TinyLM, digits, lm_sequences

if jax.device_count() < 4:
    pytest.skip("needs 4 devices: XLA_FLAGS=--xla_force_host_platform_device_count=4", allow_module_level=True)


def _close(got, want, tol=1e-5):
    """Equal to ``tol`` relative to the largest magnitude (float32 sums in another order)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


@functools.cache
def _case(name):
    """Untrained models (sharding must not change any result, trained or not): the
    digits MLP (one token per example: the fast paths) and the tiny transformer."""
    if name == "mlp":
        x, y = digits()
        data = {"x": x[:256], "y": y[:256]}
        return MLP(rngs=nnx.Rngs(0)), tasks.Classification(), data, {"x": x[1500:1508], "y": y[1500:1508]}
    queries = lm_sequences(5, seed=1)  # 5 queries: a ("data", "query") mesh of 2 × 2 pads them to 6
    queries["loss_mask"][:, :4] = 0
    return TinyLM(rngs=nnx.Rngs(1)), tasks.CausalLM(), lm_sequences(32), queries


@functools.cache
def _one_device(case):
    """EK-FAC (sampled Fisher) on one device."""
    model, task, data, queries = _case(case)
    one = inf.fit_factors(model, task, data, strategy="ekfac", fisher="sampled", batch_size=8, progress=False)
    return model, task, data, queries, one


def _fitted(case):
    """EK-FAC (sampled Fisher) on one device and on four. The four-device fit is made only
    where it is compared (the sequence case's only under -m slow): the tests that score
    with the one-device factors need not pay for it."""
    model, task, data, queries, one = _one_device(case)
    four = inf.fit_factors(model, task, data, strategy="ekfac", fisher="sampled", batch_size=8, progress=False, mesh=4)
    return model, task, data, queries, one, four


# one token per example (fast paths), sequences; [lm] only under -m slow (default-suite time)
@pytest.mark.parametrize("case", ["mlp", pytest.param("lm", marks=pytest.mark.slow)])
def test_sharded_factors_equal_single_device(case):
    model, task, data, queries, one, four = _fitted(case)
    assert four.metadata["mesh"]["axes"] == {"data": 4}
    assert four.metadata["n_examples"] == one.metadata["n_examples"]
    assert four.metadata["n_tokens"] == pytest.approx(one.metadata["n_tokens"], rel=1e-12)
    for name in one.layers:
        a, b = one.layers[name], four.layers[name]
        for field in ("eigenvalues", "a_eigenvalues", "s_eigenvalues"):
            _close(getattr(b, field), getattr(a, field))
    if case == "lm":
        # eigenvectors of near-equal eigenvalues may turn within their subspace: compare
        # what they are used for, the scores (both on one device)
        _close(inf.pairwise_scores(model, task, four, queries, data, batch_size=8, progress=False).values,
               inf.pairwise_scores(model, task, one, queries, data, batch_size=8, progress=False).values)


# The sequence case refits twice more on four devices: kept for -m slow (the default run has
# the one-token case here, and the sequence case of test_sharded_factors_equal_single_device).
@pytest.mark.parametrize("case", ["mlp", pytest.param("lm", marks=pytest.mark.slow)])
def test_sampled_fisher_same_for_other_batch_size_and_devices(case):
    """Sampled targets are keyed by each example's row, so a batch of 4 on one device and
    of 16 over four devices draw the same targets: the same factors, to rounding."""
    model, task, data, queries, one = _one_device(case)
    four = inf.fit_factors(model, task, data, strategy="ekfac", fisher="sampled", batch_size=16 if case == "lm" else 32,
                           progress=False, mesh=4)
    small = inf.fit_factors(model, task, data, strategy="ekfac", fisher="sampled", batch_size=4, progress=False)
    for name in one.layers:
        for other in (four, small):
            _close(other.layers[name].eigenvalues, one.layers[name].eigenvalues)
            _close(other.layers[name].a_eigenvalues, one.layers[name].a_eigenvalues)


def test_sampled_draws_same_for_other_batch_size_and_devices():
    """With 3 draws per example (draw j keyed by fold_in(key_n, j)) too."""
    model, task, data, _ = _case("mlp")
    fits = [inf.fit_factors(model, task, data, strategy="kfac", fisher="sampled", fisher_samples=3,
                            batch_size=batch, progress=False, mesh=mesh) for batch, mesh in ((8, None), (32, 4))]
    for name in fits[0].layers:
        _close(fits[1].layers[name].s_eigenvalues, fits[0].layers[name].s_eigenvalues)
        _close(fits[1].layers[name].a_eigenvalues, fits[0].layers[name].a_eigenvalues)


@pytest.mark.parametrize("strategy,fisher", [("diagonal", "sampled"), ("kfac", "exact")])
def test_other_strategies_and_fishers(strategy, fisher):
    model, task, data, _ = _case("mlp")
    one = inf.fit_factors(model, task, data, strategy=strategy, fisher=fisher, batch_size=8, progress=False)
    four = inf.fit_factors(model, task, data, strategy=strategy, fisher=fisher, batch_size=8, progress=False,
                           mesh=jax.devices()[:4])
    for name in one.layers:
        _close(four.layers[name].eigenvalues, one.layers[name].eigenvalues)


# [lm] only under -m slow (default-suite time): sequences scored on a mesh stay checked by
# default through the top-k and resume tests below
@pytest.mark.parametrize("case", ["mlp", pytest.param("lm", marks=pytest.mark.slow)])
def test_sharded_scores_equal_single_device(case):
    """Each device scores its rows; a ("data", "query") mesh also splits the queries (5
    queries on 2 for the sequences: padded). Scores on four devices are those of one device
    with a quarter of the batch, to 1e-6; against the same batch on one device, sums of
    float32 products that cancel differ by up to 2e-5 of the largest score (one device
    alone, batch 2 vs 8, differs as much)."""
    model, task, data, queries, factors = _one_device(case)
    one = inf.pairwise_scores(model, task, factors, queries, data, batch_size=8, progress=False, per_layer=True)
    quarter = inf.pairwise_scores(model, task, factors, queries, data, batch_size=2, progress=False)
    four = inf.pairwise_scores(model, task, factors, queries, data, batch_size=8, progress=False, per_layer=True,
                               mesh=4)
    grid = jax.make_mesh((2, 2), ("data", "query"))
    by_query = inf.pairwise_scores(model, task, factors, queries, data, batch_size=8, progress=False, mesh=grid)
    _close(four.values, quarter.values, 1e-6)
    _close(four.values, one.values, 2e-5)
    _close(by_query.values, four.values, 1e-6)
    for name in one.per_layer:
        _close(four.per_layer[name], one.per_layer[name], 2e-5)
    _close(inf.self_scores(model, task, factors, data, batch_size=8, progress=False, mesh=4).values,
           inf.self_scores(model, task, factors, data, batch_size=8, progress=False).values)


def test_sharded_top_k_equals_the_single_device_ranking(tmp_path):
    model, task, data, queries, factors = _one_device("lm")
    one = rank_training(model, task, factors, queries, data, k=6, batch_size=8, progress=False)
    grid = jax.make_mesh((2, 2), ("data", "query"))
    four = rank_training(model, task, factors, queries, data, k=6, batch_size=8, progress=False, mesh=grid,
                         scores_path=tmp_path / "all.npy")
    full = inf.pairwise_scores(model, task, factors, queries, data, batch_size=8, progress=False).values
    np.testing.assert_array_equal(four.indices, one.indices)
    _close(four.scores, one.scores, 2e-5)
    _close(np.load(tmp_path / "all.npy"), full, 2e-5)


def test_resume_on_another_number_of_devices(tmp_path):
    """Per-device sums saved on four devices are added into the one slot of one device:
    the same factors to rounding."""
    model, task, data, queries, want = _one_device("lm")

    class Stop(Exception):
        pass

    def stopping():
        for i, lo in enumerate(range(0, 32, 8)):
            if i == 3 and not resumed:
                raise Stop
            yield {k: v[lo : lo + 8] for k, v in data.items()}

    resumed = []
    settings = dict(strategy="ekfac", fisher="sampled", batch_size=8, progress=False, checkpoint_dir=tmp_path,
                    checkpoint_every=2)
    with pytest.raises(Stop):
        inf.fit_factors(model, task, stopping, mesh=4, **settings)
    resumed.append(True)
    got = inf.fit_factors(model, task, stopping, **settings)
    for name in want.layers:
        _close(got.layers[name].eigenvalues, want.layers[name].eigenvalues)


def test_bad_meshes_and_batch_sizes_are_explained():
    model, task, data, _ = _case("mlp")
    with pytest.raises(ValueError, match="multiple of 4"):
        inf.fit_factors(model, task, data, strategy="kfac", batch_size=10, progress=False, mesh=4)
    with pytest.raises(ValueError, match="multiple of 3"):
        inf.self_scores(model, task, inf.fit_factors(model, task, data, strategy="identity", progress=False), data,
                        batch_size=8, progress=False, mesh=3)
    with pytest.raises(ValueError, match="devices"):
        inf.fit_factors(model, task, data, strategy="kfac", progress=False, mesh=64)
    with pytest.raises(ValueError, match="'data'"):
        inf.fit_factors(model, task, data, strategy="kfac", progress=False, mesh=jax.make_mesh((4,), ("batch",)))
    with pytest.raises(ValueError, match="devices"):
        inf.fit_factors(model, task, data, strategy="kfac", progress=False, mesh=0)
