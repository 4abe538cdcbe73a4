"""The scale experiment's query set: a versioned JSON-lines file of prompts and
completions, each with the metadata its metrics need.

A line holds ``id``, ``kind``, ``prompt``, ``completion`` and, by kind:

* ``memorised`` / ``paraphrase``: ``source_text``, an exact substring of the training text
  (the line, or the line a paraphrase restates) that locates its source sequence(s);
  ``title``, ``genre``, ``speaker`` for thematic agreement.
* ``style``: ``title``, ``genre``, ``speaker`` (the voice the new text imitates).
* ``fact_once`` / ``fact_order`` / ``canary``: ``insertion``, the id of the controlled
  insertion (see :mod:`experiments.insertions`) the completion comes from.
* ``crosslingual``: ``pair`` (shared by an English query and its Spanish translation),
  ``lang`` (``en``/``es``) and ``source_text`` (the verse).
* ``semantic`` / ``semantic_control`` (v2, :mod:`experiments.queries_v2`): ``verse`` (its
  label), ``source_doc`` (the KJV chapter document trained on) and ``source_text`` (the
  KJV verse), which locate the semantic source sequence(s).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from influence.query.engine import Query

QUERIES_DIR = Path(__file__).parent / "queries"
DEFAULT_QUERIES = QUERIES_DIR / "scale_v1.jsonl"
V1_KINDS = ("memorised", "paraphrase", "style", "fact_once", "fact_order", "canary", "crosslingual")
KINDS = (*V1_KINDS, "semantic", "semantic_control")  # v2 adds the semantic-source kinds
# Fields a kind must have beyond id/kind/prompt/completion.
REQUIRED = {
    "memorised": ("source_text", "title", "genre", "speaker"),
    "paraphrase": ("source_text", "title", "genre", "speaker"),
    "style": ("title", "genre", "speaker"),
    "fact_once": ("insertion",),
    "fact_order": ("insertion",),
    "canary": ("insertion",),
    "crosslingual": ("pair", "lang", "source_text"),
    "semantic": ("verse", "source_doc", "source_text"),
    "semantic_control": ("verse", "source_doc", "source_text"),
}


@dataclasses.dataclass(frozen=True)
class QuerySpec:
    """One query of the experiment and its metadata (``None`` where a kind has none)."""

    id: str
    kind: str
    prompt: str
    completion: str
    source_text: str | None = None
    title: str | None = None
    genre: str | None = None
    speaker: str | None = None
    insertion: str | None = None
    pair: str | None = None
    lang: str | None = None
    verse: str | None = None
    source_doc: str | None = None
    completion_of: str | None = None  # a greedy-completion query: the id of the fixed query it answers

    @property
    def query(self) -> Query:
        return Query(self.prompt, self.completion, self.id)

    @property
    def text(self) -> str:
        """Prompt and completion as one text (what BM25 and n-gram overlap compare)."""
        return self.prompt + self.completion


def parse_query(record: dict, where: str = "query") -> QuerySpec:
    """A :class:`QuerySpec` from one JSON record, checking its kind's fields."""
    fields = {f.name for f in dataclasses.fields(QuerySpec)}
    unknown = sorted(set(record) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}")
    for key in ("id", "kind", "prompt", "completion"):
        if key not in record:
            raise ValueError(f"{where}: missing {key!r}")
    if record["kind"] not in KINDS:
        raise ValueError(f"{where}: unknown kind {record['kind']!r}; kinds: {KINDS}")
    missing = [k for k in REQUIRED[record["kind"]] if not record.get(k)]
    if missing:
        raise ValueError(f"{where} ({record['id']}): kind {record['kind']} needs {missing}")
    return QuerySpec(**record)


def load_queries(path: str | Path = DEFAULT_QUERIES, ids: Sequence[str] | None = None) -> list[QuerySpec]:
    """The queries of ``path`` in file order; with ``ids``, only those (in file order).

    Raises:
      ValueError: a malformed line, a duplicate id, or an id in ``ids`` not in the file.
    """
    specs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            specs.append(parse_query(json.loads(line), f"{path}:{n}"))
    seen = [s.id for s in specs]
    dup = sorted({i for i in seen if seen.count(i) > 1})
    if dup:
        raise ValueError(f"{path}: duplicate query ids {dup}")
    if ids is not None:
        missing = sorted(set(ids) - set(seen))
        if missing:
            raise ValueError(f"{path}: no queries with ids {missing}")
        specs = [s for s in specs if s.id in set(ids)]
    return specs
