"""docs/experiments/scale.md holds no hand-typed result: its generated blocks are
regenerated here from the results files and must match, so the doc cannot misquote them."""

import pytest

from experiments.render import DOC, doc_blocks, fill_doc, v2_status


def test_scale_doc_matches_its_results():
    text = DOC.read_text(encoding="utf-8")
    assert fill_doc(text, doc_blocks()) == text, "run: python -m experiments.render"


def test_v2_block_says_plainly_when_v2_has_not_run(tmp_path):
    assert "**Not run yet:** the `full` ladder (CPU) has not been run" in v2_status(tmp_path / "missing.json")


def test_fill_doc_refuses_unknown_or_missing_blocks():
    doc = "a\n<!-- generated:x (python -m experiments.render) -->\nold\n<!-- /generated:x -->\nb\n"
    assert fill_doc(doc, {"x": "new\n"}) == doc.replace("old", "new")
    with pytest.raises(ValueError, match="no generator for \\['x'\\]"):
        fill_doc(doc, {})
    with pytest.raises(ValueError, match="no block in the doc for \\['y'\\]"):
        fill_doc(doc, {"x": "", "y": ""})


def test_v1_summary_corrects_the_misquotes_of_issue_16():
    import json

    from experiments.render import V1_RESULTS, render_v1_summary

    summary = render_v1_summary(json.loads(V1_RESULTS.read_text()))
    seed0 = next(ln for ln in summary.splitlines() if ln.startswith("- Top-1% share, seed 0"))
    assert "mini [0.15, 0.184] and small [0.181, 0.222] overlap" in seed0  # v1 called them non-overlapping
    assert "0.0108 to 0.148" in summary and "disjoint from the control's at mini s0, small s0, tiny s1" in summary
    assert "seed 1:" in summary  # the layer bounds are given per seed, not for seed 0 only
    assert "over all 9 runs" in summary  # canary losses over every run, not seed 0 only
