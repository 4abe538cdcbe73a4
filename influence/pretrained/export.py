"""Writing a :class:`PretrainedLM` back as a Hugging Face folder (``config.json``,
``model.safetensors``, optionally ``tokenizer.json``): the inverse of
:func:`influence.pretrained.load`, so tests and benchmarks can make checkpoints of any
supported shape (random weights, e.g. Pythia-160M-shaped) without torch. Tensor names and
layouts are those of ``transformers`` (see :mod:`influence.pretrained.weights`).
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
from flax import nnx

from influence.errors import CheckpointError, ConfigError

from .config import ArchConfig
from .model import PretrainedLM
from .weights import PREFIXES, SINGLE

_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def hf_config(arch: ArchConfig) -> dict:
    """The ``config.json`` of ``arch`` (``from_hf_config(hf_config(a)) == a``)."""
    ids = {k: getattr(arch, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    common = {"model_type": arch.model_type, "architectures": [_ARCHITECTURES[arch.model_type]],
              "vocab_size": arch.vocab_size, "tie_word_embeddings": arch.tied_embeddings, **ids}
    if arch.family == "gpt2":
        return {**common, "n_positions": arch.context_length, "n_embd": arch.d_model, "n_layer": arch.n_layers,
                "n_head": arch.n_heads, "n_inner": arch.d_mlp, "layer_norm_epsilon": arch.norm_eps,
                "activation_function": arch.activation,
                "scale_attn_by_inverse_layer_idx": arch.attn_scale_by_layer}
    sizes = {"hidden_size": arch.d_model, "num_hidden_layers": arch.n_layers, "num_attention_heads": arch.n_heads,
             "intermediate_size": arch.d_mlp, "max_position_embeddings": arch.context_length,
             "hidden_act": arch.activation, "rope_theta": arch.rope_theta,
             "rope_scaling": None if arch.rope_scaling is None else dict(arch.rope_scaling)}
    if arch.family == "neox":
        if arch.qkv_bias != arch.o_bias:
            raise CheckpointError("GPT-NeoX has one attention_bias for q/k/v and the output projection")
        return {**common, **sizes, "layer_norm_eps": arch.norm_eps, "use_parallel_residual": arch.parallel_residual,
                "rotary_pct": arch.rotary_dim / arch.head_dim, "attention_bias": arch.qkv_bias}
    out = {**common, **sizes, "num_key_value_heads": arch.n_kv_heads, "head_dim": arch.head_dim,
           "rms_norm_eps": arch.norm_eps, "mlp_bias": arch.mlp_bias, "sliding_window": arch.sliding_window}
    if arch.model_type == "qwen2":
        out["use_sliding_window"] = arch.sliding_window is not None
    else:
        out["attention_bias"] = arch.qkv_bias
    return out


def hf_tensors(model: PretrainedLM) -> dict[str, np.ndarray]:
    """The model's parameters under ``transformers``' names and layouts (float32)."""
    arch = model.arch
    p = PREFIXES[arch.family]

    def arr(x) -> np.ndarray:
        return np.asarray(x[...], dtype=np.float32)

    out: dict[str, np.ndarray] = {}

    def linear(name: str, layer: nnx.Linear, conv1d: bool = False) -> None:
        out[f"{name}.weight"] = arr(layer.kernel) if conv1d else arr(layer.kernel).T.copy()
        if layer.bias is not None:
            out[f"{name}.bias"] = arr(layer.bias)

    def norm(name: str, layer) -> None:
        out[f"{name}.weight"] = arr(layer.scale)
        if getattr(layer, "bias", None) is not None:
            out[f"{name}.bias"] = arr(layer.bias)

    d, hd = arch.d_model, arch.head_dim
    if arch.family == "gpt2":
        out[f"{p}wte.weight"], out[f"{p}wpe.weight"] = arr(model.embed.embedding), arr(model.pos.embedding)
        for i, b in enumerate(model.blocks):
            s = f"{p}h.{i}"
            norm(f"{s}.ln_1", b.ln1)
            norm(f"{s}.ln_2", b.ln2)
            out[f"{s}.attn.c_attn.weight"] = np.concatenate([arr(b.attn.q.kernel), arr(b.attn.k.kernel),
                                                             arr(b.attn.v.kernel)], axis=1)
            out[f"{s}.attn.c_attn.bias"] = np.concatenate([arr(b.attn.q.bias), arr(b.attn.k.bias),
                                                           arr(b.attn.v.bias)])
            linear(f"{s}.attn.c_proj", b.attn.o, conv1d=True)
            linear(f"{s}.mlp.c_fc", b.mlp.up, conv1d=True)
            linear(f"{s}.mlp.c_proj", b.mlp.down, conv1d=True)
        norm(f"{p}ln_f", model.norm)
    elif arch.family == "neox":
        out[f"{p}embed_in.weight"] = arr(model.embed.embedding)
        h = arch.n_heads
        for i, b in enumerate(model.blocks):
            s = f"{p}layers.{i}"
            norm(f"{s}.input_layernorm", b.ln1)
            norm(f"{s}.post_attention_layernorm", b.ln2)
            # [d_out, d_in] per part -> interleaved per head: [H, 3, hd, d]
            parts = [arr(getattr(b.attn, j).kernel).T.reshape(h, hd, d) for j in "qkv"]
            out[f"{s}.attention.query_key_value.weight"] = np.stack(parts, axis=1).reshape(3 * d, d)
            if arch.qkv_bias:
                biases = [arr(getattr(b.attn, j).bias).reshape(h, hd) for j in "qkv"]
                out[f"{s}.attention.query_key_value.bias"] = np.stack(biases, axis=1).reshape(3 * d)
            linear(f"{s}.attention.dense", b.attn.o)
            linear(f"{s}.mlp.dense_h_to_4h", b.mlp.up)
            linear(f"{s}.mlp.dense_4h_to_h", b.mlp.down)
        norm(f"{p}final_layer_norm", model.norm)
        if not arch.tied_embeddings:
            out["embed_out.weight"] = arr(model.lm_head.kernel).T.copy()
    else:
        out[f"{p}embed_tokens.weight"] = arr(model.embed.embedding)
        for i, b in enumerate(model.blocks):
            s = f"{p}layers.{i}"
            norm(f"{s}.input_layernorm", b.ln1)
            norm(f"{s}.post_attention_layernorm", b.ln2)
            for j in "qkvo":
                linear(f"{s}.self_attn.{j}_proj", getattr(b.attn, j))
            for j in ("gate", "up", "down"):
                linear(f"{s}.mlp.{j}_proj", getattr(b.mlp, j))
        norm(f"{p}norm", model.norm)
    if not arch.tied_embeddings and arch.family != "neox":
        out["lm_head.weight"] = arr(model.lm_head.kernel).T.copy()
    # safetensors writes an array's memory as is: every tensor must be C-contiguous.
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_pretrained(model: PretrainedLM, folder: str | os.PathLike, *, tokenizer_json: str | None = None,
                    dtype: str = "float32") -> pathlib.Path:
    """Write ``model`` as a Hugging Face folder: ``config.json``, ``model.safetensors``
    (``dtype`` ``"float32"`` or ``"bfloat16"``) and, if given, ``tokenizer.json`` (its
    JSON text). Returns the folder."""
    import ml_dtypes
    from safetensors.numpy import save_file

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(model)
    if dtype == "bfloat16":
        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    elif dtype != "float32":
        raise ConfigError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    save_file(tensors, str(folder / SINGLE), metadata={"format": "pt"})
    config = {**hf_config(model.arch), "torch_dtype": dtype}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_text(tokenizer_json)
    return folder
