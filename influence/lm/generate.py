"""Text generation from a prompt: greedy (temperature 0) or temperature / top-k sampling.

Each new token costs one forward pass over a fixed-size window of the last
``context_length`` tokens (no key-value cache), so one compiled function serves every
step; fine for the short samples used to eyeball a model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from influence.errors import ConfigError

from .model import GPT
from .tokenizer import Tokenizer


@functools.lru_cache(maxsize=8)
def _next_logits(graphdef: nnx.GraphDef):
    """Jitted ``(state, window int32 [T], length) -> logits [V]`` at position length - 1,
    cached per model structure so repeated calls compile once."""

    @jax.jit
    def next_logits(state, window, length):
        return nnx.merge(graphdef, state)(window[None])[0, length - 1]

    return next_logits


def generate(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 100,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0) -> str:
    """Continue ``prompt`` (read as the start of a document) by ``max_new_tokens`` tokens
    and return the continuation's text only. Stops early at a padding or document token.

    ``temperature`` 0 picks the most likely token; above 0 samples from softmax(logits / T),
    restricted to the ``top_k`` most likely tokens when given.
    """
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    t_max = model.config.context_length
    graphdef, state = nnx.split(model)
    last_logits = _next_logits(graphdef)
    ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    n_prompt = len(ids)
    key = jax.random.key(seed)
    for _ in range(max_new_tokens):
        ctx = ids[-t_max:]
        window = np.full(t_max, tokenizer.pad_id, dtype=np.int32)
        window[:len(ctx)] = ctx  # causal attention: padding after the context is never seen
        logits = last_logits(state, jnp.asarray(window), len(ctx))
        if temperature == 0:
            nxt = int(jnp.argmax(logits))
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = jnp.sort(logits)[-min(top_k, logits.shape[-1])]
                logits = jnp.where(logits < kth, -jnp.inf, logits)
            key, sub = jax.random.split(key)
            nxt = int(jax.random.categorical(sub, logits))
        if nxt in (tokenizer.pad_id, tokenizer.bos_id):
            break
        ids.append(nxt)
    return tokenizer.decode(ids[n_prompt:])
