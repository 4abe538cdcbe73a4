"""Our GPT-2, GPT-NeoX and Llama-family models give transformers' logits on tiny random
checkpoints (stored in tests/data/pretrained by make_reference.py), with right and left
padding and explicit position ids; the tokenizer gives transformers' ids. The live
comparison (a fresh reference from transformers) is test_live_reference, marked
``reference``."""

from __future__ import annotations

import dataclasses
import os
import subprocess

import numpy as np
import pytest
from flax import nnx

import influence.pretrained as hf

from .reference_check import CASES, DATA, FAMILIES, TOLERANCE, check_folder, logits, relative_error


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_tokens_match_transformers(name):
    check_folder(DATA / name)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_tied"])
def test_dropping_the_mask_or_the_positions_misses_by_far_more(name):
    """The reference is sensitive to what it checks: on the left-padded batch, ignoring
    the mask is off by more than 100× the tolerance, and so is ignoring position ids that
    restart mid-row (a constant shift, as left padding's, leaves rotary attention unchanged)."""
    loaded = hf.load(DATA / name)
    ref = np.load(DATA / name / "reference.npz")
    expected, mask = ref["left_logits"], ref["left_mask"]
    assert relative_error(logits(loaded.model, ref, "left"), expected, mask) <= TOLERANCE
    assert relative_error(logits(loaded.model, ref, "left", mask=False), expected, mask) > 100 * TOLERANCE
    restart = relative_error(logits(loaded.model, ref, "restart", positions=False), ref["restart_logits"],
                             ref["restart_mask"])
    assert restart > 100 * TOLERANCE


def test_rope_scaling_and_sliding_window_are_exercised():
    """Without llama3 rope scaling or the sliding window, the same weights miss the reference."""
    for name, change in (("llama3_rope_bf16", {"rope_scaling": None}), ("mistral_window", {"sliding_window": None})):
        loaded = hf.load(DATA / name)
        ref = np.load(DATA / name / "reference.npz")
        other = hf.PretrainedLM(dataclasses.replace(loaded.arch, **change), rngs=nnx.Rngs(0))
        nnx.update(other, nnx.state(loaded.model))
        err = relative_error(logits(other, ref, "right"), ref["right_logits"], ref["right_mask"])
        assert err > 100 * TOLERANCE, (name, err)


def test_layer_names_read_naturally():
    from influence.capture.tracking import track

    loaded = hf.load(DATA / "llama_gqa_tied")
    mlp = [info.name for info in track(loaded.model, "mlp").layers]
    attn = [info.name for info in track(loaded.model, "attn").layers]
    assert sorted(mlp) == sorted(f"blocks.{i}.mlp.{p}" for i in range(2) for p in ("gate", "up", "down"))
    assert sorted(attn) == sorted(f"blocks.{i}.attn.{p}" for i in range(2) for p in "qkvo")


@pytest.mark.reference
def test_live_reference(tmp_path):
    """A fresh reference from transformers (INFLUENCE_REFERENCE_PYTHON: an interpreter with
    torch and transformers), compared as the stored one."""
    python = os.environ.get("INFLUENCE_REFERENCE_PYTHON")
    if not python:
        pytest.skip("set INFLUENCE_REFERENCE_PYTHON to an interpreter with torch and transformers")
    probe = subprocess.run([python, "-c", "import torch, transformers"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"{python} cannot import torch and transformers")
    subprocess.run([python, str(DATA.parent.parent / "pretrained" / "make_reference.py"), str(tmp_path)], check=True)
    for name in FAMILIES:
        errors = check_folder(tmp_path / name)
        assert set(errors) == set(CASES)
