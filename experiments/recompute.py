"""Re-derive a published scale experiment's endpoints from its score archive (issue 26):
every per-query metric that the score matrices determine is recomputed from
``scores.npz`` (repaired, :func:`experiments.archive.read_scores`), put into the records
in place of the published value, and every declared endpoint is evaluated again; the
result is compared with ``results.json``.

What the archive determines, per query: ``top1_share`` (the whole row); the semantic
source's reciprocal rank and recall@10 (the source rows are in the record; BM25's rank is
model-free and kept); the background of the word-order test (the row's mean). What it does
not: the rows of the inserted canaries and the language of every training row (they live
in the training table, which is not published), so ``canary_share`` and the cross-lingual
transfer keep their published values and are reported as not recomputed.

Entries declared lost in the repairs sidecar (overflowed, outside the top 10) enter at the
float16 limit ±65504, a bound on their magnitude; the queries they touch are counted.

  python -m experiments.render --recompute      # runs this on docs/experiments/scale-v2
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import metrics as M
from . import stats as S
from .archive import read_scores

FLOAT16_MAX = 65504.0
# Metrics recomputed from a score row; the rest are carried over from results.json.
RECOMPUTED = ("top1_share", "semantic_rr", "semantic_rr_minus_bm25", "semantic_recall10", "order_asymmetry")


def recompute_record(rec: dict, row: np.ndarray) -> dict:
    """``rec`` with the metrics of :data:`RECOMPUTED` that apply to it recomputed from its
    query's score ``row`` (float ``[N]``, finite)."""
    out = dict(rec)
    out["top1_share"] = M.top_share(row, 0.01)
    if rec.get("semantic_rows"):
        rows = rec["semantic_rows"]
        out["semantic_rr"] = M.reciprocal_rank(row, rows)
        out["semantic_recall10"] = M.recall_at_k(row, rows, 10)
        if "semantic_bm25_rr" in rec:
            out["semantic_rr_minus_bm25"] = out["semantic_rr"] - rec["semantic_bm25_rr"]
    if "forward_excess" in rec and rec.get("background_score"):
        # The number of rows of each statement, from the published excess and background.
        bg_old = rec["background_score"]
        n_fwd = round((rec["forward_score"] - rec["forward_excess"]) / bg_old)
        n_rev = round((rec["reversed_score"] - rec["reversed_excess"]) / bg_old)
        bg = float(np.mean(row))
        out["forward_excess"] = rec["forward_score"] - n_fwd * bg
        out["reversed_excess"] = rec["reversed_score"] - n_rev * bg
        out["order_asymmetry"] = S.order_asymmetry(out["forward_excess"], out["reversed_excess"])
    return out


def _diff(a: dict | None, b: dict | None) -> float:
    if not a or not b:
        return 0.0
    return max(abs(float(a[k]) - float(b[k])) for k in ("value", "low", "high")
               if a.get(k) is not None and b.get(k) is not None and np.isfinite(a[k]) and np.isfinite(b[k]))


def recompute(folder: Path, results: dict, *, n_boot: int | None = None) -> dict:
    """Every declared endpoint of ``results`` re-evaluated from ``folder``'s archive.

    Returns ``{"endpoints": [{"layer_set", "endpoint", "recomputed", "max_abs_diff",
    "verdict_published", "verdict_recomputed"}...], "max_abs_diff", "verdicts_equal",
    "queries_with_lost_entries", "recomputed_metrics", "not_recomputed"}``; ``max_abs_diff``
    is over every per-scale mean, interval bound and slope of the recomputed endpoints.
    """
    from .scale_v2 import endpoint_cells

    n_boot = int(n_boot or results["settings"]["n_boot"])
    keys = [f"{r['scale']}-seed{r['seed']}-{ls}" for r in results["runs"] for ls in r["variants"]]
    values, lost = read_scores(folder, keys)
    runs = copy.deepcopy(results["runs"])
    touched = 0
    for r in runs:
        for ls, recs in r["variants"].items():
            key = f"{r['scale']}-seed{r['seed']}-{ls}"
            a, mask = values[key].astype(np.float64), lost[key]
            if len(recs) != a.shape[0]:
                raise ValueError(f"{key}: {a.shape[0]} archived rows for {len(recs)} records")
            # A lost entry overflowed float16, so its magnitude is at least 65504: use the bound.
            a[mask] = FLOAT16_MAX * np.sign(np.nan_to_num(a[mask], nan=1.0))
            touched += int(mask.any(axis=1).sum())
            r["variants"][ls] = [recompute_record(rec, a[q]) for q, rec in enumerate(recs)]
    out, worst, same = [], 0.0, True
    by_name = {ep.name: ep for ep in S.ENDPOINTS}
    for ls, eps in results["endpoints"].items():
        for e in eps:
            ep = by_name.get(e["endpoint"])
            if ep is None or ep.metric not in RECOMPUTED or e.get("n_queries", 0) == 0:
                out.append({"layer_set": ls, "endpoint": e["endpoint"], "recomputed": False})
                continue
            new = S.evaluate_endpoint(ep, endpoint_cells(runs, ls, ep.query_set), n_boot=n_boot)
            d = max([_diff(p, q) for p, q in zip(e["per_scale"], new["per_scale"])]
                    + [_diff(e.get(k), new.get(k)) for k in ("slope_log10_params", "slope_heldout_loss")])
            v_old = S.LEGACY_VERDICTS.get(e["verdict"], e["verdict"])
            same &= v_old == new["verdict"] and e.get("reproduces") == new.get("reproduces")
            worst = max(worst, d)
            out.append({"layer_set": ls, "endpoint": e["endpoint"], "recomputed": True, "max_abs_diff": d,
                        "verdict_published": v_old, "verdict_recomputed": new["verdict"]})
    return {"endpoints": out, "max_abs_diff": worst, "verdicts_equal": bool(same),
            "queries_with_lost_entries": touched, "recomputed_metrics": list(RECOMPUTED),
            "not_recomputed": sorted({e["endpoint"] for e in out if not e["recomputed"]}), "n_boot": n_boot}


def summary_line(rec: dict, repairs: dict | None, lost_by_key: Sequence[tuple[str, int]] = ()) -> str:
    """The archive paragraph of the doc, from a recompute result and the repairs sidecar."""
    parts = []
    if repairs:
        c = repairs["counts"]
        per = ", ".join(f"{k} {n}" for k, n in lost_by_key)
        parts.append(f"The published `scores.npz` is float16 and overflowed at {c['restored'] + c['lost']} entries "
                     f"(±inf); `repairs.json` restores {c['restored']} of them from the results' top-10 scores and "
                     f"declares {c['lost']} lost ({per}): outside every top 10, their value survives nowhere, and "
                     "reading the archive returns them as NaN, never ±inf.")
    ok = [e["endpoint"] for e in rec["endpoints"] if e["recomputed"]]
    parts.append(f"`python -m experiments.render --recompute` re-derives {', '.join(ok)} from the archive "
                 f"(metrics {', '.join(rec['recomputed_metrics'])}; lost entries at the float16 bound ±65504, "
                 f"{rec['queries_with_lost_entries']} query rows touched): largest absolute difference to the "
                 f"published per-scale means, interval bounds and slopes {rec['max_abs_diff']:.2g}; verdicts "
                 f"{'all equal' if rec['verdicts_equal'] else 'NOT all equal'}. Not recomputable from the archive "
                 f"alone (they need the unpublished training table): {', '.join(rec['not_recomputed']) or 'none'}.")
    return " ".join(parts) + "\n"
