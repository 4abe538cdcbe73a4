"""Metagradients: the derivative of a query's measurement through a whole training run.

A deterministic training run is a pure function of per-example weights ``w [N]``
(MAGIC, Ilyas & Engstrom 2025): from the initial parameters of a seed, step ``t`` takes
the rows ``order[t] [B]`` of the data, the step objective ``objective(θ, batch, w[rows])``
and one optax update. ``w = 1`` is the ordinary run; ``w_n = 0`` removes example ``n``
from every step it appears in. The metagradient ``∂m_q(θ_T(w)) / ∂w_n [Q, N]`` is the
exact first-order effect of upweighting example ``n`` on query ``q`` *for this run*
(same initialisation, same order), optimizer state, schedule, clipping and weight decay
included.

It is computed by reverse mode through a ``lax.scan`` of ``jax.checkpoint``-ed steps,
grouped in segments of ``s = ⌈√T⌉`` steps, each segment itself checkpointed: the forward
pass keeps the ``(θ, optimizer state)`` carry at ``⌈T/s⌉`` segment boundaries, the
backward pass recomputes one segment at a time keeping its ``s`` step carries. Peak
memory is about ``2√T`` copies of ``(θ, optimizer state)`` plus one step's activations;
compute is about one forward run, one recomputation and the backward pass, whose steps
cost a Hessian-vector product each (a few training runs in all per batch of queries; the
query batch shares the forward and the recomputation).

Sign: :func:`metagradient_scores` returns ``−∂m_q/∂w_n`` as :class:`influence.Scores`, so
that, as for every method of the library, a score > 0 means upweighting the example
lowers the query's measurement.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from influence.errors import InfluenceError, NonFiniteError
from influence.scoring.results import Scores

Params = Any


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """A deterministic training run as a pure function of per-example weights ``w [N]``.

    Attributes:
      init: ``seed -> params`` (a pytree of arrays), the initial parameters.
      tx: the optax optimizer (any ``GradientTransformation``: schedules, clipping,
        weight decay are part of it).
      objective: ``(params, batch, weights [B]) -> scalar``, the step's objective on the
        batch ``data[rows]`` with the rows' weights (``w[rows]``); it must reduce to the
        ordinary objective at ``weights = 1``.
      data: pytree of arrays with a leading axis ``[N, ...]``.
      order: int ``[T, B]`` rows of each step, or ``seed -> [T, B]`` when the batch order
        depends on the seed (re-seeded retraining).
      merge: optional ``params -> nnx.Module`` (trajectory scoring needs a model).
      name: a label for metadata.
      schedule: optional ``step (0-based) -> learning rate``, for the learning-rate-share
        weights of :func:`influence.unrolled.trajectory.trajectory_scores`.
    """

    init: Callable[[int], Params]
    tx: optax.GradientTransformation
    objective: Callable[[Params, Any, jax.Array], jax.Array]
    data: Any
    order: np.ndarray | Callable[[int], np.ndarray]
    merge: Callable[[Params], nnx.Module] | None = None
    name: str = "run"
    schedule: Callable[[int], Any] | None = None

    @property
    def n_train(self) -> int:
        return int(jax.tree.leaves(self.data)[0].shape[0])

    def steps(self, seed: int = 0) -> np.ndarray:
        """The rows of each step, int32 ``[T, B]``."""
        order = self.order(seed) if callable(self.order) else self.order
        order = np.asarray(order, np.int32)
        if order.ndim != 2:
            raise InfluenceError(f"a run's order must be [T steps, B rows], got shape {order.shape}")
        return order

    def model(self, params: Params) -> nnx.Module:
        if self.merge is None:
            raise InfluenceError(f"run {self.name!r} has no merge (params -> model); give TrainingRun(merge=...)")
        return self.merge(params)


def _step(run: TrainingRun):
    """``((θ, state), (rows [B], w [N])) -> (θ, state)``: one optimizer step."""

    def step(carry, rows, w):
        params, state = carry
        batch = jax.tree.map(lambda x: x[rows], run.data)
        grads = jax.grad(run.objective)(params, batch, w[rows])
        updates, state = run.tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _unrolled(run: TrainingRun, params: Params, w: jax.Array, order: jax.Array, remat: bool = True):
    """``(θ_T, state_T)`` after the steps ``order [T, B]`` from ``params``, with weights ``w``.

    With ``remat``, each step and each ``⌈√T⌉``-step segment is ``jax.checkpoint``-ed (see
    the module docstring); without, it is a plain scan (the forward-only path).
    """
    step = _step(run)
    carry = (params, run.tx.init(params))
    T = order.shape[0]
    if not remat:
        return jax.lax.scan(lambda c, rows: (step(c, rows, w), None), carry, order)[0]
    one = jax.checkpoint(lambda c, rows: (step(c, rows, w), None))
    seg = max(1, math.ceil(math.sqrt(T)))
    n_seg, rest = divmod(T, seg)

    @jax.checkpoint
    def segment(c, rows):  # rows [seg, B]
        return jax.lax.scan(one, c, rows)[0], None

    if n_seg:
        carry = jax.lax.scan(segment, carry, order[: n_seg * seg].reshape(n_seg, seg, -1))[0]
    if rest:
        carry = segment(carry, order[n_seg * seg:])[0]
    return carry


def _check_weights(run: TrainingRun, w) -> jax.Array:
    n = run.n_train
    dtype = jax.tree.leaves(run.init(0))[0].dtype if w is None else None
    w = jnp.ones(n, dtype) if w is None else jnp.asarray(w)
    if w.shape != (n,):
        raise InfluenceError(f"weights must have shape [N] = ({n},), got {w.shape}")
    return w


def train(run: TrainingRun, w=None, seed: int = 0) -> Params:
    """The run's final parameters with per-example weights ``w [N]`` (default all ones)."""
    w = _check_weights(run, w)
    params = run.init(seed)
    fn = jax.jit(lambda p, w, order: _unrolled(run, p, w, order, remat=False)[0])
    return fn(params, w.astype(jax.tree.leaves(params)[0].dtype), jnp.asarray(run.steps(seed)))


def train_many(run: TrainingRun, weights, seeds: Sequence[int]) -> Params:
    """``K`` runs side by side under ``vmap``: weights ``[K, N]``, seeds ``[K]``; returns
    parameters stacked ``[K, ...]``. Each run uses its seed's initialisation and order."""
    weights = jnp.asarray(weights)
    if weights.ndim != 2 or weights.shape[0] != len(seeds) or weights.shape[1] != run.n_train:
        raise InfluenceError(f"weights must be [K={len(seeds)}, N={run.n_train}], got {weights.shape}")
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[run.init(int(s)) for s in seeds])
    orders = jnp.asarray(np.stack([run.steps(int(s)) for s in seeds]))
    fn = jax.jit(jax.vmap(lambda p, w, order: _unrolled(run, p, w, order, remat=False)[0]))
    return fn(params, weights.astype(jax.tree.leaves(params)[0].dtype), orders)


def states_at(run: TrainingRun, steps: Sequence[int], w=None, seed: int = 0) -> list[tuple[Params, Any]]:
    """``(θ_t, optimizer state_t)`` after each of ``steps`` (sorted, in ``1..T``; ``0`` is
    the initialisation), for checkpoint-based methods."""
    w = _check_weights(run, w)
    order = run.steps(seed)
    params = run.init(seed)
    w = w.astype(jax.tree.leaves(params)[0].dtype)
    step = jax.jit(_step(run))
    carry, done, out = (params, run.tx.init(params)), 0, []
    for t in sorted(int(s) for s in steps):
        if not 0 <= t <= len(order):
            raise InfluenceError(f"checkpoint step {t} is outside the run's 0..{len(order)} steps")
        for i in range(done, t):
            carry = step(carry, jnp.asarray(order[i]), w)
        done = t
        out.append(carry)
    return out


def _peak_bytes(compiled) -> int | None:
    """Arguments + outputs + XLA temporaries of a compiled program (``None`` where the
    backend does not say)."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # an optional statistic: some backends have none
        return None


def metagradients(run: TrainingRun, measure: Callable[[Params, Any], jax.Array], queries: Any, w=None,
                  seed: int = 0, query_chunk: int = 32, stats: dict | None = None) -> np.ndarray:
    """``∂m_q(θ_T(w)) / ∂w_n``, float ``[Q, N]``, exactly, by reverse mode through the run.

    Args:
      measure: ``(params, queries) -> [Q]`` the query measurements of final parameters.
      queries: what ``measure`` reads (a pytree).
      w: the weights to differentiate at ``[N]`` (default all ones: the ordinary run).
      query_chunk: queries whose backward passes are vectorised together (memory
        grows with it; the forward run is shared within a chunk).
      stats: a dict to fill with ``metagradient_bytes`` and ``training_bytes``: the
        compiled programs' memory (arguments, outputs, temporaries) of one chunk's
        metagradients and of one forward training run, as XLA reports them.

    Raises:
      FloatingPointError: a metagradient is NaN or Inf, with the likely fix.
    """
    w = _check_weights(run, w)
    params = run.init(seed)
    w = w.astype(jax.tree.leaves(params)[0].dtype)
    order = jnp.asarray(run.steps(seed))

    def final_measure(w):
        return measure(_unrolled(run, params, w, order)[0], queries)

    @jax.jit
    def chunk_grads(w, cotangents):  # cotangents [c, Q]
        values, pullback = jax.vjp(final_measure, w)
        return jax.vmap(lambda ct: pullback(ct)[0])(cotangents)

    n_q = int(jax.eval_shape(final_measure, w).shape[0])
    chunk = min(query_chunk, n_q)
    # zero cotangent rows pad the last chunk, so every chunk runs the one compiled program
    eye = jnp.eye(-(-n_q // chunk) * chunk, n_q, dtype=w.dtype)
    compiled = chunk_grads.lower(w, eye[:chunk]).compile()
    if stats is not None:
        stats.update(metagradient_bytes=_peak_bytes(compiled), training_bytes=_peak_bytes(
            jax.jit(lambda w: _unrolled(run, params, w, order, remat=False)[0]).lower(w).compile()))
    rows = [np.asarray(compiled(w, eye[lo:lo + chunk])) for lo in range(0, len(eye), chunk)]
    grads = np.concatenate(rows)[:n_q]
    if not np.all(np.isfinite(grads)):
        bad = int(np.sum(~np.all(np.isfinite(grads), axis=1)))
        raise NonFiniteError(
            f"{bad} of {n_q} queries have NaN/Inf metagradients. The usual cause is Adam's √ν at ν = 0 (a "
            "parameter whose gradient is exactly zero at a step, e.g. an embedding row no batch uses), whose "
            "derivative is infinite: give the optimizer eps_root > 0 (optax.adam(..., eps_root=1e-16)); "
            "also check that the run itself stays finite (train(run) has no NaN)")
    return grads


def metagradient_scores(run: TrainingRun, measure: Callable[[Params, Any], jax.Array], queries: Any, w=None,
                        seed: int = 0, query_chunk: int = 32, memory: bool = False) -> Scores:
    """Metagradient influence as :class:`influence.Scores` ``[Q, N]``: ``values = −∂m_q/∂w_n``
    (a score > 0 means upweighting example n lowers query q's measurement), in the
    measurement's units per unit of weight. Arguments as :func:`metagradients`; with
    ``memory``, the metadata holds its ``stats`` (memory of the metagradient and of a
    training run; the latter costs one more compilation)."""
    stats: dict | None = {} if memory else None
    values = -metagradients(run, measure, queries, w, seed, query_chunk, stats)
    order = run.steps(seed)
    return Scores(values, None, {**(stats or {}), "strategy": "metagradient", "run": run.name, "seed": int(seed),
                                 "steps": int(order.shape[0]), "batch_size": int(order.shape[1]),
                                 "n_train": run.n_train, "n_queries": int(values.shape[0])})


# --- adapters -------------------------------------------------------------------------


def full_batch(n_train: int, steps: int) -> np.ndarray:
    """The order of a full-batch run: every row at every step, ``[steps, n_train]``."""
    return np.broadcast_to(np.arange(n_train, dtype=np.int32), (steps, n_train))


def mean_loss_run(make_model: Callable[[int], nnx.Module], task: Any, data: dict, tx: optax.GradientTransformation,
                  steps: int, weight_decay: float = 0.0, order: np.ndarray | None = None,
                  dtype: Any = None, schedule: Callable[[int], Any] | None = None) -> TrainingRun:
    """The digits trainer (:func:`influence.reference.training.fit_many` with
    ``weighted_mean_loss``) as a :class:`TrainingRun`: objective ``Σ_b w_b L_b / Σ_b w_b +
    weight_decay · ‖θ‖²`` of the task's per-example losses, full batch unless ``order``
    gives mini-batches. ``dtype`` casts parameters and floating data (e.g. float64)."""
    graphdef, _, rest = nnx.split(make_model(0), nnx.Param, ...)

    def cast(x):
        return x.astype(dtype) if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x

    def init(seed):
        return jax.tree.map(lambda x: cast(jnp.asarray(x)), nnx.split(make_model(seed), nnx.Param, ...)[1])

    rest = jax.tree.map(lambda x: cast(jnp.asarray(x)), rest)
    data = {k: cast(jnp.asarray(v)) for k, v in data.items()}
    n = len(next(iter(data.values())))

    def merge(params):
        return nnx.merge(graphdef, params, rest)

    def objective(params, batch, weights):
        reg = sum(jnp.sum(x**2) for x in jax.tree.leaves(params))
        # a mini-batch whose examples all have weight 0 (a removal) contributes only the L2 term
        total = jnp.maximum(jnp.sum(weights), 1e-12)
        return jnp.sum(task.loss(merge(params), batch) * weights) / total + weight_decay * reg

    return TrainingRun(init, tx, objective, data, full_batch(n, steps) if order is None else order, merge,
                       name="mean-loss", schedule=schedule)


def lm_run(cfg: Any, train_ids: np.ndarray, train_mask: np.ndarray, eps_root: float = 1e-16,
           steps: int | None = None, vocab_size: int | None = None) -> TrainingRun:
    """An ``influence train`` run (:class:`influence.lm.Trainer`) as a :class:`TrainingRun`:
    the same model initialisation per seed, the same batches (a per-epoch permutation from
    ``(seed, epoch)``), the mean next-token loss per target token, and the same clipped
    AdamW on its warmup + cosine schedule, with ``eps_root`` added inside Adam's √ν (its
    derivative is infinite at ν = 0, which an unused embedding row has; 1e-16 is below
    float32 resolution of any ν a used parameter has).

    Example weights multiply each sequence's summed token loss; the normaliser stays the
    batch's target-token count, so ``w = 1`` is the trainer's objective.

    Args:
      cfg: the run's ``TrainConfig`` (resolved or not); ``cfg.seed`` is seed 0's order
        only through :meth:`TrainingRun.steps` (seeds are explicit).
      train_ids, train_mask: int ``[N, T]`` the run's training sequences.
      steps: stop after this many steps (default the run's total).
      vocab_size: the tokenizer's (``run.tokenizer.vocab_size``; default ``cfg.vocab_size``).
    """
    from influence.lm.model import get_scale, init_model, token_losses
    from influence.lm.train import learning_rate_schedule, make_optimizer

    cfg = cfg.resolved()
    model_config = get_scale(cfg.scale).config(vocab_size or cfg.vocab_size, cfg.seq_len)
    graphdef, _, rest = nnx.split(init_model(model_config, 0), nnx.Param, ...)
    total = cfg.total_steps if steps is None else int(steps)
    b = cfg.batch_size
    n = len(train_ids)
    per_epoch = n // b
    if per_epoch < 1:
        raise InfluenceError(f"only {n} training sequences for batch_size {b}")
    tx = make_optimizer(cfg, eps_root=eps_root)

    def order(seed):
        rows = []
        for step in range(total):
            epoch, i = divmod(step, per_epoch)
            rows.append(np.random.default_rng([seed, epoch]).permutation(n)[i * b:(i + 1) * b])
        return np.stack(rows)

    def merge(params):
        return nnx.merge(graphdef, params, rest)

    def objective(params, batch, weights):
        ids, mask = batch["input_ids"], batch["loss_mask"]
        per_seq = token_losses(merge(params), ids, mask).sum(axis=1)
        return jnp.sum(per_seq * weights) / jnp.maximum(mask[:, 1:].sum(), 1).astype(per_seq.dtype)

    data = {"input_ids": jnp.asarray(train_ids), "loss_mask": jnp.asarray(train_mask)}
    return TrainingRun(lambda seed: nnx.split(init_model(model_config, seed), nnx.Param, ...)[1], tx, objective,
                       data, order, merge, name=f"lm-{cfg.scale}",
                       schedule=learning_rate_schedule(cfg))

