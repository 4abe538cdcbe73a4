"""Matplotlib figures of the scale experiment: each metric family against non-embedding
parameters (log scale), one panel per statistic, a line per layer set, error bars the 95%
bootstrap interval over queries; runs with other seeds are drawn as open markers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

from .summary import FAMILIES, summarise

_STYLE = {"mlp": dict(color="#1f77b4", marker="o"), "blocks": dict(color="#d62728", marker="s")}
_LOG_Y = {"largest influence (median)", "fact stated once", "memorised: influence rank", "paraphrase: influence rank",
          "paraphrase: BM25 rank (baseline)", "forward statement: rank (median)", "reversed statement: rank (median)"}


def _series(runs, variant, family, label, n_boot, seed):
    pts = [(r["params"]["non_embedding"], summarise(r["variants"][variant], family, n_boot)[label])
           for r in runs if r["seed"] == seed and variant in r["variants"]]
    pts.sort(key=lambda p: p[0])
    x = np.array([p[0] for p in pts], float)
    y = np.array([p[1].value for p in pts])
    err = np.array([[p[1].value - p[1].low for p in pts], [p[1].high - p[1].value for p in pts]])
    return x, y, np.nan_to_num(err, nan=0.0)


def _axes_style(ax) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("non-embedding parameters", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def layers_figure(runs: Sequence[dict], variants: Sequence[str], path: Path, n_boot: int) -> Path:
    """Influence by depth: one panel per query kind of the layer family, a line per scale
    (seed-0 runs, first layer set): each block's mean share of the top-k's influence
    times the number of blocks (1 = an even spread), at its relative depth (i + 0.5) / n.
    The thirds of the tables are sums of these over depth ranges."""
    title, stats = FAMILIES["layers"]
    kinds = list(dict.fromkeys(s.kinds[0] for s in stats))
    seed = min(r["seed"] for r in runs)
    shown = sorted((r for r in runs if r["seed"] == seed), key=lambda r: r["params"]["non_embedding"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.4 * len(kinds), 3.2), squeeze=False, sharey=True)
    colours = plt.cm.viridis(np.linspace(0.05, 0.85, max(1, len(shown))))
    for ax, kind in zip(axes.flat, kinds):
        for colour, run in zip(colours, shown):
            shares = np.array([r["block_shares"] for r in run["variants"][variants[0]] if r["kind"] == kind], float)
            if not len(shares):
                continue
            n = shares.shape[1]
            depth = (np.arange(n) + 0.5) / n
            ax.plot(depth, np.nanmean(shares, axis=0) * n, marker="o", color=colour,
                    label=f"{run['scale']} ({n} block{'s' * (n > 1)})")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        for edge in (1 / 3, 2 / 3):
            ax.axvline(edge, color="grey", lw=0.5, alpha=0.5)
        ax.set_xlim(0, 1)
        ax.set_xlabel("relative depth of the block", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.set_title(kind, fontsize=9)
    axes.flat[0].set_ylabel("share of top-k influence x blocks", fontsize=8)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"{title}: by depth ({variants[0]} layers, seed {seed})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def family_figure(runs: Sequence[dict], family: str, variants: Sequence[str], path: Path, n_boot: int) -> Path:
    """One PNG for ``family`` (``FAMILIES`` key) at ``path``."""
    title, stats = FAMILIES[family]
    n = len(stats)
    cols = min(3, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    seeds = sorted({r["seed"] for r in runs})
    for ax, stat in zip(axes.flat, stats):
        for variant in variants:
            for seed in seeds:
                x, y, err = _series(runs, variant, family, stat.label, n_boot, seed)
                if not len(x):
                    continue
                style = dict(_STYLE.get(variant, {}))
                first = seed == seeds[0]
                ax.errorbar(x * (1 if first else 1.08), y, yerr=err, capsize=3, lw=1.5 if first else 0.8,
                            ls="-" if first else ":", mfc=None if first else "white",
                            label=f"{variant}, seed {seed}", **style)
        _axes_style(ax)
        if stat.label in _LOG_Y:
            ax.set_yscale("log")
        ax.set_title(stat.label, fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def all_figures(runs: Sequence[dict], variants: Sequence[str], folder: Path, n_boot: int) -> list[Path]:
    """A PNG per metric family in ``folder`` (``<family>.png``)."""
    folder = Path(folder)
    return [layers_figure(runs, variants, folder / f"{f}.png", n_boot) if f == "layers"
            else family_figure(runs, f, variants, folder / f"{f}.png", n_boot) for f in FAMILIES]
