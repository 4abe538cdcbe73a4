"""Batching of the accepted data forms, and the errors for bad data."""

import datasets
import numpy as np
import pytest

import influence as inf
from influence import tasks
from influence.runtime.data import DataError, DataSource
from influence.testing import trained_mlp


def _rows(source):
    out = {}
    for batch in source:
        for k, v in batch.arrays.items():
            out.setdefault(k, []).append(v[: batch.n_valid])
    return {k: np.concatenate(v) for k, v in out.items()}


def test_dict_is_batched_and_padded():
    data = {"x": np.arange(10, dtype=np.float32)[:, None], "y": np.arange(10)}
    batches = list(DataSource(data, 4))
    assert [b.n_valid for b in batches] == [4, 4, 2] and [b.start for b in batches] == [0, 4, 8]
    assert all(b.arrays["x"].shape == (4, 1) for b in batches)
    np.testing.assert_array_equal(batches[-1].example_mask, [1, 1, 0, 0])
    np.testing.assert_array_equal(_rows(batches)["y"], np.arange(10))


def test_list_of_uneven_batches_is_rebatched():
    chunks = [{"x": np.full((n, 2), i, np.float32)} for i, n in enumerate([3, 1, 5, 2])]
    source = DataSource(chunks, 4)
    assert source.num_examples == 11
    rows = _rows(source)["x"][:, 0]
    np.testing.assert_array_equal(rows, [0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 3])
    assert [b.n_valid for b in source] == [4, 4, 3]


def test_dataset_keeps_the_task_fields_and_ignores_string_metadata():
    ds = datasets.Dataset.from_dict({
        "input_ids": [[1, 2, 3, 4]] * 5, "loss_mask": [[0, 1, 1, 1]] * 5, "play": ["Hamlet"] * 5,
    })
    source = DataSource(ds, 2, ("input_ids",), ("loss_mask",))
    batch = next(iter(source))
    assert set(batch.arrays) == {"input_ids", "loss_mask"} and batch.arrays["input_ids"].shape == (2, 4)
    assert source.num_batches == 3


def test_callable_is_read_once_per_pass_and_iterator_only_once():
    calls = []

    def fresh():
        calls.append(1)
        return iter([{"x": np.ones((3, 2), np.float32)}])

    source = DataSource(fresh, 2)
    assert len(list(source)) == len(list(source)) == 2 and len(calls) == 2
    once = DataSource(iter([{"x": np.ones((3, 2), np.float32)}]), 2)
    assert len(list(once)) == 2
    with pytest.raises(DataError, match="one-shot iterator"):
        list(once)


def test_bad_data_gives_clear_errors():
    with pytest.raises(DataError, match="empty"):
        DataSource({"x": np.zeros((0, 3))}, 4)
    with pytest.raises(DataError, match="empty"):
        list(DataSource([], 4))
    with pytest.raises(DataError, match="different numbers of rows"):
        DataSource({"x": np.zeros((3, 2)), "y": np.zeros(4)}, 2)
    with pytest.raises(DataError, match="batch 1 does not match"):
        list(DataSource([{"x": np.zeros((2, 3))}, {"x": np.zeros((2, 4))}], 2))
    with pytest.raises(DataError, match="missing field.*'y'"):
        DataSource({"x": np.zeros((2, 3))}, 2, ("x", "y"))
    with pytest.raises(DataError, match="cannot read data of type int"):
        DataSource(5, 2)
    with pytest.raises(DataError, match="not a numeric array"):
        DataSource({"x": np.array([[1, 2], [3]], dtype=object)}, 2, ("x",))


def test_fit_and_score_accept_every_data_form_with_the_same_result():
    model, data, queries = trained_mlp()
    task = tasks.Classification()
    subset = {k: v[:40] for k, v in data.items()}
    forms = {
        "dict": subset,
        "list": [{k: v[i : i + 7] for k, v in subset.items()} for i in range(0, 40, 7)],
        "dataset": datasets.Dataset.from_dict({k: v.tolist() for k, v in subset.items()}),
        "callable": lambda: ({k: v[i : i + 9] for k, v in subset.items()} for i in range(0, 40, 9)),
    }
    results = {}
    for name, form in forms.items():
        factors = inf.fit_factors(model, task, form, strategy="ekfac", fisher="empirical", batch_size=16,
                                  progress=False)
        results[name] = inf.pairwise_scores(model, task, factors, queries, form, batch_size=16, progress=False).values
        assert results[name].shape == (len(queries["y"]), 40)
    for values in results.values():
        np.testing.assert_allclose(values, results["dict"], rtol=1e-4, atol=1e-5 * np.abs(values).max())
