"""Fit curvature factors for a trained language-model run and save them in the run folder.

The factors go to RUN/factors/<strategy>-<layers>/factors.npz and are reused by
`influence query`. Fitting streams every training sequence of the run (twice for ekfac).

example:
  influence fit --run runs/small                       # EK-FAC on the MLP layers
  influence fit --run runs/small --layers all --strategy kfac
"""

from __future__ import annotations

import argparse

from influence.cli.common import add_factor_arguments, fail

# Loading a run reads its tokenizer (the lm extra).
REQUIRES = ("lm", ("tokenizers",))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="training run folder (from `influence train`)")
    add_factor_arguments(parser)
    parser.add_argument("--fisher", choices=["sampled", "empirical"], default="sampled",
                        help="targets for the curvature: sampled from the model (default) or the data's")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step (default: 32)")
    parser.add_argument("--max-sequences", type=int, help="fit on the first N training sequences only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", type=int, help="data-parallel over this many local devices (default: one)")
    parser.add_argument("--blocks", type=int, help="split each layer's factors into this many blocks per side "
                                                  "(bounds memory on wide layers; costs accuracy, see docs/scaling.md)")
    parser.add_argument("--factor-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the stored factors (eigendecompositions always run in float64)")
    parser.add_argument("--force", action="store_true", help="refit even if factors exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from influence.lm.run import factors_dir, fit_run_factors, load_run

    target = factors_dir(args.run, args.strategy, args.layers) / "factors.npz"
    if target.exists() and not args.force:
        print(f"factors already fitted: {target} (use --force to refit)")
        return 0
    try:
        loaded = load_run(args.run)
    except (FileNotFoundError, ValueError) as e:
        return fail("fit", str(e))
    try:
        factors, path, seconds = fit_run_factors(loaded, args.strategy, args.layers, fisher=args.fisher,
                                                 batch_size=args.batch_size, max_sequences=args.max_sequences,
                                                 seed=args.seed, progress=not args.quiet, devices=args.devices,
                                                 blocks=args.blocks, factor_dtype=args.factor_dtype)
    except ValueError as e:
        return fail("fit", str(e))
    layers = ", ".join(factors.layer_names)
    print(f"fitted {args.strategy} on {factors.metadata['n_examples']} sequences in {seconds:.1f} s; layers: {layers}")
    print(f"factors: {path}")
    return 0
