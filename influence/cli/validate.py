"""``influence validate``: which attribution method holds under retraining on a small run.

Builds a small deterministic run — the digits MLP (``--digits``), or a subset of an
``influence train`` run's sequences retrained with its recipe (``RUN``) — scores its
queries with every method, retrains on random subsets (deterministically and re-seeded)
and reports each method's LDS with 95 % intervals over queries, its cost in seconds and
in training runs, and the retrain-without-top-k check (:func:`influence.validate`).
Writes ``validate.json``, ``validate.md`` (the table) and ``validate.png`` to ``--out``.

Example:
  influence validate --digits --out runs/validate
  influence validate runs/tiny --n-train 64 --queries 8 --steps 32 --out runs/validate-lm
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

# The methods of influence.reference.validate.METHODS, written out so that building the
# parser (``influence --help``) does not import JAX; tests/cli/test_conventions.py holds the two equal.
METHODS = ("ekfac", "identity", "metagradient", "trajectory", "trackstar")

# The plot is drawn with matplotlib; --digits reads scikit-learn's bundled digits.
REQUIRES = ("experiments", ("sklearn", "matplotlib"))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", nargs="?", type=Path, help="an `influence train` run folder (or use --digits)")
    parser.add_argument("--digits", action="store_true", help="validate on the bundled digits MLP instead")
    parser.add_argument("--out", type=Path, default=Path("runs/validate"),
                        help="output folder (default: runs/validate)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)} (default: all)")
    parser.add_argument("--n-train", type=int, default=256, help="training examples of the small run (default: 256)")
    parser.add_argument("--queries", type=int, default=16, help="queries (default: 16)")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the small run (default: 200)")
    parser.add_argument("--subsets", type=int, default=32, help="random subsets retrained (default: 32)")
    parser.add_argument("--fraction", type=float, default=0.5, help="fraction kept in each subset (default: 0.5)")
    parser.add_argument("--reseeds", type=int, default=2, help="seeds of the re-seeded retraining (default: 2)")
    parser.add_argument("--checkpoints", type=int, default=4, help="checkpoints of trajectory methods (default: 4)")
    parser.add_argument("--top-k", type=float, default=0.01, help="fraction removed in the top-k check (default: 0.01)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def digits_run(n_train: int, n_queries: int, steps: int, hidden: int = 32, lr: float = 1e-2,
               weight_decay: float = 1e-3, dtype=None):
    """``(run, task, queries, key)``: a tanh MLP 64-hidden-10 on the first ``n_train``
    digits, full-batch Adam (eps_root 1e-16, see :func:`influence.unrolled.lm_run`),
    queries from the held-out tail (images 1500 on); ``dtype`` e.g. float64 (needs
    ``jax_enable_x64``)."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from influence import tasks
    from influence.testing import digits
    from influence.unrolled import mean_loss_run

    class DigitsMLP(nnx.Module):
        def __init__(self, seed):
            rngs = nnx.Rngs(seed)
            self.l1, self.l2 = nnx.Linear(64, hidden, rngs=rngs), nnx.Linear(hidden, 10, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    x, y = digits()
    run = mean_loss_run(DigitsMLP, tasks.Classification(), {"x": x[:n_train], "y": y[:n_train]},
                        optax.adam(lr, eps_root=1e-16), steps, weight_decay, dtype=dtype)
    queries = {"x": x[1500:1500 + n_queries], "y": y[1500:1500 + n_queries]}
    key = {"setting": "digits-mlp", "n_train": n_train, "n_queries": n_queries, "steps": steps, "hidden": hidden,
           "lr": lr, "weight_decay": weight_decay, **({} if dtype is None else {"dtype": str(dtype)})}
    return run, tasks.Classification(), queries, key


def lm_validation_run(path: Path, n_train: int, n_queries: int, steps: int, seed: int = 0):
    """``(run, task, queries, key)``: the first ``n_train`` training sequences of an
    ``influence train`` run, retrained from its recipe for ``steps`` steps (a small run
    of the same model and optimizer), queries its first ``n_queries`` held-out sequences."""
    import dataclasses

    import jax.numpy as jnp

    from influence import tasks
    from influence.lm import TrainConfig, as_arrays, load_run
    from influence.unrolled import lm_run

    loaded = load_run(path)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in loaded.train_config.items() if k in fields})
    cfg = dataclasses.replace(cfg.resolved(), tokens=steps * cfg.resolved().batch_size * cfg.resolved().seq_len)
    ids, mask = as_arrays(loaded.train.select(np.arange(min(n_train, len(loaded.train)))))
    q_ids, q_mask = as_arrays(loaded.heldout.select(np.arange(min(n_queries, len(loaded.heldout)))))
    run = lm_run(cfg, ids, mask, vocab_size=loaded.tokenizer.vocab_size)
    queries = {"input_ids": jnp.asarray(q_ids), "loss_mask": jnp.asarray(q_mask)}
    key = {"setting": "lm", "run": str(Path(path).resolve()), "n_train": len(ids), "n_queries": len(q_ids),
           "steps": steps, "tokenizer": loaded.tokenizer.fingerprint()}
    return run, tasks.CausalLM(), queries, key


def run(args: argparse.Namespace) -> int:
    from influence.cli.common import check_output_dir, fail
    from influence.reference.validate import validate
    from influence.runtime import io

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        return fail("validate", f"unknown --methods {unknown}; choose from {', '.join(METHODS)}")
    if args.digits == (args.run is not None):
        return fail("validate", "give either a run folder or --digits")
    if min(args.n_train, args.queries, args.steps, args.subsets) < 1 or args.n_train < 8:
        return fail("validate", "--n-train (≥ 8), --queries, --steps and --subsets must be positive")
    check_output_dir(args.out, "--out")
    if args.digits:
        small, task, queries, key = digits_run(args.n_train, args.queries, args.steps)
    else:
        small, task, queries, key = lm_validation_run(args.run, args.n_train, args.queries, args.steps)
    result = validate(small, task, queries, methods=methods, n_subsets=args.subsets, fraction=args.fraction,
                      reseeds=tuple(range(1, 1 + args.reseeds)), n_checkpoints=args.checkpoints,
                      top_k_fraction=args.top_k, cache_dir=args.out / "cache", run_key=key,
                      batch_size=32, progress=not args.quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    result.save(args.out / "validate.json")
    table = result.table()
    io.atomic_write_bytes(args.out / "validate.md", (table + "\n").encode())
    result.plot(args.out / "validate.png")
    print(table)
    for method, why in result.skipped.items():
        print(f"skipped {method}: {why}")
    print(f"one training run: {result.settings['one_training_run_seconds']:.1f} s; wrote {args.out}/validate.json, "
          f"validate.md, validate.png")
    return 0
