"""docs/validation.md holds no hand-typed measurement: its results section is the
rendering of docs/benchmarks/validate.json (written by python -m benchmarks.validate)."""

import json
import re
from pathlib import Path

from benchmarks.validate import BEGIN, END, render

ROOT = Path(__file__).resolve().parents[1]


def test_the_validation_page_is_rendered_from_its_results_file():
    doc = (ROOT / "docs" / "validation.md").read_text()
    match = re.search(re.escape(BEGIN) + "(.*?)" + re.escape(END), doc, re.S)
    assert match, "docs/validation.md lacks the generated section of benchmarks.validate"
    results = json.loads((ROOT / "docs" / "benchmarks" / "validate.json").read_text())
    assert match.group(1).strip() == render(results).strip()
    for name in ("digits-50", "digits-90", "digits-99", "digits-early-90"):
        assert name in {e["name"] for e in results["settings"]}
