"""Training throughput of the scale ladder: tokens per second of the real training step
(AdamW + clipping, jitted) on random token ids, one scale at a time, printed as a table.

    python benchmarks/train_throughput.py                 # mini small medium large
    python benchmarks/train_throughput.py --scales tiny mini --seconds 5

Numbers depend on what else the machine is running; on a shared CPU, run it alone.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from influence.lm.model import LADDER, get_scale, init_model, parameter_counts
from influence.lm.train import TrainConfig, make_optimizer, make_train_step


def measure(scale: str, vocab_size: int, seconds: float) -> dict:
    """Steps for about ``seconds`` after one compiling step; returns the measured rates."""
    s = get_scale(scale)
    cfg = TrainConfig(scale=scale, vocab_size=vocab_size).resolved()
    model = init_model(s.config(vocab_size))
    counts = parameter_counts(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(2, vocab_size, (cfg.batch_size, cfg.seq_len)), dtype=jnp.int32)
    mask = jnp.ones_like(ids).at[:, 0].set(0)
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, rest, opt_state, ids, mask)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        params, opt_state, loss = step(params, rest, opt_state, ids, mask)
        loss.block_until_ready()  # as in training, where every step's loss is read
        n += 1
    dt = (time.perf_counter() - t0) / n
    tokens = cfg.batch_size * cfg.seq_len
    return {"scale": scale, "non_embedding": counts["non_embedding"], "total": counts["total"],
            "tokens_per_step": tokens, "ms_per_step": 1e3 * dt, "tokens_per_s": tokens / dt,
            "budget_min": cfg.tokens / (tokens / dt) / 60, "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", nargs="+", default=[n for n in LADDER if n != "tiny"], choices=list(LADDER))
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per scale (default: 10)")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"vocab {args.vocab_size}")
    header = f"{'scale':<8}{'non-emb':>10}{'total':>11}{'tok/step':>10}{'ms/step':>10}{'tok/s':>10}" \
             f"{'budget min':>12}{'compile s':>11}"
    print(header)
    print("-" * len(header))
    for name in args.scales:
        r = measure(name, args.vocab_size, args.seconds)
        print(f"{r['scale']:<8}{r['non_embedding']:>10,}{r['total']:>11,}{r['tokens_per_step']:>10,}"
              f"{r['ms_per_step']:>10.1f}{r['tokens_per_s']:>10,.0f}{r['budget_min']:>12.1f}{r['compile_s']:>11.1f}",
              flush=True)


if __name__ == "__main__":
    main()
