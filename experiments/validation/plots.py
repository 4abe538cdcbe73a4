"""Figures for docs/benchmarks.md from the JSON results the validation and benchmark
scripts write (copied to ``docs/benchmarks/`` so the figures can be remade).

  python -m experiments.validation.plots [--src docs/benchmarks] [--dst docs/benchmarks]

Each figure is drawn only when its results file is there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
COLOURS = {"identity": "#999999", "diagonal": "#6baed6", "kfac": "#fd8d3c", "ekfac": "#d62728", "exact": "#333333"}


def _load(src: Path, name: str):
    path = src / name
    return json.loads(path.read_text()) if path.exists() else None


def _row(rows, **match):
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[0] if found else None


def lds_bars(results: list[dict], dst: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.2
    labels = []
    for i, res in enumerate(results):
        measurement = res["rows"][0]["measurement"]  # the setting's first measurement
        labels.append(f"{res['setting']}\n({measurement}; M={res['subsets']}, {len(res['seeds'])} seeds)")
        for j, strategy in enumerate(STRATEGIES):
            fisher = "-" if strategy == "identity" else "sampled"
            r = _row(res["rows"], measurement=measurement, strategy=strategy, fisher=fisher, damping="default")
            ax.bar(i + (j - 1.5) * width, r["lds"], width, yerr=r["stderr"], color=COLOURS[strategy],
                   label=strategy if i == 0 else None, capsize=2)
        ax.plot([i - 0.45, i + 0.45], [res["seed_agreement"][measurement]] * 2, "k--", lw=1,
                label="one seed vs another" if i == 0 else None)
    ax.set_xticks(range(len(results)), labels, fontsize=8)
    ax.set_ylabel("LDS (Spearman, mean over queries)")
    ax.set_title("Linear datamodeling score, default damping, sampled Fisher", fontsize=10)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    fig.savefig(dst / "lds.png", dpi=130)
    plt.close(fig)


def lds_damping(results: list[dict], dst: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(3.3 * len(results), 3), squeeze=False)
    for ax, res in zip(axes[0], results):
        measurement = res["rows"][0]["measurement"]  # the setting's first measurement
        for strategy in STRATEGIES[1:]:
            for fisher, style in (("sampled", "-"), ("exact", ":")):
                pts = [(r["lambda"], r["lds"]) for r in res["rows"] if r["measurement"] == measurement
                       and r["strategy"] == strategy and r["fisher"] == fisher and "meanΛ" in r["damping"]]
                if pts:
                    x, y = zip(*sorted(pts))
                    ax.semilogx(x, y, style, marker="o", ms=3, color=COLOURS[strategy], label=f"{strategy} ({fisher})")
        ident = _row(res["rows"], measurement=measurement, strategy="identity")
        ax.axhline(ident["lds"], color=COLOURS["identity"], lw=1.5, label="identity")
        ax.set_title(f"{res['setting']} ({measurement})", fontsize=9)
        ax.set_xlabel("damping λ")
    axes[0][0].set_ylabel("LDS")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(dst / "lds_damping.png", dpi=130)
    plt.close(fig)


def pbrf_bars(res: dict, dst: Path) -> None:
    configs = sorted({(r["damping_factor"], r["epsilon_times_n"]) for r in res["rows"]}, key=lambda c: (c[0], -c[1]))
    fig, ax = plt.subplots(figsize=(7, 3.3))
    names = ["identity", ("diagonal", "exact"), ("kfac", "sampled"), ("ekfac", "sampled"), ("kfac", "exact"),
             ("ekfac", "exact"), "exact"]
    width = 0.8 / len(names)
    for i, (r_, k) in enumerate(configs):
        for j, name in enumerate(names):
            strategy, fisher = (name, "-") if isinstance(name, str) else name
            row = _row(res["rows"], damping_factor=r_, epsilon_times_n=k, strategy=strategy, fisher=fisher)
            label = strategy if fisher == "-" else f"{strategy} ({fisher})"
            ax.bar(i + (j - len(names) / 2 + 0.5) * width, row["pearson"], width, color=COLOURS[strategy],
                   alpha=1.0 if fisher != "sampled" else 0.55, label=label if i == 0 else None)
    ax.set_xticks(range(len(configs)), [f"λ = {r_:g}·mean Λ\nε = {k:g}/N" for r_, k in configs], fontsize=8)
    ax.set_ylabel("Pearson with PBRF")
    ax.set_ylim(0, 1.3)
    ax.set_title(f"PBRF check: MLP 64-32-10, {res['n_points']} upweighted digits, {res['n_queries']} queries",
                 fontsize=10)
    ax.legend(fontsize=6, ncol=4, loc="upper left")
    fig.tight_layout()
    fig.savefig(dst / "pbrf.png", dpi=130)
    plt.close(fig)


def ihvp_bars(res: dict, dst: Path) -> None:
    results = res["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.2), squeeze=False)
    for ax, result in zip(axes[0], results):
        layers = list(result["rows"][0]["cosine_per_layer"])
        groups = ["all", *layers]
        width = 0.8 / len(result["rows"])
        for j, row in enumerate(result["rows"]):
            values = [row["cosine"], *(row["cosine_per_layer"][name] for name in layers)]
            ax.bar(np.arange(len(groups)) + (j - len(result["rows"]) / 2 + 0.5) * width, values, width,
                   color=COLOURS[row["strategy"]], label=row["strategy"])
        ax.set_xticks(range(len(groups)), [g.replace("blocks.0.", "") for g in groups], fontsize=7, rotation=30)
        ax.set_ylim(0, 1)
        ax.set_title(f"cosine with CG, damping {result['damping_scale']:g}× default", fontsize=9)
    axes[0][0].set_ylabel("cosine similarity")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dst / "ihvp.png", dpi=130)
    plt.close(fig)


def _data_ticks(ax, values, axis="x") -> None:
    """Label a log axis at the measured values only (matplotlib's minor labels overlap)."""
    ax.minorticks_off()
    (ax.set_xticks if axis == "x" else ax.set_yticks)(values, [f"{v:g}" for v in values])


def growth_plot(res: dict, dst: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for key, label, style in (("fwd_bwd", "forward+backward", "k-"), ("fit", "fit EK-FAC", "C3-"),
                              ("scores", "pairwise scores (32 queries)", "C0-")):
        n = [r["n"] for r in res["by_size"]]
        axes[0].loglog(n, [r[key] for r in res["by_size"]], style, marker="o", ms=3, label=label)
        if res["by_width"]:
            w = [r["width"] for r in res["by_width"]]
            axes[1].loglog(w, [r[key] for r in res["by_width"]], style, marker="o", ms=3, label=label)
    n = np.array([r["n"] for r in res["by_size"]], float)
    ref = res["by_size"][0]["fit"] * n / n[0]
    axes[0].loglog(n, ref, "C3:", lw=1, label="linear in n")
    _data_ticks(axes[0], [r["n"] for r in res["by_size"]])
    if res["by_width"]:
        _data_ticks(axes[1], [r["width"] for r in res["by_width"]])
    for ax in axes:
        lo, hi = ax.get_ylim()
        _data_ticks(ax, [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50) if lo <= t <= hi], axis="y")
    axes[0].set_xlabel("training sequences n")
    axes[0].set_ylabel("seconds")
    axes[0].legend(fontsize=7)
    axes[0].set_title(res["by_size"][0]["label"], fontsize=8)
    axes[1].set_xlabel("d_model")
    axes[1].set_title(f"n = {res['by_width'][0]['n']}" if res["by_width"] else "", fontsize=8)
    fig.tight_layout()
    fig.savefig(dst / "growth.png", dpi=130)
    plt.close(fig)


def memory_plot(res: dict, dst: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    n = [r["n"] for r in res["rows"]]
    ax.semilogx(n, [r["baseline_mb"] for r in res["rows"]], "k-o", ms=3, label="model + data + fwd/bwd")
    ax.semilogx(n, [r["influence_mb"] for r in res["rows"]], "C3-o", ms=3, label="+ EK-FAC fit + pairwise scores")
    _data_ticks(ax, n)
    ax.set_xlabel("training sequences n")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_ylim(0, max(r["influence_mb"] for r in res["rows"]) * 1.3)
    ax.legend(fontsize=7)
    ax.set_title("peak memory of a fresh process per size", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst / "memory.png", dpi=130)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--dst", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args(argv)
    args.dst.mkdir(parents=True, exist_ok=True)
    lds = [r for r in (_load(args.src, f"lds-{s}.json") for s in ("digits", "diabetes", "lm")) if r]
    if lds:
        lds_bars(lds, args.dst)
        lds_damping(lds, args.dst)
    for name, draw in (("pbrf.json", pbrf_bars), ("ihvp.json", ihvp_bars), ("growth.json", growth_plot),
                       ("memory.json", memory_plot)):
        res = _load(args.src, name)
        if res:
            draw(res, args.dst)
    print(f"figures in {args.dst}: {sorted(p.name for p in args.dst.glob('*.png'))}")


if __name__ == "__main__":
    main()
