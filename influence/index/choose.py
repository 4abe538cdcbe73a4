"""Choosing an index's compression and maps before it is written.

For every method but ``"fidelity"`` the maps follow from the factors alone
(:func:`~influence.index.compress.compression_maps`). ``"fidelity:<target>:<dtype>"``
measures instead: a probe of queries (held-out rows of the training set, or the user's
``probe=``) is scored exactly against a sample of training rows (an exact, uncompressed
index of them: the rescan's scores) and through the candidate stores, per layer. Each
layer keeps the coordinates of largest whitened variance, as ``"select"`` does, but its
share is chosen: starting from the smallest share of every layer, the layer whose next
share removes the most score error per stored byte grows, until the probe's mean top-10
agreement with the exact scores reaches ``target`` and no probe query is below
:data:`MIN_QUERY` (or every layer is whole, or the next step would pass the byte
``budget``: ``"fidelity:<target>:<budget>:<dtype>"``, a share of the full float32
bytes). Layers that compress badly (e.g. an output head) so get more. What was measured
goes to the manifest (``Index.chosen``).
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from influence.errors import DataError, InfluenceError
from influence.factors import Factors
from influence.index.compress import Compression, compression_maps, decode_numpy, encode_numpy, row_bytes
from influence.index.source import IndexSource
from influence.index.write import write_index
from influence.runtime.data import num_rows, select_rows
from influence.runtime.execution import Execution
from influence.scoring.preconditioned import prepare, scoring_mesh

PROBE_QUERIES = 32
"""Held-out training rows used as probe queries when no ``probe=`` is given."""
SAMPLE_ROWS = 256
"""Training rows the probe is ranked among (fewer if their exact rows outgrow :data:`SAMPLE_BYTES`)."""
SAMPLE_BYTES = 1 << 28
"""Most bytes of exact (float32) sample rows held at once (256 MiB)."""
SHARES = tuple(sorted({1 / 128, *(2 ** (-x / 4) for x in range(25))}))
"""The shares of a layer's coordinates the choice tries, smallest first (steps of 2^¼)."""
DTYPE_LADDER = ("int4", "int8", "bfloat16", "float32")
"""The storage dtypes tried, narrowest first, from the requested one on."""
MIN_QUERY = 0.8
"""No probe query's top-10 agreement may stay below this."""
TOP = 10


def choose_compression(model, task, factors: Factors, train: Any, comp: Compression, *, probe: Any = None,
                       execution: Execution | None = None
                       ) -> tuple[Compression, dict[str, dict[str, np.ndarray]], dict | None]:
    """``(compression, maps, chosen)``: the compression stored (``comp``, or for
    ``"fidelity"`` with the storage dtype widened where the requested one cannot reach
    the target: :data:`DTYPE_LADDER`), its maps for ``model``'s tracked layers, and what a
    ``"fidelity"`` choice measured (``None`` for the other methods).

    Raises:
      InfluenceError: ``"fidelity"`` on factors without eigenvalues (identity strategy),
        or a training set of unknown size without ``probe=``.
    """
    run = Execution() if execution is None else execution
    mesh = scoring_mesh(run.mesh, run.batch_size)
    tracked = prepare(model, factors, 0.0, mesh)[0]
    layers = [(info.name, factors.layers[info.name].eigenvalues, info.d_a, info.d_out) for info in tracked.layers]
    if comp.method != "fidelity":
        return comp, compression_maps(comp, layers), None
    return _fidelity(model, task, factors, train, comp, layers, probe, run)


def _fidelity(model, task, factors, train, comp: Compression, layers, probe, run: Execution):
    return choose_from_probe(comp, layers, measure_probe(model, task, factors, train, layers, probe, run))


def measure_probe(model, task, factors, train, layers, probe, run: Execution) -> dict[str, Any]:
    """The exact scores a ``"fidelity"`` choice grows toward: per layer the probe's keys
    ``[P, D]`` and the sampled training rows ``[S, D]`` in the eigenbasis (float64), and
    which probe it was. ``layers`` as :func:`choose_compression` lists them."""
    for name, lam, _, _ in layers:
        if lam is None:
            raise InfluenceError(f"layer {name!r}: 'fidelity' keeps the eigen-coordinates of largest curvature, but "
                                 "the factors (identity strategy) have no eigenvalues; use 'project' or 'none'")
    n = num_rows(train)
    if n is None:
        raise DataError("'fidelity' samples the training set: give it as a dict, a list or a Dataset (of known size)")
    total = sum(d_a * d_out for _, _, d_a, d_out in layers)
    order = np.random.default_rng(0).permutation(n)
    held = 0 if probe is not None else max(1, min(PROBE_QUERIES, n // 4))
    if probe is None:
        probe = select_rows(train, np.sort(order[:held]))
    n_sample = int(min(SAMPLE_ROWS, n - held, max(TOP + 1, SAMPLE_BYTES // (4 * total))))
    sample = np.sort(order[held:held + n_sample])
    quiet = dataclasses.replace(run, checkpoint_dir=None)
    with tempfile.TemporaryDirectory(prefix="influence-probe-") as tmp:
        exact = write_index(model, task, factors, select_rows(train, sample), path=Path(tmp),
                            comp=Compression("none"), maps={name: {} for name, *_ in layers}, previous=None, run=quiet)
        source = IndexSource(model, task, factors, probe, None, exact, None, None, quiet)
        keys = [np.asarray(k, np.float64) for k in source.keys]  # [P, D] per layer: Q_Aᵀ P Q_S
        rows = [[] for _ in layers]
        for _, _, arrays in exact.chunks(n_sample):
            for i, (data, _) in enumerate(arrays):
                rows[i].append(np.asarray(data, np.float64))
        rows = [np.concatenate(r) for r in rows]  # [S, D] per layer: Q_Aᵀ DW Q_S
    return {"keys": keys, "rows": rows, "held": held, "n_sample": n_sample}


def choose_from_probe(comp: Compression, layers, measured: dict[str, Any]):
    """``(compression, maps, chosen)`` of a ``"fidelity"`` ``comp`` from a probe
    :func:`measure_probe` made (one probe serves several targets and budgets)."""
    keys, rows, held, n_sample = measured["keys"], measured["rows"], measured["held"], measured["n_sample"]
    total = sum(d_a * d_out for _, _, d_a, d_out in layers)
    exact_layer = [k @ r.T for k, r in zip(keys, rows)]  # [P, S]
    reference = sum(exact_layer)
    ladder = DTYPE_LADDER[DTYPE_LADDER.index(comp.dtype):] if comp.dtype in DTYPE_LADDER else (comp.dtype,)
    tried = []
    cap = comp.budget * 4 * total
    results = []
    for dtype in ladder:  # a wider dtype only where the requested one cannot reach the target
        result = _grow(comp.fraction, dtype, layers, keys, rows, reference, cap)
        agreement = result[-1]
        reached = bool(agreement.mean() >= comp.fraction and agreement.min() >= MIN_QUERY)
        tried.append({"dtype": dtype, "top10": round(float(agreement.mean()), 4),
                      "least_top10": round(float(agreement.min()), 4), "reached": reached})
        results.append((reached, float(agreement.mean()), dtype, result))
        if reached:
            break
    # the first dtype that reaches the target; else (under a budget) the most faithful one tried
    reached, _, dtype, (level, options, sizes, orders, whitening, agreement) = (
        results[-1] if results[-1][0] or comp.budget == 1 else max(results, key=lambda r: r[1]))
    if not reached:
        where = (f"within {comp.budget:g} of the full bytes" if comp.budget < 1 else "with every layer whole")
        warnings.warn(f"compression {comp}: the probe's top-10 agreement reaches only {agreement.mean():.3f} (least "
                      f"query {agreement.min():.2f}) {where}, in {dtype}", stacklevel=4)
    comp = dataclasses.replace(comp, dtype=dtype)
    maps, per_layer = {}, {}
    for (name, _, d_a, d_out), (by_variance, counts), w, opts, lvl, exact_l in zip(
            layers, orders, whitening, options, level, exact_layer):
        keep = np.sort(by_variance[:counts[lvl]]).astype(np.int32)
        maps[name] = {"keep": keep, "w": w[keep].astype(np.float32)}
        per_layer[name] = {"share": round(counts[lvl] / (d_a * d_out), 6),
                           "top10": round(float(_agreement(opts[lvl], exact_l).mean()), 4)}
    stored = sum(sizes[i][level[i]] for i in range(len(layers)))
    chosen = {"target": comp.fraction, "budget": comp.budget, "min_query": MIN_QUERY, "reached": reached,
              "dtype": dtype, "tried": tried,
              "probe": "probe queries" if held == 0 else "held-out training rows",
              "probe_queries": int(reference.shape[0]), "sample_rows": int(n_sample),
              "top10": round(float(agreement.mean()), 4), "least_top10": round(float(agreement.min()), 4),
              "bytes_per_sequence": int(stored), "full_bytes_per_sequence": int(4 * total),
              "share_of_full": round(stored / (4 * total), 5), "layers": per_layer}
    return comp, maps, chosen


def _grow(target: float, dtype: str, layers, keys, rows, reference, cap: float = float("inf")):
    """Per layer the chosen level of :data:`SHARES` (greedy by score error removed per
    stored byte, the total stored bytes per row at most ``cap`` beyond the smallest
    levels) in ``dtype``, each level's simulated scores ``[P, S]``, bytes per row,
    the variance order and whitening, and the probe's final agreement ``[P]``."""
    options, sizes, orders, whitening = [], [], [], []
    for (_, lam, d_a, d_out), k, r in zip(layers, keys, rows):
        lam = np.maximum(np.asarray(lam, np.float64), 0.0).ravel()
        damp = 0.1 * max(float(lam.mean()), np.finfo(np.float32).tiny)
        w = np.sqrt(lam + damp)
        by_variance = np.argsort(-(lam / (lam + damp)), kind="stable")
        counts = sorted({max(1, int(round(s * d_a * d_out))) for s in SHARES})
        scored = []
        for count in counts:
            kept = by_variance[:count]
            stored = encode_numpy((r[:, kept] / w[kept]).astype(np.float32), dtype)
            decoded = decode_numpy(stored[0], stored[1] if len(stored) > 1 else None, dtype, count)
            scored.append((k[:, kept] * w[kept]) @ np.asarray(decoded, np.float64).T)
        options.append(scored)
        sizes.append([row_bytes(c, dtype) for c in counts])
        orders.append((by_variance, counts))
        whitening.append(w)
    level = [0] * len(layers)
    scale = np.maximum(np.sum(reference ** 2, axis=1, keepdims=True), np.finfo(np.float64).tiny)

    def error(approx):
        return float(np.sum((reference - approx) ** 2 / scale))

    approx = sum(o[0] for o in options)
    while True:
        agreement = _agreement(approx, reference)
        if agreement.mean() >= target and agreement.min() >= MIN_QUERY:
            break
        spent = sum(sizes[i][level[i]] for i in range(len(layers)))
        growable = [i for i in range(len(layers)) if level[i] + 1 < len(options[i])
                    and spent + sizes[i][level[i] + 1] - sizes[i][level[i]] <= cap]
        if not growable:
            break
        now = error(approx)
        gains = {i: (now - error(approx + options[i][level[i] + 1] - options[i][level[i]]))
                 / max(sizes[i][level[i] + 1] - sizes[i][level[i]], 1) for i in growable}  # error removed per byte
        best = max(growable, key=gains.__getitem__)
        approx = approx + options[best][level[best] + 1] - options[best][level[best]]
        level[best] += 1
    return level, options, sizes, orders, whitening, agreement


def _agreement(approx: np.ndarray, reference: np.ndarray, top: int = TOP) -> np.ndarray:
    """Per query, the share of the reference's top ``top`` rows that ``approx`` also ranks
    in its top ``top`` ``[Q]`` (ties: the lower row first, as the ranking does)."""
    top = min(top, reference.shape[1])
    a = np.argsort(-approx, axis=1, kind="stable")[:, :top]
    r = np.argsort(-reference, axis=1, kind="stable")[:, :top]
    return np.array([len(set(x) & set(y)) / top for x, y in zip(a, r)])


__all__ = ["MIN_QUERY", "PROBE_QUERIES", "SAMPLE_ROWS", "choose_compression", "choose_from_probe", "measure_probe"]
