"""The score archive of a scale experiment: every run's influence matrix, small enough to
publish and exact enough to recompute every figure (issue 26).

Format (:func:`write_scores`): for each key ``<scale>-seed<k>-<layer set>`` a float16
*mantissa* ``[Q, N]`` and, under ``<key>.exp2``, an int16 per-row power-of-two exponent
``[Q]``; the value is ``mantissa * 2**exp2``. The exponent puts each row's largest |value|
at or below 2**14, so no entry can overflow float16's 65504 (v2's plain float16 archive
did, up to 430 times in one matrix), while the relative precision stays float16's (2**-11)
and the file stays the size of a float16 one. :func:`write_scores` refuses non-finite input
and checks that every stored value decodes finite.

v2's archive (``docs/experiments/scale-v2/scores.npz``) predates this format: plain float16
with ±inf where a score overflowed. It is not rewritten (it is 79 MB, and the published
history keeps it). Instead a small sidecar, ``repairs.json``, lists for every ±inf entry
either its value, restored from the run's top-k in ``results.json`` (each record holds the
float32 scores of its query's top 10), or that the entry is lost (outside the top 10, so its
value survives nowhere). :func:`read_scores` applies the sidecar: restored entries take their
value, lost entries become NaN (declared, never a silent ±inf), and the returned ``lost``
masks say where.

  python -m experiments.archive repairs docs/experiments/scale-v2    # write repairs.json
  python -m experiments.archive check docs/experiments/scale-v2      # every value finite or declared lost
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from influence.errors import DataError, FileFormatError
from influence.runtime.io import atomic_path, atomic_write_json

# Largest |mantissa| after scaling: 2**14 leaves float16 (max 65504) a factor 4 of headroom
# against rounding up, and keeps the scale a power of two so the scaling itself is exact.
_MANTISSA_MAX = 2.0 ** 14
REPAIRS = "repairs.json"


def encode_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``values`` (float ``[Q, N]``, finite) as a float16 mantissa ``[Q, N]`` and an int16
    exponent ``[Q]`` with ``values ≈ mantissa * 2**exponent`` (relative error ≤ 2**-11 for
    every entry not far below its row's largest, which keeps float16's absolute step)."""
    v = np.asarray(values, np.float64)
    if v.ndim != 2:
        raise DataError(f"scores must be [Q, N]; got shape {v.shape}")
    if not np.isfinite(v).all():
        bad = int((~np.isfinite(v)).sum())
        raise DataError(f"{bad} scores are NaN or ±inf; archive only finite scores (fix the scoring run)")
    peak = np.abs(v).max(axis=1)
    exp = np.where(peak > 0, np.ceil(np.log2(np.where(peak > 0, peak, 1.0) / _MANTISSA_MAX)), 0).astype(np.int16)
    mantissa = (v / np.exp2(exp.astype(np.float64))[:, None]).astype(np.float16)
    return mantissa, exp


def decode_rows(mantissa: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """float32 ``[Q, N]`` = ``mantissa * 2**exponent`` (the inverse of :func:`encode_rows`)."""
    return (mantissa.astype(np.float32) * np.exp2(exponent.astype(np.float32))[:, None]).astype(np.float32)


def write_scores(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write score matrices ``{key: [Q, N]}`` to ``path`` (compressed ``.npz``, atomic) in
    the overflow-free format; every stored value is checked to decode finite.

    Raises:
      DataError: a matrix is not 2-D or holds a non-finite score.
    """
    out = {}
    for key, v in arrays.items():
        m, e = encode_rows(v)
        if not np.isfinite(decode_rows(m, e)).all():  # cannot happen by construction; a guard, not a hope
            raise FileFormatError(f"{key}: encoded scores do not decode finite")
        out[key], out[f"{key}.exp2"] = m, e
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_repairs(scores: Path, results: dict) -> dict:
    """The sidecar for a plain-float16 archive: every ±inf entry restored from its run's
    top-k scores (``results.json`` records, in the matrix's query order) or declared lost.

    Returns ``{"archive", "sha256", "restored": {key: [[q, row, value], ...]},
    "lost": {key: [[q, row, sign], ...]}, "counts": {...}}``.
    """
    runs = {f"{r['scale']}-seed{r['seed']}-{ls}": recs for r in results["runs"] for ls, recs in r["variants"].items()}
    restored, lost = {}, {}
    with np.load(scores) as z:
        for key in z.files:
            if key.endswith(".exp2"):
                continue
            a = z[key]
            bad = np.argwhere(~np.isfinite(a))
            if not len(bad):
                continue
            recs = runs.get(key)
            if recs is None or len(recs) != a.shape[0]:
                raise FileFormatError(f"{key}: no run in results.json with {a.shape[0]} records to repair it from")
            for q, row in bad.tolist():
                top = dict(zip(recs[q]["top_rows"], recs[q]["top_scores"]))
                if row in top and np.isfinite(top[row]):
                    restored.setdefault(key, []).append([q, row, float(top[row])])
                else:
                    lost.setdefault(key, []).append([q, row, int(np.sign(a[q, row]))])
    counts = {"restored": sum(map(len, restored.values())), "lost": sum(map(len, lost.values()))}
    return {"archive": scores.name, "sha256": _sha256(scores), "format": "float16 with ±inf (pre-issue-26)",
            "counts": counts, "restored": restored, "lost": lost}


def read_scores(folder: Path, keys: Sequence[str] | None = None, *, verify: bool = False
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every (or the named) score matrix of ``folder/scores.npz`` as float32, and a bool
    mask ``[Q, N]`` per key of the entries declared lost (NaN in the matrix).

    Reads both formats: the scaled one of :func:`write_scores`, and plain float16, to which
    ``folder/repairs.json`` is applied when present. ``verify`` also checks the sidecar's
    hash against the archive (reads the whole file once more).

    Raises:
      FileFormatError: a plain-float16 matrix holds ±inf that no sidecar repairs, or the
        sidecar was written for another archive.
    """
    path = folder / "scores.npz"
    repairs = json.loads((folder / REPAIRS).read_text()) if (folder / REPAIRS).exists() else None
    if repairs and verify and repairs["sha256"] != _sha256(path):
        raise FileFormatError(f"{folder / REPAIRS} was written for another {path.name}; rebuild it "
                           "(python -m experiments.archive repairs)")
    values, lost = {}, {}
    with np.load(path) as z:
        names = [k for k in z.files if not k.endswith(".exp2")]
        for key in keys or names:
            m = z[key]
            a = decode_rows(m, z[f"{key}.exp2"]) if f"{key}.exp2" in z.files else m.astype(np.float32)
            mask = np.zeros(a.shape, bool)
            if repairs:
                for q, row, v in repairs["restored"].get(key, []):
                    a[q, row] = v
                for q, row, _ in repairs["lost"].get(key, []):
                    a[q, row], mask[q, row] = np.nan, True
            if np.isinf(a).any():
                raise FileFormatError(f"{key}: {int(np.isinf(a).sum())} ±inf scores with no repair; run "
                                   f"python -m experiments.archive repairs {folder}")
            values[key], lost[key] = a, mask
    return values, lost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.archive", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("repairs", "check"))
    parser.add_argument("folder", type=Path, help="a published experiment folder (scores.npz, results.json)")
    args = parser.parse_args(argv)
    if args.action == "repairs":
        rep = build_repairs(args.folder / "scores.npz", json.loads((args.folder / "results.json").read_text()))
        atomic_write_json(args.folder / REPAIRS, rep, indent=None)
        print(f"{args.folder / REPAIRS}: {rep['counts']['restored']} restored, {rep['counts']['lost']} lost")
        return 0
    values, lost = read_scores(args.folder, verify=True)
    finite = all(bool(np.isfinite(v[~lost[k]]).all()) for k, v in values.items())
    print(f"{len(values)} matrices; declared lost: {sum(int(m.sum()) for m in lost.values())}; "
          f"every other value finite: {finite}")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
