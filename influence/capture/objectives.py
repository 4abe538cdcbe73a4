"""What is differentiated in each pass, as pure functions of ``(state, batch)``.

``kind`` selects the objective whose layer gradients are captured:

* ``"sampled"``: training loss with targets sampled from the model (true Fisher), one
  key per example (:func:`example_keys`), so the draws do not depend on the batching;
  ``"sampled*k"`` (:func:`sampled_kind`) draws k targets per example, draw j with
  ``fold_in(example key, j)``, as k Fisher directions ``loss_j / √k`` (so Σ_j g_j g_jᵀ
  is the mean over the draws);
* ``"empirical"``: training loss with the data's labels (empirical Fisher, and the
  training gradients that are scored);
* ``"exact"``: the task's Fisher directions (exact Fisher, several backward passes);
* ``"measurement"``: the task's query measurement.

Padding rows are given weight 0, so they contribute nothing to any sum.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jax_core

from influence.capture.activations import capture
from influence.capture.rest import REST, rest_gradients, rest_layer
from influence.capture.tracking import LayerInfo
from influence.errors import ConfigError, TaskError, TrackingError

KINDS = ("sampled", "empirical", "exact", "measurement")
_DRAWS = "sampled*"


def sampled_kind(samples: int) -> str:
    """The gradient kind of the sampled Fisher with ``samples`` draws per example:
    ``"sampled"`` for one (no direction axis), ``"sampled*k"`` for k."""
    return "sampled" if samples == 1 else f"{_DRAWS}{samples}"


def sample_count(kind: str) -> int:
    """Draws per example of a sampled kind (1 for ``"sampled"``), 0 for the other kinds."""
    if kind == "sampled":
        return 1
    return int(kind[len(_DRAWS):]) if kind.startswith(_DRAWS) else 0


def has_directions(kind: str) -> bool:
    """Whether ``kind``'s objective is a vector of K Fisher directions, so ``g`` is
    ``[K, B, T, d_out]``: the exact Fisher, or several sampled draws."""
    return kind == "exact" or sample_count(kind) > 1


def draw_keys(keys: jax.Array, draw: int) -> jax.Array:
    """Keys of draw ``draw`` of every example: ``fold_in(key_n, draw)`` for each of the
    per-example keys ``keys [B]`` (or of one scalar key, for a loss that takes one)."""
    if keys.ndim == 0:
        return jax.random.fold_in(keys, draw)
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, draw)


def example_keys(key: jax.Array, rows: jax.Array) -> jax.Array:
    """Keys of sampled targets: ``fold_in(key, row)`` for each global row index ``rows
    [B]`` (int32), a ``[B]`` key array. An example's key depends only on its row in the data
    set, so the sampled Fisher is the same whatever the batch size, device count or number
    of batches. A scalar ``rows`` gives one key for the batch (``fold_in(key, rows)``)."""
    if jnp.ndim(rows) == 0:
        return jax.random.fold_in(key, rows)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)


def _uses_input(closed: Any, position: int) -> bool:
    """Whether output of the jaxpr ``closed`` depends on its input ``position`` (a backward
    walk over its equations; a nested call counts as using all of its inputs)."""
    jaxpr = closed.jaxpr
    live = {v for v in jaxpr.outvars if not isinstance(v, jax_core.Literal)}
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if not isinstance(v, jax_core.Literal))
    return jaxpr.invars[position] in live


def sample_key_mode(model: Any, task: Any, batch: dict[str, Any], key: jax.Array) -> str:
    """How ``task.loss`` takes its ``sample_key``, checked on one batch by tracing (no
    computation): ``"example"`` (a ``[B]`` key array) or ``"batch"`` (one scalar key, for
    a loss written before per-example keys; warned, since the sampled targets then depend
    on how the data is batched). :class:`TaskError` if the loss ignores the key (it would
    silently give the empirical Fisher) or is not ``[B]``. A loss that fails to trace
    either way is left to the pass, which reports the failure with the batch's shapes."""
    graphdef, state = nnx.split(model)
    size = len(next(iter(batch.values())))

    def sampled(state, batch, keys):
        return task.loss(nnx.merge(graphdef, state), batch, sample_key=keys)

    keys = example_keys(key, jnp.arange(size, dtype=jnp.int32))
    try:
        closed, mode = jax.make_jaxpr(sampled)(state, batch, keys), "example"
    except NotImplementedError:  # the task cannot sample: its message says what to use instead
        raise
    except Exception:  # retried with one key
        try:
            closed, mode = jax.make_jaxpr(sampled)(state, batch, key), "batch"
        except NotImplementedError:
            raise
        except Exception:  # the forward fails either way: the pass runs it and reports the failure in context
            return "example"
    shape = tuple(closed.out_avals[0].shape)
    if shape != (size,):
        raise TaskError(f"{type(task).__name__}.loss with a sample_key must return one number per example, shape "
                        f"[B] = [{size}]; it returned shape {list(shape)} (losses are per-example sums)")
    n_inputs = len(jax.tree.leaves((state, batch)))
    if not _uses_input(closed, n_inputs):
        raise TaskError(
            f"fisher='sampled', but {type(task).__name__}.loss ignores its sample_key: its value does not depend on "
            "the key, so the result would be the empirical Fisher. Use fisher='empirical', or draw the targets "
            "from the model's predictions with sample_key (a [B] array of keys, one per example)")
    if mode == "batch":
        warnings.warn(
            f"{type(task).__name__}.loss takes one scalar sample_key, not the [B] array of per-example keys: the "
            "sampled Fisher then depends on batch_size and the device count. Draw example b's targets with "
            "sample_key[b] (e.g. jax.vmap over the examples) to make it independent of them", stacklevel=3)
    return mode


def fisher_direction_count(model: Any, task: Any, batch: dict[str, Any]) -> int | None:
    """Number K of ``task.fisher_directions`` of one batch, checked by tracing (no
    computation): :class:`TaskError` unless they are ``[K, B]`` pseudo-losses, one column
    per example (a ``[B, K]`` transpose, a ``[B]`` loss or a ``[K, B, T]`` array would be
    summed into a wrong Fisher without an error). ``NotImplementedError`` (the task has no
    exact Fisher) propagates; ``None`` when the forward pass fails to trace, which the pass
    then reports with the batch's shapes."""
    graphdef, state = nnx.split(model)
    size = len(next(iter(batch.values())))

    def directions(state, batch):
        return task.fisher_directions(nnx.merge(graphdef, state), batch)

    try:
        shape = tuple(jax.eval_shape(directions, state, batch).shape)
    except NotImplementedError:
        raise
    except Exception:  # the forward fails: the pass runs it and reports the failure in context
        return None
    if len(shape) != 2 or shape[1] != size:
        raise TaskError(
            f"fisher='exact' needs {type(task).__name__}.fisher_directions to return pseudo-losses [K, B] = "
            f"[K, {size}] (K directions per example, one column per example, summed over tokens); it returned shape "
            f"{list(shape)}. For an OutputTask, the family's fisher_directions gets outputs [B, T, K] and must return "
            "[T*K, B]")
    return shape[0]


# The default Fisher (fit_factors(fisher=None)), chosen by measurement (docs/benchmarks.md,
# "Which Fisher"): the exact Fisher where it costs at most EXACT_MAX_DIRECTIONS backward
# passes per example, else enough sampled draws per example for DEFAULT_SAMPLES sampled
# targets: 4 draws for one output per example (a classifier), one for a sequence of T ≥ 4
# target tokens (an LM: each draw samples every token; on the tiny LM 4 draws were within
# the standard error of one, at 3× the fit time — lds-fisher-lm.json).
EXACT_MAX_DIRECTIONS = 32
DEFAULT_SAMPLES = 4


def target_tokens(model: Any, task: Any, batch: dict[str, Any]) -> int:
    """Target positions T per example of an :class:`~influence.tasks.OutputTask` (its
    outputs are ``[B, T, K]``), traced on one batch without computing it; 1 for another
    task or when the outputs fail to trace (the pass then reports the failure)."""
    outputs = getattr(task, "outputs", None)
    if outputs is None:
        return 1
    graphdef, state = nnx.split(model)
    try:
        shape = jax.eval_shape(lambda state, batch: outputs(nnx.merge(graphdef, state), batch), state, batch).shape
    except Exception:  # the forward fails: the pass reports it in context
        return 1
    return int(shape[1]) if len(shape) == 3 else 1


def default_draws(tokens: int) -> int:
    """Sampled draws per example by default: ⌈DEFAULT_SAMPLES / T⌉ for T target tokens
    per example (each draw samples all T)."""
    return max(1, -(-DEFAULT_SAMPLES // max(1, tokens)))


class FisherChoice(NamedTuple):
    """The Fisher a fit uses, settled on its first batch.

    Attributes:
      fisher: ``"sampled"``, ``"empirical"`` or ``"exact"``.
      samples: draws per example (``None`` unless sampled).
      kind: the gradient kind of the passes (:func:`sampled_kind` for sampled).
      key_mode: how the loss takes sample keys (:func:`sample_key_mode`; ``"example"``
        when not sampled).
      rule: why this Fisher, in words (``"requested"`` for an explicit ``fisher=``).
    """

    fisher: str
    samples: int | None
    kind: str
    key_mode: str
    rule: str


def check_sampled_draws(model: Any, task: Any, batch: dict[str, Any], key: jax.Array, samples: int,
                        mode: str) -> None:
    """:class:`TaskError` unless ``task.sampled_losses`` gives ``[k, B]`` for ``samples`` = k
    draws (traced, no computation); ``NotImplementedError`` if the task has none."""
    graphdef, state = nnx.split(model)
    size = len(next(iter(batch.values())))
    keys = example_keys(key, jnp.arange(size, dtype=jnp.int32)) if mode == "example" else key
    keys = jnp.stack([draw_keys(keys, j) for j in range(samples)])

    def draws(state, batch):
        return task.sampled_losses(nnx.merge(graphdef, state), batch, keys)

    try:
        shape = tuple(jax.eval_shape(draws, state, batch).shape)
    except NotImplementedError:
        raise
    except Exception:  # the forward fails: the pass reports it in context
        return
    if shape != (samples, size):
        raise TaskError(f"fisher_samples={samples} needs {type(task).__name__}.sampled_losses to return [k, B] = "
                        f"[{samples}, {size}] (one loss per draw and example); it returned shape {list(shape)}")


def choose_fisher(model: Any, task: Any, batch: dict[str, Any], key: jax.Array, fisher: str | None,
                  samples: int | None) -> FisherChoice:
    """The Fisher of a fit, from the request and one batch (traced, not computed).

    An explicit ``fisher`` is used as given, after its first-batch contract checks (the
    exact Fisher's ``[K, B]`` directions; the sampled loss's use of its key). ``None``
    chooses by the task, the rule measured on digits (docs/benchmarks.md, "Which Fisher"):

    * the task gives exact directions (:meth:`Task.fisher_directions`, e.g. a
      classifier with C classes: K = C per example, a regression with K outputs: K) and
      K ≤ :data:`EXACT_MAX_DIRECTIONS`: ``"exact"`` — noise-free, the best LDS, and K
      backward passes cost little while K is small;
    * else, if the loss samples targets: ``"sampled"`` with ``samples`` draws per example
      (default :func:`default_draws`: 4 for one output per example, 1 for an LM, whose
      T·V directions are too many and whose every draw samples T tokens);
    * else (a loss that ignores its key, a family that cannot sample): ``"empirical"``,
      with a warning.
    """
    if fisher is not None:
        if fisher == "exact":
            fisher_direction_count(model, task, batch)
        if fisher != "sampled":
            return FisherChoice(fisher, None, fisher, "example", "requested")
        samples = samples or 1
        mode = sample_key_mode(model, task, batch, key)
        if samples > 1:
            check_sampled_draws(model, task, batch, key, samples, mode)
        return FisherChoice("sampled", samples, sampled_kind(samples), mode, "requested")
    try:
        directions = fisher_direction_count(model, task, batch)
    except NotImplementedError:
        directions = None
    if directions is not None and directions <= EXACT_MAX_DIRECTIONS and samples is None:
        return FisherChoice("exact", None, "exact", "example",
                            f"default: exact, the task has {directions} Fisher directions per example "
                            f"(<= {EXACT_MAX_DIRECTIONS})")
    tokens = target_tokens(model, task, batch) if samples is None else None
    samples = samples or default_draws(tokens)
    why = ("fisher_samples given" if directions is not None and directions <= EXACT_MAX_DIRECTIONS else
           f"{directions} exact Fisher directions per example (> {EXACT_MAX_DIRECTIONS})" if directions is not None
           else "the task has no exact Fisher")
    try:
        mode = sample_key_mode(model, task, batch, key)
    except (TaskError, NotImplementedError) as e:
        warnings.warn(
            f"fisher: {type(task).__name__} uses the empirical Fisher (gradients of its loss at the data's own "
            f"labels), because {why} (no fisher_directions) and its loss does not draw targets from sample_key "
            f"({e}). The empirical Fisher is not the Gauss-Newton matrix the factors approximate, and is poor away "
            "from a minimum. For the exact or sampled Fisher, subclass influence.tasks.OutputTask with a LossFamily "
            "(or use a built-in task: Classification, MultiLabel, Regression, CausalLM); pass fisher='empirical' to "
            "choose it knowingly and silence this", stacklevel=4)
        return FisherChoice("empirical", None, "empirical", "example",
                            f"default: empirical, {why} and the loss cannot sample targets")
    if samples > 1:
        try:
            check_sampled_draws(model, task, batch, key, samples, mode)
        except NotImplementedError:  # a custom loss that draws once per call
            samples, why = 1, why + f"; one draw, since {type(task).__name__} has no sampled_losses"
    if tokens is not None:
        why += (f"; {tokens} target tokens per example, {samples} draw{'s' if samples > 1 else ''} for at least "
                f"{DEFAULT_SAMPLES} sampled targets")
    return FisherChoice("sampled", samples, sampled_kind(samples), mode,
                        f"default: sampled with {samples} draw{'s' if samples > 1 else ''} per example, {why}")


def _objective(task, kind: str, batch, example_mask, key):
    if kind == "sampled":
        return lambda model: jnp.sum(task.loss(model, batch, sample_key=key) * example_mask)
    if sample_count(kind) > 1:
        draws = sample_count(kind)
        scale = 1.0 / jnp.sqrt(jnp.float32(draws))

        def sampled_draws(model):  # [k]: one forward pass, k draws of targets
            keys = jnp.stack([draw_keys(key, j) for j in range(draws)])
            return (task.sampled_losses(model, batch, keys) @ example_mask) * scale

        return sampled_draws
    if kind == "empirical":
        return lambda model: jnp.sum(task.loss(model, batch) * example_mask)
    if kind == "measurement":
        return lambda model: jnp.sum(task.measurement(model, batch) * example_mask)
    if kind == "exact":
        return lambda model: task.fisher_directions(model, batch) @ example_mask
    raise ConfigError(f"unknown gradient kind {kind!r}; expected one of {KINDS} or 'sampled*k'")


def layer_gradients(
    graphdef: Any,
    state: Any,
    layers: tuple[LayerInfo, ...],
    task: Any,
    kind: str,
    batch: dict[str, jax.Array],
    example_mask: jax.Array,
    key: jax.Array | None = None,
):
    """Captured ``(objective value, a, g)`` for one padded batch (see :func:`capture`)."""
    batch_size = example_mask.shape[0]
    objective = _objective(task, kind, batch, example_mask, key)

    def checked(model):
        try:
            return objective(model)
        except (TypeError, ValueError) as e:
            if isinstance(e, TrackingError):
                raise
            shapes = {k: tuple(v.shape) for k, v in batch.items()}
            raise ConfigError(f"the task's forward pass failed on a batch with fields {shapes}: {e}") from e

    rest = [info for info in layers if info.name == REST]
    if not rest:
        return capture(graphdef, state, layers, checked, batch_size)
    # ~rest (capture.rest): per-example gradients of the parameters outside the layers,
    # beside the layers' one captured backward pass
    real = tuple(info for info in layers if info.name != REST)
    spec = rest_layer(state, {info.name for info in real})
    if spec is None or spec.d_out != rest[0].d_out:
        raise TrackingError(f"{REST} was fitted on {rest[0].d_out} parameters outside the tracked layers; this model "
                            f"has {0 if spec is None else spec.d_out}")
    if real:
        value, a, g = capture(graphdef, state, real, checked, batch_size)
    else:
        value, a, g = capture(graphdef, state, (), checked, batch_size)
    a[REST], g[REST] = rest_gradients(graphdef, state, spec, lambda b, m, k: _objective(task, kind, b, m, k),
                                      batch, example_mask, key)
    return value, a, g


def token_weights(task: Any, batch, example_mask: jax.Array, a: jax.Array) -> jax.Array:
    """Weights ``[B, T]`` of the token positions of a layer input ``a [B, T, d_a]``.

    Padding examples weigh 0. The task's token mask applies when its shape matches the
    layer's token axis; a layer that sees a different token axis (e.g. a classifier head
    after pooling) counts all of its positions.
    """
    weights = jnp.broadcast_to(example_mask[:, None], a.shape[:2])
    mask = task.token_mask(batch)
    if mask is not None and mask.shape == a.shape[:2]:
        weights = weights * mask.astype(weights.dtype)
    return weights


STEP_MEMORY_FACTOR = 4
"""What a step holds per example, as a multiple of its captured ``a`` and ``g``: those,
the forward activations kept for the backward pass, and the step's own intermediates
(an estimate: it sizes batches, see :func:`bytes_per_example`)."""


def captured_shapes(graphdef: Any, state: Any, layers: tuple[LayerInfo, ...], task: Any, kind: str,
                    row: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Shapes of ``a`` and ``g`` per layer for ``row``, a one-example batch (traced, not computed)."""
    arrays = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in row.items()}
    mask = jax.ShapeDtypeStruct((1,), jnp.float32)
    traced_kind = kind if kind in ("exact", "measurement") else "empirical"
    _, a, g = jax.eval_shape(lambda b, m: layer_gradients(graphdef, state, layers, task, traced_kind, b, m),
                             arrays, mask)
    return {n: tuple(x.shape) for n, x in a.items()}, {n: tuple(x.shape) for n, x in g.items()}


def bytes_per_example(graphdef: Any, state: Any, layers: tuple[LayerInfo, ...], task: Any, kind: str,
                      row: dict[str, Any], *, per_example_gradients: bool = False) -> int:
    """Estimated bytes one example costs a capture step: :data:`STEP_MEMORY_FACTOR` ×
    its float32 ``a [T, d_a]`` and ``g [(K,) T, d_out]`` over the tracked layers (shapes
    from tracing ``row``, a one-example batch, without computing it), plus its
    per-example gradients ``[d_a, d_out]`` per layer when the step forms them all
    (``per_example_gradients``, the query pass)."""
    a, g = captured_shapes(graphdef, state, layers, task, kind, row)
    draws = max(1, sample_count(kind))  # k sampled draws: g gains a draw axis, traced here without it
    floats = sum(math.prod(a[i.name]) + draws * math.prod(g[i.name]) for i in layers)
    floats *= STEP_MEMORY_FACTOR
    if per_example_gradients:
        floats += sum(i.d_a * i.d_out for i in layers)
    return 4 * int(floats)
