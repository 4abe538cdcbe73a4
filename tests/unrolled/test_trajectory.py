"""Trajectory scores: one checkpoint is final-weights EK-FAC; unit-normalised scores are
cosines of exact gradients; Adam-preconditioned scores are ∇mᵀ diag(1/(√ν+λ)) ∇L."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import influence as inf
from influence import tasks
from influence.reference.exact import per_example_gradients
from influence.testing import digits
from influence.unrolled import mean_loss_run, train
from influence.unrolled.trajectory import lr_share_weights, trajectory_scores

T = 30


class _MLP(nnx.Module):
    def __init__(self, seed):
        rngs = nnx.Rngs(seed)
        self.l1, self.l2 = nnx.Linear(64, 8, rngs=rngs), nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


@pytest.fixture(scope="module")
def setting():
    x, y = digits()
    train_data = {"x": x[:48], "y": y[:48]}
    queries = {"x": x[1500:1504], "y": y[1500:1504]}
    run = mean_loss_run(_MLP, tasks.Classification(), train_data, optax.adam(2e-2, eps_root=1e-16), T,
                        weight_decay=1e-3)
    return run, tasks.Classification(), train_data, queries


@pytest.mark.slow
def test_one_checkpoint_is_final_weights_ekfac(setting):
    run, task, train_data, queries = setting
    got = trajectory_scores(run, task, queries, checkpoints=[T], strategy="ekfac", batch_size=16)
    model = run.model(train(run))
    factors = inf.fit_factors(model, task, train_data, strategy="ekfac", key=jax.random.PRNGKey(0), batch_size=16)
    expected = inf.pairwise_scores(model, task, factors, queries, train_data, batch_size=16).values
    np.testing.assert_allclose(got.values, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    assert got.metadata["checkpoint_weights"] == [1.0]


def test_unit_normalised_scores_are_cosines_of_exact_gradients(setting):
    run, task, train_data, queries = setting
    got = trajectory_scores(run, task, queries, checkpoints=[10], strategy="identity", normalize=True,
                            learning_rates=np.ones(T), batch_size=16).values
    from influence.unrolled import states_at

    model = run.model(states_at(run, [10])[0][0])
    gq = per_example_gradients(model, task, queries, measurement=True)
    gn = per_example_gradients(model, task, train_data)
    cos = (gq / np.linalg.norm(gq, axis=1, keepdims=True)) @ (gn / np.linalg.norm(gn, axis=1, keepdims=True)).T
    assert np.abs(cos).max() > 0.1
    np.testing.assert_allclose(got, cos, atol=2e-5)


def test_adam_preconditioned_scores(setting):
    run, task, train_data, queries = setting
    lam = 1e-6
    got = trajectory_scores(run, task, queries, checkpoints=[20], strategy="adam", damping=lam).values
    from influence.unrolled import states_at

    params, state = states_at(run, [20])[0]
    nu = state[0].nu

    def losses(p, data, fn):
        return fn(run.model(p), {k: jnp.asarray(v) for k, v in data.items()})

    jq = jax.jit(jax.jacrev(losses), static_argnums=2)(params, queries, task.measurement)  # leaves [Q, ...]
    jn = jax.jit(jax.jacrev(losses), static_argnums=2)(params, train_data, task.loss)  # leaves [N, ...]
    expected = sum(
        np.einsum("qi,ni->qn", np.asarray(a).reshape(len(a), -1) / (np.sqrt(np.asarray(v)).reshape(-1) + lam),
                  np.asarray(b).reshape(len(b), -1))
        for a, b, v in zip(jax.tree.leaves(jq), jax.tree.leaves(jn), jax.tree.leaves(nu)))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_learning_rate_share_weights():
    lr = np.array([1.0, 1.0, 2.0, 2.0, 4.0, 0.0])
    np.testing.assert_allclose(lr_share_weights([2, 4, 6], lr), [2 / 10, 4 / 10, 4 / 10])
    np.testing.assert_allclose(lr_share_weights([3], None), [1.0])
