"""Pretrained Hugging Face checkpoints as flax NNX models: GPT-2, GPT-NeoX (Pythia) and
the Llama family (Llama 2/3, Qwen2, Mistral, SmolLM).

    import influence.pretrained as hf
    loaded = hf.load("path/to/pythia-70m")      # config.json, *.safetensors, tokenizer.json
    logits = loaded.model(ids, attention_mask=mask, position_ids=pos)   # [B, T, V]
    inf.fit_factors(loaded.model, inf.CausalLM(), data, layers="mlp")

Weights are read with ``safetensors`` into numpy (float32, bfloat16 or float16 files;
parameters are float32); no torch is needed. See docs/pretrained.md and
:mod:`influence.pretrained.model` for the layer names.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
from flax import nnx

from influence.errors import CheckpointError

from .config import ArchConfig, from_hf_config
from .export import hf_config, hf_tensors, save_pretrained
from .model import PretrainedLM
from .tokenizer import PretrainedTokenizer
from .weights import fingerprint, map_weights, read_tensors, weight_files

__all__ = ["ArchConfig", "Pretrained", "PretrainedLM", "PretrainedTokenizer", "fingerprint", "from_hf_config",
           "hf_config", "hf_tensors", "load", "load_config", "load_model", "read_tensors", "save_pretrained",
           "weight_files"]


def load_config(folder: str | pathlib.Path) -> tuple[ArchConfig, dict]:
    """``(ArchConfig, config.json as a dict)`` of a checkpoint folder.

    Raises:
      CheckpointError: no folder, no or an unreadable ``config.json``, or an unsupported
        architecture.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; give a Hugging Face model folder "
                              "(config.json, *.safetensors, tokenizer.json)")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return from_hf_config(raw, str(path)), raw


def _set(model: nnx.Module, path: tuple, value: np.ndarray) -> None:
    node = model
    for key in path[:-1]:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    variable = getattr(node, path[-1])
    variable.set_value(value)


def load_model(folder: str | pathlib.Path) -> tuple[PretrainedLM, ArchConfig]:
    """The model of a checkpoint folder with its weights, and its architecture.

    Raises:
      CheckpointError: see :func:`load_config`, :func:`weight_files`, and missing,
        unexpected or mis-shaped tensors (all named in one message).
    """
    import jax.numpy as jnp

    folder = pathlib.Path(folder)
    arch, _ = load_config(folder)
    tensors = read_tensors(folder)
    # Built abstractly (no random initialisation of weights that are overwritten next).
    model = nnx.eval_shape(lambda: PretrainedLM(arch, rngs=nnx.Rngs(0)))
    found: dict[tuple, np.ndarray] = {}

    def put(path: tuple, value: np.ndarray | None) -> None:
        if value is not None:
            found[path] = value

    map_weights(tensors, arch, folder, put)
    del tensors
    for path, value in found.items():
        _set(model, path, jnp.asarray(value))
    expected = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    unset = sorted(expected - set(found), key=str)
    if unset:  # map_weights and the model disagree: a bug here, not in the folder
        raise CheckpointError(f"{folder}: internal error, parameters left unset: {unset[:5]}")
    return model, arch


@dataclasses.dataclass
class Pretrained:
    """A loaded checkpoint folder: model, architecture, tokenizer, and ``fingerprint``
    (16 hex digits over config.json and the weights' bytes)."""

    path: pathlib.Path
    model: PretrainedLM
    arch: ArchConfig
    tokenizer: PretrainedTokenizer
    config: dict
    fingerprint: str

    @property
    def context_length(self) -> int:
        return self.arch.context_length


def load(folder: str | pathlib.Path) -> Pretrained:
    """Model, tokenizer and fingerprint of a Hugging Face checkpoint folder."""
    folder = pathlib.Path(folder)
    model, arch = load_model(folder)
    _, raw = load_config(folder)
    tokenizer = PretrainedTokenizer.load(folder, raw)
    return Pretrained(folder, model, arch, tokenizer, raw, fingerprint(folder))
