"""Reading a Hugging Face folder's weights with ``safetensors`` into numpy (no torch), and
mapping them onto :class:`~influence.pretrained.model.PretrainedLM`'s parameters.

Tensor names of each family (with or without the wrapper prefix ``transformer.``,
``gpt_neox.``, ``model.``) map to our paths; ``transformers`` stores ``nn.Linear`` weights
as ``[d_out, d_in]`` (transposed here into kernels ``[d_in, d_out]``) but GPT-2's ``Conv1D``
as ``[d_in, d_out]`` already. Fused q/k/v tensors are split: GPT-2's ``c_attn`` is
``[q | k | v]`` along its output, GPT-NeoX's ``query_key_value`` interleaves them per head
(output index ``head * 3 * head_dim + j * head_dim + c`` for j = q, k, v).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
from collections.abc import Callable

import numpy as np

from influence.errors import CheckpointError

from .config import ArchConfig

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Buffers some checkpoints carry that are not parameters (causal masks, rotary caches).
IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|attention\.bias|attention\.masked_bias|"
                     r"rotary_emb\.inv_freq)$")
PREFIXES = {"gpt2": "transformer.", "neox": "gpt_neox.", "llama": "model."}
_FLOATS = ("float32", "bfloat16", "float16", "float64")


def weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of ``folder``: ``model.safetensors``, or the shards its index
    names, or every ``*.safetensors``.

    Raises:
      CheckpointError: no safetensors file (a ``.bin``-only folder gets the line that
        converts it), an unreadable index, or a shard the index names that is absent.
    """
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{folder / INDEX} is not a safetensors index ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards named in {INDEX} are missing: {missing}")
        return files
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    bins = sorted(p.name for p in folder.glob("*.bin"))
    if bins:
        raise CheckpointError(
            f"{folder} holds only PyTorch pickles ({', '.join(bins[:3])}); influence reads safetensors only (no "
            f"torch at run time). Convert once where torch is installed: AutoModelForCausalLM.from_pretrained("
            f"'{folder}').save_pretrained('{folder}', safe_serialization=True)")
    raise CheckpointError(f"{folder} has no weights (no {SINGLE}, {INDEX} or *.safetensors)")


def read_tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors files, as numpy arrays in their stored
    dtype (bfloat16 as ``ml_dtypes.bfloat16``)."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="numpy") as f:
                for name in f.keys():
                    if name in tensors:
                        raise CheckpointError(f"{folder}: tensor {name!r} is stored in more than one file")
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}); download it again") from None
    return tensors


def fingerprint(folder: pathlib.Path) -> str:
    """16 hex digits of SHA-256 over ``config.json`` and every weights file's bytes: the
    same weights give the same fingerprint wherever the folder lies."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for file in weight_files(folder):
        h.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


class _Reader:
    """Takes tensors by name, checking shapes; collects what is missing or mis-shaped so
    one error names all of it."""

    def __init__(self, tensors: dict[str, np.ndarray], prefix: str, folder: pathlib.Path):
        self.tensors = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in tensors.items()}
        self.folder, self.prefix = folder, prefix
        self.missing: list[str] = []
        self.misshaped: list[str] = []

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        if name not in self.tensors:
            self.missing.append(name)
            return None
        array = self.tensors.pop(name)
        if tuple(array.shape) != tuple(shape):
            self.misshaped.append(f"{name} {list(array.shape)} (config.json needs {list(shape)})")
            return None
        if array.dtype.name not in _FLOATS:
            self.misshaped.append(f"{name} of dtype {array.dtype.name} (expected a float)")
            return None
        return np.asarray(array, dtype=np.float32)

    def finish(self, tied: bool) -> None:
        left = [k for k in self.tensors if not IGNORED.search(k) and not (tied and k == "lm_head.weight")]
        problems = []
        if self.missing:
            problems.append(f"missing tensors: {', '.join(self.missing[:8])}{' …' if len(self.missing) > 8 else ''}")
        if self.misshaped:
            problems.append(f"tensors of the wrong shape: {'; '.join(self.misshaped[:8])}")
        if left:
            problems.append(f"unexpected tensors: {', '.join(sorted(left)[:8])}{' …' if len(left) > 8 else ''}")
        if problems:
            raise CheckpointError(f"{self.folder}: the weights do not fit config.json: " + "; ".join(problems)
                                  + f" (names without the prefix {self.prefix!r}; is config.json the one of these "
                                  "weights?)")


Assign = Callable[[tuple, np.ndarray | None], None]


def _linear(r: _Reader, put: Assign, target: tuple, name: str, d_in: int, d_out: int, bias: bool,
            conv1d: bool = False) -> None:
    """An ``nn.Linear`` (``[d_out, d_in]``) or GPT-2 ``Conv1D`` (``[d_in, d_out]``) weight."""
    w = r.take(f"{name}.weight", (d_in, d_out) if conv1d else (d_out, d_in))
    put((*target, "kernel"), None if w is None else (w if conv1d else w.T))
    if bias:
        put((*target, "bias"), r.take(f"{name}.bias", (d_out,)))


def _norm(r: _Reader, put: Assign, target: tuple, name: str, d: int, with_bias: bool) -> None:
    put((*target, "scale"), r.take(f"{name}.weight", (d,)))
    if with_bias:
        put((*target, "bias"), r.take(f"{name}.bias", (d,)))


def map_weights(tensors: dict[str, np.ndarray], arch: ArchConfig, folder: pathlib.Path,
                put: Assign) -> None:
    """Call ``put(path, array float32)`` for every parameter of the model of ``arch``
    (``path`` as in ``nnx.state``, e.g. ``("blocks", 0, "attn", "q", "kernel")``).

    Raises:
      CheckpointError: missing, mis-shaped or unexpected tensors (all named at once).
    """
    r = _Reader(tensors, PREFIXES[arch.family], folder)
    d, m, hd = arch.d_model, arch.d_mlp, arch.head_dim
    hq, hk = arch.n_heads * hd, arch.n_kv_heads * hd
    layernorm = arch.norm == "layernorm"
    if arch.family == "gpt2":
        put(("embed", "embedding"), r.take("wte.weight", (arch.vocab_size, d)))
        put(("pos", "embedding"), r.take("wpe.weight", (arch.context_length, d)))
        for i in range(arch.n_layers):
            blk, src = ("blocks", i), f"h.{i}"
            _norm(r, put, (*blk, "ln1"), f"{src}.ln_1", d, True)
            _norm(r, put, (*blk, "ln2"), f"{src}.ln_2", d, True)
            w = r.take(f"{src}.attn.c_attn.weight", (d, 3 * d))
            b = r.take(f"{src}.attn.c_attn.bias", (3 * d,))
            for j, part in enumerate("qkv"):
                put((*blk, "attn", part, "kernel"), None if w is None else w[:, j * d:(j + 1) * d])
                put((*blk, "attn", part, "bias"), None if b is None else b[j * d:(j + 1) * d])
            _linear(r, put, (*blk, "attn", "o"), f"{src}.attn.c_proj", d, d, True, conv1d=True)
            _linear(r, put, (*blk, "mlp", "up"), f"{src}.mlp.c_fc", d, m, True, conv1d=True)
            _linear(r, put, (*blk, "mlp", "down"), f"{src}.mlp.c_proj", m, d, True, conv1d=True)
        _norm(r, put, ("norm",), "ln_f", d, True)
    elif arch.family == "neox":
        put(("embed", "embedding"), r.take("embed_in.weight", (arch.vocab_size, d)))
        h = arch.n_heads
        for i in range(arch.n_layers):
            blk, src = ("blocks", i), f"layers.{i}"
            _norm(r, put, (*blk, "ln1"), f"{src}.input_layernorm", d, True)
            _norm(r, put, (*blk, "ln2"), f"{src}.post_attention_layernorm", d, True)
            w = r.take(f"{src}.attention.query_key_value.weight", (3 * d, d))
            b = r.take(f"{src}.attention.query_key_value.bias", (3 * d,)) if arch.qkv_bias else None
            for j, part in enumerate("qkv"):
                put((*blk, "attn", part, "kernel"), None if w is None else w.reshape(h, 3, hd, d)[:, j].reshape(d, d).T)
                if arch.qkv_bias:
                    put((*blk, "attn", part, "bias"), None if b is None else b.reshape(h, 3, hd)[:, j].reshape(d))
            _linear(r, put, (*blk, "attn", "o"), f"{src}.attention.dense", d, d, arch.o_bias)
            _linear(r, put, (*blk, "mlp", "up"), f"{src}.mlp.dense_h_to_4h", d, m, True)
            _linear(r, put, (*blk, "mlp", "down"), f"{src}.mlp.dense_4h_to_h", m, d, True)
        _norm(r, put, ("norm",), "final_layer_norm", d, True)
        if not arch.tied_embeddings:
            # embed_out sits outside the gpt_neox. prefix
            w = r.take("embed_out.weight", (arch.vocab_size, d))
            put(("lm_head", "kernel"), None if w is None else w.T)
    else:
        put(("embed", "embedding"), r.take("embed_tokens.weight", (arch.vocab_size, d)))
        for i in range(arch.n_layers):
            blk, src = ("blocks", i), f"layers.{i}"
            _norm(r, put, (*blk, "ln1"), f"{src}.input_layernorm", d, layernorm)
            _norm(r, put, (*blk, "ln2"), f"{src}.post_attention_layernorm", d, layernorm)
            for part, size in (("q", hq), ("k", hk), ("v", hk)):
                _linear(r, put, (*blk, "attn", part), f"{src}.self_attn.{part}_proj", d, size, arch.qkv_bias)
            _linear(r, put, (*blk, "attn", "o"), f"{src}.self_attn.o_proj", hq, d, arch.o_bias)
            _linear(r, put, (*blk, "mlp", "gate"), f"{src}.mlp.gate_proj", d, m, arch.mlp_bias)
            _linear(r, put, (*blk, "mlp", "up"), f"{src}.mlp.up_proj", d, m, arch.mlp_bias)
            _linear(r, put, (*blk, "mlp", "down"), f"{src}.mlp.down_proj", m, d, arch.mlp_bias)
        _norm(r, put, ("norm",), "norm", d, layernorm)
    if not arch.tied_embeddings and arch.family != "neox":
        w = r.take("lm_head.weight", (arch.vocab_size, d))
        put(("lm_head", "kernel"), None if w is None else w.T)
    r.finish(arch.tied_embeddings)
