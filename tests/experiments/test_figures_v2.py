"""The v2 figures (experiments/figures_v2.py): small, embedded in scale.md, and drawn from
the same numbers as the report's tables."""

import json

import pytest

from experiments.figures_v2 import FIGURES, FOLDER, draw, figure_data
from experiments.render import DOC, fmt


def test_figures_are_small_and_embedded():
    text = DOC.read_text(encoding="utf-8")
    for name in FIGURES:
        path = FOLDER / "figures" / name
        assert path.stat().st_size <= 150_000, name
        assert f"(scale-v2/figures/{name})" in text


@pytest.mark.slow
def test_figure_numbers_are_the_tables(tmp_path):
    results = json.loads((FOLDER / "results.json").read_text())
    data = figure_data(results, json.loads((FOLDER / "ngram.json").read_text()))
    report = (FOLDER / "report.md").read_text()
    infl = data["headline"]["semantic (fixed)"]["influence"]
    row = next(ln for ln in report.splitlines() if ln.startswith("| WEB rendering: MRR of the KJV source"))
    for v, lo, hi in zip(infl["value"], infl["low"], infl["high"]):
        assert f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]" in row
    assert len(data["loss"]["heldout"]) == len(results["runs"]) and data["ngram"]["3"] < data["ngram"]["2"]
    assert [p.name for p in draw(data, tmp_path)] == list(FIGURES)
