"""The loss families' contracts against closed forms, and the tasks built on them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influence import tasks
from influence.testing import seed_offset

B, T, K = 3, 4, 5


def _outputs_and_mask():
    rng = np.random.default_rng(0)
    outputs = (2.0 * rng.normal(size=(B, T, K))).astype(np.float32)
    mask = np.ones((B, T), np.float32)
    mask[1, 2:] = 0.0
    mask[2, 0] = 0.0
    return outputs, mask


def _direction_fisher(family, outputs, mask):
    """Σ_k g_k g_kᵀ ``[B, T*K, T*K]`` with g_k the gradient of pseudo-loss k in the outputs."""
    jac = jax.jacrev(family.fisher_directions)(jnp.asarray(outputs), jnp.asarray(mask))  # [D, B, B, T, K]
    jac = np.asarray(jac, np.float64)
    per_example = np.stack([jac[:, b, b].reshape(jac.shape[0], -1) for b in range(B)])  # [B, D, T*K]
    # An example's pseudo-losses depend on its own outputs only.
    for b in range(B):
        others = np.delete(jac[:, b], b, axis=1)
        assert np.all(others == 0)
    return np.einsum("bdi,bdj->bij", per_example, per_example)


def _block_diagonal(blocks):
    """``[B, T, K, K]`` -> ``[B, T*K, T*K]`` with the token blocks on the diagonal."""
    out = np.zeros((B, T * K, T * K))
    for t in range(T):
        out[:, t * K : (t + 1) * K, t * K : (t + 1) * K] = blocks[:, t]
    return out


def test_categorical_directions_give_the_softmax_hessian_per_token():
    outputs, mask = _outputs_and_mask()
    z = outputs.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    hessian = (p[..., :, None] * np.eye(K) - p[..., :, None] * p[..., None, :]) * mask[..., None, None]
    got = _direction_fisher(tasks.Categorical(), outputs, mask)
    np.testing.assert_allclose(got, _block_diagonal(hessian), rtol=1e-5, atol=1e-6)


def test_gaussian_directions_give_the_identity_per_counted_token():
    outputs, mask = _outputs_and_mask()
    got = _direction_fisher(tasks.Gaussian(), outputs, mask)
    np.testing.assert_array_equal(got, _block_diagonal(np.eye(K) * mask[..., None, None]))


def test_categorical_loss_is_the_masked_cross_entropy_sum():
    outputs, mask = _outputs_and_mask()
    labels = np.random.default_rng(1).integers(0, K, (B, T)).astype(np.int32)
    z = outputs.astype(np.float64)
    log_z = np.log(np.exp(z).sum(-1))
    expected = np.array([sum(mask[b, t] * (log_z[b, t] - z[b, t, labels[b, t]]) for t in range(T)) for b in range(B)])
    got = tasks.Categorical().loss(jnp.asarray(outputs), jnp.asarray(labels), jnp.asarray(mask))
    assert got.shape == (B,)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_gaussian_loss_is_half_the_masked_squared_error_sum():
    outputs, mask = _outputs_and_mask()
    targets = np.random.default_rng(1).normal(size=(B, T, K)).astype(np.float32)
    diff = outputs.astype(np.float64) - targets
    expected = np.array([sum(0.5 * mask[b, t] * diff[b, t] @ diff[b, t] for t in range(T)) for b in range(B)])
    got = tasks.Gaussian().loss(jnp.asarray(outputs), jnp.asarray(targets), jnp.asarray(mask))
    assert got.shape == (B,)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_categorical_samples_follow_the_softmax():
    logits = jnp.asarray([[0.0, 1.0, -1.0, 2.0], [3.0, 0.0, 0.0, -2.0]])
    n = 20_000  # frequency std ≤ 0.0036: a 0.015 margin is over 4 std
    outputs = jnp.broadcast_to(logits[:, None], (2, n, 4))
    labels = np.asarray(tasks.Categorical().sample(outputs, jax.random.key(0)))
    assert labels.shape == (2, n)
    freq = np.stack([np.bincount(labels[b], minlength=4) / n for b in range(2)])
    np.testing.assert_allclose(freq, jax.nn.softmax(logits, -1), atol=0.015)


def test_inverse_cdf_maps_quantiles_to_the_softmax_classes():
    """On a uniform grid of N quantiles, class k gets the grid points in
    [cdf[k-1], cdf[k]): its count is N·p_k to within one point, for every class, with K
    not a square (the last block padded) and a class of float32 probability 0 (exp
    underflows) that no quantile reaches, including the end points 0 and the largest
    float32 below 1."""
    logits = jnp.log(jnp.arange(1.0, 38.0)).at[5].set(-200.0)  # K = 37: blocks of 7, class 5 has mass 0
    n = 37 * 1000
    u = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n
    u = jnp.concatenate([u, jnp.asarray([0.0, np.nextafter(np.float32(1), np.float32(0))], jnp.float32)])
    labels = np.asarray(tasks.categorical_from_uniform(jnp.broadcast_to(logits, (len(u), 37)), u))
    p = np.asarray(jax.nn.softmax(logits), np.float64)
    counts = np.bincount(labels[:n], minlength=37)
    assert counts[5] == 0 and labels.max() < 37
    np.testing.assert_allclose(counts, n * p, atol=1.01)
    assert labels[n] == 0 and labels[n + 1] == 36  # u = 0: the first class; u → 1: the last


@pytest.mark.parametrize("n_classes", [1, 2, 10, 37, 4096])
def test_inverse_cdf_draws_pass_a_chi_square_test_against_the_softmax(n_classes):
    """Random draws of :meth:`Categorical.sample` (an exact inverse-CDF sampler, one uniform
    per token) against softmax: Pearson's χ² over the classes with expected count ≥ 5
    (the rest pooled) stays below its 0.99999 quantile; an off-by-one class, a wrong
    block or a missing normalisation gives χ² in the thousands. K = 4096 is an LM's
    vocabulary (blocks of 64)."""
    from scipy import stats

    rng = np.random.default_rng(11 + seed_offset())
    logits = jnp.asarray(2.0 * rng.normal(size=n_classes).astype(np.float32))
    n = 200_000 if n_classes < 100 else 10_000  # n·K floats in memory
    key = jax.random.key(seed_offset())
    labels = np.asarray(tasks.Categorical().sample(jnp.broadcast_to(logits, (1, n, n_classes)), key))[0]
    assert labels.shape == (n,) and labels.min() >= 0 and labels.max() < n_classes
    expected = n * np.asarray(jax.nn.softmax(logits), np.float64)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    if len(expected) == 1:
        assert observed[0] == n
        return
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    assert chi2 < stats.chi2.ppf(0.99999, len(expected) - 1), chi2


def test_categorical_draws_are_deterministic_in_the_key():
    outputs = jnp.asarray(np.random.default_rng(5).normal(size=(2, 50, 300)).astype(np.float32))
    family = tasks.Categorical()
    first = np.asarray(family.sample(outputs, jax.random.key(3)))
    np.testing.assert_array_equal(first, np.asarray(jax.jit(family.sample)(outputs, jax.random.key(3))))
    assert (first != np.asarray(family.sample(outputs, jax.random.key(4)))).mean() > 0.5


def test_gaussian_samples_are_unit_normal_around_the_outputs():
    n = 20_000
    f = jnp.asarray(np.random.default_rng(2).normal(size=(2, n, 3)).astype(np.float32)) * 3.0
    y = np.asarray(tasks.Gaussian().sample(f, jax.random.key(0)))
    noise = (y - np.asarray(f)).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(noise.mean(0), 0.0, atol=0.02)  # std of the mean ≈ 0.005
    np.testing.assert_allclose(np.cov(noise.T), np.eye(3), atol=0.04)


def test_gaussian_sampled_targets_carry_no_gradient():
    """The sampled Fisher differentiates the loss at fixed sampled targets:
    d/df 0.5‖f − y‖² = f − y, not 0, which a gradient through y = f + noise would give.
    (Categorical samples are integers, which carry no gradient anyway.)"""
    family = tasks.Gaussian()
    outputs, mask = _outputs_and_mask()
    key = jax.random.key(3)

    def sampled_loss(out):
        return jnp.sum(family.loss(out, family.sample(out, key), jnp.asarray(mask)))

    grad = np.asarray(jax.grad(sampled_loss)(jnp.asarray(outputs)))
    targets = family.sample(jnp.asarray(outputs), key)
    fixed = np.asarray(jax.grad(lambda out: jnp.sum(family.loss(out, targets, jnp.asarray(mask))))(
        jnp.asarray(outputs)))
    np.testing.assert_array_equal(grad, fixed)
    assert np.abs(grad).max() > 0.1


def test_built_in_tasks_use_the_public_families():
    assert tasks.Classification().family == tasks.Categorical()
    assert tasks.CausalLM().family == tasks.Categorical()
    assert tasks.Regression().family == tasks.Gaussian()
    # family is not an init argument: positional arguments still name the keys
    assert tasks.Classification("a", "b").x_key == "a" and tasks.Regression("a", "b").y_key == "b"
    assert hash(tasks.CausalLM()) == hash(tasks.CausalLM()) and tasks.Regression() != tasks.Classification()
    with pytest.raises(dataclasses.FrozenInstanceError):
        tasks.Classification().family = tasks.Gaussian()


def test_an_output_task_loss_and_fisher_come_from_its_family():
    @dataclasses.dataclass(frozen=True)
    class Scaled(tasks.OutputTask):
        family = tasks.Gaussian()

        def outputs(self, model, batch):
            return model(batch["x"])

        def targets(self, batch):
            return batch["y"]

    outputs, _ = _outputs_and_mask()
    targets = np.zeros_like(outputs)
    task = Scaled()
    batch = {"x": jnp.asarray(outputs), "y": jnp.asarray(targets)}
    np.testing.assert_array_equal(task.loss(lambda x: 2 * x, batch),
                                  tasks.Gaussian().loss(2 * outputs, targets, np.ones((B, T))))
    key = jax.random.key(0)
    sampled = tasks.Gaussian().sample(outputs, key)
    np.testing.assert_array_equal(task.loss(lambda x: x, batch, sample_key=key),
                                  tasks.Gaussian().loss(outputs, sampled, np.ones((B, T))))
    np.testing.assert_array_equal(task.fisher_directions(lambda x: x, batch), outputs.reshape(B, -1).T)


def test_an_output_task_without_a_family_cannot_be_made():
    class NoFamily(tasks.OutputTask):
        def outputs(self, model, batch):
            return model(batch["x"])

        def targets(self, batch):
            return batch["y"]

    with pytest.raises(TypeError, match="family"):
        NoFamily()


def test_a_family_without_sampling_or_exact_fisher_says_which_fisher_to_use():
    @dataclasses.dataclass(frozen=True)
    class Absolute(tasks.LossFamily):
        def loss(self, outputs, targets, mask):
            return jnp.sum(jnp.sum(jnp.abs(outputs - targets), -1) * mask, axis=1)

    outputs, mask = _outputs_and_mask()
    with pytest.raises(NotImplementedError, match="fisher='empirical'"):
        Absolute().sample(outputs, jax.random.key(0))
    with pytest.raises(NotImplementedError, match="fisher='sampled' or 'empirical'"):
        Absolute().fisher_directions(outputs, mask)


# --- validate: the host-side check of each batch ---------------------------------------


def test_classification_validate_accepts_integer_labels_in_range_only():
    task = tasks.Classification()
    x = np.zeros((4, 2), np.float32)
    for y in (np.array([0, 9, 3, 1], np.int64), np.array([[0], [9], [3], [1]], np.uint8)):
        task.validate({"x": x, "y": y}, (4, 1, 10))
    task.validate({"x": x, "y": np.array([0, 12, 3, 1])}, None)  # no output shape: only the sign is known
    cases = [
        (np.array([0, 10, 3, 1]), r"labels 'y' must be integers in \[0, 10\); row 101 has 10"),
        (np.array([0, 1, 3, -2]), r"row 103 has -2"),
        (np.array([True, False, True, True]), r"got dtype bool"),
        (np.array([0.0, 1.0, 2.0, 3.0]), r"got dtype float64 .labels are not truncated"),
        (np.zeros((4, 2), np.int32), r"one integer per example, shape \[B\]; got trailing shape \(2,\)"),
    ]
    for y, match in cases:
        with pytest.raises(ValueError, match=match):
            task.validate({"x": x, "y": y}, (4, 1, 10), first_row=100)
    with pytest.raises(ValueError, match=r"must be non-negative integers; row 1 has -1"):
        task.validate({"x": x, "y": np.array([0, -1, 0, 0])}, None)


def test_regression_and_causal_lm_validate_shapes_and_values():
    reg = tasks.Regression()
    x = np.zeros((2, 5), np.float32)
    reg.validate({"x": x, "y": np.zeros(2, np.float32)}, (2, 1, 1))  # [B] targets for one output
    reg.validate({"x": x, "y": np.zeros((2, 1), np.float32)}, (2, 1, 1))
    reg.validate({"x": x, "y": np.zeros((2, 3), np.int32)}, (2, 1, 3))
    with pytest.raises(ValueError, match=r"must have shape \[B, 3\] to match the model's 3 output\(s\); got \[B, 1\]"):
        reg.validate({"x": x, "y": np.zeros((2, 1), np.float32)}, (2, 1, 3))
    with pytest.raises(ValueError, match=r"must have shape \[B, 1\] or \[B\] to match the model's 1 output\(s\); "
                                         r"got \[B, 2\]"):
        reg.validate({"x": x, "y": np.zeros((2, 2), np.float32)}, (2, 1, 1))
    with pytest.raises(ValueError, match=r"targets 'y' must be finite; row 1 is not"):
        reg.validate({"x": x, "y": np.array([0.0, np.inf], np.float32)}, (2, 1, 1))
    lm = tasks.CausalLM()
    ids = np.array([[1, 2, 3], [4, 5, 0]], np.int32)
    lm.validate({"input_ids": ids, "loss_mask": np.ones((2, 3), np.float32)}, (2, 2, 6))
    with pytest.raises(ValueError, match=r"token ids 'input_ids' must be integers in \[0, 5\); row 1 has 5"):
        lm.validate({"input_ids": ids}, (2, 2, 5))
    with pytest.raises(ValueError, match=r"'input_ids' must be token ids \[B, T\]; got shape \[2, 3, 1\]"):
        lm.validate({"input_ids": ids[..., None]}, None)


def test_the_default_validate_accepts_anything():
    class Custom(tasks.Task):
        def loss(self, model, batch, sample_key=None):
            return batch["x"].sum(-1)

    assert Custom().validate({"x": np.full((2, 2), np.nan)}, None) is None


@pytest.mark.parametrize("family", [tasks.Categorical(), tasks.Gaussian()])
def test_per_example_keys_draw_each_example_alone(family):
    """With a ``[B]`` key array, example b's targets depend only on ``key[b]``: drawn in any
    batch, or alone, they are the same (what makes the sampled Fisher batch-size invariant)."""
    outputs = jnp.asarray(np.random.default_rng(4).normal(size=(6, 20, 4)).astype(np.float32))
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(7), jnp.arange(6))
    together = np.asarray(tasks.sample_targets(family, outputs, keys))
    for b in range(6):
        alone = np.asarray(family.sample(outputs[b : b + 1], keys[b]))[0]
        np.testing.assert_array_equal(together[b], alone)
    np.testing.assert_array_equal(np.asarray(tasks.sample_targets(family, outputs[2:5], keys[2:5])), together[2:5])
    assert not np.array_equal(together[0], np.asarray(family.sample(outputs[:1], jax.random.key(8)))[0])
