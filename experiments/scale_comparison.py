"""How influence patterns change with model size (Grosse et al. 2023, §5), on the scale
ladder: train each scale on Shakespeare + Bible chapters (English and Spanish, separate
documents) + controlled insertions, fit EK-FAC on the MLP layers and on all the blocks'
linear layers, score every training sequence for every query, and measure sparsity,
surface vs thematic overlap, layer shares, word-order asymmetry, cross-lingual transfer
and insertion ranks, with bootstrap intervals over queries.

Every step is cached under --out (models, factors, scores), so a rerun resumes where the
last one stopped; the report (tables, PNG plots, HTML gallery, results.json) is rebuilt
from whatever runs are complete.

Configurations: ``tiny``, ``full`` and ``gpu`` run the v2 experiment
(:mod:`experiments.scale_v2`: semantic-source queries, fixed epochs, three seeds,
greedy completions, nested bootstrap endpoints); ``fast`` and ``full-v1`` the v1
experiment whose results are published in docs/experiments/scale/.

examples:
  python -m experiments.scale_comparison --config tiny                 # v2 end to end, a few minutes on CPU
  nice -n 10 python -m experiments.scale_comparison --config full      # v2 on CPU (not run yet)
  python -m experiments.scale_comparison --config gpu --time-budget 540  # repeat until exit status 0 (not 75)
  python -m experiments.scale_comparison --config full-v1 --report-only --publish docs/experiments/scale
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

from .analysis import Context, TrainingTable, query_records
from .gallery import write_gallery
from .mixture import Mixture, heldout_documents, pin_heldout, training_documents
from .plots import all_figures
from .query_set import DEFAULT_QUERIES, load_queries
from .summary import derived_fields
from .tables import report

LAYER_SETS = {"mlp": r"\.mlp\.", "blocks": r"blocks\."}  # blocks: attention + MLP, not the output head


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A named configuration: data, runs ``(scale, seed)`` in the order they are done,
    token budget per scale, and analysis settings."""

    name: str
    mixture: Mixture
    runs: tuple[tuple[str, int], ...]
    tokens: dict[str, int]
    vocab_size: int
    seq_len: int = 128
    batch_size: int = 32
    query_ids: tuple[str, ...] | None = None  # None: every query of the file
    gallery_ids: tuple[str, ...] = ()
    layer_sets: tuple[str, ...] = ("mlp", "blocks")
    top_k: int = 10
    n_boot: int = 2000
    powerlaw_boot: int = 100


FULL_V1 = ExperimentConfig(
    name="full-v1",
    mixture=Mixture(
        plays=("hamlet", "macbeth", "romeo-and-juliet", "a-midsummer-night-s-dream", "twelfth-night", "henry-v",
               "richard-iii", "julius-caesar", "the-tempest", "the-merchant-of-venice"),
        bible=("Genesis 1-11", "Ruth 1-4", "Psalms 1", "Psalms 23", "Psalms 100", "Psalms 121", "John 1-3"),
        heldout_plays=("othello", "king-lear"), heldout_scenes=3, heldout_bible=("Genesis 12-13", "John 4")),
    # Seed 0 at every scale and a second seed up to medium; large last (it alone takes ~40 min).
    runs=(("tiny", 0), ("mini", 0), ("small", 0), ("medium", 0), ("tiny", 1), ("mini", 1), ("small", 1), ("medium", 1),
          ("large", 0)),
    # ~8 passes over the 4,231 training sequences (1,049 steps of 32 x 128 tokens) at every
    # scale: the most this shared 2-core CPU affords for the five scales and four extra seeds
    # in about two hours. At 2.4M tokens (4.4 passes) no scale had memorised anything.
    tokens={"tiny": 4_300_000, "mini": 4_300_000, "small": 4_300_000, "medium": 4_300_000, "large": 4_300_000},
    vocab_size=2048,
    gallery_ids=("mem-hamlet", "para-horse", "style-king", "fact-order-duke", "canary-c", "xl-john3-16-en",
                 "xl-john3-16-es"),
)

FAST = ExperimentConfig(
    name="fast",
    mixture=Mixture(plays=("macbeth",), bible=("Genesis 1-2", "Psalms 23"), heldout_plays=("hamlet",),
                    heldout_scenes=1, heldout_bible=("Genesis 3",)),
    runs=(("tiny", 0), ("mini", 0)),
    tokens={"tiny": 60_000, "mini": 60_000},
    vocab_size=512,
    query_ids=("mem-tomorrow", "para-spot", "style-witch", "fact-once-bell", "fact-order-duke", "fact-order-river",
               "canary-a", "canary-e", "xl-gen1-1-en", "xl-gen1-1-es", "xl-gen1-3-en", "xl-gen1-3-es"),
    gallery_ids=("mem-tomorrow", "fact-order-duke", "xl-gen1-1-es"),
    top_k=5, n_boot=500, powerlaw_boot=20,
)

CONFIGS = {c.name: c for c in (FAST, FULL_V1)}


def _log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def train_config(cfg: ExperimentConfig, scale: str, seed: int, heldout_fraction: float):
    from influence.lm import TrainConfig

    return TrainConfig(scale=scale, tokens=cfg.tokens[scale], batch_size=cfg.batch_size, seed=seed,
                       vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, heldout_fraction=heldout_fraction,
                       split_by="doc", n_checkpoints=2)


def run_one(cfg: ExperimentConfig, out: Path, scale: str, seed: int, specs, train_docs, heldout, *,
            analyse: bool = True, train_missing: bool = True) -> dict | None:
    """Every step of one (scale, seed) run, cached; returns its results entry, or None
    when the run is not trained and ``train_missing`` is off."""
    from influence.lm import load_run

    from . import scale_runs as steps

    run_dir = out / f"{scale}-seed{seed}"
    info_path = run_dir / "run.json"
    finished = info_path.exists() and "summary" in json.loads(info_path.read_text())
    if not finished and not train_missing:
        return None
    _log(f"== {scale} seed {seed} ({run_dir})")
    # Every training document, insertions included, is trained on; the held-out split is
    # exactly the mixture's held-out plays and chapters.
    docs, fraction = pin_heldout(train_docs, heldout, seed)
    info = steps.train(run_dir, train_config(cfg, scale, seed, fraction), docs, _log)
    run = load_run(run_dir)
    ev = steps.evaluate(run_dir, run, specs, _log)
    entry = {"scale": scale, "seed": seed, "params": info["parameters"], "epochs": steps.epochs(info),
             "n_train": len(run.train), "train_summary": info["summary"], "eval": ev,
             "query_kinds": {s.id: s.kind for s in specs}, "variants": {}}
    ctx = Context.build(TrainingTable.from_dataset(run.train)) if analyse else None
    for layer_set in cfg.layer_sets:
        factors = steps.fit(run_dir, run, layer_set, LAYER_SETS[layer_set], seed, _log)
        scores = steps.score(run_dir, run, factors, layer_set, specs, _log)
        if analyse:
            entry["variants"][layer_set] = _records(cfg, run_dir, run, layer_set, scores, specs, ctx, seed)
    entry["timings"] = steps.timings(run_dir)
    entry["_ctx"] = ctx
    return entry


def _source_hash() -> str:
    h = hashlib.sha256()
    for module in ("analysis", "metrics", "powerlaw", "summary"):
        h.update((Path(__file__).parent / f"{module}.py").read_bytes())
    return h.hexdigest()


# Read when this module is imported, with the analysis modules it imports: the hash of the
# code this process runs, even if the files change while it works.
_ANALYSIS_SOURCE = _source_hash()


def _analysis_key(cfg: ExperimentConfig, scores) -> str:
    """Hash of what the records depend on: the scores' queries, the analysis settings and
    the source of the analysis modules (so a code change recomputes them)."""
    payload = [scores.metadata.get("queries_fingerprint"), cfg.top_k, cfg.powerlaw_boot, _ANALYSIS_SOURCE]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def _records(cfg: ExperimentConfig, run_dir: Path, run, layer_set: str, scores, specs, ctx, seed: int) -> list[dict]:
    """Per-query metric records of one run and layer set, cached in ``metrics-<layer set>.json``."""
    from . import scale_runs as steps

    def compute():
        t0 = time.perf_counter()
        records = query_records(specs, scores.values, scores.per_layer, ctx, n_blocks=run.config.n_layers,
                                k=cfg.top_k, powerlaw_boot=cfg.powerlaw_boot, seed=seed)
        derived_fields(records, len(run.train))
        _log(f"  metrics ({layer_set}) in {time.perf_counter() - t0:.0f} s")
        return records

    return steps.cached_json(run_dir / f"metrics-{layer_set}.json", _analysis_key(cfg, scores), "records", compute)


def _gallery_tops(entries, variant: str, per_cell: int = 3) -> dict:
    """``{(entry index, query id): [(score, where, text), ...]}``: each query's top
    sequences in each entry, for the gallery."""
    tops = {}
    for i, e in enumerate(entries):
        table = e["_ctx"].table
        for r in e["variants"].get(variant, []):
            tops[(i, r["id"])] = [
                (float(score), ", ".join(x for x in (table.title[row], table.genre[row], table.speakers[row]) if x),
                 table.text[row]) for row, score in zip(r["top_rows"][:per_cell], r["top_scores"])]
    return tops


def _machine() -> str:
    """``"x86_64, <CPU model>, <n> cores"`` of the machine running this."""
    model = platform.processor() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        model = names[0] if names else model
    return f"{platform.machine()}, {model}, {os.cpu_count()} cores"


def write_outputs(cfg: ExperimentConfig, out: Path, entries: list[dict], specs, command: str) -> dict[str, Path]:
    """results.json, tables.md, one PNG per metric family (``plots/``) and gallery.html in
    ``out``; columns and series ordered by seed, then parameters."""
    now = datetime.datetime.now(datetime.UTC)
    header = (f"# Scale experiment: tables ({cfg.name} configuration)\n\n"
              f"Produced by `{command}` on {now:%Y-%m-%d} ({_machine()}; jax {jax.__version__}; CPU shared with "
              f"other jobs). Each cell: the statistic over queries [95% bootstrap interval over queries, "
              f"{cfg.n_boot} resamples]; n = queries with that metric. Columns are runs: scale, seed "
              f"(non-embedding parameters). Query set: `experiments/queries/{DEFAULT_QUERIES.name}`.\n")
    entries = sorted(entries, key=lambda e: (e["seed"], e["params"]["non_embedding"]))
    runs = [{k: v for k, v in e.items() if k != "_ctx"} for e in entries]
    results = {"config": cfg.name, "command": command, "date": now.isoformat(timespec="seconds"),
               "machine": _machine(), "jax": jax.__version__, "settings": _settings(cfg), "runs": runs}
    paths = {"results": out / "results.json", "tables": out / "tables.md"}
    paths["results"].write_text(json.dumps(_rounded(results), indent=1, default=float))
    variants = [v for v in cfg.layer_sets if all(v in r["variants"] for r in runs)]
    paths["tables"].write_text(report(runs, variants, cfg.n_boot, header))
    for p in all_figures(runs, variants, out / "plots", cfg.n_boot):
        paths[p.name] = p
    first_seed = [i for i, r in enumerate(runs) if r["seed"] == runs[0]["seed"]]
    variant = variants[0] if variants else cfg.layer_sets[0]
    tops = _gallery_tops([entries[i] for i in first_seed], variant)
    paths["gallery"] = write_gallery(out / "gallery.html", [s for s in specs if s.id in cfg.gallery_ids],
                                     [runs[i] for i in first_seed], tops,
                                     title=f"Top influential sequences by scale (EK-FAC, {variant} layers)")
    return paths


def _rounded(value, digits: int = 5):
    """``value`` with every float rounded to ``digits`` significant digits (a smaller file;
    the metrics are not more precise than that)."""
    if isinstance(value, float) and np.isfinite(value) and value != 0:
        return round(value, digits - 1 - int(np.floor(np.log10(abs(value)))))
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def _settings(cfg: ExperimentConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["layer_patterns"] = {k: LAYER_SETS[k] for k in cfg.layer_sets}
    return d


def main(argv: list[str] | None = None) -> int:
    from .render import render_report
    from .scale_v2 import V2_CONFIGS, run_all

    parser = argparse.ArgumentParser(prog="python -m experiments.scale_comparison", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted({**CONFIGS, **V2_CONFIGS}), default="fast",
                        help="configuration (default: fast)")
    parser.add_argument("--time-budget", type=float,
                        help="v2: stop between cached steps after this many seconds (exit status 75: run again)")
    parser.add_argument("--out", type=Path, help="cache and output folder (default: runs/scale/<config>)")
    parser.add_argument("--runs", help="only these runs, e.g. 'tiny:0,mini:0' (default: the configuration's)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report on the runs already trained (fitting and scoring them if needed)")
    parser.add_argument("--publish", type=Path, help="also copy tables, plots, gallery and results.json here")
    args = parser.parse_args(argv)
    command = "python -m experiments.scale_comparison " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.config in V2_CONFIGS:
        v2 = V2_CONFIGS[args.config]
        if args.report_only:
            parser.error("--report-only is a v1 option; a v2 rerun reuses every cached step anyway")
        runs = None
        if args.runs:
            runs = tuple((s.split(":")[0], int(s.split(":")[1])) for s in args.runs.split(","))
        return run_all(v2, args.out or Path("runs/scale") / v2.name, runs=runs, time_budget=args.time_budget,
                       publish=args.publish, command=command, report=render_report)
    if args.time_budget is not None:
        parser.error("--time-budget applies to the v2 configurations (tiny, full, gpu)")
    cfg = CONFIGS[args.config]
    out = args.out or Path("runs/scale") / cfg.name
    runs = cfg.runs
    if args.runs:
        runs = tuple((s.split(":")[0], int(s.split(":")[1])) for s in args.runs.split(","))
        unknown = [s for s, _ in runs if s not in cfg.tokens]
        if unknown:
            parser.error(f"no token budget for scale(s) {unknown} in the {cfg.name} configuration")
    t0 = time.perf_counter()
    specs = load_queries(ids=cfg.query_ids)
    docs = training_documents(cfg.mixture)
    heldout = heldout_documents(cfg.mixture)
    _log(f"{cfg.name}: {len(specs)} queries, {len(docs)} training documents, {len(heldout)} held-out; runs {runs}")
    entries = []
    for scale, seed in runs:
        entry = run_one(cfg, out, scale, seed, specs, docs, heldout, train_missing=not args.report_only)
        if entry is not None:
            entries.append(entry)
    if not entries:
        _log("no finished runs to report on")
        return 1
    paths = write_outputs(cfg, out, entries, specs, command)
    if args.publish:
        args.publish.mkdir(parents=True, exist_ok=True)
        for p in paths.values():
            dest = args.publish / (p.relative_to(out) if p.is_relative_to(out) else p.name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
    _log(f"done in {time.perf_counter() - t0:.0f} s: {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
