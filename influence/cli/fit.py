"""Fit curvature factors for a trained language-model run and save them in the run folder.

The factors go to RUN/factors/<strategy>-<layers>/factors.npz and are reused by
`influence query`. Fitting streams every training sequence of the run (twice for ekfac).

example:
  influence fit --run runs/small                       # EK-FAC on the MLP layers
  influence fit --run runs/small --layers all --strategy kfac
"""

from __future__ import annotations

import argparse
import time

import jax

from influence.cli.common import add_factor_arguments, factors_dir, fail, layer_filter


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


def fit_run(run, run_dir, strategy: str, layers: str, *, fisher="sampled", batch_size=32, max_sequences=None,
            seed=0, progress=True, devices=None, blocks=None, factor_dtype="float32"):
    """Fit and save factors for a loaded run; returns ``(factors, path, seconds)``.

    An interrupted fit resumes from its checkpoint in the factors folder (removed once
    the factors are saved)."""
    import shutil

    import influence as inf

    train = run.train if max_sequences is None else run.train.select(range(min(max_sequences, len(run.train))))
    folder = factors_dir(run_dir, strategy, layers)
    checkpoint = folder / "checkpoint"
    t0 = time.perf_counter()
    factors = inf.fit_factors(run.model, inf.tasks.CausalLM(), train, strategy=strategy, fisher=fisher,
                              layers=layer_filter(layers), key=jax.random.key(seed), batch_size=batch_size,
                              progress=progress, mesh=devices, blocks=blocks, factor_dtype=factor_dtype,
                              checkpoint_dir=checkpoint, resume=True)
    seconds = time.perf_counter() - t0
    path = factors.save(folder)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return factors, path, seconds


def run(args: argparse.Namespace) -> int:
    from influence.lm import load_run

    target = factors_dir(args.run, args.strategy, args.layers) / "factors.npz"
    if target.exists() and not args.force:
        print(f"factors already fitted: {target} (use --force to refit)")
        return 0
    try:
        loaded = load_run(args.run)
    except (FileNotFoundError, ValueError) as e:
        return fail("fit", str(e))
    try:
        factors, path, seconds = fit_run(loaded, args.run, args.strategy, args.layers, fisher=args.fisher,
                                         batch_size=args.batch_size, max_sequences=args.max_sequences,
                                         seed=args.seed, progress=not args.quiet, devices=args.devices,
                                         blocks=args.blocks, factor_dtype=args.factor_dtype)
    except ValueError as e:
        return fail("fit", str(e))
    layers = ", ".join(factors.layer_names)
    print(f"fitted {args.strategy} on {factors.metadata['n_examples']} sequences in {seconds:.1f} s; layers: {layers}")
    print(f"factors: {path}")
    return 0
