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
import re
import time
from pathlib import Path

from influence.cli import workspace
from influence.cli.common import FIDELITY, INDEXES, add_factor_arguments, check_layers, fail, load_factors

REQUIRES = ("lm", ("tokenizers",))


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


def run(args: argparse.Namespace) -> int:
    if (status := workspace.resolve("index", args)) is not None:  # --model/--data: args.run becomes a workspace
        return status
    import numpy as np

    import influence as inf
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
    from influence.index.write import _BUILD_DIR

    partial = path / _BUILD_DIR  # where an interrupted build keeps its snapshots
    print(f"resuming from {partial}" if partial.is_dir() and any(partial.iterdir()) and not args.force
          else f"starting: {path}")
    task = inf.tasks.CausalLM()
    t0 = time.perf_counter()
    index = inf.build_index(loaded.model, task, factors, loaded.train, path=path, compression=compression,
                            overwrite=args.force, batch_size=args.batch_size, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    full = 4 * sum(i.d_a * i.d_out for i in factors.layer_infos)
    print(f"indexed {index.n_rows} sequences in {seconds:.1f} s: {index.bytes_per_sequence:.0f} bytes per sequence "
          f"({index.bytes_per_sequence / full:.3f} of the full float32 gradient), {index.bytes / 2**20:.1f} MiB")
    print(f"index: {path}")
    if index.chosen:  # a fidelity choice: what its probe measured
        c = index.chosen
        print(f"chosen from a probe of {c['probe_queries']} {c['probe']} ranked among {c['sample_rows']} training "
              f"rows: top-10 agreement {c['top10']:.3f} (least query {c['least_top10']:.2f}, target {c['target']:g}"
              f"{'' if c['reached'] else ', NOT reached'}) in {c['dtype']}, {c['share_of_full']:.3f} of the full bytes"
              + (f" (budget {c['budget']:g})" if c.get("budget", 1) < 1 else ""))
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
