"""How an index compresses each training sequence's gradient, and the maps that do it.

Every option is a pair of linear maps, one per side of a layer, applied in the factors'
eigenbasis. For a layer with augmented weight ``[d_a, d_out]`` and eigenbases ``Q_A``,
``Q_S``, the side maps are ``E_A = Q_A M_A [d_a, k_a]`` and ``E_S = Q_S M_S [d_out, k_s]``;
a training sequence with inputs ``ā [T, d_a]`` and output gradients ``g [T, d_out]`` is
stored as

    C = E_Aᵀ DW E_S = Σ_t (ā_t E_A)ᵀ (g_t E_S)   [k_a, k_s]

(factored: no per-position ``d_a × d_out`` matrix), and a preconditioned query gradient
``P_q`` is mapped the same way, ``K_q = E_Aᵀ P_q E_S``, so a score is ``⟨K_q, C⟩``.

* ``"none"``: ``M = I``. ``C = Q_Aᵀ DW Q_S`` is the full gradient in the eigenbasis and
  ``⟨K_q, C⟩ = ⟨P_q, DW⟩`` exactly (the rotation is orthogonal): the rescan's score.
* ``"truncate"``: ``M`` selects the ``k`` leading eigen-directions of each side, chosen by
  the row and column sums of Λ (for K-FAC these order as A's and S's eigenvalues; for
  EK-FAC they are the curvature each direction carries). The score keeps the terms of
  ``⟨Q_Aᵀ P Q_S, Q_Aᵀ DW Q_S⟩`` in the kept block.
* ``"select"``: keeps single eigen-coordinates ``(i, j)`` rather than whole directions:
  the ``fraction`` of all tracked coordinates (across layers) whose whitened variance
  ``Λ_ij / (Λ_ij + λ₀)`` is largest (at least one per layer). Both a stored row and a
  query key are ``G̃ / sqrt(Λ + λ₀)`` in whitened coordinates, so a score is a plain dot
  product over every layer's coordinates and this variance is what each one adds to the
  score's (for independent query and training gradients, coordinate by coordinate):
  the selection keeps the coordinates that carry the most score, where a truncation keeps
  a rectangle of them. The flat indices ``keep [k]`` into the row-major ``[d_a, d_out]``
  are the map; a score is the rescan's terms on the kept coordinates.
* ``"project"``: ``M`` is a Gaussian matrix ``N(0, 1/k)`` (LoGra-style, one per side, drawn
  from ``seed``): ``⟨K_q, C⟩`` is an unbiased estimate of the score.
* ``"sketch"``: one global random projection (bergson-style), as a count-sketch: every
  whitened eigen-coordinate ``(i, j)`` of a layer is added, with a random sign, into one of
  the layer's ``m`` buckets (a sparse Rademacher matrix ``R [d_a·d_out, m]``, one ±1 per
  row, drawn from ``seed``), so ``⟨R(K ⊙ W), R(C ⊘ W)⟩`` is an unbiased estimate of the
  score (E RRᵀ = I). The global budget ``round(fraction · Σ d_a·d_out)`` buckets is split
  across layers in proportion to each layer's whitened variance ``Σ Λ/(Λ+λ₀)`` (for
  independent query and training gradients the estimate's variance is
  ``Σ_l ‖K_l‖²‖C_l‖²/m_l``, least with ``m_l ∝ ‖K_l‖‖C_l‖``; with identity factors, to
  ``d_a·d_out``), at most ``d_a·d_out`` per layer. The coordinates are dealt to the
  buckets in a random order (each bucket ⌊D/m⌋ or ⌈D/m⌉ of them). The maps are each
  bucket's flat coordinates ``bucket [m, ⌈D/m⌉]`` (int32; ``D = d_a·d_out`` pads) and the
  signed whitening ``w = ±sqrt(Λ+λ₀)`` ``[D]`` (the sign folded in: dividing by it and
  multiplying by it apply the same sign). Unlike bergson it projects in the eigenbasis
  against preconditioned queries; the build forms each sequence's rotated gradient
  ``[d_a, d_out]``, as for a selection.
* ``"fidelity"``: a selection (the same maps as ``"select"``) whose share of each layer's
  coordinates is chosen at build time from a probe's measured top-10 agreement with exact
  scores (``fraction`` is the target agreement; :mod:`influence.index.choose`).
* ``"rank"``: the best rank-c approximation ``U Vᵀ`` (``U [d_a, c]``, ``V [d_out, c]``, a
  SVD on the host) of each sequence's whitened rotated gradient (LoRIF-style:
  ``Σ_t ā_t g_tᵀ`` has rank ≤ T, so c ≥ T is exact, and for T < d the SVD is of a T×T
  core between thin QRs); ``c·(d_a + d_out)`` numbers per layer, with c capped at
  ``min(c, T, d_a, d_out)`` per layer (the manifest's ``rank``): beyond that the columns are zeros.
  Its whitening is separable, ``W = w_A w_Sᵀ`` (so a rank-T gradient stays rank T).

``fraction`` is the share of each side's directions kept (so about ``fraction²`` of the
full gradient's numbers are stored), except for ``"select"``, where it is the share of
the coordinates kept, ``"sketch"``, where it is the buckets as a share of the coordinates,
and ``"fidelity"``, where it is the target top-10 agreement (``budget``: the byte cap).
The storage ``dtype`` is ``float32``, ``bfloat16``,
``int8`` or ``int4`` (two to a byte), the integers with one float32 scale per stored row
and layer (``max|C| / 127`` or ``/ 7``).

Whitening: except for ``"none"`` in float32 (the exact reference), the stored
coordinates are divided elementwise by ``W = sqrt(Λ + λ₀)`` (λ₀ = the default damping,
0.1 × mean Λ) and the query's multiplied by it, which leaves every score unchanged,
``⟨K ⊙ W, C ⊘ W⟩ = ⟨K, C⟩``, but spreads the rounding of bfloat16/int8/int4 and the noise of
a projection evenly over what the preconditioned score weighs (unwhitened, the
directions of small Λ, which the preconditioner amplifies, are rounded away). For a
projection ``W`` applies before projecting, so the build forms each sequence's rotated
gradient ``[d_a, d_out]`` (never a per-position one), as it does for a selection.

The dense reconstruction of a stored row in the eigenbasis (:func:`reconstruct`) is
``scatter(C ⊙ W)`` (truncation, selection) or ``W ⊙ (M_A C M_Sᵀ)`` (projection), ``[d_a, d_out]``;
a score is the query's rotated gradient ``Q_Aᵀ P Q_S`` dotted with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from influence.curvature.blocks import is_blocked, matmul_last
from influence.errors import ConfigError, ConfigTypeError, InfluenceError

METHODS = ("none", "truncate", "select", "project", "rank", "fidelity", "sketch")
MAP_KEYS = ("a", "s", "w", "wa", "ws", "keep", "bucket")
"""The arrays a layer's maps may hold (see :func:`compression_maps`)."""
DTYPES = ("float32", "bfloat16", "int8", "int4")
# Bytes per column of a shard file, and the dtype it holds (bfloat16 kept as its bits; int4
# packed two numbers to a byte).
ITEM_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1, "int4": 1}
FILE_DTYPES = {"float32": np.float32, "bfloat16": np.uint16, "int8": np.int8, "int4": np.uint8}
LEVELS = {"int8": 127, "int4": 7}
"""The integer dtypes, stored with one float32 scale per row and layer (``max|C| / levels``)."""


@dataclasses.dataclass(frozen=True)
class Compression:
    """What an index stores per training sequence and tracked layer.

    Attributes:
      method: ``"none"``, ``"truncate"``, ``"select"``, ``"project"`` or ``"rank"`` (see
        the module docstring).
      fraction: share of each side's directions kept (0 < fraction ≤ 1; 1 for ``"none"``
        and ``"rank"``); for ``"select"`` the share of all coordinates kept.
      dtype: ``"float32"``, ``"bfloat16"``, ``"int8"`` or ``"int4"`` (the integers with
        one scale per row and layer).
      seed: the projections' seed (``"project"`` only).
      rank: c, the rank kept per sequence and layer (``"rank"`` only; 0 otherwise).
      budget: ``"fidelity"`` only: the most stored bytes per sequence, as a share of the
        full float32 gradient's (1: no cap). The choice stops growing there, target
        reached or not (and says so).
    """

    method: str = "none"
    fraction: float = 1.0
    dtype: str = "float32"
    seed: int = 0
    rank: int = 0
    budget: float = 1.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"compression method must be one of {METHODS}, got {self.method!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"compression dtype must be one of {DTYPES}, got {self.dtype!r}")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, int | float) or not 0 < self.fraction <= 1:
            raise ConfigError(f"compression fraction must be in (0, 1], got {self.fraction!r}")
        if self.method == "none" and self.fraction != 1:
            raise ConfigError(f"compression 'none' keeps every direction (fraction 1), got fraction {self.fraction}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"compression seed must be an integer, got {self.seed!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or (self.rank < 1) == (self.method == "rank"):
            raise ConfigError(f"compression rank must be a positive integer for 'rank' and 0 otherwise, got "
                             f"{self.rank!r} for {self.method!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int | float) or not 0 < self.budget <= 1:
            raise ConfigError(f"compression budget must be in (0, 1], got {self.budget!r}")
        if self.budget != 1 and self.method != "fidelity":
            raise ConfigError(f"a byte budget caps a 'fidelity' choice; {self.method!r} stores a fixed size")
        if self.method == "rank" and self.fraction != 1:
            raise ConfigError("compression 'rank' keeps rank c of every sequence (rank:c), not a fraction")

    @classmethod
    def parse(cls, spec: Any) -> Compression:
        """A :class:`Compression` from itself, a dict of its fields, or a string
        ``method[:fraction][:dtype]``: ``"none"``, ``"none:bfloat16"``, ``"truncate:0.25"``,
        ``"select:0.25:int8"``, ``"project:0.125:int8"``, ``"rank:4:bfloat16"`` (for ``rank`` the number is c),
        ``"sketch:0.25:int8"``, ``"fidelity:0.95:0.0625:int4"`` (target, then the byte budget)."""
        if isinstance(spec, Compression):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        if not isinstance(spec, str):
            raise ConfigTypeError(f"compression must be a string, a dict or a Compression, got {type(spec).__name__}")
        parts = spec.split(":")
        method, numbers, dtype = parts[0], [], "float32"
        for part in parts[1:]:
            if part in DTYPES:
                dtype = part
            else:
                try:
                    numbers.append(float(part))
                except ValueError:
                    raise ConfigError(f"compression {spec!r}: {part!r} is neither a fraction nor one of {DTYPES}; "
                                     "write method[:fraction][:dtype], e.g. 'truncate:0.25:bfloat16'") from None
        if len(numbers) > (2 if method == "fidelity" else 1):
            raise ConfigError(f"compression {spec!r}: too many numbers; write method[:fraction][:dtype] "
                              "(fidelity: fidelity:target[:budget][:dtype])")
        fraction = numbers[0] if numbers else 1.0
        if len(numbers) == 2:
            return cls(method, fraction, dtype, budget=numbers[1])
        if method == "rank":
            if fraction != int(fraction) or fraction < 1:
                raise ConfigError(f"compression {spec!r}: write rank:c with c a positive integer")
            return cls(method, 1.0, dtype, rank=int(fraction))
        return cls(method, fraction, dtype)

    def __str__(self) -> str:
        text = self.method if self.method == "none" else f"{self.method}:{self.fraction:g}"
        if self.method == "rank":
            text = f"rank:{self.rank}"
        if self.budget != 1:
            text = f"{text}:{self.budget:g}"
        return text if self.dtype == "float32" else f"{text}:{self.dtype}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def kept(d: int, fraction: float) -> int:
    """Directions kept of a side of size ``d``: ``round(fraction·d)``, at least 1."""
    return max(1, min(d, int(round(fraction * d))))


def whitened(compression: Compression) -> bool:
    """Whether the stored coordinates are whitened (all but ``"none"`` in float32)."""
    return not (compression.method == "none" and compression.dtype == "float32")


def compression_maps(compression: Compression, layers: list[tuple[str, np.ndarray | None, int, int]]
                     ) -> dict[str, dict[str, np.ndarray]]:
    """Every layer's maps, from ``(name, eigenvalues [d_a, d_out] or None, d_a, d_out)`` in
    tracking order: :func:`side_maps` per layer, or the selection across all of them."""
    if compression.method == "select":
        return select_maps(compression.fraction, layers)
    if compression.method == "sketch":
        return sketch_maps(compression.fraction, layers, compression.seed)
    if compression.method == "fidelity":
        raise ConfigError("'fidelity' chooses its coordinates from a probe: use influence.index.choose")
    return {name: side_maps(compression, lam, d_a, d_out, i, name) for i, (name, lam, d_a, d_out) in enumerate(layers)}


def select_maps(fraction: float, layers: list[tuple[str, np.ndarray | None, int, int]]
                ) -> dict[str, dict[str, np.ndarray]]:
    """``"select"``: per layer the sorted flat indices ``keep [k]`` (int32, into the
    row-major ``[d_a, d_out]``) of the ``round(fraction · Σ d_a·d_out)`` coordinates of
    largest whitened variance ``Λ / (Λ + λ₀)`` over all layers (λ₀ = 0.1 × the layer's mean
    Λ; ties keep the earlier layer and index; at least one per layer), and the whitening
    ``w = sqrt(Λ + λ₀)`` on them ``[k]``."""
    variances, whitening = [], []
    for name, lam, _, _ in layers:
        if lam is None:
            raise InfluenceError(f"layer {name!r}: selection keeps the eigen-coordinates of largest curvature, but the "
                                 "factors (identity strategy) have no eigenvalues; use 'project' or 'none'")
        lam = np.maximum(np.asarray(lam, np.float64), 0.0).ravel()
        damp = 0.1 * max(float(lam.mean()), np.finfo(np.float32).tiny)
        variances.append(lam / (lam + damp))
        whitening.append(np.sqrt(lam + damp))
    sizes = np.array([len(v) for v in variances])
    total = int(sizes.sum())
    k = max(1, min(total, int(round(fraction * total))))
    chosen = np.zeros(total, bool)
    chosen[np.argsort(-np.concatenate(variances), kind="stable")[:k]] = True
    out, start = {}, 0
    for (name, *_), v, w, size in zip(layers, variances, whitening, sizes):
        mine = chosen[start:start + size]
        keep = np.flatnonzero(mine) if mine.any() else np.argsort(-v, kind="stable")[:1]
        out[name] = {"keep": keep.astype(np.int32), "w": w[keep].astype(np.float32)}
        start += size
    return out


def sketch_maps(fraction: float, layers: list[tuple[str, np.ndarray | None, int, int]], seed: int = 0
                ) -> dict[str, dict[str, np.ndarray]]:
    """``"sketch"``: per layer ``bucket [m_l, ⌈D/m_l⌉]`` (int32: each bucket's flat coordinates
    into the row-major ``[d_a, d_out]``, padded with ``D = d_a·d_out``) and the signed whitening
    ``w [D]`` (float32, ``±sqrt(Λ + λ₀)``, ±1 without eigenvalues),
    drawn from ``(seed, layer index)``; ``m_l`` splits ``round(fraction · Σ d_a·d_out)``
    buckets in proportion to ``Σ Λ/(Λ+λ₀)`` (or ``d_a·d_out``), each ``1 ≤ m_l ≤ d_a·d_out``."""
    sizes = np.array([d_a * d_out for _, _, d_a, d_out in layers])
    weights, whitening = [], []
    for (_, lam, _, _), size in zip(layers, sizes):
        if lam is None:
            weights.append(float(size))
            whitening.append(np.ones(size))
            continue
        lam = np.maximum(np.asarray(lam, np.float64), 0.0).ravel()
        damp = 0.1 * max(float(lam.mean()), np.finfo(np.float32).tiny)
        weights.append(float(np.sum(lam / (lam + damp))))
        whitening.append(np.sqrt(lam + damp))
    budget = max(len(layers), int(round(fraction * sizes.sum())))
    weights = np.maximum(np.array(weights), np.finfo(np.float64).tiny)
    widths = np.ones(len(layers), np.int64)
    # water-filling: share the budget by weight, capping each layer at its size
    for _ in range(len(layers)):
        free = widths < sizes
        left = budget - int(widths[~free].sum())
        share = np.floor(left * weights * free / max(float(np.sum(weights[free])), 1e-300)).astype(np.int64)
        widths = np.where(free, np.clip(share, 1, sizes), widths)
        if not np.any(free & (share > sizes)):
            break
    out = {}
    for i, ((name, *_), size, w, m) in enumerate(zip(layers, sizes, whitening, widths)):
        rng = np.random.default_rng([seed, i, 1])  # the 1 keeps these draws apart from 'project''s
        per = -(-int(size) // int(m))
        table = np.full(per * int(m), size, np.int64)
        table[:size] = rng.permutation(size)
        bucket = table.reshape(per, int(m)).T.astype(np.int32)  # [m, per]: coordinates dealt round-robin
        sign = rng.integers(0, 2, size) * 2.0 - 1.0
        out[name] = {"bucket": bucket, "w": (sign * w).astype(np.float32)}
    return out


def side_maps(compression: Compression, eigenvalues: np.ndarray | None, d_a: int, d_out: int,
              layer_index: int, name: str = "") -> dict[str, np.ndarray]:
    """The maps of one layer as arrays for a file: ``M_A``, ``M_S`` (absent for ``"none"``;
    sorted int32 indices ``a [k_a]``, ``s [k_s]`` for ``"truncate"``; float32 matrices
    ``a [d_a, k_a]``, ``s [d_out, k_s]`` for ``"project"``) and the whitening ``w``
    (``[k_a, k_s]`` on the kept block, ``[d_a, d_out]`` before a projection)."""
    if compression.method in ("select", "sketch"):
        raise ConfigError(f"{compression.method!r} shares its budget across all layers at once: use compression_maps")
    maps = _side_maps(compression, eigenvalues, d_a, d_out, layer_index, name)
    if compression.method == "rank":
        if eigenvalues is not None:  # separable: w_A w_Sᵀ ≈ sqrt(Λ + λ₀) (exactly so for K-FAC's Λ)
            lam = np.asarray(eigenvalues, np.float64)
            mean = max(float(lam.mean()), np.finfo(np.float32).tiny)
            maps["wa"] = np.sqrt((lam.mean(axis=1) + 0.1 * mean) / np.sqrt(1.1 * mean)).astype(np.float32)
            maps["ws"] = np.sqrt((lam.mean(axis=0) + 0.1 * mean) / np.sqrt(1.1 * mean)).astype(np.float32)
        return maps
    if whitened(compression) and eigenvalues is not None:
        lam = np.asarray(eigenvalues, np.float64)
        w = np.sqrt(lam + 0.1 * max(float(lam.mean()), np.finfo(np.float32).tiny))
        if compression.method == "truncate":
            w = w[maps["a"][:, None], maps["s"][None, :]]
        maps["w"] = w.astype(np.float32)
    return maps


def _side_maps(compression: Compression, eigenvalues, d_a: int, d_out: int, layer_index: int,
               name: str) -> dict[str, np.ndarray]:
    if compression.method in ("none", "rank"):
        return {}
    k_a, k_s = kept(d_a, compression.fraction), kept(d_out, compression.fraction)
    if compression.method == "truncate":
        if eigenvalues is None:
            raise InfluenceError(f"layer {name!r}: truncation keeps the leading eigen-directions, but the factors "
                                 "(identity strategy) have no eigenvalues; use 'project' or 'none'")
        lam = np.asarray(eigenvalues, np.float64)
        # Stable descending order: ties keep the lower index, so the choice is deterministic.
        a = np.sort(np.argsort(-lam.sum(axis=1), kind="stable")[:k_a]).astype(np.int32)
        s = np.sort(np.argsort(-lam.sum(axis=0), kind="stable")[:k_s]).astype(np.int32)
        return {"a": a, "s": s}
    rng = np.random.default_rng([compression.seed, layer_index])
    a = (rng.standard_normal((d_a, k_a)) / np.sqrt(k_a)).astype(np.float32)
    s = (rng.standard_normal((d_out, k_s)) / np.sqrt(k_s)).astype(np.float32)
    return {"a": a, "s": s}


class LayerMap(NamedTuple):
    """One layer's maps on the device: rotations (``None`` without an eigenbasis; a tuple
    of blocks for a split layer), then ``M`` (``None``, int indices or a matrix), and the
    whitening ``w`` (``None``, or as :func:`side_maps` makes it)."""

    q_a: Any
    q_s: Any
    m_a: jax.Array | None
    m_s: jax.Array | None
    w: jax.Array | None = None
    wa: jax.Array | None = None  # rank-c: separable whitening w_A [d_a]
    ws: jax.Array | None = None  # and w_S [d_out]
    keep: jax.Array | None = None  # selection: flat indices [k] into the rotated [d_a, d_out]
    bucket: jax.Array | None = None  # sketch: each bucket's flat coordinates [m, ⌈D/m⌉] (w then signed)


def _projects(layer: LayerMap) -> bool:
    return layer.m_a is not None and not jnp.issubdtype(layer.m_a.dtype, jnp.integer)


def apply_side(x: jax.Array, q: Any, m: jax.Array | None) -> jax.Array:
    """``x @ Q @ M`` over the last axis of ``x`` ``[..., d]`` → ``[..., k]``. With a dense
    rotation and a selection, only the kept columns of ``Q`` are multiplied (a
    truncation's build and query cost scale with the directions kept, not with ``d``)."""
    if q is not None and m is not None and jnp.issubdtype(m.dtype, jnp.integer) and not is_blocked(q):
        return x @ jnp.take(q, m, axis=1)
    if q is not None:
        x = matmul_last(x, q)
    if m is None:
        return x
    if jnp.issubdtype(m.dtype, jnp.integer):
        return jnp.take(x, m, axis=-1)
    return x @ m


def map_training(a: jax.Array, g: jax.Array, layer: LayerMap, rank: int = 0) -> jax.Array:
    """Stored rows ``C [B, k_a·k_s]`` of a batch with ``a [B, T, d_a]``, ``g [B, T, d_out]``:
    ``Σ_t (ā_t E_A)ᵀ (g_t E_S)`` per example, flattened row-major. For ``"rank"`` (``rank``
    = c) the whitened rotated tokens ``[B, T·(d_a + d_out)]``, which :func:`rank_rows`
    turns into the stored ``U``, ``V`` on the host."""
    if rank:  # the whitened rotated token factors [B, T·(d_a + d_out)]; the host factorises them (rank_rows)
        left, right = apply_side(a, layer.q_a, None), apply_side(g, layer.q_s, None)
        if layer.wa is not None:
            left, right = left / layer.wa, right / layer.ws
        return jnp.concatenate([left.reshape(left.shape[0], -1), right.reshape(right.shape[0], -1)], axis=-1)
    if layer.keep is not None or layer.bucket is not None or (_projects(layer) and layer.w is not None):
        # the rotated gradient [B, d_a, d_out]
        rotated = jnp.einsum("bti,btj->bij", apply_side(a, layer.q_a, None), apply_side(g, layer.q_s, None))
        if layer.bucket is not None:  # signed, whitened, summed into buckets
            return _sketch(rotated.reshape(rotated.shape[0], -1) / layer.w, layer)
        if layer.keep is not None:  # the selected coordinates, whitened
            return jnp.take(rotated.reshape(rotated.shape[0], -1), layer.keep, axis=1) / layer.w
        # whiten, then project
        c = jnp.einsum("ia,bij,js->bas", layer.m_a, rotated / layer.w, layer.m_s)
        return c.reshape(c.shape[0], -1)
    left = apply_side(a, layer.q_a, layer.m_a)  # [B, T, k_a]
    right = apply_side(g, layer.q_s, layer.m_s)  # [B, T, k_s]
    c = jnp.einsum("bta,bts->bas", left, right)
    if layer.w is not None:
        c = c / layer.w
    return c.reshape(c.shape[0], -1)


def rank_rows(tokens: np.ndarray, d_a: int, d_out: int, rank: int) -> np.ndarray:
    """Stored rank-c rows ``[B, c·(d_a + d_out)]`` (``U`` then ``V``, row-major) from the
    whitened rotated tokens :func:`map_training` gives for ``"rank"``."""
    n = tokens.shape[0]
    t = tokens.shape[1] // (d_a + d_out)
    left = tokens[:, : t * d_a].reshape(n, t, d_a)
    right = tokens[:, t * d_a:].reshape(n, t, d_out)
    u, v = rank_factors(left, right, rank)
    return np.concatenate([u.reshape(n, -1), v.reshape(n, -1)], axis=-1).astype(np.float32)


def rank_factors(left: np.ndarray, right: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The best rank-``rank`` ``U Vᵀ`` of ``Σ_t l_t r_tᵀ`` per example (``left [B, T, d_a]``,
    ``right [B, T, d_out]``), zero-padded to ``rank`` columns, each column pair of equal
    norm. With T ≤ rank the tokens themselves are exact factors; with T below both sizes,
    the SVD of a T×T core between thin QRs of each side; otherwise the SVD of the
    ``[d_a, d_out]`` sum. Host LAPACK (numpy, float64, one BLAS thread)."""
    import threadpoolctl

    left, right = np.asarray(left, np.float64), np.asarray(right, np.float64)
    tokens, d_a, d_out = left.shape[1], left.shape[2], right.shape[2]

    def pad(x):
        return np.pad(x, ((0, 0), (0, 0), (0, rank - x.shape[-1])))

    if tokens <= rank:
        return _balanced(pad(np.swapaxes(left, 1, 2)), pad(np.swapaxes(right, 1, 2)))
    with threadpoolctl.threadpool_limits(1):
        if tokens < min(d_a, d_out):
            q_l, r_l = np.linalg.qr(np.swapaxes(left, 1, 2))  # [B, d_a, T], [B, T, T]
            q_r, r_r = np.linalg.qr(np.swapaxes(right, 1, 2))
            u, s, vt = np.linalg.svd(r_l @ np.swapaxes(r_r, 1, 2))  # the T×T core
            u, v = q_l @ u, q_r @ np.swapaxes(vt, 1, 2)
        else:
            u, s, vt = np.linalg.svd(np.einsum("bti,btj->bij", left, right), full_matrices=False)
            v = np.swapaxes(vt, 1, 2)
    c = min(rank, s.shape[-1])
    return _balanced(pad(u[..., :c] * s[:, None, :c]), pad(v[..., :c]))


def _balanced(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same ``U Vᵀ`` with each column pair of equal norm, so one int8 scale per row
    suits both halves."""
    nu, nv = np.linalg.norm(u, axis=1, keepdims=True), np.linalg.norm(v, axis=1, keepdims=True)
    alpha = np.where((nu > 0) & (nv > 0), np.sqrt(nv / np.where(nu > 0, nu, 1.0)), 1.0)
    return u * alpha, v / alpha


def map_queries(queries, layer: LayerMap, rank: int = 0) -> jax.Array:
    """``K [Q, k_a·k_s]`` = ``E_Aᵀ P_q E_S`` of a layer's preconditioned queries (a
    :class:`~influence.scoring.preconditioned.LayerQueries`, full or rank r). For ``"rank"``
    (``rank`` = c) the dense ``[Q, d_a·d_out]`` (whitened), which rows of ``U Vᵀ`` are dotted with."""
    if rank:
        k = _rotated_queries(queries, layer)
        if layer.wa is not None:
            k = k * layer.wa[:, None] * layer.ws[None, :]
        return k.reshape(k.shape[0], -1)
    if layer.keep is not None:
        k = _rotated_queries(queries, layer)
        return jnp.take(k.reshape(k.shape[0], -1), layer.keep, axis=1) * layer.w
    if layer.bucket is not None:
        k = _rotated_queries(queries, layer)
        return _sketch(k.reshape(k.shape[0], -1) * layer.w, layer)
    if _projects(layer) and layer.w is not None:
        rotated = _rotated_queries(queries, layer)
        k = jnp.einsum("ia,qij,js->qas", layer.m_a, rotated * layer.w, layer.m_s)
        return k.reshape(k.shape[0], -1)
    if queries.full is not None:
        p = apply_side(queries.full, layer.q_s, layer.m_s)  # [Q, d_a, k_s]
        k = jnp.swapaxes(apply_side(jnp.swapaxes(p, -1, -2), layer.q_a, layer.m_a), -1, -2)  # [Q, k_a, k_s]
    else:
        left = apply_side(jnp.swapaxes(queries.left, -1, -2), layer.q_a, layer.m_a)  # [Q, r, k_a]
        right = apply_side(jnp.swapaxes(queries.right, -1, -2), layer.q_s, layer.m_s)  # [Q, r, k_s]
        k = jnp.einsum("qra,qrs->qas", left, right)
    if layer.w is not None:
        k = k * layer.w
    return k.reshape(k.shape[0], -1)


def _sketch(x: jax.Array, layer: LayerMap) -> jax.Array:
    """``x [B, D]`` summed into the layer's buckets ``[B, m]`` (signs already applied): a
    gather of each bucket's coordinates (the pad index ``D`` reads a zero)."""
    return jnp.take(jnp.pad(x, ((0, 0), (0, 1))), layer.bucket, axis=1).sum(axis=-1)


def _rotated_queries(queries, layer: LayerMap) -> jax.Array:
    """The preconditioned queries in the eigenbasis, dense: ``Q_Aᵀ P_q Q_S [Q, d_a, d_out]``."""
    full = queries.dense()
    return jnp.swapaxes(apply_side(jnp.swapaxes(apply_side(full, layer.q_s, None), -1, -2), layer.q_a, None), -1, -2)


def encode(c: jax.Array, dtype: str) -> tuple[jax.Array, ...]:
    """Stored form of rows ``c [B, D]`` float32: ``(data,)``, or ``(integer data, scales
    [B])`` (int8 ``[B, D]``; int4 packed two to a byte, ``uint8 [B, ⌈D/2⌉]``: column j's low
    nibble is number j, its high nibble number j + ⌈D/2⌉)."""
    if dtype == "float32":
        return (c.astype(jnp.float32),)
    if dtype == "bfloat16":
        return (jax.lax.bitcast_convert_type(c.astype(jnp.bfloat16), jnp.uint16),)
    top = LEVELS[dtype]
    scale = jnp.max(jnp.abs(c), axis=-1) / float(top)
    q = jnp.clip(jnp.round(c / jnp.where(scale > 0, scale, 1.0)[:, None]), -top, top).astype(jnp.int8)
    if dtype == "int4":
        q = _pack4(q, jnp)
    return q, scale.astype(jnp.float32)


def encode_numpy(c: np.ndarray, dtype: str) -> tuple[np.ndarray, ...]:
    """:func:`encode` on the host (the same roundings: to nearest, ties to even)."""
    c = np.asarray(c, np.float32)
    if dtype == "float32":
        return (c,)
    if dtype == "bfloat16":
        return (c.astype(jnp.bfloat16).view(np.uint16),)
    top = LEVELS[dtype]
    scale = (np.max(np.abs(c), axis=-1) / np.float32(top)).astype(np.float32)
    q = np.clip(np.round(c / np.where(scale > 0, scale, np.float32(1.0))[:, None]), -top, top).astype(np.int8)
    return (_pack4(q, np) if dtype == "int4" else q), scale


def _pack4(q, xp):
    """int8 ``[B, D]`` in [-7, 7] → uint8 ``[B, ⌈D/2⌉]``, low nibbles the first half."""
    half = -(-q.shape[-1] // 2)
    q = xp.pad(q, ((0, 0), (0, 2 * half - q.shape[-1]))).astype(xp.uint8)
    return (q[:, :half] & 0xF) | (q[:, half:] << 4)


def _unpack4(packed, xp):
    """uint8 ``[B, h]`` → the signed numbers ``int8 [B, 2h]`` (:func:`_pack4`'s order)."""
    return xp.concatenate(nibbles(packed, xp), axis=-1)


def nibbles(packed, xp=jnp):
    """uint8 ``[B, h]`` → its low and high nibbles as signed ``int8 [B, h]`` each: the
    first and the second half of the packed row (:func:`_pack4`)."""
    signed = packed.view(xp.int8)  # arithmetic shifts sign-extend each nibble
    return xp.right_shift(xp.left_shift(signed, 4), 4), xp.right_shift(signed, 4)


def stored_width(width: int, dtype: str) -> int:
    """Columns of a shard file for ``width`` numbers per row (int4 packs two per byte)."""
    return -(-width // 2) if dtype == "int4" else width


def row_bytes(width: int, dtype: str) -> int:
    """Stored bytes of one row of one layer, its scale included."""
    return stored_width(width, dtype) * ITEM_BYTES[dtype] + (4 if dtype in LEVELS else 0)


def levels(parts: tuple, dtype: str) -> jax.Array:
    """The stored numbers of integer rows as float32 ``[B, D']`` before their scale (int4:
    ``D'`` = 2⌈D/2⌉, the last column a zero pad for odd D)."""
    return (_unpack4(parts[0], jnp) if dtype == "int4" else parts[0]).astype(jnp.float32)


def decode(parts: tuple, dtype: str, shape: tuple[int, int, int] | None = None) -> jax.Array:
    """Float32 rows ``[B, D]`` of the stored form :func:`encode` returns (int4 of odd D: a
    zero column after them); with ``shape = (d_a, d_out, c)`` (rank-c rows), the dense
    ``[B, d_a·d_out]`` of ``U Vᵀ``."""
    if dtype == "float32":
        rows = parts[0]
    elif dtype == "bfloat16":
        rows = jax.lax.bitcast_convert_type(parts[0], jnp.bfloat16).astype(jnp.float32)
    else:
        rows = levels(parts, dtype) * parts[1][:, None]
    if shape is None:
        return rows
    d_a, d_out, c = shape
    u = rows[:, : d_a * c].reshape(-1, d_a, c)
    v = rows[:, d_a * c: d_a * c + d_out * c].reshape(-1, d_out, c)
    return jnp.einsum("nic,njc->nij", u, v).reshape(rows.shape[0], -1)


def decode_numpy(data: np.ndarray, scale: np.ndarray | None, dtype: str, width: int | None = None) -> np.ndarray:
    """:func:`decode` on the host, in numpy (for checks and readers without JAX); ``width``
    drops int4's padding column of odd widths."""
    if dtype == "float32":
        rows = np.asarray(data, np.float32)
    elif dtype == "bfloat16":
        rows = (np.asarray(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        ints = _unpack4(np.ascontiguousarray(data, np.uint8), np) if dtype == "int4" else data
        rows = np.asarray(ints, np.float32) * np.asarray(scale, np.float32)[:, None]
    return rows if width is None else rows[:, :width]


def reconstruct(c: np.ndarray, maps: dict[str, np.ndarray], d_a: int, d_out: int, rank: int = 0) -> np.ndarray:
    """Dense rows ``[N, d_a, d_out]`` in the eigenbasis of stored rows ``c [N, k_a·k_s]``
    (numpy, float64; see the module docstring): what a query's rotated gradient is dotted with."""
    c = np.asarray(c, np.float64)
    if rank:
        u = c[:, : d_a * rank].reshape(-1, d_a, rank)
        v = c[:, d_a * rank:].reshape(-1, d_out, rank)
        dense = np.einsum("nic,njc->nij", u, v)
        if "wa" in maps:
            dense = dense * np.outer(maps["wa"], maps["ws"])
        return dense
    w = maps["w"].astype(np.float64) if "w" in maps else 1.0
    if "bucket" in maps:  # each coordinate's unbiased estimate: its bucket, signed and unwhitened
        of = np.empty(d_a * d_out + 1, np.int64)  # each coordinate's bucket
        of[maps["bucket"].ravel()] = np.repeat(np.arange(maps["bucket"].shape[0]), maps["bucket"].shape[1])
        return (c[:, of[:-1]] * w).reshape(-1, d_a, d_out)
    if "keep" in maps:
        out = np.zeros((c.shape[0], d_a * d_out))
        out[:, maps["keep"]] = c * w
        return out.reshape(-1, d_a, d_out)
    if "a" not in maps:
        return c.reshape(-1, d_a, d_out) * w
    a, s = maps["a"], maps["s"]
    if np.issubdtype(a.dtype, np.integer):
        out = np.zeros((c.shape[0], d_a, d_out))
        out[:, a[:, None], s[None, :]] = c.reshape(-1, len(a), len(s)) * w
        return out
    c = c.reshape(-1, a.shape[1], s.shape[1])
    return np.einsum("ia,nab,jb->nij", a.astype(np.float64), c, s.astype(np.float64)) * w
