"""A pretrained model's own tokenizer (its ``tokenizer.json``, read with ``tokenizers``),
with the interface the query engine and the corpus reader use: ``encode``,
``encode_with_offsets``, ``decode``, ``token_strings``, ``pad_id``, ``bos_id``."""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Sequence

from influence.errors import CheckpointError

FILENAME = "tokenizer.json"


class PretrainedTokenizer:
    """``tokenizers.Tokenizer`` of a checkpoint folder.

    ``bos_id`` starts every document (and an empty prompt): the config's
    ``bos_token_id``, else its ``eos_token_id`` (GPT-2 and Pythia use ``<|endoftext|>``
    for both). ``pad_id`` fills short sequences, which the loss masks out: ``pad_token_id``,
    else ``eos_token_id``, else 0.
    """

    def __init__(self, hf, bos_id: int | None, eos_id: int | None, pad_id: int | None):
        self.hf = hf
        self.bos_id = bos_id if bos_id is not None else (eos_id if eos_id is not None else 0)
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)

    @classmethod
    def load(cls, folder: str | pathlib.Path, config: dict | None = None) -> PretrainedTokenizer:
        """From ``folder/tokenizer.json``; special ids from ``config`` (config.json's dict),
        else from ``tokenizer_config.json``'s token strings.

        Raises:
          CheckpointError: no or an unreadable ``tokenizer.json``.
        """
        import tokenizers

        folder = pathlib.Path(folder)
        path = folder / FILENAME
        if not path.is_file():
            raise CheckpointError(f"{folder} has no {FILENAME}; save it with the model "
                                  "(tokenizer.save_pretrained(folder) in transformers)")
        try:
            hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{path} is not a readable tokenizer ({e})") from None
        config = dict(config or {})
        extra = folder / "tokenizer_config.json"
        names = json.loads(extra.read_text()) if extra.is_file() else {}

        def special(key: str) -> int | None:
            value = config.get(f"{key}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
            token = names.get(f"{key}_token")
            if isinstance(token, dict):
                token = token.get("content")
            return None if token is None else hf.token_to_id(token)

        return cls(hf, special("bos"), special("eos"), special("pad"))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def fingerprint(self) -> str:
        """16 hex digits of the serialised tokenizer and its special ids."""
        text = self.hf.to_str() + f"|{self.bos_id}|{self.eos_id}|{self.pad_id}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """For each text, its token ids and each token's ``(char_start, char_end)`` in it."""
        encs = self.hf.encode_batch(list(texts), add_special_tokens=False)
        return [(e.ids, e.offsets) for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=True)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Display string of each token (specials by name)."""
        specials = {self.pad_id, self.bos_id, self.eos_id}
        return [self.hf.id_to_token(int(i)) if int(i) in specials
                else self.hf.decode([int(i)], skip_special_tokens=False) for i in ids]
