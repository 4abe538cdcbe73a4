"""Training of the ladder's language models: AdamW with linear warmup and cosine decay,
global-norm gradient clipping, deterministic seeds, periodic held-out evaluation, atomic
checkpoints and resumption.

Run folder layout (``out``):

* ``run.json``: the :class:`TrainConfig`, the model's :class:`GPTConfig`, parameter counts,
  corpus statistics (unigram entropy) and, once finished, a summary;
* ``tokenizer.json``; ``data/``: the ``train``/``heldout``/``documents`` datasets
  (``datasets.save_to_disk``);
* ``checkpoints/step_NNNNNNN/`` (see :mod:`influence.lm.checkpoint`): ``n_checkpoints``
  evenly spaced ones are kept, the last being the final weights; the newest rolling
  checkpoint (every ``checkpoint_every`` steps) is kept until training ends;
* ``metrics.jsonl``: one JSON row per evaluation.

Determinism: the seed fixes the initial weights and the order of batches (a permutation
of the training sequences per epoch, drawn from ``(seed, epoch)``), so a resumed run takes
the same steps as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import platform
import shutil
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from influence.errors import ConfigError, DataError
from influence.runtime import io

from . import checkpoint as ckpt
from .corpus import Document, load_corpus
from .model import GPT, get_scale, init_model, mean_loss, parameter_counts, sequence_losses
from .sequences import SPLIT_KEYS, as_arrays, build_splits, heldout_groups, load_splits
from .tokenizer import Tokenizer, train_tokenizer

LN2 = math.log(2.0)


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` fields take the scale's value.

    ``tokens`` is the budget in tokens fed to the model (steps x batch_size x seq_len);
    ``learning_rate`` the peak AdamW rate; ``eval_every``/``checkpoint_every`` are in steps.
    """

    scale: str = "small"
    tokens: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int | None = None
    checkpoint_every: int | None = None
    n_checkpoints: int = 4
    corpus: str | list[str] = "shakespeare"
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    seq_len: int | None = None
    heldout_fraction: float = 0.05
    split_by: str = "doc"

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` filled from the scale (unknown scales raise)."""
        s = get_scale(self.scale)
        r = dataclasses.replace(
            self, tokens=self.tokens or s.tokens, batch_size=self.batch_size or s.batch_size,
            learning_rate=self.learning_rate or s.learning_rate, seq_len=self.seq_len or s.context_length)
        steps = r.total_steps
        return dataclasses.replace(r, eval_every=r.eval_every or max(1, steps // 10),
                                   checkpoint_every=r.checkpoint_every or max(1, steps // 20))

    @property
    def total_steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))

    def milestones(self) -> set[int]:
        """Steps whose checkpoints are kept: ``n_checkpoints`` evenly spaced, ending at the
        final step."""
        n, total = max(1, self.n_checkpoints), self.total_steps
        return {max(1, round(total * (i + 1) / n)) for i in range(n)}


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Step (0-based) -> learning rate: linear warmup from 0, then cosine to
    ``final_lr_fraction`` of the peak."""
    total = cfg.total_steps
    warmup = max(1, int(cfg.warmup_fraction * total))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total, warmup + 1), end_value=cfg.learning_rate * cfg.final_lr_fraction)


def make_optimizer(cfg: TrainConfig, eps_root: float = 0.0) -> optax.GradientTransformation:
    """Clip the global gradient norm, then AdamW (b2 = 0.95) on a warmup + cosine schedule;
    weight decay applies to matrices only (not biases, LayerNorm scales). ``eps_root`` goes
    inside Adam's √ν (metagradients need it > 0: see :func:`influence.unrolled.lm_run`)."""
    schedule = learning_rate_schedule(cfg)

    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, eps_root=eps_root, weight_decay=cfg.weight_decay,
                                   mask=decay_mask))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
    """Jitted ``(params, rest, opt_state, ids, mask) -> (params, opt_state, loss)``: one
    optimizer step on the mean next-token loss of a batch (``ids``/``mask`` int32 [B, T];
    ``loss`` in nats per target token, before the update)."""

    def loss_fn(params, rest, ids, mask):
        return mean_loss(nnx.merge(graphdef, params, rest), ids, mask)

    @jax.jit
    def train_step(params, rest, opt_state, ids, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, ids, mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def unigram_stats(train_ids: np.ndarray, train_mask: np.ndarray, held_ids: np.ndarray,
                  held_mask: np.ndarray, vocab_size: int) -> dict[str, float]:
    """Bits per target token of the unigram baseline: ``unigram_entropy_bits`` (entropy of
    the training targets' token distribution) and ``unigram_heldout_bits`` (cross-entropy
    of held-out targets under that distribution, add-one smoothed)."""
    counts = np.bincount(train_ids[train_mask > 0], minlength=vocab_size).astype(np.float64)
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    smoothed = (counts + 1) / (counts.sum() + vocab_size)
    held = held_ids[held_mask > 0]
    cross = float(-np.log2(smoothed[held]).mean()) if held.size else float("nan")
    return {"unigram_entropy_bits": entropy, "unigram_heldout_bits": cross}


class Trainer:
    """One run in folder ``out``: prepares (or reloads) data and tokenizer, builds the model
    and optimizer, and resumes from the newest checkpoint when there is one.

    ``documents`` overrides ``cfg.corpus`` (the run then records ``corpus = "custom"``).
    """

    def __init__(self, cfg: TrainConfig, out: str | pathlib.Path, documents: Sequence[Document] | None = None):
        out = pathlib.Path(out)
        created = not out.exists()
        try:
            self._setup(cfg, out, documents)
        except BaseException:
            # A run that could not start (bad corpus, too little text, interrupted setup)
            # leaves no folder behind that a later command would take for a run.
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise

    def _setup(self, cfg: TrainConfig, out: pathlib.Path, documents: Sequence[Document] | None) -> None:
        self.out = out
        self.ckpt_root = self.out / "checkpoints"
        cfg = cfg.resolved()
        if documents is not None:
            cfg = dataclasses.replace(cfg, corpus="custom")
        self.cfg = self._check_run_file(cfg)
        self.tokenizer, self.data = self._prepare_data(documents)
        self.train_ids, self.train_mask = as_arrays(self.data["train"])
        self.held_ids, self.held_mask = as_arrays(self.data["heldout"])
        if len(self.train_ids) < self.cfg.batch_size:
            raise DataError(f"the corpus {self.cfg.corpus} is too small: it gives {len(self.train_ids)} training "
                            f"sequences of {self.cfg.seq_len} tokens, fewer than one batch of {self.cfg.batch_size}; "
                            "give more text, or a smaller --batch-size or --seq-len")
        self.model_config = get_scale(self.cfg.scale).config(self.tokenizer.vocab_size, self.cfg.seq_len)
        model = init_model(self.model_config, self.cfg.seed)
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        self.tx = make_optimizer(self.cfg)
        self.opt_state = self.tx.init(self.params)
        self.step_count = 0
        self.elapsed = 0.0  # seconds spent in training steps and evaluations, over all sessions
        self.last_eval: dict = {}
        self._write_run_file(parameter_counts(model))
        self._compile()
        self._resume()

    # ---------------------------------------------------------------- setup
    def _check_run_file(self, cfg: TrainConfig) -> TrainConfig:
        """Refuse to resume a run folder with different settings."""
        run_file = self.out / "run.json"
        if run_file.exists():
            saved = json.loads(run_file.read_text())["train_config"]
            mine = json.loads(json.dumps(dataclasses.asdict(cfg)))
            diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
            if diff:
                raise ConfigError(f"{self.out} holds a run with other settings {diff} (saved, requested); "
                                 "use another --out or the same settings to resume")
        return cfg

    def _prepare_data(self, documents):
        cfg = self.cfg
        tok_path = self.out / "tokenizer.json"
        if tok_path.exists() and (self.out / "data").exists():
            return Tokenizer.load(tok_path), load_splits(self.out / "data")
        docs = list(documents) if documents is not None else load_corpus(cfg.corpus)
        # The tokenizer sees only training documents, so held-out text stays unseen.
        held = heldout_groups(docs, cfg.heldout_fraction, cfg.split_by, cfg.seed)
        key = SPLIT_KEYS[cfg.split_by]
        tokenizer = train_tokenizer((d.text for d in docs if getattr(d, key) not in held), cfg.tokenizer,
                                    cfg.vocab_size)
        self.out.mkdir(parents=True, exist_ok=True)
        data = build_splits(docs, tokenizer, cfg.seq_len, cfg.heldout_fraction, cfg.split_by, cfg.seed,
                            cache_dir=self.out / "data")
        tokenizer.save(self.out)  # written last: its presence marks the data as complete
        return tokenizer, data

    def _write_run_file(self, counts: dict) -> None:
        run_file = self.out / "run.json"
        if run_file.exists():
            self.run_info = json.loads(run_file.read_text())
            return
        self.run_info = {
            "train_config": dataclasses.asdict(self.cfg), "model_config": self.model_config.to_dict(),
            "parameters": counts, "total_steps": self.cfg.total_steps,
            "data": {"train_sequences": len(self.train_ids), "heldout_sequences": len(self.held_ids),
                     "train_target_tokens": int(self.train_mask.sum()),
                     "heldout_target_tokens": int(self.held_mask.sum()),
                     **unigram_stats(self.train_ids, self.train_mask, self.held_ids, self.held_mask,
                                     self.tokenizer.vocab_size)},
            "tokenizer": {"kind": self.tokenizer.kind, "vocab_size": self.tokenizer.vocab_size},
        }
        io.atomic_write_json(run_file, self.run_info)

    def _compile(self) -> None:
        graphdef = self.graphdef
        self._train_step = make_train_step(graphdef, self.tx)
        self._loss = jax.jit(lambda params, rest, ids, mask: mean_loss(nnx.merge(graphdef, params, rest), ids, mask))

    def _resume(self) -> None:
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if latest is None:
            return
        self.params = ckpt.load_tree(latest / "params.npz", self.params, ckpt.PARAMS_KIND)
        self.opt_state = ckpt.load_tree(latest / "opt_state.npz", self.opt_state, ckpt.OPT_STATE_KIND)
        state = ckpt.read_state(latest)
        self.step_count, self.elapsed = state["step"], state["elapsed_s"]
        self.last_eval = state.get("last_eval", {})
        self._truncate_metrics(self.step_count)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric rows logged after the checkpoint being resumed (they will be redone)."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            rows = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            path.write_text("".join(r + "\n" for r in rows))

    # ---------------------------------------------------------------- training
    @property
    def model(self) -> GPT:
        """The current weights as an NNX model."""
        return nnx.merge(self.graphdef, self.params, self.rest)

    @property
    def done(self) -> bool:
        return self.step_count >= self.cfg.total_steps

    def batch_indices(self, step: int) -> np.ndarray:
        """Rows of the training set used at ``step`` (0-based): consecutive slices of a
        per-epoch permutation seeded by ``(seed, epoch)``; the remainder of an epoch that
        does not fill a batch is skipped."""
        b = self.cfg.batch_size
        per_epoch = len(self.train_ids) // b
        epoch, i = divmod(step, per_epoch)
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.train_ids))
        return perm[i * b:(i + 1) * b]

    def batch(self, step: int) -> tuple[jax.Array, jax.Array]:
        idx = self.batch_indices(step)
        return jnp.asarray(self.train_ids[idx]), jnp.asarray(self.train_mask[idx])

    def next_loss(self) -> float:
        """Loss of the batch the next step will use, at the current weights (no update)."""
        return float(self._loss(self.params, self.rest, *self.batch(self.step_count)))

    def step(self) -> float:
        """One optimizer step; returns the batch's mean loss (nats per target token)
        before the update."""
        ids, mask = self.batch(self.step_count)
        self.params, self.opt_state, loss = self._train_step(self.params, self.rest, self.opt_state, ids, mask)
        self.step_count += 1
        return float(loss)

    def evaluate(self, batch_size: int = 64) -> float:
        """Mean held-out loss in nats per target token (all held-out sequences)."""
        total = sequence_losses(self.model, self.held_ids, self.held_mask, batch_size).sum()
        return float(total / max(int(self.held_mask[:, 1:].sum()), 1))

    def save(self) -> pathlib.Path:
        """Checkpoint the current step, then drop rolling checkpoints no longer needed."""
        state = {"tokens_seen": self.step_count * self.cfg.batch_size * self.cfg.seq_len,
                 "elapsed_s": self.elapsed, "last_eval": self.last_eval, "time": time.time(),
                 "jax": jax.__version__, "device": str(jax.devices()[0]), "host": platform.node()}
        path = ckpt.save_checkpoint(self.ckpt_root, self.step_count, self.params, self.opt_state, state,
                                    [self.out / "run.json", self.out / "tokenizer.json"])
        keep = self.cfg.milestones() | ({self.step_count} if not self.done else set())
        ckpt.remove_stale(self.ckpt_root, keep)
        return path

    def _log(self, row: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def run(self, max_steps: int | None = None, progress: bool = True) -> dict:
        """Train until the budget is spent (or ``max_steps`` more steps, to pause a run);
        returns the summary also stored in ``run.json`` when the run completes."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        stop = cfg.total_steps if max_steps is None else min(cfg.total_steps, self.step_count + max_steps)
        tokens_per_step = cfg.batch_size * cfg.seq_len
        bar = tqdm(total=cfg.total_steps, initial=self.step_count, disable=not progress,
                   desc=f"train {cfg.scale}", unit="step", dynamic_ncols=True)
        losses: list[float] = []
        t_rate, n_rate = time.perf_counter(), 0
        while self.step_count < stop:
            t0 = time.perf_counter()
            losses.append(self.step())
            n_rate += 1
            s = self.step_count
            if s % cfg.eval_every == 0 or s == cfg.total_steps:
                held = self.evaluate()
                self.last_eval = {"step": s, "train_loss": float(np.mean(losses)), "heldout_loss": held,
                                  "heldout_bits": held / LN2}
                losses = []
            self.elapsed += time.perf_counter() - t0
            if self.last_eval.get("step") == s:
                self._log({**self.last_eval, "tokens": s * tokens_per_step, "elapsed_s": round(self.elapsed, 2)})
            if s in cfg.milestones() or s % cfg.checkpoint_every == 0 or s == stop:
                self.save()
            now = time.perf_counter()
            rate = n_rate * tokens_per_step / max(now - t_rate, 1e-9)
            if now - t_rate > 10:  # a rate over the last ~10 s, not since start (compile time)
                t_rate, n_rate = now, 0
            last = losses[-1] if losses else self.last_eval["train_loss"]
            bar.set_postfix(loss=f"{last:.3f}", heldout=f"{self.last_eval.get('heldout_loss', float('nan')):.3f}",
                            tok_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
        bar.close()
        return self._finish() if self.done else {"step": self.step_count, **self.last_eval}

    def _finish(self) -> dict:
        summary = {"steps": self.step_count, "tokens": self.step_count * self.cfg.batch_size * self.cfg.seq_len,
                   "train_seconds": round(self.elapsed, 1),
                   "tokens_per_second": round(self.step_count * self.cfg.batch_size * self.cfg.seq_len
                                              / max(self.elapsed, 1e-9), 1),
                   "final_checkpoint": f"checkpoints/{ckpt.step_name(self.step_count)}",
                   "device": str(jax.devices()[0]), **self.last_eval}
        self.run_info["summary"] = summary
        io.atomic_write_json(self.out / "run.json", self.run_info)
        return summary


def train(cfg: TrainConfig, out: str | pathlib.Path, documents: Sequence[Document] | None = None,
          progress: bool = True) -> dict:
    """Train (or resume, or find finished) the run in ``out``; returns its summary."""
    trainer = Trainer(cfg, out, documents)
    return trainer.run(progress=progress)
