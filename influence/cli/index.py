"""Build a gradient index of a run's training sequences, so `influence query` answers
without a pass over the training set.

The index stores every training sequence's gradient for the tracked layers of the
factors (found as `influence query` finds them: --strategy, --layers, --factors), in the
factors' eigenbasis and compressed (--compression, see docs/index.md). It goes to
FACTORS/index/<compression>/; `influence query` uses a valid one found there and says
so (--no-index rescans). An interrupted build resumes when the same command is run
again. --check N then measures the index's fidelity against a rescan on N held-out
sequences (Pearson, Spearman, top-10 overlap), which the query report shows.

examples:
  influence index --run runs/demo
  influence index --run runs/small --compression rank:4:bfloat16 --check 16
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from influence.cli import workspace
from influence.cli.common import add_factor_arguments, check_layers, fail

REQUIRES = ("lm", ("tokenizers",))
INDEXES = "index"
FIDELITY = "fidelity.json"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="training run folder (from `influence train`) or a workspace (from --model "
                                       "and --data)")
    workspace.add_arguments(parser)
    add_factor_arguments(parser)
    parser.add_argument("--factors", metavar="FOLDER", help="a folder of RUN/factors to use")
    parser.add_argument("--compression", default=None,
                        help="method[:fraction|rank][:dtype], e.g. none, select:0.5:int4, rank:4:bfloat16, "
                             "truncate:0.5:int8 "
                             "(default: the library's measured default)")
    parser.add_argument("--check", type=int, default=8, metavar="N",
                        help="measure fidelity against a rescan on N held-out sequences (default: 8; 0: skip)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step (default: 32)")
    parser.add_argument("--force", action="store_true", help="rebuild an existing index")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def index_folder(factors_folder: Path, compression) -> Path:
    return Path(factors_folder) / INDEXES / re.sub(r"[^A-Za-z0-9_.-]", "_", str(compression))


def find_index(factors_folder: Path) -> Path | None:
    """The index of a factors folder that `influence query` uses: the uncompressed one if
    built, else the one built last."""
    found = sorted((p for p in (Path(factors_folder) / INDEXES).glob("*") if (p / "manifest.json").is_file()),
                   key=lambda p: (p.name != "none", -(p / "manifest.json").stat().st_mtime))
    return found[0] if found else None


def read_fidelity(index_path: Path) -> dict | None:
    file = Path(index_path) / FIDELITY
    return json.loads(file.read_text()) if file.is_file() else None


def run(args: argparse.Namespace) -> int:
    if (status := workspace.resolve("index", args)) is not None:  # --model/--data: args.run becomes a workspace
        return status
    import numpy as np

    import influence as inf
    from influence.cli.query import load_factors
    from influence.index.build import DEFAULT_COMPRESSION
    from influence.index.compress import Compression
    from influence.lm.run import load_run

    check_layers(args.layers)
    if args.check < 0:
        return fail("index", f"--check must be 0 or a positive number of sequences, got {args.check}")
    compression = Compression.parse(args.compression or DEFAULT_COMPRESSION)
    loaded = load_run(args.run)
    found = load_factors("index", args, loaded)
    if isinstance(found, int):
        return found
    folder, _, factors = found
    path = index_folder(folder, compression)
    if (path / "manifest.json").is_file() and not args.force:
        print(f"index already built: {path} (use --force to rebuild)")
        return 0
    task = inf.tasks.CausalLM()
    t0 = time.perf_counter()
    index = inf.build_index(loaded.model, task, factors, loaded.train, path=path, compression=compression,
                            overwrite=args.force, batch_size=args.batch_size, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    full = 4 * sum(i.d_a * i.d_out for i in factors.layer_infos)
    print(f"indexed {index.n_rows} sequences in {seconds:.1f} s: {index.bytes_per_sequence:.0f} bytes per sequence "
          f"({index.bytes_per_sequence / full:.3f} of the full float32 gradient), {index.bytes / 2**20:.1f} MiB")
    print(f"index: {path}")
    n = min(args.check, len(loaded.heldout))
    if args.check and not n:
        print("fidelity not measured: the run has no held-out sequences")
    if n:
        table = loaded.heldout.with_format("numpy")
        queries = {k: np.asarray(table[k][:n]).astype(np.int32) for k in ("input_ids", "loss_mask")}
        rescan = inf.pairwise_scores(loaded.model, task, factors, queries, loaded.train, batch_size=args.batch_size,
                                     progress=not args.quiet).values
        answered = inf.pairwise_scores(loaded.model, task, factors, queries, None, index=index,
                                       batch_size=args.batch_size, progress=False).values
        fidelity = measure_fidelity(answered, rescan)
        fidelity["queries"] = f"the first {n} held-out sequences"
        from influence.runtime.io import atomic_write_json

        atomic_write_json(path / FIDELITY, fidelity)
        print(f"fidelity against a rescan ({fidelity['queries']}): Pearson {fidelity['pearson']:.4f}, "
              f"Spearman {fidelity['spearman']:.4f}, top-10 overlap {fidelity['top10_overlap']:.2f}")
    return 0


def measure_fidelity(scores, reference, top: int = 10) -> dict:
    """Pearson over all pairs, mean Spearman per query, mean top-``top`` overlap."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    top = min(top, reference.shape[1])
    overlap = np.mean([len(set(np.argsort(-a)[:top]) & set(np.argsort(-b)[:top])) / top
                       for a, b in zip(scores, reference)])
    return {"pearson": float(pearsonr(scores.ravel(), reference.ravel())[0]),
            "spearman": float(np.mean([spearmanr(a, b)[0] for a, b in zip(scores, reference)])),
            "top10_overlap": float(overlap)}


def choose_index(args, factors_folder: Path, loaded, factors) -> tuple[Path | None, str]:
    """The index `influence query` answers from (``None``: rescan) and what the report says
    answered. A found index that does not match the run's model, factors or data is named
    and passed over (the query rescans)."""
    import influence as inf
    from influence.index.build import built_from
    from influence.index.store import Index

    if getattr(args, "no_index", False):
        return None, "rescan (--no-index)"
    found = find_index(factors_folder)
    if found is None:
        return None, "rescan (no index; build one with `influence index`)"
    try:
        index = Index(found)
        tracked = inf.track(loaded.model, list(factors.layer_names))
        index.check(built_from(tracked, factors, inf.tasks.CausalLM()))
        if index.n_rows != len(loaded.train):
            raise inf.DataError(f"it holds {index.n_rows} sequences, the run has {len(loaded.train)}")
    except inf.InfluenceError as e:
        print(f"not using the index at {found}: {' '.join(str(e).split())}; rescanning (rebuild it with "
              "`influence index --force`)")
        return None, f"rescan (the index at {found} does not match)"
    fidelity = read_fidelity(found)
    measured = (f"; fidelity vs rescan on {fidelity['queries']}: Pearson {fidelity['pearson']:.4f}, Spearman "
                f"{fidelity['spearman']:.4f}, top-10 overlap {fidelity['top10_overlap']:.2f}" if fidelity
                else "; fidelity not measured (influence index --check N)")
    print(f"answering from the index at {found} ({index.compression}); --no-index rescans")
    return found, f"index {found} ({index.compression}, {index.bytes_per_sequence:.0f} bytes per sequence{measured})"
