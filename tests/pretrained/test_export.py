"""save_pretrained is load's inverse: the tensors it writes are transformers' own (names,
layouts, values of the reference folders), and the config reads back to the same architecture."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import influence.pretrained as hf

from .reference_check import DATA, FAMILIES, forward


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_reproduces_transformers_tensors(name, tmp_path):
    loaded = hf.load(DATA / name)
    assert hf.from_hf_config(hf.hf_config(loaded.arch)) == loaded.arch
    original = {k: np.asarray(v, np.float32) for k, v in hf.read_tensors(DATA / name).items()
                if not (loaded.arch.tied_embeddings and k == "lm_head.weight")}
    written = hf.hf_tensors(loaded.model)
    assert sorted(written) == sorted(original)
    for k, v in written.items():
        np.testing.assert_array_equal(v, original[k], err_msg=k)


def test_random_model_saved_and_loaded_in_bfloat16(tmp_path):
    arch = hf.load(DATA / "neox").arch
    model = hf.PretrainedLM(arch, rngs=nnx.Rngs(3))
    hf.save_pretrained(model, tmp_path, tokenizer_json=(DATA / "neox" / "tokenizer.json").read_text(),
                       dtype="bfloat16")
    back = hf.load(tmp_path)
    ids = np.arange(12, dtype=np.int32).reshape(2, 6) % arch.vocab_size
    a, b = np.asarray(forward(model, ids, None, None)), np.asarray(forward(back.model, ids, None, None))
    # bfloat16 keeps 8 bits of mantissa: close, not equal
    assert 0 < np.abs(a - b).max() <= 0.05 * np.abs(a).max()
