"""The ``sketch`` compression (one global count-sketch, bergson-style, in the whitened
eigenbasis): an unbiased estimate of the exact score, exact at one coordinate per
bucket, and stored rows that a numpy projection built independently from the manifest's
maps reproduces."""

import jax.numpy as jnp
import numpy as np
import pytest

import influence as inf
from influence.index import Compression, Index
from influence.index.compress import LayerMap, compression_maps, decode_numpy, map_queries, map_training
from influence.reference.exact import per_example_gradients, unflatten
from influence.scoring.contractions import LayerQueries

QUIET = {"progress": False}


def _layer(maps):
    return LayerMap(None, None, None, None, w=jnp.asarray(maps["w"]), bucket=jnp.asarray(maps["bucket"]))


def test_sketch_is_an_unbiased_estimate_of_the_exact_score():
    """Over seeds, the mean of ⟨R(K ⊙ w), R(C ⊘ w)⟩ (the library's own build and query
    maps, tokens summed) is ⟨P, Σ_t a_t g_tᵀ⟩ within 5 standard errors; a missing sign on
    one side (mean 0), the whitening applied twice, or a JL scale of 1/√m would miss by
    far more. One coordinate per bucket is exact for every seed."""
    rng = np.random.default_rng(0)
    d_a, d_out, tokens, m = 6, 5, 3, 8
    a = rng.standard_normal((1, tokens, d_a))
    g = rng.standard_normal((1, tokens, d_out))
    dw = np.einsum("bti,btj->bij", a, g)
    p = dw + 0.5 * rng.standard_normal(dw.shape)  # a query correlated with the training gradient
    exact = float(np.sum(p * dw))
    lam = rng.uniform(0.1, 3.0, (d_a, d_out))  # the whitening is sqrt(Λ + λ₀)
    queries = LayerQueries(full=jnp.asarray(p, jnp.float32))
    estimates = []
    for seed in range(400):
        maps = compression_maps(Compression("sketch", m / (d_a * d_out), seed=seed), [("l", lam, d_a, d_out)])["l"]
        assert maps["bucket"].shape == (m, -(-d_a * d_out // m))
        layer = _layer(maps)
        c = map_training(jnp.asarray(a, jnp.float32), jnp.asarray(g, jnp.float32), layer)  # [1, m]
        k = map_queries(queries, layer)  # [1, m]
        estimates.append(float(np.sum(np.asarray(k, np.float64) * np.asarray(c, np.float64))))
    estimates = np.array(estimates)
    error = estimates.std(ddof=1) / np.sqrt(len(estimates))
    assert abs(estimates.mean() - exact) <= 5 * error, (estimates.mean(), exact, error)
    assert 5 * error < 0.2 * abs(exact)  # the check has power: a biased scale or sign is outside it
    assert estimates.std() > 0.05 * abs(exact)  # and it is a sketch (m < D), not the exact score
    whole = compression_maps(Compression("sketch", 1.0, seed=3), [("l", lam, d_a, d_out)])["l"]
    layer = _layer(whole)
    one = np.sum(np.asarray(map_queries(queries, layer)) * np.asarray(map_training(jnp.asarray(a, jnp.float32),
                                                                                   jnp.asarray(g, jnp.float32), layer)))
    assert abs(one - exact) <= 1e-4 * abs(exact)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("int8", marks=pytest.mark.slow)])
def test_stored_sketch_reproduces_an_independent_numpy_projection(dtype, mlp, tmp_path):
    """Rows of a reopened ``sketch:0.25`` index are R (w⁻¹ ⊙ Q_Aᵀ DW_n Q_S) with DW_n by
    jax.grad and R a dense ±1 matrix built here from the stored bucket table and signs,
    the whitening recomputed from the factors' eigenvalues; scores through the index are
    the query keys projected the same way. The maps are those the manifest's seed draws."""
    model, task, factors, data, queries = mlp
    comp = f"sketch:0.25:{dtype}"
    inf.build_index(model, task, factors, data, path=tmp_path / "i", compression=comp, batch_size=32, **QUIET)
    index = Index(tmp_path / "i")  # reopened from disk
    assert index.compression == Compression.parse(comp)
    layers = [(n, factors.layers[n].eigenvalues, la["d_a"], la["d_out"]) for n, la in
              zip(factors.layer_names, index.layers)]
    again = compression_maps(index.compression, layers)
    tracked = inf.track(model, list(factors.layer_names))
    grads = [unflatten(tracked, g) for g in per_example_gradients(model, task, data, layers=list(factors.layer_names))]
    ranking = inf.rank_training(model, task, factors, queries, None, k=3, index=index, **QUIET)
    scores = inf.pairwise_scores(model, task, factors, queries, None, index=index, per_layer=True, **QUIET)
    total, full_bytes = 0.0, 0
    for i, layer in enumerate(index.layers):
        name, d_a, d_out, m = layer["name"], layer["d_a"], layer["d_out"], layer["width"]
        np.testing.assert_array_equal(index.maps[name]["bucket"], again[name]["bucket"])
        lam = np.asarray(factors.layers[name].eigenvalues, np.float64).ravel()
        w = np.sqrt(lam + 0.1 * lam.mean())
        sign = np.sign(index.maps[name]["w"])
        np.testing.assert_allclose(np.abs(index.maps[name]["w"]), w, rtol=1e-6)
        r = np.zeros((d_a * d_out, m))  # dense projection: coordinate i → its bucket, with its sign
        for b, members in enumerate(index.maps[name]["bucket"]):
            members = members[members < d_a * d_out]
            r[members, b] = sign[members]
        assert np.all(np.abs(r).sum(axis=1) == 1) and m == round(np.asarray(index.maps[name]["bucket"]).shape[0])
        q_a, q_s = (np.asarray(x, np.float64) for x in (factors.layers[name].q_a, factors.layers[name].q_s))
        dw = np.stack([np.asarray(gr[name], np.float64) for gr in grads])
        rows = np.einsum("ia,nij,jb->nab", q_a, dw, q_s).reshape(len(dw), -1) / w @ r  # [N, m]
        stored = np.concatenate([decode_numpy(*index.layer_arrays(s)[i], dtype, m) for s in index.shards])
        tol = 2e-5 if dtype == "float32" else 1.01 / 127  # int8: half a level of the row's max, per number
        assert np.abs(stored - rows).max() <= tol * np.abs(rows).max(), np.abs(stored - rows).max()
        p = np.asarray(ranking.queries[name].dense(), np.float64)
        keys = np.einsum("ia,qij,jb->qab", q_a, p, q_s).reshape(len(p), -1) * w @ r  # [Q, m]
        layer_scores = keys @ stored.T
        scale = np.abs(layer_scores).max()
        assert np.abs(scores.per_layer[name] - layer_scores).max() <= 1e-4 * scale
        total = total + layer_scores
        full_bytes += 4 * d_a * d_out
    assert np.abs(scores.values - total).max() <= 1e-4 * np.abs(total).max()
    assert index.bytes_per_sequence <= 0.26 * full_bytes + 4 * len(index.layers)


@pytest.mark.parametrize("strategy", ["ekfac", "identity"])
def test_one_coordinate_per_bucket_scores_as_the_rescan(strategy, mlp, tmp_path):
    """``sketch:1`` has as many buckets as coordinates, one each: its index must give the
    rescan's scores (a wrong sign, whitening or bucket table would not), on EK-FAC factors
    and on identity factors (no eigenbasis: bergson's setting, raw gradients)."""
    model, task, factors, data, queries = mlp
    if strategy == "identity":
        factors = inf.fit_factors(model, task, data, strategy="identity", batch_size=32, **QUIET)
    index = inf.build_index(model, task, factors, data, path=tmp_path / "i", compression="sketch:1", batch_size=32,
                            **QUIET)
    assert all(la["width"] == la["d_a"] * la["d_out"] for la in index.layers)
    rescan = inf.pairwise_scores(model, task, factors, queries, data, batch_size=32, **QUIET).values
    answered = inf.pairwise_scores(model, task, factors, queries, None, index=index, **QUIET).values
    assert np.abs(answered - rescan).max() <= 1e-4 * np.abs(rescan).max()
