"""The HTML report cannot be turned into markup by its data: hostile column names,
metadata values, tokens, query text and ids all come out as text."""

import html.parser
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from influence.query.engine import Query, QueryResult, TrainingInfluence
from influence.query.report import render_html

CHROMIUM = Path("/usr/bin/chromium")
# If any of these ran (or parsed as markup), the page would gain a <pwned-marker> element.
SCRIPT = "document.body.appendChild(document.createElement('pwned-marker'))"
PAYLOADS = [
    f"<img src=x onerror=\"{SCRIPT}\">",
    f"<script>{SCRIPT}</script>",
    f"\"><svg onload=\"{SCRIPT}\">",
    "'><iframe srcdoc='<b>x</b>'></iframe>",
    "</span></div><pwned-marker></pwned-marker>",
    "<|endoftext|><style>body{display:none}</style>",
]


def _influence(rank: int, metadata: dict, tokens: list[str], layers: dict[str, float]) -> TrainingInfluence:
    return TrainingInfluence(rank=rank, row=rank, score=0.5 - rank, tokens=tokens,
                             token_scores=[0.0] + [0.1 * (i + 1) for i in range(len(tokens) - 1)],
                             layer_scores=layers, metadata=metadata, concentration=0.9)


def _results(strings: list[str]) -> list[QueryResult]:
    """Query results in which every string the report shows is taken from ``strings``."""
    first, *rest = strings
    # No title/genre/section/...: the source line falls back to "key: value" for the first columns.
    no_known_columns = {s: s for s in strings[:4]}
    known_columns = {"title": first, "section": strings[1], "speakers": strings[2], "doc_id": strings[3]}
    layers = {f"blocks.0.{s}": 0.3 for s in strings[:2]} | {f"blocks.1.{s}": -0.2 for s in strings[2:4]}
    influences = [_influence(1, no_known_columns, ["a", *strings], layers),
                  _influence(2, known_columns, list(reversed(strings)), layers)]
    return [QueryResult(Query(first, strings[1], id=strings[2]), 1.5, 3, influences),
            QueryResult(Query(strings[3], strings[4], id=None), 2.5, 2, influences[:1])]


def _page(strings: list[str]) -> str:
    return render_html(_results(strings), info={s: s for s in strings} | {"generated": "now"}, title=strings[0])


class _Markup(html.parser.HTMLParser):
    """The set of (tag, attribute) pairs, and of tags, a page's markup has."""

    def __init__(self):
        super().__init__()
        self.tags, self.attributes = set(), set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attributes.update((tag, name) for name, _ in attrs)

    handle_startendtag = handle_starttag


def _markup(page: str) -> _Markup:
    parser = _Markup()
    parser.feed(page)
    parser.close()
    return parser


def test_hostile_strings_add_no_element_or_attribute():
    benign = _markup(_page(["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]))
    hostile_page = _page(PAYLOADS)
    hostile = _markup(hostile_page)
    assert hostile.tags == benign.tags and hostile.attributes == benign.attributes
    assert {"img", "script", "iframe", "pwned-marker"}.isdisjoint(hostile.tags)
    assert "&lt;img src=x onerror=" in hostile_page  # shown as text, not dropped
    # The check notices markup that leaks through: the same page with one key unescaped.
    leaky = hostile_page.replace("&lt;img src=x onerror=", "<img src=x onerror=", 1)
    assert _markup(leaky).tags != benign.tags


def _dump_dom(page: str, tmp_path: Path) -> str:
    file = tmp_path / "report.html"
    file.write_text(page, encoding="utf-8")
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--virtual-time-budget=2000", "--dump-dom", file.as_uri()]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": profile})
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless check needs /usr/bin/chromium (apt-get install chromium); "
                                                   "the html.parser test above is the gate")
def test_hostile_report_runs_no_script_in_chromium(tmp_path):
    dom = _dump_dom(_page(PAYLOADS), tmp_path)
    assert "<details" in dom and "pwned-marker" in dom  # the page rendered, the payload is there as text
    assert "<pwned-marker" not in dom
    # Control: the same payload written raw does run in this browser, so the check can fail.
    raw = _dump_dom(f"<!DOCTYPE html><html><body><p>x</p>{PAYLOADS[0]}</body></html>", tmp_path)
    assert "<pwned-marker" in raw
