"""Per-host shards, parts and their merge, in one process (the two-process run with
jax.distributed is tests/test_multihost.py, marked slow)."""

import datasets
import numpy as np
import pytest

import influence as inf
from influence import tasks
from influence.runtime import io
from influence.runtime.data import DataError
from influence.scoring.ranking import rank_training
from influence.testing import trained_mlp


def test_host_rows_tile_the_data():
    for n, hosts in ((10, 3), (7, 7), (256, 4)):
        blocks = [inf.hosts.host_rows(n, i, hosts) for i in range(hosts)]
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        sizes = [hi - lo for lo, hi in blocks]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(DataError, match="at least one"):
        inf.hosts.host_rows(2, 0, 3)
    with pytest.raises(ValueError, match="process_index"):
        inf.hosts.host_rows(10, 3, 3)
    data = {"x": np.arange(10)}
    part, offset = inf.hosts.host_shard(data, 1, 3)
    np.testing.assert_array_equal(part["x"], np.arange(4, 7))
    assert offset == 4
    ds_part, ds_offset = inf.hosts.host_shard(datasets.Dataset.from_dict(data), 2, 3)
    assert ds_offset == 7 and list(ds_part["x"]) == [7, 8, 9]


def test_merged_host_parts_equal_one_run_on_all_the_data(tmp_path):
    model, data, queries = trained_mlp()
    task = tasks.Classification()
    factors = inf.fit_factors(model, task, data, strategy="kfac", fisher="exact", progress=False)
    full = rank_training(model, task, factors, queries, data, k=7, batch_size=16, progress=False)
    pairwise = inf.pairwise_scores(model, task, factors, queries, data, batch_size=16, progress=False)
    hosts = 3
    for i in range(hosts):
        part, offset = inf.hosts.host_shard(data, i, hosts)
        ranking = rank_training(model, task, factors, queries, part, k=7, batch_size=16, progress=False,
                                scores_path=tmp_path / f"all-{i}.npy")
        inf.hosts.save_ranking_part(tmp_path / "parts", ranking, offset, scores_file=tmp_path / f"all-{i}.npy",
                                    process_index=i)
        scores = inf.pairwise_scores(model, task, factors, queries, part, batch_size=16, progress=False)
        inf.hosts.save_scores_part(tmp_path / "score-parts", scores, offset, process_index=i)
    indices, top = inf.hosts.merge_rankings(tmp_path / "parts", out=tmp_path / "topk.npz",
                                            scores_path=tmp_path / "all.npy")
    np.testing.assert_array_equal(indices, full.indices)
    np.testing.assert_array_equal(top, full.scores)
    np.testing.assert_array_equal(np.load(tmp_path / "all.npy"), pairwise.values)
    arrays, meta = io.load_arrays(tmp_path / "topk.npz", "influence-topk")
    np.testing.assert_array_equal(arrays["indices"], full.indices)
    assert meta["n_train"] == len(data["x"]) and meta["parts"] == hosts
    merged = inf.hosts.merge_scores(tmp_path / "score-parts")
    np.testing.assert_array_equal(merged.values, pairwise.values)
    few, _ = inf.hosts.merge_rankings(tmp_path / "parts", k=3)
    np.testing.assert_array_equal(few, full.indices[:, :3])

    # A host's score file of the wrong shape: no merged file appears, not even half-written.
    np.save(tmp_path / "all-1.npy", np.zeros((1, 1), np.float32))
    with pytest.raises(DataError, match="holds scores of shape"):
        inf.hosts.merge_rankings(tmp_path / "parts", scores_path=tmp_path / "again.npy")
    assert not list(tmp_path.glob("*again.npy*"))

    (tmp_path / "parts" / "part-00001.npz").unlink()
    with pytest.raises(DataError, match="do not tile"):
        inf.hosts.merge_rankings(tmp_path / "parts")


def test_merging_top_k_lists_ties_and_resumed_slots():
    from influence.scoring.blocks import restore_best as _restore_best
    from influence.scoring.topk import merge_slots

    # two slots (devices or hosts), 1 query, k = 3; equal scores go to the lower row
    scores = np.array([[[5.0, 2.0, -np.inf]], [[5.0, 4.0, 2.0]]], np.float32)
    rows = np.array([[[9, 1, -1]], [[3, 7, 0]]])
    idx, top = merge_slots(scores, rows, 4)
    np.testing.assert_array_equal(idx, [[3, 9, 7, 0]])
    np.testing.assert_array_equal(top, [[5, 5, 4, 2]])
    # a snapshot from 2 devices resumed on 3, with one real query padded to 2
    s, i = _restore_best(scores, rows, 3, 1, 2)
    assert s.shape == i.shape == (3, 2, 3)
    np.testing.assert_array_equal(i[0, 0], [3, 9, 7])
    assert np.all(np.isneginf(s[1:])) and np.all(i[1:] == -1) and np.all(i[:, 1] == -1)
