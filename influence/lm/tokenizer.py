"""Tokenizers trained offline with the ``tokenizers`` library: byte-level BPE (default) or
one token per character. Both are lossless on the text they can represent and report each
token's character offsets, so a report can shade every token of a sequence.

Special tokens: ``<|pad|>`` (id 0, fills short sequences) and ``<|doc|>`` (id 1, starts
every document so its first real token is predicted too). The character tokenizer has also
``<|unk|>`` (id 2) for characters unseen in training; byte-level BPE needs none.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from influence.errors import ConfigError, MissingFileError, MissingPackageError

if TYPE_CHECKING:
    import tokenizers

PAD, BOS, UNK = "<|pad|>", "<|doc|>", "<|unk|>"
FILENAME = "tokenizer.json"


def _tokenizers():
    """The ``tokenizers`` module, imported on first use: it comes with the ``lm`` extra, so
    ``import influence.lm`` works on a core install and only tokenizing needs it."""
    try:
        import tokenizers
    except ModuleNotFoundError as e:
        raise MissingPackageError("influence.lm's tokenizers need the package tokenizers: "
                                  "pip install 'jax-influence[lm]'", name=e.name) from e
    return tokenizers


class Tokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` with the project's conventions."""

    def __init__(self, hf: tokenizers.Tokenizer):
        self.hf = hf
        self.pad_id = hf.token_to_id(PAD)
        self.bos_id = hf.token_to_id(BOS)
        if self.pad_id is None or self.bos_id is None:
            raise ConfigError(f"tokenizer lacks the special tokens {PAD} and {BOS}")

    # ---------------------------------------------------------------- training
    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
        """Byte-level BPE with ``vocab_size`` entries (256 bytes + 2 specials + merges)."""
        if vocab_size < 258:
            raise ConfigError(f"byte-level BPE needs vocab_size >= 258 (256 bytes + 2 specials), got {vocab_size}")
        tk = _tokenizers()
        hf = tk.Tokenizer(tk.models.BPE())
        # add_prefix_space=False and no normaliser keep decode(encode(text)) == text.
        hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS], show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def train_chars(cls, texts: Iterable[str]) -> Tokenizer:
        """One token per character seen in ``texts`` (sorted), after the three specials."""
        chars = sorted(set().union(*map(set, texts)))
        vocab = {tok: i for i, tok in enumerate([PAD, BOS, UNK, *chars])}
        tk = _tokenizers()
        hf = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token=UNK))
        hf.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = tk.decoders.Fuse()  # concatenate, no spaces between "words"
        hf.add_special_tokens([PAD, BOS])  # dropped by decode; <|unk|> stays visible
        return cls(hf)

    # ---------------------------------------------------------------- properties
    @property
    def kind(self) -> str:
        """``"bpe"`` or ``"char"``."""
        return "char" if isinstance(self.hf.model, _tokenizers().models.WordLevel) else "bpe"

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def fingerprint(self) -> str:
        """Short hash of the serialised tokenizer (used to key cached datasets)."""
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """For each text, its token ids and each token's ``(char_start, char_end)`` in the
        text. Byte-level tokens holding part of one multi-byte character all report that
        character's offsets."""
        encs = self.hf.encode_batch(list(texts), add_special_tokens=False)
        return [(e.ids, e.offsets) for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens (padding, document start) are dropped."""
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=True)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Display string of each token on its own (specials by name; a byte-level token
        holding part of a multi-byte character shows as U+FFFD; prefer offsets for text)."""
        return [self.hf.id_to_token(int(i)) if int(i) in (self.pad_id, self.bos_id)
                else self.hf.decode([int(i)], skip_special_tokens=False) for i in ids]

    # ---------------------------------------------------------------- files
    def save(self, directory: str | pathlib.Path) -> pathlib.Path:
        """Write ``tokenizer.json`` into ``directory``; returns its path."""
        path = pathlib.Path(directory) / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path))
        return path

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Tokenizer:
        """From a ``tokenizer.json`` file or a directory holding one."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.exists():
            raise MissingFileError(f"no tokenizer at {path}")
        return cls(_tokenizers().Tokenizer.from_file(str(path)))


def train_tokenizer(texts: Iterable[str], kind: str = "bpe", vocab_size: int = 4096) -> Tokenizer:
    """Train a tokenizer of ``kind`` ``"bpe"`` (byte-level, ``vocab_size`` entries) or
    ``"char"`` (vocabulary = characters of ``texts``)."""
    if kind == "bpe":
        return Tokenizer.train_bpe(texts, vocab_size)
    if kind == "char":
        return Tokenizer.train_chars(texts)
    raise ConfigError(f"unknown tokenizer kind {kind!r}; choose 'bpe' or 'char'")


def token_display_spans(offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Non-overlapping character spans, one per token, that tile the covered text.

    Byte-level BPE may give several tokens the same offsets (pieces of one multi-byte
    character); the first keeps the character and the rest get an empty span, so shading
    spans side by side reproduces the text exactly once.
    """
    out, end = [], 0
    for a, b in offsets:
        a = max(a, end) if b > a else a
        out.append((min(a, b), b))
        end = max(end, b)
    return out
