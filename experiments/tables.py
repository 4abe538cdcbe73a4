"""Markdown tables of the scale experiment: one for the models, then one per metric family
with a column per run (scale and seed) and a row per statistic, each cell an estimate
over queries with its 95% bootstrap interval."""

from __future__ import annotations

from collections.abc import Sequence

from .summary import FAMILIES, summarise


def params_label(n: int) -> str:
    """``12_672`` -> ``"12.7k"``, ``2_224_704`` -> ``"2.22M"``."""
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k"


def run_label(run: dict) -> str:
    return f"{run['scale']} s{run['seed']} ({params_label(run['params']['non_embedding'])})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def models_table(runs: Sequence[dict]) -> str:
    """Scale, parameters, training, held-out and query losses (nats per token)."""
    groups = sorted({g for r in runs for g in r["eval"]["heldout_loss"]})
    kinds = ("memorised", "paraphrase", "fact_once", "fact_order", "canary", "crosslingual")
    header = ["run", "non-embedding params", "epochs", "train s", "final train loss",
              *[f"held-out {g}" for g in groups], *[f"query loss/token: {k}" for k in kinds]]
    rows = []
    for r in runs:
        ev = r["eval"]
        per_kind = []
        for k in kinds:
            ids = [q for q, kind in r["query_kinds"].items() if kind == k]
            tok = sum(ev["query_tokens"][q] for q in ids)
            per_kind.append(f"{sum(ev['query_loss'][q] for q in ids) / tok:.2f}" if tok else "–")
        rows.append([run_label(r), f"{r['params']['non_embedding']:,}", f"{r['epochs']:.1f}",
                     f"{r['train_summary'].get('train_seconds', float('nan')):.0f}",
                     f"{r['train_summary'].get('train_loss', float('nan')):.3f}",
                     *[f"{ev['heldout_loss'].get(g, float('nan')):.3f}" for g in groups], *per_kind])
    return _table(header, rows)


def family_table(runs: Sequence[dict], family: str, variant: str, n_boot: int) -> str:
    """Rows: the family's statistics; columns: runs (estimate [95% CI], n queries)."""
    estimates = [summarise(r["variants"][variant], family, n_boot) for r in runs]
    labels = [s.label for s in FAMILIES[family][1]]
    rows = []
    for label in labels:
        cells = [e[label] for e in estimates]
        n = max((c.n for c in cells), default=0)
        rows.append([label, str(n), *[c.fmt() for c in cells]])
    return _table(["statistic", "n", *[run_label(r) for r in runs]], rows)


def report(runs: Sequence[dict], variants: Sequence[str], n_boot: int, header: str) -> str:
    """The whole tables page: a header (command, machine, date), the models, then every
    family for every layer set."""
    parts = [header, "## Models\n", models_table(runs)]
    for variant in variants:
        for family, (title, _) in FAMILIES.items():
            parts += [f"\n## {title} — EK-FAC on {variant} layers\n", family_table(runs, family, variant, n_boot)]
    return "\n".join(parts) + "\n"
