"""The v3 scale experiment (issue 26), declared before any run: a headline that BM25
cannot pass, models that learn, a ladder spanning >= 100x in total parameters, and the
robustness a reviewer asks for.

Design (fixed here and published by ``design``; no v3 model has been trained):

- **Data.** v2's mix (Shakespeare, KJV and RV1909 chapters, insertions), plus the
  ``translated_only`` chapters in Spanish only: their KJV documents are *not* trained on.
  Queries: v2's set, the translated-only WEB queries and their names-masked twins
  (:mod:`experiments.v3_data`), and WEB queries of trained KJV verses stratified by
  BM25's rank of their source over the training windows, decided from BM25 alone on the
  tokenized windows before any model is trained.
- **Headline endpoints** (paper claims): the translated-only MRR minus BM25's (names
  masked and not), and the hard stratum's MRR minus BM25's; each reproduces the paper only
  if influence beats BM25 at the largest size *and* the difference grows with size, the
  nested interval excluding 0 (:func:`experiments.render.paper_verdict`).
- **Training.** Per size, a learning-rate sweep over ``lr_multipliers`` x the ladder's
  rate at the first seed, chosen on held-out loss (the chosen run is that seed's run; the
  others are reported); a token budget of ``tokens_per_parameter`` x total parameters,
  clipped to [``min_epochs``, ``max_epochs``] epochs of the training set; held-out loss
  reported beside the Kneser-Ney baselines (:mod:`experiments.ngram`).
- **Robustness.** Every headline endpoint at damping lambda x ``damping_multipliers``
  (lambda = the library default, 0.1 x mean eigenvalue) and with the identity curvature
  (``fit_factors(strategy="identity")``: gradient dot products) beside EK-FAC; ``seeds_small`` seeds up to ``small``,
  ``seeds_large`` above; the tail-patch check at ``validate_scales``.

  python -m experiments.scale_v3 design --config v3 --publish docs/experiments/scale-v3/design.json
  python -m experiments.scale_v3 plan --config v3-gpu     # the runs, budgets and sweeps, in order

  python -m experiments.scale_v3 run --config v3-tiny [--sizes tiny] [--seeds 0] [--time-budget 480]

``run`` executes the design, every step cached under ``--out`` (Trainer checkpoints,
:func:`experiments.scale_runs.cached_json`, factors, scores): per size the learning-rate
sweep at the first seed, the chosen rate's other seeds, EK-FAC at lambda x
``damping_multipliers`` and the identity curvature, and per query influence's, BM25's and
chance's reciprocal rank and recall@10 of the source; then ``results.json`` (per-size
intervals, slopes, verdicts), ``report.md`` and ``scores.npz`` (:mod:`experiments.archive`,
kept out of git). It stops between cached steps when ``--time-budget`` is spent (exit
status 75: run it again). ``experiments/run_gpu_v3.sh`` is the accelerator ladder's script.

  python -m experiments.scale_v3 run --config v3 --sizes tiny --seeds 0 --lr-multipliers 1 --train-only
  python -m experiments.scale_v3 run --config v3 --publish docs/experiments/scale-v3 --publish-training

``--train-only`` trains the given runs without choosing or scoring (one process per run, in
parallel; ``run`` then finds them cached); ``--max-tokens`` caps every run's tokens below
the budget rule (a deviation, recorded); ``--publish-training`` publishes what has trained
when nothing could be scored (:func:`publish_training`). The first CPU run (2026-12-08)
only trained part of the ``tiny`` sweep on a heavily shared machine: the docs say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import sys
from pathlib import Path

from .mixture import bible_chapters, pin_heldout
from .queries_v2 import QueryCounts
from .scale_v2 import FULL, TINY, V2Config

SMALL_OR_BELOW = ("tiny", "mini", "small")


@dataclasses.dataclass(frozen=True)
class V3Config:
    """A v3 configuration: ``base`` (a v2 configuration) gives the mix, the v2 query set,
    the insertions and the estimator settings; the fields below are v3's additions."""

    name: str
    base: V2Config
    scales: tuple[str, ...]
    translated_only: tuple[str, ...]  # chapters trained in Spanish only (their KJV removed)
    n_translated: int = 160
    n_min_translated: int = 150  # the floor for the translated-only endpoint
    hard_per_stratum: int = 120  # WEB queries drawn per BM25 stratum (all when fewer)
    n_min_hard: int = 100
    seeds_small: int = 5  # seeds at the sizes up to `small`
    seeds_large: int = 3  # above
    lr_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0)
    tokens_per_parameter: float = 20.0  # of total parameters
    min_epochs: float = 1.0
    max_epochs: float = 4.0
    damping_multipliers: tuple[float, ...] = (0.1, 1.0, 10.0)
    curvatures: tuple[str, ...] = ("ekfac", "identity")
    validate_scales: tuple[str, ...] = ()
    max_steps: int | None = None  # cap on training steps per run (smoke tests only; None = the budget)
    # A cap on the tokens of every run below the budget rule's (None: the rule). Not part of
    # the design: a run that needs it (the CPU time available) records it in its results.
    max_tokens: int | None = None
    recall_k: int = 10
    ngram_orders: tuple[int, ...] = (2, 3, 4)  # Kneser-Ney baselines printed beside held-out loss

    def seeds(self, scale: str) -> tuple[int, ...]:
        return tuple(range(self.seeds_small if scale in SMALL_OR_BELOW else self.seeds_large))


V3_TINY = V3Config(
    name="v3-tiny",
    base=dataclasses.replace(TINY, name="v3-tiny", counts=QueryCounts(semantic=6, semantic_control=3, memorised=3,
                                                                        style=3, crosslingual=2)),
    scales=("tiny", "mini"), translated_only=("Psalms 24",), n_translated=6, n_min_translated=6, hard_per_stratum=4,
    n_min_hard=4,
    seeds_small=1, seeds_large=1, lr_multipliers=(0.5, 1.0, 2.0), validate_scales=("tiny",))

# v2's mix is too small for a token budget by parameters (~0.64M training tokens: 20 tokens
# per parameter exceeds 4 epochs from the smallest rung on): v3 trains on every play that is
# neither held out nor an insertion host, and on more Bible chapters (both languages).
_HELD_PLAYS = ("othello", "king-lear")
_V3_MIX = dataclasses.replace(
    FULL.mixture,
    plays=tuple(p for p in (
        "a-midsummer-night-s-dream", "all-s-well-that-ends-well", "antony-and-cleopatra", "edward-iii", "hamlet",
        "henry-iv-part-1", "henry-iv-part-2", "henry-v", "henry-vi-part-1", "henry-vi-part-2", "henry-vi-part-3",
        "henry-viii", "julius-caesar", "king-john", "love-s-labours-lost", "macbeth", "richard-iii",
        "romeo-and-juliet", "the-comedy-of-errors", "the-merchant-of-venice", "the-merry-wives-of-windsor",
        "the-taming-of-the-shrew", "the-tempest", "timon-of-athens", "titus-andronicus", "troilus-and-cressida",
        "twelfth-night", "two-gentlemen-of-verona") if p not in _HELD_PLAYS + FULL.host_plays),
    bible=(*FULL.mixture.bible, "Exodus 1-20", "Luke 1-14", "Acts 1-8"))

V3 = V3Config(
    name="v3", base=dataclasses.replace(FULL, name="v3", mixture=_V3_MIX),
    scales=("tiny", "mini", "small", "medium", "large", "xl"),
    translated_only=("Matthew 5-7", "Luke 15-16", "Genesis 14-15"), validate_scales=("mini", "large"))

V3_GPU = V3Config(
    name="v3-gpu", base=dataclasses.replace(FULL, name="v3-gpu", mixture=_V3_MIX, layer_sets=("mlp", "blocks")),
    scales=("small", "medium", "large", "xl", "xxl", "xxxl"),
    translated_only=V3.translated_only, validate_scales=("small", "xl"))

V3_CONFIGS = {c.name: c for c in (V3_TINY, V3, V3_GPU)}


def parameters(scale: str, cfg: V3Config) -> dict[str, int]:
    """Parameter counts of ``scale`` at ``cfg``'s vocabulary and window, in closed form
    (the ladder's GPT: per block two LayerNorms, fused QKV and output projections, a 4x MLP,
    all with biases; a final LayerNorm; untied head without bias), checked against
    :func:`influence.lm.parameter_counts` in the tests; instant even for ``xxxl``."""
    from influence.lm import LADDER

    d, n_layers = LADDER[scale].d_model, LADDER[scale].n_layers
    vocab, ctx = cfg.base.vocab_size, cfg.base.seq_len
    non_embedding = n_layers * (12 * d * d + 13 * d) + 2 * d
    embedding, head = vocab * d + ctx * d, vocab * d
    return {"total": non_embedding + embedding + head, "embedding": embedding, "head": head,
            "non_embedding": non_embedding}


def token_budget(cfg: V3Config, total_params: int, train_tokens: int) -> dict:
    """The token budget rule: ``tokens_per_parameter`` x total parameters, clipped to
    [``min_epochs``, ``max_epochs``] passes over the ``train_tokens`` of the training set."""
    want = cfg.tokens_per_parameter * total_params
    lo, hi = cfg.min_epochs * train_tokens, cfg.max_epochs * train_tokens
    tokens = int(min(max(want, lo), hi))
    rule = "20 tokens per parameter" if lo <= want <= hi else ("min epochs" if want < lo else "max epochs (capped)")
    return {"tokens": tokens, "epochs": tokens / train_tokens, "tokens_per_parameter": tokens / total_params,
            "rule": rule.replace("20", f"{cfg.tokens_per_parameter:g}")}


def documents_v3(cfg: V3Config):
    """``(training documents, held-out documents, insertion spec, v2 query specs, Spanish
    translated-only documents, trained KJV documents)``. The KJV documents of
    ``translated_only`` are absent from training (checked)."""
    from .scale_v2 import documents

    train_docs, held, spec, specs = documents(cfg.base)
    translated = bible_chapters(cfg.translated_only)
    spanish = [d for d in translated if d.genre == "es"]
    removed = {d.doc_id for d in translated if d.genre == "en"}
    if overlap := sorted({d.section for d in train_docs if d.source in ("kjv", "sparv")}
                         & {d.section for d in translated}):
        raise ValueError(f"translated_only chapters {overlap} are also in the mix's bible selection")
    train_docs = [*train_docs, *spanish]
    assert not removed & {d.doc_id for d in train_docs}, "a translated-only KJV document is in training"
    return train_docs, held, spec, specs, spanish, [d for d in train_docs if d.source == "kjv"]


def _mrr(ranks) -> float:
    return float(sum(1 / r for r in ranks) / len(ranks)) if ranks else float("nan")


def design(cfg: V3Config, work: Path) -> dict:
    """Every decision of ``cfg`` that depends on the data, made from the data and BM25
    alone (no model): the translated-only queries (sources found, names masked, BM25's MRR
    and chance), the BM25 strata of the English candidates and the declared hard stratum,
    the ladder (parameters, learning-rate grid, token budget, seeds) and the robustness
    variants."""
    from influence.lm import LADDER, TrainConfig
    from influence.lm.corpus import bible_verses
    from influence.lm.sequences import load_splits
    from influence.query.bm25 import BM25

    from . import metrics as M
    from . import scale_runs as steps
    from .analysis import TrainingTable
    from .metrics import chance_mrr
    from .v3_data import (
        bm25_strata,
        declare_hard,
        english_candidates,
        ranks_summary,
        select_strata,
        translated_queries,
    )

    train_docs, held, _, specs, spanish, kjv = documents_v3(cfg)
    docs, fraction = pin_heldout(train_docs, held, 0)
    tc = TrainConfig(scale=cfg.scales[0], tokens=1, batch_size=cfg.base.batch_size, seed=0,
                     vocab_size=cfg.base.vocab_size, seq_len=cfg.base.seq_len, heldout_fraction=fraction,
                     split_by="doc", n_checkpoints=2)
    # prepare_data reuses whatever a folder holds: key the folder by what the data depend on.
    key = hashlib.sha256(json.dumps([sorted(d.doc_id for d in docs), dataclasses.asdict(tc)], default=str)
                         .encode()).hexdigest()[:12]
    data_dir = work / f"design-data-{key}"
    info = steps.prepare_data(data_dir, tc, docs)
    table = TrainingTable.from_dataset(load_splits(data_dir / "data")["train"])
    bm25 = BM25(table.text)
    web = bible_verses("web")

    trans = translated_queries(spanish, web, cfg.n_translated, seed=cfg.base.query_seed)
    found, bm_ranks, chance, masked_changed = {}, {"translated": [], "translated_masked": []}, [], 0
    by_id = {s.id: s for s in trans}
    for s in trans:
        rows = table.rows_holding(s.source_doc, s.source_text)
        found[s.id] = len(rows) > 0
        if len(rows):
            bm_ranks[s.kind].append(int(M.ranks_of(bm25.scores(s.text), rows).min()))
            if s.kind == "translated":
                chance.append(chance_mrr(len(table), len(rows)))
        if s.kind == "translated_masked" and s.text != by_id["tro-" + s.id[4:]].text:
            masked_changed += 1
    cands = english_candidates(kjv, web)
    strata = bm25_strata(cands, table, bm25)
    counts = {k: len(v) for k, v in strata.items()}
    hard, why = declare_hard(counts, cfg.n_min_hard)
    chosen = select_strata(strata, cfg.hard_per_stratum, seed=cfg.base.query_seed)
    train_tokens = info["train_target_tokens"]
    ladder = []
    for scale in cfg.scales:
        p = parameters(scale, cfg)
        ladder.append({"scale": scale, "d_model": LADDER[scale].d_model, "n_layers": LADDER[scale].n_layers,
                       "params": p, "seeds": list(cfg.seeds(scale)),
                       "learning_rates": [round(LADDER[scale].learning_rate * m, 8) for m in cfg.lr_multipliers],
                       "budget": {k: (round(v, 3) if isinstance(v, float) else v)
                                  for k, v in token_budget(cfg, p["total"], train_tokens).items()}})
    totals = [x["params"]["total"] for x in ladder]
    n_tr = sum(found[s.id] for s in trans if s.kind == "translated")
    return {
        "version": 3, "config": cfg.name, "status": "declared; no v3 model has been trained",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "data": {"plays": list(cfg.base.mixture.plays), "bible": list(cfg.base.mixture.bible),
                 "train_sequences": info["train_sequences"], "train_target_tokens": train_tokens,
                 "translated_only_chapters": list(cfg.translated_only),
                 "kjv_removed": [d.section for d in spanish], "v2_queries": len(specs)},
        "translated": {"n": n_tr, "n_min": cfg.n_min_translated, "meets_n_min": n_tr >= cfg.n_min_translated,
                       "masked_twins_changed": masked_changed,
                       "bm25_mrr": round(_mrr(bm_ranks["translated"]), 5),
                       "bm25_mrr_masked": round(_mrr(bm_ranks["translated_masked"]), 5),
                       "bm25_first": sum(r == 1 for r in bm_ranks["translated"]),
                       "chance_mrr": round(sum(chance) / max(len(chance), 1), 6),
                       "verses": [s.verse for s in trans if s.kind == "translated"]},
        "bm25_strata": {"candidates": len(cands), "summary": ranks_summary(strata), "hard": hard,
                        "hard_n": sum(counts[k] for k in hard), "hard_reason": why,
                        "per_stratum_drawn": cfg.hard_per_stratum, "chosen": chosen},
        "ladder": ladder, "span_total_params": round(max(totals) / min(totals), 1),
        "training": {"lr_multipliers": list(cfg.lr_multipliers), "lr_choice": "lowest held-out loss at seed 0",
                     "tokens_per_parameter": cfg.tokens_per_parameter, "epochs": [cfg.min_epochs, cfg.max_epochs]},
        "robustness": {"damping_multipliers": list(cfg.damping_multipliers), "curvatures": list(cfg.curvatures),
                       "validate_scales": list(cfg.validate_scales)},
        "endpoints": [
            {"name": "translated", "role": "paper claim", "metric": "semantic_rr_minus_bm25", "kinds": ["translated"]},
            {"name": "translated_masked", "role": "paper claim", "metric": "semantic_rr_minus_bm25",
             "kinds": ["translated_masked"]},
            {"name": "bm25_hard", "role": "paper claim", "metric": "semantic_rr_minus_bm25", "strata": hard},
            {"name": "abstraction_control", "role": "positive control", "metric": "semantic_rr",
             "kinds": ["semantic_control"]},
        ],
        "verdict_rule": ("reproduces the paper only if n >= 30, influence beats BM25 at the largest size "
                         "(interval above 0) and the difference grows with size (slope interval excludes 0)"),
    }


def plan(cfg: V3Config) -> list[dict]:
    """Every training run in order: for each scale, the learning-rate sweep at the first
    seed (three runs), then the other seeds at the chosen rate."""
    out = []
    for scale in cfg.scales:
        seeds = cfg.seeds(scale)
        out += [{"scale": scale, "seed": seeds[0], "lr_multiplier": m, "step": "lr sweep"} for m in cfg.lr_multipliers]
        out += [{"scale": scale, "seed": s, "lr_multiplier": "chosen", "step": "seed"} for s in seeds[1:]]
    return out


# --------------------------------------------------------------------------- the runs (issue 26, `run`)

EXIT_RESUME = 75  # as experiments.scale_v2: not finished within the time budget; run the same command again
ENDPOINTS_V3 = (  # name, role, query kinds (the design's endpoints; the hard strata are filled from the design)
    ("translated", "paper claim", ("translated",)),
    ("translated_masked", "paper claim", ("translated_masked",)),
    ("bm25_hard", "paper claim", None),
    ("bm25_first", "positive control", ("bm25_first",)),
)


@dataclasses.dataclass
class V3Data:
    """What the runs train on and are queried with: training and held-out documents and the
    queries, each with ``source_doc``/``source_text`` naming its source; kinds
    ``translated``, ``translated_masked`` and ``bm25_<stratum>``; ``hard``: the strata
    declared hard."""

    train_docs: list
    held: list
    queries: list
    hard: list[str]


def _data_key(cfg: V3Config) -> str:
    """Hash of what the design's query choices depend on (the mix, the translated-only
    chapters and the draw sizes), not of the sizes or training settings: ``--sizes`` and
    the smoke-test overrides reuse the cached design."""
    fields = [dataclasses.asdict(cfg.base), cfg.translated_only, cfg.n_translated, cfg.hard_per_stratum,
              cfg.n_min_hard]
    return hashlib.sha256(json.dumps(fields, default=str, sort_keys=True).encode()).hexdigest()[:16]


def v3_data(cfg: V3Config, work: Path, log=print) -> V3Data:
    """The documents and queries of ``cfg``: the design (cached in ``work/design.json``,
    recomputed when the configuration changes) picks the translated-only verses and the
    BM25 strata; every query of the chosen strata becomes a ``bm25_<stratum>`` query."""
    from influence.lm.corpus import bible_verses

    from . import scale_runs as steps
    from .v3_data import english_candidates, translated_queries

    work.mkdir(parents=True, exist_ok=True)
    # The corpora come from diatheke, minutes under load: a resumed or parallel run reads
    # the documents and queries back from a pickle keyed like the design.
    cache = work / f"v3-data-{_data_key(cfg)}.pkl"
    if cache.exists():
        import pickle

        data = pickle.loads(cache.read_bytes())
        log(f"{cfg.name}: {len(data.queries)} queries, {len(data.train_docs)} training documents, "
            f"{len(data.held)} held-out (cached)")
        return data
    d = steps.cached_json(work / "design.json", _data_key(cfg), "design",
                          lambda: design(cfg, work))
    train_docs, held, _, _, spanish, kjv = documents_v3(cfg)
    web = bible_verses("web")
    queries = translated_queries(spanish, web, cfg.n_translated, seed=cfg.base.query_seed)
    by_verse = {c.verse: c for c in english_candidates(kjv, web)}
    for stratum, verses in d["bm25_strata"]["chosen"].items():
        queries += [dataclasses.replace(by_verse[v], kind=f"bm25_{stratum}") for v in verses if v in by_verse]
    log(f"{cfg.name}: {len(queries)} queries, {len(train_docs)} training documents, {len(held)} held-out")
    data = V3Data(train_docs, held, queries, list(d["bm25_strata"]["hard"]))
    import pickle

    from influence.runtime.io import atomic_write_bytes

    atomic_write_bytes(cache, pickle.dumps(data))
    return data


def _train_one(cfg: V3Config, out: Path, data: V3Data, scale: str, seed: int, lr_multiplier: float, log,
               deadline) -> tuple[Path, dict]:
    """Train (or resume) one run at ``lr_multiplier`` x the ladder's rate and the budget
    rule's tokens; returns its folder and ``{"run", "budget", "heldout_loss", ...}``
    (:func:`experiments.scale_v2.regime`, cached in ``regime.json``)."""
    from influence.lm import LADDER, TrainConfig, load_run

    from . import scale_runs as steps
    from .scale_v2 import regime

    run_dir = out / f"{scale}-seed{seed}-lr{lr_multiplier:g}"
    docs, fraction = pin_heldout(data.train_docs, data.held, seed)
    b = cfg.base
    base = TrainConfig(scale=scale, tokens=1, batch_size=b.batch_size, seed=seed, vocab_size=b.vocab_size,
                       seq_len=b.seq_len, heldout_fraction=fraction, split_by="doc", n_checkpoints=2,
                       learning_rate=LADDER[scale].learning_rate * lr_multiplier)
    info = steps.prepare_data(run_dir, base, docs)
    budget = token_budget(cfg, parameters(scale, cfg)["total"], info["train_target_tokens"])
    tokens = steps.epoch_tokens(base, info["train_sequences"], budget["epochs"])
    if cfg.max_steps:
        tokens = min(tokens, cfg.max_steps * b.batch_size * b.seq_len)
    step_tokens = b.batch_size * b.seq_len
    capped = bool(cfg.max_tokens and tokens > cfg.max_tokens)
    if capped:  # whole steps, at most max_tokens
        tokens = max(1, cfg.max_tokens // step_tokens) * step_tokens
    budget = {**budget, "capped": capped}
    tc = dataclasses.replace(base, tokens=tokens)
    trained = steps.train(run_dir, tc, docs, log, deadline=deadline)
    steps.check_deadline(deadline, f"evaluating {run_dir.name}")
    reg = steps.cached_json(run_dir / "regime.json", f"{tc.tokens}", "regime",
                            lambda: regime(load_run(run_dir), trained))
    return run_dir, {"scale": scale, "seed": seed, "lr_multiplier": lr_multiplier,
                     "learning_rate": tc.learning_rate, "params": trained["parameters"],
                     "budget": {**budget, "tokens_trained": tc.tokens}, "regime": reg}


def choose_lr(sweep: list[dict]) -> float:
    """The sweep's multiplier with the lowest held-out loss (the first of equals)."""
    return min(sweep, key=lambda r: r["regime"]["heldout_loss"])["lr_multiplier"]


def query_metrics(values, rows_of: list, k: int = 10) -> list[dict]:
    """Reciprocal rank and recall@``k`` of each query's source rows among scores ``values``
    ``[Q, N]`` (``rows_of[q]``: the rows, empty when no window holds the source: NaN)."""
    from . import metrics as M

    return [{"rr": M.reciprocal_rank(v, rows), f"recall{k}": M.recall_at_k(v, rows, k)}
            for v, rows in zip(values, rows_of)]


def fused_scores(model, task, variants: dict, queries, train, *, batch_size: int = 32) -> dict:
    """Scores ``[Q, N]`` of several curvature/damping variants from ONE pass over ``train``:
    ``variants`` maps a name to ``(factors, damping)`` (as :func:`influence.pairwise_scores`
    takes them); each variant's preconditioned query gradients are stacked along the query
    axis and contracted with the same per-example training gradients, so k variants cost
    one training pass instead of k (the v3 runs score EK-FAC at three dampings and the
    identity). Equal to ``pairwise_scores`` per variant (tested); returns ``{name:
    (values [Q, N] float32, damping per layer)}``. Every variant must track the same layers."""
    import jax.numpy as jnp
    import numpy as np

    from influence.runtime.data import as_source
    from influence.runtime.driver import concatenate, run_pass
    from influence.runtime.execution import Execution
    from influence.scoring.contractions import LayerQueries
    from influence.scoring.finite import RowCheck
    from influence.scoring.pairwise import score_step
    from influence.scoring.preconditioned import place_queries, prepare_queries, scoring_batch

    ex = Execution.of(None, {"batch_size": batch_size, "progress": False})
    sides = {v: prepare_queries(model, task, f, queries, damping=d, execution=ex) for v, (f, d) in variants.items()}
    first = next(iter(sides.values()))
    tracked, mesh, names = first.tracked, first.mesh, list(first.tracked.layer_names)
    if other := [v for v, side in sides.items() if list(side.tracked.layer_names) != names]:
        raise ValueError(f"variants {other} track other layers than {names}: fuse only variants of the same layers")
    stacked = {n: LayerQueries(full=jnp.concatenate([side.queries[n].dense() for side in sides.values()]))
               for n in names}
    placed = place_queries(stacked, mesh)
    ex = scoring_batch(ex, tracked, task, train, mesh, queries=placed)
    source = as_source(train, ex.batch_size, task, model)
    finite = RowCheck(source.batch_size)

    def score(step):
        out = score_step(placed, tracked.state, step.arrays, step.example_mask, graphdef=tracked.graphdef,
                         layers=tracked.layers, task=task, kind="empirical", mesh=mesh, keep_layers=False)
        finite.update(out, step.batch)
        return out

    collected = run_pass(finite.guard(concatenate(score), checkpointed=False), source, mesh, desc="scores",
                         progress=False).value
    total = np.asarray(collected, np.float32).sum(axis=0)  # [Q x variants (+ padding), N]
    q = first.n_query
    return {v: (total[i * q:(i + 1) * q], side.damping) for i, (v, side) in enumerate(sides.items())}


def _score_variants(cfg: V3Config, run_dir: Path, queries, log, deadline) -> dict:
    """Per query and variant (``ekfac-x<m>`` for each damping multiplier, ``identity``),
    influence's, BM25's and chance's reciprocal rank and recall@k of its source; cached in
    ``v3-metrics.json`` (keyed by the queries and variants)."""
    import numpy as np

    import influence as inf
    from influence.lm import load_run
    from influence.query.bm25 import BM25

    from . import metrics as M
    from . import scale_runs as steps
    from .analysis import TrainingTable
    from .scale_v2 import LAYER_SETS

    variants = [f"ekfac-x{m:g}" for m in cfg.damping_multipliers if "ekfac" in cfg.curvatures]
    variants += ["identity"] if "identity" in cfg.curvatures else []
    key = f"{steps.queries_fingerprint(queries)}:{','.join(variants)}:{cfg.recall_k}"

    def compute():
        run = load_run(run_dir)
        table = TrainingTable.from_dataset(run.train)
        rows_of = [table.rows_holding(q.source_doc, q.source_text) for q in queries]
        n, k = len(table), cfg.recall_k
        bm25 = BM25(table.text)
        recs = [{"id": q.id, "kind": q.kind, "n_rows": int(len(r)),
                 "chance_rr": M.chance_mrr(n, len(r)) if len(r) else float("nan"),
                 f"chance_recall{k}": min(k, n) / n if len(r) else float("nan")} for q, r in zip(queries, rows_of)]
        for rec, m in zip(recs, query_metrics([bm25.scores(q.text) for q in queries], rows_of, k)):
            rec.update(bm25_rr=m["rr"], **{f"bm25_recall{k}": m[f"recall{k}"]})
        layers = LAYER_SETS["mlp"]
        steps.check_deadline(deadline, f"fitting {run_dir.name}")
        ekfac = steps.fit(run_dir, run, "mlp", layers, cfg.base.fisher_seed, log, fisher=cfg.base.fisher)
        # lambda x m: the library default (0.1 x mean eigenvalue per layer), averaged over the
        # layers into one absolute damping (the scorer takes one), times m.
        lam = float(np.mean([ekfac.damping(name) for name in ekfac.layer_names]))
        steps.check_deadline(deadline, f"scoring {run_dir.name}")
        plan_ = {}
        for v in variants:
            if v == "identity":
                path = run_dir / "factors" / "identity-mlp"
                if (path / "factors.npz").exists():
                    factors = inf.Factors.load(path, model=run.model)
                else:
                    factors = inf.fit_factors(run.model, inf.tasks.CausalLM(), run.train, strategy="identity",
                                              layers=layers, batch_size=32, progress=False)
                    factors.save(path)
                plan_[v] = (factors, None)
            else:
                plan_[v] = (ekfac, float(v.removeprefix("ekfac-x")) * lam)
        values = _fused_cached(run_dir, run, plan_, queries, log)
        for v in variants:
            for rec, qm in zip(recs, query_metrics(values[v], rows_of, k)):
                rec.setdefault("influence", {})[v] = qm
        return {"n_train": n, "lambda_default_mean": lam, "variants": variants, "records": recs}

    return steps.cached_json(run_dir / "v3-metrics.json", key, "metrics", compute)


def _fused_cached(run_dir: Path, run, plan_: dict, queries, log) -> dict:
    """Each variant's scores ``[Q, N]``, from ``scores/v3-<variant>.npz`` when it holds these
    queries at this damping (as :func:`experiments.scale_runs.score` keys them), else all
    missing variants in one pass (:func:`fused_scores`), saved there."""
    import time

    import numpy as np

    import influence as inf
    from influence.query.engine import encode_queries

    from . import scale_runs as steps

    base = steps.queries_fingerprint(queries)

    def key(damping):
        return base + ("" if damping is None else f"@{damping:.6g}")

    out, missing = {}, {}
    for v, (factors, damping) in plan_.items():
        path = run_dir / "scores" / f"v3-{v}.npz"
        if path.exists() and (cached := inf.Scores.load(path)).metadata.get("queries_fingerprint") == key(damping):
            out[v] = np.asarray(cached.values)
        else:
            missing[v] = (factors, damping)
    if missing:
        log(f"  scoring {len(queries)} queries x {len(run.train)} sequences, {len(missing)} variants in one pass")
        t0 = time.perf_counter()
        batch = encode_queries([q.query for q in queries], run.tokenizer, run.config.context_length)
        got = fused_scores(run.model, inf.tasks.CausalLM(), missing, batch, run.train)
        for v, (values, dampings) in got.items():
            scores = inf.Scores(values, None, {"strategy": missing[v][0].strategy, "damping": dampings,
                                               "queries_fingerprint": key(missing[v][1]),
                                               "query_ids": [q.id for q in queries], "fused": list(missing)})
            scores.save(run_dir / "scores" / f"v3-{v}.npz")
            out[v] = values
        log(f"  scored in {time.perf_counter() - t0:.0f} s")
    return out


def _validate(cfg: V3Config, run_dir: Path, queries) -> dict:
    """Estimator validity at a ``validate_scales`` size: v2's tail-patch check
    (:func:`experiments.scale_v2.tail_patch`: one SGD step on a query's top-k sequences by
    EK-FAC influence at lambda x 1 versus on k random ones) on up to ``tail_queries``
    translated-only queries; cached in ``v3-validation.json``."""
    import numpy as np

    import influence as inf
    from influence.lm import load_run

    from . import scale_runs as steps
    from .scale_v2 import tail_patch

    b = cfg.base
    chosen = [i for i, q in enumerate(queries) if q.kind == "translated"][: b.tail_queries]
    key = f"{steps.queries_fingerprint([queries[i] for i in chosen])}:{b.tail_k}:{b.tail_lr}"

    def compute():
        scores = inf.Scores.load(run_dir / "scores" / "v3-ekfac-x1.npz")
        values = np.asarray(scores.values)[chosen]
        result = tail_patch(load_run(run_dir), [queries[i] for i in chosen], values, k=b.tail_k, lr=b.tail_lr,
                            seed=0)
        return {"variant": "ekfac-x1", "kind": "translated", "tail_patch": result}

    return steps.cached_json(run_dir / "v3-validation.json", key, "validation", compute) if chosen else {}


def _matrix(runs: list[dict], ids: list[str], value):
    """``[S, Q]``: ``value(record)`` of query ``ids[q]`` at each run (seed) ``s`` (NaN if absent)."""
    import numpy as np

    out = np.full((len(runs), len(ids)), np.nan)
    col = {q: j for j, q in enumerate(ids)}
    for s, r in enumerate(runs):
        for rec in r["metrics"]["records"]:
            if rec["id"] in col:
                out[s, col[rec["id"]]] = value(rec)
    return out


def endpoint_v3(name: str, role: str, kinds, runs_by_scale: dict[str, list[dict]], variant: str, k: int = 10,
                n_boot: int = 2000, declared_largest: str | None = None) -> dict:
    """One endpoint at one variant: per size, influence's, BM25's and chance's MRR and
    recall@k with nested intervals (queries resampled jointly, seeds within size), the
    difference influence - BM25 in reciprocal rank, its slope against log10 of the total
    parameters, and the verdict (:func:`v3_verdict`; ``declared_largest``: the design's largest
    size, for a run of part of the ladder)."""
    import numpy as np

    from . import stats as S

    scales = list(runs_by_scale)
    ids = sorted({rec["id"] for runs in runs_by_scale.values() for r in runs for rec in r["metrics"]["records"]
                  if rec["kind"] in kinds and rec["n_rows"] > 0})
    out = {"name": name, "role": role, "variant": variant, "kinds": list(kinds), "n_queries": len(ids),
           "scales": scales, "per_scale": []}
    if not ids:
        out["verdict"], out["reason"] = "no queries", "no query of these kinds has its source in training"
        return out

    def infl(key):
        return lambda rec: rec["influence"][variant][key]

    mats = {"influence_mrr": infl("rr"), f"influence_recall{k}": infl(f"recall{k}"), "bm25_mrr": lambda r: r["bm25_rr"],
            f"bm25_recall{k}": lambda r: r[f"bm25_recall{k}"], "chance_mrr": lambda r: r["chance_rr"],
            f"chance_recall{k}": lambda r: r[f"chance_recall{k}"],
            "influence_minus_bm25": lambda r: r["influence"][variant]["rr"] - r["bm25_rr"]}
    per = {m: [_matrix(runs_by_scale[s], ids, f) for s in scales] for m, f in mats.items()}
    intervals = {m: S.scale_means(v, n_boot=n_boot) for m, v in per.items()}
    for i, s in enumerate(scales):
        cell = {"scale": s, "seeds": len(runs_by_scale[s]),
                "total_params": runs_by_scale[s][0]["params"]["total"]}
        cell.update({m: intervals[m][i].as_dict() for m in mats})
        out["per_scale"].append(cell)
    x = np.log10([c["total_params"] for c in out["per_scale"]])
    slope = S.slope_vs(x, per["influence_minus_bm25"], n_boot=n_boot) if len(scales) > 1 else None
    out["slope_per_decade"] = slope.as_dict() if slope else None
    out["verdict"], out["reason"] = v3_verdict(out, declared_largest)
    return out


PARTIAL_FAIL = "not shown on a partial ladder"
PARTIAL_PASS = "passes on the sizes run only (partial ladder): not a reproduction"


def v3_verdict(e: dict, declared_largest: str | None = None) -> tuple[str, str]:
    """The declared rule: a paper claim reproduces the paper only if n >= 30
    (:data:`experiments.stats.MIN_N_CLAIM`), influence beats BM25 at the largest size (the
    interval of the difference above 0) and the difference grows with size (the slope's
    interval above 0); anything else says which part fails. When the run stops short of
    the design's largest size ``declared_largest`` the test cannot pass: the verdict says
    so (:data:`PARTIAL_FAIL` / :data:`PARTIAL_PASS`) and the reason says how the sizes run
    fare under the rule."""
    from . import stats as S

    if e["role"] != "paper claim":
        return f"{e['role']}, not a test of the paper", ""
    partial = declared_largest is not None and e["scales"][-1] != declared_largest
    fail = PARTIAL_FAIL if partial else "does not reproduce"
    if e["n_queries"] < S.MIN_N_CLAIM:
        return fail, f"n = {e['n_queries']} < {S.MIN_N_CLAIM} queries"
    last = e["per_scale"][-1]["influence_minus_bm25"]
    if not last["low"] > 0:
        return fail, f"influence does not beat BM25 at {e['scales'][-1]}"
    slope = e.get("slope_per_decade")
    if not slope:
        return fail, f"influence beats BM25 at {e['scales'][-1]}, but one size ran: no slope, no test of growth"
    if not slope["low"] > 0:
        return fail, (f"influence beats BM25 at {e['scales'][-1]} but the difference does not grow with size "
                      "(slope interval not above 0)")
    if partial:
        return PARTIAL_PASS, (f"influence beats BM25 at {e['scales'][-1]} and the difference grows over "
                              f"{', '.join(e['scales'])}; the declared test needs the ladder up to {declared_largest}")
    return "reproduces the paper", "influence beats BM25 at the largest size and the gain grows with size"


def rank_table(runs_by_scale: dict[str, list[dict]], k: int = 10) -> dict:
    """Every query's rank of its source per run, compact enough for git (the archive of a
    run's per-query metrics; scores stay out of git): ``ids``, ``kinds``, ``n_rows`` (source
    windows; 0: not in training) once, then per run ``n_train`` and per method (``bm25``
    and each influence variant) ``rank`` (1-based best rank of a source window, ``None``
    when there is none; reciprocal rank = 1 / rank) and ``recall{k}`` (share of source
    windows in the top k, 3 decimals)."""
    first = next(iter(runs_by_scale.values()))[0]["metrics"]["records"]
    out = {"ids": [r["id"] for r in first], "kinds": [r["kind"] for r in first],
           "n_rows": [r["n_rows"] for r in first], "recall_k": k, "runs": {}}

    def rank(rr):
        return None if rr is None or not math.isfinite(rr) else int(round(1 / rr))

    def recall(x):
        return None if x is None or not math.isfinite(x) else round(float(x), 3)

    for scale, runs in runs_by_scale.items():
        for r in runs:
            recs = r["metrics"]["records"]
            if [x["id"] for x in recs] != out["ids"] or [x["n_rows"] for x in recs] != out["n_rows"]:
                raise ValueError(f"{scale} seed {r['seed']} is scored on other queries or windows than the first run")
            row = {"n_train": r["metrics"]["n_train"],
                   "bm25": {"rank": [rank(x["bm25_rr"]) for x in recs],
                            f"recall{k}": [recall(x[f"bm25_recall{k}"]) for x in recs]}}
            for v in r["metrics"]["variants"]:
                row[v] = {"rank": [rank(x["influence"][v]["rr"]) for x in recs],
                          f"recall{k}": [recall(x["influence"][v][f"recall{k}"]) for x in recs]}
            out["runs"][f"{scale}-seed{r['seed']}"] = row
    return out


def recompute_means(results: dict, ranks: dict) -> dict:
    """Each endpoint's per-size point values (influence, BM25 and chance MRR, influence -
    BM25) re-derived from ``ranks.json`` alone (:func:`rank_table`): ``{(variant, endpoint,
    scale, metric): value}``, to hold against ``results.json``."""
    import numpy as np

    from .metrics import chance_mrr

    out = {}
    for variant, eps in results["endpoints"].items():
        for e in eps:
            cols = [i for i, (kd, n) in enumerate(zip(ranks["kinds"], ranks["n_rows"])) if kd in e["kinds"] and n]
            for cell in e["per_scale"]:
                runs = [v for name, v in ranks["runs"].items() if name.rsplit("-seed", 1)[0] == cell["scale"]]
                inf_rr = np.array([[1 / r[variant]["rank"][i] for i in cols] for r in runs])
                bm_rr = np.array([[1 / r["bm25"]["rank"][i] for i in cols] for r in runs])
                ch = np.array([[chance_mrr(r["n_train"], ranks["n_rows"][i]) for i in cols] for r in runs])
                for m, v in (("influence_mrr", inf_rr), ("bm25_mrr", bm_rr), ("chance_mrr", ch),
                             ("influence_minus_bm25", inf_rr - bm_rr)):
                    out[(variant, e["name"], cell["scale"], m)] = float(v.mean()) if v.size else float("nan")
    return out


def render_v3_report(results: dict) -> str:
    """``report.md`` of a v3 run: per size the chosen learning rate and held-out loss, then
    every endpoint (damping x1 EK-FAC) with influence, BM25 and chance, and the verdicts of
    every variant; written from ``results.json`` only."""
    from .render import fmt, fmt_ci

    lines = [f"# Scale v3 ({results['config']}): {results['status']}", "",
             f"`{results['command']}` on {results['machine']}, {results['date']}, load {results['loadavg']}.", "",
             "| size | total params | lr multipliers (held-out loss) | chosen | seeds | epochs |",
             "|---|---|---|---|---|---|"]
    for s in results["sizes"]:
        sweep = ", ".join(f"{fmt(r['lr_multiplier'], 2)} ({fmt(r['heldout_loss'], 4)})" for r in s["sweep"])
        lines.append(f"| {s['scale']} | {s['total_params']} | {sweep} | {fmt(s['chosen_lr_multiplier'], 2)} | "
                     f"{len(s['seeds'])} | {fmt(s['epochs'], 3)} |")
    ng = results["ngram"]["heldout_nats"]
    lines += ["", "Held-out loss (nats per token, mean over seeds) beside Kneser-Ney n-grams on the same windows: "
              + "; ".join(f"{s['scale']} {fmt(sum(s['heldout_loss']) / len(s['heldout_loss']), 4)}"
                          f"{'' if s['beats_ngram'] else ' (not better than the best n-gram)'}"
                          for s in results["sizes"])
              + "; " + "; ".join(f"{n}-gram {fmt(v, 4)}" for n, v in ng.items()) + "."]
    for run, v in results.get("validation", {}).items():
        t = v["tail_patch"]
        lines += ["", f"Tail-patch at {run} ({len(t['queries'])} {v['kind']} queries, {v['variant']}, top {t['k']} vs "
                  f"{t['k']} random, lr {t['lr']:g}): mean change of loss top - random "
                  f"{fmt(t['mean_delta_top_minus_random'], 3)} nats; top better for a share "
                  f"{fmt(t['share_top_better'], 3)} of queries."]
    k = results["recall_k"]
    for variant, eps in results["endpoints"].items():
        lines += ["", f"## {variant}", "", f"| endpoint | role | n | size | influence MRR | BM25 MRR | chance MRR | "
                  f"influence R@{k} | BM25 R@{k} | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
        for e in eps:
            for c in e["per_scale"]:
                cells = [e["name"], e["role"], e["n_queries"], c["scale"], fmt_ci(c["influence_mrr"]),
                         fmt_ci(c["bm25_mrr"]), fmt(c["chance_mrr"]["value"], 3),
                         fmt(c[f"influence_recall{k}"]["value"], 3), fmt(c[f"bm25_recall{k}"]["value"], 3),
                         e["verdict"] + (": " + e["reason"] if e["reason"] else "")]
                lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def run_all(cfg: V3Config, out: Path, data: V3Data, *, seeds=None, time_budget: float | None = None,
            publish: Path | None = None, command: str = "", log=print, n_boot: int | None = None) -> int:
    """Run (or resume) ``cfg``'s design on ``data``: per size the learning-rate sweep at
    the first seed, the chosen rate's other seeds, then the scores and metrics of every run;
    write ``results.json``, ``report.md`` and ``scores.npz`` in ``out`` (the first two
    copied to ``publish``). Returns 0 when done, :data:`EXIT_RESUME` when the time budget
    ran out first (every finished step is kept)."""
    import os
    import time

    import jax
    import numpy as np

    from . import scale_runs as steps
    from .archive import write_scores
    from .scale_v2 import _machine, _rounded

    deadline = None if time_budget is None else time.monotonic() + time_budget
    out.mkdir(parents=True, exist_ok=True)
    sizes, runs_by_scale, archive = [], {}, {}
    try:
        for scale in cfg.scales:
            use = [s for s in cfg.seeds(scale) if seeds is None or s in seeds] or list(seeds or cfg.seeds(scale))[:1]
            sweep = [_train_one(cfg, out, data, scale, use[0], m, log, deadline)[1] for m in cfg.lr_multipliers]
            chosen = choose_lr(sweep)
            runs = []
            for seed in use:
                run_dir, entry = _train_one(cfg, out, data, scale, seed, chosen, log, deadline)
                entry["metrics"] = _score_variants(cfg, run_dir, data.queries, log, deadline)
                if scale in cfg.validate_scales and seed == use[0]:
                    steps.check_deadline(deadline, f"validating {run_dir.name}")
                    entry["validation"] = _validate(cfg, run_dir, data.queries)
                runs.append(entry)
                for v in entry["metrics"]["variants"]:
                    path = run_dir / "scores" / f"v3-{v}.npz"
                    if path.exists():
                        with np.load(path) as z:
                            archive[f"{scale}-seed{seed}-{v}"] = z["values"]
            runs_by_scale[scale] = runs
            sizes.append({"scale": scale, "total_params": runs[0]["params"]["total"], "seeds": use,
                          "sweep": [{"lr_multiplier": r["lr_multiplier"], "learning_rate": r["learning_rate"],
                                     "heldout_loss": r["regime"]["heldout_loss"]} for r in sweep],
                          "chosen_lr_multiplier": chosen, "epochs": runs[0]["regime"]["epochs"],
                          "budget": runs[0]["budget"],
                          "heldout_loss": [r["regime"]["heldout_loss"] for r in runs]})
    except steps.OutOfTime as e:
        log(f"stopping: {e}; run the same command again to resume")
        return EXIT_RESUME
    # The Kneser-Ney baselines on the first size's first run's splits (the tokenizer and
    # windows do not depend on the size): each rung's held-out loss is printed beside them.
    from .ngram import heldout_nats

    first = out / f"{cfg.scales[0]}-seed{sizes[0]['seeds'][0]}-lr{sizes[0]['chosen_lr_multiplier']:g}"
    ngram = steps.cached_json(out / "ngram.json", f"{first.name}:{cfg.ngram_orders}", "baseline",
                              lambda: heldout_nats(first / "data", cfg.base.vocab_size, cfg.ngram_orders))
    best_ngram = min(ngram["heldout_nats"].values())
    for s in sizes:
        s["beats_ngram"] = bool(np.mean(s["heldout_loss"]) < best_ngram)
    k, n_boot = cfg.recall_k, n_boot or cfg.base.n_boot
    variants = runs_by_scale[cfg.scales[0]][0]["metrics"]["variants"]
    declared = V3_CONFIGS.get(cfg.name, cfg)
    endpoints = {v: [endpoint_v3(name, role, kinds or tuple(f"bm25_{h}" for h in data.hard), runs_by_scale, v, k,
                                 n_boot, declared.scales[-1]) for name, role, kinds in ENDPOINTS_V3] for v in variants}
    ran = {z["scale"]: z["seeds"] for z in sizes}
    not_run = {s: [x for x in declared.seeds(s) if x not in ran.get(s, [])] for s in declared.scales}
    results = _rounded({
        "version": 3, "config": cfg.name, "status": "run" if cfg.max_steps is None else
        f"smoke run (training capped at {cfg.max_steps} steps): not a measurement", "command": command,
        "max_tokens": cfg.max_tokens,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": _machine(),
        "jax": jax.__version__, "loadavg": [round(x, 2) for x in os.getloadavg()], "recall_k": k,
        "hard_strata": data.hard, "query_counts": {kd: sum(q.kind == kd for q in data.queries)
                                                   for kd in sorted({q.kind for q in data.queries})},
        "ngram": ngram, "validation": {f"{s}-seed{r['seed']}": r["validation"] for s, rs in runs_by_scale.items()
                                       for r in rs if r.get("validation")},
        "sizes": sizes, "heldout_falls_with_size": bool(all(
            np.mean(a["heldout_loss"]) > np.mean(b["heldout_loss"]) for a, b in zip(sizes, sizes[1:]))),
        "declared": {"scales": list(declared.scales), "seeds": {s: list(declared.seeds(s)) for s in declared.scales}},
        "not_run": {s: v for s, v in not_run.items() if v},
        "partial": any(not_run.values()),
        "endpoints": endpoints,
        "lambda_default_mean": {f"{s}-seed{r['seed']}": r["metrics"]["lambda_default_mean"]
                                for s, rs in runs_by_scale.items() for r in rs}})
    from influence.runtime.io import atomic_write_bytes

    atomic_write_bytes(out / "results.json", json.dumps(results, indent=1, default=float).encode())
    atomic_write_bytes(out / "report.md", render_v3_report(results).encode())
    # The per-query ranks (every MRR of the results recomputes from them; tens of kB, unlike the scores).
    atomic_write_bytes(out / "ranks.json", json.dumps(rank_table(runs_by_scale, k), separators=(",", ":")).encode())
    write_scores(out / "scores.npz", archive)
    if publish:  # results, ranks and report: the score archive stays out of git
        publish.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "ranks.json", "report.md"):
            atomic_write_bytes(publish / name, (out / name).read_bytes())
    log(f"done: {out / 'results.json'}")
    return 0


def train_only(cfg: V3Config, out: Path, data: V3Data, *, seeds=None, time_budget: float | None = None,
               log=print) -> int:
    """Train (or resume) every run of ``cfg.scales`` x ``seeds`` (default: the first seed)
    x ``cfg.lr_multipliers`` without choosing or scoring: several processes can train
    disjoint runs at once, and :func:`run_all` then finds them cached. Returns 0, or
    :data:`EXIT_RESUME` when the time budget ran out first."""
    import time

    from . import scale_runs as steps

    deadline = None if time_budget is None else time.monotonic() + time_budget
    try:
        for scale in cfg.scales:
            for seed in seeds or cfg.seeds(scale)[:1]:
                for m in cfg.lr_multipliers:
                    _train_one(cfg, out, data, scale, seed, m, log, deadline)
    except steps.OutOfTime as e:
        log(f"stopping: {e}; run the same command again to resume")
        return EXIT_RESUME
    return 0


def training_status(cfg: V3Config, out: Path) -> list[dict]:
    """Every training run of ``cfg`` found in ``out`` (finished or not), in the order of
    :func:`plan`: its size, seed, learning rate, steps done of its total, whether it
    finished, and its held-out loss curve (``[[step, nats per token], ...]`` from
    ``metrics.jsonl``). Runs never started are absent."""
    from influence.lm import LADDER

    rows = []
    for scale in cfg.scales:
        for seed in cfg.seeds(scale):
            for m in cfg.lr_multipliers:
                run_dir = out / f"{scale}-seed{seed}-lr{m:g}"
                if not (run_dir / "run.json").exists():
                    continue
                info = json.loads((run_dir / "run.json").read_text())
                evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                         if line.strip()] if (run_dir / "metrics.jsonl").exists() else []
                total = int(info["total_steps"])
                done = int(evals[-1]["step"]) if evals else 0
                tc, n_params = info["train_config"], parameters(scale, cfg)["total"]
                rule = token_budget(cfg, n_params, int(info["data"]["train_target_tokens"]))  # the design's budget
                rule_steps = math.ceil(rule["epochs"] * int(info["data"]["train_sequences"]) / tc["batch_size"])
                rows.append({"run": run_dir.name, "scale": scale, "seed": seed, "lr_multiplier": m,
                             "learning_rate": LADDER[scale].learning_rate * m, "total_params": n_params,
                             "tokens_planned": int(tc["tokens"]),
                             "tokens_rule": rule_steps * tc["batch_size"] * tc["seq_len"],
                             "total_steps": total, "steps_evaluated": done, "finished": done == total,
                             "seconds_per_step": round(float(evals[-1]["elapsed_s"]) / done, 3) if done else None,
                             "heldout_curve": [[int(e["step"]), round(float(e["heldout_loss"]), 4)] for e in evals]})
    return rows


def publish_training(cfg: V3Config, out: Path, publish: Path, *, command: str = "", ngram: dict | None = None) -> dict:
    """A partial ``results.json`` for a run that trained but scored nothing (the CPU time
    ran out): what the design planned, every training run started (:func:`training_status`),
    the learning rate chosen at each size whose seed-0 sweep finished, the held-out loss
    beside the Kneser-Ney baselines ``ngram`` (:func:`experiments.ngram.heldout_nats` on the
    first run's windows), and no endpoint (no influence was computed). Written to
    ``publish`` and ``out``; :func:`experiments.render.v3_results_block` renders it."""
    import os

    import jax

    from influence.runtime.io import atomic_write_bytes

    from .scale_v2 import _machine, _rounded

    runs = training_status(cfg, out)
    sizes = []
    for scale in cfg.scales:
        sweep = [r for r in runs if r["scale"] == scale and r["seed"] == cfg.seeds(scale)[0]]
        if len(sweep) == len(cfg.lr_multipliers) and all(r["finished"] for r in sweep):
            best = min(sweep, key=lambda r: r["heldout_curve"][-1][1])
            sizes.append({"scale": scale, "total_params": best["total_params"],
                          "chosen_lr_multiplier": best["lr_multiplier"],
                          "sweep": [{"lr_multiplier": r["lr_multiplier"], "heldout_loss": r["heldout_curve"][-1][1]}
                                    for r in sweep]})
    finished = {(r["scale"], r["seed"]) for r in runs if r["finished"]}
    declared = V3_CONFIGS.get(cfg.name, cfg)
    results = _rounded({
        "version": 3, "config": cfg.name, "status": "partial: trained only, nothing scored", "scored": False,
        "partial": True, "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": _machine(),
        "jax": jax.__version__, "loadavg": [round(x, 2) for x in os.getloadavg()], "max_tokens": cfg.max_tokens,
        "declared": {"scales": list(declared.scales), "seeds": {s: list(declared.seeds(s)) for s in declared.scales},
                     "lr_multipliers": list(declared.lr_multipliers)},
        "runs": runs, "sizes": sizes, "ngram": ngram,
        "not_run": {s: [x for x in declared.seeds(s) if (s, x) not in finished] for s in declared.scales
                    if any((s, x) not in finished for x in declared.seeds(s))},
        "endpoints": {}}, 4)
    text = json.dumps(results, indent=1, default=float).encode()
    for folder in (out, publish):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "results.json", text)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.scale_v3", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("design", "plan", "run"))
    parser.add_argument("--config", choices=sorted(V3_CONFIGS), default="v3-tiny")
    parser.add_argument("--out", type=Path, help="work folder (default: runs/scale/<config>)")
    parser.add_argument("--publish", type=Path, help="design: also write the design JSON here; run: copy "
                        "results.json and report.md into this folder")
    parser.add_argument("--sizes", nargs="+", help="run: only these sizes (default: the config's)")
    parser.add_argument("--seeds", nargs="+", type=int, help="run: only these seeds (default: the config's per size)")
    parser.add_argument("--lr-multipliers", nargs="+", type=float, help="run: override the sweep's multipliers")
    parser.add_argument("--max-steps", type=int, help="run: cap every run's training steps (smoke tests)")
    parser.add_argument("--max-tokens", type=int, help="run: cap every run's training tokens below the budget "
                        "rule's (a deviation from the design, recorded in results.json)")
    parser.add_argument("--publish-training", action="store_true", help="run: publish (to --publish) what has "
                        "trained so far, scoring nothing: a partial results.json (publish_training)")
    parser.add_argument("--train-only", action="store_true", help="run: only train the given sizes, seeds and "
                        "learning-rate multipliers (no choice, no scoring): independent runs in parallel processes")
    parser.add_argument("--time-budget", type=float, help="run: stop between cached steps after this many "
                        "seconds (exit status 75: run again to resume)")
    args = parser.parse_args(argv)
    cfg = V3_CONFIGS[args.config]
    if args.action == "plan":
        for p in plan(cfg):
            print(json.dumps(p))
        return 0
    if args.action == "run":
        from .scale_v2 import _log

        overrides = {k: v for k, v in (("scales", tuple(args.sizes or ())), ("lr_multipliers",
                     tuple(args.lr_multipliers or ()))) if v}
        if args.max_steps:
            overrides["max_steps"] = args.max_steps
        if args.max_tokens:
            overrides["max_tokens"] = args.max_tokens
        run_cfg = dataclasses.replace(cfg, **overrides)
        out = args.out or Path("runs/scale") / cfg.name
        if args.publish_training:
            from . import scale_runs as steps
            from .ngram import heldout_nats

            first = out / f"{run_cfg.scales[0]}-seed0-lr{run_cfg.lr_multipliers[0]:g}"  # every lr: the same windows
            ngram = steps.cached_json(out / "ngram-train.json", f"{first.name}:{run_cfg.ngram_orders}", "baseline",
                                      lambda: heldout_nats(first / "data", run_cfg.base.vocab_size,
                                                           run_cfg.ngram_orders))
            publish_training(run_cfg, out, args.publish or out, ngram=ngram,
                             command=" ".join(["python -m experiments.scale_v3", *(argv or sys.argv[1:])]))
            return 0
        if args.train_only:
            return train_only(run_cfg, out, v3_data(run_cfg, out, _log), seeds=args.seeds,
                              time_budget=args.time_budget, log=_log)
        return run_all(run_cfg, out, v3_data(run_cfg, out, _log), seeds=args.seeds, time_budget=args.time_budget,
                       publish=args.publish,
                       command=" ".join(["python -m experiments.scale_v3", *(argv or sys.argv[1:])]))
    out = design(cfg, args.out or Path("runs/scale") / cfg.name)
    text = json.dumps(out, indent=1)
    print(text if not args.publish else f"{args.publish}: translated n = {out['translated']['n']}, hard stratum "
          f"n = {out['bm25_strata']['hard_n']} ({out['bm25_strata']['hard_reason']})")
    if args.publish:
        from influence.runtime.io import atomic_write_json

        atomic_write_json(args.publish, out)
    return 0 if math.isfinite(out["span_total_params"]) else 1


if __name__ == "__main__":
    sys.exit(main())
