"""The gradient index against the rescan, against its own numpy reconstruction, and
through its file format: resume, append, refusals, torn shards, host parts."""

import json

import numpy as np
import pytest
from flax import nnx

import influence as inf
from influence import tasks
from influence.curvature.layer import rotate
from influence.index import Compression, Index, open_parts
from influence.index.compress import decode_numpy, reconstruct
from influence.reference.exact import per_example_gradients, unflatten
from influence.testing import trained_lm

QUIET = {"progress": False}


def _close(x, y, rtol=2e-5):
    """Equal to float32 rounding, relative to the largest score (a missing damping, a
    transposed rotation or a dropped layer is off by far more)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(np.abs(y).max(), 1e-30)
    assert np.abs(x - y).max() <= rtol * scale, (np.abs(x - y).max(), scale)


def _same_ranking(ranking, reference, rtol=2e-5):
    """Same top-k values; same rows wherever the neighbouring scores are not float-rounding ties."""
    _close(ranking.values, reference.values, rtol)
    scale = np.abs(reference.values).max()
    ties = np.abs(np.diff(reference.values, axis=1)) <= rtol * scale
    tie_free = ~(np.pad(ties, ((0, 0), (0, 1))) | np.pad(ties, ((0, 0), (1, 0))))
    tie_free[:, -1] = False  # the k-th row may tie with the unseen (k+1)-th; its value is checked above
    np.testing.assert_array_equal(ranking.indices[tie_free], reference.indices[tie_free])


@pytest.fixture(scope="module")
def lm():
    model, data, queries = trained_lm()
    task = tasks.CausalLM()
    factors = inf.fit_factors(model, task, data, strategy="ekfac", batch_size=8, **QUIET)
    return model, task, factors, data, queries


# The sequence case under -m slow: by default, tests/index/test_cli.py holds an LM's
# uncompressed index to the rescan (top-10 overlap 1.00) at a fraction of the time.
@pytest.mark.parametrize("setting", ["mlp", pytest.param("lm", marks=pytest.mark.slow)])
def test_uncompressed_index_scores_as_the_rescan(setting, request, tmp_path):
    model, task, factors, data, queries = request.getfixturevalue(setting)
    index = inf.build_index(model, task, factors, data, path=tmp_path / "index", compression="none", batch_size=8,
                            shard_rows=20, **QUIET)
    assert index.n_rows == len(next(iter(data.values())))
    for damping in (None, 1e-3) if setting == "mlp" else (None,):  # chosen at query time, from the same index
        rescan = inf.pairwise_scores(model, task, factors, queries, data, damping=damping, per_layer=True,
                                     batch_size=8, **QUIET)
        answered = inf.pairwise_scores(model, task, factors, queries, data, damping=damping, per_layer=True,
                                       index=index, batch_size=8, **QUIET)
        _close(answered.values, rescan.values)
        assert answered.per_layer.keys() == rescan.per_layer.keys()
        for name in rescan.per_layer:
            _close(answered.per_layer[name], rescan.per_layer[name])
        assert answered.metadata["damping"] == rescan.metadata["damping"]
        assert answered.metadata["index"]["data_checked"]
    if setting == "mlp":  # the LM's rankings: test_candidates_scores_file_and_refusals_on_the_index_path
        ranked = inf.rank_training(model, task, factors, queries, data, k=5, batch_size=8, **QUIET)
        from_index = inf.rank_training(model, task, factors, queries, data, k=5, index=tmp_path / "index",
                                       batch_size=8, **QUIET)
        _same_ranking(from_index, ranked)
        assert from_index.n_train == ranked.n_train
    else:  # rank-r query batching: the same low-rank queries, from the index
        rescan = inf.pairwise_scores(model, task, factors, queries, data, query_rank=2, batch_size=8, **QUIET)
        answered = inf.pairwise_scores(model, task, factors, queries, None, query_rank=2, index=index, **QUIET)
        _close(answered.values, rescan.values)
        assert not answered.metadata["index"]["data_checked"]


def test_rank_one_is_exact_for_one_token_per_example(mlp, tmp_path):
    """An MLP's DW_n = ā gᵀ has rank 1 (and the rank option's whitening is separable), so
    rank:1 stores it exactly: the rescan's scores, at (d_a + d_out) numbers per layer."""
    model, task, factors, data, queries = mlp
    index = inf.build_index(model, task, factors, data, path=tmp_path / "i", compression="rank:1", batch_size=32,
                            **QUIET)
    rescan = inf.pairwise_scores(model, task, factors, queries, data, batch_size=32, **QUIET)
    _close(inf.pairwise_scores(model, task, factors, queries, data, index=index, **QUIET).values, rescan.values, 1e-4)
    assert index.bytes_per_sequence == 4 * sum(i.d_a + i.d_out for i in factors.layer_infos)
    # rank:c stores min(c, T, d_a, d_out) columns: with T = 1 token, rank:5 is rank:1 (no zero columns)
    wide = inf.build_index(model, task, factors, data, path=tmp_path / "w", compression="rank:5", batch_size=32,
                           **QUIET)
    assert [la["rank"] for la in wide.layers] == [1] * len(wide.layers)
    assert wide.bytes_per_sequence == index.bytes_per_sequence
    np.testing.assert_array_equal(inf.pairwise_scores(model, task, factors, queries, None, index=wide, **QUIET).values,
                                  inf.pairwise_scores(model, task, factors, queries, None, index=index, **QUIET).values)


def test_stored_rows_are_the_gradients_in_the_eigenbasis(mlp, tmp_path):
    """Row n of layer l is Q_Aᵀ DW_n Q_S, with DW_n the example's loss gradient by jax.grad."""
    model, task, factors, data, _ = mlp
    index = inf.build_index(model, task, factors, data, path=tmp_path / "i", compression="none", batch_size=32,
                            **QUIET)
    tracked = inf.track(model, list(factors.layer_names))
    grads = per_example_gradients(model, task, data, layers=list(factors.layer_names))  # [N, P]
    per_layer = [unflatten(tracked, g) for g in grads]
    (shard,) = index.shards
    for (stored, _), layer in zip(index.layer_arrays(shard), index.layers):
        curv = factors.layers[layer["name"]]
        dw = np.stack([g[layer["name"]] for g in per_layer])
        expected = np.asarray(rotate(dw, curv.q_a, curv.q_s)).reshape(len(dw), -1)
        _close(stored, expected, 1e-5)


@pytest.mark.parametrize("compression", ["truncate:0.5", "project:0.5:int8", "truncate:0.75:int8",
                                         "none:bfloat16", "rank:2", "rank:3:bfloat16", "select:0.3",
                                         "select:0.5:int4", "none:int4", "rank:3:int4",
                                         pytest.param("sketch:0.25:int8", marks=pytest.mark.slow)])
def test_compressed_index_scores_its_own_reconstruction(compression, lm, tmp_path):
    """Scores = ⟨Q_Aᵀ P_q Q_S, M_A C_n M_Sᵀ⟩, computed here in numpy from the stored rows."""
    model, task, factors, data, queries = lm
    index = inf.build_index(model, task, factors, data, path=tmp_path / "i", compression=compression, batch_size=8,
                            shard_rows=12, **QUIET)
    assert index.compression == Compression.parse(compression)
    ranking = inf.rank_training(model, task, factors, queries, data, k=3, index=index, **QUIET)
    scores = inf.pairwise_scores(model, task, factors, queries, data, index=index, per_layer=True, **QUIET)
    expected = 0
    for i, layer in enumerate(index.layers):
        name = layer["name"]
        stored = np.concatenate([decode_numpy(*index.layer_arrays(s)[i], index.compression.dtype, layer["width"])
                                 for s in index.shards])
        dense = reconstruct(stored, index.maps[name], layer["d_a"], layer["d_out"], layer["rank"])  # [N, d_a, d_out]
        curv = factors.layers[name]
        p = np.asarray(ranking.queries[name].dense(), np.float64)
        rotated = np.einsum("ia,qij,jb->qab", np.asarray(curv.q_a, np.float64), p, np.asarray(curv.q_s, np.float64))
        layer_scores = np.einsum("qab,nab->qn", rotated, dense)
        _close(scores.per_layer[name], layer_scores, 1e-4)
        expected = expected + layer_scores
    _close(scores.values, expected, 1e-4)
    # The top 3 by the reconstruction (compared by value: float32 and float64 may order near-ties differently).
    picked = -np.sort(-np.take_along_axis(expected, np.asarray(ranking.indices), axis=1), axis=1)
    best = -np.sort(-expected, axis=1)[:, :3]
    np.testing.assert_allclose(picked, best, rtol=0, atol=1e-4 * np.abs(expected).max())
    assert index.bytes_per_sequence < Index(tmp_path / "i").bytes_per_sequence + 1  # reopens
    full = sum(layer["d_a"] * layer["d_out"] for layer in index.layers) * 4
    assert index.bytes_per_sequence < full


class Interrupted(RuntimeError):
    pass


def _interrupting(data, fail_at, batch):
    calls = []

    def batches():
        calls.append(1)
        for i, lo in enumerate(range(0, len(data["input_ids"]), batch)):
            if len(calls) == 1 and i == fail_at:
                raise Interrupted(f"simulated failure before batch {i}")
            yield {k: v[lo:lo + batch] for k, v in data.items()}

    return batches


def _shard_bytes(index):
    return [(index.path / f["file"]).read_bytes() for s in index.shards for f in s["files"]]


@pytest.mark.parametrize("own_checkpoint", [True, False])
def test_an_interrupted_build_resumes_to_identical_shards(own_checkpoint, lm, tmp_path):
    model, task, factors, data, _ = lm
    reference = inf.build_index(model, task, factors, data, path=tmp_path / "ref", compression="truncate:0.5:int8",
                                batch_size=4, shard_rows=6, **QUIET)
    source = _interrupting(data, 5, 4)
    extra = {} if own_checkpoint else {"checkpoint_dir": tmp_path / "ckpt"}

    def build():
        return inf.build_index(model, task, factors, source, path=tmp_path / "index", compression="truncate:0.5:int8",
                               batch_size=4, shard_rows=6, checkpoint_every=2, **extra, **QUIET)

    with pytest.raises(Interrupted):
        build()
    assert not (tmp_path / "index" / "manifest.json").exists()  # not an index until it is complete
    with pytest.raises(inf.FileFormatError, match="resume"):
        Index(tmp_path / "index")
    resumed = build()
    assert [s["rows"] for s in resumed.shards] == [s["rows"] for s in reference.shards]
    assert _shard_bytes(resumed) == _shard_bytes(reference)
    assert resumed.manifest["data"] == reference.manifest["data"]
    assert not (tmp_path / "index" / ".build").exists()


def test_appended_sequences_score_as_in_a_fresh_build(lm, tmp_path):
    model, task, factors, data, queries = lm
    first = {k: v[:20] for k, v in data.items()}
    rest = {k: v[20:] for k, v in data.items()}
    fresh = inf.build_index(model, task, factors, data, path=tmp_path / "fresh", compression="project:0.5",
                            batch_size=8, shard_rows=8, **QUIET)
    inf.build_index(model, task, factors, first, path=tmp_path / "grown", compression="project:0.5", batch_size=8,
                    shard_rows=8, **QUIET)
    with pytest.raises(inf.InfluenceError, match="exists"):
        inf.build_index(model, task, factors, rest, path=tmp_path / "grown", **QUIET)
    grown = inf.build_index(model, task, factors, rest, path=tmp_path / "grown", append=True, batch_size=8,
                            shard_rows=8, **QUIET)
    assert grown.n_rows == fresh.n_rows and len(grown.manifest["segments"]) == 2
    for (a, _), (b, _) in zip(_all_rows(grown), _all_rows(fresh)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(inf.DataError, match="holds 32 training rows, the data has 20"):  # the first rows only
        inf.pairwise_scores(model, task, factors, queries, first, index=tmp_path / "grown", **QUIET)
    a = inf.pairwise_scores(model, task, factors, queries, data, index=grown, **QUIET)
    b = inf.pairwise_scores(model, task, factors, queries, data, index=fresh, **QUIET)
    _close(a.values, b.values, 1e-6)


def _all_rows(index):
    per_layer = [[] for _ in index.layers]
    for shard in index.shards:
        for i, (d, _) in enumerate(index.layer_arrays(shard)):
            per_layer[i].append(np.asarray(d))
    return [(np.concatenate(rows), None) for rows in per_layer]


def test_another_model_factors_task_or_data_is_refused_saying_which(mlp, tmp_path):
    model, task, factors, data, queries = mlp
    index = inf.build_index(model, task, factors, data, path=tmp_path / "i", batch_size=32, **QUIET)
    other = nnx.clone(model)
    other.l2.kernel[...] = other.l2.kernel[...] * 1.01
    with pytest.raises(inf.ModelMismatch, match="the model's weights"):
        inf.pairwise_scores(other, task, factors, queries, data, index=index, **QUIET)
    kfac = inf.fit_factors(model, task, data, strategy="kfac", batch_size=32, **QUIET)
    with pytest.raises(inf.InfluenceError, match="differs in the factors"):
        inf.rank_training(model, task, kfac, queries, data, index=index, **QUIET)
    with pytest.raises(inf.InfluenceError, match="the task"):
        inf.pairwise_scores(model, tasks.Classification(measurement_kind="margin"), factors, queries, data,
                            index=index, **QUIET)
    changed = {k: v.copy() for k, v in data.items()}
    changed["x"][40] += 0.5
    with pytest.raises(inf.DataError, match="rows 0..95 differ"):
        inf.pairwise_scores(model, task, factors, queries, changed, index=index, **QUIET)
    with pytest.raises(inf.InfluenceError, match="differs in the factors"):
        inf.build_index(model, task, kfac, data, path=tmp_path / "i", append=True, **QUIET)


def test_a_torn_shard_is_detected(mlp, tmp_path):
    model, task, factors, data, queries = mlp
    index = inf.build_index(model, task, factors, data, path=tmp_path / "i", batch_size=32, shard_rows=40, **QUIET)
    entry = index.shards[1]["files"][0]
    file = tmp_path / "i" / entry["file"]
    file.write_bytes(file.read_bytes()[:-7])
    with pytest.raises(inf.FileFormatError, match="torn or truncated"):
        inf.pairwise_scores(model, task, factors, queries, data, index=tmp_path / "i", **QUIET)
    # same size, other bytes: found by verify (reading every byte)
    index = inf.build_index(model, task, factors, data, path=tmp_path / "i", overwrite=True, batch_size=32,
                            shard_rows=40, **QUIET)
    raw = bytearray(file.read_bytes())
    raw[-1] ^= 0xFF
    file.write_bytes(bytes(raw))
    with pytest.raises(inf.FileFormatError, match="checksum"):
        Index(tmp_path / "i").verify()
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert manifest["built_from"]["strategy"] == "ekfac"


def test_host_parts_merge_to_the_single_index_ranking(lm, tmp_path):
    """Two hosts build disjoint row ranges (row_offset); queries over both parts give
    the one-index top-k exactly, and the scores side by side."""
    model, task, factors, data, queries = lm
    whole = inf.build_index(model, task, factors, data, path=tmp_path / "whole", compression="truncate:0.5",
                            batch_size=8, **QUIET)
    for host, (lo, hi) in enumerate([(0, 13), (13, 32)]):
        part = {k: v[lo:hi] for k, v in data.items()}
        inf.build_index(model, task, factors, part, path=tmp_path / "parts" / f"part-{host:05d}",
                        compression="truncate:0.5", row_offset=lo, batch_size=8, **QUIET)
    parts = open_parts(tmp_path / "parts")
    assert [p.row_offset for p in parts] == [0, 13]
    single = inf.rank_training(model, task, factors, queries, data, k=6, index=whole, **QUIET)
    merged = inf.rank_training(model, task, factors, queries, data, k=6, index=tmp_path / "parts", **QUIET)
    _same_ranking(merged, single, 1e-6)
    a = inf.pairwise_scores(model, task, factors, queries, data, index=parts, **QUIET)
    b = inf.pairwise_scores(model, task, factors, queries, data, index=whole, **QUIET)
    _close(a.values, b.values, 1e-6)
    with pytest.raises(inf.DataError, match="do not tile"):
        open_parts([parts[1]])


def test_candidates_scores_file_and_refusals_on_the_index_path(lm, tmp_path):
    model, task, factors, data, queries = lm
    index = inf.build_index(model, task, factors, data, path=tmp_path / "i", compression="none", batch_size=8,
                            shard_rows=10, **QUIET)
    rng = np.random.default_rng(0)
    candidates = [np.sort(rng.choice(32, 7, replace=False)) for _ in range(len(queries["input_ids"]))]
    rescan = inf.rank_training(model, task, factors, queries, data, k=4, candidates=candidates,
                               scores_path=tmp_path / "rescan.npy", batch_size=8, **QUIET)
    answered = inf.rank_training(model, task, factors, queries, data, k=4, candidates=candidates,
                                 scores_path=tmp_path / "index.npy", index=index, **QUIET)
    _same_ranking(answered, rescan)
    a, b = np.load(tmp_path / "index.npy"), np.load(tmp_path / "rescan.npy")
    np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
    _close(np.where(np.isfinite(a), a, 0), np.where(np.isfinite(b), b, 0))
    with pytest.raises(inf.InfluenceError, match="per_token"):
        inf.pairwise_scores(model, task, factors, queries, data, per_token=True, index=index, **QUIET)
    with pytest.raises(ValueError, match="method"):
        Compression.parse("svd:0.5")
    with pytest.raises(ValueError, match="fraction"):
        Compression.parse("truncate:1.5")
    identity = inf.fit_factors(model, task, data, strategy="identity", batch_size=8, **QUIET)
    for compression in ("truncate:0.5", "select:0.5:int4"):
        with pytest.raises(inf.InfluenceError, match="no eigenvalues"):
            inf.build_index(model, task, identity, data, path=tmp_path / "id", compression=compression, **QUIET)


@pytest.mark.parametrize("tokens", [2, 5, 12])  # T ≤ c (tokens are the factors), T < d (QR core), T ≥ d (SVD)
def test_rank_factors_are_the_best_rank_c_approximation(tokens):
    from influence.index.compress import rank_factors

    rng = np.random.default_rng(tokens)
    left, right = rng.standard_normal((3, tokens, 9)), rng.standard_normal((3, tokens, 7))
    u, v = rank_factors(left, right, 3)
    assert u.shape == (3, 9, 3) and v.shape == (3, 7, 3)
    for b in range(3):
        x = left[b].T @ right[b]
        su, s, svt = np.linalg.svd(x)
        best = (su[:, :3] * s[:3]) @ svt[:3]
        _close(u[b] @ v[b].T, best, 1e-10)
        np.testing.assert_allclose(np.linalg.norm(u[b], axis=0), np.linalg.norm(v[b], axis=0))


def test_selection_keeps_the_coordinates_of_largest_whitened_variance_across_layers(lm, tmp_path):
    """select:1 keeps every coordinate (the rescan's scores); select:f keeps round(f·P) of
    the P tracked coordinates, every kept one of whitened variance Λ/(Λ + λ₀) at least that
    of every dropped one in any layer, and stores its whitened value G̃ / sqrt(Λ + λ₀)."""
    model, task, factors, data, queries = lm
    rescan = inf.pairwise_scores(model, task, factors, queries, data, batch_size=8, **QUIET)
    every = inf.build_index(model, task, factors, data, path=tmp_path / "all", compression="select:1", batch_size=8,
                            **QUIET)
    _close(inf.pairwise_scores(model, task, factors, queries, None, index=every, **QUIET).values, rescan.values)
    low_rank = inf.pairwise_scores(model, task, factors, queries, data, query_rank=2, batch_size=8, **QUIET)
    _close(inf.pairwise_scores(model, task, factors, queries, None, query_rank=2, index=every, **QUIET).values,
           low_rank.values)  # rank-r query batching answered from a selection
    index = inf.build_index(model, task, factors, data, path=tmp_path / "sel", compression="select:0.3:int4",
                            batch_size=8, **QUIET)
    total = sum(layer["d_a"] * layer["d_out"] for layer in index.layers)
    assert sum(layer["width"] for layer in index.layers) == round(0.3 * total)
    assert index.bytes_per_sequence == sum(-(-layer["width"] // 2) + 4 for layer in index.layers)
    kept, dropped, shares = [], [], []
    for layer in index.layers:
        lam = np.asarray(factors.layers[layer["name"]].eigenvalues, np.float64).ravel()
        variance = lam / (lam + 0.1 * lam.mean())
        mask = np.zeros(lam.size, bool)
        mask[index.maps[layer["name"]]["keep"]] = True
        assert 0 < mask.sum() < lam.size
        kept.append(variance[mask].min())
        dropped.append(variance[~mask].max())
        shares.append(mask.mean())
        np.testing.assert_allclose(index.maps[layer["name"]]["w"], np.sqrt(lam + 0.1 * lam.mean())[mask], rtol=1e-6)
    assert min(kept) >= max(dropped)
    assert max(shares) - min(shares) > 0.05, shares  # one threshold across layers, not a per-layer quota
    ((stored, _), *_), first = index.layer_arrays(index.shards[0]), index.layers[0]
    assert stored.dtype == np.uint8 and stored.shape[1] == -(-first["width"] // 2)
    assert str(Compression.parse("select:0.3:int4")) == "select:0.3:int4"
