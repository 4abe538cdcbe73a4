"""The cached steps of one (scale, seed) run of the scale experiment, each reused when its
output exists: train (the Trainer resumes from checkpoints), evaluate (held-out and query
losses), fit EK-FAC per layer set, and score every training sequence for every query.

Layout of a run folder (``runs/scale/<config>/<scale>-seed<k>/``): the Trainer's files
(``run.json``, ``tokenizer.json``, ``data/``, ``checkpoints/``, ``metrics.jsonl``), then
``eval.json``, ``factors/ekfac-<layer set>/factors.npz``, ``scores/<layer set>.npz`` and
``timings.json`` (seconds per step, written when the step first runs).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

import influence as inf
from influence.lm import Document, TrainConfig, Trainer, sequence_losses
from influence.lm.sequences import as_arrays
from influence.query.engine import encode_queries
from influence.runtime import io

from .query_set import QuerySpec

Log = Callable[[str], None]


def queries_fingerprint(specs: Sequence[QuerySpec]) -> str:
    """Hash of the queries' ids, prompts and completions: scores are reused only for the same set."""
    payload = json.dumps([(s.id, s.prompt, s.completion) for s in specs]).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def _record_time(run_dir: Path, step: str, seconds: float) -> None:
    path = run_dir / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[step] = round(seconds, 1)
    io.atomic_write_bytes(path, json.dumps(timings, indent=1).encode())


def timings(run_dir: Path) -> dict[str, float]:
    path = Path(run_dir) / "timings.json"
    return json.loads(path.read_text()) if path.exists() else {}


def cached_json(path: Path, key: str, field: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, kept in ``path`` as ``{"key": key, field: value}`` (written
    atomically) and reused while the stored key is ``key``: a step's results survive an
    interrupted run, and a change of what they depend on recomputes them."""
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored[field]
    value = compute()
    io.atomic_write_bytes(path, json.dumps({"key": key, field: value}, default=float).encode())
    return value


class OutOfTime(Exception):
    """The command's time budget ran out between two cached steps; rerun to resume."""


def check_deadline(deadline: float | None, what: str) -> None:
    """Raise :class:`OutOfTime` when ``deadline`` (``time.monotonic()`` seconds) has passed."""
    if deadline is not None and time.monotonic() > deadline:
        raise OutOfTime(f"time budget spent before {what}")


def prepare_data(run_dir: Path, cfg: TrainConfig, documents: Sequence[Document]) -> dict:
    """Tokenizer and sequence splits of a run, written where :class:`influence.lm.Trainer`
    looks for them (``tokenizer.json``, ``data/``) so that it loads them instead of
    building its own: the same calls as the Trainer's data preparation, made before the
    training budget is chosen, because an epoch rule needs the number of training
    sequences. Returns ``{"train_sequences", "train_target_tokens"}``."""
    from influence.lm import build_splits, train_tokenizer
    from influence.lm.sequences import SPLIT_KEYS, heldout_groups, load_splits

    run_dir = Path(run_dir)
    if not ((run_dir / "tokenizer.json").exists() and (run_dir / "data").exists()):
        held = heldout_groups(documents, cfg.heldout_fraction, cfg.split_by, cfg.seed)
        key = SPLIT_KEYS[cfg.split_by]
        tokenizer = train_tokenizer((d.text for d in documents if getattr(d, key) not in held), cfg.tokenizer,
                                    cfg.vocab_size)
        run_dir.mkdir(parents=True, exist_ok=True)
        build_splits(documents, tokenizer, cfg.seq_len, cfg.heldout_fraction, cfg.split_by, cfg.seed,
                     cache_dir=run_dir / "data")
        tokenizer.save(run_dir)  # last: its presence marks the data as complete (as the Trainer's)
    data = load_splits(run_dir / "data")
    _, mask = as_arrays(data["train"])
    return {"train_sequences": len(mask), "train_target_tokens": int(mask.sum())}


def epoch_tokens(cfg: TrainConfig, n_train: int, epochs: float) -> int:
    """The token budget (``TrainConfig.tokens``) of ``epochs`` passes over ``n_train``
    sequences: ``ceil(epochs · n_train / batch_size)`` steps of ``batch_size × seq_len``."""
    import math

    steps = max(1, math.ceil(epochs * n_train / cfg.batch_size))
    return steps * cfg.batch_size * cfg.seq_len


def train(run_dir: Path, cfg: TrainConfig, documents: Sequence[Document], log: Log, chunk: int = 50,
          deadline: float | None = None) -> dict:
    """Train (or resume, or find finished) the run; returns ``run.json``'s content.
    Raises :class:`OutOfTime` (after saving a checkpoint) when ``deadline`` passes."""
    trainer = Trainer(cfg, run_dir, documents=documents)
    if not trainer.done:
        log(f"training {cfg.scale} seed {cfg.seed}: {trainer.cfg.total_steps} steps of {trainer.cfg.batch_size}x"
            f"{trainer.cfg.seq_len} tokens on {len(trainer.train_ids)} sequences, from step {trainer.step_count}")
        t0 = time.perf_counter()
        ran = False
        while not trainer.done:
            if deadline is not None and time.monotonic() > deadline:
                if ran:  # every chunk ends on a checkpoint (Trainer.run saves at its last step)
                    _record_time(run_dir, "train_session", time.perf_counter() - t0)
                raise OutOfTime(f"time budget spent at step {trainer.step_count}/{trainer.cfg.total_steps}")
            trainer.run(max_steps=chunk, progress=False)
            ran = True
            last = trainer.last_eval
            seen = f"at step {last['step']}: train {last['train_loss']:.3f}, held-out {last['heldout_loss']:.3f}" \
                if last else "no evaluation yet"
            log(f"  step {trainer.step_count}/{trainer.cfg.total_steps} ({trainer.elapsed:.0f} s); loss {seen}")
        _record_time(run_dir, "train_session", time.perf_counter() - t0)
    return json.loads((run_dir / "run.json").read_text())


def evaluate(run_dir: Path, run, specs: Sequence[QuerySpec], log: Log) -> dict:
    """Held-out loss (nats per target token) per source of the run's held-out split (plays
    and Bible chapters, by language, that the model never trained on) and each query's
    completion loss (nats, summed over its tokens); cached in ``eval.json``."""
    path = run_dir / "eval.json"
    fingerprint = queries_fingerprint(specs)
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("queries_fingerprint") == fingerprint:
            return cached
    t0 = time.perf_counter()
    ids, mask = as_arrays(run.heldout)
    losses = sequence_losses(run.model, ids, mask)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for src, genre, loss, m in zip(run.heldout["source"], run.heldout["genre"], losses, mask):
        key = f"{src}-{genre}" if src != "shakespeare" else "shakespeare"
        sums[key] = sums.get(key, 0.0) + float(loss)
        counts[key] = counts.get(key, 0) + int(m.sum())
    batch = encode_queries([s.query for s in specs], run.tokenizer, run.config.context_length)
    q_losses = sequence_losses(run.model, batch["input_ids"], batch["loss_mask"])
    result = {"queries_fingerprint": fingerprint,
              "heldout_loss": {k: sums[k] / counts[k] for k in sums}, "heldout_tokens": counts,
              "query_loss": {s.id: float(v) for s, v in zip(specs, q_losses)},
              "query_tokens": {s.id: int(n) for s, n in zip(specs, batch["loss_mask"].sum(axis=1))}}
    io.atomic_write_bytes(path, json.dumps(result, indent=1).encode())
    _record_time(run_dir, "evaluate", time.perf_counter() - t0)
    log("  held-out loss " + ", ".join(f"{k} {v:.3f}" for k, v in result["heldout_loss"].items()) + " nats/token")
    return result


def fit(run_dir: Path, run, layer_set: str, pattern: str, seed: int, log: Log,
        fisher: str = "sampled") -> inf.Factors:
    """EK-FAC factors of the layers matching ``pattern``, fitted on the run's training set
    with the ``fisher`` passed explicitly (the library default may change) and sample key
    ``jax.random.key(seed)`` (reused from ``factors/ekfac-<layer_set>``). The folder's
    ``settings.json`` says what they were fitted with, the checkpoint's step included,
    so ``influence query/index --factors ekfac-<layer_set>`` can use them and refuses them
    for other weights."""
    from influence.lm.run import SETTINGS, factor_settings

    path = run_dir / "factors" / f"ekfac-{layer_set}"
    settings = factor_settings(run_dir, "ekfac", pattern, fisher=fisher, seed=seed, step=run.step)
    if not (path / SETTINGS).is_file():  # written first, as influence.lm.fit_run_factors does
        io.atomic_write_json(path / SETTINGS, settings)
    if (path / "factors.npz").exists():
        return inf.Factors.load(path, model=run.model)
    log(f"  fitting EK-FAC on {layer_set} layers ({len(run.train)} sequences)")
    t0 = time.perf_counter()
    factors = inf.fit_factors(run.model, inf.tasks.CausalLM(), run.train, strategy="ekfac", layers=pattern,
                              fisher=fisher, key=jax.random.key(seed), batch_size=32, progress=False)
    factors.save(path)
    _record_time(run_dir, f"fit_{layer_set}", time.perf_counter() - t0)
    log(f"  fitted in {time.perf_counter() - t0:.0f} s: {', '.join(factors.layer_names)}")
    return factors


def score(run_dir: Path, run, factors: inf.Factors, layer_set: str, specs: Sequence[QuerySpec], log: Log,
          damping: float | None = None, name: str | None = None, per_layer: bool = True) -> inf.Scores:
    """Influence of every training sequence on every query, per layer, saved in
    ``scores/<name or layer_set>.npz`` (reused when its queries and damping are the same);
    ``damping``: absolute λ for every layer, ``None`` for the default."""
    path = run_dir / "scores" / f"{name or layer_set}.npz"
    fingerprint = queries_fingerprint(specs) + ("" if damping is None else f"@{damping:.6g}")
    if path.exists():
        cached = inf.Scores.load(path)
        if cached.metadata.get("queries_fingerprint") == fingerprint:
            return cached
        log(f"  scores in {path} are for other queries; rescoring")
    log(f"  scoring {len(specs)} queries x {len(run.train)} sequences on {layer_set} layers")
    t0 = time.perf_counter()
    batch = encode_queries([s.query for s in specs], run.tokenizer, run.config.context_length)
    scores = inf.pairwise_scores(run.model, inf.tasks.CausalLM(), factors, batch, run.train, per_layer=per_layer,
                                 damping=damping, batch_size=32, progress=False)
    scores.metadata.update(queries_fingerprint=fingerprint, query_ids=[s.id for s in specs])
    scores.save(path)
    _record_time(run_dir, f"score_{layer_set}", time.perf_counter() - t0)
    log(f"  scored in {time.perf_counter() - t0:.0f} s")
    return scores


def epochs(info: dict) -> float:
    """Passes over the training set that the run's token budget amounts to."""
    steps, cfg = info["total_steps"], info["train_config"]
    return steps * cfg["batch_size"] / max(1, info["data"]["train_sequences"])
