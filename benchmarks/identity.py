"""Bit-identity of results across a refactoring: run on two commits, compare the files.

Computes, on the small test fixtures (the digits MLP and the tiny LM), the factors of every
strategy and Fisher, pairwise scores (per layer, full and low rank), self scores, a
top-k ranking with candidates and a score file, token attribution, and the same fit,
scores and ranking interrupted and resumed from a checkpoint. Every array goes into one
``.npz``; ``--compare A B`` reports any array that differs in a single bit.

    git worktree add /tmp/before <old-commit>
    (cd /tmp/before && python -m benchmarks.identity --out /tmp/before.npz)
    python -m benchmarks.identity --out /tmp/after.npz
    python -m benchmarks.identity --compare /tmp/before.npz /tmp/after.npz

The script speaks both the layout before the architecture change (influence.examples,
influence.query.rank_training) and after it (influence.testing, inf.rank_training), so
the same file runs on both commits. Results are bit-identical only on one machine and
one jax version: XLA's numerics differ between processors.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np

import influence as inf

try:
    from influence import testing as fixtures
except ImportError:  # the layout before the architecture change
    from influence import examples as fixtures

try:
    rank_training, attribute = inf.rank_training, inf.attribute
except AttributeError:
    from influence.query import attribute, rank_training


class Interrupted(RuntimeError):
    pass


def _interrupting(data, batch, fail_calls):
    """A callable source that raises before batch ``fail_calls[c]`` of its ``c``-th call."""
    calls = []

    def batches():
        calls.append(1)
        fail_at = fail_calls.get(len(calls))
        for i, lo in enumerate(range(0, len(data["input_ids"]), batch)):
            if i == fail_at:
                raise Interrupted
            yield {k: v[lo : lo + batch] for k, v in data.items()}

    return batches


def _factor_arrays(prefix, factors, out):
    for name, curv in factors.layers.items():
        for field, x in zip(type(curv)._fields, curv):
            if x is None:
                continue
            parts = x if isinstance(x, tuple | list) else (x,)
            for i, part in enumerate(parts):
                out[f"{prefix}/{name}/{field}/{i}"] = np.asarray(part, np.float32)
    out[f"{prefix}/n_examples"] = np.asarray(factors.metadata["n_examples"])


def _values(result):
    """Scores or self scores as ``(values, per_layer or None)`` in either API."""
    if isinstance(result, tuple):
        return result
    if isinstance(result, np.ndarray):
        return result, None
    return result.values, result.per_layer


def _score_arrays(prefix, result, out):
    values, per_layer = _values(result)
    out[f"{prefix}/values"] = np.asarray(values)
    for name, v in (per_layer or {}).items():
        out[f"{prefix}/per_layer/{name}"] = np.asarray(v)


def _ranking_arrays(prefix, ranking, out):
    out[f"{prefix}/indices"] = np.asarray(ranking.indices)
    out[f"{prefix}/scores"] = np.asarray(getattr(ranking, "values", getattr(ranking, "scores", None)))


def compute() -> dict[str, np.ndarray]:
    import jax

    out: dict[str, np.ndarray] = {}
    model, data, queries = fixtures.trained_mlp()
    task = inf.tasks.Classification()
    for strategy in ("identity", "diagonal", "kfac", "ekfac"):
        for fisher in ("sampled", "empirical", "exact"):
            if strategy == "identity" and fisher != "sampled":
                continue
            f = inf.fit_factors(model, task, data, strategy=strategy, fisher=fisher, key=jax.random.key(3),
                                batch_size=32, progress=False)
            tag = f"mlp/{strategy}/{fisher}"
            _factor_arrays(f"{tag}/factors", f, out)
            _score_arrays(f"{tag}/pairwise", inf.pairwise_scores(model, task, f, queries, data, per_layer=True,
                                                                 progress=False), out)
            _score_arrays(f"{tag}/self", inf.self_scores(model, task, f, data, per_layer=True, progress=False), out)
    ekfac = inf.fit_factors(model, task, data, strategy="ekfac", progress=False)
    _score_arrays("mlp/ekfac/rank2", inf.pairwise_scores(model, task, ekfac, queries, data, query_rank=2,
                                                         progress=False), out)
    _score_arrays("mlp/ekfac/damping", inf.pairwise_scores(model, task, ekfac, queries, data, damping=1e-3,
                                                           progress=False), out)
    bf16 = inf.fit_factors(model, task, data, strategy="ekfac", factor_dtype="bfloat16", progress=False)
    _factor_arrays("mlp/ekfac-bf16/factors", bf16, out)
    _score_arrays("mlp/ekfac-bf16/pairwise", inf.pairwise_scores(model, task, bf16, queries, data, progress=False), out)

    lm, lm_data, lm_queries = fixtures.trained_lm()
    causal = inf.tasks.CausalLM()
    lm_factors = inf.fit_factors(lm, causal, lm_data, strategy="ekfac", batch_size=8, progress=False)
    _factor_arrays("lm/ekfac/factors", lm_factors, out)
    _score_arrays("lm/ekfac/pairwise", inf.pairwise_scores(lm, causal, lm_factors, lm_queries, lm_data, per_layer=True,
                                                           batch_size=8, progress=False), out)
    blocked = inf.fit_factors(lm, causal, lm_data, strategy="ekfac", blocks=2, batch_size=8, progress=False)
    _factor_arrays("lm/ekfac-blocks/factors", blocked, out)
    _score_arrays("lm/ekfac-blocks/pairwise", inf.pairwise_scores(lm, causal, blocked, lm_queries, lm_data,
                                                                  batch_size=8, progress=False), out)
    kfac = inf.fit_factors(lm, causal, lm_data, strategy="kfac", layers="mlp", batch_size=8, progress=False)
    _factor_arrays("lm/kfac-mlp/factors", kfac, out)

    with tempfile.TemporaryDirectory() as tmp:
        candidates = [np.arange(q, 32, 2) for q in range(len(lm_queries["input_ids"]))]
        ranking = rank_training(lm, causal, lm_factors, lm_queries, lm_data, k=5, candidates=candidates,
                                query_rank=4, scores_path=os.path.join(tmp, "all.npy"), batch_size=8, progress=False)
        _ranking_arrays("lm/ranking", ranking, out)
        out["lm/ranking/all"] = np.load(os.path.join(tmp, "all.npy"))
        pairs = np.array([(q, int(r)) for q in range(ranking.indices.shape[0]) for r in ranking.indices[q] if r >= 0])
        out["lm/attribution"] = np.asarray(attribute(lm, causal, lm_factors, ranking, lm_data, pairs,
                                                     batch_size=8).per_layer_token)

        # the same computations, interrupted and resumed from a checkpoint
        source = _interrupting(lm_data, 4, {1: 5, 3: 2})

        def fit():
            return inf.fit_factors(lm, causal, source, strategy="ekfac", batch_size=4, progress=False,
                                   checkpoint_dir=os.path.join(tmp, "fit"), checkpoint_every=3)

        for _ in range(2):
            try:
                fit()
            except Interrupted:
                pass
        _factor_arrays("lm/resumed/factors", fit(), out)
        source = _interrupting(lm_data, 4, {1: 5})

        def scores():
            return inf.pairwise_scores(lm, causal, lm_factors, lm_queries, source, batch_size=4, progress=False,
                                       checkpoint_dir=os.path.join(tmp, "scores"), checkpoint_every=2)

        try:
            scores()
        except Interrupted:
            pass
        _score_arrays("lm/resumed/pairwise", scores(), out)
    return out


def compare(a_path: str, b_path: str) -> int:
    a, b = np.load(a_path), np.load(b_path)
    only = sorted(set(a.files) ^ set(b.files))
    differ = [k for k in sorted(set(a.files) & set(b.files))
              if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes()]
    print(f"{len(set(a.files) & set(b.files))} arrays in both; {len(differ)} differ; {len(only)} in one file only")
    for k in differ:
        d = np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))) if a[k].shape == b[k].shape else "shape"
        print(f"  differs: {k} (max abs difference {d})")
    for k in only:
        print(f"  only in {'first' if k in a.files else 'second'}: {k}")
    return 1 if differ or only else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write every result array to this .npz")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two files written with --out")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        parser.error("give --out FILE or --compare A B")
    arrays = compute()
    np.savez(args.out, **arrays)
    print(f"{len(arrays)} arrays written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
