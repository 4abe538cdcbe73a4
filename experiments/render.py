"""Prose and tables of the scale report generated from results files, never typed:
``render_report`` turns a v2 ``results.json`` into the v2 results section,
``render_v1_summary`` the published v1 results into the corrected v1 summary, and
``fill_doc`` writes generated blocks into ``docs/experiments/scale.md`` between markers

    <!-- generated:NAME (python -m experiments.render) -->
    ...
    <!-- /generated:NAME -->

so that a test (``tests/experiments/test_scale_doc.py``) can regenerate every block and
fail when the doc and the results disagree.

  python -m experiments.render                # rewrite the blocks of docs/experiments/scale.md and
                                              # docs/experiments/scale-v2/report.md
  python -m experiments.render --check        # exit 1 if either is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from influence.runtime.io import atomic_write_bytes

from . import metrics as M
from . import stats as S

DOC = Path(__file__).resolve().parents[1] / "docs" / "experiments" / "scale.md"
V1_RESULTS = DOC.parent / "scale" / "results.json"
V2_RESULTS = DOC.parent / "scale-v2" / "results.json"
V2_REPORT = DOC.parent / "scale-v2" / "report.md"
V2_RECOMPUTE = DOC.parent / "scale-v2" / "recompute.json"
V2_GPU_RESULTS = DOC.parent / "scale-v2-gpu" / "results.json"


def fmt(x, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits (``–`` for NaN/None); integers as is."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return f"{x:,}"
    return f"{float(x):.{digits}g}"


def fmt_ci(d: dict | None, digits: int = 3) -> str:
    if not d:
        return "–"
    ci = f" [{fmt(d['low'], digits)}, {fmt(d['high'], digits)}]" if d.get("low") is not None and np.isfinite(
        d["low"]) else ""
    return f"{fmt(d['value'], digits)}{ci}"


def params_label(n: int) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:  # a "|" inside a cell (e.g. "source | BM25") would split it
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *[line(r) for r in rows]])


# --------------------------------------------------------------------------- v2


SEMANTIC_MRR = ("WEB rendering: MRR of the KJV source by influence", "semantic_rr", ("semantic",))
SEMANTIC_PARTIAL = ("WEB rendering: partial rank corr. (influence, source | BM25)", "semantic_partial", ("semantic",))
CONTROL_MRR = ("KJV control: MRR by influence", "semantic_rr", ("semantic_control",))

SEMANTIC_ROWS = (
    SEMANTIC_MRR,
    ("WEB rendering: MRR by BM25", "semantic_bm25_rr", ("semantic",)),
    ("WEB rendering: influence MRR − BM25 MRR (paired)", "semantic_rr_minus_bm25", ("semantic",)),
    ("WEB rendering: recall@10 by influence", "semantic_recall10", ("semantic",)),
    ("WEB rendering: recall@10 by BM25", "semantic_bm25_recall10", ("semantic",)),
    SEMANTIC_PARTIAL,
    ("WEB rendering, verses BM25 misses (source not in its top 10): MRR by influence", "semantic_rr_bm25_miss",
     ("semantic",)),
    ("WEB rendering: MRR by influence through the lower third of the layers only", "semantic_rr_lower", ("semantic",)),
    ("… middle third only", "semantic_rr_middle", ("semantic",)),
    ("… upper third only", "semantic_rr_upper", ("semantic",)),
    ("WEB rendering: share of the top-k that are inserted documents", "insertion_top", ("semantic",)),
    ("corpus share of inserted documents (baseline)", "insertion_all", ("semantic",)),
    CONTROL_MRR,
    ("KJV control: MRR by BM25", "semantic_bm25_rr", ("semantic_control",)),
)

# Token-wise attribution of each query's top sequences (experiments/tokenwise.py).
TOKEN_ROWS = tuple(
    row for kind, label in (("semantic", "WEB rendering"), ("semantic_control", "KJV control"),
                            ("memorised", "memorised"), ("style", "style"))
    for row in ((f"{label}: share of |influence| on the top 10% of positions", "token_top10_share", (kind,)),
                (f"{label}: lexical enrichment (influence on the query's own tokens ÷ chance)",
                 "token_lexical_enrichment", (kind,))))

# Mid-training checkpoint against the final weights (scale_v2._mid_training).
CHECKPOINT_ROWS = (
    SEMANTIC_MRR,
    SEMANTIC_PARTIAL,
    CONTROL_MRR,
    ("WEB rendering: top-10 overlap with the final weights' top 10", "final_overlap", ("semantic",)),
    ("KJV control: top-10 overlap with the final weights' top 10", "final_overlap", ("semantic_control",)),
)


def _nested_row(label: str, metric: str, kinds, cells, n_boot: int) -> list[str]:
    mats, ids = [], None
    for c in cells:
        m, ids = S.metric_matrix(c["records"], metric, kinds, ids)
        mats.append(m)
    if not ids:
        return [label, "0", *["–"] * len(cells)]
    means = S.scale_means(mats, n_boot=n_boot)
    return [label, _n_with_data(mats), *[fmt_ci(i.as_dict()) for i in means]]


def _n_with_data(mats: Sequence[np.ndarray]) -> str:
    """Queries that have the metric (in some seed): one number, or the range over scales
    when it differs (e.g. the verses BM25 misses in one run but not another)."""
    counts = sorted({int(np.isfinite(m).any(axis=0).sum()) for m in mats})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def render_report(results: dict) -> str:
    """The v2 results section (markdown) from a v2 ``results.json``: provenance, the
    training regime of every run, each declared endpoint with its nested intervals,
    slopes and verdict, the semantic-source table and the estimator checks."""
    from .scale_v2 import endpoint_cells

    if results.get("version") != 2:
        raise ValueError("render_report needs a v2 results.json (\"version\": 2)")
    runs = results["runs"]
    settings = results["settings"]
    n_boot = int(settings["n_boot"])
    load = ", ".join(f"{x:.1f}" for x in results.get("loadavg", []))
    parts = [f"Configuration `{results['config']}`, produced by `{results['command']}` on {results['date'][:10]} "
             f"({results['machine']}; jax {results['jax']}; load average {load}). Queries: "
             + ", ".join(f"{k} {v}" for k, v in results["query_counts"].items())
             + f". Intervals: 95% paired bootstrap over queries nested within seeds ({n_boot} draws); "
               "a scale with one seed has no seed variation in its interval."]
    rows = []
    for r in sorted(runs, key=lambda r: (r["params"]["non_embedding"], r["seed"])):
        g = r["regime"]
        rows.append([r["scale"], str(r["seed"]), f"{r['params']['non_embedding']:,}", fmt(g["epochs"]),
                     fmt(g["tokens_per_parameter"]), fmt(g["train_loss"]), fmt(g["heldout_loss"]), fmt(g["gap"]),
                     str(r.get("n_greedy", 0))])
    parts += ["#### Runs and training regime\n",
              _table(["scale", "seed", "non-emb. params", "epochs", "tokens / param", "train loss",
                      "held-out loss", "gap (nats/token)", "greedy queries"], rows)]
    for layer_set, eps in results["endpoints"].items():
        rows = []
        for e in eps:
            if e.get("n_queries", 0) == 0:
                rows.append([e["endpoint"], role_of(e), "–", "no data", "–", "–", verdict_of(e), "no (no data)"])
                continue
            per = "; ".join(f"{s} {fmt_ci(p)}" for s, p in zip(e["scales"], e["per_scale"]))
            kinds = ", ".join(e["kinds"]) if e["kinds"] else "all kinds"
            ok, why = paper_verdict(e)
            what = f"`{e['metric']}` ({kinds}, {e['query_set']}; n = {e['n_queries']})"
            rows.append([e["endpoint"], role_of(e), what, per, fmt_ci(e.get("slope_log10_params")),
                         fmt_ci(e.get("slope_heldout_loss")), verdict_of(e), f"{'yes' if ok else 'no'} ({why})"])
        parts += [f"\n#### Endpoints — EK-FAC on {layer_set} layers\n",
                  _table(["finding", "role", "primary endpoint", "per-scale mean [95% CI]", "slope vs log10 params",
                          "slope vs held-out loss", "verdict", "reproduces the paper"], rows)]
        cells = endpoint_cells(runs, layer_set)
        sem = [_nested_row(label, m, k, cells, n_boot) for label, m, k in SEMANTIC_ROWS]
        parts += [f"\n#### Semantic source — {layer_set} layers\n",
                  _table(["statistic", "n", *[f"{c['scale']} ({params_label(c['params'])})" for c in cells]], sem)]
        token_rows = [row for row in (_nested_row(label, m, k, cells, n_boot) for label, m, k in TOKEN_ROWS)
                      if row[1] not in ("0", "0–0")]
        if token_rows:
            parts += [f"\n#### Token-wise attribution — {layer_set} layers\n",
                      f"Over each query's top {settings.get('token_k')} sequences; a position's term is mostly "
                      "the influence of predicting the next token there. Even spread puts 0.1 of |influence| on "
                      "the top 10% of positions; lexical enrichment 1 = no more influence on the positions that "
                      "predict one of the query's own tokens than their share of positions.\n",
                      _table(["statistic", "n", *[f"{c['scale']} ({params_label(c['params'])})" for c in cells]],
                             token_rows)]
    parts += _checkpoint_section(runs, n_boot)
    val = [(r["scale"], r["seed"], r["validation"]) for r in runs if r.get("validation")]
    if val:
        rows = []
        for scale, seed, v in val:
            tp = v.get("tail_patch") or {}
            sweep = "; ".join(f"r={d['r']:g}: MRR {fmt(d['semantic_mrr'])}, control {fmt(d['control_mrr'])}, "
                              f"top-1% {fmt(d['top1_share'])}" for d in v.get("damping_sweep", []))
            rows.append([f"{scale} s{seed}", fmt(tp.get("mean_delta_top_minus_random")),
                         fmt(tp.get("share_top_better")), sweep or "–"])
        parts += ["\n#### Estimator checks\n",
                  "Tail-patch: one SGD step on a query's top-k sequences vs on k random ones; the change in its "
                  "completion loss (top − random, nats; negative = the top-k help more). Damping sweep: "
                  "λ = r × mean EK-FAC eigenvalue.\n",
                  _table(["run", "tail-patch Δloss top − random", "share of queries top better", "damping sweep"],
                         rows)]
    return "\n".join(parts) + "\n"


def _checkpoint_section(runs: Sequence[dict], n_boot: int) -> list[str]:
    """Semantic statistics at the mid-training checkpoint next to the final weights, for
    the sizes that have it (nested intervals over queries within seeds)."""
    with_ckpt = sorted({r["scale"] for r in runs if r.get("checkpoint")},
                       key=lambda s: next(r["params"]["non_embedding"] for r in runs if r["scale"] == s))
    if not with_ckpt:
        return []
    header, rows = ["statistic", "n"], []
    columns = []
    for scale in with_ckpt:
        seeds = sorted((r for r in runs if r["scale"] == scale and r.get("checkpoint")), key=lambda r: r["seed"])
        c = seeds[0]["checkpoint"]
        final = [[x for x in r["variants"][next(iter(r["variants"]))] if not x.get("completion_of")] for r in seeds]
        columns.append((f"{scale} step {c['step']}", [r["checkpoint"]["records"] for r in seeds]))
        columns.append((f"{scale} step {c['final_step']} (final)", final))
    header += [name for name, _ in columns]
    for label, metric, kinds in CHECKPOINT_ROWS:
        cells, n = [], "0"
        for _, recs in columns:
            m, ids = S.metric_matrix(recs, metric, kinds)
            if not ids or np.isnan(m).all():
                cells.append("–")
                continue
            n = _n_with_data([m])
            cells.append(fmt_ci(S.scale_means([m], n_boot=n_boot)[0].as_dict()))
        rows.append([label, n, *cells])
    return ["\n#### Influence over training: mid-training checkpoint vs final weights\n",
            "EK-FAC refitted at the checkpoint (same data, Fisher key and damping rule); the semantic and "
            "control queries scored there. Top-10 overlap is with the same query's top 10 at the final "
            "weights.\n", _table(header, rows)]


# --------------------------------------------------------------------------- v1, corrected


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def render_v1_summary(results: dict) -> str:
    """What the v1 results support, recomputed from the v1 ``results.json`` (the statements
    the v1 prose got wrong, issue 16, generated here instead)."""
    from .analysis import estimate

    runs = sorted(results["runs"], key=lambda r: (r["seed"], r["params"]["non_embedding"]))
    n_boot = int(results["settings"]["n_boot"])
    label = {id(r): f"{r['scale']} s{r['seed']}" for r in runs}
    mlp = {id(r): r["variants"]["mlp"] for r in runs}
    lines = []
    # Sparsity: which adjacent sizes have disjoint intervals, per seed.
    for seed in sorted({r["seed"] for r in runs}):
        rs = [r for r in runs if r["seed"] == seed]
        est = [estimate(mlp[id(r)], "top1_share", n_boot=n_boot) for r in rs]
        pairs = []
        for (ra, ea), (rb, eb) in zip(zip(rs, est), zip(rs[1:], est[1:])):
            rel = "overlap" if _overlap((ea.low, ea.high), (eb.low, eb.high)) else "are disjoint"
            pairs.append(f"{ra['scale']} [{fmt(ea.low)}, {fmt(ea.high)}] and {rb['scale']} "
                         f"[{fmt(eb.low)}, {fmt(eb.high)}] {rel}")
        lines.append(f"- Top-1% share, seed {seed} (MLP layers): " + "; ".join(pairs) + ".")
    # Cross-lingual: transfer percentile vs its control, per run.
    disjoint, margins = [], []
    for r in runs:
        a = estimate(mlp[id(r)], "transfer_pct", ("crosslingual",), n_boot=n_boot)
        b = estimate(mlp[id(r)], "transfer_pct_control", ("crosslingual",), n_boot=n_boot)
        margins.append(a.value - b.value)
        if not _overlap((a.low, a.high), (b.low, b.high)):
            disjoint.append(label[id(r)])
    back = [estimate(mlp[id(r)], "transfer_back_pct", ("crosslingual",), n_boot=10).value for r in runs]
    lines.append(f"- Reverse direction (top Spanish sequences on the English query), percentile: "
                 f"{fmt(min(back), 2)}–{fmt(max(back), 2)} over the {len(runs)} runs.")
    lines.append(f"- Cross-lingual transfer percentile minus its control: {fmt(min(margins))} to {fmt(max(margins))} "
                 f"over the {len(runs)} runs; intervals disjoint from the control's at "
                 f"{', '.join(disjoint) if disjoint else 'no run'}.")
    # Surface overlap: BM25 percentile of the top-10 (style queries) and bigram-Jaccard ratios.
    pct = [estimate(mlp[id(r)], "bm25_pct", ("style",), n_boot=n_boot).value for r in runs if r["seed"] == 0]
    ratios = []
    for r in runs:
        for kind in ("memorised", "style"):
            top = estimate(mlp[id(r)], "jaccard2_top", (kind,), n_boot=10).value
            base = estimate(mlp[id(r)], "jaccard2_all", (kind,), n_boot=10).value
            ratios.append(top / base)
    lines.append(f"- BM25 percentile of the style queries' top-10, seed 0: {fmt(min(pct), 2)}–{fmt(max(pct), 2)}; "
                 f"word-bigram Jaccard of the top-10 over the corpus mean (memorised and style, all runs): "
                 f"{fmt(min(ratios))}–{fmt(max(ratios))}×.")
    # Layer profile: the bounds per seed, with even shares per depth.
    from influence.lm import LADDER

    for seed in sorted({r["seed"] for r in runs}):
        lo, hi = [], []
        for r in runs:
            n = LADDER[r["scale"]].n_layers
            recs = mlp[id(r)]
            if r["seed"] != seed or n < 3:
                continue
            shares = np.array([x["block_shares"] for x in recs], np.float64).mean(axis=0) * n
            lo.append(shares.min())
            hi.append(shares.max())
        if lo:
            lines.append(f"- Mean block share ÷ even share (≥ 3 blocks), seed {seed}: {fmt(min(lo), 2)} to "
                         f"{fmt(max(hi), 2)}.")
    # Canary completion loss per token, every run.
    losses = []
    for r in runs:
        ids = [q for q, k in r["query_kinds"].items() if k == "canary"]
        tok = sum(r["eval"]["query_tokens"][q] for q in ids)
        losses.append(sum(r["eval"]["query_loss"][q] for q in ids) / tok)
    lines.append(f"- Canary completion loss over all {len(runs)} runs: {fmt(min(losses), 2)}–{fmt(max(losses), 2)} "
                 f"nats/token.")
    # v1's records lack each query's mean score (the background): say so rather than guess it.
    lines.append("- Word order: v1's records hold the forward and reversed scores but not the background, so the "
                 "background-subtracted ratio (v2) is not recomputed from them here; the raw ratio's fall with "
                 "size is not separable from the sparsity trend.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the doc


_BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+) \(python -m experiments\.render\) -->\n)(?P<body>.*?)"
                    r"(<!-- /generated:(?P=name) -->)", re.S)


def fill_doc(text: str, blocks: dict[str, str]) -> str:
    """``text`` with every marked block's body replaced by ``blocks[name]``.

    Raises:
      ValueError: a block in the doc has no generator, or a generator no block.
    """
    names = [m["name"] for m in _BLOCK.finditer(text)]
    unknown, missing = sorted(set(names) - set(blocks)), sorted(set(blocks) - set(names))
    if unknown or missing:
        raise ValueError(f"generated blocks: no generator for {unknown}; no block in the doc for {missing}")
    return _BLOCK.sub(lambda m: m.group(1) + blocks[m["name"]] + m.group(4), text)


def v2_status(path: Path = V2_RESULTS, what: str = "the `full` ladder (CPU)") -> str:
    """A v2 results block: the rendered report of ``path``, or the plain statement that
    ``what`` has not been run (no results file)."""
    if not path.exists():
        shown = path.relative_to(DOC.parents[2]) if path.is_relative_to(DOC.parents[2]) else path
        return (f"**Not run yet:** {what} has not been run, so no v2 number exists for it. Only the `tiny` "
                "configuration has run, as a test of the pipeline (`tests/experiments/test_scale_v2_pipeline.py`); "
                f"its numbers are not results. When `{shown}` exists, this block is its rendered report.\n")
    return render_report(json.loads(path.read_text()))


def role_of(e: dict) -> str:
    """An evaluated endpoint's role (:data:`experiments.stats.ROLES`): stored in results
    written since issue 26, else that of the declared endpoint of the same name."""
    if e.get("role"):
        return e["role"]
    return next((ep.role for ep in S.ENDPOINTS if ep.name == e["endpoint"]), "descriptive")


def verdict_of(e: dict) -> str:
    """An evaluated endpoint's verdict, with the pre-issue-26 wording of every-scale tests
    ("reproduces at every scale", which named controls reproductions) replaced."""
    return S.LEGACY_VERDICTS.get(e["verdict"], e["verdict"])


def paper_verdict(e: dict) -> tuple[bool, str]:
    """Whether an evaluated endpoint may be reported as reproducing the paper, and why not.

    Only a ``paper claim`` can; its test must pass (slope of the right sign with an interval
    excluding 0, or every scale's interval on the right side), on at least
    :data:`experiments.stats.MIN_N_CLAIM` queries; and an endpoint measured against BM25
    (``*_minus_bm25``) must also have influence *beat* BM25 at the largest size (interval
    above 0), so that influence catching up with a lexical matcher does not pass (issue 26).
    """
    role = role_of(e)
    if role != "paper claim":
        return False, f"{'descriptive' if role == 'descriptive' else 'a ' + role}, not a test of the paper"
    if e.get("n_queries", 0) < S.MIN_N_CLAIM:
        return False, f"n = {e.get('n_queries', 0)} < {S.MIN_N_CLAIM} queries"
    passed = (verdict_of(e) == "passes at every scale" if e["test"] == "every_scale"
              else bool(e.get("reproduces")))
    if not passed:
        return False, "its test does not pass"
    if e["metric"].endswith("_minus_bm25"):
        last = e["per_scale"][-1]
        if not last["low"] > 0:
            return False, f"influence does not beat BM25 at the largest size, {e['scales'][-1]}: {fmt_ci(last)}"
    return True, "its test passes"


def _semantic_headline(results: dict, layer_set: str) -> list[str]:
    """Influence against BM25 against chance on the semantic queries, in numbers."""
    from .scale_v2 import endpoint_cells

    e = next((x for x in results["endpoints"][layer_set] if x["metric"] == "semantic_rr_minus_bm25"
              and x.get("query_set", "fixed") == "fixed"), None)
    if e is None or e.get("n_queries", 0) == 0:
        return []
    cells = endpoint_cells(results["runs"], layer_set)
    n_boot = int(results["settings"]["n_boot"])
    first = [r for r in cells[0]["records"][0] if r["kind"] == "semantic" and r.get("semantic_rows")]
    n_train = int(results["runs"][0]["n_train"])
    chance = float(np.mean([M.chance_mrr(n_train, len(r["semantic_rows"])) for r in first]))
    bm25_first = sum(r["semantic_bm25_rank"] == 1 for r in first)
    # The same nested bootstrap over every scale as the semantic-source table, so the numbers agree.
    infl, bm25 = ([S.metric_matrix(c["records"], metric, ("semantic",))[0] for c in cells]
                  for metric in ("semantic_rr", "semantic_bm25_rr"))
    infl = S.scale_means(infl, n_boot=n_boot)
    bm25 = S.scale_means(bm25, n_boot=n_boot)[-1]
    ok, why = paper_verdict(e)
    diff = [fmt_ci(p) for p in e["per_scale"]]
    return [f"**Headline — influence against BM25 against chance** (paper claim `{e['endpoint']}`, "
            f"n = {e['n_queries']} WEB renderings of trained KJV verses): MRR of the KJV source by influence "
            f"{cells[0]['scale']} {fmt_ci(infl[0].as_dict())} → {cells[-1]['scale']} {fmt_ci(infl[-1].as_dict())}; "
            f"by BM25 {fmt_ci(bm25.as_dict())} at every size (BM25 ranks the source first for {bm25_first} of "
            f"{len(first)}); by chance {fmt(chance)}. Influence − BM25: {cells[0]['scale']} {diff[0]} → "
            f"{cells[-1]['scale']} {diff[-1]}. **{e['endpoint']} reproduces the paper at these sizes: "
            f"{'yes' if ok else 'no'}** ({why}).\n"]


def _order_kept(results: dict, layer_set: str) -> str:
    """How much of the forward statement's background-subtracted effect the reversed one
    keeps, per scale: mean reversed excess ÷ mean forward excess over queries and seeds."""
    from .scale_v2 import endpoint_cells

    out = []
    for c in endpoint_cells(results["runs"], layer_set):
        recs = [r for seed in c["records"] for r in seed if r["kind"] == "fact_order" and "forward_excess" in r]
        if recs:
            kept = np.mean([r["reversed_excess"] for r in recs]) / np.mean([r["forward_excess"] for r in recs])
            out.append(f"{c['scale']} {100 * kept:.0f}%")
    return "; ".join(out)


def endpoint_line(e: dict, results: dict, layer_set: str) -> str:
    """One headline line: role, effect with its interval, the test's verdict, and what it
    means for the paper (only a paper claim can reproduce it; see :func:`paper_verdict`)."""
    role = role_of(e)
    if e.get("n_queries", 0) == 0:
        return f"- **{e['endpoint']}** ({role}): no data."
    if e["test"] == "every_scale":
        effect = "per-scale means " + "; ".join(f"{sc} {fmt_ci(p)}" for sc, p in zip(e["scales"], e["per_scale"]))
        passed = verdict_of(e) == "passes at every scale"
        verdict = f"every scale's interval {'above' if passed else 'not all above'} {fmt(e.get('threshold', 0.0))}"
    else:
        effect = f"slope {fmt_ci(e.get('slope_log10_params'))} per decade of parameters"
        passed = bool(e.get("reproduces"))
        verdict = e["verdict"]
    head = f"- **{e['endpoint']}** ({role}; `{e['metric']}`, n = {e['n_queries']} queries): {effect}; {verdict}"
    if role == "paper claim":
        ok, why = paper_verdict(e)
        return f"{head}; reproduces the paper at these sizes: **{'yes' if ok else 'no'}** ({why})."
    if role == "descriptive":
        return f"{head}; descriptive: no claim of the paper is tested by this endpoint."
    tail = f"{role} passes: **{'yes' if passed else 'no'}** (not a reproduction of the paper)"
    if e["metric"] == "order_asymmetry":
        tail += (f"; the reversed statement keeps {_order_kept(results, layer_set)} of the forward statement's "
                 "effect, so the order effect is partial")
    return f"{head}; {tail}."


def headline(path: Path = V2_RESULTS) -> str:
    """The v2 headline: influence vs BM25 vs chance on the semantic queries in numbers,
    then one line per declared endpoint with its role, effect (slope per decade of
    parameters, or the per-scale means for an every-scale test) and nested interval, its
    test's verdict, and -- for paper claims only -- whether it reproduces the paper."""
    if not path.exists():
        return "No v2 result yet (see [v2 results](#v2-results)).\n"
    results = json.loads(path.read_text())
    runs = results["runs"]
    seeds = {}
    for r in runs:
        seeds.setdefault(r["scale"], []).append(r["seed"])
    sizes = "; ".join(f"{s} ({params_label(next(r['params']['non_embedding'] for r in runs if r['scale'] == s))}"
                      f" non-embedding parameters, seeds {', '.join(map(str, sorted(k)))})" for s, k in seeds.items())
    layer_set = next(iter(results["endpoints"]))
    lines = [f"`--config {results['config']}`, {results['date'][:10]}: {sizes}. EK-FAC on {layer_set} layers; "
             "95% intervals from the paired bootstrap over queries nested within seeds.\n"]
    lines += _semantic_headline(results, layer_set)
    lines += [endpoint_line(e, results, layer_set) for e in results["endpoints"][layer_set]]
    lines += _secondary_lines(results, layer_set)
    return "\n".join(lines) + "\n"


def _secondary_lines(results: dict, layer_set: str) -> list[str]:
    """The token-wise statistics of the semantic queries as a secondary reading of the
    headline question (no declared endpoint): smallest against largest scale."""
    from .scale_v2 import endpoint_cells

    cells = endpoint_cells(results["runs"], layer_set)
    n_boot = int(results["settings"]["n_boot"])
    out = []
    for metric, what in (("token_lexical_enrichment", "lexical enrichment of the top sequences' influence"),
                         ("token_top10_share", "share of |influence| on the top 10% of positions")):
        mats = [S.metric_matrix(c["records"], metric, ("semantic",))[0] for c in cells]
        if len(cells) < 2 or not all(np.isfinite(m).any() for m in mats):
            continue
        lo, hi = (S.scale_means([mats[0], mats[-1]], n_boot=n_boot)[i] for i in (0, 1))
        trend = ("higher at the largest size" if lo.high < hi.low else "lower at the largest size"
                 if hi.high < lo.low else "not resolved between the smallest and largest size")
        out.append(f"- Secondary (no declared endpoint), WEB renderings: {what}, {cells[0]['scale']} "
                   f"{fmt_ci(lo.as_dict())} → {cells[-1]['scale']} {fmt_ci(hi.as_dict())}: {trend} (intervals "
                   f"{'disjoint' if lo.high < hi.low or hi.high < lo.low else 'overlap'}).")
    return out


def endpoints_table() -> str:
    """The declared endpoints (:data:`experiments.stats.ENDPOINTS`) as a table."""
    rows = []
    for ep in S.ENDPOINTS:
        test = ("slope of the per-scale mean vs log10(non-embedding params), 95% interval excludes 0"
                if ep.test == "slope" else f"every scale's 95% interval above {ep.threshold:g}")
        kinds = ", ".join(ep.kinds) if ep.kinds else "all kinds"
        rows.append([ep.name, ep.role, f"`{ep.metric}`", f"{kinds} ({ep.query_set} completions)", test, ep.claim])
    return _table(["finding", "role", "metric (per query)", "queries", "test", "what it would show"], rows) + "\n"


def configs_table() -> str:
    """The v2 configurations (:data:`experiments.scale_v2.V2_CONFIGS`) as a table."""
    from influence.lm import LADDER

    from .scale_v2 import V2_CONFIGS

    rows = []
    for c in V2_CONFIGS.values():
        scales = ", ".join(f"{s} ({LADDER[s].d_model}×{LADDER[s].n_layers})" for s in c.scales)
        n = c.counts
        rows.append([f"`{c.name}`", scales, ", ".join(map(str, c.seeds)), f"{c.epochs:g}",
                     f"semantic {n.semantic}, KJV control {n.semantic_control}, memorised {n.memorised}, "
                     f"style {n.style}, crosslingual {n.crosslingual} pairs, facts {c.insertions[0]} + "
                     f"{c.insertions[1]}, canaries {c.insertions[2]} (copies {'/'.join(map(str, c.canary_copies))})",
                     ", ".join(c.layer_sets), ", ".join(c.validate_scales) or "–",
                     ", ".join(c.checkpoint_scales) or "–"])
    return _table(["config", "scales (d_model × layers)", "seeds", "epochs", "queries", "EK-FAC layers",
                   "estimator checks at", "mid-training influence at"], rows) + "\n"


def archive_block(folder: Path = V2_RESULTS.parent) -> str:
    """What the v2 archive can and cannot reproduce: the repairs sidecar and the last
    ``python -m experiments.render --recompute`` (``recompute.json``)."""
    from .archive import REPAIRS
    from .recompute import summary_line

    rec_path = folder / V2_RECOMPUTE.name
    if not rec_path.exists():
        return "Not recomputed yet: run `python -m experiments.render --recompute`.\n"
    repairs = json.loads((folder / REPAIRS).read_text()) if (folder / REPAIRS).exists() else None
    lost = [(k, len(v)) for k, v in (repairs or {}).get("lost", {}).items()]
    return summary_line(json.loads(rec_path.read_text()), repairs, lost)


def figures_block(folder: Path = V2_RESULTS.parent) -> str:
    """The v2 figures (``python -m experiments.figures_v2``) and, in numbers, the held-out
    loss of each size beside the n-gram baselines (``python -m experiments.ngram``)."""
    from .figures_v2 import FIGURES

    results = json.loads((folder / "results.json").read_text())
    rel = folder.relative_to(DOC.parent) if folder.is_relative_to(DOC.parent) else folder
    lines = []
    ngram_path = folder / "ngram.json"
    if ngram_path.exists():
        from .ngram import NAMES

        ng = json.loads(ngram_path.read_text())
        by = {}
        for r in results["runs"]:
            by.setdefault(r["scale"], []).append(r["regime"]["heldout_loss"])
        means = {s: float(np.mean(v)) for s, v in by.items()}
        base = ", ".join(f"{NAMES.get(n, n)} {fmt(v)}" for n, v in sorted(ng["heldout_nats"].items()))
        best_n, best = min(ng["heldout_nats"].items(), key=lambda kv: kv[1])
        beat = [s for s, v in means.items() if v < best]
        lines.append("Held-out loss (nats/token, mean over seeds): "
                     + "; ".join(f"{s} {fmt(v)}" for s, v in means.items())
                     + f". Kneser-Ney baselines on the same token windows (seed {ng['seed']}'s split, "
                     f"`python -m experiments.ngram`): {base}. "
                     + (f"Sizes below the best n-gram ({NAMES.get(best_n, best_n)}): {', '.join(beat)}."
                        if beat else f"**No size beats the {NAMES.get(best_n, best_n)} baseline** "
                        f"({fmt(best)}): the models of this ladder have barely learned more than local "
                        "token statistics."))
    lines += [f"![{name}]({rel}/figures/{name})" for name in FIGURES if (folder / "figures" / name).exists()]
    return "\n\n".join(lines) + "\n"


V3_DESIGN = DOC.parent / "scale-v3" / "design.json"


def v3_block(path: Path = V3_DESIGN) -> str:
    """The v3 design as published by ``python -m experiments.scale_v3 design`` (before any
    run), and the plain statement that v3 has not run."""
    if not path.exists():
        return "**v3 is not designed yet** (no `docs/experiments/scale-v3/design.json`).\n"
    d = json.loads(path.read_text())
    t, b = d["translated"], d["bm25_strata"]
    summ = "; ".join(f"{k} {v['n']}" for k, v in b["summary"].items())
    ladder = "; ".join(f"{x['scale']} {params_label(x['params']['total'])} total, seeds {len(x['seeds'])}, "
                       f"lr {'/'.join(fmt(v, 2) for v in x['learning_rates'])}, "
                       f"{fmt(x['budget']['epochs'], 2)} epochs ({x['budget']['rule']})" for x in d["ladder"])
    # A run publishes results.json (and report.md) beside the design or in scale-v3-gpu/.
    ran = [p for p in (path.parent / "results.json", path.parent.parent / "scale-v3-gpu" / "results.json")
           if p.exists()]
    partial = any(json.loads(p.read_text()).get("partial") for p in ran)
    status = (f"**{'Partial run' if partial else 'Run'}:** results in "
              f"{', '.join(f'`{p.parent.name}/results.json`' for p in ran)} (see the report.md beside each and "
              "[v3 results](#v3-results-partial-cpu-run))" if ran else
              "**Not run yet:** no v3 model has been trained (neither `python -m experiments.scale_v3 run` nor "
              "`experiments/run_gpu_v3.sh` has been run)")
    return (f"{status}; `docs/experiments/scale-v3/design.json` (config "
            f"`{d['config']}`, {d['date'][:10]}) fixes the design from the data and BM25 alone.\n\n"
            f"- Translated-only sources: the KJV text of {', '.join(d['data']['kjv_removed'])} "
            f"is removed from training, the Spanish kept; n = {t['n']} WEB queries (floor {t['n_min']}: "
            f"{'met' if t['meets_n_min'] else 'NOT met'}), {t['masked_twins_changed']} of whose names-masked twins "
            f"differ. Before training, BM25's MRR of the Spanish source is {fmt(t['bm25_mrr'])} "
            f"({fmt(t['bm25_mrr_masked'])} with names masked; first for {t['bm25_first']} of {t['n']}); chance "
            f"{fmt(t['chance_mrr'])}.\n"
            f"- BM25 strata of the {b['candidates']} usable WEB renderings of trained KJV verses (source rank over "
            f"the training windows): {summ}. Hard stratum declared: {' + '.join(b['hard'])} (n = {b['hard_n']}); "
            f"{b['hard_reason']}.\n"
            f"- Ladder ({d['span_total_params']:g}× in total parameters): {ladder}.\n"
            f"- Robustness: λ × {', '.join(f'{m:g}' for m in d['robustness']['damping_multipliers'])}; curvatures "
            f"{', '.join(d['robustness']['curvatures'])}; estimator checks at "
            f"{', '.join(d['robustness']['validate_scales'])}. Verdict rule: {d['verdict_rule']}.\n")


V3_RESULTS = V3_DESIGN.parent / "results.json"
V3_SCORED = V3_DESIGN.parent / "scored" / "results.json"  # the scored part of a partial run, if any
V3_HEADLINE = ("translated", "translated_masked", "bm25_hard")


def _seeds(xs: Sequence[int]) -> str:
    xs = list(xs)
    return f"seeds {xs[0]}–{xs[-1]}" if len(xs) > 2 and xs == list(range(xs[0], xs[-1] + 1)) else \
        ("seed " if len(xs) == 1 else "seeds ") + ", ".join(map(str, xs))


def v3_results_block(path: Path = V3_RESULTS) -> str:
    """The v3 run's results (``python -m experiments.scale_v3 run --publish``), written from
    ``results.json`` only: what ran and what did not, the learning-rate sweeps and held-out
    loss beside the Kneser-Ney baselines, each headline endpoint per size with influence,
    BM25 and chance, the damping and identity variants, and each verdict by the declared
    rule (a partial ladder cannot pass it)."""
    if not path.exists():
        return ("**Not run yet:** no v3 results are published (`docs/experiments/scale-v3/results.json` is "
                "absent).\n")
    r = json.loads(path.read_text())
    if not r.get("scored", True):
        return _v3_training_block(r)
    sizes, k = r["sizes"], r["recall_k"]
    ran = "; ".join(f"{s['scale']} ({params_label(s['total_params'])} parameters, {_seeds(s['seeds'])})"
                    for s in sizes)
    missing = "; ".join(f"{s} ({'all seeds' if v == r['declared']['seeds'][s] else _seeds(v)})"
                        for s, v in r["not_run"].items())
    out = [f"**{'Partial run' if r['partial'] else 'Run'}** of config `{r['config']}` on CPU "
           f"({r['machine']}, {r['date'][:16].replace('T', ' ')} UTC, load {', '.join(map(str, r['loadavg']))} at the "
           f"end, shared with other jobs; jax {r['jax']}). Ran: {ran}. "
           + (f"**Not run** (time): {missing}." if missing else "Every declared size and seed ran.")]
    rows = []
    for s in sizes:
        sweep = ", ".join(f"×{fmt(x['lr_multiplier'], 2)} → {fmt(x['heldout_loss'], 4)}" for x in s["sweep"])
        b = s["budget"]
        rows.append([s["scale"], params_label(s["total_params"]), sweep, f"×{fmt(s['chosen_lr_multiplier'], 2)}",
                     f"{fmt(b['tokens_trained'])} ({fmt(s['epochs'], 3)} epochs; {b['rule']})",
                     ", ".join(fmt(x, 4) for x in s["heldout_loss"])])
    out.append(_table(["size", "total params", "lr sweep at seed 0 (multiplier → held-out loss)", "chosen",
                       "tokens trained (rule)", "held-out loss per seed"], rows))
    ng = r["ngram"]["heldout_nats"]
    best_n, best = min(ng.items(), key=lambda kv: kv[1])
    means = [(s["scale"], float(np.mean(s["heldout_loss"]))) for s in sizes]
    beat = [s for s, v in means if v < best]
    out.append("Held-out loss (nats per token, mean over seeds): " + "; ".join(f"{s} {fmt(v, 4)}" for s, v in means)
               + (f". It {'falls' if r['heldout_falls_with_size'] else '**does not fall**'} with size over the sizes "
                  "run" if len(means) > 1 else ". One size ran: no trend with size")
               + ". Kneser-Ney baselines on the same windows: "
               + ", ".join(f"{n}-gram {fmt(v, 4)}" for n, v in sorted(ng.items()))
               + (f"; every size run beats the best ({best_n}-gram)." if len(beat) == len(means) else
                  f"; sizes below the best ({best_n}-gram): {', '.join(beat) or 'none'}."))
    eps = {e["name"]: e for e in r["endpoints"]["ekfac-x1"]}
    rows = []
    for name in (*V3_HEADLINE, "bm25_first"):
        e = eps[name]
        for c in e["per_scale"]:
            rows.append([name, e["role"], str(e["n_queries"]), c["scale"], fmt_ci(c["influence_mrr"]),
                         fmt_ci(c["bm25_mrr"]), fmt(c["chance_mrr"]["value"]), fmt_ci(c["influence_minus_bm25"]),
                         f"{fmt(c[f'influence_recall{k}']['value'])} / {fmt(c[f'bm25_recall{k}']['value'])} / "
                         f"{fmt(c[f'chance_recall{k}']['value'])}"])
    out.append("Headline endpoints, EK-FAC at the default damping λ (mean reciprocal rank of the source; 95% "
               "intervals over queries nested within seeds):")
    out.append(_table(["endpoint", "role", "n", "size", "influence MRR", "BM25 MRR", "chance MRR",
                       "influence − BM25", f"R@{k} influence / BM25 / chance"], rows))
    variants = list(r["endpoints"])
    last = sizes[-1]["scale"]
    rows = []
    for name in V3_HEADLINE:
        cells = [name]
        for v in variants:
            e = next(x for x in r["endpoints"][v] if x["name"] == name)
            cells.append(fmt_ci(e["per_scale"][-1]["influence_minus_bm25"]))
        rows.append(cells)
    label = {v: ("identity (gradient dot product)" if v == "identity" else f"EK-FAC λ × {v.removeprefix('ekfac-x')}")
             for v in variants}
    out.append(f"Influence − BM25 at {last} under each curvature and damping:")
    out.append(_table(["endpoint", *(label[v] for v in variants)], rows))
    two = len(sizes) == 2
    lines = []
    for name in V3_HEADLINE:
        e = eps[name]
        sl = e.get("slope_per_decade")
        change = (f"change from {sizes[0]['scale']} to {last} {fmt_ci(sl)} per decade of parameters"
                  if two else f"slope {fmt_ci(sl)} per decade of parameters") if sl else "no slope (one size)"
        robust = [v for v in variants if next(x for x in r["endpoints"][v] if x["name"] == name)["verdict"]
                  == e["verdict"]]
        lines.append(f"- **{name}** (paper claim, n = {e['n_queries']}): **{e['verdict']}**"
                     + (f" ({e['reason']})" if e["reason"] else "") + f"; {change}; same verdict under "
                     f"{len(robust)} of {len(variants)} variants ({', '.join(label[v] for v in robust)}).")
    out.append("Verdicts by the declared rule (n ≥ 30, influence above BM25 at the largest size and a gain that "
               "grows with size, both intervals excluding 0):\n\n" + "\n".join(lines))
    if two:
        out.append("With two sizes the slope is the change between them: it can say whether influence's gap to "
                   "BM25 differs between these two sizes, not whether it trends with scale.")
    if r.get("validation"):
        vals = []
        for run, v in r["validation"].items():
            t = v["tail_patch"]
            vals.append(f"{run}: top-{t['k']} − random change of the query loss {fmt(t['mean_delta_top_minus_random'])}"
                        f" nats, top better for a share {fmt(t['share_top_better'])} of {len(t['queries'])} queries")
        out.append("Estimator check (tail patch, one SGD step on a translated query's top sequences vs random ones): "
                   + "; ".join(vals) + ".")
    return "\n\n".join(out) + "\n"


def _v3_training_block(r: dict) -> str:
    """A v3 run that trained but scored nothing (:func:`experiments.scale_v3.publish_training`):
    the runs, how far each got, the sweeps that finished, held-out loss beside the n-gram
    baselines, and plainly that no endpoint has a number."""
    runs = r["runs"]
    started = sorted({(x["scale"], x["seed"]) for x in runs})
    out = [f"**Partial run, training only** of config `{r['config']}` on CPU ({r['machine']}, "
           f"{r['date'][:16].replace('T', ' ')} UTC, load {', '.join(map(str, r['loadavg']))} at the end, shared with "
           f"other jobs; jax {r['jax']}): the training runs only; **this file scores nothing** (the scored part "
           f"of the run, if any, is published apart, in `scored/`). Training runs started: {len(runs)} "
           f"({sum(x['finished'] for x in runs)} finished) at "
           + ", ".join(f"{s} seed {x}" for s, x in started) + "."]
    if r.get("max_tokens"):
        capped = [f"{x['run']} ({fmt(x['tokens_planned'])} of the rule's {fmt(x['tokens_rule'])})" for x in runs
                  if x["tokens_planned"] < x["tokens_rule"]]
        out[-1] += (f" Token cap for this run: {fmt(r['max_tokens'])} tokens per run (the declared rule's budget at "
                    "tiny, so that the larger size could train in the time left); " +
                    (f"it cut {', '.join(capped)}." if capped else "no run shown here was cut by it."))
    rows = []
    for x in runs:
        last = x["heldout_curve"][-1] if x["heldout_curve"] else None
        rows.append([x["scale"], str(x["seed"]), f"×{fmt(x['lr_multiplier'], 2)} ({fmt(x['learning_rate'], 3)})",
                     f"{x['steps_evaluated']}/{x['total_steps']}", fmt(x.get("seconds_per_step"), 2),
                     "yes" if x["finished"] else "**no**",
                     f"{fmt(last[1], 4)} at step {last[0]}" if last else "–"])
    out.append(_table(["size", "seed", "lr multiplier (rate)", "steps (at the last evaluation)",
                       "s per step (training + evaluation, under the load above)", "finished",
                       "held-out loss (nats/token)"], rows))
    ng = (r.get("ngram") or {}).get("heldout_nats", {})
    base = ", ".join(f"{n}-gram {fmt(v, 4)}" for n, v in sorted(ng.items()))
    lines = []
    for s in r["sizes"]:
        sweep = ", ".join(f"×{fmt(x['lr_multiplier'], 2)} → {fmt(x['heldout_loss'], 4)}" for x in s["sweep"])
        held = min(x["heldout_loss"] for x in s["sweep"])
        beats = ng and held < min(ng.values())
        mults = [x["lr_multiplier"] for x in s["sweep"]]
        edge = s["chosen_lr_multiplier"] in (min(mults), max(mults))
        lines.append(f"- {s['scale']}: learning-rate sweep at seed 0 finished ({sweep}); chosen ×"
                     f"{fmt(s['chosen_lr_multiplier'], 2)}"
                     + (" (at the edge of the grid: the best rate may lie beyond it)" if edge else "")
                     + f", held-out {fmt(held, 4)} nats/token, "
                     + ("below" if beats else "**not below**") + " the best Kneser-Ney baseline.")
    if lines:
        out.append("\n".join(lines))
    else:
        out.append("No size finished its learning-rate sweep, so no learning rate is chosen yet.")
    if base:
        best_n, best = min(ng.items(), key=lambda kv: kv[1])
        below = [x["run"] for x in runs if x["heldout_curve"] and x["heldout_curve"][-1][1] < best]
        out.append(f"Kneser-Ney baselines on the same windows (seed 0's split): {base}. At its last evaluation "
                   + (f"{', '.join(below)} is below" if below else "no run is below")
                   + f" the best of them ({best_n}-gram)." + ("" if all(x["finished"] for x in runs) else
                                                              " An unfinished run's loss is not its final one."))
    missing = "; ".join(f"{s} ({'all seeds' if v == r['declared']['seeds'][s] else 'seeds ' + ', '.join(map(str, v))})"
                        for s, v in r["not_run"].items())
    out.append(f"**Not run** (CPU time): {missing}; the EK-FAC and identity scoring of every run; the "
               "estimator checks (how to resume: below).")
    return "\n\n".join(out) + "\n"


def doc_blocks(v1: Path = V1_RESULTS, v2: Path = V2_RESULTS, v2_gpu: Path = V2_GPU_RESULTS) -> dict[str, str]:
    """Every generated block of the doc."""
    return {"v2-headline": headline(v2), "v2-configs": configs_table(), "v2-endpoints": endpoints_table(),
            "v2-results": v2_status(v2),
            "v2-gpu-results": v2_status(v2_gpu, "the `gpu` ladder (no accelerator was available to this session)"),
            "v1-summary": render_v1_summary(json.loads(v1.read_text())), "v2-archive": archive_block(v2.parent),
            "v2-figures": figures_block(v2.parent), "v3-design": v3_block(), "v3-results": v3_results_block(),
            "v3-scored": v3_results_block(V3_SCORED)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.render", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated block is stale")
    parser.add_argument("--recompute", action="store_true",
                        help="re-derive every published v2 endpoint from scores.npz (+ repairs.json), report the "
                             "largest difference and write scale-v2/recompute.json, then render")
    args = parser.parse_args(argv)
    if args.recompute:
        from .recompute import recompute
        from .scale_v2 import _rounded

        rec = recompute(V2_RESULTS.parent, json.loads(V2_RESULTS.read_text()))
        for e in rec["endpoints"]:
            print(f"{e['layer_set']} {e['endpoint']}: " + (f"max |diff| {e['max_abs_diff']:.3g}; verdict "
                  f"{e['verdict_published']!r} -> {e['verdict_recomputed']!r}" if e["recomputed"]
                  else "not recomputable from the archive"))
        print(f"largest absolute difference {rec['max_abs_diff']:.3g}; verdicts equal: {rec['verdicts_equal']}")
        atomic_write_bytes(V2_RECOMPUTE, (json.dumps(_rounded(rec, 3), indent=1) + "\n").encode())
    text = args.doc.read_text(encoding="utf-8")
    outputs = {args.doc: fill_doc(text, doc_blocks())}
    if V2_RESULTS.exists():
        outputs[V2_REPORT] = render_report(json.loads(V2_RESULTS.read_text()))
    stale = [p for p, new in outputs.items() if not p.exists() or p.read_text(encoding="utf-8") != new]
    if args.check:
        for p in stale:
            print(f"{p}: generated text is stale; run python -m experiments.render", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        atomic_write_bytes(p, outputs[p].encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
