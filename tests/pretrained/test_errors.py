"""Folders that cannot be loaded get a CheckpointError that names the fault."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import influence.pretrained as hf
from influence.errors import CheckpointError, InfluenceError

from .reference_check import DATA


@pytest.fixture
def gpt2(tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(DATA / "gpt2", folder)
    return folder


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder, edit):
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def _fails(folder, *fragments):
    with pytest.raises(CheckpointError) as e:
        hf.load_model(folder)
    assert isinstance(e.value, InfluenceError) and isinstance(e.value, ValueError)
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))


def test_unsupported_architecture(gpt2):
    _edit_config(gpt2, model_type="bert", architectures=["BertModel"])
    _fails(gpt2, "model_type 'bert'", "not supported")


def test_unsupported_rope_scaling(tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(DATA / "llama_gqa_tied", folder)
    _edit_config(folder, rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None)
    _fails(folder, "'yarn'")


def test_missing_unexpected_and_misshaped_tensors(gpt2):
    def edit(t):
        del t["transformer.h.1.mlp.c_fc.bias"]
        t["transformer.h.0.extra.weight"] = np.zeros(3, np.float32)
        t["transformer.h.0.attn.c_proj.weight"] = np.zeros((32, 31), np.float32)

    _edit_tensors(gpt2, edit)
    _fails(gpt2, "missing tensors: h.1.mlp.c_fc.bias", "unexpected tensors: h.0.extra.weight",
           "h.0.attn.c_proj.weight [32, 31] (config.json needs [32, 32])")


def test_config_that_does_not_fit_the_weights(gpt2):
    _edit_config(gpt2, n_inner=64)
    _fails(gpt2, "h.0.mlp.c_fc.weight [32, 128] (config.json needs [32, 64])")


def test_corrupt_file(gpt2):
    data = (gpt2 / "model.safetensors").read_bytes()
    (gpt2 / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(gpt2, "not a readable safetensors file")


def test_bin_only_folder(gpt2):
    (gpt2 / "model.safetensors").rename(gpt2 / "pytorch_model.bin")
    _fails(gpt2, "only PyTorch pickles", "safe_serialization=True")


def test_missing_shard_and_missing_config(tmp_path):
    folder = tmp_path / "neox"
    shutil.copytree(DATA / "neox", folder)
    (folder / "model-00002-of-00003.safetensors").unlink()
    _fails(folder, "shards named in model.safetensors.index.json are missing", "model-00002-of-00003")
    (folder / "config.json").unlink()
    _fails(folder, "has no config.json")
    _fails(tmp_path / "nowhere", "is not a folder")


def test_bfloat16_and_sharded_weights_load_as_float32():
    for name in ("llama3_rope_bf16", "neox"):
        model, _ = hf.load_model(DATA / name)
        assert model.blocks[0].attn.q.kernel[...].dtype == np.float32
    assert len(hf.weight_files(DATA / "neox")) == 3
