"""Small shared inputs for the tests of influence.lm, built once per test session."""

from __future__ import annotations

import functools

from influence.lm import TrainConfig, shakespeare_documents, train_tokenizer

PLAYS = ("macbeth", "the-tempest")


@functools.cache
def docs():
    """Scenes of two plays (~190k characters)."""
    return tuple(shakespeare_documents(plays=PLAYS))


@functools.cache
def bpe():
    return train_tokenizer((d.text for d in docs()), "bpe", vocab_size=512)


def tiny_config(**overrides) -> TrainConfig:
    """The tiny rung on a 512-token BPE: 48 steps of 8 sequences of 32 tokens."""
    base = dict(scale="tiny", vocab_size=512, heldout_fraction=0.1, tokens=8 * 32 * 48, eval_every=16,
                checkpoint_every=8)
    return TrainConfig(**{**base, **overrides})
