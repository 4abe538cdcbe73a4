"""The figure of the v3 scale experiment, drawn from its published ``results.json`` only
(``python -m experiments.scale_v3 run --publish docs/experiments/scale-v3``):

- one panel per headline endpoint (translated-only, translated-only with names masked,
  BM25-hard): the MRR of the source per size by influence (EK-FAC at the default damping
  and the identity), BM25 and chance, with their 95% intervals (queries nested within seeds);
- held-out loss per seed against total parameters beside the Kneser-Ney baselines.

A run that trained but scored nothing (``scored`` false) gets its held-out loss curves per
size and learning rate beside the baselines instead (:func:`draw_training`).

  python -m experiments.figures_v3      # writes docs/experiments/scale-v3/figures/v3.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[1] / "docs" / "experiments" / "scale-v3"
FIGURE = "v3.png"
HEADLINE = ("translated", "translated_masked", "bm25_hard")
METHODS = (("ekfac-x1", "influence_mrr", "EK-FAC λ×1", "C0"), ("identity", "influence_mrr", "identity", "C2"),
           ("ekfac-x1", "bm25_mrr", "BM25", "C1"), ("ekfac-x1", "chance_mrr", "chance", "0.5"))


def figure_data(results: dict) -> dict:
    """Every plotted number: per headline endpoint and method, per size ``(value, low,
    high)``; per size the total parameters and held-out losses; the n-gram baselines."""
    by = {v: {e["name"]: e for e in eps} for v, eps in results["endpoints"].items()}
    panels = {}
    for name in HEADLINE:
        panels[name] = {"n": by["ekfac-x1"][name]["n_queries"], "methods": {}}
        for variant, metric, label, _ in METHODS:
            cells = by[variant][name]["per_scale"]
            panels[name]["methods"][label] = [(c[metric]["value"], c[metric]["low"], c[metric]["high"])
                                              for c in cells]
    sizes = results["sizes"]
    return {"scales": [s["scale"] for s in sizes], "params": [s["total_params"] for s in sizes],
            "heldout": [s["heldout_loss"] for s in sizes], "ngram": results["ngram"]["heldout_nats"],
            "panels": panels}


def draw(data: dict, path: Path) -> Path:
    """One PNG of four panels (80 dpi, a few tens of kB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    x = data["params"]
    for ax, (name, panel) in zip(axes, data["panels"].items()):
        colors = {label: c for _, _, label, c in METHODS}
        for j, (label, cells) in enumerate(panel["methods"].items()):
            xs = [p * (1 + 0.04 * (j - 1.5)) for p in x]  # side by side at each size
            v = [c[0] for c in cells]
            err = [[max(c[0] - c[1], 0) for c in cells], [max(c[2] - c[0], 0) for c in cells]]
            ax.errorbar(xs, v, yerr=err, marker="o", ms=4, capsize=2, label=label, color=colors[label])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{name} (n = {panel['n']})", fontsize=9)
        ax.set_xlabel("total parameters", fontsize=8)
        ax.set_xticks(x, data["scales"], fontsize=8)
        ax.minorticks_off()
    axes[0].set_ylabel("MRR of the source (95% CI)", fontsize=8)
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    for p, losses in zip(x, data["heldout"]):
        ax.plot([p] * len(losses), losses, "o", color="C0", ms=4)
    ax.plot(x, [sum(v) / len(v) for v in data["heldout"]], "-", color="C0", label="model (seeds)")
    for (n, v), ls in zip(sorted(data["ngram"].items()), (":", "--", "-.")):
        ax.axhline(v, color="0.4", ls=ls, lw=1, label=f"{n}-gram KN")
    ax.set_xscale("log")
    ax.set_xticks(x, data["scales"], fontsize=8)
    ax.minorticks_off()
    ax.set_title("held-out loss (nats/token)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def draw_training(results: dict, path: Path) -> Path:
    """The figure of a run that trained but scored nothing (``results["scored"]`` false):
    held-out loss against training step for every run started, one colour per learning-rate
    multiplier and one panel per size, beside the Kneser-Ney baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [s for s in results["declared"]["scales"] if any(r["scale"] == s and r["heldout_curve"]
                                                                for r in results["runs"])]
    fig, axes = plt.subplots(1, max(1, len(scales)), figsize=(5 * max(1, len(scales)), 3.4), squeeze=False)
    mults = results["declared"]["lr_multipliers"]
    ng = (results.get("ngram") or {}).get("heldout_nats", {})
    for ax, scale in zip(axes[0], scales):
        for r in results["runs"]:
            if r["scale"] != scale or not r["heldout_curve"]:
                continue
            steps, loss = zip(*r["heldout_curve"])
            ax.plot(steps, loss, "o-", ms=3, color=f"C{mults.index(r['lr_multiplier'])}",
                    label=f"seed {r['seed']}, lr ×{r['lr_multiplier']:g}" + ("" if r["finished"] else " (unfinished)"))
        for (n, v), ls in zip(sorted(ng.items()), (":", "--", "-.")):
            ax.axhline(v, color="0.4", ls=ls, lw=1, label=f"{n}-gram KN")
        ax.set_title(f"{scale}: held-out loss (nats/token)", fontsize=9)
        ax.set_xlabel("training step (32 x 128 tokens)", fontsize=8)
        ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.figures_v3", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=FOLDER)
    args = parser.parse_args(argv)
    results = json.loads((args.folder / "results.json").read_text())
    path = args.folder / "figures" / FIGURE
    print(draw(figure_data(results), path) if results.get("scored", True) else draw_training(results, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
