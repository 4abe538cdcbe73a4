"""docs/index.md and the default compression are held to the benchmark's JSON (and the
LDS of the index's scores to its own)."""

import json

from benchmarks.index import DOC, LDS, OUT, choose_default, render
from influence.index.build import DEFAULT_COMPRESSION


def test_docs_are_rendered_from_the_results_and_the_default_is_the_measured_choice():
    results = json.loads(OUT.read_text())
    assert DOC.read_text() == render(results), "regenerate: python -m benchmarks.index --render-only"
    assert choose_default(results["settings"]) == results["default_compression"] == DEFAULT_COMPRESSION
    # the default is measured on a trained ladder run, and its LDS next to the rescan's
    assert any("run" in s and any(r["compression"] == DEFAULT_COMPRESSION for r in s["curve"])
               for s in results["settings"].values())
    rows = {r["damping"] for r in json.loads(LDS.read_text())["rows"]}
    assert {"default", f"index {DEFAULT_COMPRESSION}"} <= rows
