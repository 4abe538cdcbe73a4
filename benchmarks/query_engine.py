"""Query engine: scoring time relative to a forward+backward pass, and rank-r accuracy.

For a trained run (default: the demo's, made by `influence demo`), builds 32 queries from
held-out sequences (a 64-token prompt, the next 32 tokens as completion), then measures
in one process, after compilation:

* one jitted forward+backward pass (value_and_grad of the summed loss) over the training set;
* ranking every training sequence for the 32 queries (top-10 kept), full rank and rank 32;
* agreement of rank-r scores with full-rank scores for r = 1 … 64.

  python -m benchmarks.query_engine --run runs/demo
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import jax
import numpy as np
from scipy.stats import pearsonr, spearmanr

import influence as inf
from benchmarks.speed import forward_backward, timed
from influence.lm.run import factors_dir
from influence.scoring.ranking import rank_training


def held_out_queries(run, n: int, prompt: int, completion: int) -> dict[str, np.ndarray]:
    """``n`` queries from held-out sequences with at least prompt+completion real tokens."""
    table = run.heldout.with_format("numpy")
    ids, mask = np.asarray(table["input_ids"]), np.asarray(table["loss_mask"])
    full = np.flatnonzero(mask[:, 1 : prompt + completion].all(axis=1))
    if len(full) < n:
        raise SystemExit(f"only {len(full)} held-out sequences have {prompt + completion} tokens; lower --queries")
    rows = full[:n]
    q_ids = ids[rows, : prompt + completion]
    q_mask = np.zeros_like(q_ids)
    q_mask[:, prompt:] = 1
    return {"input_ids": q_ids.astype(np.int32), "loss_mask": q_mask.astype(np.int32)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64")
    args = parser.parse_args(argv)
    from influence.lm import load_run

    if not (args.run / "run.json").exists():
        raise SystemExit(f"no run at {args.run}; make one with `influence demo --out {args.run}`")
    run = load_run(args.run)
    task = inf.tasks.CausalLM()
    path = factors_dir(args.run, "ekfac", "mlp")
    if (path / "factors.npz").exists():
        factors = inf.Factors.load(path, model=run.model)
    else:
        factors = inf.fit_factors(run.model, task, run.train, strategy="ekfac", layers="mlp", progress=False)
    queries = held_out_queries(run, args.queries, 64, 32)
    bs = args.batch_size
    n_train, seq_len = len(run.train), run.config.context_length
    print(f"run {args.run} (step {run.step}), {n_train} training sequences of {seq_len} tokens, "
          f"{args.queries} queries (64-token prompt, 32-token completion), EK-FAC on {len(factors.layer_names)} MLP "
          f"layers, batch {bs}; jax {jax.__version__} {jax.devices()[0].platform} ({platform.machine()})")

    base = timed(forward_backward(run.model, task, run.train, bs))
    timings = {}
    for label, rank in (("full rank", None), ("rank 32", 32)):
        timings[label] = timed(lambda r=rank: rank_training(run.model, task, factors, queries, run.train, k=10,
                                                           query_rank=r, batch_size=bs, progress=False))
    print(f"\none forward+backward pass over the training set: {base:.2f} s\n")
    print("| scoring 32 queries (top-10 per query) | seconds | ÷ forward+backward |")
    print("|---|---|---|")
    for label, t in timings.items():
        print(f"| {label} | {t:.2f} | {t / base:.2f}× |")

    full = inf.pairwise_scores(run.model, task, factors, queries, run.train, batch_size=bs, progress=False).values
    print("\n| query rank | Pearson (all pairs) | mean Spearman per query | top-10 overlap |")
    print("|---|---|---|---|")
    for r in (int(x) for x in args.ranks.split(",")):
        low = inf.pairwise_scores(run.model, task, factors, queries, run.train, query_rank=r, batch_size=bs,
                                  progress=False).values
        pe = pearsonr(low.ravel(), full.ravel())[0]
        sp = np.mean([spearmanr(a, b)[0] for a, b in zip(low, full)])
        top = np.mean([len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10 for a, b in zip(low, full)])
        print(f"| {r} | {pe:.4f} | {sp:.4f} | {top:.2f} |")


if __name__ == "__main__":
    main()
