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


def test_the_heldout_section_covers_every_setting_and_compression():
    """docs/index.md's section on models that did not set the default is rendered from
    docs/benchmarks/index-heldout.json (held by the test above), which holds every setting."""
    from benchmarks.index_heldout import COMPRESSIONS, SETTINGS
    from benchmarks.index_heldout import OUT as HELDOUT

    results = json.loads(HELDOUT.read_text())
    assert list(results["settings"]) == list(SETTINGS)
    for s in results["settings"].values():
        assert set(s["compressions"]) == {*COMPRESSIONS, "count-sketch (bergson-style)"}
        assert s["compressions"]["count-sketch (bergson-style)"]["bytes_per_sequence"] <= \
            s["compressions"]["fidelity:0.95:int4"]["bytes_per_sequence"]  # the baseline gets no more bytes
    assert "## On models that did not set the default" in DOC.read_text()


def test_the_floor_section_is_a_gigabyte_index_measured_under_a_recorded_load():
    """docs/index.md's section on the I/O floor comes from docs/benchmarks/index-floor.json
    (held by the first test): an index of at least 1 GB, medians of at least 3 runs, the
    machine's load recorded, and the ratios those of the times beside them."""
    from benchmarks.index_floor import OUT as FLOOR

    r = json.loads(FLOOR.read_text())
    assert r["index_bytes"] >= 1e9 and r["shard_bytes"] < r["index_bytes"]
    assert r["repeats"] >= 3 and "load average" in r["uptime_start"] and "load average" in r["uptime_end"]
    assert r["latency"] and all(row["top10_agreement"] > 0 for row in r["latency"])
    assert len(r["cold_reads_seconds"]) >= 3 and r["io_floor_cold_seconds"] == min(r["cold_reads_seconds"])
    for row in r["latency"]:
        assert abs(row["index_cold_over_io_floor"] * r["io_floor_cold_seconds"] / row["index_cold_seconds"] - 1) < 1e-2
    assert "## Query time against the I/O floor (a 1 GB index)" in DOC.read_text()
