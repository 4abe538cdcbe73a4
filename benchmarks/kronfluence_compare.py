"""Side by side with kronfluence (PyTorch): same MLP weights, same data, same damping.

  python -m benchmarks.kronfluence_compare [--kron-python /tmp/venv-kron/bin/python]
  python -m benchmarks.kronfluence_compare --model cnn --out docs/benchmarks/kronfluence-cnn.json

The MLP 64-256-256-10 (ReLU) of ``benchmarks.speed``, trained here on 1,536 digits
(full-batch Adam), scores 128 held-out digits. Its weights are written to a file and
``benchmarks/kronfluence_side.py`` runs kronfluence 1.0.1 on them in another interpreter
(one with torch CPU and kronfluence; torch is never a dependency of this package, see
docs/benchmarks.md for the three install lines). Reported per configuration: agreement of
the two score matrices (Pearson and Spearman per query, averaged; top-10 overlap;
relative Frobenius difference) and the fit + score wall times, ours after compilation and
including it. With the empirical Fisher both libraries are deterministic; with the
sampled Fisher each draws its own labels, so the scores differ by sampling noise too.

``--model cnn``: the digits CNN (two 3×3 ``nnx.Conv`` + two ``nnx.Linear``, the same
weights in PyTorch), empirical Fisher, at a fixed damping and at each library's default;
also per-layer agreement, and K-FAC with kronfluence's eigenvalue convention
(:func:`kronfluence_kfac`); ``--out`` writes the JSON docs/benchmarks.md renders.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from scipy.stats import pearsonr, spearmanr

import influence as inf
from benchmarks.speed import setup, timed
from influence.testing import digits
from influence.testing import train as train_model

SIDE = Path(__file__).with_name("kronfluence_side.py")
# the digits CNN (--model cnn): empirical Fisher, at a fixed damping and at each library's default
CNN_CONFIGS = (("ekfac", "empirical", 1e-3), ("kfac", "empirical", 1e-3), ("ekfac", "empirical", None),
               ("kfac", "empirical", None))
CNN_LAYERS = ("conv1", "conv2", "fc1", "fc2")
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


def trained_cnn(n_train: int = 1536, n_query: int = 128):
    """The digits CNN (:class:`experiments.validation.settings.DigitsCNN`, ReLU) trained on
    the first ``n_train`` digits (full-batch Adam, as :func:`trained_model`); queries are
    the last ``n_query`` digits, never trained on."""
    from experiments.validation.settings import DigitsCNN

    x, y = digits()
    train = {"x": x[:n_train], "y": y[:n_train]}
    queries = {"x": x[-n_query:], "y": y[-n_query:]}
    model = DigitsCNN(activation="relu", rngs=nnx.Rngs(0))
    def ce(m, d):
        return optax.softmax_cross_entropy_with_integer_labels(m(d["x"]), d["y"]).mean()
    train_model(model, ce, train, steps=300, lr=1e-3, weight_decay=1e-4)
    return model, inf.tasks.Classification(), train, queries, "digits CNN conv 3×3 1→8, 8→16 (SAME), fc 1024-32-10"


def kronfluence_cnn_scores(python: str, model, train, queries, strategy, fisher, damping, batch_size,
                           repeats) -> dict:
    """kronfluence's scores of the CNN on the same weights: the total and each layer's."""
    layers = [getattr(model, name) for name in CNN_LAYERS]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, model="cnn", per_module=True, n_layers=len(layers), activation="relu", strategy=strategy,
                 fisher=fisher, damping=np.nan if damping is None else damping, batch_size=batch_size,
                 repeats=repeats, train_x=np.asarray(train["x"], np.float32),
                 train_y=np.asarray(train["y"], np.int64), query_x=np.asarray(queries["x"], np.float32),
                 query_y=np.asarray(queries["y"], np.int64),
                 **{f"kernel{i}": np.asarray(layer.kernel[...]) for i, layer in enumerate(layers)},
                 **{f"bias{i}": np.asarray(layer.bias[...]) for i, layer in enumerate(layers)})
        subprocess.run([python, str(SIDE), str(src), str(dst)], check=True)
        out = np.load(dst)
        return {k: out[k] for k in out.files}


def kronfluence_kfac(factors: inf.Factors) -> inf.Factors:
    """``factors`` (K-FAC) with kronfluence's eigenvalues Λ = e_A e_Sᵀ instead of ours,
    T̄ e_A e_Sᵀ (T̄ = counted tokens per example: the positions of a convolution's output,
    1 for a linear layer on vectors). KFC (Grosse & Martens 2016) sums a convolution's
    per-position curvature over the positions, hence the T̄; kronfluence averages."""
    layers = {name: c._replace(eigenvalues=np.outer(c.a_eigenvalues, c.s_eigenvalues).astype(c.eigenvalues.dtype))
              for name, c in factors.layers.items()}
    return inf.Factors(factors.strategy, layers, factors.metadata)


def main_cnn(args) -> dict:
    """The CNN comparison: total and per-layer agreement per configuration, as a dict (also
    printed as a table)."""
    model, task, train, queries, label = trained_cnn()
    n_train, n_query = len(train["y"]), len(queries["y"])
    print(f"{label} trained on {n_train} digits, {n_query} queries, batch {args.batch_size}; jax {jax.__version__}, "
          f"{platform.machine()} with {os.cpu_count()} cores")
    print("| strategy | fisher | damping | Pearson | Spearman | top-10 | rel. diff. | Pearson per layer "
          f"({', '.join(CNN_LAYERS)}) | ours fit+score (s) | kronfluence fit+score (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for strategy, fisher, damping in CNN_CONFIGS:
        def fit(strategy=strategy, fisher=fisher):
            return inf.fit_factors(model, task, train, strategy=strategy, fisher=fisher, batch_size=args.batch_size,
                                   progress=False)

        def ours(factors=None, damping=damping):
            return inf.pairwise_scores(model, task, factors or fit(), queries, train, damping=damping,
                                       per_layer=True, batch_size=args.batch_size, progress=False)

        factors = fit()
        candidates = [("ours", ours(factors))]
        if strategy == "kfac":  # kronfluence's K-FAC Λ = e_A e_Sᵀ, without our T̄ (positions per image)
            candidates.append(("ours, Λ = e_A e_Sᵀ (kronfluence's K-FAC)", ours(kronfluence_kfac(factors))))
        best = timed(lambda: ours().values, repeats=args.repeats)
        kron = kronfluence_cnn_scores(args.kron_python, model, train, queries, strategy, fisher, damping,
                                      args.batch_size, args.repeats)
        t_kron = float(kron["fit_seconds"] + kron["score_seconds"])
        lam = "0.1×mean Λ" if damping is None else f"{damping:g}"
        for variant, scores in candidates:
            a = agreement(scores.values, kron["scores"])
            per_layer = {name: agreement(scores.per_layer[name], kron[f"scores_{name}"]) for name in CNN_LAYERS}
            print(f"| {strategy} ({variant}) | {fisher} | {lam} | {a['pearson']:.4f} | {a['spearman']:.4f} | "
                  f"{a['top10']:.2f} | {a['relative_difference']:.2e} | "
                  + ", ".join(f"{per_layer[n]['pearson']:.4f}" for n in CNN_LAYERS) + f" | {best:.2f} | "
                  f"{t_kron:.2f} |", flush=True)
            rows.append({"strategy": strategy, "variant": variant, "fisher": fisher, "damping": damping, **a,
                         "per_layer": per_layer, "ours_seconds": best, "kronfluence_seconds": t_kron})
    return {"model": label, "n_train": n_train, "n_queries": n_query, "batch_size": args.batch_size,
            "repeats": args.repeats, "rows": rows, "torch_version": str(kron["torch_version"]),
            "threads": int(kron["threads"])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kron-python", default=os.environ.get("KRONFLUENCE_PYTHON", "/tmp/venv-kron/bin/python"),
                        help="an interpreter with torch (CPU) and kronfluence 1.0.1")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp",
                        help="the digits MLP (default) or the digits CNN (2 nnx.Conv + 2 nnx.Linear)")
    parser.add_argument("--out", type=Path, default=None, help="JSON of the results (--model cnn)")
    args = parser.parse_args(argv)
    if args.model == "cnn":
        result = main_cnn(args)
        result.update(command="python -m benchmarks.kronfluence_compare " + " ".join(argv or sys.argv[1:]),
                      machine=f"{platform.machine()}, {os.cpu_count()} cores", jax=jax.__version__,
                      date=time.strftime("%Y-%m-%d"), load_average=list(os.getloadavg()))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
            print(f"wrote {args.out}")
        return
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
