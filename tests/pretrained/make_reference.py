"""Write tiny random checkpoints of every supported family in the Hugging Face format, with
transformers' logits for padded batches, as the reference for tests/pretrained.

Needs torch and transformers, which influence never imports; run it with a separate
interpreter (docs/testing.md)::

    python3 -m venv /tmp/venv-ref && /tmp/venv-ref/bin/pip install torch transformers safetensors tokenizers
    /tmp/venv-ref/bin/python tests/pretrained/make_reference.py tests/data/pretrained

Each ``OUT/<name>/`` holds ``config.json``, ``model.safetensors`` (or shards and their
index), ``tokenizer.json`` and ``reference.npz``: for the cases ``right`` (right padding,
default positions), ``left`` (left padding, positions counted from each row's first real
token), ``shifted`` (no padding, positions starting at 3) and ``restart`` (no padding,
positions 0..4 repeated, as in packed documents): ``<case>_ids``, ``_mask``,
``_positions`` int32 ``[B, T]`` and ``_logits`` float32 ``[B, T, V]``; and the tokenizer's
ids of ``TEXTS`` (``tokens_<i>``). Random weights are drawn wider than the libraries' init
(std 0.15, norm scales 1 ± 0.1, biases ± 0.1) so that attention is far from uniform and a
wrong mask, position or transpose changes the logits by far more than the tolerance.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import numpy as np
import tokenizers
import torch
import transformers

VOCAB = 96
CORPUS = ["the quick brown fox jumps over the lazy dog. " * 3, "to be or not to be, that is the question.",
          "all that glitters is not gold; many a man's life hath sold.", "Sphinx of black quartz, judge my vow!",
          "pack my box with five dozen liquor jugs 0123456789"]
TEXTS = ["the lazy fox is not gold", "to be, or not", "Quartz! judge 42 dozen jugs", "héllo wörld ~"]
BATCH = ["the quick brown fox jumps", "not gold", "judge my vow to be or not to be"]


def make_tokenizer() -> tokenizers.Tokenizer:
    """Byte-level BPE (as GPT-2, Pythia, Llama 3) trained on CORPUS, VOCAB entries."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|pad|>"],
                                             show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def configs(vocab: int) -> dict:
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    small = {"vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 48, "max_position_embeddings": 32, **ids}
    T = transformers
    return {
        "gpt2": T.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4, **ids),
        "neox": T.GPTNeoXConfig(**small, rotary_pct=0.5, use_parallel_residual=True, tie_word_embeddings=False),
        "neox_serial": T.GPTNeoXConfig(**small, rotary_pct=0.25, use_parallel_residual=False,
                                       tie_word_embeddings=False),
        "llama_gqa_tied": T.LlamaConfig(**small, num_key_value_heads=2, tie_word_embeddings=True,
                                        rope_theta=500000.0),
        "qwen2": T.Qwen2Config(**small, num_key_value_heads=1, tie_word_embeddings=False),
        "llama3_rope_bf16": T.LlamaConfig(**{**small, "num_attention_heads": 2}, num_key_value_heads=1,
                                          tie_word_embeddings=False, head_dim=16, rope_theta=10000.0,
                                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8}),
        "mistral_window": T.MistralConfig(**small, num_key_value_heads=2, sliding_window=4,
                                          tie_word_embeddings=False),
    }


def randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight"):  # a norm's scale
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def cases(hf_tok, pad: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rows = [hf_tok.encode(t, add_special_tokens=False) for t in BATCH]
    t = max(map(len, rows))
    out = {}
    for side in ("right", "left"):
        ids = np.full((len(rows), t), pad, np.int64)
        mask = np.zeros((len(rows), t), np.int64)
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if side == "right" else slice(t - len(r), t)
            ids[i, sl], mask[i, sl] = r, 1
        pos = np.broadcast_to(np.arange(t), (len(rows), t)).copy() if side == "right" \
            else np.clip(np.cumsum(mask, 1) - 1, 0, None)
        out[side] = (ids, mask, pos)
    full = np.array([(rows[2] * 2)[:t] for _ in range(2)], np.int64)
    out["shifted"] = (full, np.ones_like(full), np.broadcast_to(np.arange(t) + 3, full.shape).copy())
    # Positions that restart (as in packed documents): rotary attention sees other distances.
    out["restart"] = (full, np.ones_like(full), np.broadcast_to(np.arange(t) % 5, full.shape).copy())
    return out


def main(out: pathlib.Path) -> None:
    torch.manual_seed(0)
    tok = make_tokenizer()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                  eos_token="<|endoftext|>", pad_token="<|pad|>")
    vocab = tok.get_vocab_size()
    for seed, (name, config) in enumerate(configs(vocab).items()):
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        config._attn_implementation = "eager"
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        randomise(model, seed)
        if name.endswith("bf16"):  # stored in bfloat16; the reference runs on those rounded weights in float32
            model.to(torch.bfloat16).save_pretrained(folder)
            # Reloaded in float32 rather than cast back: a cast would also round the
            # rotary frequencies, which transformers keeps in float32 on load.
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                      attn_implementation="eager").eval()
        elif name == "neox":  # sharded: an index and several files
            model.save_pretrained(folder, max_shard_size="40KB")
        else:
            model.save_pretrained(folder)
        (folder / "generation_config.json").unlink(missing_ok=True)
        hf_tok.save_pretrained(folder)
        for extra in ("special_tokens_map.json", "chat_template.jinja"):
            (folder / extra).unlink(missing_ok=True)
        arrays = {}
        with torch.no_grad():
            for case, (ids, mask, pos) in cases(hf_tok, hf_tok.pad_token_id).items():
                logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                               position_ids=torch.tensor(pos)).logits
                arrays.update({f"{case}_ids": ids.astype(np.int32), f"{case}_mask": mask.astype(np.int32),
                               f"{case}_positions": pos.astype(np.int32),
                               f"{case}_logits": logits.float().numpy().astype(np.float32)})
        for i, text in enumerate(TEXTS):
            arrays[f"tokens_{i}"] = np.asarray(hf_tok.encode(text, add_special_tokens=False), np.int32)
        np.savez_compressed(folder / "reference.npz", **arrays)
        (folder / "texts.json").write_text(json.dumps(TEXTS))
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters -> {folder}")
    (out / "VERSIONS.json").write_text(json.dumps({"torch": torch.__version__,
                                                   "transformers": transformers.__version__,
                                                   "tokenizers": tokenizers.__version__}, indent=1))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/pretrained"))
