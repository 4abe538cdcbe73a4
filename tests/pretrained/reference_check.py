"""Comparing our models' logits and token ids with the reference ``make_reference.py``
wrote (transformers' outputs), shared by the stored-reference and live tests."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np

import influence.pretrained as hf

DATA = pathlib.Path(__file__).parent.parent / "data" / "pretrained"
FAMILIES = ("gpt2", "neox", "neox_serial", "llama_gqa_tied", "qwen2", "llama3_rope_bf16", "mistral_window")
CASES = ("right", "left", "shifted", "restart")
TOLERANCE = 1e-4  # max |ours - reference| / max |reference| over real (unpadded) positions


def relative_error(ours: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    real = mask.astype(bool)
    return float(np.abs(ours - reference)[real].max() / np.abs(reference[real]).max())


def logits(model, reference, case: str, *, mask: bool = True, positions: bool = True) -> np.ndarray:
    ids = jnp.asarray(reference[f"{case}_ids"])
    return np.asarray(model(ids, jnp.asarray(reference[f"{case}_mask"]) if mask else None,
                            jnp.asarray(reference[f"{case}_positions"]) if positions else None))


def check_folder(folder: pathlib.Path) -> dict[str, float]:
    """Relative errors per case of a folder (asserting the tolerance and the token ids)."""
    loaded = hf.load(folder)
    reference = np.load(folder / "reference.npz")
    errors = {}
    for case in CASES:
        errors[case] = relative_error(logits(loaded.model, reference, case), reference[f"{case}_logits"],
                                      reference[f"{case}_mask"])
        assert errors[case] <= TOLERANCE, (folder.name, case, errors[case])
    for i, text in enumerate(json.loads((folder / "texts.json").read_text())):
        assert loaded.tokenizer.encode(text) == reference[f"tokens_{i}"].tolist(), (folder.name, text)
    return errors
