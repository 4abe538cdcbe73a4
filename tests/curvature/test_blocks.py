"""Block-split layers and bfloat16 factors against dense references and the unsplit code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import influence as inf
from influence import tasks
from influence.capture.objectives import layer_gradients, token_weights
from influence.capture.tracking import track
from influence.curvature import blocks, precondition
from influence.reference.exact import gauss_newton, layer_slices
from influence.testing import trained_lm, trained_mlp


def _block_diagonal(q) -> np.ndarray:
    """A dense float64 matrix from a rotation (dense, or a tuple of diagonal blocks),
    orthogonalised so that float32 storage does not blur the comparison."""
    parts = q if blocks.is_blocked(q) else (q,)
    dense = scipy.linalg.block_diag(*(np.asarray(p, np.float64) for p in parts))
    u, _, vt = np.linalg.svd(dense)
    return u @ vt


def _keep_diagonal_blocks(m: np.ndarray, edges) -> np.ndarray:
    out = np.zeros_like(m)
    for s in blocks.slices(tuple(edges)):
        out[s, s] = m[s, s]
    return out


def test_bounds_and_resolution():
    assert blocks.bounds(17, 3) == (0, 6, 12, 17)
    model, _, _ = trained_lm()
    layers = track(model).layers
    split = blocks.resolve(layers, {"mlp_.*": (2, 3)}, max_block_size=20)
    by_name = {i.name: i for i in layers}
    assert split["mlp_in"] == (blocks.bounds(17, 2), blocks.bounds(32, 3))  # d_a = 16 + bias
    assert split["mlp_out"].n_a == 2 and split["mlp_out"].n_s == 3
    assert split["attn_qkv"].n_a == 1 and split["attn_qkv"].n_s == 3  # 48 outputs > 20: ceil(48/20)
    assert all(b.a[-1] == by_name[n].d_a and b.s[-1] == by_name[n].d_out for n, b in split.items())
    with pytest.raises(ValueError, match="cannot be split"):
        blocks.resolve(layers, 40)
    with pytest.raises(ValueError, match="positive"):
        blocks.resolve(layers, None, max_block_size=0)


@pytest.mark.parametrize("split", [(0, 2), (2, 0), (0, 0), (5, 2), (2, 9)])
def test_each_block_count_is_checked_on_its_own(split):
    """A zero or too large count on either side alone is refused naming the layer (a
    mutation run found ``n_a < 1 and n_s < 1`` passing the old checks: (0, 2) then failed
    later, in ``bounds``, without the layer's name)."""
    from influence.capture.kinds import LayerInfo

    layer = LayerInfo("fc", d_in=3, d_out=8, has_bias=True)  # d_a = 4
    with pytest.raises(inf.InfluenceError, match=rf"layer 'fc' \(d_a=4, d_out=8\) cannot be split into "
                                                 rf"{split[0]} × {split[1]} blocks"):
        blocks.resolve([layer], split)
    assert blocks.resolve([layer], (4, 8))["fc"] == (blocks.bounds(4, 4), blocks.bounds(8, 8))


@pytest.fixture(scope="module")
def lm():
    """The tiny transformer, its unsplit EK-FAC factors, and factors with two layers split
    (the MLP input layer 3 × 2, the attention input 2 × 5) beside unsplit ones, both with
    the empirical Fisher so that A and S can be rebuilt."""
    model, data, queries = trained_lm()
    task = tasks.CausalLM()
    dense = inf.fit_factors(model, task, data, strategy="ekfac", fisher="empirical", progress=False, batch_size=8)
    split = inf.fit_factors(model, task, data, strategy="ekfac", fisher="empirical", progress=False, batch_size=8,
                            blocks={"mlp_in": (3, 2), "attn_qkv": (2, 5)})
    return model, task, data, queries, dense, split


def test_one_block_is_the_unsplit_layer(lm):
    model, task, data, _, dense, _ = lm
    one = inf.fit_factors(model, task, data, strategy="ekfac", fisher="empirical", progress=False, batch_size=8,
                          blocks=1)
    for name in dense.layers:
        for x, y in zip(dense.layers[name], one.layers[name]):
            np.testing.assert_array_equal(x, y)
    assert "blocks" not in one.metadata


def test_kfac_blocks_precondition_with_the_block_diagonal_kronecker_inverse(lm):
    """Split factors keep the diagonal blocks of A and S: the K-FAC preconditioner is the
    inverse of T̄·blockdiag(A) ⊗ blockdiag(S) + λI, built here from explicit covariances
    (for an unsplit layer of the same model, the one block is the whole factor)."""
    model, task, data, _, _, factors = lm
    tracked = track(model)
    n = len(data["input_ids"])
    capture = jax.jit(layer_gradients, static_argnums=(0, 2, 3, 4))
    _, a, g = capture(tracked.graphdef, tracked.state, tracked.layers, task, "empirical", data, jnp.ones(n))
    rng = np.random.default_rng(0)
    assert set(factors.metadata["blocks"]) == {"mlp_in", "attn_qkv"}
    for name in factors.layer_names:
        w = np.asarray(token_weights(task, data, jnp.ones(n), a[name]), np.float64).ravel()
        aa = np.asarray(a[name], np.float64).reshape(-1, a[name].shape[-1])
        gg = np.asarray(g[name], np.float64).reshape(-1, g[name].shape[-1])
        edges = factors.metadata["blocks"].get(name, {"a": [0, aa.shape[1]], "s": [0, gg.shape[1]]})
        a_cov = _keep_diagonal_blocks((aa * w[:, None]).T @ aa / w.sum(), edges["a"])
        s_cov = _keep_diagonal_blocks((gg * w[:, None]).T @ gg / w.sum(), edges["s"])
        curv = factors.layers[name]
        q_a, q_s = (q if blocks.is_blocked(q) else (q,) for q in (curv.q_a, curv.q_s))
        assert len(q_a) == len(edges["a"]) - 1 and len(q_s) == len(edges["s"]) - 1
        tokens_per_example = w.sum() / n
        kfac = tokens_per_example * np.outer(curv.a_eigenvalues, curv.s_eigenvalues)  # K-FAC's Λ in the same basis
        lam = 0.3 * float(np.mean(kfac))
        dense = tokens_per_example * np.kron(a_cov, s_cov) + lam * np.eye(a_cov.shape[0] * s_cov.shape[0])
        v = rng.normal(size=kfac.shape)
        expected = np.linalg.solve(dense, v.ravel()).reshape(v.shape)
        with jax.enable_x64(True):
            c64 = curv._replace(q_a=tuple(np.asarray(q, np.float64) for q in q_a),
                                q_s=tuple(np.asarray(q, np.float64) for q in q_s), eigenvalues=kfac)
            got = np.asarray(precondition(jnp.asarray(v), c64, lam))
        # float32 factors: ~1e-5 agreement; a block in the wrong place is off by O(1)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())


def test_ekfac_blocks_fit_the_projected_gauss_newton_and_invert_it_exactly():
    """With the exact Fisher, Λ of a split layer is the diagonal of the exact Gauss-Newton
    block in the block-diagonal eigenbasis, and preconditioning equals the dense inverse."""
    model, data, _ = trained_mlp()
    data = {k: v[:64] for k, v in data.items()}
    task = tasks.Classification()
    factors = inf.fit_factors(model, task, data, strategy="ekfac", fisher="exact", progress=False, blocks=(3, 2))
    gn = gauss_newton(model, task, data)
    rng = np.random.default_rng(1)
    for name, sl in layer_slices(track(model)).items():
        curv = factors.layers[name]
        assert blocks.is_blocked(curv.q_a) and blocks.is_blocked(curv.q_s)
        q = np.kron(_block_diagonal(curv.q_a), _block_diagonal(curv.q_s))
        expected = np.diag(q.T @ gn[sl, sl] @ q).reshape(curv.eigenvalues.shape)
        np.testing.assert_allclose(curv.eigenvalues, expected, rtol=1e-3, atol=1e-5 * expected.max())
        lam = 0.1 * float(np.mean(curv.eigenvalues))
        dense = q @ np.diag(np.asarray(curv.eigenvalues, np.float64).ravel()) @ q.T + lam * np.eye(q.shape[0])
        v = rng.normal(size=(2,) + curv.eigenvalues.shape)
        want = np.linalg.solve(dense, v.reshape(2, -1).T).T.reshape(v.shape)
        with jax.enable_x64(True):
            edges_a, edges_s = blocks.edges_of(curv.q_a), blocks.edges_of(curv.q_s)
            qa, qs = _block_diagonal(curv.q_a), _block_diagonal(curv.q_s)
            c64 = curv._replace(q_a=tuple(qa[s, s] for s in blocks.slices(edges_a)),
                                q_s=tuple(qs[s, s] for s in blocks.slices(edges_s)),
                                eigenvalues=np.asarray(curv.eigenvalues, np.float64))
            got = np.asarray(precondition(jnp.asarray(v), c64, lam))
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_split_factors_score_save_and_load(lm, tmp_path):
    model, task, data, _, _, factors = lm
    subset = {k: v[:10] for k, v in data.items()}
    scores = inf.pairwise_scores(model, task, factors, subset, subset, progress=False, batch_size=5)
    self_inf = inf.self_scores(model, task, factors, subset, progress=False, batch_size=5)
    np.testing.assert_allclose(self_inf.values, np.diag(scores.values), rtol=2e-4)
    loaded = inf.Factors.load(factors.save(tmp_path), model=model)
    assert loaded.metadata["blocks"] == factors.metadata["blocks"]
    for name in factors.layers:
        for x, y in zip(factors.layers[name], loaded.layers[name]):
            for p, q in zip(*(b if blocks.is_blocked(b) else (b,) for b in (x, y))):
                np.testing.assert_array_equal(p, q)


def test_bfloat16_factors_stay_close_to_float32(lm, tmp_path):
    model, task, data, queries, f32, _ = lm
    bf16 = inf.fit_factors(model, task, data, strategy="ekfac", fisher="empirical", progress=False, batch_size=8,
                           factor_dtype="bfloat16")
    assert bf16.dtype == np.dtype(jnp.bfloat16) and bf16.layers["head"].q_a.dtype == jnp.bfloat16
    a = inf.pairwise_scores(model, task, f32, queries, data, progress=False, batch_size=8).values
    b = inf.pairwise_scores(model, task, bf16, queries, data, progress=False, batch_size=8).values
    # bfloat16 keeps 8 bits of mantissa (0.4% per entry); measured: scores move by 0.3%
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.01
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9999
    loaded = inf.Factors.load(bf16.save(tmp_path))
    assert loaded.dtype == bf16.dtype
    np.testing.assert_array_equal(np.asarray(loaded.layers["head"].eigenvalues, np.float32),
                                  np.asarray(bf16.layers["head"].eigenvalues, np.float32))
    with pytest.raises(ValueError, match="factor_dtype"):
        inf.fit_factors(model, task, data, strategy="kfac", progress=False, factor_dtype="float16")
