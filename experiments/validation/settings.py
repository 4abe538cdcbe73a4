"""The validation settings: a model trained on a training set, queries, and how to retrain.

Each :class:`Setting` holds the model trained on the full training set (seed 0), the task
whose loss it was trained on, the query measurements to validate against, and a
``retrain(masks, seeds)`` function that trains one model per (subset, seed) with *the same
recipe* and returns every query measurement. ``key`` names everything that determines a
retrained measurement (the cache key of :class:`influence.reference.MeasurementCache`).

Settings:
  * ``digits``: tanh MLP 64-64-64-10 on scikit-learn's bundled digits, full-batch Adam;
    measurements: the query's margin and its loss.
  * ``cnn``: the first 256 digits with a :class:`DigitsCNN` (two 3×3 convolutions, 4 and
    8 channels, then 512-32-10 linear layers, tanh), full-batch Adam, 200 steps.
  * ``diabetes``: tanh MLP 10-32-32-1 regression on scikit-learn's bundled diabetes data
    (standardised), full-batch Adam; measurement: the query's squared error.
  * ``lm``: the ``tiny`` rung of the model ladder (``influence.lm.LADDER``: d=32, one
    block, two heads, context 32) on Shakespeare sequences, trained with the ladder's own
    optimizer (AdamW, warmup + cosine, clipping) in mini-batches; measurement: the query
    sequence's summed loss.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_diabetes

from influence import tasks
from influence.reference.training import evaluate_many, fit_many, model_from, stack_models, weighted_mean_loss
from influence.testing import digits

RUNS = Path("runs/validation")


@dataclasses.dataclass
class Setting:
    """A trained model and everything needed to validate influence scores on it.

    Attributes:
      model: the model trained on the whole training set with seed 0.
      task: the training loss (fits factors, gives training gradients).
      measurements: measurement name -> task whose ``measurement`` it is.
      train, queries: dicts of arrays ``[N, ...]`` and ``[Q, ...]``.
      retrain: ``(masks [m, N], seeds) -> [m, len(seeds), n_measurements · Q]``,
        measurements concatenated in the order of ``measurements``.
      key: JSON-serialisable settings that determine the retrained measurements.
      batch_size: batch size for fitting and scoring.
    """

    name: str
    model: nnx.Module
    task: Any
    measurements: dict[str, Any]
    train: dict[str, np.ndarray]
    queries: dict[str, np.ndarray]
    retrain: Callable[[np.ndarray, Sequence[int]], np.ndarray]
    key: dict[str, Any]
    batch_size: int = 64

    @property
    def n_train(self) -> int:
        return len(next(iter(self.train.values())))

    @property
    def n_queries(self) -> int:
        return len(next(iter(self.queries.values())))

    def split(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """``[..., n_measurements · Q]`` -> measurement name -> ``[..., Q]``."""
        q = self.n_queries
        return {name: values[..., i * q : (i + 1) * q] for i, name in enumerate(self.measurements)}


class DeepMLP(nnx.Module):
    """``d_in → hidden... → d_out`` with tanh between layers (a smooth loss surface)."""

    def __init__(self, d_in: int, hidden: Sequence[int], d_out: int, *, rngs: nnx.Rngs):
        sizes = [d_in, *hidden, d_out]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        out = self.layers[-1](x)
        return out[..., 0] if out.shape[-1] == 1 else out


class DigitsCNN(nnx.Module):
    """A small CNN on the 8×8 digits, ``x [B, 64]`` → logits ``[B, 10]``: two 3×3 ``SAME``
    convolutions (1 → c1 → c2 channels) and two linear layers (8·8·c2 → hidden → 10),
    ``activation`` between them. The images are NHWC ``[B, 8, 8, 1]``; the flatten is in
    (row, column, channel) order."""

    def __init__(self, channels: Sequence[int] = (8, 16), hidden: int = 32, activation: str = "tanh", *,
                 rngs: nnx.Rngs):
        c1, c2 = channels
        self.conv1 = nnx.Conv(1, c1, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), padding="SAME", rngs=rngs)
        self.fc1 = nnx.Linear(8 * 8 * c2, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, 10, rngs=rngs)
        self.activation = {"tanh": jnp.tanh, "relu": nnx.relu}[activation]

    def __call__(self, x):
        act = self.activation
        h = act(self.conv2(act(self.conv1(x.reshape(-1, 8, 8, 1)))))
        return self.fc2(act(self.fc1(h.reshape(h.shape[0], -1))))


def mlp_setting(name, train, queries, task, measurements, *, hidden, d_out, steps, lr, weight_decay, key,
                make=None) -> Setting:
    """A full-batch Adam setting: every model (base and retrained) follows this recipe.
    ``make(seed)`` builds the initial model (default: a :class:`DeepMLP` of ``hidden``)."""
    d_in = train["x"].shape[1]
    if make is None:
        make = lambda seed: DeepMLP(d_in, hidden, d_out, rngs=nnx.Rngs(seed))  # noqa: E731
    shared = {k: jnp.asarray(v) for k, v in train.items()}
    query_arrays = {k: jnp.asarray(v) for k, v in queries.items()}
    loss = weighted_mean_loss(task)

    def train_models(weights: np.ndarray, seeds: Sequence[int]):
        graphdef, params, rest = stack_models(make, seeds)
        w = jnp.asarray(weights, jnp.float32)
        params = fit_many(graphdef, params, rest, optax.adam(lr), loss, shared, lambda _: w, steps, weight_decay)
        return graphdef, params, rest

    def retrain(masks: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        pairs = [(j, s) for j in range(len(masks)) for s in seeds]
        graphdef, params, rest = train_models(np.stack([masks[j] for j, _ in pairs]), [s for _, s in pairs])
        values = [evaluate_many(graphdef, params, rest, lambda m, d, t=t: t.measurement(m, d), query_arrays)
                  for t in measurements.values()]
        return np.concatenate(values, axis=1).reshape(len(masks), len(seeds), -1)

    graphdef, params, rest = train_models(np.ones((1, len(train["y"]))), [0])
    recipe = dict(hidden=list(hidden), steps=steps, lr=lr, weight_decay=weight_decay, optimizer="adam full-batch")
    return Setting(name, model_from(graphdef, params, rest), task, measurements, train, queries, retrain,
                   {"setting": name, **key, **recipe, "measurements": list(measurements)})


def digits_setting(n_train: int = 512, n_queries: int = 64, hidden=(64, 64), steps: int = 300, lr: float = 1e-2,
                   weight_decay: float = 1e-3) -> Setting:
    """Digits classification: the first ``n_train`` images train; queries are taken
    from the last 297 (never trained on)."""
    x, y = digits()
    train = {"x": x[:n_train], "y": y[:n_train]}
    queries = {"x": x[1500 : 1500 + n_queries], "y": y[1500 : 1500 + n_queries]}
    task = tasks.Classification()
    measurements = {"margin": tasks.Classification(measurement_kind="margin"), "loss": task}
    return mlp_setting("digits", train, queries, task, measurements, hidden=hidden, d_out=10, steps=steps, lr=lr,
                        weight_decay=weight_decay, key={"n_train": n_train, "n_queries": n_queries})


def cnn_setting(n_train: int = 256, n_queries: int = 64, channels=(4, 8), hidden: int = 32, steps: int = 200,
                lr: float = 1e-2, weight_decay: float = 1e-3) -> Setting:
    """Digits classification as in :func:`digits_setting` (the same queries and
    measurements, full-batch Adam), with a :class:`DigitsCNN`; smaller than the MLP
    setting (256 images, 200 steps) because retraining convolutions side by side is
    slow on CPU."""
    x, y = digits()
    train = {"x": x[:n_train], "y": y[:n_train]}
    queries = {"x": x[1500 : 1500 + n_queries], "y": y[1500 : 1500 + n_queries]}
    task = tasks.Classification()
    measurements = {"margin": tasks.Classification(measurement_kind="margin"), "loss": task}
    make = lambda seed: DigitsCNN(channels, hidden, rngs=nnx.Rngs(seed))  # noqa: E731
    return mlp_setting("cnn", train, queries, task, measurements, hidden=[], d_out=10, steps=steps, lr=lr,
                       weight_decay=weight_decay, make=make,
                       key={"n_train": n_train, "n_queries": n_queries, "model": "DigitsCNN tanh",
                            "channels": list(channels), "cnn_hidden": hidden})


def diabetes_setting(n_train: int = 320, n_queries: int = 64, hidden=(32, 32), steps: int = 500, lr: float = 1e-2,
                     weight_decay: float = 1e-3) -> Setting:
    """Diabetes regression (442 patients, 10 features, disease progression), inputs and
    target standardised on the training part; queries are the patients after it."""
    x, y = load_diabetes(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))  # the file is not in random order
    x, y = x[order], y[order]
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0)
    x = ((x - mu) / sd).astype(np.float32)
    y = ((y - y[:n_train].mean()) / y[:n_train].std()).astype(np.float32)
    train = {"x": x[:n_train], "y": y[:n_train]}
    queries = {"x": x[n_train : n_train + n_queries], "y": y[n_train : n_train + n_queries]}
    task = tasks.Regression()
    return mlp_setting("diabetes", train, queries, task, {"loss": task}, hidden=hidden, d_out=1, steps=steps,
                        lr=lr, weight_decay=weight_decay, key={"n_train": n_train, "n_queries": n_queries})


# --- the tiny language model ---------------------------------------------------------


def _tiny_run(root: Path):
    """A ``tiny`` ladder run on Shakespeare (trained here once, seconds): its tokenizer and
    its train / held-out sequence datasets are what the LM setting draws from."""
    from influence.lm import TrainConfig, load_run, train

    path = root / "lm-tiny-run"
    if not (path / "run.json").exists() or "summary" not in json.loads((path / "run.json").read_text()):
        train(TrainConfig(scale="tiny"), path, progress=False)
    return load_run(path)


def lm_setting(n_train: int = 512, n_queries: int = 32, epochs: int = 4, seed: int = 0, root: Path = RUNS) -> Setting:
    """The ``tiny`` rung trained on ``n_train`` random training sequences of Shakespeare for
    ``epochs`` epochs (batch 8, the ladder's AdamW schedule over that many steps); queries
    are ``n_queries`` random held-out sequences (whole-sequence loss)."""
    from influence.lm import LADDER, TrainConfig, as_arrays, init_model, mean_loss
    from influence.lm.train import make_optimizer

    run = _tiny_run(root)
    rng = np.random.default_rng(seed)
    train_rows = np.sort(rng.choice(len(run.train), n_train, replace=False))
    query_rows = np.sort(rng.choice(len(run.heldout), n_queries, replace=False))
    ids, mask = as_arrays(run.train.select(train_rows))
    q_ids, q_mask = as_arrays(run.heldout.select(query_rows))
    train = {"input_ids": ids, "loss_mask": mask}
    queries = {"input_ids": q_ids, "loss_mask": q_mask}
    scale = LADDER["tiny"]
    config = scale.config(run.tokenizer.vocab_size, ids.shape[1])
    task = tasks.CausalLM()
    shared = {k: jnp.asarray(v) for k, v in train.items()}

    def loss(model, data, batch_rows):  # the ladder's objective: mean loss per target token
        return mean_loss(model, data["input_ids"][batch_rows], data["loss_mask"][batch_rows])

    def train_models(members: list[np.ndarray], seeds: Sequence[int]):
        n = len(members[0])
        steps_per_epoch = n // scale.batch_size
        cfg = TrainConfig(scale="tiny", tokens=epochs * steps_per_epoch * scale.batch_size * ids.shape[1],
                          seq_len=ids.shape[1], vocab_size=run.tokenizer.vocab_size).resolved()
        # batch order as in influence.lm.Trainer: one permutation per epoch from (seed, epoch)
        order = np.stack([
            np.concatenate([rows[np.random.default_rng([s, e]).permutation(n)][: steps_per_epoch * scale.batch_size]
                            for e in range(epochs)]).reshape(-1, scale.batch_size)
            for rows, s in zip(members, seeds)
        ])  # [K, steps, B]
        graphdef, params, rest = stack_models(lambda s: init_model(config, s), seeds)
        batches = jnp.asarray(order)
        params = fit_many(graphdef, params, rest, make_optimizer(cfg), loss, shared,
                          lambda step: batches[:, step], cfg.total_steps)
        return graphdef, params, rest

    q_arrays = {k: jnp.asarray(v) for k, v in queries.items()}

    def retrain(masks: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        pairs = [(j, s) for j in range(len(masks)) for s in seeds]
        graphdef, params, rest = train_models([np.flatnonzero(masks[j]) for j, _ in pairs], [s for _, s in pairs])
        values = evaluate_many(graphdef, params, rest, task.measurement, q_arrays)
        return values.reshape(len(masks), len(seeds), -1)

    graphdef, params, rest = train_models([np.arange(n_train)], [0])
    key = {"setting": "lm", "scale": "tiny", "n_train": n_train, "n_queries": n_queries, "epochs": epochs,
           "seed": seed, "vocab_size": run.tokenizer.vocab_size, "seq_len": int(ids.shape[1]),
           "tokenizer": run.tokenizer.fingerprint(), "optimizer": "ladder adamw, batch 8"}
    return Setting("lm", model_from(graphdef, params, rest), task, {"loss": task}, train, queries, retrain, key,
                   batch_size=32)


SETTINGS: dict[str, Callable[..., Setting]] = {"digits": digits_setting, "diabetes": diabetes_setting, "lm": lm_setting,
                                                "cnn": cnn_setting}


@functools.cache
def get(name: str, **kwargs) -> Setting:
    """Build (and memoise) a setting by name; keyword arguments override its defaults."""
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; choose one of {sorted(SETTINGS)}")
    return SETTINGS[name](**kwargs)
