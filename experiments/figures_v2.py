"""Figures of the v2 scale experiment, drawn from its published archive (issue 26 item 6):
``results.json`` (per-query records of every run) and the n-gram baseline (``ngram.json``,
``python -m experiments.ngram``).

- ``headline.png``: each headline endpoint per size -- the MRR of the semantic source by
  influence (fixed and greedy completions) and of the KJV control, with BM25 and chance
  beside them; 95% intervals nested over queries within seeds.
- ``loss.png``: held-out loss against total parameters, per seed, beside the Kneser-Ney
  bigram to 4-gram baselines computed on the same token windows.
- ``profiles.png``: sparsity (share of positive influence on the top 1% of sequences, per
  query kind) and the layer-group profile (semantic-source MRR through the lower, middle
  and upper third of the layers) per size.

  python -m experiments.figures_v2      # writes docs/experiments/scale-v2/figures/*.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import stats as S

FOLDER = Path(__file__).resolve().parents[1] / "docs" / "experiments" / "scale-v2"
FIGURES = ("headline.png", "loss.png", "profiles.png")


def series(cells: Sequence[dict], metric: str, kinds: Sequence[str] | None, n_boot: int) -> dict:
    """Per-scale mean with its nested 95% interval (as the report's tables compute it):
    ``{"value": [...], "low": [...], "high": [...]}``, NaN where a scale has no data."""
    mats = [S.metric_matrix(c["records"], metric, kinds)[0] for c in cells]
    if not any(np.isfinite(m).any() for m in mats):
        return {"value": [np.nan] * len(cells), "low": [np.nan] * len(cells), "high": [np.nan] * len(cells)}
    present = [i for i, m in enumerate(mats) if np.isfinite(m).any()]
    est = S.scale_means([mats[i] for i in present], n_boot=n_boot)
    out = {k: [np.nan] * len(cells) for k in ("value", "low", "high")}
    for i, e in zip(present, est):
        d = e.as_dict()
        for k in out:
            out[k][i] = d[k]
    return out


def figure_data(results: dict, ngram: dict | None = None) -> dict:
    """Every plotted number, from the results (and the n-gram baseline when given)."""
    from .metrics import chance_mrr
    from .scale_v2 import endpoint_cells

    n_boot = int(results["settings"]["n_boot"])
    ls = next(iter(results["endpoints"]))
    cells = endpoint_cells(results["runs"], ls)
    greedy = endpoint_cells(results["runs"], ls, "greedy")
    n_train = int(results["runs"][0]["n_train"])
    sem = [r for r in cells[0]["records"][0] if r["kind"] == "semantic" and r.get("semantic_rows")]
    ctl = [r for r in cells[0]["records"][0] if r["kind"] == "semantic_control" and r.get("semantic_rows")]
    data = {"scales": [c["scale"] for c in cells], "params": [c["params"] for c in cells],
            "headline": {
                "semantic (fixed)": {"influence": series(cells, "semantic_rr", ("semantic",), n_boot),
                                     "BM25": series(cells, "semantic_bm25_rr", ("semantic",), n_boot),
                                     "chance": float(np.mean([chance_mrr(n_train, len(r["semantic_rows"]))
                                                              for r in sem]))},
                "semantic (greedy)": {"influence": series(greedy, "semantic_rr", ("semantic",), n_boot),
                                      "BM25": series(greedy, "semantic_bm25_rr", ("semantic",), n_boot),
                                      "chance": float(np.mean([chance_mrr(n_train, len(r["semantic_rows"]))
                                                               for r in sem]))},
                "KJV control": {"influence": series(cells, "semantic_rr", ("semantic_control",), n_boot),
                                "BM25": series(cells, "semantic_bm25_rr", ("semantic_control",), n_boot),
                                "chance": float(np.mean([chance_mrr(n_train, len(r["semantic_rows"]))
                                                         for r in ctl]))}},
            "sparsity": {k: series(cells, "top1_share", (k,), n_boot)
                         for k in ("semantic", "memorised", "style", "canary", "crosslingual")},
            "layers": {t: series(cells, f"semantic_rr_{t}", ("semantic",), n_boot)
                       for t in ("lower", "middle", "upper")}}
    runs = sorted(results["runs"], key=lambda r: r["params"]["total"])
    data["loss"] = {"total_params": [r["params"]["total"] for r in runs],
                    "heldout": [r["regime"]["heldout_loss"] for r in runs], "scale": [r["scale"] for r in runs]}
    if ngram:
        data["ngram"] = ngram["heldout_nats"]
    return data


def draw(data: dict, folder: Path) -> list[Path]:
    """The three PNGs of :data:`FIGURES` from :func:`figure_data` (small: 100 dpi)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    x = np.array(data["params"], float)
    paths = []

    def band(ax, s, label, **kw):
        v, lo, hi = (np.array(s[k], float) for k in ("value", "low", "high"))
        ax.errorbar(x, v, yerr=[v - lo, hi - v], capsize=3, label=label, **kw)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax, (name, d) in zip(axes, data["headline"].items()):
        band(ax, d["influence"], "influence (EK-FAC)", marker="o", color="#1f77b4")
        band(ax, d["BM25"], "BM25", marker="s", color="#ff7f0e", linestyle="--")
        ax.axhline(d["chance"], color="grey", linestyle=":", label=f"chance ({d['chance']:.2g})")
        ax.set(xscale="log", title=f"{name}: MRR of the source", xlabel="non-embedding parameters", ylim=(0, 1.05))
    axes[0].set_ylabel("MRR (95% CI)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    paths.append(folder / FIGURES[0])
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.8))
    loss = data["loss"]
    ax.plot(loss["total_params"], loss["heldout"], "o", color="#1f77b4", label="transformer runs (each seed)")
    for n, v in sorted(data.get("ngram", {}).items()):
        if int(n) >= 2:  # the unigram (far above) would flatten the rest
            ax.axhline(v, linestyle=":", color=f"C{int(n) + 1}", label=f"Kneser-Ney {n}-gram ({v:.3g})")
    ax.set(xscale="log", xlabel="total parameters", ylabel="held-out loss (nats/token)",
           title="held-out loss against size, beside n-gram baselines")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # the ladder spans ~1.3 decades: minor labels overlap
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / FIGURES[1])
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (kind, s) in enumerate(data["sparsity"].items()):
        band(axes[0], s, kind, marker="o", color=f"C{i}")
    axes[0].set(xscale="log", xlabel="non-embedding parameters", ylabel="top-1% share of positive influence",
                title="sparsity per query kind")
    axes[0].legend(fontsize=8)
    for i, (third, s) in enumerate(data["layers"].items()):
        band(axes[1], s, f"{third} third", marker="os^"[i], color=f"C{i}")
    band(axes[1], data["headline"]["semantic (fixed)"]["influence"], "all layers", color="black", linestyle="--")
    axes[1].set(xscale="log", xlabel="non-embedding parameters", ylabel="MRR of the KJV source",
                title="semantic source through one third of the layers")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / FIGURES[2])
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.figures_v2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=FOLDER)
    args = parser.parse_args(argv)
    results = json.loads((args.folder / "results.json").read_text())
    ngram_path = args.folder / "ngram.json"
    ngram = json.loads(ngram_path.read_text()) if ngram_path.exists() else None
    for p in draw(figure_data(results, ngram), args.folder / "figures"):
        print(f"{p}: {p.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
