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


def train(run_dir: Path, cfg: TrainConfig, documents: Sequence[Document], log: Log, chunk: int = 50) -> dict:
    """Train (or resume, or find finished) the run; returns ``run.json``'s content."""
    trainer = Trainer(cfg, run_dir, documents=documents)
    if not trainer.done:
        log(f"training {cfg.scale} seed {cfg.seed}: {trainer.cfg.total_steps} steps of {trainer.cfg.batch_size}x"
            f"{trainer.cfg.seq_len} tokens on {len(trainer.train_ids)} sequences, from step {trainer.step_count}")
        t0 = time.perf_counter()
        while not trainer.done:
            trainer.run(max_steps=chunk, progress=False)
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


def fit(run_dir: Path, run, layer_set: str, pattern: str, seed: int, log: Log) -> inf.Factors:
    """EK-FAC factors of the layers matching ``pattern``, fitted on the run's training set
    with the sampled Fisher (reused from ``factors/ekfac-<layer_set>``)."""
    path = run_dir / "factors" / f"ekfac-{layer_set}"
    if (path / "factors.npz").exists():
        return inf.Factors.load(path, model=run.model)
    log(f"  fitting EK-FAC on {layer_set} layers ({len(run.train)} sequences)")
    t0 = time.perf_counter()
    factors = inf.fit_factors(run.model, inf.tasks.CausalLM(), run.train, strategy="ekfac", layers=pattern,
                              key=jax.random.key(seed), batch_size=32, progress=False)
    factors.save(path)
    _record_time(run_dir, f"fit_{layer_set}", time.perf_counter() - t0)
    log(f"  fitted in {time.perf_counter() - t0:.0f} s: {', '.join(factors.layer_names)}")
    return factors


def score(run_dir: Path, run, factors: inf.Factors, layer_set: str, specs: Sequence[QuerySpec], log: Log) -> inf.Scores:
    """Influence of every training sequence on every query, per layer, saved in
    ``scores/<layer_set>.npz`` (reused when its queries are the same)."""
    path = run_dir / "scores" / f"{layer_set}.npz"
    fingerprint = queries_fingerprint(specs)
    if path.exists():
        cached = inf.Scores.load(path)
        if cached.metadata.get("queries_fingerprint") == fingerprint:
            return cached
        log(f"  scores in {path} are for other queries; rescoring")
    log(f"  scoring {len(specs)} queries x {len(run.train)} sequences on {layer_set} layers")
    t0 = time.perf_counter()
    batch = encode_queries([s.query for s in specs], run.tokenizer, run.config.context_length)
    scores = inf.pairwise_scores(run.model, inf.tasks.CausalLM(), factors, batch, run.train, per_layer=True,
                                 batch_size=32, progress=False)
    scores.metadata.update(queries_fingerprint=fingerprint, query_ids=[s.id for s in specs])
    scores.save(path)
    _record_time(run_dir, f"score_{layer_set}", time.perf_counter() - t0)
    log(f"  scored in {time.perf_counter() - t0:.0f} s")
    return scores


def epochs(info: dict) -> float:
    """Passes over the training set that the run's token budget amounts to."""
    steps, cfg = info["total_steps"], info["train_config"]
    return steps * cfg["batch_size"] / max(1, info["data"]["train_sequences"])
