"""The public surface: every documented name resolves from ``import influence as inf``,
run settings are validated once, and every result type has values, top_k and save/load."""

import subprocess
import sys

import numpy as np
import pytest

import influence as inf
from influence.testing import trained_mlp


def test_every_public_name_resolves_including_the_lazy_subpackages():
    for name in inf.__all__:
        assert getattr(inf, name) is not None, name
    # a fresh interpreter: the sub-packages load on first attribute access
    code = ("import influence as inf; inf.query.QueryEngine; inf.lm.load_run; inf.reference.exact.exact_scores; "
            "inf.hosts")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        inf.nonexistent  # noqa: B018 - the access is the test


def test_every_library_error_is_an_influence_error():
    for error in (inf.TrackingError, inf.DataError, inf.FileFormatError, inf.CheckpointMismatch,
                  inf.MissingCorpusError, inf.ModelMismatch):
        assert issubclass(error, inf.InfluenceError) and issubclass(error, ValueError)


def test_execution_validates_its_settings_and_rejects_unknown_options():
    run = inf.Execution(batch_size=8, progress=False)
    assert inf.Execution.of(run, {"batch_size": 16}) == inf.Execution(batch_size=16, progress=False)
    assert inf.Execution.of(None, {}) == inf.Execution()
    for bad in ({"batch_size": 0}, {"batch_size": 2.5}, {"checkpoint_every": 0}, {"batch_size": True}):
        with pytest.raises(ValueError, match="positive integer"):
            inf.Execution(**bad)
    with pytest.raises(TypeError, match="True or False"):
        inf.Execution(progress="no")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['batchsize'\]"):
        inf.Execution.of(None, {"batchsize": 8})
    with pytest.raises(TypeError, match="must be an influence.Execution"):
        inf.Execution.of({"batch_size": 8}, {})


def test_entry_points_take_execution_or_keywords_alike():
    model, data, queries = trained_mlp()
    task = inf.tasks.Classification()
    factors = inf.fit_factors(model, task, data, strategy="kfac",
                              execution=inf.Execution(batch_size=64, progress=False))
    same = inf.fit_factors(model, task, data, strategy="kfac", batch_size=64, progress=False)
    for name in factors.layers:
        np.testing.assert_array_equal(factors.layers[name].eigenvalues, same.layers[name].eigenvalues)
    with pytest.raises(TypeError, match="unknown option"):
        inf.pairwise_scores(model, task, factors, queries, data, batchsize=4)


def test_result_types_share_values_top_k_and_persistence(tmp_path):
    model, data, queries = trained_mlp()
    task = inf.tasks.Classification()
    factors = inf.fit_factors(model, task, data, strategy="ekfac", progress=False)
    scores = inf.pairwise_scores(model, task, factors, queries, data, progress=False)
    self_inf = inf.self_scores(model, task, factors, data, per_layer=True, progress=False)
    ranking = inf.rank_training(model, task, factors, queries, data, k=5, progress=False)

    idx, top = scores.top_k(5)
    np.testing.assert_array_equal(idx, ranking.indices)
    np.testing.assert_allclose(top, ranking.values, rtol=1e-5)
    assert ranking.scores is ranking.values
    np.testing.assert_array_equal(ranking.top_k(2)[0], ranking.indices[:, :2])

    best, values = self_inf.top_k(3)
    assert values.shape == (3,) and np.all(values == np.sort(self_inf.values)[::-1][:3])
    np.testing.assert_array_equal(self_inf.values[best], values)
    loaded = inf.SelfScores.load(self_inf.save(tmp_path))
    np.testing.assert_array_equal(loaded.values, self_inf.values)
    assert set(loaded.per_layer) == set(factors.layer_names)
    with pytest.raises(inf.FileFormatError, match="expected 'influence-self-scores'"):
        inf.SelfScores.load(scores.save(tmp_path / "pairwise.npz"))
    for result in (scores, self_inf, ranking):
        for k in (0, -1, 1.5):
            with pytest.raises(ValueError, match="positive integer"):
                result.top_k(k)
