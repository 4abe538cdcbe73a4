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

With ``--run PATH``, a trained ``influence.lm`` run (its final weights, its fitted EK-FAC
factors, its training set, or the first ``--n-train`` sequences of it; queries are its
held-out sequences, then its last training sequences for more than it holds) is measured
the same way, and also: bytes per tracked parameter, the FLOP floor of the index's
scoring (its multiply-adds at the matmul rate measured in the same process) and the
queries' own cost (their gradients and preconditioning, which a rescan pays too).
``--settings`` measures only some settings; the others are kept from ``--out``.

Its ``default_compression`` (the smallest compression whose top-10 overlap is at least 0.9
in every setting) is a historical record: it was the library's default until issue 28
(:data:`OLD_DEFAULT`), which now chooses it on held-out models
(``python -m benchmarks.index_heldout``). Tests hold docs/index.md to the JSON this writes.

  nice python -m benchmarks.index                 # writes docs/benchmarks/index.json, .png, docs/index.md
  nice python -m benchmarks.index --run runs/small --settings small   # adds the run, keeps the others
  python -m benchmarks.index --render-only        # docs/index.md and the plot from the JSON
  python -m benchmarks.index --merge other.json   # settings measured in another run (its --out) into --out
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
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
from benchmarks.index_floor import OUT as FLOOR
from benchmarks.index_floor import matmul_rate, scoring_flops
from benchmarks.index_floor import render as floor_section
from benchmarks.index_heldout import OUT as HELDOUT
from benchmarks.index_heldout import render as heldout_section
from benchmarks.speed import timed
from influence import testing
from influence.index.build import DEFAULT_COMPRESSION as CURRENT_DEFAULT
from influence.index.source import read_floor

OLD_DEFAULT = "select:0.375:int4"
"""The library's default compression before issue 28, chosen by :func:`choose_default` on
these settings (docs/benchmarks/index.json records it; the LDS check was made at it)."""
DEFAULT = OLD_DEFAULT  # the LDS section reports the compression it was measured at

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks" / "index.json"
PLOT = ROOT / "docs" / "benchmarks" / "index.png"
DOC = ROOT / "docs" / "index.md"
LDS = ROOT / "docs" / "benchmarks" / "lds-lm-index.json"
COMPRESSIONS = (
    "none", "none:bfloat16", "none:int8", "none:int4",
    "truncate:0.5", "truncate:0.5:int8", "truncate:0.5:int4", "truncate:0.25", "truncate:0.25:int8",
    "select:0.5", "select:0.5:int8", "select:0.5:int4", "select:0.375:int4", "select:0.25:int8", "select:0.25:int4",
    "project:0.5", "project:0.25",
    "rank:1", "rank:1:int8", "rank:2:int8", "rank:4", "rank:4:int8", "rank:8:int8",
    "rank:16:int8", "rank:32:int8", "rank:64:int8",
)
RUN_COMPRESSIONS = ("truncate:0.5:int8", "select:0.25:int8", "select:0.375:int4", "select:0.5:int4", "none:int4",
                    "rank:32:int8", "rank:64:int8", "none:int8")
"""Those measured on a ``--run`` (no ``none``: its full gradient is gigabytes; the rescan is the reference)."""
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


def run_setting(path: Path, n_train: int | None, factors_folder: str | None = None, n_queries: int = 256,
                note: str | None = None):
    """A trained ``influence.lm`` run: its model, fitted factors, training sequences (the
    first ``n_train``) and ``n_queries`` queries (held-out sequences, then the last training
    sequences), with a description of where each comes from."""
    from influence.factors import Factors
    from influence.lm.run import FACTORS, load_run

    run = load_run(path)
    folders = sorted(p.parent for p in (run.path / FACTORS).glob("*/factors.npz"))
    if factors_folder is not None:
        folders = [run.path / FACTORS / factors_folder]
    if len(folders) != 1:
        raise SystemExit(f"{len(folders)} factor folders in {run.path / FACTORS}; choose one with --factors")
    factors = Factors.load(folders[0], model=run.model)

    def arrays(table, rows):
        table = table.with_format("numpy")
        return {k: np.asarray(table[k][rows]).astype(np.int32) for k in ("input_ids", "loss_mask")}

    n_all = len(run.train)
    n = n_all if n_train is None else min(n_train, n_all)
    train = arrays(run.train, slice(0, n))
    held = min(n_queries, len(run.heldout))
    queries = arrays(run.heldout, slice(0, held))
    if held < n_queries:
        extra = arrays(run.train, slice(n_all - (n_queries - held), n_all))
        queries = {k: np.concatenate([queries[k], extra[k]]) for k in queries}
    cfg, model_cfg = run.info["train_config"], run.info["model_config"]
    about = {"run": str(path), "step": run.step, "scale": cfg.get("scale"), "seed": cfg.get("seed"),
             "factors": folders[0].name, "strategy": factors.strategy, "n_train_run": n_all, "note": note,
             "parameters": run.info.get("parameters", {}).get("total"),
             "model": f"{model_cfg['n_layers']} blocks, d = {model_cfg['d_model']}, T = {model_cfg['context_length']}, "
                      f"vocab {model_cfg['vocab_size']}",
             "queries": f"{held} held-out sequences" + (f", then the last {n_queries - held} training sequences"
                                                       if held < n_queries else "")}
    return run.model, inf.tasks.CausalLM(), train, queries, factors, about


def first(queries, n):
    return {k: v[:n] for k, v in queries.items()}


def fidelity(scores: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    overlap = np.mean([len(set(np.argsort(-a)[:TOP]) & set(np.argsort(-b)[:TOP])) / TOP
                       for a, b in zip(scores, reference)])
    return {"pearson": float(pearsonr(scores.ravel(), reference.ravel())[0]),
            "spearman": float(np.mean([spearmanr(a, b)[0] for a, b in zip(scores, reference)])),
            "top10_overlap": float(overlap)}


def measure(name: str, built, workdir: Path, batch_size: int, compressions=COMPRESSIONS) -> dict:
    """The fidelity curve of one setting; ``built`` is ``(model, task, train, queries)``, or
    that with fitted factors and a description (a ``--run``)."""
    model, task, train, queries, *given = built
    n_train = len(next(iter(train.values())))
    if given:
        factors, about = given
    else:
        factors, about = inf.fit_factors(model, task, train, strategy="ekfac", batch_size=batch_size, **QUIET), None
    q32 = first(queries, 32)
    t0 = time.perf_counter()
    reference = inf.pairwise_scores(model, task, factors, q32, train, batch_size=batch_size, **QUIET).values
    reference_seconds = time.perf_counter() - t0
    print(f"{name:10s} rescan of 32 queries over {n_train} sequences: {reference_seconds:.1f} s", flush=True)
    full_bytes = 4 * sum(i.d_a * i.d_out for i in factors.layer_infos)
    curve = []
    for comp in compressions:
        path = workdir / name / comp.replace(":", "_")
        t0 = time.perf_counter()
        index = inf.build_index(model, task, factors, train, path=path, compression=comp, batch_size=batch_size,
                                **QUIET)
        seconds = time.perf_counter() - t0
        scores = inf.pairwise_scores(model, task, factors, q32, None, index=index, **QUIET).values
        curve.append({"compression": comp, "bytes_per_sequence": index.bytes_per_sequence,
                      "fraction_of_full": index.bytes_per_sequence / full_bytes, "build_seconds_first": seconds,
                      "build_over_rescan_32": seconds / reference_seconds, **fidelity(scores, reference)})
        print(f"{name:10s} {comp:22s} {index.bytes_per_sequence:9.0f} B/seq "
              f"({index.bytes_per_sequence / full_bytes:6.3f} of full), build {seconds:.1f} s  " + "  ".join(
                  f"{k} {v:.3f}" for k, v in curve[-1].items() if k in ("pearson", "spearman", "top10_overlap")),
              flush=True)
    record = {"n_train": n_train, "layers": [dict(i._asdict()) for i in factors.layer_infos],
              "full_gradient_bytes_per_sequence": full_bytes, "tracked_parameters": full_bytes // 4,
              "rescan_seconds_32_pairwise": reference_seconds, "curve": curve,
              "loadavg_start": os.getloadavg()}
    if about is not None:
        record["run"] = about
    return {"model": model, "task": task, "train": train, "queries": queries, "factors": factors, "record": record}


def choose_default(results: dict) -> str:
    """The smallest compression (by its largest share of the full gradient) measured in
    every setting whose top-10 overlap reaches the goal in all of them."""
    common = set.intersection(*({r["compression"] for r in s["curve"]} for s in results.values()))
    ok = []
    for comp in sorted(common):
        rows = [r for s in results.values() for r in s["curve"] if r["compression"] == comp]
        if all(r["top10_overlap"] >= OVERLAP_GOAL for r in rows):
            ok.append((max(r["fraction_of_full"] for r in rows), comp))
    return min(ok)[1] if ok else "none"


def timings(state: dict, default: str, workdir: Path, name: str, batch_size: int) -> dict:
    """Build cost and latency at ``default``. On a ``--run`` the rescans are timed once
    after a warm-up on a few rows (a second full pass each would double the benchmark) and
    the build timed is the default compression's first build in :func:`measure` (the full
    gradient is gigabytes; that build's compilation is a few seconds of minutes)."""
    from influence.runtime.execution import Execution
    from influence.scoring.preconditioned import prepare_queries

    model, task, train, queries, factors = (state[k] for k in ("model", "task", "train", "queries", "factors"))
    started = os.getloadavg()
    big = "run" in state["record"]
    warm = first(train, 2 * batch_size)

    def rescan(q, data):
        return inf.rank_training(model, task, factors, q, data, k=TOP, batch_size=batch_size, **QUIET)

    def rescan_seconds(q):
        if not big:
            return timed(lambda: rescan(q, train), 1)
        rescan(q, warm)  # compiles the steps of this query batch
        t0 = time.perf_counter()
        rescan(q, train)
        return time.perf_counter() - t0

    default_path = workdir / name / default.replace(":", "_")
    built = "none"
    path = workdir / name / "timed-none"
    if big:
        built, path = default, default_path

    def build():
        inf.build_index(model, task, factors, train, path=path, overwrite=True, compression=built,
                        batch_size=batch_size, **QUIET)

    if big and not (default_path / "manifest.json").is_file():  # --timings-only: build it here, once
        t0 = time.perf_counter()
        build()
        build_seconds = time.perf_counter() - t0
    elif big:
        build_seconds = _row(state["record"], default)["build_seconds_first"]
    else:
        build_seconds = timed(build, 1)
        if not (default_path / "manifest.json").is_file():  # --timings-only
            inf.build_index(model, task, factors, train, path=default_path, compression=default,
                            batch_size=batch_size, **QUIET)
    index = inf.index.Index(default_path)
    floor = timed(lambda: read_floor(index), 3)
    rate = matmul_rate(max(la["d_a"] * la["d_out"] if la["rank"] else la["width"] for la in index.layers))
    latency = []
    for n in (1, 32, 256):
        q = first(queries, n)
        rescan_s = rescan_seconds(q)
        unchecked = timed(lambda q=q: inf.rank_training(model, task, factors, q, None, k=TOP, index=index, **QUIET),
                          1 if big else 3)
        def check(q=q):
            return inf.rank_training(model, task, factors, q, train, k=TOP, index=index, batch_size=batch_size,
                                     **QUIET)

        checked = timed(check, 1 if big else 3)

        def prepare(q=q):
            side = prepare_queries(model, task, factors, q, execution=Execution(progress=False))
            jax.block_until_ready(side.queries)

        query_side = timed(prepare, 1 if big else 3)
        flop_floor = scoring_flops(index, n) / rate
        latency.append({"queries": n, "rescan_seconds": rescan_s, "index_seconds": unchecked,
                        "index_data_checked_seconds": checked, "rescan_over_index": rescan_s / unchecked,
                        "rescan_over_index_data_checked": rescan_s / checked, "query_side_seconds": query_side,
                        "scoring_flops": scoring_flops(index, n), "flop_floor_seconds": flop_floor,
                        "index_over_io_floor": unchecked / floor,
                        "index_over_flop_floor_plus_query_side": unchecked / (flop_floor + query_side)})
        print(f"{name:10s} {n:4d} queries: rescan {rescan_s:.3f} s, index {unchecked:.3f} s "
              f"({rescan_s / unchecked:.1f}x), with the data check {checked:.3f} s ({rescan_s / checked:.1f}x); "
              f"queries' own gradients {query_side:.3f} s, FLOP floor {flop_floor:.3f} s, I/O floor {floor:.3f} s",
              flush=True)
    rescan_pass = next(r for r in latency if r["queries"] == 32)["rescan_seconds"]
    at_32 = next(r for r in latency if r["queries"] == 32)["index_seconds"]
    return {"rescan_pass_seconds_32_queries": rescan_pass, "build_compression": built,
            "build_seconds": build_seconds, "build_over_rescan_pass": build_seconds / rescan_pass,
            "latency": latency, "default_compression": default, "index_bytes": index.bytes,
            "index_bytes_per_parameter": index.bytes_per_sequence / state["record"]["tracked_parameters"],
            "io_floor_seconds": floor, "matmul_flops_per_second": rate, "index_32_over_io_floor": at_32 / floor,
            "loadavg_start": started, "loadavg_end": os.getloadavg()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--run", type=Path, default=None, help="also measure this trained influence.lm run")
    parser.add_argument("--factors", default=None, help="the run's factors folder (default: its only one)")
    parser.add_argument("--n-train", type=int, default=None, help="the run's first N training sequences (default: all)")
    parser.add_argument("--run-note", default=None, help="where the run comes from, for the doc")
    parser.add_argument("--run-batch-size", type=int, default=32, help="sequences per step on the run")
    parser.add_argument("--settings", default=None,
                        help="comma-separated settings to measure (default: all; 'small' etc. names the run by its "
                             "scale); the others are kept from --out")
    parser.add_argument("--render-only", action="store_true", help="write docs/index.md and the plot from --out")
    parser.add_argument("--timings-only", action="store_true",
                        help="for --settings, keep their fidelity curves from --out and measure only the build and "
                             "latency at the default chosen from --out")
    parser.add_argument("--merge", type=Path, default=None, metavar="JSON",
                        help="take the settings measured in JSON (another run's --out) into --out, choose the default "
                             "again, and render")
    args = parser.parse_args(argv)
    if args.merge is not None:
        results = json.loads(args.out.read_text())
        taken = json.loads(args.merge.read_text())["settings"]
        merged = {**results["settings"], **taken}
        results["settings"] = {n: merged[n] for n in [*SETTINGS, *sorted(set(merged) - set(SETTINGS))] if n in merged}
        results["default_compression"] = choose_default(results["settings"])
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        args.render_only = True
    if args.render_only:
        results = json.loads(args.out.read_text())
        plot(results, PLOT)
        DOC.write_text(render(results))
        return
    started = time.time()
    load = {"start": os.getloadavg()}
    builders = {name: (build, COMPRESSIONS, args.batch_size) for name, build in SETTINGS.items()}
    if args.run is not None:
        scale = json.loads((args.run / "run.json").read_text())["train_config"]["scale"]
        builders[scale] = (lambda: run_setting(args.run, args.n_train, args.factors, note=args.run_note),
                           RUN_COMPRESSIONS,
                           args.run_batch_size)
    chosen = list(builders) if args.settings is None else args.settings.split(",")
    unknown = [c for c in chosen if c not in builders]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; choose from {list(builders)} (a run needs --run)")
    kept = {}
    if args.settings is not None and args.out.is_file():
        kept = {n: s for n, s in json.loads(args.out.read_text())["settings"].items() if n not in chosen}
    workdir = Path(tempfile.mkdtemp(prefix="index-bench-"))
    try:
        states = {}
        previous = json.loads(args.out.read_text())["settings"] if args.timings_only else {}
        for name in chosen:
            build, compressions, batch_size = builders[name]
            if args.timings_only:
                model, task, train, queries, *given = build()
                factors = given[0] if given else inf.fit_factors(model, task, train, strategy="ekfac",
                                                                 batch_size=batch_size, **QUIET)
                record = dict(previous[name])
                if args.run_note and "run" in record:
                    record["run"] = {**record["run"], "note": args.run_note}
                states[name] = {"model": model, "task": task, "train": train, "queries": queries,
                                "factors": factors, "record": record}
            else:
                states[name] = measure(name, build(), workdir, batch_size, compressions)
        default = choose_default({**kept, **{n: s["record"] for n, s in states.items()}})
        print(f"default compression by the curve: {default}")
        for name, state in states.items():
            state["record"]["timings"] = timings(state, default, workdir, name, builders[name][2])
            where = state["record"]["timings"] if args.timings_only else state["record"]
            where["measured"] = {
                "command": "python -m benchmarks.index " + " ".join(argv if argv is not None else sys.argv[1:]),
                "platform": f"jax {jax.__version__} {jax.devices()[0].platform} ({platform.machine()}), "
                            f"{os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
                "batch_size": builders[name][2]}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load["end"] = os.getloadavg()
    settings = {**kept, **{n: s["record"] for n, s in states.items()}}
    results = {
        "command": "python -m benchmarks.index " + " ".join(argv if argv is not None else sys.argv[1:]),
        "platform": f"jax {jax.__version__} {jax.devices()[0].platform} ({platform.machine()}), "
                    f"{os.cpu_count()} CPUs",
        "loadavg": load, "seconds": time.time() - started, "batch_size": args.batch_size,
        "overlap_goal": OVERLAP_GOAL, "default_compression": choose_default(settings),
        "settings": {n: settings[n] for n in [*SETTINGS, *sorted(set(settings) - set(SETTINGS))] if n in settings},
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
    markers = {"none": "o", "truncate": "s", "select": "P", "project": "^", "rank": "D"}
    colours = {"float32": "C0", "bfloat16": "C1", "int8": "C2", "int4": "C3"}
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
        f"Without `compression=`, an index is built as `{CURRENT_DEFAULT}` (chosen on held-out models, the last "
        "section): it measures itself at build time on a probe of held-out training rows, keeps per layer as "
        "many eigen-coordinates as top-10 agreement 0.95 with exact scores needs (no probe query below 0.8), at "
        "most 1/16 of the full gradient's bytes, and records what it measured in `Index.chosen` (printed by "
        "`influence index`; a warning when the target is out of reach within the budget).",
        "",
        "## Compressions",
        "",
        "Each option is a map of the rotated gradient `Q_Aᵀ DW Q_S` (a pair of maps, one per side of a layer, "
        "`C = M_Aᵀ (Q_Aᵀ DW Q_S) M_S`, or a selection of its coordinates), and the query is mapped the same "
        "way, so a score is the dot product of the two maps.",
        "",
        "| compression | stores | score |",
        "|---|---|---|",
        "| `none` | the full rotated gradient | the rescan's, to float rounding (tested) |",
        "| `truncate:f` | the block of the leading `f·d_a` × `f·d_out` eigen-directions, chosen by the "
        "row and column sums of Λ | the rescan's terms in that block |",
        "| `select:f` | the share `f` of all the tracked coordinates `(i, j)` (across layers) of largest "
        "whitened variance `Λ_ij / (Λ_ij + λ₀)`, at least one per layer | the rescan's terms on those "
        "coordinates |",
        "| `project:f` | a Gaussian projection of each side to `f·d` (LoGra-style), in the eigenbasis | an "
        "unbiased estimate |",
        "| `sketch:f` | one global count-sketch (bergson-style sparse Rademacher projection) of the whitened "
        "eigen-coordinates into `f·Σ d_a·d_out` numbers, split across layers by their whitened variance "
        "`Σ Λ/(Λ+λ₀)`; works on identity factors too | an unbiased estimate (tested against the exact score "
        "and an independent numpy projection) |",
        "| `fidelity:t[:b]` | a `select` whose share per layer a probe of held-out rows chooses at build time: "
        "grown by score error removed per byte until the probe's top-10 agreement reaches `t` (no query "
        "below 0.8), within `b` of the full bytes | the rescan's terms on those coordinates |",
        "| `rank:c` | the best rank-c `U Vᵀ` of each sequence's gradient (LoRIF-style), `c·(d_a + d_out)` "
        "numbers per layer, c capped per layer at `min(c, T, d_a, d_out)` (T the tokens per sequence: a "
        "gradient of T tokens has rank ≤ T, so the cap is exact) | the rescan's with the gradient's rank-c "
        "approximation |",
        "| `…:bfloat16`, `…:int8`, `…:int4` | the storage dtype (the integers with one float32 scale per row "
        "and layer, `max|C| / 127` or `/ 7`; int4 packed two to a byte) | |",
        "",
        "Except for `none` in float32, the stored coordinates are whitened, divided elementwise by "
        "`sqrt(Λ + λ₀)` (λ₀ the default damping; separably for `rank`) with the query multiplied by it: scores "
        "are unchanged, but rounding and projection noise fall evenly on what the preconditioned score weighs "
        "(without it, int8 rounded away the small-Λ directions the preconditioner amplifies).",
        "",
        "A compressed index's scores equal its own dense reconstruction `M_A C M_Sᵀ` dotted with the "
        "rotated query, computed in numpy (tested).",
        "",
        "## Measured",
        "",
        f"Fidelity against the rescan's scores of 32 queries (Pearson over all pairs, mean Spearman per "
        f"query, mean top-{TOP} overlap), over bytes per sequence as a share of the full float32 gradient; "
        "per setting, the command, machine and load average (1-minute, at its start and end) it was measured "
        "under.",
        "",
        "![fidelity per byte](benchmarks/index.png)",
        "",
    ]
    for name, s in results["settings"].items():
        layers = ", ".join(f"{i['name']} [{i['d_in']}{' + 1' if i['has_bias'] else ''}, {i['d_out']}]"
                           for i in s["layers"])
        m = s.get("measured", {"command": results["command"], "platform": results["platform"]})
        params = s.get("tracked_parameters", s["full_gradient_bytes_per_sequence"] // 4)
        out += [f"### {name}: {s['n_train']} training sequences; layers {layers}", ""]
        if "run" in s:
            r = s["run"]
            out += [f"A trained `{r['scale']}` ladder run of `influence.lm` (`{r['model']}`, {r['parameters']:,} "
                    f"parameters; seed {r['seed']}; its final weights, step {r['step']}){_note(r)}; its EK-FAC "
                    f"factors `{r['factors']}` ({', '.join(i['name'] for i in s['layers'][:2])}, … : "
                    f"{len(s['layers'])} layers); "
                    + (f"all {s['n_train']} training sequences" if s["n_train"] == r["n_train_run"]
                       else f"the first {s['n_train']} of its {r['n_train_run']} training sequences")
                    + f"; queries: {r['queries']} (fidelity: the first 32).", ""]
        tm = s.get("timings", {}).get("measured")
        out += [f"`{m['command']}` ({m['platform']}; load average {_setting_load(s)})"
                + (f"; its build and latency: `{tm['command']}` ({tm['date']})" if tm else "")
                + f". Tracked parameters: {params:,}; the full float32 gradient is "
                f"{s['full_gradient_bytes_per_sequence']:,} bytes per sequence.", "",
                "| compression | bytes / sequence | ÷ full | bytes / parameter | Pearson | Spearman | top-10 overlap | "
                "build ÷ rescan of 32 queries |",
                "|---|---|---|---|---|---|---|---|"]
        for r in s["curve"]:
            build = r.get("build_over_rescan_32")
            out.append(f"| `{r['compression']}` | {r['bytes_per_sequence']:.0f} | {r['fraction_of_full']:.3f} | "
                       f"{r['bytes_per_sequence'] / params:.3f} | {r['pearson']:.4f} | {r['spearman']:.4f} | "
                       f"{r['top10_overlap']:.3f} | " + ("—" if build is None else f"{build:.2f}") + " |")
        out.append("")
    default = results["default_compression"]
    out += [
        "## The old default (a historical record)",
        "",
        f"Until issue 28, `build_index`'s default compression was the smallest (by its largest share of the full "
        f"gradient) of those measured in every setting whose top-{TOP} overlap is at least "
        f"{results['overlap_goal']} in all of them: **`{default}`** ({_share(results, default)} of the full "
        "gradient's bytes). The default is now chosen on models that did not set this one (the last section). "
        "One set of 32 queries per setting (no intervals): measure on your own run (`influence index --check N`; "
        "`compression=\"none\"` is the exact reference).",
        "",
        *_smallest_passing(results),
        "## Cost (ratios measured in one run)",
        "",
        "| setting | compression timed | build ÷ one rescan pass (32 queries) | queries | rescan ÷ index | rescan ÷ "
        "index with the data check | index ÷ I/O floor | index ÷ (FLOP floor + the queries' own cost) | the "
        "queries' own cost ÷ index |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in results["settings"].items():
        t = s["timings"]
        for r in t["latency"]:
            floor = r.get("index_over_io_floor", t["index_32_over_io_floor"] if r["queries"] == 32 else None)
            flop = r.get("index_over_flop_floor_plus_query_side")
            own = r.get("query_side_seconds")
            out.append(f"| {name} | `{t.get('build_compression', 'none')}` / `{t['default_compression']}` | "
                       f"{t['build_over_rescan_pass']:.2f} | {r['queries']} | "
                       f"{r['rescan_over_index']:.1f}× | {r['rescan_over_index_data_checked']:.1f}× | "
                       + ("—" if floor is None else f"{floor:.0f}×") + " | "
                       + ("—" if flop is None else f"{flop:.1f}×") + " | "
                       + ("—" if own is None else f"{own / r['index_seconds']:.2f}") + " |")
    out += [
        "",
        "The compression timed is the one built for the build ratio / the one queried (the default). A build "
        "includes hashing every training row and writing the shards with fsync; a `rank` build also factorises "
        "each sequence's gradient on the host (an exact SVD of a T×T core per layer, float64, one thread), "
        "which the curve's last column shows dominating on a ladder run. Each build in the curve is the first "
        "of its compression in the process, so it includes compilation. The I/O floor is the time "
        "to read every stored byte of the index once (from the page cache here); the FLOP floor is the "
        "index's scoring arithmetic (each query's key against every stored row, and expanding rank-c rows to "
        "dense `U Vᵀ`) at the float32 matmul rate measured in the same process; the queries' own cost is their "
        "gradients and preconditioning, which a rescan pays as well.",
        "",
        *_cost_notes(results),
        *_lds_section(),
        "## Layout",
        "",
        "```",
        "manifest.json   model fingerprint and weights digest, task, factors digest, compression, layers,",
        "                shards (rows, per file its bytes and SHA-256, a digest of its training rows),",
        "                row r = training sequence row_offset + r",
        "maps.npz        the compression's maps: side maps, or a selection's kept coordinates (checksummed)",
        "shards/s<segment>-<shard>-l<layer>.npy   [rows, width] (int4: [rows, ⌈width/2⌉] uint8, two to a byte;",
        "                                         + .scale.npy [rows] for int8 and int4)",
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
    if HELDOUT.is_file():  # issue 28: the compressions on model kinds that did not set the default
        out += heldout_section(json.loads(HELDOUT.read_text()))
    if FLOOR.is_file():  # issue 28, item 4: a 1 GB index against its I/O floor
        out += floor_section(json.loads(FLOOR.read_text()))
    return "\n".join(out)


def _note(run: dict) -> str:
    return f" ({run['note']})" if run.get("note") else ""


def _setting_load(s: dict) -> str:
    start, end = s.get("loadavg_start"), s.get("timings", {}).get("loadavg_end")
    if start is None or end is None:
        return "not recorded"
    return f"{start[0]:.1f} → {end[0]:.1f}"


SIXTEENTH = 1 / 16
DECODED_PER_STORED = {"float32": 1, "bfloat16": 2, "int8": 4, "int4": 8}
"""Bytes of float32 the scan decodes per stored byte."""


def _smallest_passing(results: dict) -> list[str]:
    """Per setting: the smallest compression reaching the overlap goal, and the best overlap
    at ≤ 1/16 of the full gradient's bytes."""
    goal = results["overlap_goal"]
    lines = ["| setting | smallest compression with top-10 overlap ≥ "
             f"{goal} (÷ full) | best top-10 overlap at ≤ 1/16 of the full bytes |", "|---|---|---|"]
    missed = []
    for name, s in results["settings"].items():
        passing = sorted(((r["fraction_of_full"], i, r["compression"]) for i, r in enumerate(s["curve"])
                          if r["top10_overlap"] >= goal))
        passing = [(f, c) for f, _, c in passing]
        small = [r for r in s["curve"] if r["fraction_of_full"] <= SIXTEENTH]
        best = max(small, key=lambda r: r["top10_overlap"]) if small else None
        if not passing or passing[0][0] > SIXTEENTH:
            missed.append(name)
        lines.append(f"| {name} | " + (f"`{passing[0][1]}` ({passing[0][0]:.3f})" if passing else "none measured")
                     + " | " + (f"{best['top10_overlap']:.3f} (`{best['compression']}`, "
                                f"{best['fraction_of_full']:.3f})" if best else "none measured") + " |")
    lines.append("")
    if missed:
        lines += [f"The goal of top-{TOP} overlap ≥ {goal} at ≤ 1/16 of the full gradient's bytes is missed on "
                  f"{', '.join(missed)}.", ""]
    else:
        lines += [f"The goal of top-{TOP} overlap ≥ {goal} at ≤ 1/16 of the full gradient's bytes is met in every "
                  "setting.", ""]
    lines += _curve_notes(results)
    return lines


def _row(s: dict, comp: str) -> dict | None:
    return next((r for r in s["curve"] if r["compression"] == comp), None)


def _curve_notes(results: dict) -> list[str]:
    """What the curve shows about the maps, from the measured rows (any setting that has them)."""
    lines = []
    for name, s in results["settings"].items():
        pairs = [(_row(s, a), _row(s, b)) for a, b in (("select:0.25:int8", "truncate:0.5:int8"),
                                                       ("select:0.5:int4", "select:0.25:int8"))]
        if any(r is None for pair in pairs for r in pair):
            continue
        (sel, trunc), (half4, quarter8) = pairs
        more = half4["top10_overlap"] > quarter8["top10_overlap"]
        lines += (
            f"On {name}, at one sixteenth of the bytes, top-{TOP} overlap: {sel['top10_overlap']:.3f} for the "
            f"quarter of the coordinates of largest whitened variance (`select:0.25:int8`), "
            f"{trunc['top10_overlap']:.3f} for the quarter in the leading block (`truncate:0.5:int8`), and "
            f"{half4['top10_overlap']:.3f} for half of the coordinates at four bits (`select:0.5:int4`): "
            + ("keeping more coordinates, rounded more coarsely, does better here." if more else
               "here the quarter at int8 does at least as well as the half at four bits."), "")
    return lines


def _cost_notes(results: dict) -> list[str]:
    """What bounds the index's latency on each ``--run`` setting (numbers from the JSON)."""
    tiny = [name for name, s in results["settings"].items() if "run" not in s]
    lines = [f"On {' and '.join(tiny)} the indexes are a few megabytes and the models tiny: both paths' times "
             "are fixed costs (the query gradients, which both compute, dispatch, tracking, digests) that the load "
             "of the machine moves by as much as the ratios, which say little about large runs.", ""] if tiny else []
    default = results["default_compression"]
    for name, s in results["settings"].items():
        t = s["timings"]
        if t["default_compression"] != default:
            lines += [f"On {name} the latency was measured with `{t['default_compression']}`, the default chosen "
                      "from the settings measured when it ran, not with the present default "
                      f"`{default}`"
                      + (f" (whose scan also expands each rank-c row to dense: (Q + c)/Q times the arithmetic of "
                         f"`{t['default_compression']}`'s at Q queries)"
                         if inf.index.Compression.parse(default).method == "rank"
                         and inf.index.Compression.parse(t["default_compression"]).method == "none" else "")
                      + ".", ""]
        if "run" not in s:
            continue
        r = next(x for x in t["latency"] if x["queries"] == 32)
        scan = r["index_seconds"] - r["query_side_seconds"]
        lines += [
            f"On {name}, 32 queries: the rescan took {r['rescan_seconds']:.1f} s and the index "
            f"{r['index_seconds']:.2f} s ({r['rescan_over_index']:.1f}×; goal 20×: "
            f"{'met' if r['rescan_over_index'] >= 20 else 'missed'}), of which the queries' own gradients and "
            f"preconditioning {r['query_side_seconds']:.2f} s and the scan of the stored rows {scan:.2f} s "
            f"({scan / t['io_floor_seconds']:.0f}× the I/O floor), "
            f"against an I/O floor of {t['io_floor_seconds']:.3g} s ({r['index_over_io_floor']:.0f}×; goal 2×: "
            f"{'met' if r['index_over_io_floor'] <= 2 else 'missed'}: the queries' own cost alone is "
            f"{r['query_side_seconds'] / t['io_floor_seconds']:.0f}× the I/O floor) and a FLOP floor of "
            f"{r['flop_floor_seconds']:.3g} s at {t['matmul_flops_per_second'] / 1e9:.0f} GFLOP/s (the scan: "
            f"{scan / r['flop_floor_seconds']:.1f}× its FLOP floor). "
            + ("For `none` and `rank` rows each query's key has every number of the full gradient (and rank rows "
               "are expanded to dense), so the scan's arithmetic per row is the query product a rescan does too, "
               "without the rescan's forward and backward pass and per-sequence gradients: reading the index "
               "costs less than multiplying it, and the queries' own cost does not shrink with the index."
               if inf.index.Compression.parse(t["default_compression"]).method in ("none", "rank") else
               "The scan decodes each block of stored rows to float32 before its product (see "
               "`influence.index.source.BLOCK_BYTES`; `python -m benchmarks.index_scan` times the block sizes "
               "on a machine), so it writes and reads "
               f"{DECODED_PER_STORED[inf.index.Compression.parse(t['default_compression']).dtype]} bytes of "
               "float32 for every stored byte; the queries' own cost (their gradients and "
               "preconditioning) does not shrink with the index."), ""]
    return lines


def _lds_section() -> list[str]:
    """The LDS of index scores next to the rescan's (docs/benchmarks/lds-lm-index.json)."""
    if not LDS.is_file():
        return []
    lds = json.loads(LDS.read_text())
    rows = [r for r in lds["rows"] if r["strategy"] == "ekfac" and r["damping"] == "default"
            or r["damping"].startswith("index ")]
    rescan = next(r for r in rows if r["damping"] == "default")
    out = ["## LDS of the index's scores", "",
           f"`{lds['command']}` — {lds['date']}, {lds['machine']}, load average "
           f"{', '.join(f'{x:.1f}' for x in lds['load_average'])}; the tiny-LM validation setting "
           f"({lds['n_train']} training sequences, {lds['n_queries']} queries, {lds['subsets']} subsets × "
           f"{len(lds['seeds'])} retraining seeds, α = {lds['fraction']}); EK-FAC at the default damping, "
           "scored by a rescan and from an index of each compression (built on the setting's training set).", "",
           "| scores | LDS | ± s.e. | − rescan |", "|---|---|---|---|"]
    for r in rows:
        label = "rescan" if r["damping"] == "default" else f"index `{r['damping'][len('index '):]}`"
        out.append(f"| {label} | {r['lds']:.3f} | {r['stderr']:.3f} | {r['lds'] - rescan['lds']:+.3f} |")
    within = all(abs(r["lds"] - rescan["lds"]) <= 0.02 for r in rows if r["damping"] == f"index {DEFAULT}")
    out += ["", f"The s.e. is over queries; every row uses the same subsets and retrained models. At the old default "
            f"compression `{DEFAULT}` the goal (within 0.02 of the rescan) is "
            + ("met." if within else "missed.") if any(r["damping"] == f"index {DEFAULT}" for r in rows)
            else f"The old default compression `{DEFAULT}` was not among those measured.", ""]
    return out


def _share(results: dict, comp: str) -> str:
    shares = [_row(s, comp)["fraction_of_full"] for s in results["settings"].values()]
    low, high = f"{min(shares):.3f}", f"{max(shares):.3f}"
    return f"{low}–{high}" if low != high else low


if __name__ == "__main__":
    main()
