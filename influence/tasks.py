"""Tasks: what the influence engine differentiates.

A task turns a model and a batch into per-example losses (for fitting curvature and
for training gradients) and per-example measurements (for queries). Losses are
**sums** over tokens/outputs, never means: softmax cross-entropy and the Gaussian
negative log-likelihood are then matching losses, and the true Fisher equals the
Gauss-Newton matrix the curvature approximates.

Write your own by subclassing :class:`Task`; only :meth:`Task.loss` is required. When
the loss is a likelihood over model outputs, subclass :class:`OutputTask` instead: give
a :class:`LossFamily` (:class:`Categorical`, :class:`Gaussian` or your own), the outputs
and the targets, and the exact Fisher and the exact references of
:mod:`influence.reference` (Gauss-Newton, PBRF, exact influence) work for it.
Tasks are used as static arguments of jitted functions, so they must be hashable:
the built-ins are frozen dataclasses, and a subclass instance that is not a dataclass
hashes by identity (reuse the same instance to reuse compiled code).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from influence.errors import ConfigError, ConfigTypeError, Unsupported

Arrays = dict[str, jax.Array]  # a batch's named arrays (not runtime.data.Batch, the padded batch)


class Task(abc.ABC):
    """Protocol of a task. Subclass and implement :meth:`loss`.

    Attributes:
      fields: names of the batch entries the task reads. The library passes only
        these to the model (other columns, e.g. string metadata, are dropped). An
        empty tuple means "every numeric column".
      optional_fields: entries used when present (e.g. a loss mask).
    """

    fields: tuple[str, ...] = ()
    optional_fields: tuple[str, ...] = ()

    @abc.abstractmethod
    def loss(self, model: Any, batch: Arrays, sample_key: jax.Array | None = None) -> jax.Array:
        """Per-example losses, float32 ``[B]``, summed over tokens/outputs (one number
        per example, not a mean; ``[B, 1]`` or a scalar is refused).

        With ``sample_key``, targets are drawn from the model's own predictive
        distribution (used to fit the true Fisher); without it, the batch's labels are
        used (training gradients and the empirical Fisher). The library passes a ``[B]``
        array of keys, one per example, derived from the example's row in the data set,
        so the sampled Fisher does not depend on the batch size or device count: draw
        example b's targets with ``sample_key[b]`` (e.g. ``jax.vmap`` your sampler). A
        loss written for one scalar key still works (the library then falls back to one
        key per batch and warns that the factors depend on ``batch_size``); a loss that
        ignores the key is refused for ``fisher="sampled"``.
        """

    def sampled_losses(self, model: Any, batch: Arrays, sample_keys: jax.Array) -> jax.Array:
        """Losses ``[k, B]`` of k sampled draws of targets per example, from *one* forward
        pass (a tracked layer may be called only once per objective). ``sample_keys`` is
        ``[k, B]`` (draw j of example b: ``sample_keys[j, b]``), or ``[k]`` for a loss that
        takes one scalar key. Used by ``fit_factors(fisher_samples=k)`` with k > 1;
        :class:`OutputTask` implements it (one forward, k draws of targets). Default: only
        k = 1, through :meth:`loss`."""
        if sample_keys.shape[0] == 1:
            return self.loss(model, batch, sample_key=sample_keys[0])[None]
        raise Unsupported(
            f"{type(self).__name__} draws one target per call of its loss; fisher_samples > 1 needs sampled_losses "
            "(k draws from one forward pass; OutputTask has it). Use fisher_samples=1 or implement it")

    def measurement(self, model: Any, batch: Arrays) -> jax.Array:
        """Per-query measurement ``[B]`` whose gradient is preconditioned. Loss-like:
        a positive influence score means upweighting the training example *lowers* it.
        Defaults to the loss on the batch's labels."""
        return self.loss(model, batch)

    def validate(self, batch: dict[str, np.ndarray], output_shape: tuple[int, ...] | None, *,
                 first_row: int = 0) -> None:
        """Check one batch on the host before it is placed on a device; raise
        ``ValueError`` saying what was expected (the library adds which batch).

        Values cannot be checked inside a jitted function, so the library calls this once
        per batch of every pass with the batch's real rows as numpy arrays, the shape of
        the model's outputs for it (``task.outputs``, ``[B, T, K]`` for an
        :class:`OutputTask`; ``None`` when unknown) and the data-set index of its first
        row (for messages). Default: accept everything."""
        return None

    def token_mask(self, batch: Arrays) -> jax.Array | None:
        """Which token positions count when averaging the factors A and S, ``[B, T]``
        in {0, 1}; ``None`` means every position of every example counts."""
        return None

    def fisher_directions(self, model: Any, batch: Arrays) -> jax.Array:
        """Pseudo-losses ``[K, B]`` whose per-example gradients g_k satisfy
        Σ_k g_k g_kᵀ = the exact per-example Fisher (used by ``fisher="exact"``)."""
        raise Unsupported(
            f"{type(self).__name__} has no exact Fisher; use fisher='sampled' or 'empirical'"
        )


class LossFamily(abc.ABC):
    """A likelihood over model outputs: its loss, its samples and its exact Fisher.

    The loss must be a negative log-likelihood in the outputs' natural parameters (a
    matching loss), so that the Fisher of the predictive distribution equals the
    Gauss-Newton matrix. A family is part of its task, a static argument of jitted
    functions: implement it as a frozen dataclass, so that it is hashable.
    """

    @abc.abstractmethod
    def loss(self, outputs: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
        """Per-example losses ``[B]``: the per-token loss of ``outputs [B, T, K]`` against
        ``targets`` weighted by ``mask [B, T]`` and summed over tokens."""

    def sample(self, outputs: jax.Array, key: jax.Array) -> jax.Array:
        """Targets drawn from the predictive distribution at ``outputs [B, T, K]`` with one
        scalar ``key``, no gradient through them (the sampled, true Fisher).
        :class:`OutputTask` calls it once per example (``jax.vmap``, ``B = 1``) with that
        example's key."""
        raise Unsupported(f"{type(self).__name__} cannot sample targets; use fisher='empirical' or 'exact'")

    def fisher_directions(self, outputs: jax.Array, mask: jax.Array) -> jax.Array:
        """Pseudo-losses ``[K', B]`` whose gradients g_k with respect to ``outputs [B, T, K]``
        satisfy Σ_k g_k g_kᵀ = mask-weighted output Hessian of :meth:`loss`, per token."""
        raise Unsupported(f"{type(self).__name__} has no exact Fisher; use fisher='sampled' or 'empirical'")


def _batch_shape(trailing: tuple[int, ...]) -> str:
    """``[B, 3]`` for trailing shape ``(3,)``."""
    return "[" + ", ".join(["B", *map(str, trailing)]) + "]"


def _first_bad(bad: np.ndarray) -> int:
    """Row of the first ``True`` of ``bad [B, ...]``."""
    return int(np.argwhere(bad)[0][0])


def check_labels(name: str, labels: np.ndarray, n_classes: int | None, first_row: int) -> None:
    """``ValueError`` unless ``labels`` are integers in ``[0, n_classes)`` (``≥ 0`` when
    ``n_classes`` is ``None``). Floats are refused rather than truncated; the range is
    checked on the host's integers, before int64 values could wrap to int32 on a device."""
    expected = f"integers in [0, {n_classes})" if n_classes is not None else "non-negative integers"
    if labels.dtype.kind not in "iu":
        raise ConfigError(f"{name} must be {expected}; got dtype {labels.dtype} (labels are not truncated or cast: "
                         "convert them with .astype(np.int32) if they are whole numbers)")
    flat = labels.reshape(len(labels), -1)
    bad = flat < 0
    if n_classes is not None:
        bad |= flat >= n_classes
    if bad.any():
        row = _first_bad(bad)
        raise ConfigError(f"{name} must be {expected}; row {first_row + row} has {flat[row][bad[row]][0]}")


CATEGORICAL_SAMPLER = "inverse-cdf"
"""How :meth:`Categorical.sample` draws (results files record it: files without it were
measured with the earlier sampler, ``jax.random.categorical``'s Gumbel draw, whose
draws, and so sampled-Fisher factors, differ draw by draw for the same key)."""


def categorical_inverse_cdf(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One class per row of ``logits [..., K]``, int32 ``[...]``, drawn from softmax(logits)
    by inverting its cumulative distribution: one uniform u per row, the class k with
    cdf[k-1] ≤ u·cdf[K-1] < cdf[k] (cdf of the unnormalised exp(logits − max)).

    Exact up to float32 rounding, and cheap: ``jax.random.categorical`` draws K Gumbel
    numbers (random bits and two logarithms each) per row, which for an LM's vocabulary
    made sampling a large share of a sampled-Fisher fit; here a row costs one exp per
    class and a few comparisons. The search is two-level, since a cumulative sum over K
    is slow on CPU:
    blocks of ⌈√K⌉ classes, the block from the cumulative block sums, then the class
    within it. A class whose probability is 0 in float32 (an underflowed exp) is never
    drawn: rounding that would step past the block's last class with positive mass
    stops on that class. Deterministic in ``key`` (``[...]`` uniforms from it)."""
    return categorical_from_uniform(logits, jax.random.uniform(key, logits.shape[:-1], jnp.float32))


def categorical_from_uniform(logits: jax.Array, u: jax.Array) -> jax.Array:
    """The class of each row of ``logits [..., K]`` at quantile ``u [...]`` in [0, 1) of
    softmax(logits), int32 ``[...]`` (:func:`categorical_inverse_cdf` with given uniforms)."""
    logits = logits.astype(jnp.float32)
    n_classes = logits.shape[-1]
    block = math.isqrt(n_classes - 1) + 1 if n_classes > 1 else 1  # ⌈√K⌉
    n_blocks = -(-n_classes // block)
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # the largest is 1: the total is ≥ 1
    pad = [(0, 0)] * (p.ndim - 1) + [(0, n_blocks * block - n_classes)]
    p = jnp.pad(p, pad).reshape(*p.shape[:-1], n_blocks, block)  # padding has mass 0: never drawn
    block_cdf = jnp.cumsum(jnp.sum(p, axis=-1), axis=-1)  # [..., n_blocks]
    total = block_cdf[..., -1:]
    # u·total rounded up to total would fall off the end: the largest float below it instead
    x = jnp.minimum(u[..., None].astype(jnp.float32) * total, jnp.nextafter(total, 0.0))
    j = jnp.sum(block_cdf <= x, axis=-1, dtype=jnp.int32)  # the first block whose cdf exceeds x: mass > 0
    j = jnp.minimum(j, n_blocks - 1)
    before = jnp.take_along_axis(block_cdf, jnp.maximum(j - 1, 0)[..., None], axis=-1)[..., 0]
    before = jnp.where(j > 0, before, 0.0)
    inner = jnp.take_along_axis(p, j[..., None, None], axis=-2)[..., 0, :]  # [..., block]
    k = jnp.sum(before[..., None] + jnp.cumsum(inner, axis=-1) <= x, axis=-1, dtype=jnp.int32)
    last_positive = block - 1 - jnp.argmax(inner[..., ::-1] > 0, axis=-1).astype(jnp.int32)
    # (the clip to K − 1 only guards against a cumulative sum that rounding made non-monotone)
    return jnp.minimum(j * block + jnp.minimum(k, last_positive), n_classes - 1)


@dataclasses.dataclass(frozen=True)
class Categorical(LossFamily):
    """Softmax cross-entropy: outputs are logits ``[B, T, K]``, targets labels ``[B, T]``."""

    def loss(self, outputs, targets, mask):
        logp = jax.nn.log_softmax(outputs, axis=-1)
        per_token = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return jnp.sum(per_token * mask, axis=1)

    def sample(self, outputs, key):
        """Labels ``[B, T]`` drawn from softmax(outputs) by :func:`categorical_inverse_cdf`
        (one uniform per token, not the V Gumbel numbers of ``jax.random.categorical``)."""
        return categorical_inverse_cdf(key, jax.lax.stop_gradient(outputs))

    def fisher_directions(self, outputs, mask):
        """``[T*K, B]``. For direction (t, k) the gradient with respect to outputs[:, t] is
        √p_k (e_k − p), and Σ_k √p_k (e_k − p) (√p_k (e_k − p))ᵀ = diag(p) − ppᵀ, the
        Hessian of the loss. Each token gets its own directions, so no cross-token terms
        appear."""
        p = jax.lax.stop_gradient(jax.nn.softmax(outputs, axis=-1))
        mean_logit = jnp.sum(p * outputs, axis=-1, keepdims=True)
        psi = jnp.sqrt(p) * (outputs - mean_logit) * mask[..., None]  # [B, T, K]
        return psi.reshape(outputs.shape[0], -1).T


@dataclasses.dataclass(frozen=True)
class Gaussian(LossFamily):
    """Unit-variance Gaussian, 0.5‖f − y‖²: outputs and targets ``[B, T, K]``.

    The factor 0.5 makes the Gauss-Newton matrix JᵀJ equal the Fisher of y ~ N(f, I).
    """

    def loss(self, outputs, targets, mask):
        per_token = 0.5 * jnp.sum((outputs - targets) ** 2, axis=-1)
        return jnp.sum(per_token * mask, axis=1)

    def sample(self, outputs, key):
        outputs = jax.lax.stop_gradient(outputs)
        return outputs + jax.random.normal(key, outputs.shape, outputs.dtype)

    def fisher_directions(self, outputs, mask):
        """``[T*K, B]``: the output Hessian is I, so the directions are the outputs themselves."""
        return (outputs * mask[..., None]).reshape(outputs.shape[0], -1).T


@dataclasses.dataclass(frozen=True)
class Bernoulli(LossFamily):
    """Independent sigmoid cross-entropies (multi-label): outputs are logits ``[B, T, K]``,
    targets in {0, 1} ``[B, T, K]``; the loss is Σ_k softplus(f_k) − y_k f_k per token.
    Its output Hessian is diag(p (1 − p)), p = sigmoid(f), so the exact Fisher has K
    directions per token."""

    def loss(self, outputs, targets, mask):
        per_token = jnp.sum(jax.nn.softplus(outputs) - targets * outputs, axis=-1)
        return jnp.sum(per_token * mask, axis=1)

    def sample(self, outputs, key):
        p = jax.nn.sigmoid(jax.lax.stop_gradient(outputs))
        return jax.random.bernoulli(key, p).astype(outputs.dtype)

    def fisher_directions(self, outputs, mask):
        """``[T*K, B]``: direction (t, k) is √(p_k (1 − p_k)) f_k (coefficient held
        constant), whose gradient in the outputs is √(p_k (1 − p_k)) e_k; their outer
        products sum to diag(p (1 − p)), the Hessian of the loss."""
        p = jax.lax.stop_gradient(jax.nn.sigmoid(outputs))
        psi = jnp.sqrt(p * (1 - p)) * outputs * mask[..., None]
        return psi.reshape(outputs.shape[0], -1).T


def sample_targets(family: LossFamily, outputs: jax.Array, key: jax.Array) -> jax.Array:
    """``family``'s targets at ``outputs [B, T, K]``: with a ``[B]`` key array, example b
    is drawn with ``key[b]`` alone (``jax.vmap`` over examples), so its targets do not
    depend on the rest of its batch; with a scalar key, one draw for the whole batch."""
    if key.ndim == 0:
        return family.sample(outputs, key)

    def one(out, k):
        return family.sample(out[None], k)[0]

    return jax.vmap(one)(outputs, key)


@dataclasses.dataclass(frozen=True, eq=False)
class OutputTask(Task):
    """A task whose loss is a likelihood (:class:`LossFamily`) over model outputs.

    Subclasses give ``family``, ``outputs(model, batch) -> [B, T, K]`` and
    ``targets(batch)`` (and ``output_mask`` when not every token counts); loss, sampled
    loss and exact Fisher follow, and :mod:`influence.reference` can compute exact
    influence for them. Subclass as a frozen dataclass, e.g.::

        @dataclasses.dataclass(frozen=True)
        class MyTask(OutputTask):
            family = Gaussian()
            ...

    (an undecorated subclass hashes and compares by identity, as any :class:`Task`).
    """

    @property
    @abc.abstractmethod
    def family(self) -> LossFamily:
        """The likelihood of the targets given the outputs."""

    @abc.abstractmethod
    def outputs(self, model: Any, batch: Arrays) -> jax.Array:
        """Model outputs ``[B, T, K]`` (logits, or regression predictions)."""

    @abc.abstractmethod
    def targets(self, batch: Arrays) -> jax.Array:
        """Targets in the family's format: labels ``[B, T]`` (Categorical), ``[B, T, K]`` (Gaussian)."""

    def output_mask(self, batch: Arrays, outputs: jax.Array) -> jax.Array:
        """Which tokens of ``outputs [B, T, K]`` count in the loss, ``[B, T]``; default all."""
        return jnp.ones(outputs.shape[:2], outputs.dtype)

    def loss(self, model, batch, sample_key=None):
        out = self.outputs(model, batch)
        mask = self.output_mask(batch, out)
        targets = self.targets(batch) if sample_key is None else sample_targets(self.family, out, sample_key)
        return self.family.loss(out, targets, mask)

    def sampled_losses(self, model, batch, sample_keys):
        """``[k, B]``: one forward pass, k draws of targets from the family."""
        out = self.outputs(model, batch)
        mask = self.output_mask(batch, out)
        return jnp.stack([self.family.loss(out, sample_targets(self.family, out, keys), mask) for keys in sample_keys])

    def fisher_directions(self, model, batch):
        out = self.outputs(model, batch)
        return self.family.fisher_directions(out, self.output_mask(batch, out))


def _extra(task: Any, batch: Arrays) -> dict[str, jax.Array]:
    """The batch fields a task passes to the model as keyword arguments (``extra_inputs``)."""
    return {name: batch[name] for name in task.extra_inputs}


def _logits_per_example(task, model, batch, width: str):
    """The model's logits ``[B, 1, width]`` for a task of one prediction per example (the
    token axis of length 1 that :class:`OutputTask` expects); refuses other shapes."""
    logits = model(batch[task.x_key], **_extra(task, batch))
    if logits.ndim != 2:
        raise ConfigError(f"{type(task).__name__} expects logits [B, {width}]; the model returned shape "
                          f"{logits.shape}")
    return logits[:, None, :]


def _extra_inputs(value: Any) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(n, str) for n in names):
        raise ConfigTypeError(f"extra_inputs must be batch field names (strings), got {value!r}")
    return names


@dataclasses.dataclass(frozen=True)
class Classification(OutputTask):
    """Softmax cross-entropy on ``model(batch[x_key]) -> logits [B, C]``.

    Args:
      x_key, y_key: batch entries holding inputs and integer labels ``[B]``.
      measurement_kind: ``"loss"`` (cross-entropy of the labelled class) or
        ``"margin"``: −(logit_y − logsumexp of the other logits), loss-like so that
        positive influence still means "upweighting raises the correct-class margin".
      extra_inputs: further batch fields passed to the model by name, e.g.
        ``("mask",)`` calls ``model(batch["x"], mask=batch["mask"])`` (attention masks,
        token types, a second modality).
    """

    family: LossFamily = dataclasses.field(default=Categorical(), init=False)
    x_key: str = "x"
    y_key: str = "y"
    measurement_kind: Literal["loss", "margin"] = "loss"
    extra_inputs: tuple[str, ...] = ()

    def __post_init__(self):
        if self.measurement_kind not in ("loss", "margin"):
            raise ConfigError(f"measurement_kind must be 'loss' or 'margin', got {self.measurement_kind!r}")
        object.__setattr__(self, "extra_inputs", _extra_inputs(self.extra_inputs))

    @property
    def fields(self):  # type: ignore[override]
        return (self.x_key, self.y_key, *self.extra_inputs)

    def outputs(self, model, batch):
        return _logits_per_example(self, model, batch, "C")

    def targets(self, batch):
        return batch[self.y_key].reshape(-1, 1)

    def validate(self, batch, output_shape, *, first_row=0):
        """Labels: one integer per example, in ``[0, C)`` for logits ``[B, C]``."""
        y = batch[self.y_key]
        if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1) or y.ndim == 0:
            raise ConfigError(f"labels {self.y_key!r} must be one integer per example, shape [B]; got trailing shape "
                             f"{y.shape[1:]}")
        check_labels(f"labels {self.y_key!r}", y, None if output_shape is None else output_shape[-1], first_row)

    def measurement(self, model, batch):
        if self.measurement_kind == "loss":
            return self.loss(model, batch)
        logits = self.outputs(model, batch)[:, 0]
        y = batch[self.y_key].astype(jnp.int32)
        correct = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        others = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits)
        return -(correct - jax.nn.logsumexp(others, axis=-1))


@dataclasses.dataclass(frozen=True)
class Regression(OutputTask):
    """Squared error 0.5‖f(x) − y‖² (Gaussian likelihood with unit variance).

    ``model(batch[x_key])`` returns ``[B]`` or ``[B, K]``; targets have the same shape.
    The factor 0.5 makes the Gauss-Newton matrix JᵀJ equal the Fisher of the sampled
    targets y ~ N(f, I).
    """

    family: LossFamily = dataclasses.field(default=Gaussian(), init=False)
    x_key: str = "x"
    y_key: str = "y"

    @property
    def fields(self):  # type: ignore[override]
        return (self.x_key, self.y_key)

    def outputs(self, model, batch):
        out = model(batch[self.x_key])
        if out.ndim == 1:
            out = out[:, None]
        if out.ndim != 2:
            raise ConfigError(f"Regression expects outputs [B] or [B, K]; the model returned shape {out.shape}")
        return out[:, None, :]

    def targets(self, batch):
        y = batch[self.y_key]
        return y.reshape(y.shape[0], 1, -1).astype(jnp.float32)

    def validate(self, batch, output_shape, *, first_row=0):
        """Targets: numbers of the outputs' shape (``[B]`` or ``[B, 1]`` for one output,
        ``[B, K]`` for K), finite."""
        y = batch[self.y_key]
        if y.dtype.kind not in "iuf":
            raise ConfigError(f"targets {self.y_key!r} must be numbers; got dtype {y.dtype}")
        if output_shape is not None:
            k = output_shape[-1]
            allowed = [(k,)] + ([()] if k == 1 else [])
            if y.shape[1:] not in allowed:
                want = " or ".join(_batch_shape(s) for s in allowed)
                raise ConfigError(f"targets {self.y_key!r} must have shape {want} to match the model's {k} output(s); "
                                 f"got {_batch_shape(y.shape[1:])}")
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            row = _first_bad(~np.isfinite(y.reshape(len(y), -1)))
            raise ConfigError(f"targets {self.y_key!r} must be finite; row {first_row + row} is not")


@dataclasses.dataclass(frozen=True)
class CausalLM(OutputTask):
    """Next-token cross-entropy for ``model(input_ids [B, T]) -> logits [B, T, V]``.

    Position t predicts token t+1. ``loss_mask[b, t] = 1`` marks token t as a target
    that counts (padding and, for queries, the prompt are 0; position 0 is never a
    target). Without a mask every token after the first counts. The measurement is
    therefore the completion's loss given the prompt when the prompt is masked out.
    ``extra_inputs`` names further batch fields passed to the model by name (e.g.
    ``("attention_mask", "token_type_ids")``).

    Token convention for the factors A and S: a position counts iff it predicts a
    counted target (T−1 positions for an unpadded sequence); the last position, which
    predicts nothing, is left out of A (kronfluence keeps its activation; see
    docs/method.md).
    """

    family: LossFamily = dataclasses.field(default=Categorical(), init=False)
    input_key: str = "input_ids"
    mask_key: str = "loss_mask"
    extra_inputs: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "extra_inputs", _extra_inputs(self.extra_inputs))

    @property
    def fields(self):  # type: ignore[override]
        return (self.input_key, *self.extra_inputs)

    @property
    def optional_fields(self):  # type: ignore[override]
        return (self.mask_key,)

    def outputs(self, model, batch):
        ids = batch[self.input_key]
        logits = model(ids, **_extra(self, batch))
        if logits.ndim != 3 or logits.shape[:2] != ids.shape:
            raise ConfigError(f"CausalLM expects logits [B, T, V] for input_ids {ids.shape}; got {logits.shape}")
        return logits[:, :-1]

    def targets(self, batch):
        return batch[self.input_key][:, 1:]

    def _target_mask(self, batch) -> jax.Array:
        ids = batch[self.input_key]
        if self.mask_key in batch:
            return batch[self.mask_key][:, 1:].astype(jnp.float32)
        return jnp.ones((ids.shape[0], ids.shape[1] - 1), jnp.float32)

    def output_mask(self, batch, outputs):
        return self._target_mask(batch)

    def validate(self, batch, output_shape, *, first_row=0):
        """Token ids: integers ``[B, T]`` in ``[0, V)`` for logits ``[B, T, V]``; a loss
        mask, if given, of the same shape."""
        ids = batch[self.input_key]
        if ids.ndim != 2:
            raise ConfigError(f"{self.input_key!r} must be token ids [B, T]; got shape {list(ids.shape)}")
        check_labels(f"token ids {self.input_key!r}", ids, None if output_shape is None else output_shape[-1],
                     first_row)
        if self.mask_key in batch and batch[self.mask_key].shape != ids.shape:
            raise ConfigError(f"{self.mask_key!r} must have the shape of {self.input_key!r}, {list(ids.shape)}; "
                             f"got {list(batch[self.mask_key].shape)}")

    def token_mask(self, batch):
        m = self._target_mask(batch)
        return jnp.concatenate([m, jnp.zeros((m.shape[0], 1), m.dtype)], axis=1)


@dataclasses.dataclass(frozen=True)
class MultiLabel(OutputTask):
    """Multi-label classification: independent sigmoid cross-entropies (:class:`Bernoulli`)
    on ``model(batch[x_key]) -> logits [B, K]`` against ``batch[y_key]`` in {0, 1}
    ``[B, K]``, summed over the K labels. The exact Fisher has K directions per example
    (the default Fisher while K ≤ 32).

    Args:
      x_key, y_key: batch entries holding inputs and the 0/1 label matrix.
      extra_inputs: further batch fields passed to the model by name.
    """

    family: LossFamily = dataclasses.field(default=Bernoulli(), init=False)
    x_key: str = "x"
    y_key: str = "y"
    extra_inputs: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "extra_inputs", _extra_inputs(self.extra_inputs))

    @property
    def fields(self):  # type: ignore[override]
        return (self.x_key, self.y_key, *self.extra_inputs)

    def outputs(self, model, batch):
        return _logits_per_example(self, model, batch, "K")

    def targets(self, batch):
        y = batch[self.y_key]
        return y.reshape(y.shape[0], 1, -1).astype(jnp.float32)

    def validate(self, batch, output_shape, *, first_row=0):
        """Labels: 0/1 ``[B, K]`` matching the model's K logits."""
        y = batch[self.y_key]
        if output_shape is not None and y.shape[1:] != (output_shape[-1],):
            raise ConfigError(f"labels {self.y_key!r} must have shape {_batch_shape((output_shape[-1],))} to match the "
                             f"model's {output_shape[-1]} logits; got {_batch_shape(y.shape[1:])}")
        bad = (y != 0) & (y != 1)
        if bad.any():
            row = _first_bad(bad.reshape(len(y), -1))
            raise ConfigError(f"labels {self.y_key!r} must be 0 or 1; row {first_row + row} has another value")
