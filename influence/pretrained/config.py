"""One architecture description for the three supported families, read from a Hugging
Face ``config.json``.

GPT-2, GPT-NeoX (Pythia) and Llama (with Qwen2, Mistral, SmolLM) differ in a handful of
switches: the normalisation (LayerNorm or RMSNorm), learned or rotary positions (and
which fraction of each head rotates), a serial or parallel residual, a gated MLP, biases,
grouped key/value heads and a tied output head. :class:`ArchConfig` holds them; the model
in :mod:`influence.pretrained.model` is one class switched by it. Sizes are in features
(``d_model``, ``head_dim``, ``d_mlp``), tokens (``context_length``) or counts.
"""

from __future__ import annotations

import dataclasses
import math

from influence.errors import CheckpointError

# model_type of config.json -> family
FAMILIES = {"gpt2": "gpt2", "gpt_neox": "neox", "llama": "llama", "qwen2": "llama", "mistral": "llama"}
# hidden_act -> (jax function name, approximate); anything else is refused
ACTIVATIONS = {"gelu": ("gelu", False), "gelu_new": ("gelu", True), "gelu_pytorch_tanh": ("gelu", True),
               "gelu_fast": ("gelu", True), "silu": ("silu", None), "swish": ("silu", None), "relu": ("relu", None)}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """The architecture of a pretrained decoder (see the module docstring).

    ``rotary_dim`` is the number of features of each head that rotate (0: learned
    absolute positions, GPT-2); ``rope_scaling`` is ``None`` or the ``(key, value)`` pairs of
    a dict with ``rope_type`` ``"linear"`` or ``"llama3"`` and its parameters. ``n_kv_heads < n_heads`` is grouped
    -query attention. ``sliding_window`` (tokens, or ``None``) limits how far back a token
    attends (Mistral).
    """

    family: str
    model_type: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    context_length: int
    norm: str  # "layernorm" | "rmsnorm"
    norm_eps: float
    activation: str
    gated_mlp: bool
    parallel_residual: bool
    tied_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rotary_dim: int = 0
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # sorted (key, value) pairs: hashable, as NNX static fields must be
    sliding_window: int | None = None
    attn_scale_by_layer: bool = False  # GPT-2's scale_attn_by_inverse_layer_idx
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def n_params(self) -> int:
        """Number of parameters (the tied head counted once)."""
        d, hd = self.d_model, self.head_dim
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        attn += (hd * (self.n_heads + 2 * self.n_kv_heads)) * self.qkv_bias + d * self.o_bias
        mlp = d * self.d_mlp * (3 if self.gated_mlp else 2) + (self.d_mlp + d) * self.mlp_bias
        norms = d * (2 if self.norm == "rmsnorm" else 4)
        emb = self.vocab_size * d * (1 if self.tied_embeddings else 2)
        pos = 0 if self.rotary_dim else self.context_length * d
        final = d * (1 if self.norm == "rmsnorm" else 2)
        return self.n_layers * (attn + mlp + norms) + emb + pos + final

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        return d


def _first(d: dict, *keys, default=None):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def _int_id(value):
    """A token id from config.json, which may hold a list of them (the first is used)."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _activation(name: str, where: str) -> str:
    if name not in ACTIVATIONS:
        raise CheckpointError(f"{where}: activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return name


def _rope(cfg: dict, where: str) -> tuple[float, dict | None, float | None]:
    """``(theta, scaling, partial_rotary_factor)`` from the old keys (``rope_theta``,
    ``rotary_emb_base``, ``rope_scaling``, ``rotary_pct``) or the newer ``rope_parameters``."""
    params = cfg.get("rope_parameters") or {}
    theta = float(_first(params, "rope_theta", default=_first(cfg, "rope_theta", "rotary_emb_base", default=10000.0)))
    partial = _first(params, "partial_rotary_factor", default=_first(cfg, "partial_rotary_factor", "rotary_pct"))
    scaling = cfg.get("rope_scaling") or params or None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise CheckpointError(f"{where}: rope scaling {kind!r} is not supported; supported: {list(ROPE_TYPES)}")
        scaling = None if kind == "default" else tuple(sorted({**scaling, "rope_type": kind}.items()))
    return theta, scaling, partial


def from_hf_config(cfg: dict, where: str = "config.json") -> ArchConfig:
    """:class:`ArchConfig` of a Hugging Face ``config.json`` (as a dict).

    Raises:
      CheckpointError: an unsupported ``model_type``, activation, rope scaling or setting,
        or sizes that do not fit together (e.g. ``hidden_size`` not a multiple of heads).
    """
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        arch = cfg.get("architectures")
        raise CheckpointError(f"{where}: model_type {model_type!r} (architectures {arch}) is not supported; "
                              f"supported: {sorted(FAMILIES)} (GPT-2, GPT-NeoX/Pythia, Llama/Qwen2/Mistral/SmolLM)")
    family = FAMILIES[model_type]
    ids = {"bos_token_id": _int_id(cfg.get("bos_token_id")), "eos_token_id": _int_id(cfg.get("eos_token_id")),
           "pad_token_id": _int_id(cfg.get("pad_token_id"))}
    try:
        if family == "gpt2":
            d, h = int(cfg["n_embd"]), int(cfg["n_head"])
            arch = ArchConfig(
                family=family, model_type=model_type, vocab_size=int(cfg["vocab_size"]), d_model=d,
                n_layers=int(cfg["n_layer"]), n_heads=h, n_kv_heads=h, head_dim=d // h,
                d_mlp=int(cfg.get("n_inner") or 4 * d), context_length=int(cfg["n_positions"]),
                norm="layernorm", norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                activation=_activation(cfg.get("activation_function", "gelu_new"), where), gated_mlp=False,
                parallel_residual=False, tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                qkv_bias=True, o_bias=True, mlp_bias=True,
                attn_scale_by_layer=bool(cfg.get("scale_attn_by_inverse_layer_idx", False)), **ids)
            if not cfg.get("scale_attn_weights", True):
                raise CheckpointError(f"{where}: scale_attn_weights=false is not supported")
        elif family == "neox":
            d, h = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            theta, scaling, partial = _rope(cfg, where)
            hd = d // h
            arch = ArchConfig(
                family=family, model_type=model_type, vocab_size=int(cfg["vocab_size"]), d_model=d,
                n_layers=int(cfg["num_hidden_layers"]), n_heads=h, n_kv_heads=h, head_dim=hd,
                d_mlp=int(cfg["intermediate_size"]), context_length=int(cfg.get("max_position_embeddings", 2048)),
                norm="layernorm", norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
                activation=_activation(cfg.get("hidden_act", "gelu"), where), gated_mlp=False,
                parallel_residual=bool(cfg.get("use_parallel_residual", True)),
                tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(cfg.get("attention_bias", True)), o_bias=bool(cfg.get("attention_bias", True)),
                mlp_bias=True, rotary_dim=int(hd * float(1.0 if partial is None else partial)), rope_theta=theta,
                rope_scaling=scaling, **ids)
        else:
            d, h = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            theta, scaling, partial = _rope(cfg, where)
            hd = int(cfg.get("head_dim") or d // h)
            qwen = model_type == "qwen2"
            window = cfg.get("sliding_window")
            if qwen and not cfg.get("use_sliding_window", False):
                window = None
            arch = ArchConfig(
                family=family, model_type=model_type, vocab_size=int(cfg["vocab_size"]), d_model=d,
                n_layers=int(cfg["num_hidden_layers"]), n_heads=h,
                n_kv_heads=int(cfg.get("num_key_value_heads") or h), head_dim=hd,
                d_mlp=int(cfg["intermediate_size"]), context_length=int(cfg.get("max_position_embeddings", 2048)),
                norm="rmsnorm", norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                activation=_activation(cfg.get("hidden_act", "silu"), where), gated_mlp=True,
                parallel_residual=False, tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=True if qwen else bool(cfg.get("attention_bias", False)),
                o_bias=False if qwen else bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                rotary_dim=int(hd * float(1.0 if partial is None else partial)), rope_theta=theta,
                rope_scaling=scaling, sliding_window=None if window is None else int(window), **ids)
    except KeyError as e:
        raise CheckpointError(f"{where}: the {model_type} config lacks {e.args[0]!r}") from None
    _check(arch, where)
    return arch


def _check(a: ArchConfig, where: str) -> None:
    if a.family != "llama" and a.d_model % a.n_heads:
        raise CheckpointError(f"{where}: hidden size {a.d_model} is not a multiple of the {a.n_heads} heads")
    if a.n_heads % a.n_kv_heads:
        raise CheckpointError(f"{where}: {a.n_heads} query heads are not a multiple of {a.n_kv_heads} key/value heads")
    if a.rotary_dim % 2:
        raise CheckpointError(f"{where}: the rotary dimension {a.rotary_dim} of each head is odd")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_mlp", "context_length"):
        if getattr(a, name) < 1:
            raise CheckpointError(f"{where}: {name} must be positive, got {getattr(a, name)}")
    scaling = dict(a.rope_scaling or ())
    if scaling.get("rope_type") == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                   if k not in scaling]
        if missing:
            raise CheckpointError(f"{where}: llama3 rope scaling lacks {missing}")
    if not math.isfinite(a.norm_eps) or a.norm_eps <= 0:
        raise CheckpointError(f"{where}: the normalisation epsilon must be positive, got {a.norm_eps}")
