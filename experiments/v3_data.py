"""Data of the v3 scale experiment (issue 26): query sets whose headline a lexical matcher
cannot pass, fixed before any model is trained.

- **Translated-only sources.** For the chapters of ``translated_only`` the KJV (English)
  document is removed from training while the Reina-Valera 1909 (Spanish) document stays.
  A query is the WEB (modern English) rendering of such a verse, prompted with the end of
  the preceding WEB verse; its semantic source is the Spanish training sequence that holds
  the verse. BM25 sees English words against Spanish text, so it can match little beyond
  proper names and numbers; hence each query has a **names-masked twin**
  (``translated_masked``) in which every capitalised word that also occurs, accents
  ignored, in the Spanish verse is replaced by :data:`MASK`.
- **BM25-stratified English sources.** Every usable WEB rendering of a trained KJV verse is
  a candidate; BM25 over the training windows (built from the tokenizer, before training)
  ranks its KJV source. The strata are ``first`` (rank 1), ``top10`` (2-10),
  ``outside10`` (11-100) and ``outside100`` (> 100); the *hard* stratum is declared by
  :func:`declare_hard` from the counts alone.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

from influence.lm import Document

from .queries_v2 import _n_words, _tail, chapter_verses
from .query_set import QuerySpec

MASK = "X"
# Stratum -> (lowest, highest) BM25 rank of the source, inclusive.
STRATA = {"first": (1, 1), "top10": (2, 10), "outside10": (11, 100), "outside100": (101, 10 ** 9)}


def _fold(word: str) -> str:
    """Lower case without accents ("Jesús" -> "jesus")."""
    return "".join(c for c in unicodedata.normalize("NFKD", word.lower()) if not unicodedata.combining(c))


def shared_names(english: str, spanish: str) -> set[str]:
    """Capitalised words of ``english`` that occur in ``spanish`` too, accents and case
    ignored: the names a lexical matcher could use across the two languages."""
    es = {_fold(w) for w in re.findall(r"\w+", spanish)}
    return {w for w in re.findall(r"\b[A-Z]\w+", english) if _fold(w) in es}


def mask_names(text: str, names: set[str]) -> str:
    """``text`` with every whole-word occurrence of ``names`` replaced by :data:`MASK`."""
    if not names:
        return text
    return re.sub(r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b", MASK, text)


def _usable(verses_a, verses_b_by_label, web, prompt_words, max_words):
    """(label, previous label, a's verse, web's previous, web's verse) of each verse of a
    chapter (not its first) with a non-empty WEB rendering of it and of the previous one."""
    out = []
    for (prev_label, _), (label, text) in zip(verses_a, verses_a[1:]):
        w, w_prev = web.get(label, ""), web.get(prev_label, "")
        if not (w and w_prev and text) or (verses_b_by_label is not None and label not in verses_b_by_label):
            continue
        if _n_words(_tail(w_prev, prompt_words), w) > max_words:
            continue
        out.append((label, text, w_prev, w))
    return out


def translated_queries(spanish_docs: Sequence[Document], web: dict[str, str], n: int, *, seed: int = 0,
                       prompt_words: int = 10, max_words: int = 45) -> list[QuerySpec]:
    """``n`` WEB queries whose source is the Spanish training document of their verse
    (kind ``translated``), each with its names-masked twin (``translated_masked``, same
    number after the prefix ``trm-``), drawn without replacement.

    Raises:
      ValueError: fewer than ``n`` usable verses.
    """
    candidates = []
    for doc in spanish_docs:
        for label, es, w_prev, w in _usable(chapter_verses(doc), None, web, prompt_words, max_words):
            candidates.append((doc, label, es, w_prev, w))
    if len(candidates) < n:
        raise ValueError(f"only {len(candidates)} translated-only verses have a usable WEB rendering; asked for {n} "
                         "(add chapters to translated_only)")
    chosen = sorted(random.Random(f"translated:{seed}").sample(range(len(candidates)), n))
    out = []
    for i, j in enumerate(chosen):
        doc, label, es, w_prev, w = candidates[j]
        prompt = _tail(w_prev, prompt_words) + "\n"
        common = {"source_text": es, "source_doc": doc.doc_id, "verse": label, "title": doc.title, "genre": "es"}
        out.append(QuerySpec(f"tro-{i:03d}", "translated", prompt, w, **common))
        names = shared_names(prompt + w, es)
        out.append(QuerySpec(f"trm-{i:03d}", "translated_masked", mask_names(prompt, names), mask_names(w, names),
                             **common))
    return out


def english_candidates(kjv_docs: Sequence[Document], web: dict[str, str], *, prompt_words: int = 10,
                       max_words: int = 45) -> list[QuerySpec]:
    """Every usable WEB rendering of a trained KJV verse as a query (kind ``semantic``,
    ids ``cand-<doc>-<label>``), before stratification."""
    out = []
    for doc in kjv_docs:
        for label, kjv, w_prev, w in _usable(chapter_verses(doc), None, web, prompt_words, max_words):
            out.append(QuerySpec(f"cand-{label}", "semantic", _tail(w_prev, prompt_words) + "\n", w, source_text=kjv,
                                 source_doc=doc.doc_id, verse=label, title=doc.title, genre="en"))
    return out


def stratum_of(rank: int) -> str:
    """The BM25 stratum of a source rank (:data:`STRATA`)."""
    return next(name for name, (lo, hi) in STRATA.items() if lo <= rank <= hi)


def bm25_strata(candidates: Sequence[QuerySpec], table, bm25) -> dict[str, list[tuple[str, int]]]:
    """``{stratum: [(verse, BM25 rank of its KJV source)]}`` over the training windows
    (``table``: :class:`experiments.analysis.TrainingTable`, ``bm25`` over its texts);
    candidates whose source no window holds are left out."""
    from . import metrics as M

    out: dict[str, list[tuple[str, int]]] = {name: [] for name in STRATA}
    for spec in candidates:
        rows = table.rows_holding(spec.source_doc, spec.source_text)
        if not len(rows):
            continue
        rank = int(M.ranks_of(bm25.scores(spec.text), rows).min())
        out[stratum_of(rank)].append((spec.verse, rank))
    return out


def declare_hard(counts: dict[str, int], n_min: int = 100) -> tuple[list[str], str]:
    """The hard stratum, from the strata's counts only (before training): the issue's
    ``outside10`` (source outside BM25's top 10, strata ``outside10`` + ``outside100``)
    when it holds ``n_min`` queries; otherwise every verse BM25 does not rank first
    (``top10`` + ``outside10`` + ``outside100``), with the reason stated."""
    outside = counts.get("outside10", 0) + counts.get("outside100", 0)
    if outside >= n_min:
        return ["outside10", "outside100"], f"source outside BM25's top 10: n = {outside} >= {n_min}"
    not_first = outside + counts.get("top10", 0)
    return (["top10", "outside10", "outside100"],
            f"only {outside} sources fall outside BM25's top 10 on this corpus (< {n_min}); declared instead: "
            f"source not ranked first by BM25 (n = {not_first}), with the {outside} outside the top 10 reported "
            "as their own, smaller stratum")


def select_strata(strata: dict[str, list[tuple[str, int]]], per_stratum: int, seed: int = 0) -> dict[str, list[str]]:
    """Up to ``per_stratum`` verses of each stratum, drawn without replacement (all when fewer)."""
    rng = random.Random(f"strata:{seed}")
    out = {}
    for name, items in strata.items():
        verses = sorted(v for v, _ in items)
        out[name] = sorted(rng.sample(verses, min(per_stratum, len(verses))))
    return out


def ranks_summary(strata: dict[str, list[tuple[str, int]]]) -> dict[str, dict]:
    """Count and median BM25 rank of each stratum."""
    return {name: {"n": len(items), "median_rank": float(np.median([r for _, r in items])) if items else None}
            for name, items in strata.items()}
