"""Fitting curvature factors over the training data, and their persistence.

``fit_factors`` streams the training set through jitted kernels:

1. covariance pass (kfac, ekfac): A = Σ w ā āᵀ / Σ w and S = Σ w g gᵀ / Σ w over
   counted tokens, then eigendecompositions in float64 on the host;
2. eigenvalue pass (ekfac; diagonal without rotation): Λ = mean over examples of
   (Q_Aᵀ DW_n Q_S)², DW_n the per-example gradient summed over tokens (George et al.
   2018; Grosse et al. 2023 §3.1).

The passes (:mod:`influence.fitting`) are data-parallel over a device mesh and can be
checkpointed and resumed; a layer's factors can be split into diagonal blocks
(:mod:`influence.curvature.blocks`) and kept in bfloat16.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import threadpoolctl
from flax import nnx

from influence.runtime import io
from influence.capture.tracking import LayerFilter, LayerInfo, TrackedModel, track
from influence.runtime.checkpoint import Checkpoint
from influence.runtime.io import digest_arrays
from influence.curvature import STRATEGIES, LayerCurvature, default_damping
from influence.curvature import blocks as blocks_
from influence.curvature.layer import arrays_of
from influence.runtime.data import DataError, as_source
from influence.fitting import (
    COVARIANCE_PASS,
    EIGENVALUE_PASS,
    covariance_zeros,
    eigenvalue_zeros,
    run_pass,
)
from influence.runtime.mesh import MeshLike, data_mesh, describe, local_batch_size, reduce_slots, replicate, to_host

FISHER_KINDS = ("sampled", "empirical", "exact")
_FILE_KIND = "influence-factors"
_FIELDS = LayerCurvature._fields
_THREADED_EIGH_SIZE = 2048
FACTOR_DTYPES = ("float32", "bfloat16")


def as_factor_dtype(dtype: Any) -> np.dtype:
    """``float32`` or ``bfloat16`` as a numpy dtype (bfloat16 from ml_dtypes, via jax)."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in FACTOR_DTYPES:
        raise ValueError(f"factor_dtype must be one of {FACTOR_DTYPES}, got {dtype!r}")
    return np.dtype(jnp.bfloat16) if name == "bfloat16" else np.dtype(np.float32)


def curvature_arrays(layers: dict[str, LayerCurvature], prefix: str = "") -> dict[str, np.ndarray]:
    """Flat ``{"<prefix><layer>/<field>[/<block>]": float32 array}`` for a file."""
    arrays = {}
    for name, curv in layers.items():
        for field, x in zip(_FIELDS, curv):
            if x is None:
                continue
            if blocks_.is_blocked(x):
                for i, block in enumerate(x):
                    arrays[f"{prefix}{name}/{field}/{i}"] = np.asarray(block, np.float32)
            else:
                arrays[f"{prefix}{name}/{field}"] = np.asarray(x, np.float32)
    return arrays


def curvature_from_arrays(arrays: dict[str, np.ndarray], names, dtype: np.dtype, prefix: str = "") -> dict[str, LayerCurvature]:
    """Inverse of :func:`curvature_arrays`, in ``dtype``."""
    layers = {}
    for name in names:
        fields = []
        for field in _FIELDS:
            key = f"{prefix}{name}/{field}"
            if key in arrays:
                fields.append(arrays[key].astype(dtype))
            elif f"{key}/0" in arrays:
                count = sum(1 for k in arrays if k.startswith(f"{key}/"))
                fields.append(tuple(arrays[f"{key}/{i}"].astype(dtype) for i in range(count)))
            else:
                fields.append(None)
        layers[name] = LayerCurvature(*fields)
    return layers


class Factors:
    """Fitted curvature of every tracked layer, plus what it was fitted on.

    Attributes:
      strategy: ``"identity"``, ``"diagonal"``, ``"kfac"`` or ``"ekfac"``.
      layers: layer name -> :class:`~influence.curvature.LayerCurvature` (numpy, in
        ``dtype``; a layer split into blocks has tuples of blocks for ``q_a``/``q_s``).
      metadata: JSON-serialisable facts: layer shapes, ``n_examples``, ``n_tokens``,
        ``fisher``, ``fingerprint`` (model structure), ``blocks`` (split layers),
        ``dtype``, ``mesh``, ``version``, ``created``.
    """

    def __init__(self, strategy: str, layers: dict[str, LayerCurvature], metadata: dict[str, Any]):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
        self.strategy = strategy
        self.layers = dict(layers)
        self.metadata = dict(metadata)
        self._check_finite()

    def __repr__(self) -> str:
        return (
            f"Factors(strategy={self.strategy!r}, layers={len(self.layers)}, "
            f"n_examples={self.metadata.get('n_examples')}, fisher={self.metadata.get('fisher')!r})"
        )

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(self.layers)

    @property
    def dtype(self) -> np.dtype:
        """The dtype the factors are kept in (``float32`` or ``bfloat16``)."""
        return as_factor_dtype(self.metadata.get("dtype", "float32"))

    @property
    def layer_infos(self) -> tuple[LayerInfo, ...]:
        return tuple(LayerInfo(**info) for info in self.metadata["layers"])

    def damping(self, name: str, damping: float | None = None) -> float:
        """The damping λ of layer ``name``: ``damping`` if given, else 0.1 × mean(Λ)."""
        if damping is not None:
            if not np.isfinite(damping) or damping < 0:
                raise ValueError(f"damping must be a finite non-negative float, got {damping}")
            return float(damping)
        return default_damping(self.layers[name])

    def _check_finite(self) -> None:
        for name, curv in self.layers.items():
            for field, x in zip(_FIELDS, curv):
                if not all(np.all(np.isfinite(np.asarray(arr, np.float32))) for arr in arrays_of(x)):
                    raise FloatingPointError(
                        f"factors of layer {name!r} hold NaN/Inf in {field}; the loss or the layer's inputs "
                        "were not finite on the fitting data"
                    )

    def check_compatible(self, tracked: TrackedModel) -> None:
        """Raise ``ValueError`` unless the factors were fitted on a model of this structure."""
        ours = {i.name: (i.d_in, i.d_out, i.has_bias) for i in self.layer_infos}
        theirs = {i.name: (i.d_in, i.d_out, i.has_bias) for i in tracked.layers}
        if ours != theirs or self.metadata.get("fingerprint") != tracked.fingerprint:
            diff = sorted(set(ours.items()) ^ set(theirs.items()))
            detail = f"; differing layers (name, (d_in, d_out, bias)): {diff[:6]}" if diff else ""
            raise ValueError(
                f"these factors were fitted on a model of another structure (fingerprint "
                f"{self.metadata.get('fingerprint')} vs {tracked.fingerprint}){detail}"
            )

    # --- persistence -------------------------------------------------------------

    @staticmethod
    def _file(path: str | os.PathLike) -> Path:
        path = Path(path)
        return path if path.suffix == ".npz" else path / "factors.npz"

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically to ``path/factors.npz`` (or to ``path`` if it ends in .npz).
        Arrays are stored as float32 (bfloat16 factors convert exactly both ways)."""
        arrays = curvature_arrays(self.layers)
        file = self._file(path)
        io.save_arrays(file, _FILE_KIND, arrays, {"strategy": self.strategy, **self.metadata})
        return file

    @classmethod
    def load(cls, path: str | os.PathLike, model: nnx.Module | None = None) -> Factors:
        """Read factors saved by :meth:`save`; with ``model``, also check it matches."""
        arrays, metadata = io.load_arrays(cls._file(path), _FILE_KIND)
        strategy = metadata.pop("strategy")
        names = [info["name"] for info in metadata["layers"]]
        layers = curvature_from_arrays(arrays, names, as_factor_dtype(metadata.get("dtype", "float32")))
        factors = cls(strategy, layers, metadata)
        if model is not None:
            factors.check_compatible(track(model, factors.layer_names))
        return factors


def _eigh(matrix: np.ndarray, name: str, which: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric eigendecomposition in float64; tiny negative eigenvalues clipped to 0."""
    m = np.asarray(matrix, np.float64)
    if not np.all(np.isfinite(m)):
        raise FloatingPointError(f"factor {which} of layer {name!r} holds NaN/Inf; the loss or inputs were not finite")
    # LAPACK's divide-and-conquer driver on one BLAS thread for small factors: threaded
    # BLAS spinning against JAX's own threads made a 256×256 eigh take 0.5 s instead of 13 ms.
    limit = 1 if m.shape[0] < _THREADED_EIGH_SIZE else None
    with threadpoolctl.threadpool_limits(limit):
        # overwrite_a: the symmetrised copy is LAPACK's work array (one d² float64 less at peak)
        eigenvalues, vectors = scipy.linalg.eigh(0.5 * (m + m.T), driver="evd", overwrite_a=True, check_finite=False)
    return np.clip(eigenvalues, 0.0, None), vectors




def _eigendecompose(totals: dict, n_tokens: dict[str, float], n_examples: int, layer_blocks, dtype) -> dict[str, LayerCurvature]:
    """K-FAC curvature of every layer from its summed token covariances (on the devices),
    one factor block at a time in float64 on the host."""
    curvature = {}
    for name, (a_sum, s_sum) in totals.items():
        if n_tokens[name] <= 0:
            raise DataError(f"layer {name!r}: no token of the data is counted (all masked)")
        split = not layer_blocks[name].dense
        a_parts = [_eigh(to_host(m, np.float64) / n_tokens[name], name, "A") for m in (a_sum if split else (a_sum,))]
        s_parts = [_eigh(to_host(m, np.float64) / n_tokens[name], name, "S") for m in (s_sum if split else (s_sum,))]
        e_a = np.concatenate([e for e, _ in a_parts])
        e_s = np.concatenate([e for e, _ in s_parts])
        q_a = tuple(q.astype(dtype) for _, q in a_parts) if split else a_parts[0][1].astype(dtype)
        q_s = tuple(q.astype(dtype) for _, q in s_parts) if split else s_parts[0][1].astype(dtype)
        # K-FAC "expand": a sequence's curvature is its T̄ tokens' summed, so Λ for a
        # per-sequence Gauss-Newton is T̄ A⊗S (T̄ = 1 for one output per example).
        tokens_per_example = n_tokens[name] / n_examples
        curvature[name] = LayerCurvature(
            q_a, q_s, (tokens_per_example * np.outer(e_a, e_s)).astype(dtype), e_a.astype(dtype), e_s.astype(dtype),
        )
    return curvature


def _key_settings(key: jax.Array) -> list[int]:
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.asarray(data).ravel().tolist()


def fit_factors(
    model: nnx.Module,
    task: Any,
    data: Any,
    *,
    strategy: str = "ekfac",
    fisher: str = "sampled",
    key: jax.Array | None = None,
    layers: LayerFilter = None,
    batch_size: int = 32,
    progress: bool = True,
    mesh: MeshLike = None,
    blocks: Any = None,
    max_block_size: int | None = None,
    factor_dtype: Any = "float32",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
) -> Factors:
    """Fit the curvature approximation ``strategy`` on ``data``.

    Args:
      model: a ``flax.nnx.Module`` at its final weights (put it in eval mode).
      task: an :class:`influence.Task` (e.g. ``tasks.Classification()``).
      data: training data: a dict of arrays, a ``datasets.Dataset``, a list of dict
        batches, or a callable returning an iterable of dict batches. With several
        processes, each passes its own shard (see :mod:`influence.runtime.hosts`).
      strategy: ``"identity"``, ``"diagonal"``, ``"kfac"`` or ``"ekfac"``.
      fisher: ``"sampled"`` (targets drawn from the model: the true Fisher, which
        equals the Gauss-Newton matrix for the built-in losses), ``"empirical"`` (the
        data's labels) or ``"exact"`` (the exact expectation, when the task provides
        ``fisher_directions``; costs one backward pass per output).
      key: PRNG key for sampled targets (default ``jax.random.key(0)``).
      layers: which ``nnx.Linear`` layers to track (see :func:`influence.capture.track`).
      batch_size: examples per jitted step, over all devices and processes (the last
        batch is padded); a multiple of the number of devices.
      progress: show progress bars.
      mesh: devices to fit on, data-parallel: ``None`` (one device), an int (the first
        n devices), a list of devices, or a ``jax.sharding.Mesh`` (all its devices
        split the batch). The factors equal the one-device factors to rounding.
      blocks: split layers' factors into diagonal blocks to bound their memory: an int,
        a pair ``(n_a, n_s)``, or ``{layer name or pattern: int or pair}``
        (see :func:`influence.curvature.blocks.resolve`).
      max_block_size: split every factor larger than this into blocks no larger.
      factor_dtype: ``"float32"`` or ``"bfloat16"``: the dtype the eigenbases and
        eigenvalues are kept in, on device and in the result (sums are accumulated in
        float32 and eigendecompositions run in float64 on the host either way).
      checkpoint_dir: save the running sums there every ``checkpoint_every`` batches
        and on interruption, and resume from them (``resume=True``) when the same call
        is made again. Different data, model or settings are refused
        (:class:`influence.runtime.checkpoint.CheckpointMismatch`); ``resume=False`` starts afresh.

    Returns:
      :class:`Factors`; ``Q_A [d_a, d_a]``, ``Q_S [d_out, d_out]`` (tuples of diagonal
      blocks for a split layer), ``Λ [d_a, d_out]`` per layer as the strategy requires.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if fisher not in FISHER_KINDS:
        raise ValueError(f"unknown fisher {fisher!r}; expected one of {FISHER_KINDS}")
    dtype = as_factor_dtype(factor_dtype)
    mesh = data_mesh(mesh)
    tracked = track(model, layers)
    key = jax.random.key(0) if key is None else key
    source = as_source(data, local_batch_size(batch_size, mesh), task)
    if strategy == "ekfac" and source.single_pass:
        raise DataError("ekfac reads the data twice; pass a list, a datasets.Dataset or a callable, not a one-shot iterator")
    layer_blocks = blocks_.resolve(tracked.layers, blocks, max_block_size)
    metadata: dict[str, Any] = {
        "layers": [info._asdict() for info in tracked.layers],
        "fisher": fisher,
        "fingerprint": tracked.fingerprint,
        "dtype": dtype.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if blocks_.as_metadata(layer_blocks):
        metadata["blocks"] = blocks_.as_metadata(layer_blocks)
    curvature = {info.name: LayerCurvature() for info in tracked.layers}
    if strategy == "identity":
        return Factors(strategy, curvature, {**metadata, "n_examples": source.num_examples, "n_tokens": None})

    checkpoint = None
    if checkpoint_dir is not None:
        settings = {
            "strategy": strategy, "fisher": fisher, "batch_size": batch_size, "key": _key_settings(key),
            "layers": metadata["layers"], "blocks": metadata.get("blocks"), "dtype": dtype.name,
            "model": tracked.fingerprint, "weights": digest_arrays(tracked.state), "processes": jax.process_count(),
        }
        checkpoint = Checkpoint(checkpoint_dir, "factors", settings, every=checkpoint_every, resume=resume)
    resumed = checkpoint.load() if checkpoint is not None else None
    resumed_pass = resumed[0]["pass"] if resumed is not None else None
    on_mesh = dataclasses.replace(tracked, state=replicate(tracked.state, mesh))
    common = dict(tracked=on_mesh, task=task, fisher=fisher, source=source, mesh=mesh, key=key,
                  blocks=tuple(layer_blocks[i.name] for i in tracked.layers), progress=progress, checkpoint=checkpoint)

    n_tokens = None
    rotations = {info.name: (None, None) for info in tracked.layers}
    if strategy in ("kfac", "ekfac"):
        if resumed_pass == EIGENVALUE_PASS:  # the covariance pass finished before the interruption
            arrays = resumed[1]
            curvature = curvature_from_arrays(arrays, tracked.layer_names, dtype, prefix="curvature/")
            n_tokens = {name: float(arrays[f"n_tokens/{name}"]) for name in tracked.layer_names}
        else:
            result = run_pass(COVARIANCE_PASS, covariance_zeros(tracked.layers, layer_blocks, mesh), (),
                              desc=f"{strategy}: covariances", resumed=resumed, **common)
            n_tokens, n_examples = result.n_tokens, result.n_examples
            totals = reduce_slots(result.sums, mesh)
            del result
            curvature = _eigendecompose(totals, n_tokens, n_examples, layer_blocks, dtype)
        rotations = {name: (c.q_a, c.q_s) for name, c in curvature.items()}
    if strategy in ("diagonal", "ekfac"):
        kept = curvature_arrays(curvature, prefix="curvature/") if strategy == "ekfac" else {}
        kept.update({f"n_tokens/{name}": np.float64(v) for name, v in (n_tokens or {}).items()})
        result = run_pass(EIGENVALUE_PASS, eigenvalue_zeros(tracked.layers, mesh),
                          (replicate(jax.tree.map(jnp.asarray, rotations), mesh),),
                          desc=f"{strategy}: eigenvalues", resumed=resumed if resumed_pass == EIGENVALUE_PASS else None,
                          snapshot_arrays=lambda: kept, **common)
        n_examples = result.n_examples
        totals = reduce_slots(result.sums, mesh)
        del result
        for name, lam in totals.items():
            curvature[name] = curvature[name]._replace(eigenvalues=(to_host(lam, np.float64) / n_examples).astype(dtype))
    metadata.update(n_examples=int(n_examples), n_tokens=n_tokens, mesh=describe(mesh))
    return Factors(strategy, curvature, metadata)
