"""Speed of fitting and scoring, as ratios to one forward+backward pass over the same data.

All numbers come from one run on one machine: the baseline is a jitted
``value_and_grad`` of the summed training loss over the same batches (batch size and
padding identical), timed after compilation like everything else.

  python -m benchmarks.speed                 # digits MLP 64-256-256-10, 1536 examples, 128 queries
  python -m benchmarks.speed --model lm      # a one-block transformer on synthetic sequences
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import influence as inf
from influence.runtime.data import as_source
from influence.testing import TinyLM, digits, lm_sequences


def timed(fn, repeats=3):
    """Best wall time of ``fn()`` over ``repeats`` runs after one warm-up (compilation)."""
    fn()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def forward_backward(model, task, data, batch_size):
    """One pass of jitted value_and_grad of the summed loss over every batch."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, batch, mask):
        def loss(state):
            return jnp.sum(task.loss(nnx.merge(graphdef, state), batch) * mask)

        return jax.value_and_grad(loss)(state)

    source = as_source(data, batch_size, task)
    batches = [(b.arrays, b.example_mask) for b in source]

    def run():
        out = None
        for arrays, mask in batches:
            out = step(state, arrays, mask)
        jax.block_until_ready(out)

    return run


def setup(name: str, n_train: int, width: int | None = None):
    """Model, task, training set, queries and a label for ``name`` ("mlp" or "lm").

    ``width``: the MLP's hidden width (default 256) or the transformer's d_model (default
    128; 4 heads, MLP 2·d, T=64, vocabulary 256)."""
    if name == "mlp":
        x, y = digits()
        hidden = width or 256

        class Deep(nnx.Module):
            def __init__(self, rngs):
                self.l1 = nnx.Linear(64, hidden, rngs=rngs)
                self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
                self.l3 = nnx.Linear(hidden, 10, rngs=rngs)

            def __call__(self, x):
                return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))

        model = Deep(nnx.Rngs(0))
        reps = int(np.ceil(n_train / len(y)))
        train = {"x": np.tile(x, (reps, 1))[:n_train], "y": np.tile(y, reps)[:n_train]}
        queries = {"x": x[-128:], "y": y[-128:]}
        return model, inf.tasks.Classification(), train, queries, f"MLP 64-{hidden}-{hidden}-10"
    d = width or 128
    model = TinyLM(vocab=256, d=d, heads=4, context=64, rngs=nnx.Rngs(0))
    train = lm_sequences(n_train, length=64, vocab=256)
    queries = lm_sequences(32, length=64, vocab=256, seed=1)
    return model, inf.tasks.CausalLM(), train, queries, f"transformer block d={d}, T=64, V=256"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "lm"], default="mlp")
    parser.add_argument("--n-train", type=int, default=None, help="training examples (default 1536 mlp, 512 lm)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--strategies", default="identity,diagonal,kfac,ekfac")
    args = parser.parse_args(argv)
    n_train = args.n_train or (1536 if args.model == "mlp" else 512)
    model, task, train, queries, label = setup(args.model, n_train)
    bs = args.batch_size
    n_query = len(next(iter(queries.values())))
    base = timed(forward_backward(model, task, train, bs))
    print(f"{label}; {n_train} training examples, {n_query} queries, batch {bs}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
          f"{jax.device_count()} device(s))")
    print(f"one forward+backward pass over the training set: {base * 1e3:.1f} ms")
    print()
    print("| strategy | fit (s) | fit ÷ fwd+bwd | pairwise scores (s) | scores ÷ fwd+bwd | self scores (s) |")
    print("|---|---|---|---|---|---|")
    for strategy in args.strategies.split(","):
        def fit(strategy=strategy):
            return inf.fit_factors(model, task, train, strategy=strategy, batch_size=bs, progress=False)
        t_fit = timed(fit, repeats=2)
        factors = fit()

        def score(factors=factors):
            return inf.pairwise_scores(model, task, factors, queries, train, batch_size=bs, progress=False).values

        def self_score(factors=factors):
            return inf.self_scores(model, task, factors, train, batch_size=bs, progress=False)

        t_score = timed(score, repeats=2)
        t_self = timed(self_score, repeats=2)
        print(f"| {strategy} | {t_fit:.3f} | {t_fit / base:.1f}× | {t_score:.3f} | {t_score / base:.1f}× | "
              f"{t_self:.3f} |")


if __name__ == "__main__":
    main()
