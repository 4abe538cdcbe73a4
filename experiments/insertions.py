"""Controlled insertions: made-up facts and canaries added to the training data of every
scale, each as its own document (so its own training sequence), read from a versioned
JSON file (``experiments/queries/insertions_v1.json``).

Document ids say what a document is, so its training rows can be found again:

* ``insert/<id>``: a fact stated once (``facts_once``);
* ``insert/<id>/forward`` and ``insert/<id>/reversed``: a fact stated once in each word
  order (``facts_order``); the query asks it in forward order;
* ``insert/<id>/copy<NN>``: copy NN of a canary repeated ``copies`` times.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from influence.lm import Document

from .query_set import QUERIES_DIR

DEFAULT_INSERTIONS = QUERIES_DIR / "insertions_v1.json"
PREFIX = "insert/"


def load_insertions(path: str | Path = DEFAULT_INSERTIONS) -> dict:
    """The insertion spec: ``facts_once``, ``facts_order``, ``canaries`` lists."""
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    ids = [e["id"] for key in ("facts_once", "facts_order", "canaries") for e in spec[key]]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate insertion ids")
    return spec


def _doc(doc_id: str, text: str, kind: str, insertion: str) -> Document:
    return Document(doc_id=f"{PREFIX}{doc_id}", text=text, source="insertion", title=insertion, genre=kind,
                    section=insertion)


def insertion_documents(spec: dict) -> list[Document]:
    """One :class:`Document` per inserted text (``genre`` = fact_once, fact_forward,
    fact_reversed or canary; ``title`` = the insertion id)."""
    docs = [_doc(f["id"], f["text"], "fact_once", f["id"]) for f in spec["facts_once"]]
    for f in spec["facts_order"]:
        docs.append(_doc(f"{f['id']}/forward", f["forward"], "fact_forward", f["id"]))
        docs.append(_doc(f"{f['id']}/reversed", f["reversed"], "fact_reversed", f["id"]))
    for c in spec["canaries"]:
        docs += [_doc(f"{c['id']}/copy{i:02d}", c["text"], "canary", c["id"]) for i in range(int(c["copies"]))]
    return docs


def insertion_rows(doc_ids: Sequence[str]) -> dict[tuple[str, str], list[int]]:
    """Training rows of each insertion, from the training set's ``doc_id`` column:
    ``{(insertion id, role): [rows]}`` with role ``once``, ``forward``, ``reversed`` or
    ``copy``."""
    rows: dict[tuple[str, str], list[int]] = defaultdict(list)
    for row, doc_id in enumerate(doc_ids):
        if not doc_id.startswith(PREFIX):
            continue
        parts = doc_id[len(PREFIX):].split("/")
        role = "once" if len(parts) == 1 else ("copy" if parts[1].startswith("copy") else parts[1])
        rows[(parts[0], role)].append(row)
    return dict(rows)
