"""Fidelity per model kind: EK-FAC vs exact Gauss-Newton influence (``inf.diagnose``) on
small digits models of each kind docs/your-model.md describes.

Each model is trained briefly (full-batch Adam) on ``--train`` digits, EK-FAC is fitted
on those rows with the defaults, and its scores for ``--queries`` held-out digits are
compared with exact influence (matrix-free Gauss-Newton + CG, the same per-layer
damping), full and block-diagonal. For the model of bare parameters (scored through
``~rest``, the diagonal Gauss-Newton) the exact side is the full Gauss-Newton matrix of
all its parameters, built densely.

  python -m benchmarks.your_model --train 40 --queries 6      # writes docs/benchmarks/your_model.json
  python -m benchmarks.your_model --render docs/benchmarks/your_model.json
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

import influence as inf
from influence import tasks
from influence.diagnose import _compare, diagnose
from influence.runtime.io import atomic_write_json
from influence.testing import digits, train

OUT = "docs/benchmarks/your_model.json"


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(jnp.tanh(nn.Dense(16)(x)))


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.conv(x.reshape(-1, 8, 8, 1)))
        return self.head(h.reshape(h.shape[0], -1))


class DepthwiseCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.dw = nnx.Conv(4, 4, (3, 3), strides=2, feature_group_count=4, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.dw(nnx.relu(self.conv(x.reshape(-1, 8, 8, 1)))))
        return self.head(h.reshape(h.shape[0], -1))


class Attention(nnx.Module):
    """The image's 8 rows as tokens: embed, LayerNorm, self-attention, mean-pool, head."""

    def __init__(self, rngs):
        self.embed = nnx.Linear(8, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, 16, decode=False, rngs=rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        h = self.norm(self.embed(x.reshape(-1, 8, 8)))
        return self.head((h + self.attn(h)).mean(axis=1))


class Bare(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (64, 8)) * 0.15)
        self.v = nnx.Param(jax.random.normal(rngs.params(), (8, 10)) * 0.3)
        self.b = nnx.Param(jnp.zeros(10))

    def __call__(self, x):
        return jnp.tanh(x @ self.w) @ self.v + self.b


def _linen(rngs):
    module = LinenMLP()
    return inf.linen_model(module, module.init(rngs.params(), jnp.zeros((1, 64))))


MODELS = {"MLP": MLP, "Linen MLP": _linen, "CNN": CNN, "depthwise CNN": DepthwiseCNN,
          "attention + LayerNorm": Attention, "bare parameters": Bare}


def _loss(model, data):
    logits = model(data["x"])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), data["y"][:, None], axis=1))


def _exact_all(model, task, queries, data, damping):
    """Exact influence over every parameter ``[Q, N]``: dense Gauss-Newton by jax.jacfwd
    and jax.hessian of the loss in the logits, damped by ``damping``."""
    graphdef, params, others = nnx.split(model, nnx.Param, ...)
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def logits(theta, x):
        return nnx.merge(graphdef, unravel(theta), others)(x[None])[0]

    def grads(d, fn):
        return np.asarray(jax.vmap(jax.grad(fn), in_axes=(None, 0, 0))(flat, d["x"], d["y"]), np.float64)

    def loss(theta, x, y):
        return -jax.nn.log_softmax(logits(theta, x))[y]

    def gn(x):
        jac = jax.jacfwd(logits)(flat, x)
        return jac.T @ jax.hessian(jax.nn.logsumexp)(logits(flat, x)) @ jac

    matrix = np.asarray(jax.lax.map(gn, data["x"]).mean(axis=0), np.float64)
    solved = np.linalg.solve(matrix + damping * np.eye(len(flat)), grads(data, loss).T)
    return grads(queries, loss) @ solved


def measure(name: str, n_train: int, n_queries: int, seed: int = 0) -> dict:
    x, y = digits()
    rows = np.random.default_rng(seed).permutation(len(x))
    data = {"x": x[rows[:n_train]], "y": y[rows[:n_train]]}
    queries = {"x": x[rows[n_train:n_train + n_queries]], "y": y[rows[n_train:n_train + n_queries]]}
    model = MODELS[name](nnx.Rngs(seed))
    train(model, _loss, data, steps=200)
    task = tasks.Classification()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        factors = inf.fit_factors(model, task, data, progress=False)
    untracked = factors.metadata["untracked"]
    row = {"model": name, "layers": [n for n in factors.layer_names],
           "untracked_parameters": untracked["parameters"], "untracked_share": round(untracked["share"], 3),
           "skipped": sorted(untracked.get("skipped", {})), "rest": factors.metadata["rest"] is not None,
           "warnings": sorted({type(w.message).__name__ for w in caught})}
    if factors.layer_names == ("~rest",):
        approx = inf.pairwise_scores(model, task, factors, queries, data, progress=False).values
        exact = _exact_all(model, task, queries, data, factors.damping("~rest"))
        m = _compare(np.asarray(approx, np.float64), exact, 10)
        row.update(strategy_vs_full={"pearson_mean": float(np.mean(m["pearson"])),
                                     "pearson_min": float(np.min(m["pearson"])),
                                     "spearman_mean": float(np.mean(m["spearman"])),
                                     "top_k_mean": float(np.mean(m["top_k"]))},
                   strategy_vs_block=None, block_vs_full=None, exact_over="all parameters (dense)")
    else:
        result = diagnose(model, task, factors, {**data}, queries=queries, n_train=n_train, tol=1e-6,
                          max_iterations=300)
        row.update(result.summary, exact_over="tracked layers (CG)")
    row["seconds"] = round(time.perf_counter() - start, 1)
    return _rounded(row)


def _rounded(obj):
    if isinstance(obj, float):
        return round(obj, 3)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def _cell(summary, key="pearson_mean", with_min=True):
    if summary is None:
        return "—"
    text = f"{summary[key]:.2f}"
    return text + (f" (min {summary['pearson_min']:.2f})" if with_min else "")


def render(results: dict) -> str:
    """The markdown table of docs/your-model.md from the results file."""
    s = results["settings"]
    lines = [f"Digits, {s['train']} training rows, {s['queries']} queries, EK-FAC with the defaults; "
             f"measured with `{s['command']}` under load (load average {s['load']}).",
             "",
             "| model | left out of the layers | EK-FAC vs exact: Pearson mean (min) | Spearman | top-10 | "
             "EK-FAC vs block-diagonal exact | block-diagonal vs full exact |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if r["rest"]:
            left = "all, as `~rest` (diagonal GN)"
        else:
            left = f"{r['untracked_share']:.0%} of the parameters"
            if r["skipped"]:
                left += f" (skipped: {', '.join(r['skipped'])})"
        v = r["strategy_vs_full"]
        lines.append(f"| {r['model']} | {left} | {_cell(v)} | {v['spearman_mean']:.2f} | {v['top_k_mean']:.2f} | "
                     f"{_cell(r['strategy_vs_block'], with_min=False)} | "
                     f"{_cell(r['block_vs_full'], with_min=False)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=40)
    parser.add_argument("--queries", type=int, default=6)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--render", metavar="RESULTS", help="print the table of a results file and exit")
    args = parser.parse_args(argv)
    if args.render:
        import json

        with open(args.render) as f:
            print(render(json.load(f)))
        return
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name, args.train, args.queries))
        print(rows[-1], flush=True)
    load = round(os.getloadavg()[0], 1)
    command = f"python -m benchmarks.your_model --train {args.train} --queries {args.queries}"
    results = {"settings": {"train": args.train, "queries": args.queries, "command": command, "load": load,
                            "cpus": os.cpu_count()}, "rows": rows}
    atomic_write_json(args.out, results)
    print(render(results))


if __name__ == "__main__":
    main()
