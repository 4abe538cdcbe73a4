"""Fitting curvature factors over the training data, and their persistence.

``fit_factors`` streams the training set through jitted kernels:

1. covariance pass (kfac, ekfac): A = Σ w ā āᵀ / Σ w and S = Σ w g gᵀ / Σ w over
   counted tokens, then eigendecompositions in float64 on the host;
2. eigenvalue pass (ekfac; diagonal without rotation): Λ = mean over examples of
   (Q_Aᵀ DW_n Q_S)², DW_n the per-example gradient summed over tokens (George et al.
   2018; Grosse et al. 2023 §3.1).
"""

from __future__ import annotations

import datetime
import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import threadpoolctl
from flax import nnx
from tqdm.auto import tqdm

from influence import io
from influence.capture import LayerFilter, LayerInfo, TrackedModel, track
from influence.curvature import STRATEGIES, LayerCurvature, default_damping
from influence.curvature.accumulate import covariance_sums, eigenvalue_sums
from influence.data import DataError, as_source
from influence.gradients import layer_gradients, token_weights

FISHER_KINDS = ("sampled", "empirical", "exact")
_FILE_KIND = "influence-factors"
_FIELDS = LayerCurvature._fields
_THREADED_EIGH_SIZE = 2048


class Factors:
    """Fitted curvature of every tracked layer, plus what it was fitted on.

    Attributes:
      strategy: ``"identity"``, ``"diagonal"``, ``"kfac"`` or ``"ekfac"``.
      layers: layer name -> :class:`~influence.curvature.LayerCurvature` (float32 numpy).
      metadata: JSON-serialisable facts: layer shapes, ``n_examples``, ``n_tokens``,
        ``fisher``, ``fingerprint`` (model structure), ``version``, ``created``.
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
            for field, arr in zip(_FIELDS, curv):
                if arr is not None and not np.all(np.isfinite(arr)):
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
        """Write atomically to ``path/factors.npz`` (or to ``path`` if it ends in .npz)."""
        arrays = {}
        for name, curv in self.layers.items():
            for field, arr in zip(_FIELDS, curv):
                if arr is not None:
                    arrays[f"{name}/{field}"] = np.asarray(arr, np.float32)
        file = self._file(path)
        io.save_arrays(file, _FILE_KIND, arrays, {"strategy": self.strategy, **self.metadata})
        return file

    @classmethod
    def load(cls, path: str | os.PathLike, model: nnx.Module | None = None) -> Factors:
        """Read factors saved by :meth:`save`; with ``model``, also check it matches."""
        arrays, metadata = io.load_arrays(cls._file(path), _FILE_KIND)
        strategy = metadata.pop("strategy")
        layers = {}
        for info in metadata["layers"]:
            name = info["name"]
            layers[name] = LayerCurvature(*(arrays.get(f"{name}/{f}") for f in _FIELDS))
        factors = cls(strategy, layers, metadata)
        if model is not None:
            factors.check_compatible(track(model, factors.layer_names))
        return factors


# --- jitted passes ------------------------------------------------------------------

_STATIC = ("graphdef", "layers", "task", "fisher")


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnums=(0,))
def _covariance_step(sums, state, batch, example_mask, key, *, graphdef, layers, task, fisher):
    value, a, g = layer_gradients(graphdef, state, layers, task, fisher, batch, example_mask, key)
    new, counts = {}, {}
    for info in layers:
        w = token_weights(task, batch, example_mask, a[info.name])
        a_sum, s_sum = covariance_sums(a[info.name], g[info.name], w)
        new[info.name] = (sums[info.name][0] + a_sum, sums[info.name][1] + s_sum)
        counts[info.name] = jnp.sum(w)
    return new, counts, jnp.sum(value)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnums=(0,))
def _eigenvalue_step(sums, rotations, state, batch, example_mask, key, *, graphdef, layers, task, fisher):
    value, a, g = layer_gradients(graphdef, state, layers, task, fisher, batch, example_mask, key)
    new = {}
    for info in layers:
        q_a, q_s = rotations[info.name] if rotations is not None else (None, None)
        new[info.name] = sums[info.name] + eigenvalue_sums(a[info.name], g[info.name], example_mask, q_a, q_s)
    return new, jnp.sum(value)


def _run_pass(step, sums, tracked, task, fisher, source, key, desc, progress, **extra):
    """Stream every batch through ``step``; return final sums, summed counts, #examples."""
    values, counts, n_examples = [], [], 0
    bar = tqdm(total=source.num_batches, desc=desc, unit="batch", disable=not progress, leave=False)
    for i, batch in enumerate(source):
        batch_key = jax.random.fold_in(key, i)
        out = step(
            sums, *extra.values(), tracked.state, batch.arrays, batch.example_mask, batch_key,
            graphdef=tracked.graphdef, layers=tracked.layers, task=task, fisher=fisher,
        )
        sums = out[0]
        if len(out) == 3:
            counts.append(out[1])
        values.append(out[-1])
        n_examples += batch.n_valid
        bar.update(1)
    bar.close()
    losses = np.asarray(jax.device_get(values), np.float64)
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        lo = int(bad[0]) * source.batch_size
        raise FloatingPointError(
            f"the {'objective' if fisher != 'exact' else 'Fisher directions'} is NaN/Inf on batch {int(bad[0])} "
            f"(examples {lo}..{lo + source.batch_size - 1}); check the inputs and the model's weights"
        )
    token_counts = None
    if counts:
        token_counts = {name: float(np.sum(jax.device_get([c[name] for c in counts]), dtype=np.float64)) for name in counts[0]}
    return sums, token_counts, n_examples


def _eigh(matrix: np.ndarray, name: str, which: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric eigendecomposition in float64; tiny negative eigenvalues clipped to 0."""
    m = np.asarray(matrix, np.float64)
    if not np.all(np.isfinite(m)):
        raise FloatingPointError(f"factor {which} of layer {name!r} holds NaN/Inf; the loss or inputs were not finite")
    # LAPACK's divide-and-conquer driver on one BLAS thread for small factors: threaded
    # BLAS spinning against JAX's own threads made a 256×256 eigh take 0.5 s instead of 13 ms.
    limit = 1 if m.shape[0] < _THREADED_EIGH_SIZE else None
    with threadpoolctl.threadpool_limits(limit):
        eigenvalues, vectors = scipy.linalg.eigh(0.5 * (m + m.T), driver="evd")
    return np.clip(eigenvalues, 0.0, None), vectors


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
) -> Factors:
    """Fit the curvature approximation ``strategy`` on ``data``.

    Args:
      model: a ``flax.nnx.Module`` at its final weights (put it in eval mode).
      task: an :class:`influence.Task` (e.g. ``tasks.Classification()``).
      data: training data: a dict of arrays, a ``datasets.Dataset``, a list of dict
        batches, or a callable returning an iterable of dict batches.
      strategy: ``"identity"``, ``"diagonal"``, ``"kfac"`` or ``"ekfac"``.
      fisher: ``"sampled"`` (targets drawn from the model: the true Fisher, which
        equals the Gauss-Newton matrix for the built-in losses), ``"empirical"`` (the
        data's labels) or ``"exact"`` (the exact expectation, when the task provides
        ``fisher_directions``; costs one backward pass per output).
      key: PRNG key for sampled targets (default ``jax.random.key(0)``).
      layers: which ``nnx.Linear`` layers to track (see :func:`influence.capture.track`).
      batch_size: examples per jitted step (the last batch is padded).
      progress: show progress bars.

    Returns:
      :class:`Factors`; with float32 ``Q_A [d_a, d_a]``, ``Q_S [d_out, d_out]``,
      ``Λ [d_a, d_out]`` per layer as the strategy requires.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if fisher not in FISHER_KINDS:
        raise ValueError(f"unknown fisher {fisher!r}; expected one of {FISHER_KINDS}")
    tracked = track(model, layers)
    key = jax.random.key(0) if key is None else key
    source = as_source(data, batch_size, task)
    if strategy == "ekfac" and source.single_pass:
        raise DataError("ekfac reads the data twice; pass a list, a datasets.Dataset or a callable, not a one-shot iterator")
    metadata: dict[str, Any] = {
        "layers": [info._asdict() for info in tracked.layers],
        "fisher": fisher,
        "fingerprint": tracked.fingerprint,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    curvature = {info.name: LayerCurvature() for info in tracked.layers}
    if strategy == "identity":
        return Factors(strategy, curvature, {**metadata, "n_examples": source.num_examples, "n_tokens": None})

    n_tokens = None
    rotations = None
    if strategy in ("kfac", "ekfac"):
        sums = {i.name: (jnp.zeros((i.d_a, i.d_a)), jnp.zeros((i.d_out, i.d_out))) for i in tracked.layers}
        sums, n_tokens, n_examples = _run_pass(
            _covariance_step, sums, tracked, task, fisher, source,
            jax.random.fold_in(key, 0), f"{strategy}: covariances", progress,
        )
        rotations = {}
        for info in tracked.layers:
            name = info.name
            if n_tokens[name] <= 0:
                raise DataError(f"layer {name!r}: no token of the data is counted (all masked)")
            a_sum, s_sum = jax.device_get(sums[name])
            e_a, q_a = _eigh(a_sum / n_tokens[name], name, "A")
            e_s, q_s = _eigh(s_sum / n_tokens[name], name, "S")
            # K-FAC "expand": a sequence's curvature is its T̄ tokens' summed, so Λ for a
            # per-sequence Gauss-Newton is T̄ A⊗S (T̄ = 1 for one output per example).
            tokens_per_example = n_tokens[name] / n_examples
            curvature[name] = LayerCurvature(
                q_a.astype(np.float32), q_s.astype(np.float32),
                (tokens_per_example * np.outer(e_a, e_s)).astype(np.float32),
                e_a.astype(np.float32), e_s.astype(np.float32),
            )
            rotations[name] = (jnp.asarray(q_a, jnp.float32), jnp.asarray(q_s, jnp.float32))
        del sums
    if strategy in ("diagonal", "ekfac"):
        sums = {i.name: jnp.zeros((i.d_a, i.d_out)) for i in tracked.layers}
        sums, _, n_examples = _run_pass(
            _eigenvalue_step, sums, tracked, task, fisher, source,
            jax.random.fold_in(key, 1), f"{strategy}: eigenvalues", progress, rotations=rotations,
        )
        for info in tracked.layers:
            lam = np.asarray(jax.device_get(sums[info.name]), np.float64) / n_examples
            curvature[info.name] = curvature[info.name]._replace(eigenvalues=lam.astype(np.float32))
    metadata.update(n_examples=int(n_examples), n_tokens=n_tokens)
    return Factors(strategy, curvature, metadata)
