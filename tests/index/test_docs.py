"""docs/index.md and the default compression are held to the benchmark's JSON."""

import json

from benchmarks.index import DOC, OUT, choose_default, render
from influence.index.build import DEFAULT_COMPRESSION


def test_docs_are_rendered_from_the_results_and_the_default_is_the_measured_choice():
    results = json.loads(OUT.read_text())
    assert DOC.read_text() == render(results), "regenerate: python -m benchmarks.index --render-only"
    assert choose_default(results["settings"]) == results["default_compression"] == DEFAULT_COMPRESSION
