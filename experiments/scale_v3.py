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

The runs themselves (``experiments/run_gpu_v3.sh`` for the accelerator ladder) are not
built in this version: ``run`` says so and exits with status 2.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.scale_v3", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("design", "plan", "run"))
    parser.add_argument("--config", choices=sorted(V3_CONFIGS), default="v3-tiny")
    parser.add_argument("--out", type=Path, help="work folder (default: runs/scale/<config>)")
    parser.add_argument("--publish", type=Path, help="design: also write the design JSON here")
    args = parser.parse_args(argv)
    cfg = V3_CONFIGS[args.config]
    if args.action == "plan":
        for p in plan(cfg):
            print(json.dumps(p))
        return 0
    if args.action == "run":
        print("scale_v3: the v3 runs are declared (design, plan) but not built yet; see docs/experiments/scale.md",
              file=sys.stderr)
        return 2
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
