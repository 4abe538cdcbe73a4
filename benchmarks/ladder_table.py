"""Markdown table of trained ladder runs (the one in docs/lm.md), read from their run.json.

    python benchmarks/ladder_table.py runs/mini runs/small runs/medium runs/large
"""

from __future__ import annotations

import json
import pathlib
import sys


def row(path: pathlib.Path) -> str:
    info = json.loads((path / "run.json").read_text())
    cfg, params, data = info["train_config"], info["parameters"], info["data"]
    s = info.get("summary")
    if s is None:
        return f"| {cfg['scale']} | (not finished) |"
    best = min(json.loads(line)["heldout_bits"] for line in (path / "metrics.jsonl").read_text().splitlines())
    return (f"| {cfg['scale']} | {params['non_embedding'] / 1e6:.2f}M | {params['total'] / 1e6:.2f}M "
            f"| {s['tokens'] / 1e6:.1f}M ({s['steps']} steps) | {s['train_seconds'] / 60:.1f} min "
            f"| {s['tokens_per_second']:,.0f} | {s['heldout_bits']:.3f} | {best:.3f} "
            f"| {data['unigram_entropy_bits']:.3f} | {data['unigram_heldout_bits']:.3f} |")


def main(paths: list[str]) -> None:
    print("| scale | non-embedding params | total params | token budget | training time | tokens/s "
          "| held-out bits/token (final) | (best eval) | unigram entropy | unigram held-out |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in paths:
        print(row(pathlib.Path(p)))


if __name__ == "__main__":
    main(sys.argv[1:])
