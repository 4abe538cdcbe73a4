"""docs/benchmarks.md's generated sections equal what their committed JSON renders to
(``python -m experiments.validation.report``): no measured number there is typed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.validation import report

ROOT = Path(__file__).resolve().parents[2]


def test_generated_sections_match_their_json():
    page = (ROOT / report.DOCS).read_text()
    found = report.sections(page)
    assert set(found) == set(report.SECTIONS), "every generated section is on the page, and only those"
    rendered = report.sections(report.render(page, ROOT / report.SRC))
    for name, body in found.items():
        assert body == rendered[name], f"section {name!r} is stale: run python -m experiments.validation.report"


def test_unknown_section_is_refused():
    with pytest.raises(KeyError, match="unknown generated section 'nope'"):
        report.render("<!-- begin generated: nope -->\nx\n<!-- end generated: nope -->\n")
