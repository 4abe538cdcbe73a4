"""Corpora that cannot be trained on are refused with a DataError naming the file (empty,
whitespace only, not UTF-8, invalid JSON, too small), and `influence train` then leaves
no run folder behind."""

import pytest

from influence.cli import main
from influence.errors import DataError
from influence.lm.corpus import file_documents, load_corpus


def test_empty_and_whitespace_only_files_are_refused_naming_them(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.md").write_text(" \n\t\n")
    for name in ("empty.txt", "blank.md"):
        with pytest.raises(DataError, match=f"{tmp_path / name} is empty or whitespace only"):
            file_documents([tmp_path / name])
    with pytest.raises(DataError, match="empty.txt are empty"):
        load_corpus(str(tmp_path))
    records = tmp_path / "records.jsonl"
    records.write_text('{"text": "  "}\n\n{"text": ""}\n')
    with pytest.raises(DataError, match="records.jsonl is empty or whitespace only"):
        file_documents([records])


def test_an_empty_file_beside_others_is_left_out_with_a_warning(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "play.txt").write_text("To be, or not to be.")
    with pytest.warns(UserWarning, match=r"left out 1 corpus file\(s\) without text: .*empty.txt"):
        docs = file_documents([tmp_path])
    assert [d.doc_id for d in docs] == ["play.txt"]


def test_non_utf8_is_refused_naming_the_file_and_the_byte_offset(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf" + "é au lait".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{latin} is not UTF-8 text: byte 0xe9 at offset 3"):
        file_documents([latin])
    records = tmp_path / "r.jsonl"
    records.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match="r.jsonl is not UTF-8 text: byte 0xff at offset 25"):
        file_documents([records])


def test_invalid_json_is_refused_naming_the_file_and_line(tmp_path):
    lines = tmp_path / "r.jsonl"
    lines.write_text('{"text": "one"}\n\n{"text": "two"\n')
    with pytest.raises(DataError, match=r"r.jsonl: invalid JSON at line 3"):
        file_documents([lines])
    whole = tmp_path / "r.json"
    whole.write_text('[{"text": "one"},\n {"text": "two"]')
    with pytest.raises(DataError, match=r"r.json: invalid JSON at line 2"):
        file_documents([whole])
    scalars = tmp_path / "s.json"
    scalars.write_text('["just a string"]')
    with pytest.raises(DataError, match="s.json: records must be JSON objects"):
        file_documents([scalars])


@pytest.mark.parametrize(("content", "message"), [
    ("", "empty.txt is empty or whitespace only"),
    ("hello there\n", "is too small: it gives 0 training sequences"),
    (b"caf\xe9", "is not UTF-8 text: byte 0xe9 at offset 3"),
])
def test_train_refuses_and_leaves_no_run_folder(tmp_path, capsys, content, message):
    corpus = tmp_path / "empty.txt"
    (corpus.write_bytes if isinstance(content, bytes) else corpus.write_text)(content)
    out = tmp_path / "run"
    assert main(["train", "--scale", "tiny", "--out", str(out), "--corpus", str(corpus), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("influence train: error: ") and message in err and "Traceback" not in err
    assert not out.exists()
