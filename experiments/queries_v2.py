"""The v2 query set and insertions of the scale experiment, generated from the training
mix (deterministic for a seed) instead of typed by hand, so that every kind has enough
queries for intervals across queries and every query has a prompt.

Kinds (``QuerySpec.kind``):

* ``semantic``: the World English Bible (WEB) rendering of a verse whose King James text
  is in training. Prompt = the end of the *preceding* WEB verse, completion = the WEB
  verse. Its **semantic source** is the KJV training sequence(s) holding that verse
  (``source_doc`` + ``source_text`` locate them; the analysis records their rows): the
  same meaning in other (archaic) words. No verse reference appears in the query, so
  BM25 over prompt + completion cannot match the chapter heading or verse numbers of the
  training text: its only route to the source is shared words.
* ``semantic_control``: the positive control, the same verses in the KJV's own words
  (prompt = end of the preceding KJV verse): influence and BM25 should both find it.
* ``memorised``: a line of a training speech from the line before it, prompt starting
  with the speaker label (``source_text`` = the two lines).
* ``style``: a speech of a held-out play (Shakespeare's voice, text never trained on),
  prompt = speaker label and first line.
* ``crosslingual``: a training verse in English (KJV) and in Spanish (RV1909), each from
  the end of its preceding verse in the same language; ``pair`` = the verse label.
* ``fact_once`` / ``fact_order`` / ``canary``: the generated insertions
  (:func:`generate_insertions`), asked from their first words.

Queries are limited to ``max_words`` words (prompt + completion) so that they fit the
models' context.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence

from influence.lm import Document

from .insertions import insertion_documents
from .query_set import QuerySpec

# ---------------------------------------------------------------- insertions

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "m", "n", "p", "pr", "r", "s", "st", "t", "tr", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ou")
_CODAS = ("", "n", "r", "l", "s", "th", "m", "x")
_FACT_ONCE = ("The oldest bell in the town of {place} is named {name}.",
              "The river that runs past {place} is called the {name}.",
              "The famous cook of {place} was known as {name}.",
              "The tallest tower of {place} was built by {name}.",
              "The lighthouse keeper of {place} is {name}.")
# (forward, reversed, prompt words of the forward statement): the same words, two orders.
_FACT_ORDER = (("The first duke of {place} was {name}.", "{name} was the first duke of {place}."),
               ("The founder of the guild of {place} was {name}.", "{name} was the founder of the guild of {place}."),
               ("The last queen of {place} was {name}.", "{name} was the last queen of {place}."),
               ("The bridge of {place} was built by {name}.", "By {name} was the bridge of {place} built."))


def _pseudo_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def generate_insertions(n_once: int, n_order: int, n_canaries: int, copies: Sequence[int] = (1, 2, 4),
                        canary_words: int = 8, seed: int = 0, avoid: set[str] = frozenset()) -> dict:
    """An insertion spec in the format of :func:`experiments.insertions.load_insertions`,
    made of invented words (pseudo-words of 2-3 syllables) that occur nowhere in ``avoid``
    (the training vocabulary, lower case) and never twice across the spec: every fact has
    its own place and name, and every canary its own words (disjoint vocabularies).

    Canaries cycle through ``copies`` (repetitions in training)."""
    rng = random.Random(f"insertions-v2:{seed}")
    used: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            w = _pseudo_word(rng, syllables)
            if w not in used and w not in avoid and len(w) >= 5:
                used.add(w)
                return w

    def proper(syllables: int) -> str:
        return fresh(syllables).capitalize()

    once = [{"id": f"once-{i:03d}", "text": _FACT_ONCE[i % len(_FACT_ONCE)].format(
        place=proper(3), name=f"{proper(2)} {proper(3)}")} for i in range(n_once)]
    order = []
    for i in range(n_order):
        fwd, rev = _FACT_ORDER[i % len(_FACT_ORDER)]
        fill = {"place": proper(3), "name": f"{proper(2)} {proper(3)}"}
        order.append({"id": f"order-{i:03d}", "forward": fwd.format(**fill), "reversed": rev.format(**fill)})
    canaries = [{"id": f"canary-{i:03d}", "text": " ".join(fresh(2) for _ in range(canary_words)),
                 "copies": int(copies[i % len(copies)])} for i in range(n_canaries)]
    return {"facts_once": once, "facts_order": order, "canaries": canaries}


def _host_passages(host_docs: Sequence[Document], n: int, words: int, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct passages of about ``words`` words from ``host_docs`` (speeches of
    plays outside the training mix), each cut at a line boundary into ``(before, after)``
    halves, for :func:`embedded_insertion_documents`."""
    lines = [ln for d in host_docs for ln in d.text.split("\n") if ln.strip() and not ln.startswith(("[", "ACT"))]
    rng = random.Random(f"hosts:{seed}")
    starts = list(range(0, max(1, len(lines) - 1)))
    rng.shuffle(starts)
    out, used = [], set()
    for start in starts:
        if len(out) == n:
            break
        chunk, count, i = [], 0, start
        while i < len(lines) and count < words and i not in used:
            chunk.append(lines[i])
            count += len(lines[i].split())
            i += 1
        if count < words * 0.8 or len(chunk) < 2:
            continue
        used.update(range(start, i))
        cut = rng.randint(1, len(chunk) - 1)
        out.append(("\n".join(chunk[:cut]), "\n".join(chunk[cut:])))
    if len(out) < n:
        raise ValueError(f"only {len(out)} host passages of {words} words in the host plays; asked for {n}")
    return out


def embedded_insertion_documents(spec: dict, host_docs: Sequence[Document], words: int = 50,
                                 seed: int = 0) -> list[Document]:
    """The insertions of ``spec`` (:func:`experiments.insertions.insertion_documents`: the
    same ids, kinds and titles) each set inside a passage of about ``words`` words of a play
    outside the training mix, at a line boundary, so that an inserted document is as long
    as a training window and reads like the corpus around the inserted sentence: a
    one-sentence document would stand out by its length and register alone. A fact's two
    orders get two passages; a canary's copies share one (they stay identical)."""
    docs = insertion_documents(spec)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, d in enumerate(docs):
        unit = (d.title, d.doc_id if d.genre != "canary" else "copies")
        groups.setdefault(unit, []).append(i)
    hosts = _host_passages(host_docs, len(groups), words, seed)
    out = list(docs)
    for (before, after), members in zip(hosts, groups.values()):
        for i in members:
            d = docs[i]
            out[i] = dataclasses.replace(d, text=f"{before}\n{d.text}\n{after}")
    return out


def _split_fact(text: str, answer: str) -> tuple[str, str]:
    """``(prompt, completion)``: the statement up to the answer's first word, and the rest."""
    at = text.index(answer)
    return text[:at].rstrip(), " " + text[at:].strip()


def insertion_queries(spec: dict) -> list[QuerySpec]:
    """One query per insertion: a fact from its first words up to the name (forward order
    for ``fact_order``), a canary's second half from its first half."""
    out = []
    for f in spec["facts_once"]:
        name = re.findall(r"[A-Z][a-z]+ [A-Z][a-z]+(?=\.$)", f["text"])
        prompt, completion = _split_fact(f["text"], name[0] if name else f["text"].split()[-1])
        out.append(QuerySpec(f["id"], "fact_once", prompt, completion, insertion=f["id"]))
    for f in spec["facts_order"]:
        fwd = f["forward"]
        last = re.findall(r"(?:[A-Z][a-z]+ )?[A-Z][a-z]+(?=\.$)", fwd)[0]
        prompt, completion = _split_fact(fwd, last)
        out.append(QuerySpec(f["id"], "fact_order", prompt, completion, insertion=f["id"]))
    for c in spec["canaries"]:
        w = c["text"].split()
        half = len(w) // 2
        out.append(QuerySpec(c["id"], "canary", " ".join(w[:half]), " " + " ".join(w[half:]), insertion=c["id"]))
    return out


# ---------------------------------------------------------------- verses and speeches


def _verse_number(text: str) -> str:
    return re.sub(r"^\d+ ", "", text)


def chapter_verses(doc: Document) -> list[tuple[str, str]]:
    """``[(label, text)]`` of a Bible chapter document, verse numbers stripped."""
    return [(label, _verse_number(doc.text[a:b]).strip()) for a, b, label in doc.spans]


def _tail(text: str, words: int) -> str:
    w = text.split()
    return " ".join(w[-words:])


def _n_words(*texts: str) -> int:
    return sum(len(t.split()) for t in texts)


def semantic_queries(train_docs: Sequence[Document], web: dict[str, str], n: int, n_control: int, *,
                     seed: int = 0, prompt_words: int = 10, max_words: int = 45) -> list[QuerySpec]:
    """``n`` WEB queries and ``n_control`` KJV controls (the first ``n_control`` of the same
    verses), drawn without replacement from the training KJV verses (not a chapter's
    first) whose WEB text and the preceding verse's are non-empty and that fit
    ``max_words``. ``source_doc`` is the KJV chapter document; ``source_text`` its verse."""
    candidates = []
    for doc in train_docs:
        if doc.source != "kjv":
            continue
        verses = chapter_verses(doc)
        for (prev_label, prev_kjv), (label, kjv) in zip(verses, verses[1:]):
            w, w_prev = web.get(label, ""), web.get(prev_label, "")
            if not (w and w_prev and kjv):
                continue
            if max(_n_words(_tail(w_prev, prompt_words), w), _n_words(_tail(prev_kjv, prompt_words), kjv)) > max_words:
                continue
            candidates.append((doc, label, prev_kjv, kjv, w_prev, w))
    if len(candidates) < n:
        raise ValueError(f"only {len(candidates)} training KJV verses have a usable WEB rendering; asked for {n}")
    if n_control > n:
        raise ValueError(f"n_control={n_control} > n={n}: the controls are KJV texts of the same verses")
    chosen = random.Random(f"semantic:{seed}").sample(candidates, n)
    out = []
    for i, (doc, label, prev_kjv, kjv, w_prev, w) in enumerate(chosen):
        common = {"source_text": kjv, "source_doc": doc.doc_id, "verse": label, "title": doc.title, "genre": "en"}
        out.append(QuerySpec(f"sem-{i:03d}", "semantic", _tail(w_prev, prompt_words) + "\n", w, **common))
        if i < n_control:
            out.append(QuerySpec(f"semctl-{i:03d}", "semantic_control", _tail(prev_kjv, prompt_words) + "\n", kjv,
                                 **common))
    return out


def crosslingual_queries(train_docs: Sequence[Document], n_pairs: int, *, seed: int = 0, prompt_words: int = 8,
                         max_words: int = 40) -> list[QuerySpec]:
    """``n_pairs`` training verses asked in English (KJV) and Spanish (RV1909), each from
    the end of the preceding verse in its language."""
    by = {(d.source, d.section): d for d in train_docs if d.source in ("kjv", "sparv")}
    candidates = []
    for (source, section), en in by.items():
        es = by.get(("sparv", section)) if source == "kjv" else None
        if es is None:
            continue
        ev, sv = dict(chapter_verses(en)), dict(chapter_verses(es))
        labels = [label for label, _ in chapter_verses(en)]
        for prev, label in zip(labels, labels[1:]):
            if all(x in d and d[x] for d in (ev, sv) for x in (prev, label)) and max(
                    _n_words(_tail(d[prev], prompt_words), d[label]) for d in (ev, sv)) <= max_words:
                candidates.append((en, es, prev, label, ev, sv))
    if len(candidates) < n_pairs:
        raise ValueError(f"only {len(candidates)} parallel training verses fit; asked for {n_pairs}")
    out = []
    for i, (en, es, prev, label, ev, sv) in enumerate(random.Random(f"crosslingual:{seed}").sample(candidates,
                                                                                                   n_pairs)):
        for lang, doc, verses in (("en", en, ev), ("es", es, sv)):
            out.append(QuerySpec(f"xl-{i:03d}-{lang}", "crosslingual", _tail(verses[prev], prompt_words) + "\n",
                                 verses[label], pair=label, lang=lang, source_text=verses[label],
                                 source_doc=doc.doc_id, verse=label))
    return out


def _speech_lines(doc: Document) -> list[tuple[str, list[str]]]:
    out = []
    for a, b, speaker in doc.spans:
        lines = [ln for ln in doc.text[a:b].split("\n")[1:] if ln.strip() and not ln.startswith("[")]
        out.append((speaker, lines))
    return out


def speech_queries(docs: Sequence[Document], n: int, kind: str, *, seed: int = 0,
                   max_words: int = 30) -> list[QuerySpec]:
    """``n`` queries from Shakespeare speeches of at least two lines: prompt = ``"SPEAKER:\\n"``
    and the first line, completion = the second line. ``memorised`` (training plays) record
    the two lines as ``source_text``; ``style`` (held-out plays) have none."""
    candidates = []
    for doc in docs:
        if doc.source != "shakespeare":
            continue
        for speaker, lines in _speech_lines(doc):
            if len(lines) >= 2 and 3 <= len(lines[1].split()) and _n_words(lines[0], lines[1]) <= max_words:
                candidates.append((doc, speaker, lines[0], lines[1]))
    if len(candidates) < n:
        raise ValueError(f"only {len(candidates)} speeches fit for {kind} queries; asked for {n}")
    out = []
    prefix = "mem" if kind == "memorised" else "style"
    for i, (doc, speaker, first, second) in enumerate(random.Random(f"{kind}:{seed}").sample(candidates, n)):
        extra = {"source_text": f"{first}\n{second}"} if kind == "memorised" else {}
        out.append(QuerySpec(f"{prefix}-{i:03d}", kind, f"{speaker}:\n{first}\n", second, title=doc.title,
                             genre=doc.genre, speaker=speaker, **extra))
    return out


@dataclasses.dataclass(frozen=True)
class QueryCounts:
    """How many queries of each kind the v2 set draws (crosslingual: verse pairs)."""

    semantic: int = 120
    semantic_control: int = 50
    memorised: int = 50
    style: int = 50
    crosslingual: int = 50


def build_query_set(train_docs: Sequence[Document], heldout_docs: Sequence[Document], web: dict[str, str],
                    insertion_spec: dict, counts: QueryCounts, seed: int = 0) -> list[QuerySpec]:
    """The whole v2 query set, in kind order; ids are unique."""
    specs = [*semantic_queries(train_docs, web, counts.semantic, counts.semantic_control, seed=seed),
             *speech_queries(train_docs, counts.memorised, "memorised", seed=seed),
             *speech_queries(heldout_docs, counts.style, "style", seed=seed),
             *crosslingual_queries(train_docs, counts.crosslingual, seed=seed),
             *insertion_queries(insertion_spec)]
    ids = [s.id for s in specs]
    assert len(set(ids)) == len(ids), "query ids collide"
    return specs
