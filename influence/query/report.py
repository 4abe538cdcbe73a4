"""A self-contained HTML report of query results: no scripts, no external files.

Every string that reaches the page (query text and ids, tokens, metadata keys and values,
layer names, run information) goes through :func:`_esc`, so text from the data can never
become markup: a column named ``<img onerror=...>`` shows as that text.

Each query gets a collapsible section with its prompt and completion, and its top
training sequences: tokens shaded by their share of the influence (green helps the
completion, red hurts it; stronger colour = larger share, relative to the largest token
of that sequence; the exact number on hover), the source of the sequence, a flag when the
influence sits on a few tokens, and a bar chart of the influence per layer.
"""

from __future__ import annotations

import datetime
import html
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from influence.query.engine import QueryResult, TrainingInfluence
from influence.runtime import io

_OPEN_SECTIONS = 10  # later queries start collapsed, so long reports stay navigable
_CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0 auto;max-width:1100px;\
padding:1rem 1.5rem;color:#1d1d1f;background:#fff}
h1{font-size:1.5rem;margin:.2rem 0 .4rem} h2{font-size:1.1rem;margin:0;display:inline}
.meta{color:#555;font-size:.9rem} .meta td{padding:0 .8rem 0 0}
table.toc{border-collapse:collapse;font-size:.85rem;margin:.6rem 0;width:100%}
table.toc td,table.toc th{border-bottom:1px solid #eee;padding:.15rem .5rem;text-align:left;vertical-align:top}
table.toc a{color:inherit;text-decoration:none} table.toc tr:hover{background:#f4f8ff}
details.query{border:1px solid #ddd;border-radius:8px;margin:1rem 0;padding:.6rem .9rem}
details.query>summary{cursor:pointer;list-style:revert}
.qtext{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;background:#f6f6f6;border-radius:6px;\
padding:.5rem;margin:.5rem 0}
.prompt{color:#666} .completion{font-weight:600;text-decoration:underline;text-decoration-color:#0b57d0}
.seq{border-top:1px solid #eee;padding:.6rem 0;display:grid;grid-template-columns:1fr 230px;gap:.8rem}
.seqhead{font-size:.88rem;color:#333;margin-bottom:.3rem} .rank{font-weight:700;margin-right:.4rem}
.score{font-family:ui-monospace,monospace} .src{color:#555}
.flag{background:#fff3cd;color:#7a5a00;border-radius:4px;padding:0 .35rem;font-size:.8rem;margin-left:.4rem}
.tokens{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.84rem;white-space:pre-wrap;line-height:1.6;word-break:break-word}
.tokens span{border-radius:2px} .special{color:#999;font-style:italic}
.legend span{padding:0 .4rem;border-radius:3px;margin-right:.3rem}
svg text{font:10px system-ui,sans-serif}
"""


def _esc(value) -> str:
    """``value`` as HTML text, safe in element content and in quoted attributes."""
    return html.escape(str(value), quote=True)


def _shade(value: float, scale: float) -> str:
    """Background colour: green for positive, red for negative, alpha by |value|/scale."""
    if scale <= 0 or value == 0:
        return ""
    alpha = min(1.0, abs(value) / scale) * 0.85
    rgb = "22,163,74" if value > 0 else "220,38,38"
    return f"background:rgba({rgb},{alpha:.2f})"


def _fmt(x: float) -> str:
    return f"{x:+.3g}"


def _tokens_html(inf: TrainingInfluence) -> str:
    scores = np.asarray(inf.token_scores)
    scale = float(np.abs(scores).max()) if scores.size else 0.0
    parts = []
    for tok, s in zip(inf.tokens, scores):
        if not tok:
            continue
        text = _esc(tok)
        cls = ' class="special"' if tok.startswith("<|") and tok.endswith("|>") else ""
        style = _shade(float(s), scale)
        parts.append(f'<span{cls} style="{style}" title="{_fmt(float(s))}">{text}</span>' if style or cls
                     else f'<span title="{_fmt(float(s))}">{text}</span>')
    return "".join(parts)


def _short_names(names: list[str]) -> list[str]:
    """Layer paths without the components every path shares (``blocks.0.mlp.fc_in`` -> ``0.fc_in``)."""
    parts = [n.split(".") for n in names]
    common = set.intersection(*(set(p) for p in parts)) if len(parts) > 1 else set()
    return [".".join(x for x in p if x not in common) or n for p, n in zip(parts, names)]


def _layer_chart(layer_scores: dict[str, float], width: int = 220, label_width: int = 80) -> str:
    """Horizontal bars, one per layer, around a zero line, labelled; values on hover."""
    if not layer_scores:
        return ""
    names = list(layer_scores)
    values = np.array([layer_scores[n] for n in names])
    scale = float(np.abs(values).max()) or 1.0
    row = 13
    mid = label_width + (width - label_width) / 2
    half = (width - label_width) / 2 - 2
    items = []
    for i, (name, short, v) in enumerate(zip(names, _short_names(names), values)):
        y = i * row
        w = abs(v) / scale * half
        x = mid if v >= 0 else mid - w
        colour = "#16a34a" if v >= 0 else "#dc2626"
        items.append(f'<text x="0" y="{y + 10}">{_esc(short[:14])}</text>'
                     f'<rect x="{x:.1f}" y="{y + 2}" width="{max(w, 0.5):.1f}" height="{row - 4}" fill="{colour}">'
                     f'<title>{_esc(name)}: {_fmt(float(v))}</title></rect>')
    height = len(names) * row
    return (f'<svg width="{width}" height="{height + 14}" role="img" aria-label="influence per layer">'
            f'<line x1="{mid}" y1="0" x2="{mid}" y2="{height}" stroke="#999"/>{"".join(items)}'
            f'<text x="{label_width}" y="{height + 11}">influence per layer</text></svg>')


def _source(meta: dict, short: bool = False) -> str:
    fields = ("title", "section") if short else ("title", "genre", "section", "speakers", "doc_id", "sequence_id")
    keys = [k for k in fields if meta.get(k) not in (None, "")]
    if not keys:
        keys = [k for k in meta][:4]
    return " · ".join(_esc(meta[k]) if k in ("title", "section") else f"{_esc(k)}: {_esc(meta[k])}" for k in keys)


def _query_html(i: int, result: QueryResult) -> str:
    q = result.query
    title = _esc(q.id or f"Query {i + 1}")
    rows = []
    for inf in result.influences:
        flag = (f'<span class="flag" title="‖v‖₂/‖v‖₁ = {inf.concentration:.2f} &gt; 2/3">'
                'concentrated on few tokens</span>'
                if inf.concentrated else "")
        rows.append(
            f'<div class="seq"><div><div class="seqhead"><span class="rank">#{_esc(inf.rank)}</span>'
            f'<span class="score">{_fmt(inf.score)}</span> <span class="src">{_source(inf.metadata)}</span>{flag}</div>'
            f'<div class="tokens">{_tokens_html(inf)}</div></div>'
            f'<div>{_layer_chart(inf.layer_scores)}</div></div>'
        )
    return (
        f'<details class="query" id="q{i + 1}"{" open" if i < _OPEN_SECTIONS else ""}><summary><h2>{title}</h2> '
        f'<span class="meta">loss {result.loss:.3f} nats over {_esc(result.completion_tokens)} completion tokens</span>'
        '</summary>'
        f'<div class="qtext"><span class="prompt">{_esc(q.prompt)}</span>'
        f'<span class="completion">{_esc(q.completion)}</span></div>'
        f'{"".join(rows) or "<p>No training sequence was scored for this query.</p>"}</details>'
    )


def _toc_row(i: int, result: QueryResult) -> str:
    q = result.query

    def flat(t: str) -> str:
        return " ".join(t.split())

    text = (f'{_esc(q.id)}: ' if q.id else "") + (
        f'<span class="prompt">…{_esc(flat(q.prompt)[-40:])}</span> '
        f'<span class="completion">{_esc(flat(q.completion)[:50])}</span>')
    top = result.influences[0] if result.influences else None
    best = f"{_fmt(top.score)} · {_source(top.metadata, short=True)}" if top else "—"
    return (f'<tr><td><a href="#q{i + 1}">{i + 1}</a></td><td><a href="#q{i + 1}">{text}</a></td>'
            f'<td>{result.loss:.2f}</td><td class="src">{best}</td></tr>')


def render_html(results: Sequence[QueryResult], info: dict | None = None,
                title: str = "Influential training sequences") -> str:
    """The report as one HTML string."""
    info = dict(info or {})
    info.setdefault("generated", datetime.datetime.now().isoformat(timespec="seconds"))
    meta_rows = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in info.items())
    toc = "".join(_toc_row(i, r) for i, r in enumerate(results))
    legend = ('<p class="legend meta"><span style="background:rgba(22,163,74,.6)">helps</span>'
              '<span style="background:rgba(220,38,38,.6)">hurts</span> the completion; shading is relative to the '
              'strongest token of each sequence, hover a token or a bar for its number. Scores: positive = upweighting '
              'the sequence makes the completion more likely.</p>')
    body = "".join(_query_html(i, r) for i, r in enumerate(results))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{_esc(title)}</title><style>{_CSS}</style></head>'
            f'<body><h1>{_esc(title)}</h1><table class="meta">{meta_rows}</table>{legend}'
            f'<nav><table class="toc"><tr><th>#</th><th>query</th><th>loss</th><th>top training sequence</th></tr>'
            f'{toc}</table></nav>{body}</body></html>')


def write_html(results: Sequence[QueryResult], path: str | os.PathLike, info: dict | None = None,
               title: str = "Influential training sequences") -> Path:
    """Atomically write the report to ``path``."""
    path = Path(path)
    io.atomic_write_bytes(path, render_html(results, info, title).encode("utf-8"))
    return path
