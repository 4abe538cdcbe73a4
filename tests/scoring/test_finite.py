"""No silent NaN or zero scores: every non-finite input of a scoring pass is a
FloatingPointError that names where it is (variable, query row and layer, training row
and batch), and a layer with no curvature has no silent default damping."""

import jax.numpy as jnp
import numpy as np
import pytest

import influence as inf
from influence import tasks
from influence.curvature.layer import DAMPING_FLOOR
from influence.testing import trained_mlp

TASK = tasks.Classification()


@pytest.fixture(scope="module")
def fitted():
    model, data, queries = trained_mlp()
    factors = inf.fit_factors(model, TASK, data, strategy="ekfac", progress=False)
    return model, data, queries, factors


def _with_nan(arrays, row, col=3):
    out = {k: v.copy() for k, v in arrays.items()}
    out["x"][row, col] = np.nan
    return out


def test_nan_weights_are_named_before_any_pass(fitted):
    _, data, queries, factors = fitted
    broken, _, _ = trained_mlp()
    broken.l2.kernel[...] = broken.l2.kernel[...].at[4, 1].set(jnp.inf)
    match = r"weights hold NaN/Inf: variable 'l2.kernel' \(16, 10\) has 1 non-finite value"
    with pytest.raises(FloatingPointError, match=match):
        inf.pairwise_scores(broken, TASK, factors, queries, data, progress=False)
    with pytest.raises(FloatingPointError, match=match):
        inf.self_scores(broken, TASK, factors, data, progress=False)
    with pytest.raises(FloatingPointError, match=match):
        inf.rank_training(broken, TASK, factors, queries, data, k=3, progress=False)
    with pytest.raises(FloatingPointError, match=match):
        inf.fit_factors(broken, TASK, data, strategy="diagonal", progress=False)


def test_nan_query_is_named_with_its_layer(fitted):
    model, data, queries, factors = fitted
    with pytest.raises(FloatingPointError, match=r"gradient of query 5 is NaN/Inf in layer 'l1'.*query's inputs"):
        inf.pairwise_scores(model, TASK, factors, _with_nan(queries, 5), data, progress=False)


@pytest.mark.parametrize("job", ["pairwise", "self", "rank"])
def test_nan_training_row_is_named_with_its_batch(fitted, job):
    model, data, queries, factors = fitted
    bad = _with_nan(data, 37)
    match = r"training row 37 \(batch 2, rows 32..47 of the pass\) is NaN/Inf"
    with pytest.raises(FloatingPointError, match=match):
        if job == "pairwise":
            inf.pairwise_scores(model, TASK, factors, queries, bad, batch_size=16, progress=False)
        elif job == "self":
            inf.self_scores(model, TASK, factors, bad, batch_size=16, progress=False)
        else:
            inf.rank_training(model, TASK, factors, queries, bad, k=5, batch_size=16, progress=False)


def test_ranking_names_the_training_row_through_candidates_and_leaves_no_partial_file(fitted, tmp_path):
    model, data, queries, factors = fitted
    n_query = len(queries["y"])
    candidates = [np.array([3, 200, 250])] * (n_query - 1) + [np.array([7, 9])]
    path = tmp_path / "scores.npy"
    with pytest.raises(FloatingPointError, match=r"training row 250 \(batch 1,"):
        inf.rank_training(model, TASK, factors, queries, _with_nan(data, 250), k=2, candidates=candidates,
                          scores_path=path, batch_size=4, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_nan_rows_after_a_snapshot_are_never_saved(fitted, tmp_path):
    """With a checkpoint the check runs at each snapshot, so none holds a NaN score: a
    run on the repaired data resumes from the last good one (batches 0-5) and scores as
    a fresh run."""
    model, data, queries, factors = fitted
    run = {"batch_size": 16, "checkpoint_dir": tmp_path, "checkpoint_every": 2, "progress": False}
    with pytest.raises(FloatingPointError, match=r"training row 100 \(batch 6"):
        inf.pairwise_scores(model, TASK, factors, queries, _with_nan(data, 100), **run)
    resumed = inf.pairwise_scores(model, TASK, factors, queries, data, **run)
    fresh = inf.pairwise_scores(model, TASK, factors, queries, data, batch_size=16, progress=False)
    assert np.isfinite(resumed.values).all()
    np.testing.assert_array_equal(resumed.values, fresh.values)


def test_all_zero_gradients_refuse_the_default_damping(fitted):
    """l2's kernel at 0 stops every gradient reaching l1: its Λ is all zero, so
    0.1 × mean(Λ) = 0 and every score would be NaN."""
    _, data, queries, _ = fitted
    model, _, _ = trained_mlp()
    model.l2.kernel[...] = jnp.zeros_like(model.l2.kernel[...])
    factors = inf.fit_factors(model, TASK, data, strategy="diagonal", progress=False)
    assert not factors.layers["l1"].eigenvalues.any()
    match = (r"layer 'l1': its curvature Λ is all zero .the layer's gradients were all zero on the fitting data"
             r".*pass damping=")
    with pytest.raises(inf.DegenerateCurvature, match=match):
        inf.pairwise_scores(model, TASK, factors, queries, data, progress=False)
    with pytest.raises(inf.DegenerateCurvature, match=match):
        inf.self_scores(model, TASK, factors, data, progress=False)
    scores = inf.pairwise_scores(model, TASK, factors, queries, data, damping=1e-3, progress=False)
    assert np.isfinite(scores.values).all() and scores.metadata["damping"] == {"l1": 1e-3, "l2": 1e-3}
    with pytest.raises(FloatingPointError, match=r"preconditioned gradient of query 0 is NaN/Inf in layer 'l1'.*"
                                                 r"damping 0\b.*pass a larger damping="):
        inf.pairwise_scores(model, TASK, factors, queries, data, damping=0.0, progress=False)


def test_tiny_default_damping_is_floored_with_a_warning(fitted):
    *_, factors = fitted
    curv = factors.layers["l1"]
    tiny = inf.Factors("ekfac",
                       {**factors.layers, "l1": curv._replace(eigenvalues=np.full_like(curv.eigenvalues, 1e-38))},
                       factors.metadata)
    with pytest.warns(RuntimeWarning, match=r"layer 'l1': the default damping 0.1 × mean\(Λ\) = 1e-39 is below"):
        assert tiny.damping("l1") == DAMPING_FLOOR == np.finfo(np.float32).tiny
    assert tiny.damping("l2") == factors.damping("l2")  # the other layer keeps 0.1 × mean(Λ)
    assert tiny.damping("l1", 1e-3) == 1e-3


def test_out_of_range_query_label_is_refused_not_scored_zero(fitted):
    model, data, queries, factors = fitted
    bad = {k: v.copy() for k, v in queries.items()}
    bad["y"][2] = 10
    with pytest.raises(inf.DataError, match=r"batch 0: labels 'y' must be integers in \[0, 10\); row 2 has 10"):
        inf.pairwise_scores(model, TASK, factors, bad, data, progress=False)


def test_finite_inputs_score_as_before(fitted):
    """The checks change nothing on finite input: per-layer and total scores are still
    consistent and the ranking equals the argsort of the score matrix."""
    model, data, queries, factors = fitted
    scores = inf.pairwise_scores(model, TASK, factors, queries, data, per_layer=True, batch_size=16, progress=False)
    ranking = inf.rank_training(model, TASK, factors, queries, data, k=4, batch_size=16, progress=False)
    assert np.isfinite(scores.values).all() and (ranking.indices >= 0).all()
    np.testing.assert_array_equal(ranking.indices, np.argsort(-scores.values, axis=1, kind="stable")[:, :4])
