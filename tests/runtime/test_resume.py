"""Interrupted fits and scoring passes resume to exactly the uninterrupted results."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

import influence as inf
import influence.scoring.blocks as blocks_module
from influence import tasks
from influence.curvature import strategies
from influence.runtime.checkpoint import CheckpointMismatch
from influence.scoring.ranking import rank_training
from influence.testing import trained_lm

BATCH = 4  # 32 training sequences: 8 batches per pass


class Interrupted(RuntimeError):
    pass


def interrupting(data, failures):
    """A callable source over ``data`` in batches of ``BATCH``; its ``c``-th call (one per
    pass over the data) raises :class:`Interrupted` before batch ``failures[c]``."""
    calls = []

    def batches():
        calls.append(1)
        fail_at = failures.get(len(calls))
        for i, lo in enumerate(range(0, len(data["input_ids"]), BATCH)):
            if i == fail_at:
                raise Interrupted(f"simulated failure in call {len(calls)} before batch {i}")
            yield {k: v[lo : lo + BATCH] for k, v in data.items()}

    return batches


@pytest.fixture(scope="module")
def lm():
    model, data, queries = trained_lm()
    task = tasks.CausalLM()
    reference = inf.fit_factors(model, task, data, strategy="ekfac", batch_size=BATCH, progress=False)
    return model, task, data, queries, reference


@pytest.fixture
def steps(monkeypatch):
    """Counts the jitted steps the fitting passes compute."""
    counts = {"steps": 0}

    def counting(step):
        def counted(*args, **kwargs):
            counts["steps"] += 1
            return step(*args, **kwargs)

        return counted

    for name, strategy in list(strategies.STRATEGIES.items()):
        passes = tuple(p._replace(step=counting(p.step)) for p in strategy.passes)
        monkeypatch.setitem(strategies.STRATEGIES, name, dataclasses.replace(strategy, passes=passes))
    return counts


def _assert_same_factors(a, b):
    for name in a.layers:
        for x, y in zip(a.layers[name], b.layers[name]):
            np.testing.assert_array_equal(x, y)


def test_fit_interrupted_in_both_passes_resumes_to_identical_factors(lm, tmp_path, steps):
    model, task, data, _, reference = lm
    # calls: 1 = covariance pass (fails before batch 5), 2 = its resumption, 3 = eigenvalue
    # pass (fails before batch 2), 4 = its resumption
    source = interrupting(data, {1: 5, 3: 2})
    def fit():
        return inf.fit_factors(model, task, source, strategy="ekfac", batch_size=BATCH,
                               progress=False, checkpoint_dir=tmp_path, checkpoint_every=3)
    with pytest.raises(Interrupted):
        fit()
    assert steps["steps"] == 5
    with pytest.raises(Interrupted):
        fit()
    assert steps["steps"] == 5 + 3 + 2
    _assert_same_factors(fit(), reference)
    assert steps["steps"] == 16  # 2 passes × 8 batches: no batch computed twice
    # a finished run resumes to the same factors without computing anything again
    _assert_same_factors(fit(), reference)
    assert steps["steps"] == 16


def test_a_lost_snapshot_falls_back_to_the_previous_one(lm, tmp_path, steps):
    """A crash can leave no snapshot of the last batches (or a torn file): the run then
    resumes from the older generation and still gets the same factors."""
    model, task, data, _, reference = lm
    source = interrupting(data, {1: 7})
    def fit():
        return inf.fit_factors(model, task, source, strategy="ekfac", batch_size=BATCH,
                               progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    with pytest.raises(Interrupted):
        fit()
    newest = max(tmp_path.glob("factors-p0-*.npz"), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(newest.read_bytes()[:100])  # torn
    _assert_same_factors(fit(), reference)
    assert steps["steps"] == 7 + 2 + 8  # batch 6 again (the older snapshot is at 6), then the rest


def test_resuming_with_other_data_or_settings_is_refused(lm, tmp_path):
    model, task, data, _, reference = lm
    def fit(source, **kw):
        return inf.fit_factors(model, task, source, strategy="ekfac", progress=False,
                               checkpoint_dir=tmp_path, checkpoint_every=2, **{"batch_size": BATCH, **kw})
    with pytest.raises(Interrupted):
        fit(interrupting(data, {1: 5}))
    changed = {k: v.copy() for k, v in data.items()}
    changed["input_ids"][3, 2] += 1  # in a batch the snapshot has read
    with pytest.raises(CheckpointMismatch, match="differ"):
        fit(changed)
    with pytest.raises(CheckpointMismatch, match="batch_size"):
        fit(data, batch_size=8)
    with pytest.raises(CheckpointMismatch, match="strategy"):
        inf.fit_factors(model, task, data, strategy="kfac", batch_size=BATCH, progress=False, checkpoint_dir=tmp_path)
    other_model = nnx.clone(model)  # same structure, other weights
    other_model.head.kernel[...] = other_model.head.kernel[...] * 1.001
    with pytest.raises(CheckpointMismatch, match="weights"):
        inf.fit_factors(other_model, task, data, strategy="ekfac", batch_size=BATCH, progress=False,
                        checkpoint_dir=tmp_path)
    _assert_same_factors(fit(data, resume=False), reference)  # afresh, replacing the snapshot


def test_scoring_passes_resume_to_identical_scores(lm, tmp_path):
    model, task, data, queries, factors = lm
    full = inf.pairwise_scores(model, task, factors, queries, data, batch_size=BATCH, progress=False, per_layer=True)
    source = interrupting(data, {1: 5})
    def score():
        return inf.pairwise_scores(model, task, factors, queries, source, batch_size=BATCH,
                                   progress=False, per_layer=True, checkpoint_dir=tmp_path, checkpoint_every=2)
    with pytest.raises(Interrupted):
        score()
    resumed = score()
    np.testing.assert_array_equal(resumed.values, full.values)
    for name in full.per_layer:
        np.testing.assert_array_equal(resumed.per_layer[name], full.per_layer[name])

    self_full = inf.self_scores(model, task, factors, data, batch_size=BATCH, progress=False)
    source = interrupting(data, {1: 3})
    def self_score():
        return inf.self_scores(model, task, factors, source, batch_size=BATCH,
                               progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    with pytest.raises(Interrupted):
        self_score()
    np.testing.assert_array_equal(self_score().values, self_full.values)


def test_ranking_resumes_with_its_top_k_and_score_file(lm, tmp_path, monkeypatch):
    model, task, data, queries, factors = lm
    full = rank_training(model, task, factors, queries, data, k=4, batch_size=BATCH, progress=False,
                         scores_path=tmp_path / "full.npy")
    def rank():
        return rank_training(model, task, factors, queries, data, k=4, batch_size=BATCH,
                             progress=False, scores_path=tmp_path / "all.npy", checkpoint_dir=tmp_path / "ckpt",
                             checkpoint_every=2)
    # The score file needs a training set of known size (a dict here), so the failure is
    # injected inside the loop instead of in the data: at the sixth batch, before scoring it.
    calls = []
    original = blocks_module.candidate_mask

    def failing(*args):
        calls.append(1)
        if len(calls) == 6:
            raise Interrupted("simulated failure while ranking")
        return original(*args)

    monkeypatch.setattr(blocks_module, "candidate_mask", failing)
    with pytest.raises(Interrupted):
        rank()
    assert not (tmp_path / "all.npy").exists()  # only the partial file, kept for the resumption
    resumed = rank()
    assert len(calls) == 6 + 3  # batches 5, 6, 7: nothing before the interruption is computed again
    np.testing.assert_array_equal(resumed.indices, full.indices)
    np.testing.assert_array_equal(resumed.scores, full.scores)
    np.testing.assert_array_equal(np.load(tmp_path / "all.npy"), np.load(tmp_path / "full.npy"))
