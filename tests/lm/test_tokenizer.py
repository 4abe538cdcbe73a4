"""Tokenizers: lossless round trips, offsets for display, save/load, bad arguments."""

import pytest

from influence.lm import Tokenizer, token_display_spans, train_tokenizer
from tests.lm.helpers import bpe, docs

SAMPLES = ["Fair is foul, and foul is fair:\nHover through the fog and filthy air.",
           "  leading spaces, tabs\tand\n\nblank lines  ",
           "Non-ASCII — “quotes”, café, 日本語, emoji 🎭.", ""]


def test_bpe_round_trip_and_vocab_size():
    tok = bpe()
    assert tok.kind == "bpe" and tok.vocab_size == 512
    assert (tok.pad_id, tok.bos_id) == (0, 1)
    for text in [*SAMPLES, *(d.text for d in docs()[:5])]:
        assert tok.decode(tok.encode(text)) == text


def test_offsets_tile_the_text_for_display():
    tok = bpe()
    (ids, offsets), = tok.encode_with_offsets([SAMPLES[2]])
    assert len(ids) == len(offsets) and len(ids) > len(SAMPLES[2]) // 4
    spans = token_display_spans(offsets)
    assert "".join(SAMPLES[2][a:b] for a, b in spans) == SAMPLES[2]
    assert all(a <= b for a, b in spans)
    strings = tok.token_strings(tok.encode("Fair is foul"))
    assert "".join(strings) == "Fair is foul"
    assert tok.token_strings([tok.bos_id, tok.pad_id]) == ["<|doc|>", "<|pad|>"]


def test_save_and_load_give_the_same_tokenizer(tmp_path):
    tok = bpe()
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.fingerprint() == tok.fingerprint()
    assert again.encode(SAMPLES[0]) == tok.encode(SAMPLES[0])
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "nowhere")


def test_character_tokenizer(tmp_path):
    tok = train_tokenizer(["abc\n", "ab d"], "char")
    assert tok.kind == "char" and tok.vocab_size == 3 + 6  # specials + a b c d space newline
    ids = tok.encode("bad\ncab")
    assert len(ids) == 7 and tok.decode(ids) == "bad\ncab"
    (_, offsets), = tok.encode_with_offsets(["a b"])
    assert offsets == [(0, 1), (1, 2), (2, 3)]
    assert tok.decode([tok.bos_id, *tok.encode("z"), tok.pad_id]) == "<|unk|>"  # unseen characters
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).kind == "char"


def test_bad_tokenizer_arguments():
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer(["x"], "wordpiece")
    with pytest.raises(ValueError, match="vocab_size >= 258"):
        train_tokenizer(["x"], "bpe", vocab_size=100)
