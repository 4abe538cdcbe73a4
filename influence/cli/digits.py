"""Influence on images: a demo on scikit-learn's bundled digits (no download).

Trains a small MLP on 8×8 handwritten digits, fits EK-FAC on its training set, scores
every training image for a few held-out test images, and shows the most helpful
(positive influence: upweighting them lowers the test image's loss) and most harmful
training images. Prints a table, draws the images as text, and writes a PNG figure.

Example:
  influence digits --out runs/digits
  influence digits --strategy kfac --n-train 1500 --queries 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from influence.cli.common import STRATEGY_NAMES

# The digits come from scikit-learn; the figure is drawn with matplotlib.
REQUIRES = ("experiments", ("sklearn", "matplotlib"))

_SHADES = " .:-=+*#%@"


def ascii_digit(image: np.ndarray) -> list[str]:
    """8 text rows of an 8×8 image with values in [0, 1]."""
    levels = np.clip((image.reshape(8, 8) * (len(_SHADES) - 1)).round().astype(int), 0, len(_SHADES) - 1)
    return ["".join(_SHADES[v] * 2 for v in row) for row in levels]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/digits"),
                        help="folder for factors, scores and the figure (default: runs/digits)")
    parser.add_argument("--strategy", choices=STRATEGY_NAMES, default="ekfac",
                        help="curvature approximation (default: ekfac)")
    parser.add_argument("--n-train", type=int, default=1200, help="training images, at most 1497 (default: 1200)")
    parser.add_argument("--queries", type=int, default=4, help="test images to explain (default: 4)")
    parser.add_argument("--hidden", type=int, default=64, help="MLP hidden width (default: 64)")
    parser.add_argument("--steps", type=int, default=400, help="full-batch Adam steps (default: 400)")
    parser.add_argument("--top", type=int, default=3, help="training images shown per query and sign (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the query images (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    # JAX and the library are imported here, not at the top, so that --help is fast.
    import jax
    import optax
    from flax import nnx

    import influence as inf
    from influence.cli.common import check_output_dir, fail
    from influence.testing import MLP, digits, train  # imports scikit-learn

    if args.n_train < 10 or args.queries < 1:
        return fail("digits", f"--n-train must be at least 10 and --queries at least 1, got {args.n_train} and "
                              f"{args.queries}")
    check_output_dir(args.out, "--out")
    x, y = digits()
    n_train = min(args.n_train, 1497)
    train_set = {"x": x[:n_train], "y": y[:n_train]}
    rng = np.random.default_rng(args.seed)
    query_idx = rng.choice(np.arange(1500, len(y)), size=min(args.queries, len(y) - 1500), replace=False)
    queries = {"x": x[query_idx], "y": y[query_idx]}

    t0 = time.perf_counter()
    model = MLP(hidden=args.hidden, rngs=nnx.Rngs(args.seed))
    def cross_entropy(m, d):
        return optax.softmax_cross_entropy_with_integer_labels(m(d["x"]), d["y"]).mean()

    loss = train(model, cross_entropy, train_set, args.steps)
    test_acc = float(np.mean(np.asarray(model(x[1500:])).argmax(-1) == y[1500:]))
    t_train = time.perf_counter() - t0
    print(f"trained MLP 64-{args.hidden}-10 on {n_train} digits: loss {loss:.3f}, "
          f"test accuracy {test_acc:.1%} ({t_train:.1f} s)")

    task = inf.tasks.Classification()
    t0 = time.perf_counter()
    factors = inf.fit_factors(model, task, train_set, strategy=args.strategy, key=jax.random.key(args.seed),
                              progress=not args.quiet)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = inf.pairwise_scores(model, task, factors, queries, train_set, per_layer=True, progress=not args.quiet)
    t_score = time.perf_counter() - t0
    print(f"fit {args.strategy} factors: {t_fit:.2f} s; scored {len(query_idx)} queries × {n_train} training images: "
          f"{t_score:.2f} s (both include compilation)")
    factors_path = factors.save(args.out / "factors")
    scores_path = scores.save(args.out / "scores")

    predictions = np.asarray(model(queries["x"])).argmax(-1)
    print()
    print(f"{'query':>5} {'label':>5} {'pred':>4} | top helpful training images (index:label score) | most harmful")
    for q in range(len(query_idx)):
        order = np.argsort(-scores.values[q])
        helpful = " ".join(f"{i}:{y[i]} {scores.values[q, i]:+.3g}" for i in order[: args.top])
        harmful = " ".join(f"{i}:{y[i]} {scores.values[q, i]:+.3g}" for i in order[::-1][: args.top])
        print(f"{int(query_idx[q]):>5} {int(queries['y'][q]):>5} {int(predictions[q]):>4} | {helpful} | {harmful}")
        same = np.mean(y[order[:10]] == queries["y"][q])
        panels = [ascii_digit(queries["x"][q])] + [ascii_digit(x[i]) for i in order[: args.top]]
        titles = ["query"] + [f"+{k + 1}" for k in range(args.top)]
        print("      " + " ".join(f"{t:<16}" for t in titles) + f"  (top-10 share of the query's label: {same:.0%})")
        for row in zip(*panels):
            print("      " + " ".join(row))
    figure = _figure(x, y, queries, predictions, scores.values, args.top, args.out / "influence.png")
    print()
    print(f"factors: {factors_path}\nscores:  {scores_path}\nfigure:  {figure}")
    return 0


def _figure(x, y, queries, predictions, values, top, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(values)
    fig, axes = plt.subplots(n, 1 + 2 * top, figsize=(1.3 * (1 + 2 * top), 1.5 * n), squeeze=False)
    for q in range(n):
        order = np.argsort(-values[q])
        cells = [(queries["x"][q], f"query\nlabel {queries['y'][q]} pred {predictions[q]}", "gray_r")]
        cells += [(x[i], f"+{values[q, i]:.3g}\nlabel {y[i]}", "Greens") for i in order[:top]]
        cells += [(x[i], f"{values[q, i]:.3g}\nlabel {y[i]}", "Reds") for i in order[::-1][:top]]
        for ax, (image, title, cmap) in zip(axes[q], cells):
            ax.imshow(image.reshape(8, 8), cmap=cmap)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.suptitle("Most helpful (green) and harmful (red) training images per query", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
