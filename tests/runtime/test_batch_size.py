"""The batch size the library chooses when none is given (``Execution(batch_size=None)``).

It is derived from the memory budget and what one example costs a step; it is recorded
in the results' metadata, and it changes results only by float rounding.
"""

import numpy as np
import pytest

import influence as inf
from influence.capture.objectives import STEP_MEMORY_FACTOR, bytes_per_example
from influence.capture.tracking import track
from influence.runtime.execution import FALLBACK_BATCH, MAX_AUTO_BATCH, Execution, auto_batch_size
from influence.testing import trained_mlp


@pytest.mark.parametrize("budget,per_example,n,multiple,expected", [
    (1000, 10, None, 1, 100),  # what the budget holds
    (10**12, 10, None, 1, MAX_AUTO_BATCH),  # capped
    (10**12, 10, 1536, 1, 768),  # 1536 rows: two batches of 768, no padding (not 1024 + 512 + 512 padding)
    (10**12, 10, 100, 1, 100),  # a small set: one batch, unpadded
    (10**12, 10, 100, 8, 104),  # ... rounded up to split over 8 devices
    (1000, 10, None, 8, 96),  # a multiple of the devices, within the budget
    (5, 10, None, 4, 4),  # at least one row per device, even over budget
])
def test_auto_batch_size_fills_the_budget_and_evens_out_the_batches(budget, per_example, n, multiple, expected):
    assert auto_batch_size(budget, per_example, n, multiple) == expected


def test_execution_checks_the_batch_size_and_the_memory_budget():
    assert Execution().batch_size is None
    assert Execution(memory_budget=2**20).budget_bytes() == 2**20
    assert Execution(memory_budget=0.5).budget_bytes() > 0
    for bad in (0, -1, 1.5, 0.0, True, "1GB"):
        with pytest.raises(ValueError, match="memory_budget"):
            Execution(memory_budget=bad)
    with pytest.raises(ValueError, match="batch_size must be a positive integer or None"):
        Execution(batch_size=0)


def test_bytes_per_example_counts_the_captured_layers():
    model, data, _ = trained_mlp()
    task = inf.tasks.Classification()
    tracked = track(model, None)
    row = {k: v[:1] for k, v in data.items()}
    floats = sum(info.d_a + info.d_out for info in tracked.layers)  # one token per example
    got = bytes_per_example(tracked.graphdef, tracked.state, tracked.layers, task, "empirical", row)
    assert got == 4 * STEP_MEMORY_FACTOR * floats
    with_gradients = bytes_per_example(tracked.graphdef, tracked.state, tracked.layers, task, "measurement", row,
                                       per_example_gradients=True)
    assert with_gradients == got + 4 * sum(info.d_a * info.d_out for info in tracked.layers)


def test_the_chosen_batch_size_is_recorded_and_changes_results_only_by_rounding(monkeypatch):
    model, data, query_data = trained_mlp()
    task = inf.tasks.Classification()
    train = {k: v[:200] for k, v in data.items()}
    queries = {k: v[:10] for k, v in query_data.items()}
    chosen = inf.fit_factors(model, task, train, progress=False)
    fixed = inf.fit_factors(model, task, train, progress=False, batch_size=7)
    assert chosen.metadata["batch_size"] == 200 and fixed.metadata["batch_size"] == 7  # 200 rows fit one batch
    scores = inf.pairwise_scores(model, task, chosen, queries, train, progress=False)
    reference = inf.pairwise_scores(model, task, fixed, queries, train, progress=False, batch_size=7)
    assert scores.metadata["batch_size"] == 200
    # factors fitted in one batch or in 29 (sampled targets are keyed per example), scored alike
    np.testing.assert_allclose(scores.values, reference.values, rtol=1e-3, atol=1e-4 * np.abs(reference.values).max())
    # scoring batches no larger than the contraction's chunk: 20 rows of the first layer's
    # factored form (10 queries × d_a 65 floats a row) at this chunk size
    from influence.scoring import contractions

    monkeypatch.setattr(contractions, "CONTRACTION_CHUNK_ELEMENTS", 10 * 65 * 20)
    capped = inf.pairwise_scores(model, task, chosen, queries, train, progress=False)
    assert capped.metadata["batch_size"] == 20
    np.testing.assert_allclose(capped.values, scores.values, rtol=1e-4, atol=1e-5 * np.abs(scores.values).max())
    monkeypatch.undo()
    # a budget of 40 examples: five batches of 40
    tracked = track(model, None)
    per_example = bytes_per_example(tracked.graphdef, tracked.state, tracked.layers, task, "empirical",
                                    {k: v[:1] for k, v in train.items()})
    small = inf.self_scores(model, task, fixed, train, progress=False, memory_budget=40 * per_example)
    assert small.metadata["batch_size"] == 40
    np.testing.assert_allclose(small.values, inf.self_scores(model, task, fixed, train, progress=False,
                                                             batch_size=7).values, rtol=1e-4)
    # a one-shot iterator cannot be looked at first: the fallback size
    one_shot = iter([{k: v[i:i + 50] for k, v in train.items()} for i in range(0, 200, 50)])
    assert inf.fit_factors(model, task, one_shot, strategy="kfac", progress=False).metadata["batch_size"] \
        == FALLBACK_BATCH
