"""A self-contained HTML page (no scripts, no external files) showing, for a handful of
queries, the most influential training sequences at each scale side by side: score,
source, and the text with the words it shares with the query in bold, so surface overlap
is visible at a glance."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from influence.query.bm25 import WORD_RE, words
from influence.runtime import io

from .tables import run_label

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1rem;color:#222}
table{border-collapse:collapse;table-layout:fixed;width:100%}
td,th{border:1px solid #ddd;vertical-align:top;padding:.4rem;text-align:left}
th{background:#f5f5f5;font-size:.85rem} h2{font-size:1.05rem;margin:1.4rem 0 .3rem}
.q{font-family:ui-monospace,monospace;white-space:pre-wrap;background:#f6f6f6;padding:.4rem;border-radius:4px}
.q .c{text-decoration:underline;font-weight:600}
.seq{border-top:1px solid #eee;padding:.3rem 0;font-size:.8rem}
.seq .t{font-family:ui-monospace,monospace;white-space:pre-wrap;word-break:break-word}
.meta{color:#555} b{background:#fff1a8}
"""


def _marked(text: str, shared: set[str], limit: int) -> str:
    """``text`` (cut to ``limit`` characters) escaped, with words in ``shared`` in bold;
    words are split as BM25 splits them, so the bold words are the ones it matched."""
    text = text[:limit] + ("…" if len(text) > limit else "")
    pieces = WORD_RE.split(text)  # capturing split: odd entries are the words
    return "".join(f"<b>{html.escape(p)}</b>" if i % 2 and p.lower() in shared else html.escape(p)
                   for i, p in enumerate(pieces))


def write_gallery(path: str | Path, queries: Sequence, runs: Sequence[dict], tops: dict, *, per_cell: int = 3,
                  limit: int = 360, title: str = "Top influential sequences by scale") -> Path:
    """Write the page.

    Args:
      queries: :class:`~experiments.query_set.QuerySpec` to show, one section each.
      runs: run dicts (as in ``results.json``), one column each.
      tops: ``{(run index, query id): [(score, where, text), ...]}``, best first.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<p>Each column is one trained model; each cell its top sequences for the query, with the influence "
             "score, the source, and the words shared with the query in bold.</p>"]
    for q in queries:
        shared = set(words(q.text))
        parts.append(f"<h2>{html.escape(q.id)} <span class='meta'>({html.escape(q.kind)})</span></h2>"
                     f"<div class='q'>{html.escape(q.prompt)}<span class='c'>{html.escape(q.completion)}</span></div>")
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(run_label(r))}</th>" for r in runs) + "</tr><tr>")
        for i, _ in enumerate(runs):
            cells = []
            for score, where, text in tops.get((i, q.id), [])[:per_cell]:
                cells.append(f"<div class='seq'><span class='meta'>{score:+.3g} · {html.escape(where)}</span>"
                             f"<div class='t'>{_marked(text, shared, limit)}</div></div>")
            parts.append("<td>" + "".join(cells) + "</td>")
        parts.append("</tr></table>")
    parts.append("</body></html>")
    path = Path(path)
    io.atomic_write_bytes(path, "\n".join(parts).encode())
    return path
