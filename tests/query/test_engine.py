"""Text queries end to end on a tiny transformer: encoding, ranking, attribution, reports."""

import html.parser
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import influence as inf
from influence import tasks
from influence.query.engine import Query, QueryEngine, concentration, encode_queries, read_queries, write_json
from influence.query.report import write_html
from influence.testing import TinyLM, lm_sequences, seed_offset, train

ALPHABET = "abcdefghijklmnop"


class LetterTokenizer:
    """One token per letter a-p (ids 0-15); id 0 doubles as padding and 1 as document start."""

    pad_id, bos_id = 0, 1

    def encode(self, text):
        return [ALPHABET.index(c) for c in text]

    def token_strings(self, ids):
        return [ALPHABET[int(i)] for i in ids]


@pytest.fixture(scope="module")
def setup():
    offset = seed_offset()  # other initialisations and sequences: INFLUENCE_TEST_SEED
    rng = np.random.default_rng(3 + offset)
    data = lm_sequences(40, seed=offset)
    # Three sequences over tokens 2-15 (0 and 1 are padding and document start) stepping by
    # 3, 9 and 13 mod 14: their transitions differ by 3 or 5, 9 or 11, 13 or 15 (mod 16) where
    # every other sequence steps by 1 or 2, so each is the only source of its continuation,
    # whatever the seed.
    steps = np.array([3, 9, 13])[:, None]
    data["input_ids"][:3] = 2 + (rng.integers(0, 14, size=(3, 1)) + steps * np.arange(8)) % 14
    data["loss_mask"][:3] = 1
    data["loss_mask"][:3, 0] = 0
    data["text"] = np.array(["".join(ALPHABET[i] for i in row) for row in data["input_ids"]])
    model = TinyLM(rngs=nnx.Rngs(offset))

    def loss(m, d):
        ce = optax.softmax_cross_entropy_with_integer_labels(m(d["input_ids"])[:, :-1], d["input_ids"][:, 1:])
        return jnp.sum(ce * d["loss_mask"][:, 1:]) / d["loss_mask"][:, 1:].sum()

    train(model, loss, {k: v for k, v in data.items() if k != "text"}, 300)
    factors = inf.fit_factors(model, tasks.CausalLM(), data, strategy="ekfac", progress=False)
    return model, data, factors


def test_encoding_masks_the_prompt_and_refuses_bad_queries():
    tok = LetterTokenizer()
    batch = encode_queries([Query("abc", "de"), Query("", "f")], tok, context_length=8)
    np.testing.assert_array_equal(batch["input_ids"], [[0, 1, 2, 3, 4], [1, 5, 0, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 0, 1, 1], [0, 1, 0, 0, 0]])
    with pytest.raises(ValueError, match="completion is empty"):
        encode_queries([Query("abc", "")], tok, 8)
    with pytest.raises(ValueError, match="6 prompt \\+ 3 completion tokens exceed the model's context of 8"):
        encode_queries([Query("abcdef", "ghi", id="long")], tok, 8)
    with pytest.raises(ValueError, match="no queries"):
        encode_queries([], tok, 8)


def test_verbatim_training_sequence_ranks_first(setup):
    model, data, factors = setup
    engine = QueryEngine(model, LetterTokenizer(), data, factors, context_length=8, progress=False)
    queries = [Query(data["text"][i][:3], data["text"][i][3:], id=f"copy of {i}") for i in range(3)]
    results = engine.run(queries, k=5)
    assert [r.influences[0].row for r in results] == [0, 1, 2]
    for r in results:
        top = r.influences[0]
        assert top.score > 0 and top.text == data["text"][top.row]
        assert top.metadata == {}  # a dict data set with only token columns has no metadata
        np.testing.assert_allclose(sum(top.token_scores), top.score, rtol=1e-4)
        np.testing.assert_allclose(sum(top.layer_scores.values()), top.score, rtol=1e-4)
        assert top.token_scores[0] == 0.0  # the first token is never predicted
        assert r.loss > 0 and r.completion_tokens == 5


def test_low_rank_and_bm25_options(setup):
    model, data, factors = setup
    query = [Query(data["text"][2][:3], data["text"][2][3:])]
    # the full-rank engine ranks a verbatim sequence first: test_verbatim_training_sequence_ranks_first
    low = QueryEngine(model, LetterTokenizer(), data, factors, context_length=8, query_rank=2,
                      progress=False).run(query, k=3)
    assert low[0].influences[0].row == 2
    # BM25 on whole words: only the sequence with the exact same text shares the query's single "word"
    bm25 = QueryEngine(model, LetterTokenizer(), data, factors, context_length=8, bm25_candidates=1, progress=False)
    result = bm25.run(query, k=3)
    assert [i.row for i in result[0].influences] == [2]


def test_task_and_columns_are_parameters(setup):
    model, data, factors = setup
    renamed = {"ids": data["input_ids"], "mask": data["loss_mask"], "body": data["text"],
               "source": np.array([f"s{i}" for i in range(len(data["text"]))])}
    task = tasks.CausalLM(input_key="ids", mask_key="mask")
    query = [Query(data["text"][1][:3], data["text"][1][3:])]
    default = QueryEngine(model, LetterTokenizer(), data, factors, context_length=8, progress=False).run(query, k=3)
    engine = QueryEngine(model, LetterTokenizer(), renamed, factors, context_length=8, task=task,
                         text_column="body", progress=False)
    assert engine.array_columns == {"ids", "mask", "body", "token_starts", "token_ends"}
    result = engine.run(query, k=3)
    assert [i.row for i in result[0].influences] == [i.row for i in default[0].influences]
    np.testing.assert_allclose([i.score for i in result[0].influences], [i.score for i in default[0].influences],
                               rtol=1e-6)
    top = result[0].influences[0]
    assert top.metadata == {"source": "s1"} and top.text == data["text"][1]
    bm25 = QueryEngine(model, LetterTokenizer(), renamed, factors, context_length=8, task=task, text_column="body",
                       bm25_candidates=1, progress=False)
    assert [i.row for i in bm25.run(query, k=3)[0].influences] == [1]


def test_json_and_html_reports(setup, tmp_path):
    model, data, factors = setup
    engine = QueryEngine(model, LetterTokenizer(), data, factors, context_length=8, progress=False)
    queries = [Query(data["text"][i][:4], data["text"][i][4:]) for i in range(6)]
    results = engine.run(queries, k=4)
    path = write_json(results, tmp_path / "results.json", info={"strategy": "ekfac"})
    loaded = json.loads(path.read_text())
    assert len(loaded["results"]) == 6 and all(len(r["influences"]) == 4 for r in loaded["results"])
    assert loaded["results"][0]["influences"][0]["rank"] == 1

    page = write_html(results, tmp_path / "report.html", info={"run": "tiny"}).read_text()
    checker = _TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.stack == [] and checker.errors == []
    assert page.count('<details class="query"') == 6 and page.count('<div class="seq">') == 24
    assert page.count("<svg") == 24
    for r in results:  # every sequence's tokens are in the page with their scores on hover
        top = r.influences[0]
        assert f'title="{top.token_scores[-1]:+.3g}"' in page


def test_concentration_and_query_files(tmp_path):
    assert concentration(np.array([0, 0, 3.0])) == 1.0
    assert concentration(np.ones(4)) == pytest.approx(0.5)
    assert concentration(np.zeros(3)) == 0.0
    (tmp_path / "q.jsonl").write_text('{"prompt": "ab", "completion": "cd", "id": "x"}\n\n'
                                      '{"prompt": "a", "completion": "b"}\n')
    assert read_queries(tmp_path / "q.jsonl") == [Query("ab", "cd", "x"), Query("a", "b")]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ab"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: .*missing \\['completion'\\]"):
        read_queries(tmp_path / "bad.jsonl")


class _TagChecker(html.parser.HTMLParser):
    """Checks that every opened element is closed in order (void elements excepted)."""

    VOID = {"meta", "br", "img", "input", "link", "hr"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}>, open: {self.stack[-3:]}")
        else:
            self.stack.pop()


@pytest.mark.parametrize("line, message", [
    ('{"prompt": 123, "completion": "b"}', "'prompt' must be a string, got int 123"),
    ('{"prompt": "a", "completion": null}', "'completion' must be a string, got NoneType null"),
    ('{"prompt": "a", "completion": "b", "id": [1]}', "'id' must be a string or an integer, got list"),
    ('{"prompt": "a", "completion": "b", "id": true}', "'id' must be a string or an integer, got bool"),
    ('{"prompt": "a", "completion": "b", "completon": "c"}', "unknown key\\(s\\) \\['completon'\\]"),
    ('["a", "b"]', "a query is a JSON object .*got list"),
    ('{"prompt": "a", ', "not JSON"),
])
def test_query_files_are_read_strictly(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"prompt": "a", "completion": "b", "id": 7}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"q.jsonl:2: {message}"):
        read_queries(path)
    path.write_text('{"prompt": "a", "completion": "b", "id": 7}\n')
    assert read_queries(path) == [Query("a", "b", "7")]  # an integer id is the one conversion


def test_non_finite_model_is_refused_before_scoring(setup, monkeypatch):
    model, data, factors = setup
    broken = nnx.clone(model)
    graphdef, params, rest = nnx.split(broken, nnx.Param, ...)
    broken = nnx.merge(graphdef, jax.tree.map(lambda p: p * jnp.nan, params), rest)
    engine = QueryEngine(broken, LetterTokenizer(), data, factors, context_length=8, progress=False)
    import influence.query.engine as engine_module

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored a model whose loss is not finite")

    monkeypatch.setattr(engine_module, "rank_training", no_scoring)
    with pytest.raises(FloatingPointError, match="copy: the completion's loss is nan .*nothing was scored"):
        engine.run([Query(data["text"][0][:3], data["text"][0][3:], id="copy")], k=2)
