"""Fit curvature factors for a trained language-model run and save them in the run folder.

The factors go to RUN/factors/<strategy>-<layers>-<digest>/factors.npz, the digest
covering every setting that changes them (strategy, --layers as given, --fisher, --seed,
--max-sequences, --blocks, --factor-dtype, the checkpoint), which settings.json beside
them lists with the SHA-256 of the weights fitted on; `influence query` finds them there
and refuses them once those weights have changed (refit with --force). Fitting streams every training sequence
of the run (twice for ekfac). An interrupted fit resumes when the same command is run
again; --restart discards its checkpoint instead.

example:
  influence fit --run runs/small                       # EK-FAC on the MLP layers
  influence fit --run runs/small --layers all --strategy kfac
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from influence.cli import workspace
from influence.cli.common import add_factor_arguments, check_layers, fail, terminal_text

# Loading a run reads its tokenizer (the lm extra).
REQUIRES = ("lm", ("tokenizers",))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="training run folder (from `influence train`) or a workspace (from --model "
                                       "and --data)")
    workspace.add_arguments(parser)
    add_factor_arguments(parser)
    parser.add_argument("--fisher", choices=["sampled", "empirical"], default="sampled",
                        help="targets for the curvature: sampled from the model (default) or the data's")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per step (default: chosen from the memory budget, see influence.Execution)")
    parser.add_argument("--max-sequences", type=int, help="fit on the first N training sequences only")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the targets sampled for the Fisher (default: 0)")
    parser.add_argument("--devices", type=int, help="data-parallel over this many local devices (default: one)")
    parser.add_argument("--blocks", type=int, help="split each layer's factors into this many blocks per side "
                                                  "(bounds memory on wide layers; costs accuracy, see docs/scaling.md)")
    parser.add_argument("--factor-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the stored factors (eigendecompositions always run in float64)")
    parser.add_argument("--force", action="store_true", help="refit even if factors exist (implies --restart)")
    parser.add_argument("--restart", action="store_true",
                        help="discard the checkpoint of an interrupted fit of these settings instead of resuming it")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if (status := workspace.resolve("fit", args)) is not None:  # --model/--data: args.run becomes a workspace
        return status
    from influence.errors import CheckpointMismatch
    from influence.lm.run import (
        FACTORS,
        FIT_CHECKPOINT,
        factor_settings,
        fit_run_factors,
        folder_name,
        load_run,
        read_settings,
    )

    check_layers(args.layers)
    settings = factor_settings(args.run, args.strategy, args.layers, fisher=args.fisher, seed=args.seed,
                               max_sequences=args.max_sequences, blocks=args.blocks, factor_dtype=args.factor_dtype)
    folder = Path(args.run) / FACTORS / folder_name(settings)
    target = folder / "factors.npz"
    if target.exists() and not args.force:
        stored = read_settings(folder)
        if stored == settings:
            print(f"factors already fitted: {target} (use --force to refit)")
            return 0
        # Only a hand-edited or foreign folder gets here: never reuse what is not known to match.
        return fail("fit", f"{folder} holds factors whose settings.json ({stored}) is not the settings asked for "
                           f"({settings}); refit them with --force")
    loaded = load_run(args.run)
    checkpoint = folder / FIT_CHECKPOINT  # where an interrupted fit of these settings left its state
    resuming = checkpoint.is_dir() and any(checkpoint.iterdir()) and not (args.restart or args.force)
    print(f"resuming from {checkpoint}" if resuming else f"starting: {folder}")
    try:
        factors, path, seconds = fit_run_factors(loaded, args.strategy, args.layers, fisher=args.fisher,
                                                 batch_size=args.batch_size, max_sequences=args.max_sequences,
                                                 seed=args.seed, progress=not args.quiet, devices=args.devices,
                                                 blocks=args.blocks, factor_dtype=args.factor_dtype,
                                                 restart=args.restart or args.force)
    except CheckpointMismatch as e:
        # The library's advice names its Python argument (resume=False); the command's is --restart.
        detail = " ".join(re.split(r"\. Use the same|; resume with|, or pass resume=False", str(e))[0].split())
        return fail("fit", f"{terminal_text(detail)}; run the same command with the --batch-size of the "
                           f"interrupted fit to resume it, or add --restart to discard its checkpoint "
                           f"({folder / FIT_CHECKPOINT})")
    layers = ", ".join(factors.layer_names)
    print(f"fitted {args.strategy} on {factors.metadata['n_examples']} sequences in {seconds:.1f} s; layers: {layers}")
    print(f"factors: {path}")
    return 0
