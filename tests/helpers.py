"""Helpers shared by the tests at this level (fixtures live in conftest.py)."""

import influence as inf
from influence import tasks


def fit_quietly(model, data, task=None, **options):
    """:func:`influence.fit_factors` without a progress bar, for a classifier unless
    ``task`` is given."""
    options.setdefault("progress", False)
    return inf.fit_factors(model, task or tasks.Classification(), data, **options)


# Eight short English proverbs: a corpus for tiny tokenizers and checkpoints written by tests.
PROVERBS = ["the cat sat on the mat and looked at the dog.", "a stitch in time saves nine, said the tailor.",
            "to be or not to be, that is the question.", "the rain in spain stays mainly in the plain.",
            "all that glitters is not gold, all who wander are not lost.", "a penny saved is a penny earned.",
            "early to bed and early to rise makes a man healthy.", "the quick brown fox jumps over the lazy dog."]


def byte_level_bpe(texts, vocab_size: int = 120):
    """A GPT-2-style byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``, with
    ``<|endoftext|>`` as its one special token (id 0), for checkpoints the tests write."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(vocab_size=vocab_size,
                                                                  special_tokens=["<|endoftext|>"],
                                                                  show_progress=False))
    return tok
