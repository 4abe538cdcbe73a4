"""What the commands print cannot control the terminal: text from the data is escaped."""

from influence.cli import main
from influence.cli.common import terminal_text
from influence.cli.query import print_results
from influence.query.engine import Query, QueryResult, TrainingInfluence

ESC = "\x1b"


def test_terminal_text_escapes_controls_and_bidi_overrides():
    assert terminal_text("a\x1b[2Jb\x07c\u202ed\x85e") == "a\\x1b[2Jb\\x07c\\u202ed\\x85e"
    assert terminal_text("line\nnext", keep_newlines=True) == "line\nnext"
    assert terminal_text("line\nnext") == "line\\x0anext"
    assert terminal_text("Größe — ok") == "Größe — ok"


def test_results_table_escapes_data_text(capsys):
    influence = TrainingInfluence(rank=1, row=3, score=0.25, tokens=["To be\x1b]0;pwned\x07", " or\r not"],
                                  token_scores=[0.0, 0.25], layer_scores={"fc": 0.25},
                                  metadata={"title": "Hamlet\x1b[2J", "section": "Act \u202e1"}, concentration=0.5)
    query = Query("HAMLET:\x1b[31m", "To be", id="q\x1b[1m")
    print_results([QueryResult(query, 1.0, 2, [influence])])
    out = capsys.readouterr().out
    assert ESC not in out and "\r" not in out and "\u202e" not in out and "\x07" not in out
    assert "Hamlet\\x1b[2J, Act \\u202e1" in out and "To be\\x1b]0;pwned\\x07 or\\x0d not" in out
    assert "== q\\x1b[1m:" in out


def test_error_messages_are_escaped_too(tmp_path, capsys):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"prompt": "a", "completion": "b", "\\u001b[2J": 1}\n')
    assert main(["query", "--run", str(tmp_path), "--queries", str(queries)]) == 2
    err = capsys.readouterr().err
    assert ESC not in err and "unknown key(s) ['\\x1b[2J']" in err
