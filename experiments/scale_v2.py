"""The v2 scale experiment (issue 16): a semantic ground truth (WEB renderings of trained
KJV verses), a training regime that fixes the number of epochs at every size, at least
three seeds per size, the models' own greedy completions as a second query set, the
sampled-Fisher key fixed across seeds, declared endpoints with a paired bootstrap over
queries nested within seeds, and estimator checks (tail-patch, damping sweep) per size.

Every step is cached under ``--out`` and the command can stop on a time budget
(``--time-budget``) between steps and resume on the next call (exit status 75 until
done), so a long ladder runs as repeated commands of at most ten minutes each.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import metrics as M
from .insertions import insertion_documents
from .mixture import Mixture, bible_chapters, heldout_documents, pin_heldout
from .queries_v2 import QueryCounts, build_query_set, embedded_insertion_documents, generate_insertions
from .query_set import QuerySpec, parse_query
from .stats import ENDPOINTS, evaluate_endpoint

Log = Callable[[str], None]
EXIT_RESUME = 75  # EX_TEMPFAIL: not finished within the time budget; run the same command again
LAYER_SETS = {"mlp": r"\.mlp\.", "blocks": r"blocks\."}


@dataclasses.dataclass(frozen=True)
class V2Config:
    """A v2 configuration. Every size trains ``epochs`` passes over the same training set
    (tokens = epochs × training tokens, so tokens per parameter falls with size and is
    recorded); ``seeds`` initialise weights and batch order; the sampled-Fisher key is
    ``fisher_seed`` for every run (independent of the training seed)."""

    name: str
    mixture: Mixture
    scales: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: float
    counts: QueryCounts
    insertions: tuple[int, int, int] = (50, 50, 51)  # facts once, facts in two orders, canaries
    canary_copies: tuple[int, ...] = (1, 2, 4)
    # Insertions are set in passages of ~host_words words of these plays (outside the mix),
    # so that they match the corpus in length; 0 = bare sentences, as in v1.
    host_plays: tuple[str, ...] = ("coriolanus", "cymbeline", "a-winter-s-tale", "as-you-like-it", "pericles",
                                   "much-ado-about-nothing", "measure-for-measure", "richard-ii")
    host_words: int = 50
    vocab_size: int = 2048
    seq_len: int = 128
    batch_size: int = 32
    query_seed: int = 0
    fisher_seed: int = 12_345
    fisher: str = "sampled"
    layer_sets: tuple[str, ...] = ("mlp",)
    top_k: int = 10
    n_boot: int = 2000
    powerlaw_boot: int = 0
    greedy_kinds: tuple[str, ...] = ("semantic", "memorised", "style")
    validate_scales: tuple[str, ...] = ()  # sizes that get the tail-patch and damping checks
    damping_sweep: tuple[float, ...] = (0.01, 0.1, 1.0)  # λ = r × mean Λ over layers
    tail_queries: int = 16
    tail_k: int = 10
    tail_lr: float = 1e-2
    # Token-wise attribution statistics (experiments/tokenwise.py) of these query kinds'
    # top-``token_k`` sequences, at every run; 0 turns them off.
    token_kinds: tuple[str, ...] = ("semantic", "semantic_control", "memorised", "style")
    token_k: int = 5
    # Sizes whose every seed is also fitted and scored (semantic and control queries) at the
    # checkpoint halfway through training: influence over the course of training.
    checkpoint_scales: tuple[str, ...] = ()

    @property
    def runs(self) -> tuple[tuple[str, int], ...]:
        """``(scale, seed)`` in the order they are done: every scale at a seed, then the next seed."""
        return tuple((s, k) for k in self.seeds for s in self.scales)


_FULL_MIX = Mixture(
    plays=("hamlet", "macbeth", "romeo-and-juliet", "a-midsummer-night-s-dream", "twelfth-night", "henry-v",
           "richard-iii", "julius-caesar", "the-tempest", "the-merchant-of-venice"),
    bible=("Genesis 1-11", "Ruth 1-4", "Psalms 1-30", "Proverbs 1-10", "John 1-6", "Mark 1-4"),
    heldout_plays=("othello", "king-lear"), heldout_scenes=3, heldout_bible=("Genesis 12-13", "John 7"))

TINY = V2Config(
    name="tiny",
    mixture=Mixture(plays=("macbeth",), bible=("Genesis 1-3", "Psalms 23"), heldout_plays=("hamlet",),
                    heldout_scenes=1, heldout_bible=("Genesis 4",)),
    scales=("tiny", "mini"), seeds=(0, 1), epochs=1.0,
    counts=QueryCounts(semantic=12, semantic_control=6, memorised=6, style=6, crosslingual=4),
    insertions=(4, 4, 6), vocab_size=512, n_boot=200, greedy_kinds=("semantic",),
    validate_scales=("tiny",), damping_sweep=(0.1, 1.0), tail_queries=4, tail_k=5, top_k=5, token_k=3,
    checkpoint_scales=("mini",))

FULL = V2Config(
    name="full", mixture=_FULL_MIX, scales=("tiny", "mini", "small", "medium"), seeds=(0, 1, 2), epochs=4.0,
    counts=QueryCounts(), validate_scales=("mini", "medium"), checkpoint_scales=("mini", "small"))

# The GPU ladder: the same data and regime, sizes from ~1M to ~30M non-embedding parameters.
GPU = V2Config(
    name="gpu", mixture=_FULL_MIX, scales=("small", "medium", "large", "xl", "xxl"), seeds=(0, 1, 2), epochs=4.0,
    counts=QueryCounts(), layer_sets=("mlp", "blocks"), validate_scales=("small", "large"),
    checkpoint_scales=("small", "large"))

V2_CONFIGS = {c.name: c for c in (TINY, FULL, GPU)}


def _log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# --------------------------------------------------------------------------- data and queries


def documents(cfg: V2Config, log: Log = _log):
    """``(training documents, held-out documents, insertion spec, query specs)``; the
    insertions and queries are generated deterministically from the mix."""
    from influence.lm import shakespeare_documents
    from influence.lm.corpus import bible_verses

    mix = cfg.mixture
    base = shakespeare_documents(plays=list(mix.plays)) + bible_chapters(mix.bible)
    hosts = shakespeare_documents(plays=list(cfg.host_plays))
    if set(cfg.host_plays) & (set(mix.plays) | set(mix.heldout_plays)):
        raise ValueError("host plays of the insertions must be outside the training and held-out plays")
    vocab = {w for d in [*base, *hosts] for w in M.words(d.text)}
    spec = generate_insertions(*cfg.insertions, copies=cfg.canary_copies, seed=cfg.query_seed, avoid=vocab)
    inserted = (embedded_insertion_documents(spec, hosts, cfg.host_words, seed=cfg.query_seed) if cfg.host_words
                else insertion_documents(spec))
    train_docs = base + inserted
    held = heldout_documents(mix)
    specs = build_query_set(train_docs, held, bible_verses("web"), spec, cfg.counts, seed=cfg.query_seed)
    return train_docs, held, spec, specs


def write_queries(path: Path, specs: Sequence[QuerySpec]) -> None:
    """The query set as JSON lines (the format :func:`experiments.query_set.load_queries` reads)."""
    lines = [json.dumps({k: v for k, v in dataclasses.asdict(s).items() if v is not None}, ensure_ascii=False)
             for s in specs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def greedy_specs(run_dir: Path, run, specs: Sequence[QuerySpec], kinds: Sequence[str], log: Log) -> list[QuerySpec]:
    """For each query of ``kinds``, the model's own greedy completion of its prompt, as
    long (in tokens) as the fixed completion: a query ``<id>~greedy`` with the same
    metadata and ``completion_of = <id>``. Cached in ``greedy.json``; prompts the model
    completes with nothing are left out, and counted there."""
    path = run_dir / "greedy.json"
    if path.exists():
        cached = json.loads(path.read_text())
        return [parse_query(r) for r in cached["queries"]]
    t0 = time.perf_counter()
    out, empty = [], []
    for s in specs:
        if s.kind not in kinds:
            continue
        n = len(run.tokenizer.encode(s.completion))
        text = run.generate(s.prompt, max_new_tokens=n, temperature=0.0)
        if not text.strip():
            empty.append(s.id)
            continue
        out.append(dataclasses.replace(s, id=f"{s.id}~greedy", completion=text, completion_of=s.id))
    records = [{k: v for k, v in dataclasses.asdict(q).items() if v is not None} for q in out]
    path.write_text(json.dumps({"queries": records, "empty": empty}, ensure_ascii=False, indent=1))
    if empty:
        log(f"  {len(empty)} prompts got an empty greedy completion and are left out of the greedy set: {empty[:5]}")
    log(f"  {len(out)} greedy completions in {time.perf_counter() - t0:.0f} s")
    return out


# --------------------------------------------------------------------------- regime and validation


def regime(run, info: dict, n_rows: int = 256) -> dict:
    """The training regime of a run, measured: epochs, tokens per non-embedding parameter,
    the final model's loss on (up to) ``n_rows`` training sequences (evenly spaced) and on
    the held-out split, and their gap (nats per target token)."""
    from influence.lm import sequence_losses
    from influence.lm.sequences import as_arrays

    ids, mask = as_arrays(run.train)
    rows = np.unique(np.linspace(0, len(ids) - 1, min(n_rows, len(ids))).astype(int))
    train_loss = float(sequence_losses(run.model, ids[rows], mask[rows]).sum() / mask[rows][:, 1:].sum())
    hids, hmask = as_arrays(run.heldout)
    held = float(sequence_losses(run.model, hids, hmask).sum() / hmask[:, 1:].sum())
    steps, tc = info["total_steps"], info["train_config"]
    tokens = steps * tc["batch_size"] * tc["seq_len"]
    return {"epochs": steps * tc["batch_size"] / info["data"]["train_sequences"], "tokens": tokens,
            "tokens_per_parameter": tokens / info["parameters"]["non_embedding"], "train_loss": train_loss,
            "heldout_loss": held, "gap": held - train_loss}


def tail_patch(run, specs: Sequence[QuerySpec], values: np.ndarray, *, k: int, lr: float, seed: int) -> dict:
    """Tail-patch check (Grosse et al. 2023 §5.1): one SGD step of rate ``lr`` on a query's
    top-``k`` sequences by influence, versus on ``k`` random sequences, from the trained
    weights; the change of the query's completion loss (nats). Influence that points at the
    right sequences lowers the loss more for the top-k (``delta_top < delta_random``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from influence.lm.model import mean_loss, sequence_losses
    from influence.lm.sequences import as_arrays
    from influence.query.engine import encode_queries

    graphdef, params, rest = nnx.split(run.model, nnx.Param, ...)
    ids, mask = as_arrays(run.train)
    batch = encode_queries([s.query for s in specs], run.tokenizer, run.config.context_length)
    grad = jax.jit(jax.grad(lambda p, i, m: mean_loss(nnx.merge(graphdef, p, rest), i, m)))
    before = sequence_losses(run.model, batch["input_ids"], batch["loss_mask"])
    rng = np.random.default_rng(seed)

    def after(rows) -> np.ndarray:
        g = grad(params, jnp.asarray(ids[rows]), jnp.asarray(mask[rows]))
        patched = jax.tree.map(lambda p, d: p - lr * d, params, g)
        return sequence_losses(nnx.merge(graphdef, patched, rest), batch["input_ids"], batch["loss_mask"])

    per_query = []
    for i, s in enumerate(specs):
        top = M.top_k(values[i], k)
        rand = rng.choice(len(ids), size=k, replace=False)
        per_query.append({"id": s.id, "delta_top": float(after(top)[i] - before[i]),
                          "delta_random": float(after(rand)[i] - before[i])})
    diff = np.array([q["delta_top"] - q["delta_random"] for q in per_query])
    return {"k": k, "lr": lr, "queries": per_query, "mean_delta_top_minus_random": float(diff.mean()),
            "share_top_better": float(np.mean(diff < 0))}


def damping_sweep(run_dir: Path, run, factors, layer_set: str, specs: Sequence[QuerySpec], records: Sequence[dict],
                  factors_r: Sequence[float], log: Log) -> list[dict]:
    """The semantic endpoints at absolute dampings λ = r × (mean EK-FAC eigenvalue over
    layers), scoring the semantic and control queries again at each λ: do the conclusions
    hinge on λ?"""
    from . import scale_runs as steps

    by_id = {r["id"]: r for r in records}
    subset = [s for s in specs if s.kind in ("semantic", "semantic_control") and by_id.get(s.id, {}).get(
        "semantic_rows")]
    if not subset:
        return []
    mean_lambda = float(np.mean([f.eigenvalues.mean() for f in factors.layers.values()]))
    out = []
    for r in factors_r:
        lam = r * mean_lambda
        scores = steps.score(run_dir, run, factors, layer_set, subset, log, damping=lam,
                             name=f"{layer_set}-damping{r:g}", per_layer=False)
        rr = {"semantic": [], "semantic_control": []}
        shares = []
        for i, s in enumerate(subset):
            rr[s.kind].append(M.reciprocal_rank(scores.values[i], by_id[s.id]["semantic_rows"]))
            shares.append(M.top_share(scores.values[i], 0.01))
        out.append({"r": r, "lambda": lam, "semantic_mrr": float(np.mean(rr["semantic"])) if rr["semantic"] else None,
                    "control_mrr": float(np.mean(rr["semantic_control"])) if rr["semantic_control"] else None,
                    "top1_share": float(np.nanmean(shares))})
    return out


# --------------------------------------------------------------------------- one run


def _records(cfg: V2Config, run_dir: Path, run, layer_set: str, scores, specs, ctx, key: str) -> list[dict]:
    from . import scale_runs as steps
    from .analysis import query_records
    from .summary import derived_fields

    def compute():
        records = query_records(specs, scores.values, scores.per_layer, ctx, n_blocks=run.config.n_layers,
                                k=cfg.top_k, powerlaw_boot=cfg.powerlaw_boot, seed=0)
        derived_fields(records, len(run.train))
        return records

    return steps.cached_json(run_dir / f"metrics-{layer_set}.json", key, "records", compute)


def _source_hash() -> str:
    h = hashlib.sha256()
    for module in ("analysis", "metrics", "powerlaw", "summary", "stats"):
        h.update((Path(__file__).parent / f"{module}.py").read_bytes())
    return h.hexdigest()


# Read at import, with the analysis modules: the code this process runs, even if the files
# change while it works.
_ANALYSIS_SOURCE = _source_hash()


def _analysis_key(cfg: V2Config, specs) -> str:
    """Hash of what the records depend on: the queries, analysis settings and code."""
    from .scale_runs import queries_fingerprint

    payload = [queries_fingerprint(specs), cfg.top_k, cfg.powerlaw_boot, _ANALYSIS_SOURCE]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def run_one(cfg: V2Config, out: Path, scale: str, seed: int, train_docs, held, specs, log: Log = _log,
            deadline: float | None = None) -> dict:
    """Every cached step of one (scale, seed) run; returns its results entry (without
    the analysis context). Raises :class:`experiments.scale_runs.OutOfTime`."""
    from influence.lm import TrainConfig, load_run

    from . import scale_runs as steps
    from .analysis import Context, TrainingTable

    run_dir = out / f"{scale}-seed{seed}"
    log(f"== {scale} seed {seed} ({run_dir})")
    docs, fraction = pin_heldout(train_docs, held, seed)
    base = TrainConfig(scale=scale, tokens=1, batch_size=cfg.batch_size, seed=seed, vocab_size=cfg.vocab_size,
                       seq_len=cfg.seq_len, heldout_fraction=fraction, split_by="doc", n_checkpoints=2)
    data = steps.prepare_data(run_dir, base, docs)
    tc = dataclasses.replace(base, tokens=steps.epoch_tokens(base, data["train_sequences"], cfg.epochs))
    info = steps.train(run_dir, tc, docs, log, deadline=deadline)
    run = load_run(run_dir)
    steps.check_deadline(deadline, "evaluation")
    greedy = greedy_specs(run_dir, run, specs, cfg.greedy_kinds, log)
    all_specs = [*specs, *greedy]
    ev = steps.evaluate(run_dir, run, all_specs, log)
    entry = {"scale": scale, "seed": seed, "params": info["parameters"], "n_train": len(run.train),
             "regime": regime(run, info), "train_summary": info["summary"], "eval": ev, "fisher": cfg.fisher,
             "fisher_seed": cfg.fisher_seed, "n_greedy": len(greedy),
             "query_kinds": {s.id: s.kind for s in all_specs}, "variants": {}, "validation": {}}
    ctx = Context.build(TrainingTable.from_dataset(run.train))
    key = _analysis_key(cfg, all_specs)
    for layer_set in cfg.layer_sets:
        steps.check_deadline(deadline, f"fitting {layer_set}")
        factors = steps.fit(run_dir, run, layer_set, LAYER_SETS[layer_set], cfg.fisher_seed, log, fisher=cfg.fisher)
        steps.check_deadline(deadline, f"scoring {layer_set}")
        scores = steps.score(run_dir, run, factors, layer_set, all_specs, log)
        records = _records(cfg, run_dir, run, layer_set, scores, all_specs, ctx, key)
        entry["variants"][layer_set] = records
        if cfg.token_k and layer_set == cfg.layer_sets[0]:
            steps.check_deadline(deadline, "token-wise attribution")
            _merge(records, _token_stats(cfg, run_dir, run, factors, layer_set, all_specs, scores, key, log))
        if scale in cfg.checkpoint_scales and layer_set == cfg.layer_sets[0]:
            steps.check_deadline(deadline, "influence at the mid-training checkpoint")
            entry["checkpoint"] = _mid_training(cfg, run_dir, layer_set, all_specs, ctx, key, records, log)
        if scale in cfg.validate_scales and layer_set == cfg.layer_sets[0]:
            steps.check_deadline(deadline, "validation")
            entry["validation"] = _validation(cfg, run_dir, run, factors, layer_set, specs, scores, records, seed, log)
    entry["timings"] = steps.timings(run_dir)
    return entry


def _validation(cfg, run_dir, run, factors, layer_set, specs, scores, records, seed, log) -> dict:
    path = run_dir / f"validation-{layer_set}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    index = {s.id: i for i, s in enumerate(specs)}
    chosen = [s for s in specs if s.kind == "semantic"][: cfg.tail_queries]
    values = np.stack([scores.values[index[s.id]] for s in chosen]) if chosen else None
    result = {"damping_sweep": damping_sweep(run_dir, run, factors, layer_set, specs, records, cfg.damping_sweep, log),
              "tail_patch": tail_patch(run, chosen, values, k=cfg.tail_k, lr=cfg.tail_lr, seed=seed) if chosen
              else None}
    path.write_text(json.dumps(result, indent=1))
    log(f"  validation (tail-patch, damping sweep) in {time.perf_counter() - t0:.0f} s")
    return result


def _merge(records: list[dict], extra: Sequence[dict]) -> None:
    by_id = {r["id"]: r for r in records}
    for e in extra:
        by_id[e["id"]].update({k: v for k, v in e.items() if k != "id"})


def _token_stats(cfg, run_dir, run, factors, layer_set, specs, scores, key, log) -> list[dict]:
    """:func:`experiments.tokenwise.attribute_top` for the fixed queries of
    ``cfg.token_kinds``, cached in ``tokens-<layer set>.json``."""
    from . import scale_runs as steps
    from . import tokenwise

    key = f"{key}:{cfg.token_k}:{hashlib.sha256(Path(tokenwise.__file__).read_bytes()).hexdigest()[:8]}"

    def compute():
        t0 = time.perf_counter()
        index = {s.id: i for i, s in enumerate(specs)}
        chosen = [s for s in specs if s.kind in cfg.token_kinds and not s.completion_of]
        values = np.stack([scores.values[index[s.id]] for s in chosen]) if chosen else np.zeros((0, len(run.train)))
        records = tokenwise.attribute_top(run, factors, chosen, values, k=cfg.token_k)
        log(f"  token-wise attribution of {len(chosen)} queries' top {cfg.token_k} in {time.perf_counter() - t0:.0f} s")
        return records

    return steps.cached_json(run_dir / f"tokens-{layer_set}.json", key, "records", compute)


def _mid_training(cfg, run_dir, layer_set, specs, ctx, key, final_records, log) -> dict:
    """The semantic and control queries scored with EK-FAC fitted at the checkpoint nearest
    half of training (its own factors, same Fisher key): their records there, with each
    query's top-k overlap with its top-k at the final weights (``final_overlap``)."""
    from influence.lm import load_run
    from influence.lm.checkpoint import list_checkpoints

    from . import scale_runs as steps
    from .analysis import query_records

    found = sorted(list_checkpoints(run_dir / "checkpoints"))
    final = found[-1]
    step = min(found[:-1] or found, key=lambda s: abs(s - final / 2))

    def compute():
        run = load_run(run_dir, step=step)
        subset = [s for s in specs if s.kind in ("semantic", "semantic_control") and not s.completion_of]
        name = f"{layer_set}-step{step}"
        factors = steps.fit(run_dir, run, name, LAYER_SETS[layer_set], cfg.fisher_seed, log, fisher=cfg.fisher)
        scores = steps.score(run_dir, run, factors, name, subset, log)
        records = query_records(subset, scores.values, scores.per_layer, ctx, n_blocks=run.config.n_layers,
                                k=cfg.top_k, powerlaw_boot=0, seed=0)
        top_final = {r["id"]: set(r["top_rows"]) for r in final_records}
        for r in records:
            r["final_overlap"] = len(set(r["top_rows"]) & top_final[r["id"]]) / cfg.top_k
        return {"step": int(step), "final_step": int(final), "fraction": step / final, "records": records}

    return steps.cached_json(run_dir / f"checkpoint-{layer_set}-step{step}.json", key, "result", compute)


# --------------------------------------------------------------------------- across runs


def endpoint_cells(entries: Sequence[dict], layer_set: str, query_set: str = "fixed") -> list[dict]:
    """Per-scale cells for :func:`experiments.stats.evaluate_endpoint`, ordered by size:
    each with the seeds' records (greedy queries renamed to the id they complete, so
    that columns pair across seeds and scales) and held-out losses."""
    scales = sorted({e["scale"] for e in entries},
                    key=lambda s: next(e["params"]["non_embedding"] for e in entries if e["scale"] == s))
    cells = []
    for scale in scales:
        runs = sorted((e for e in entries if e["scale"] == scale), key=lambda e: e["seed"])
        recs = []
        for e in runs:
            rs = e["variants"].get(layer_set, [])
            if query_set == "greedy":
                rs = [{**r, "id": r["completion_of"]} for r in rs if r.get("completion_of")]
            else:
                rs = [r for r in rs if not r.get("completion_of")]
            recs.append(rs)
        cells.append({"scale": scale, "params": runs[0]["params"]["non_embedding"],
                      "heldout": np.array([e["regime"]["heldout_loss"] for e in runs]), "records": recs})
    return cells


def endpoints(entries: Sequence[dict], layer_sets: Sequence[str], n_boot: int) -> dict:
    """Every declared endpoint for every layer set."""
    return {ls: [evaluate_endpoint(ep, endpoint_cells(entries, ls, ep.query_set), n_boot=n_boot)
                 for ep in ENDPOINTS] for ls in layer_sets}


def _machine() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores"


def run_all(cfg: V2Config, out: Path, *, runs: Sequence[tuple[str, int]] | None = None,
            time_budget: float | None = None, publish: Path | None = None, command: str = "", log: Log = _log,
            report: Callable[[dict], str] | None = None) -> int:
    """Run (or resume) every run of ``cfg``, then write ``results.json``, the score archive
    and, given ``report`` (results -> markdown, e.g. :func:`experiments.render.render_report`,
    passed in so that this module does not import the renderer that imports it), ``report.md``.
    Returns 0 when done, :data:`EXIT_RESUME` when the time budget ran out first."""
    import jax

    from . import scale_runs as steps

    deadline = None if time_budget is None else time.monotonic() + time_budget
    out.mkdir(parents=True, exist_ok=True)
    train_docs, held, spec, specs = documents(cfg, log)
    write_queries(out / "queries.jsonl", specs)
    (out / "insertions.json").write_text(json.dumps(spec, indent=1))
    kinds = sorted({s.kind for s in specs})
    log(f"{cfg.name}: {len(specs)} queries ({', '.join(f'{k} {sum(s.kind == k for s in specs)}' for k in kinds)}), "
        f"{len(train_docs)} training documents, {len(held)} held-out")
    entries = []
    try:
        for scale, seed in runs or cfg.runs:
            entries.append(run_one(cfg, out, scale, seed, train_docs, held, specs, log, deadline))
    except steps.OutOfTime as e:
        log(f"stopping: {e}; run the same command again to resume")
        return EXIT_RESUME
    results = {"version": 2, "config": cfg.name, "command": command,
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": _machine(),
               "jax": jax.__version__, "loadavg": list(os.getloadavg()),
               "settings": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
               "query_counts": {k: sum(s.kind == k for s in specs) for k in kinds}, "runs": entries,
               "endpoints": endpoints(entries, cfg.layer_sets, cfg.n_boot)}
    results = _rounded(results)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    if report is not None:
        (out / "report.md").write_text(report(results))
    _archive_scores(cfg, out, entries)
    if publish:
        publish.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "report.md", "queries.jsonl", "insertions.json", "scores.npz"):
            if (out / name).exists():
                (publish / name).write_bytes((out / name).read_bytes())
    log(f"done: {out / 'results.json'}")
    return 0


def _archive_scores(cfg: V2Config, out: Path, entries: Sequence[dict]) -> None:
    """Every run's score matrix (summed over layers) in ``scores.npz``
    (``<scale>-seed<k>-<layer set>``: ``[Q, N]``), so that every figure can be recomputed:
    a float16 mantissa with a power-of-two scale per row (:func:`experiments.archive.write_scores`;
    plain float16 overflowed in v2's archive, issue 26)."""
    from .archive import write_scores

    arrays = {}
    for e in entries:
        for ls in cfg.layer_sets:
            path = out / f"{e['scale']}-seed{e['seed']}" / "scores" / f"{ls}.npz"
            if path.exists():
                with np.load(path) as z:
                    arrays[f"{e['scale']}-seed{e['seed']}-{ls}"] = z["values"]
    write_scores(out / "scores.npz", arrays)


def _rounded(value, digits: int = 5):
    if isinstance(value, float) and np.isfinite(value) and value != 0:
        return round(value, digits - 1 - int(np.floor(np.log10(abs(value)))))
    if isinstance(value, np.ndarray):
        return _rounded(value.tolist(), digits)
    if isinstance(value, (np.floating, np.integer)):
        return _rounded(value.item(), digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value
