"""The scale experiment end to end in its fast configuration (two tiny scales, 12
queries): every step runs, the outputs are complete and plausible, and a rerun reuses
the cached models, factors, scores and metrics."""

import json
import shutil

import numpy as np
import pytest

from experiments.scale_comparison import FAST, main

pytestmark = [
    pytest.mark.slow,  # about 3-4 minutes on 2 shared cores
    pytest.mark.skipif(shutil.which("diatheke") is None, reason="needs Debian's diatheke and sword-text-kjv/sparv"),
]


def test_fast_configuration_end_to_end(tmp_path):
    out, pub = tmp_path / "fast", tmp_path / "published"
    assert main(["--config", "fast", "--out", str(out), "--publish", str(pub)]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [(r["scale"], r["seed"]) for r in runs] == list(FAST.runs)
    assert runs[0]["params"]["non_embedding"] < runs[1]["params"]["non_embedding"]
    for run in runs:
        assert set(run["eval"]["heldout_loss"]) == {"shakespeare", "kjv-en", "sparv-es"}
        assert set(run["variants"]) == {"mlp", "blocks"}
        for variant, records in run["variants"].items():
            assert [r["id"] for r in records] == list(FAST.query_ids)
            by_id = {r["id"]: r for r in records}
            for r in records:
                assert 0 < r["top1_share"] <= 1
                assert sum(r[f"layer_{t}"] for t in ("lower", "middle", "upper")) == pytest.approx(1.0, abs=1e-4)
                assert len(r["top_rows"]) == FAST.top_k and r["top_scores"] == sorted(r["top_scores"], reverse=True)
            # Behaviour any working influence estimate shows even on these barely trained models:
            # a line's own sequence and a 16-times repeated canary top their own queries.
            assert by_id["mem-tomorrow"]["source_rank"] <= 5, (run["scale"], variant)
            assert by_id["canary-e"]["insertion_rank"] == 1 and by_id["canary-e"]["canary_precision"] >= 0.5
            assert np.isfinite(by_id["xl-gen1-1-en"]["transfer_ratio"])
            assert {"forward_score", "reversed_score"} <= set(by_id["fact-order-duke"])
    tables = (out / "tables.md").read_text()
    for heading in ("## Models", "1. Sparsity", "2a. Surface", "3. Share", "4. Word order", "5. Cross-lingual",
                    "6. Rank"):
        assert heading in tables
    for png in (pub / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((pub / "plots").glob("*.png"))) >= 9 and (pub / "gallery.html").stat().st_size > 1000

    # A rerun trains, fits and scores nothing again: every cached file is left untouched.
    cached = sorted(p for p in out.rglob("*") if p.suffix in (".npz", ".json") and p.parent.name != "plots"
                    and p.name != "results.json")
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    assert main(["--config", "fast", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps
