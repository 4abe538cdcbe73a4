"""Scores against direct computations: gradient dot products, dense inverses, exact influence."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.stats import pearsonr, spearmanr

import influence as inf
from influence import tasks
from influence.reference.exact import exact_scores, per_example_gradients
from influence.scoring.contractions import _lowrank_scores, layer_scores
from influence.scoring.preconditioned import LayerQueries, low_rank
from influence.testing import trained_lm, trained_mlp


def _mean_spearman(a, b):
    return float(np.mean([spearmanr(x, y)[0] for x, y in zip(a, b)]))


def _mean_pearson(a, b):
    return float(np.mean([pearsonr(x, y)[0] for x, y in zip(a, b)]))


@pytest.mark.parametrize("case", ["mlp", "lm"])
def test_identity_scores_equal_gradient_dot_products(case):
    model, data, queries = trained_mlp() if case == "mlp" else trained_lm()
    task = tasks.Classification() if case == "mlp" else tasks.CausalLM()
    factors = inf.fit_factors(model, task, data, strategy="identity", progress=False)
    scores = inf.pairwise_scores(model, task, factors, queries, data, progress=False, batch_size=7)
    expected = (per_example_gradients(model, task, queries, measurement=True)
                @ per_example_gradients(model, task, data).T)
    np.testing.assert_allclose(scores.values, expected, rtol=2e-4, atol=2e-5 * np.abs(expected).max())


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
@pytest.mark.parametrize("case", ["mlp", "lm"])  # one token per example (fast paths) and sequences
def test_per_layer_scores_sum_to_total_and_self_scores_match_pairwise(strategy, case):
    model, data, _ = trained_mlp() if case == "mlp" else trained_lm()
    task = tasks.Classification() if case == "mlp" else tasks.CausalLM()
    subset = {k: v[:10] for k, v in data.items()}
    factors = inf.fit_factors(model, task, data, strategy=strategy, progress=False)
    scores = inf.pairwise_scores(model, task, factors, subset, subset, per_layer=True, progress=False, batch_size=4)
    assert set(scores.per_layer) == set(factors.layer_names)
    np.testing.assert_allclose(sum(scores.per_layer.values()), scores.values, rtol=1e-5,
                               atol=1e-5 * np.abs(scores.values).max())
    # measurement = training loss here, so the diagonal of pairwise scores is self-influence
    self_inf = inf.self_scores(model, task, factors, subset, per_layer=True, progress=False, batch_size=3)
    total, per_layer = self_inf.values, self_inf.per_layer
    np.testing.assert_allclose(total, np.diag(scores.values), rtol=2e-4)
    for name in factors.layer_names:
        np.testing.assert_allclose(per_layer[name], np.diag(scores.per_layer[name]), rtol=2e-4, atol=1e-6 * total.max())
    assert np.all(total > 0)


@pytest.mark.parametrize("n_query,tokens", [(1, 7), (5, 1), (5, 7)])
def test_factored_and_materialised_score_forms_agree(n_query, tokens):
    """Both contraction orders of ⟨P_q, Σ_t ā_t g_tᵀ⟩ against a plain einsum."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(6, tokens, 9)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(6, tokens, 4)), jnp.float32)
    p = jnp.asarray(rng.normal(size=(n_query, 9, 4)), jnp.float32)
    expected = np.einsum("qij,bij->qb", p, np.einsum("bti,btj->bij", a, g))
    np.testing.assert_allclose(np.asarray(layer_scores(a, g, LayerQueries(full=p))), expected, rtol=1e-4, atol=1e-4)
    # a rank-4 representation of the same matrices (exact: rank <= min(9, 4)), both kernels
    lr = low_rank(p, 4)
    np.testing.assert_allclose(np.asarray(layer_scores(a, g, lr)), expected, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.asarray(_lowrank_scores(a, g, lr.left, lr.right)), expected, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.asarray(layer_scores(a, g, LayerQueries(full=lr.dense()))), expected,
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n_query,tokens", [(1, 7), (5, 1), (5, 7), (3, 2)])
@pytest.mark.parametrize("rows_per_chunk", [1, 3, 7])
def test_dense_scores_are_the_same_contracted_a_chunk_of_rows_at_a_time(n_query, tokens, rows_per_chunk, monkeypatch):
    """7 rows in chunks of 1, 3 (the last one padded) or all at once: the same scores,
    whichever form (factored or materialised) the shapes pick."""
    from influence.scoring import contractions

    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(7, tokens, 9)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(7, tokens, 4)), jnp.float32)
    p = jnp.asarray(rng.normal(size=(n_query, 9, 4)), jnp.float32)
    expected = np.einsum("qij,bij->qb", p, np.einsum("bti,btj->bij", a, g))
    per_row = max(n_query * 9 * tokens, 9 * 4)  # the larger form's intermediate: every budget below chunks it
    monkeypatch.setattr(contractions, "CONTRACTION_CHUNK_ELEMENTS", per_row * rows_per_chunk)
    got = np.asarray(contractions._dense_scores(a, g, p))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


class _OneLinear(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_kfac_is_exact_for_one_linear_layer_with_squared_loss(strategy):
    """GN = E[āāᵀ] ⊗ I exactly here, so with the exact Fisher both approximations are exact."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = rng.normal(size=(40, 3)).astype(np.float32)
    data, queries = {"x": x[:32], "y": y[:32]}, {"x": x[32:], "y": y[32:]}
    model, task = _OneLinear(nnx.Rngs(0)), tasks.Regression()
    factors = inf.fit_factors(model, task, data, strategy=strategy, fisher="exact", progress=False)
    for damping in (1e-3, 0.1):
        got = inf.pairwise_scores(model, task, factors, queries, data, damping=damping, progress=False).values
        expected = exact_scores(model, task, queries, data, damping=damping)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_ekfac_tracks_exact_influence_on_digits_mlp():
    """EK-FAC vs exact damped Gauss-Newton influence (full matrix, cross-layer terms
    included) on an MLP trained on digits. Measured (benchmarks/exact_agreement.py):
    per-query Spearman ≈ 0.4 at the default damping and ≈ 0.7 at λ = 10·mean(Λ);
    identity is far worse."""
    model, data, queries = trained_mlp()
    task = tasks.Classification()
    fits = {s: inf.fit_factors(model, task, data, strategy=s, progress=False) for s in ("identity", "kfac", "ekfac")}
    mean_lambda = float(np.mean([c.eigenvalues.mean() for c in fits["ekfac"].layers.values()]))
    # Large damping pulls every method towards the plain gradient dot product, so the
    # margin over identity is asked for only at the default damping. The bounds sit below
    # the worst of fixture seeds 0-4 (INFLUENCE_TEST_SEED; benchmarks/seed_robustness.py),
    # not at this machine's value.
    for factor, min_spearman, min_pearson, margin in ((0.1, 0.2, 0.45, 0.1), (10.0, 0.5, 0.8, 0.0)):
        damping = factor * mean_lambda
        exact = exact_scores(model, task, queries, data, damping=damping)
        got = {s: inf.pairwise_scores(model, task, f, queries, data, damping=damping, progress=False).values
               for s, f in fits.items()}
        rho = {s: _mean_spearman(v, exact) for s, v in got.items()}
        assert rho["ekfac"] > min_spearman, rho
        assert _mean_pearson(got["ekfac"], exact) > min_pearson
        assert rho["ekfac"] >= rho["kfac"] - 0.05, rho
        assert rho["ekfac"] > rho["identity"] + margin, rho


# The default damping in the default run; the large damping (where every method nears the
# identity ranking) only under -m slow, to keep the default suite's time down.
@pytest.mark.parametrize("factor,min_spearman,margin", [
    (0.1, 0.25, 0.05), pytest.param(10.0, 0.75, 0.0, marks=pytest.mark.slow)])
def test_ekfac_tracks_exact_influence_on_tiny_transformer(factor, min_spearman, margin):
    """Same comparison on a one-block transformer LM, MLP layers tracked (paper setting).
    EK-FAC is not always closer to exact influence than K-FAC here (on fixture seeds 1-4
    it trails it by up to 0.1 at the default damping), so only what holds on every seed is
    asserted: both beat identity, and EK-FAC clears bounds set below its worst seed."""
    model, data, queries = trained_lm(128, 300)
    task = tasks.CausalLM()
    fits = {s: inf.fit_factors(model, task, data, strategy=s, layers="mlp", progress=False)
            for s in ("identity", "kfac", "ekfac")}
    mean_lambda = float(np.mean([c.eigenvalues.mean() for c in fits["ekfac"].layers.values()]))
    damping = factor * mean_lambda
    exact = exact_scores(model, task, queries, data, damping=damping, layers="mlp")
    rho = {s: _mean_spearman(inf.pairwise_scores(model, task, f, queries, data, damping=damping,
                                                 progress=False).values, exact)
           for s, f in fits.items()}
    assert rho["ekfac"] > min_spearman, rho
    assert min(rho["ekfac"], rho["kfac"]) > rho["identity"] + margin, rho


def test_sign_positive_score_means_upweighting_lowers_the_query_loss():
    """Take one gradient step on a heavily weighted training example: queries whose
    loss falls are those it scored positive on (first-order, small step)."""
    model, data, queries = trained_mlp()
    task = tasks.Classification()
    factors = inf.fit_factors(model, task, data, strategy="identity", progress=False)
    scores = inf.pairwise_scores(model, task, factors, queries, data, progress=False).values
    n = int(np.argmax(np.abs(scores).max(axis=0)))
    g = per_example_gradients(model, task, {k: v[n : n + 1] for k, v in data.items()})[0]
    eps = 1e-3
    from influence.capture.tracking import track
    from influence.reference.exact import flatten, layer_weights, model_at

    tracked = track(model)
    theta = flatten(tracked, layer_weights(tracked))
    stepped = model_at(tracked, theta - eps * jnp.asarray(g, jnp.float32))  # upweighting n = a step down its gradient
    before = np.asarray(task.measurement(model, queries))
    after = np.asarray(task.measurement(stepped, queries))
    change = before - after  # > 0 where the query loss fell
    np.testing.assert_allclose(change, eps * scores[:, n], rtol=0.05, atol=1e-3 * eps * np.abs(scores[:, n]).max())
