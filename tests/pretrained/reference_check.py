"""Comparing our models' logits and token ids with the reference ``make_reference.py``
wrote (transformers' outputs), shared by the stored-reference and live tests."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

import influence.pretrained as hf

DATA = pathlib.Path(__file__).parent.parent / "data" / "pretrained"
FAMILIES = ("gpt2", "neox", "neox_serial", "llama_gqa_tied", "qwen2", "llama3_rope_bf16", "mistral_window")
CASES = ("right", "left", "shifted", "restart")
TOLERANCE = 1e-4  # max |ours - reference| / max |reference| over real (unpadded) positions


# One compiled forward per model and shape: far cheaper than running the ops eagerly (each
# eager op compiles on its own the first time it meets a shape).
forward = nnx.jit(lambda model, ids, mask, positions: model(ids, mask, positions))


def relative_error(ours: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    real = mask.astype(bool)
    return float(np.abs(ours - reference)[real].max() / np.abs(reference[real]).max())


def logits(model, reference, case: str, *, mask: bool = True, positions: bool = True) -> np.ndarray:
    ids = jnp.asarray(reference[f"{case}_ids"])
    return np.asarray(forward(model, ids, jnp.asarray(reference[f"{case}_mask"]) if mask else None,
                              jnp.asarray(reference[f"{case}_positions"]) if positions else None))


def check_folder(folder: pathlib.Path) -> dict[str, float]:
    """Relative errors per case of a folder (asserting the tolerance and the token ids)."""
    loaded = hf.load(folder)
    reference = np.load(folder / "reference.npz")
    # All cases in one batch (each row has its own mask and positions): one forward pass.
    stacked = {k: np.concatenate([reference[f"{case}_{k}"] for case in CASES]) for k in ("ids", "mask", "positions")}
    ours = np.asarray(forward(loaded.model, jnp.asarray(stacked["ids"]), jnp.asarray(stacked["mask"]),
                              jnp.asarray(stacked["positions"])))
    errors, row = {}, 0
    for case in CASES:
        n = len(reference[f"{case}_ids"])
        errors[case] = relative_error(ours[row:row + n], reference[f"{case}_logits"], reference[f"{case}_mask"])
        row += n
        assert errors[case] <= TOLERANCE, (folder.name, case, errors[case])
    for i, text in enumerate(json.loads((folder / "texts.json").read_text())):
        assert loaded.tokenizer.encode(text) == reference[f"tokens_{i}"].tolist(), (folder.name, text)
    return errors
