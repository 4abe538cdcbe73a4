"""Gradient index: fidelity per byte of each compression, build cost, query latency.

Two settings, trained here (offline, seconds): the digits MLP (64 → 64 → 10 on
scikit-learn's bundled digits) and a TinyLM (one transformer block, d = 32, 16-token
sequences of a random Markov chain over 16 tokens). On each, EK-FAC factors,
then, in one process:

* fidelity of every compression against the rescan's scores of 32 queries: Pearson (all
  pairs), mean Spearman per query, mean top-10 overlap; over bytes per sequence;
* build time of the uncompressed index ÷ one rescan ranking pass (32 queries);
* latency of 1, 32 and 256 queries, index (default compression) vs rescan, as ratios,
  and the index's I/O floor (reading every stored byte once, from the page cache).

The default compression (``influence.index.build.DEFAULT_COMPRESSION``) is the smallest
one whose top-10 overlap is at least 0.9 in every setting; tests hold the code and
docs/index.md to the JSON this writes.

  nice python -m benchmarks.index                 # writes docs/benchmarks/index.json, .png, docs/index.md
  python -m benchmarks.index --render-only        # docs/index.md and the plot from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from scipy.stats import pearsonr, spearmanr

import influence as inf
from benchmarks.speed import timed
from influence import testing
from influence.index.score import read_floor

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks" / "index.json"
PLOT = ROOT / "docs" / "benchmarks" / "index.png"
DOC = ROOT / "docs" / "index.md"
COMPRESSIONS = (
    "none", "none:bfloat16", "none:int8",
    "truncate:0.5", "truncate:0.5:int8", "truncate:0.25", "truncate:0.25:int8",
    "project:0.5", "project:0.25",
    "rank:1", "rank:1:int8", "rank:2:int8", "rank:4", "rank:4:int8", "rank:8:int8",
)
OVERLAP_GOAL = 0.9
TOP = 10
QUIET = {"progress": False}


def digits_setting():
    model, train, _ = testing.trained_mlp(hidden=64, n_train=1024, steps=300)
    x, y = testing.digits()
    queries = {"x": x[1500:1756], "y": y[1500:1756]}
    return model, inf.tasks.Classification(), train, queries


def markov_sequences(n: int, length: int, vocab: int, seed: int, chain_seed: int = 0) -> dict[str, np.ndarray]:
    """Sequences of a fixed random Markov chain (3 likely successors per token): learnable,
    and distinct (no exact ties between training sequences' scores)."""
    chain = np.random.default_rng(chain_seed)
    successors = np.stack([chain.choice(vocab, 3, replace=False) for _ in range(vocab)])
    probs = chain.dirichlet(np.ones(3), vocab)
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, length), np.int32)
    ids[:, 0] = rng.integers(0, vocab, n)
    for t in range(1, length):
        pick = np.array([rng.choice(3, p=probs[i]) for i in ids[:, t - 1]])
        ids[:, t] = successors[ids[:, t - 1], pick]
    mask = np.ones((n, length), np.int32)
    mask[:, 0] = 0
    return {"input_ids": ids, "loss_mask": mask}


def lm_setting():
    model = testing.TinyLM(vocab=16, d=32, heads=2, context=16, rngs=nnx.Rngs(3))
    train = markov_sequences(1024, 16, 16, seed=4)

    def loss(m, d):
        logits = m(d["input_ids"])[:, :-1]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, d["input_ids"][:, 1:])
        mask = d["loss_mask"][:, 1:]
        return jnp.sum(ce * mask) / jnp.sum(mask)

    testing.train(model, loss, train, 200)
    queries = markov_sequences(256, 16, 16, seed=5)
    queries["loss_mask"][:, :8] = 0  # the completion after an 8-token prompt
    return model, inf.tasks.CausalLM(), train, queries


SETTINGS = {"digits-mlp": digits_setting, "tiny-lm": lm_setting}


def first(queries, n):
    return {k: v[:n] for k, v in queries.items()}


def fidelity(scores: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    overlap = np.mean([len(set(np.argsort(-a)[:TOP]) & set(np.argsort(-b)[:TOP])) / TOP
                       for a, b in zip(scores, reference)])
    return {"pearson": float(pearsonr(scores.ravel(), reference.ravel())[0]),
            "spearman": float(np.mean([spearmanr(a, b)[0] for a, b in zip(scores, reference)])),
            "top10_overlap": float(overlap)}


def measure(name: str, build, workdir: Path, batch_size: int) -> dict:
    model, task, train, queries = build()
    n_train = len(next(iter(train.values())))
    factors = inf.fit_factors(model, task, train, strategy="ekfac", batch_size=batch_size, **QUIET)
    q32 = first(queries, 32)
    reference = inf.pairwise_scores(model, task, factors, q32, train, batch_size=batch_size, **QUIET).values
    full_bytes = 4 * sum(i.d_a * i.d_out for i in factors.layer_infos)
    curve = []
    for comp in COMPRESSIONS:
        path = workdir / name / comp.replace(":", "_")
        t0 = time.perf_counter()
        index = inf.build_index(model, task, factors, train, path=path, compression=comp, batch_size=batch_size,
                                **QUIET)
        seconds = time.perf_counter() - t0
        scores = inf.pairwise_scores(model, task, factors, q32, None, index=index, **QUIET).values
        curve.append({"compression": comp, "bytes_per_sequence": index.bytes_per_sequence,
                      "fraction_of_full": index.bytes_per_sequence / full_bytes, "build_seconds_first": seconds,
                      **fidelity(scores, reference)})
        print(f"{name:10s} {comp:22s} {index.bytes_per_sequence:9.0f} B/seq "
              f"({index.bytes_per_sequence / full_bytes:6.3f} of full)  " + "  ".join(
                  f"{k} {v:.3f}" for k, v in curve[-1].items() if k in ("pearson", "spearman", "top10_overlap")))
    return {"model": model, "task": task, "train": train, "queries": queries, "factors": factors,
            "record": {"n_train": n_train, "layers": [dict(i._asdict()) for i in factors.layer_infos],
                       "full_gradient_bytes_per_sequence": full_bytes, "curve": curve}}


def choose_default(results: dict) -> str:
    """The smallest compression whose top-10 overlap reaches the goal in every setting."""
    ok = []
    for comp in COMPRESSIONS:
        rows = [next(r for r in s["curve"] if r["compression"] == comp) for s in results.values()]
        if all(r["top10_overlap"] >= OVERLAP_GOAL for r in rows):
            ok.append((max(r["fraction_of_full"] for r in rows), comp))
    return min(ok)[1] if ok else "none"


def timings(state: dict, default: str, workdir: Path, name: str, batch_size: int) -> dict:
    model, task, train, queries, factors = (state[k] for k in ("model", "task", "train", "queries", "factors"))
    q32 = first(queries, 32)
    rescan_pass = timed(lambda: inf.rank_training(model, task, factors, q32, train, k=TOP, batch_size=batch_size,
                                                 **QUIET), 1)
    path = workdir / name / "timed-none"

    def build_none():
        inf.build_index(model, task, factors, train, path=path, overwrite=True, batch_size=batch_size, **QUIET)

    build = timed(build_none, 1)
    index = inf.index.Index(workdir / name / default.replace(":", "_"))
    latency = []
    for n in (1, 32, 256):
        q = first(queries, n)
        rescan = timed(lambda q=q: inf.rank_training(model, task, factors, q, train, k=TOP, batch_size=batch_size,
                                                    **QUIET), 1)
        unchecked = timed(lambda q=q: inf.rank_training(model, task, factors, q, None, k=TOP, index=index, **QUIET), 3)
        checked = timed(lambda q=q: inf.rank_training(model, task, factors, q, train, k=TOP, index=index,
                                                     batch_size=batch_size, **QUIET), 3)
        latency.append({"queries": n, "rescan_seconds": rescan, "index_seconds": unchecked,
                        "index_data_checked_seconds": checked, "rescan_over_index": rescan / unchecked,
                        "rescan_over_index_data_checked": rescan / checked})
        print(f"{name:10s} {n:4d} queries: rescan {rescan:.3f} s, index {unchecked:.3f} s "
              f"({rescan / unchecked:.1f}x), with the data check {checked:.3f} s ({rescan / checked:.1f}x)")
    floor = timed(lambda: read_floor(index), 3)
    one_query = next(r for r in latency if r["queries"] == 32)["index_seconds"]
    return {"rescan_pass_seconds_32_queries": rescan_pass, "build_seconds_none": build,
            "build_over_rescan_pass": build / rescan_pass, "latency": latency, "default_compression": default,
            "index_bytes": index.bytes, "io_floor_seconds": floor, "index_32_over_io_floor": one_query / floor}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--render-only", action="store_true", help="write docs/index.md and the plot from --out")
    args = parser.parse_args(argv)
    if args.render_only:
        results = json.loads(args.out.read_text())
        plot(results, PLOT)
        DOC.write_text(render(results))
        return
    started = time.time()
    load = {"start": os.getloadavg()}
    workdir = Path(tempfile.mkdtemp(prefix="index-bench-"))
    try:
        states = {name: measure(name, build, workdir, args.batch_size) for name, build in SETTINGS.items()}
        default = choose_default({n: s["record"] for n, s in states.items()})
        print(f"default compression by the curve: {default}")
        for name, state in states.items():
            state["record"]["timings"] = timings(state, default, workdir, name, args.batch_size)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load["end"] = os.getloadavg()
    results = {
        "command": "python -m benchmarks.index",
        "platform": f"jax {jax.__version__} {jax.devices()[0].platform} ({platform.machine()}), "
                    f"{os.cpu_count()} CPUs",
        "loadavg": load, "seconds": time.time() - started, "batch_size": args.batch_size,
        "overlap_goal": OVERLAP_GOAL, "default_compression": default,
        "settings": {n: s["record"] for n, s in states.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, PLOT)
    DOC.write_text(render(results))
    print(f"wrote {args.out}, {PLOT}, {DOC}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["settings"]), figsize=(5 * len(results["settings"]), 4), squeeze=False)
    markers = {"none": "o", "truncate": "s", "project": "^", "rank": "D"}
    colours = {"float32": "C0", "bfloat16": "C1", "int8": "C2"}
    for ax, (name, s) in zip(axes[0], results["settings"].items()):
        for row in s["curve"]:
            comp = inf.index.Compression.parse(row["compression"])
            ax.scatter(row["fraction_of_full"], row["top10_overlap"], marker=markers[comp.method],
                       color=colours[comp.dtype], s=40)
            ax.annotate(row["compression"], (row["fraction_of_full"], row["top10_overlap"]), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.axhline(results["overlap_goal"], color="grey", lw=0.5, ls="--")
        ax.set_xlabel("bytes per sequence ÷ full float32 gradient")
        ax.set_ylabel("top-10 overlap with the rescan (32 queries)")
        ax.set_title(f"{name} ({s['n_train']} sequences)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def render(results: dict) -> str:
    """docs/index.md from the benchmark's JSON (every number in it comes from there)."""
    out = [
        "# Gradient index",
        "",
        "<!-- generated by `python -m benchmarks.index` from docs/benchmarks/index.json; "
        "tests/index/test_docs.py holds it to the JSON -->",
        "",
        "A query batch costs a pass over the training set (forward and backward) when it is answered by a "
        "rescan. `inf.build_index` does that pass once and stores every training sequence's gradient, for "
        "every tracked layer, in the factors' eigenbasis: `Q_Aᵀ DW Q_S`, computed in factored form from the "
        "layer's inputs and output gradients, compressed, in memory-mapped `.npy` shards with a JSON "
        "manifest. A query is then one matrix product per chunk of the index; the damping is chosen at "
        "query time (preconditioning in the eigenbasis is a division by Λ + λ).",
        "",
        "```python",
        "index = inf.build_index(model, task, factors, train, path=\"runs/x/index\")",
        "ranking = inf.rank_training(model, task, factors, queries, train, k=10, index=index)",
        "scores = inf.pairwise_scores(model, task, factors, queries, train, index=\"runs/x/index\", per_layer=True)",
        "```",
        "",
        "`train` is read (not differentiated) to check that it is the data the index holds; pass `None` to "
        "skip the check (recorded as `Scores.metadata['index']['data_checked']`). An index built from another "
        "model (structure or weights), task, factors or data is refused with a message naming which.",
        "",
        "## Compressions",
        "",
        "Each option is a pair of maps, one per side of a layer, in the eigenbasis: `C = M_Aᵀ (Q_Aᵀ DW Q_S) "
        "M_S`, and the query is mapped the same way, so a score is `⟨M_Aᵀ Q_Aᵀ P Q_S M_S, C⟩`.",
        "",
        "| compression | stores | score |",
        "|---|---|---|",
        "| `none` | the full rotated gradient | the rescan's, to float rounding (tested) |",
        "| `truncate:f` | the block of the leading `f·d_a` × `f·d_out` eigen-directions, chosen by the "
        "row and column sums of Λ | the rescan's terms in that block |",
        "| `project:f` | a Gaussian projection of each side to `f·d` (LoGra-style), in the eigenbasis | an "
        "unbiased estimate |",
        "| `rank:c` | the best rank-c `U Vᵀ` of each sequence's gradient (LoRIF-style; exact for c ≥ T "
        "tokens), `c·(d_a + d_out)` numbers per layer | the rescan's with the gradient's rank-c approximation |",
        "| `…:bfloat16`, `…:int8` | the storage dtype (int8 with one float32 scale per row and layer) | |",
        "",
        "Except for `none` in float32, the stored coordinates are whitened, divided elementwise by "
        "`sqrt(Λ + λ₀)` (λ₀ the default damping; separably for `rank`) with the query multiplied by it: scores "
        "are unchanged, but rounding and projection noise fall evenly on what the preconditioned score weighs "
        "(without it, int8 rounded away the small-Λ directions the preconditioner amplifies).",
        "",
        "A compressed index's scores equal its own dense reconstruction `M_A C M_Sᵀ` dotted with the "
        "rotated query, computed in numpy (tested).",
        "",
        f"## Measured ({results['platform']}; load average {_load(results)})",
        "",
        f"`{results['command']}`, {results['seconds']:.0f} s. Fidelity against the rescan's scores of 32 queries "
        f"(Pearson over all pairs, mean Spearman per query, mean top-{TOP} overlap), over bytes per sequence "
        "as a share of the full float32 gradient.",
        "",
        "![fidelity per byte](benchmarks/index.png)",
        "",
    ]
    for name, s in results["settings"].items():
        layers = ", ".join(f"{i['name']} [{i['d_in']}{' + 1' if i['has_bias'] else ''}, {i['d_out']}]"
                           for i in s["layers"])
        out += [f"### {name}: {s['n_train']} training sequences; layers {layers}", "",
                "| compression | bytes / sequence | ÷ full | Pearson | Spearman | top-10 overlap |",
                "|---|---|---|---|---|---|"]
        for r in s["curve"]:
            out.append(f"| `{r['compression']}` | {r['bytes_per_sequence']:.0f} | {r['fraction_of_full']:.3f} | "
                       f"{r['pearson']:.4f} | {r['spearman']:.4f} | {r['top10_overlap']:.2f} |")
        out.append("")
    default = results["default_compression"]
    out += [
        "## The default",
        "",
        f"`build_index`'s default compression is the smallest whose top-{TOP} overlap is at least "
        f"{results['overlap_goal']} in every setting above: **`{default}`** "
        f"({_share(results, default)} of the full gradient's bytes). These are small models and one set of "
        "32 queries each (no intervals): the choice is a starting point, not a guarantee at other scales; "
        "measure on your own run (`compression=\"none\"` is the exact reference).",
        "",
        "## Cost (ratios measured in one run)",
        "",
        "| setting | build (none) ÷ one rescan ranking pass | queries | rescan ÷ index | rescan ÷ index with the "
        "data check | index ÷ I/O floor (32 queries) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in results["settings"].items():
        t = s["timings"]
        for r in t["latency"]:
            out.append(f"| {name} | {t['build_over_rescan_pass']:.2f} | {r['queries']} | "
                       f"{r['rescan_over_index']:.1f}× | {r['rescan_over_index_data_checked']:.1f}× | "
                       f"{t['index_32_over_io_floor']:.0f}× |")
    out += [
        "",
        f"The I/O floor is the time to read every stored byte of the `{default}` index once (from the page "
        "cache here). These indexes are a few megabytes and the models tiny, so both paths' times are "
        "dominated by fixed costs (the query gradients, which both compute, tracking and digests, dispatch), "
        "not by the training set: the ratios say little about large runs. The build's ratio includes hashing "
        "every training row and writing the shards with fsync. The issue's `small` ladder run, the LDS of the "
        "index's scores and the FLOP floor were not measured here.",
        "",
        "## Layout",
        "",
        "```",
        "manifest.json   model fingerprint and weights digest, task, factors digest, compression, layers,",
        "                shards (rows, per file its bytes and SHA-256, a digest of its training rows),",
        "                row r = training sequence row_offset + r",
        "maps.npz        the compression's side maps (checksummed)",
        "shards/s<segment>-<shard>-l<layer>.npy   [rows, k_a·k_s] (+ .scale.npy for int8)",
        "```",
        "",
        "Shards are written atomically every `shard_rows` rows and the manifest last: a folder without a "
        "manifest is not an index. The build runs through the pass driver with a checkpoint (its own in "
        "`path/.build` unless `checkpoint_dir` is given): an interrupted build resumes to byte-identical "
        "shards (tested). A shard whose size differs from the manifest is refused on open; `Index.verify()` "
        "checks every SHA-256. `append=True` adds sequences as a new segment (scores as a fresh build, "
        "tested). Each host of a multi-host run builds its own part (`row_offset=`) into `part-<i>` folders; "
        "`index=` the parent folder merges their top-k exactly (tested).",
        "",
    ]
    return "\n".join(out)


def _load(results: dict) -> str:
    load = results["loadavg"]
    return f"{load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end (1-minute)"


def _share(results: dict, comp: str) -> str:
    shares = [next(r for r in s["curve"] if r["compression"] == comp)["fraction_of_full"]
              for s in results["settings"].values()]
    return f"{min(shares):.3f}–{max(shares):.3f}" if len(set(shares)) > 1 else f"{shares[0]:.3f}"


if __name__ == "__main__":
    main()
