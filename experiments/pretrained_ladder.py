"""Cross-scale on a real ladder: the scale comparison's query-side analyses on a list of
user-supplied pretrained checkpoints of one family (e.g. Pythia 14M → 410M) and one corpus
(e.g. a slice of their training data).

    python -m experiments.pretrained_ladder --models pythia-14m/ pythia-70m/ pythia-160m/ \\
        --data pile-slice.jsonl --queries queries.jsonl --out runs/ladder

Per checkpoint, each step reused when its output exists (the same steps as the scale
experiment's, :mod:`experiments.scale_runs`): open the workspace of the checkpoint and the
corpus (:func:`influence.lm.workspace.open_workspace`: the tokenized corpus, keyed by the
model's and data's fingerprints, under ``OUT/workspaces/``), fit EK-FAC on the MLP layers
(``--layers``), score every sequence for every query per layer, then

* sparsity, BM25 vs influence, layer thirds: :func:`experiments.analysis.query_records`
  (top-1% share, positive fraction, power-law tail; Spearman of influence with BM25 and the
  BM25 percentile / word-Jaccard of the top-k; the share of the top-k's influence in the
  lower / middle / upper third of the blocks; with a ``source_text``, the rank of the
  sequences holding it by influence and by BM25);
* token-wise statistics of each query's top sequences: :func:`experiments.tokenwise.attribute_top`.

A query line is ``{"id", "prompt", "completion"}`` with an optional ``"source_text"`` (an
exact passage of the corpus that the query comes from). Outputs: ``OUT/checkpoints/<name>.json``
(one checkpoint's per-query records and means, reused while its fingerprint — weights,
data, corpus settings, queries and analysis settings — is the same), ``OUT/results.json``
(every checkpoint, ordered by parameter count) and ``OUT/results.md`` (a table per metric
group, a row per checkpoint). Nothing is downloaded: the checkpoints must be on disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from influence.runtime import io

from .analysis import Context, TrainingTable, estimate, query_records
from .query_set import QuerySpec
from .tables import params_label

KIND = "pretrained"  # the QuerySpec kind of a user's query (no experiment-specific metadata)
LAYERS = {"mlp": r"\.mlp\.", "attn": r"\.attn\.", "blocks": r"blocks\."}
# (group, [(metric, label)]): the rows of results.md; each cell is a mean over queries.
GROUPS = (
    ("sparsity", [("top1_share", "top-1% share"), ("positive_fraction", "positive fraction"),
                  ("alpha", "power-law α")]),
    ("BM25 vs influence", [("bm25_spearman", "Spearman(influence, BM25)"), ("bm25_pct", "BM25 percentile of top-k"),
                           ("jaccard1_top", "word Jaccard top-k"), ("jaccard1_all", "word Jaccard all"),
                           ("source_rank", "source rank (influence)"), ("source_bm25_rank", "source rank (BM25)")]),
    ("layer thirds", [("layer_lower", "lower"), ("layer_middle", "middle"), ("layer_upper", "upper")]),
    ("token-wise", [("token_top10_share", "top-10% token share"),
                    ("token_lexical_enrichment", "lexical enrichment")]),
)
METRICS = [m for _, rows in GROUPS for m, _ in rows]


@dataclasses.dataclass(frozen=True)
class LadderConfig:
    """Settings of one ladder run (all but the paths enter each checkpoint's fingerprint)."""

    seq_len: int = 128
    text_column: str = "text"
    max_documents: int | None = None
    layers: str = "mlp"
    top_k: int = 10
    token_k: int = 3  # top sequences per query whose per-token terms are computed
    powerlaw_boot: int = 0
    seed: int = 0


def load_ladder_queries(path: str | Path) -> list[QuerySpec]:
    """The queries of a JSON-lines file: ``id``, ``prompt``, ``completion`` and optionally
    ``source_text`` per line. Raises ``ValueError`` naming the line for a missing field, an
    unknown one or a duplicate id."""
    specs, allowed = [], {"id", "prompt", "completion", "source_text"}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        rec = json.loads(line)
        missing = sorted({"id", "prompt", "completion"} - set(rec))
        unknown = sorted(set(rec) - allowed)
        if missing or unknown:
            raise ValueError(f"{path}:{n}: missing {missing} / unknown {unknown}; a line is "
                             '{"id", "prompt", "completion", optional "source_text"}')
        specs.append(QuerySpec(id=str(rec["id"]), kind=KIND, prompt=rec["prompt"], completion=rec["completion"],
                               source_text=rec.get("source_text")))
    ids = [s.id for s in specs]
    if len(set(ids)) != len(ids) or not ids:
        raise ValueError(f"{path}: no queries, or duplicate query ids")
    return specs


def training_table(train) -> TrainingTable:
    """The scale experiment's :class:`TrainingTable` of a corpus read by
    :mod:`influence.lm.reader` (no genres or speakers: those columns are empty)."""
    n = len(train)
    return TrainingTable(text=list(train["text"]), title=list(train["title"]), genre=[""] * n, speakers=[""] * n,
                         doc_id=list(train["doc_id"]), source=list(train["source"]), chunk=list(train["chunk"]))


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _clean(value):
    """JSON-safe and rounded (6 significant digits); NaN/inf become ``None``."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(f"{float(value):.6g}") if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def run_checkpoint(model_dir: Path, data: Path, specs: Sequence[QuerySpec], out: Path, cfg: LadderConfig,
                   log=print) -> dict:
    """Results of one checkpoint (see the module doc), read from
    ``out/checkpoints/<name>-<fp>.json`` when its fingerprint matches."""
    from influence.lm.run import load_run
    from influence.lm.workspace import open_workspace

    from . import scale_runs as steps
    from .tokenwise import attribute_top

    folder = open_workspace(model_dir, data, root=out / "workspaces", seq_len=cfg.seq_len,
                            text_column=cfg.text_column, max_documents=cfg.max_documents)
    info = json.loads((folder / "run.json").read_text())
    fp = _key(info["model"]["fingerprint"], info["data"]["fingerprint"], info["data"]["settings"],
              steps.queries_fingerprint(specs), dataclasses.asdict(cfg))
    path = out / "checkpoints" / f"{folder.name.split('__')[0]}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") == fp:
            log(f"{model_dir}: results cached in {path}")
            return stored
    log(f"{model_dir}: workspace {folder}")
    run = load_run(folder)
    t0 = time.perf_counter()
    # A regular expression is no folder name: its factors and scores go under its hash.
    layer_set = cfg.layers if cfg.layers in LAYERS else "re-" + _key(cfg.layers)[:8]
    factors = steps.fit(folder, run, layer_set, LAYERS.get(cfg.layers, cfg.layers), cfg.seed, log)
    scores = steps.score(folder, run, factors, layer_set, specs, log)
    values = np.asarray(scores.values, np.float64)
    ctx = Context.build(training_table(run.train))
    records = query_records(specs, values, scores.per_layer, ctx, n_blocks=run.config.n_layers, k=cfg.top_k,
                            powerlaw_boot=cfg.powerlaw_boot, seed=cfg.seed)
    tokens = {r["id"]: r for r in attribute_top(run, factors, specs, values, k=cfg.token_k)}
    for rec in records:
        rec.update({k: v for k, v in tokens[rec["id"]].items() if k != "id"})
        rec.pop("block_shares", None)  # one share per block: not comparable across depths
    means = {m: estimate(records, m, n_boot=0).value for m in METRICS}
    result = _clean({
        "name": model_dir.resolve().name, "path": str(model_dir.resolve()), "fingerprint": fp,
        "family": run.config.family, "parameters": int(run.config.n_params), "n_layers": run.config.n_layers,
        "d_model": run.config.d_model, "workspace": str(folder), "layer_set": layer_set, "sequences": len(run.train),
        "tracked_layers": list(factors.layer_names), "seconds": round(time.perf_counter() - t0, 1),
        "means": means, "queries": records})
    io.atomic_write_json(path, result)
    return result


def render(results: Sequence[dict], cfg: LadderConfig) -> str:
    """``results.md``: per metric group, a table with a row per checkpoint (in the given
    order) and a column per metric, each cell the mean over the queries that have it."""
    lines = [f"Checkpoints ordered by parameter count; each cell a mean over queries (top-k = {cfg.top_k}, "
             f"token-wise over each query's top {cfg.token_k}; layers: {cfg.layers}).", ""]
    for group, rows in GROUPS:
        lines += [f"### {group}", "", "| checkpoint | parameters | " + " | ".join(label for _, label in rows) + " |",
                  "|---|---|" + "---|" * len(rows)]
        for r in results:
            cells = [("–" if r["means"].get(m) is None else f"{r['means'][m]:.3g}") for m, _ in rows]
            lines.append(f"| {r['name']} | {params_label(r['parameters'])} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def run_ladder(models: Sequence[str | Path], data: str | Path, queries: str | Path, out: str | Path,
               cfg: LadderConfig = LadderConfig(), log=print) -> dict:
    """Every checkpoint's results (cached per checkpoint), then ``out/results.json`` and
    ``out/results.md`` with the checkpoints ordered by parameter count."""
    out, specs = Path(out), load_ladder_queries(queries)
    results = [run_checkpoint(Path(m), Path(data), specs, out, cfg, log) for m in models]
    families = sorted({r["family"] for r in results})
    if len(families) > 1:
        log(f"warning: the checkpoints are of several families {families}; a ladder compares one family")
    results.sort(key=lambda r: r["parameters"])
    summary = {"settings": dataclasses.asdict(cfg), "data": str(Path(data).resolve()),
               "queries": [s.id for s in specs], "families": families, "checkpoints": results}
    io.atomic_write_json(out / "results.json", summary)
    io.atomic_write_bytes(out / "results.md", render(results, cfg).encode())
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.pretrained_ladder", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="Hugging Face checkpoint folders of one family")
    p.add_argument("--data", required=True, help="corpus (datasets folder, JSONL, Parquet, CSV or text files)")
    p.add_argument("--queries", required=True, help="JSON lines: id, prompt, completion[, source_text]")
    p.add_argument("--out", required=True)
    defaults = LadderConfig()
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--text-column", default=defaults.text_column)
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--layers", default=defaults.layers, help="mlp (default), attn, blocks or a regular expression")
    p.add_argument("--top-k", type=int, default=defaults.top_k)
    p.add_argument("--token-k", type=int, default=defaults.token_k)
    p.add_argument("--powerlaw-boot", type=int, default=defaults.powerlaw_boot)
    p.add_argument("--seed", type=int, default=defaults.seed)
    a = p.parse_args(argv)
    cfg = LadderConfig(seq_len=a.seq_len, text_column=a.text_column, max_documents=a.max_documents, layers=a.layers,
                       top_k=a.top_k, token_k=a.token_k, powerlaw_boot=a.powerlaw_boot, seed=a.seed)
    run_ladder(a.models, a.data, a.queries, a.out, cfg, log=lambda m: print(m, file=sys.stderr))
    print(Path(a.out) / "results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
