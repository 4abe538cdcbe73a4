"""Corpora: Shakespeare parsing, local files and datasets, Debian corpora and their refusals."""

import json
import shutil

import pytest
from datasets import Dataset

from influence.lm import corpus
from influence.lm.corpus import (
    MissingCorpusError,
    bible_documents,
    dataset_documents,
    file_documents,
    fortune_documents,
    load_corpus,
    parse_play,
    shakespeare_documents,
)
from tests.lm.helpers import docs

PLAY = """# A Test Play

## ACT I

### SCENE I. A heath.

_Thunder. Enter two Witches_

**First Witch**\x20\x20
When shall we meet\\--again?\x20\x20
In rain?

**Second Witch**\x20\x20
__\\[Aside]_\x20\x20
Anon.

_Exeunt_

## ACT II

_Enter Chorus_

### PROLOGUE

**Chorus**\x20\x20
Now all is done.
"""


def test_parse_play_structure_speakers_and_directions():
    scenes = parse_play(PLAY, "test-play", "tragedies")
    assert [d.section for d in scenes] == ["ACT I. SCENE I. A heath.", "ACT II. PROLOGUE"]
    first = scenes[0]
    assert first.title == "A Test Play" and first.genre == "tragedies" and first.doc_id == "test-play/000"
    assert first.text == ("ACT I. SCENE I. A heath.\n\n[Thunder. Enter two Witches]\n\n"
                          "First Witch:\nWhen shall we meet--again?\nIn rain?\n\n"
                          "Second Witch:\n[Aside]\nAnon.\n\n[Exeunt]")
    assert [(first.text[a:b].split(":")[0], lab) for a, b, lab in first.spans] == [
        ("First Witch", "First Witch"), ("Second Witch", "Second Witch")]
    # An act's opening stage direction stays with the prologue that follows it.
    assert scenes[1].text.startswith("ACT II\n\n[Enter Chorus]\n\nPROLOGUE\n\nChorus:\nNow all is done.")


def test_parse_play_without_title_line_uses_file_name():
    scenes = parse_play("## ACT I\n\n### SCENE I. Vienna.\n\n**DUKE**  \nEscalus.\n", "measure-for-measure", "problems")
    assert scenes[0].title == "Measure for Measure" and scenes[0].section == "ACT I. SCENE I. Vienna."


def test_shakespeare_corpus_is_complete_and_consistent():
    all_docs = shakespeare_documents()
    assert len({d.title for d in all_docs}) == 38
    assert {d.genre for d in all_docs} == {"comedies", "histories", "problems", "roman", "romances", "tragedies"}
    assert len({d.doc_id for d in all_docs}) == len(all_docs)
    assert sum(len(d.text) for d in all_docs) > 4_500_000
    for d in all_docs:
        assert "**" not in d.text and "\\[" not in d.text
        for a, b, label in d.spans:
            assert d.text[a:b].startswith(label + ":\n")
    macbeth = [d for d in docs() if d.title == "Macbeth"]
    assert macbeth[0].section == "ACT I. SCENE I. A desert place."
    assert "Fair is foul, and foul is fair" in macbeth[0].text


def test_unknown_play_is_refused():
    with pytest.raises(ValueError, match="unknown play"):
        shakespeare_documents(plays=["hamlet-the-sequel"])


def test_local_text_and_json_files(tmp_path):
    (tmp_path / "a.txt").write_text("Plain text.\nTwo lines.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "first", "title": "T1"}) + "\n"
                                      + json.dumps({"text": "second", "genre": "g"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"body": "x"}]))
    found = file_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    assert [(d.doc_id, d.text, d.title, d.genre) for d in found] == [
        ("a.txt", "Plain text.\nTwo lines.", "a", ""), ("b.jsonl/0", "first", "T1", ""),
        ("b.jsonl/1", "second", "", "g")]
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "a.txt").write_text("Top.")
    (tmp_path / "tree" / "sub" / "a.txt").write_text("Same name, other folder.")
    assert [d.doc_id for d in file_documents([tmp_path / "tree"])] == ["a.txt", "sub/a.txt"]
    assert len(load_corpus(str(tmp_path / "a.txt"))) == 1
    with pytest.raises(ValueError, match="no 'text' field"):
        file_documents([tmp_path])  # c.json has no text field
    assert file_documents([tmp_path / "c.json"], text_key="body")[0].text == "x"
    with pytest.raises(FileNotFoundError):
        file_documents([tmp_path / "missing.txt"])


def test_existing_dataset_as_corpus():
    ds = Dataset.from_dict({"text": ["one", "two"], "title": ["A", "B"], "id": ["x", "y"]})
    found = dataset_documents(ds)
    assert [(d.doc_id, d.text, d.title) for d in found] == [("x", "one", "A"), ("y", "two", "B")]
    with pytest.raises(ValueError, match="no column 'body'"):
        dataset_documents(ds, text_column="body")


def test_unknown_corpus_name_is_refused():
    with pytest.raises(ValueError, match="unknown corpus 'poetry'"):
        load_corpus("poetry")


def test_missing_debian_corpora_name_the_apt_line(tmp_path, monkeypatch):
    with pytest.raises(MissingCorpusError, match="apt-get install fortunes$"):
        fortune_documents(tmp_path / "none")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(MissingCorpusError, match="apt-get install diatheke sword-text-kjv sword-text-sparv$"):
        bible_documents()


# The two tests below need Debian packages listed in .ci/apt-packages.txt (CI installs
# them); without them they fail with the apt-get line to run, never skip.

def test_fortunes_corpus():
    found = fortune_documents()
    assert len(found) > 10_000 and len({d.genre for d in found}) >= 40
    assert all(d.text.strip() and "\x08" not in d.text for d in found)
    assert corpus.CORPORA["fortunes"] is fortune_documents


def test_parallel_bible_shares_verse_labels():
    found = bible_documents(["en", "es"])
    en = {d.section: d for d in found if d.genre == "en"}
    es = {d.section: d for d in found if d.genre == "es"}
    assert len(en) == len(es) == 1189  # chapters
    gen_en, gen_es = en["Genesis 1"], es["Genesis 1"]
    assert [s[2] for s in gen_en.spans] == [s[2] for s in gen_es.spans]
    a, b, label = gen_en.spans[0]
    assert label == "Genesis 1:1" and gen_en.text[a:b] == "1 In the beginning God created the heaven and the earth."
    a, b, _ = gen_es.spans[0]
    assert gen_es.text[a:b].startswith("1 EN el principio") and "<" not in gen_es.text
