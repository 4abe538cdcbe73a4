"""Metagradients equal finite differences of actual retraining (float64), on a run with
mini-batches, AdamW on a warmup + cosine schedule, active gradient clipping and L2."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from influence import tasks
from influence.scoring.results import Scores
from influence.unrolled import mean_loss_run, metagradient_scores, metagradients, train, train_many

N, D, H, C, B, T = 12, 4, 5, 3, 4, 12


class _MLP(nnx.Module):
    def __init__(self, seed):
        rngs = nnx.Rngs(seed)
        self.l1, self.l2 = nnx.Linear(D, H, rngs=rngs), nnx.Linear(H, C, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N + 3, D))
    x[:, 0] = 0.0  # a constant-zero input, as digits' corner pixels: its weights' Adam ν stays 0
    y = rng.integers(0, C, N + 3).astype(np.int32)
    return {"x": x[:N], "y": y[:N]}, {"x": jnp.asarray(x[N:]), "y": jnp.asarray(y[N:])}


def _run(eps_root=1e-16, clip=0.05, hold_state=False, l2=1e-2):
    """The tiny run; ``hold_state`` stops the metagradient's path through the optimizer state
    (what a method that ignores Adam's moments computes)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.05, 3, T, 0.005)
    tx = optax.chain(optax.clip_by_global_norm(clip),
                     optax.adamw(schedule, b1=0.9, b2=0.95, eps_root=eps_root, weight_decay=0.1))
    if hold_state:
        inner = tx
        tx = optax.GradientTransformation(inner.init,
                                          lambda g, s, p=None: inner.update(g, jax.lax.stop_gradient(s), p))
    order = np.stack([np.random.default_rng([1, t]).permutation(N)[:B] for t in range(T)])
    train_data, queries = _data()
    return mean_loss_run(_MLP, tasks.Classification(), train_data, tx, T, weight_decay=l2, order=order,
                         dtype=jnp.float64), queries


def _measure(run):
    task = tasks.Classification()
    return lambda params, q: task.loss(run.model(params), q)


def _finite_differences(run, queries, eps=1e-4):
    """Central differences of retrained query losses in each weight, ``[Q, N]``."""
    w = np.ones((2 * N, N))
    for n in range(N):
        w[2 * n, n] += eps
        w[2 * n + 1, n] -= eps
    params = train_many(run, w, [0] * (2 * N))
    m = np.asarray(jax.vmap(lambda p: _measure(run)(p, queries))(params))  # [2N, Q]
    return ((m[0::2] - m[1::2]) / (2 * eps)).T


def _clip_is_active(run):
    """Some step's gradient norm exceeds the clipping threshold (else clipping is untested)."""
    params = run.init(0)
    batch = jax.tree.map(lambda x: x[run.steps(0)[0]], run.data)
    g = jax.jit(jax.grad(run.objective))(params, batch, jnp.ones(B))
    return float(optax.tree.norm(g)) > 0.05


def test_metagradients_equal_finite_differences_of_retraining():
    with jax.enable_x64(True):
        run, queries = _run()
        assert _clip_is_active(run)
        scores = metagradient_scores(run, _measure(run), queries)
        assert isinstance(scores, Scores) and scores.metadata["strategy"] == "metagradient"
        mg = -scores.values  # score > 0: upweighting lowers the loss
        fd = _finite_differences(run, queries)
        assert mg.shape == (3, N)
        assert np.abs(mg).max() > 1e-3  # not vacuous
        np.testing.assert_allclose(mg, fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())


@pytest.mark.slow
def test_holding_adams_state_constant_misses():
    """Dropping the path through the optimizer state is wrong by well over 1 %: the test
    above would catch it."""
    with jax.enable_x64(True):
        run, queries = _run()
        fd = _finite_differences(run, queries)
        held, _ = _run(hold_state=True)
        wrong = metagradients(held, _measure(held), queries)
        assert np.linalg.norm(wrong - fd) / np.linalg.norm(fd) > 0.01


@pytest.mark.slow
def test_non_finite_metagradients_are_refused_with_the_fix():
    """Adam without eps_root: √ν at ν = 0 (the zero input's weights) has an infinite
    derivative, which turns into NaN."""
    with jax.enable_x64(True):
        run, queries = _run(eps_root=0.0, l2=0.0)
        with pytest.raises(FloatingPointError, match="eps_root"):
            metagradients(run, _measure(run), queries)


def test_digits_trainer_is_reproduced():
    """``mean_loss_run`` trains as ``reference.training.fit_many`` (weighted mean loss,
    full-batch Adam, L2 in the objective), with the ordinary weights and with a subset."""
    from influence.reference.training import fit_many, stack_models, weighted_mean_loss
    from influence.testing import digits

    x, y = digits()
    data = {"x": x[:64], "y": y[:64]}
    task = tasks.Classification()

    def make(seed):
        return _DigitsMLP(seed)

    keep = (np.arange(64) % 3 != 0).astype(np.float32)
    run = mean_loss_run(make, task, data, optax.adam(1e-2), 15, weight_decay=1e-3)
    graphdef, params, rest = stack_models(make, [0, 1])
    weights = jnp.stack([jnp.ones(64), jnp.asarray(keep)])
    expected = fit_many(graphdef, params, rest, optax.adam(1e-2), weighted_mean_loss(task),
                        {k: jnp.asarray(v) for k, v in data.items()}, lambda _: weights, 15, 1e-3)
    got = train_many(run, weights, [0, 1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expected)


class _DigitsMLP(nnx.Module):
    def __init__(self, seed):
        rngs = nnx.Rngs(seed)
        self.l1, self.l2 = nnx.Linear(64, 16, rngs=rngs), nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


@pytest.mark.slow
def test_influence_train_runs_are_reproduced(tmp_path):
    """``lm_run`` steps as ``influence.lm.Trainer`` (same init, batches, clipped AdamW on its
    schedule); its metagradients are finite (eps_root) and match a finite difference."""
    from influence.lm import Trainer
    from influence.unrolled import lm_run
    from tests.lm.helpers import docs, tiny_config

    trainer = Trainer(tiny_config(tokens=8 * 32 * 6), tmp_path, docs())
    for _ in range(trainer.cfg.total_steps):
        trainer.step()
    ids, mask = trainer.train_ids[:40], trainer.train_mask[:40]
    # the trainer's batches come from all its sequences: compare on the full set
    run = lm_run(trainer.cfg, trainer.train_ids, trainer.train_mask, vocab_size=trainer.tokenizer.vocab_size)
    got = train(run, seed=trainer.cfg.seed)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, trainer.params)

    small = lm_run(trainer.cfg, ids, mask, vocab_size=trainer.tokenizer.vocab_size)
    queries = {"input_ids": jnp.asarray(trainer.held_ids[:2]), "loss_mask": jnp.asarray(trainer.held_mask[:2])}
    task = tasks.CausalLM()

    def measure(params, q):
        return task.loss(small.model(params), q)

    mg = metagradients(small, measure, queries)
    assert np.all(np.isfinite(mg))
    n = int(small.steps(0)[0, 0])  # an example of the first batch
    eps = 1e-2
    w = np.ones((2, 40), np.float32)
    w[0, n] += eps
    w[1, n] -= eps
    m = np.asarray(jax.vmap(lambda p: measure(p, queries))(train_many(small, w, [0, 0])))
    fd = (m[0] - m[1]) / (2 * eps)
    np.testing.assert_allclose(mg[:, n], fd, rtol=0.05, atol=0.02 * np.abs(fd).max())


@pytest.mark.slow
def test_memory_statistics_and_query_chunks():
    """Chunks of queries (the last one padded) give the same metagradients; the memory
    statistics are filled."""
    with jax.enable_x64(True):
        run, queries = _run()
        whole = metagradients(run, _measure(run), queries)
        stats = {}
        chunked = metagradients(run, _measure(run), queries, query_chunk=2, stats=stats)
        np.testing.assert_allclose(chunked, whole, rtol=1e-10, atol=1e-12)
        assert stats["metagradient_bytes"] > 0 and stats["training_bytes"] > 0
