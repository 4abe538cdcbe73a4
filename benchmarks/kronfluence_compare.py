"""Side by side with kronfluence (PyTorch): same MLP weights, same data, same damping.

  python -m benchmarks.kronfluence_compare [--kron-python /tmp/venv-kron/bin/python]

The MLP 64-256-256-10 (ReLU) of ``benchmarks.speed``, trained here on 1,536 digits
(full-batch Adam), scores 128 held-out digits. Its weights are written to a file and
``benchmarks/kronfluence_side.py`` runs kronfluence 1.0.1 on them in another interpreter
(one with torch CPU and kronfluence; torch is never a dependency of this package, see
docs/benchmarks.md for the three install lines). Reported per configuration: agreement of
the two score matrices (Pearson and Spearman per query, averaged; top-10 overlap;
relative Frobenius difference) and the fit + score wall times, ours after compilation and
including it. With the empirical Fisher both libraries are deterministic; with the
sampled Fisher each draws its own labels, so the scores differ by sampling noise too.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax
from scipy.stats import pearsonr, spearmanr

import influence as inf
from benchmarks.speed import setup, timed
from influence.testing import train as train_model

SIDE = Path(__file__).with_name("kronfluence_side.py")
CONFIGS = (("ekfac", "empirical", None), ("ekfac", "empirical", 1e-3), ("kfac", "empirical", None),
           ("ekfac", "sampled", None))


def trained_model(n_train: int = 1536):
    model, task, train, queries, label = setup("mlp", n_train)
    def ce(m, d):
        return optax.softmax_cross_entropy_with_integer_labels(m(d["x"]), d["y"]).mean()
    train_model(model, ce, {k: np.asarray(v) for k, v in train.items()}, steps=300, lr=1e-3, weight_decay=1e-4)
    return model, task, train, queries, label


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    return {
        "pearson": float(np.mean([pearsonr(x, y)[0] for x, y in zip(a, b)])),
        "spearman": float(np.mean([spearmanr(x, y)[0] for x, y in zip(a, b)])),
        "top10": float(np.mean([len(set(np.argsort(-x)[:10]) & set(np.argsort(-y)[:10])) / 10 for x, y in zip(a, b)])),
        "relative_difference": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
    }


def kronfluence_scores(python: str, model, train, queries, strategy, fisher, damping, batch_size, repeats) -> dict:
    layers = [model.l1, model.l2, model.l3]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, n_layers=len(layers), activation="relu", strategy=strategy, fisher=fisher,
                 damping=np.nan if damping is None else damping, batch_size=batch_size, repeats=repeats,
                 train_x=np.asarray(train["x"], np.float32), train_y=np.asarray(train["y"], np.int64),
                 query_x=np.asarray(queries["x"], np.float32), query_y=np.asarray(queries["y"], np.int64),
                 **{f"kernel{i}": np.asarray(layer.kernel[...]) for i, layer in enumerate(layers)},
                 **{f"bias{i}": np.asarray(layer.bias[...]) for i, layer in enumerate(layers)})
        subprocess.run([python, str(SIDE), str(src), str(dst)], check=True)
        out = np.load(dst)
        return {k: out[k] for k in out.files}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kron-python", default=os.environ.get("KRONFLUENCE_PYTHON", "/tmp/venv-kron/bin/python"),
                        help="an interpreter with torch (CPU) and kronfluence 1.0.1")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    model, task, train, queries, label = trained_model()
    n_train, n_query = len(train["y"]), len(queries["y"])
    print(f"{label} trained on {n_train} digits, {n_query} queries, batch {args.batch_size}; jax {jax.__version__}, "
          f"{platform.machine()} with {os.cpu_count()} cores")
    print("| strategy | fisher | damping | Pearson | Spearman | top-10 | rel. diff. | ours fit+score (s) | "
          "ours incl. compile (s) | kronfluence fit+score (s) | kronfluence ÷ ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for strategy, fisher, damping in CONFIGS:
        def ours(key=None, strategy=strategy, fisher=fisher, damping=damping):
            factors = inf.fit_factors(model, task, train, strategy=strategy, fisher=fisher, batch_size=args.batch_size,
                                      key=key, progress=False)
            return inf.pairwise_scores(model, task, factors, queries, train, damping=damping,
                                       batch_size=args.batch_size, progress=False).values

        jax.clear_caches()  # the first call pays compilation, as a new user's would
        t0 = time.perf_counter()
        values = ours()
        first = time.perf_counter() - t0
        best = timed(ours, repeats=args.repeats)
        kron = kronfluence_scores(args.kron_python, model, train, queries, strategy, fisher, damping, args.batch_size,
                                  args.repeats)
        theirs = kron["scores"]
        t_kron = float(kron["fit_seconds"] + kron["score_seconds"])
        a = agreement(values, theirs)
        lam = "0.1×mean Λ" if damping is None else f"{damping:g}"
        print(f"| {strategy} | {fisher} | {lam} | {a['pearson']:.4f} | {a['spearman']:.4f} | {a['top10']:.2f} | "
              f"{a['relative_difference']:.2e} | {best:.2f} | {first:.2f} | {t_kron:.2f} | {t_kron / best:.0f}× |",
              flush=True)
        if fisher == "sampled":  # how far apart two of our own fits with other sampled labels are
            b = agreement(ours(jax.random.key(1)), values)
            notes.append(f"{strategy}, sampled Fisher: ours with another sampling key against ours: Pearson "
                         f"{b['pearson']:.4f}, Spearman {b['spearman']:.4f}, top-10 {b['top10']:.2f}, "
                         f"rel. diff. {b['relative_difference']:.2e}")
    print("\n".join(["", *notes]))
    print(f"(kronfluence: torch {kron['torch_version']}, {int(kron['threads'])} threads; times are the best of "
          f"{args.repeats} runs; kronfluence's include writing its factors and scores to a temporary folder)")


if __name__ == "__main__":
    main()
