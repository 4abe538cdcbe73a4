"""experiments.validation.lds --index: the index rows score as the index does (``none``:
as the rescan), next to the rescan's row."""

import types

import numpy as np

import influence as inf
from experiments.validation.lds import _score_all
from influence.testing import trained_mlp


def test_index_rows_are_scored_from_an_index_next_to_the_rescan():
    model, train, queries = trained_mlp(hidden=8, n_train=96, steps=50)
    task = inf.tasks.Classification()
    setting = types.SimpleNamespace(model=model, task=task, measurements={"loss": task}, train=train,
                                    queries={k: v[:4] for k, v in queries.items()}, batch_size=32)
    scored, _ = _score_all(setting, ("ekfac",), ("exact",), (), {}, indexes=("none", "truncate:0.5"))
    rescan, lam = scored[("loss", "ekfac", "exact", "default")]
    exact, lam_index = scored[("loss", "ekfac", "exact", "index none")]
    truncated, _ = scored[("loss", "ekfac", "exact", "index truncate:0.5")]
    assert lam_index == lam
    np.testing.assert_allclose(exact, rescan, rtol=0, atol=2e-5 * np.abs(rescan).max())
    assert np.abs(truncated - rescan).max() > 1e-3 * np.abs(rescan).max()  # a real compression, not the rescan
