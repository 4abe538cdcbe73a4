"""Speed at a user's defaults (no ``batch_size`` given), side by side with kronfluence, in one run.

  nice python -m benchmarks.defaults --kron-python /work/venv-kron/bin/python   # writes docs/benchmarks/defaults.json
  python -m benchmarks.defaults --render docs/benchmarks/defaults.json           # its section of docs/benchmarks.md

Measured, all in one run (so the ratios share the machine's load, which is recorded):

* **MLP against kronfluence** — the MLP 64-256-256-10 of ``benchmarks.kronfluence_compare``
  trained on 1,536 digits, 128 query digits, EK-FAC, empirical Fisher, λ = 1e-3: fit +
  pairwise scores with both libraries at their defaults (ours: the batch size it chooses;
  kronfluence: ``per_device_batch_size=None``, its search for an executable batch size,
  and all queries in one batch, as in its examples) and at matched batch sizes; steady
  state (best of ``--repeats`` after a first call) and a fresh process (ours: a new
  interpreter's first call, with an empty and with a warm persistent compilation cache;
  kronfluence: its first call). Imports and data loading are outside every time.
* **Per-step time against the FLOP floor** — a scoring step of the MLP at the chosen batch
  size and at 32, against the plain matmul ``[Q, D] × [D, B]`` of the same size (D the
  tracked parameters): the contraction's arithmetic on this CPU.
* **First-call times** — a fresh process's first ``fit_factors`` + ``pairwise_scores``
  with the compilation cache off, cold (empty folder) and warm.
* **LM** — with ``--lm-run PATH``, a trained ``influence.lm`` run (e.g. the ``small`` rung
  of ``python -m experiments.scale_comparison --config full``) on its training sequences
  (all, or the first ``--lm-run-sequences``), 32 held-out sequences as queries; without
  it, the ``small`` rung (d = 128, 3 blocks, 4 heads, T = 128, a 4,096-token vocabulary)
  *untrained* on random token sequences (what a fresh machine can run). The MLP layers of
  every block are tracked (``influence fit``'s default ``--layers mlp``): EK-FAC fit at
  the default Fisher ÷ one forward+backward pass over the same sequences, and pairwise
  scores of 32 queries ÷ the same, at the defaults; on a run, also a scoring step and a
  plain forward+backward step against a GEMM of the FLOPs XLA counts for them.

  nice python -m benchmarks.defaults --lm-run /work/small-run-perf --lm-run-sequences 2048
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "defaults.json"

# A fresh interpreter's first fit + scores of the MLP (untrained weights: compilation and
# speed do not depend on them), timed from after the imports and the data.
CHILD = """
import json, os, sys, time
os.environ.setdefault("TQDM_DISABLE", "1")
import influence as inf
from benchmarks.speed import setup
if sys.argv[1] != "off":
    inf.enable_compilation_cache(sys.argv[1])
model, task, train, queries, _ = setup("mlp", 1536)
t0 = time.perf_counter()
factors = inf.fit_factors(model, task, train, fisher="empirical", progress=False)
t1 = time.perf_counter()
inf.pairwise_scores(model, task, factors, queries, train, damping=1e-3, progress=False).values
t2 = time.perf_counter()
print(json.dumps({"fit_s": t1 - t0, "scores_s": t2 - t1, "total_s": t2 - t0}))
"""


def _fresh(cache: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", CHILD, cache], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import jax

    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "device": jax.devices()[0].platform}


def _best(fn, repeats: int) -> float:
    from benchmarks.speed import timed

    return float(timed(fn, repeats=repeats))


def mlp_against_kronfluence(kron_python: str | None, repeats: int, matched: tuple[int, ...]) -> dict:
    import influence as inf
    from benchmarks.kronfluence_compare import agreement, kronfluence_scores, trained_model

    model, task, train, queries, label = trained_model()

    def ours(batch_size=None):
        factors = inf.fit_factors(model, task, train, fisher="empirical", batch_size=batch_size, progress=False)
        scores = inf.pairwise_scores(model, task, factors, queries, train, damping=1e-3, batch_size=batch_size,
                                     progress=False)
        return factors, scores

    factors, scores = ours()
    rows = []
    for batch in (None, *matched):
        row = {"batch_size": batch, "ours_s": _best(lambda b=batch: ours(b), repeats)}
        if batch is None:
            row["ours_chosen"] = {"fit": factors.metadata["batch_size"], "scores": scores.metadata["batch_size"]}
        if kron_python:
            kron = kronfluence_scores(kron_python, model, train, queries, "ekfac", "empirical", 1e-3, batch or 0,
                                      repeats)
            row.update(kronfluence_s=float(kron["fit_seconds"] + kron["score_seconds"]),
                       kronfluence_first_s=float(kron["first_fit_seconds"] + kron["first_score_seconds"]),
                       agreement=agreement(ours(batch)[1].values, kron["scores"]),
                       kronfluence_torch=str(kron["torch_version"]), kronfluence_threads=int(kron["threads"]))
            row["speedup"] = row["kronfluence_s"] / row["ours_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"label": label, "n_train": len(train["y"]), "n_query": len(queries["y"]), "rows": rows}


def first_calls() -> dict:
    """A fresh process's first fit + scores: compilation cache off, cold, warm."""
    with tempfile.TemporaryDirectory() as folder:
        cache = str(Path(folder) / "jax")
        out = {"off": _fresh("off"), "cold": _fresh(cache), "warm": _fresh(cache)}
        out["cache_files"] = len(list(Path(cache).iterdir()))
    print(json.dumps(out), flush=True)
    return out


def _matmul(p, dw):
    """``[Q, D] × [B, D]ᵀ``: the contraction's arithmetic as one plain GEMM (jitted on first use)."""
    import jax

    global _matmul_jit
    if _matmul_jit is None:
        _matmul_jit = jax.jit(lambda p, dw: jax.lax.dot_general(p, dw, (((1,), (1,)), ((), ()))))
    return _matmul_jit(p, dw)


_matmul_jit = None


def step_floor(batch_sizes: tuple[int, ...], repeats: int = 5) -> dict:
    """Scoring steps of the MLP (captured a, g and the contraction with 128 queries)
    against the plain matmul [Q, D] × [D, B] of the same size."""
    import jax
    import jax.numpy as jnp

    import influence as inf
    from benchmarks.speed import setup
    from influence.runtime.data import as_source
    from influence.runtime.execution import Execution
    from influence.runtime.mesh import shard_batch
    from influence.scoring.pairwise import _score_step
    from influence.scoring.preconditioned import prepare_queries

    model, task, train, queries, _ = setup("mlp", 1536)
    factors = inf.fit_factors(model, task, train, fisher="empirical", progress=False)
    side = prepare_queries(model, task, factors, queries, execution=Execution(progress=False))
    tracked = side.tracked
    n_params = sum(i.d_a * i.d_out for i in tracked.layers)
    rows = []
    for batch in batch_sizes:
        source = as_source(train, batch, task, model)
        steps = [(shard_batch(b.arrays, side.mesh), shard_batch(b.example_mask, side.mesh)) for b in source]

        def scoring(steps=steps):
            jax.block_until_ready([
                _score_step(side.placed, tracked.state, a, m, graphdef=tracked.graphdef, layers=tracked.layers,
                            task=task, kind="empirical", mesh=side.mesh, keep_layers=False) for a, m in steps])

        dw = jnp.ones((batch, n_params), jnp.float32)
        p = jnp.ones((side.n_placed, n_params), jnp.float32)
        n_steps = len(steps)

        def floor(n=n_steps, p=p, dw=dw):
            jax.block_until_ready([_matmul(p, dw) for _ in range(n)])

        step_s, floor_s = _best(scoring, repeats) / len(steps), _best(floor, repeats) / len(steps)
        rows.append({"batch_size": batch, "steps": len(steps), "step_s": step_s, "floor_s": floor_s,
                     "gflop_per_step": 2 * side.n_placed * n_params * batch / 1e9, "ratio": step_s / floor_s})
        print(json.dumps(rows[-1]), flush=True)
    return {"n_query": side.n_placed, "tracked_parameters": n_params, "rows": rows}


def lm_ratios(n_train: int, repeats: int) -> dict:
    """The ``small`` ladder model, untrained, on random sequences of T = 128 tokens."""
    from flax import nnx

    import influence as inf
    from benchmarks.speed import forward_backward
    from influence.lm.model import GPT, LADDER

    vocab, length = 4096, 128
    cfg = LADDER["small"].config(vocab, length)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    train = {"input_ids": rng.integers(0, vocab, (n_train, length)).astype(np.int32)}
    queries = {"input_ids": rng.integers(0, vocab, (32, length)).astype(np.int32)}
    task = inf.tasks.CausalLM()
    layers = "mlp"

    def fit():
        return inf.fit_factors(model, task, train, layers=layers, progress=False)

    factors = fit()
    chosen = factors.metadata["batch_size"]
    base = _best(forward_backward(model, task, train, chosen), repeats)
    fit_s = _best(fit, repeats)

    def scores():
        return inf.pairwise_scores(model, task, factors, queries, train, progress=False)

    result = scores()
    scores_s = _best(lambda: scores().values, repeats)
    out = {"config": {**cfg.to_dict(), "scale": "small", "trained": False}, "layers": list(factors.layer_names),
           "n_train": n_train, "n_query": 32, "tokens": length,
           "batch_size": {"fit": chosen, "scores": result.metadata["batch_size"]},
           "forward_backward_s": base, "fit_s": fit_s, "scores_s": scores_s,
           "fit_ratio": fit_s / base, "scores_ratio": scores_s / base}
    print(json.dumps(out), flush=True)
    return out


def _square_matmul(flops: float):
    """A plain ``[n, n] × [n, n]`` float32 GEMM of about ``flops`` (2n³) FLOPs: this CPU's
    floor for that much arithmetic. Returns ``(run, flops of the GEMM)``."""
    import jax
    import jax.numpy as jnp

    n = max(1, round((flops / 2) ** (1 / 3)))
    x = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    return (lambda: jax.block_until_ready(mm(x))), 2.0 * n**3


def _compiled_flops(jitted, *args, **kwargs) -> float:
    """FLOPs of one call of ``jitted`` as XLA counts them (its cost analysis)."""
    cost = jitted.lower(*args, **kwargs).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


def lm_step_floor(model, task, factors, queries, train, batch_size: int, repeats: int, layers) -> list[dict]:
    """The LM's scoring step (captured a, g and the contraction with the queries) and a plain
    forward+backward step, at ``batch_size``, each against a plain GEMM of the FLOPs XLA
    counts for it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from influence.runtime.data import as_source
    from influence.runtime.execution import Execution
    from influence.runtime.mesh import shard_batch
    from influence.scoring.pairwise import _score_step
    from influence.scoring.preconditioned import prepare_queries

    side = prepare_queries(model, task, factors, queries, execution=Execution(progress=False))
    tracked = side.tracked
    source = as_source(train, batch_size, task, model)
    batch = next(iter(source))
    arrays, mask = shard_batch(batch.arrays, side.mesh), shard_batch(batch.example_mask, side.mesh)
    statics = dict(graphdef=tracked.graphdef, layers=tracked.layers, task=task, kind="empirical", mesh=side.mesh,
                   keep_layers=False)

    def score():
        jax.block_until_ready(_score_step(side.placed, tracked.state, arrays, mask, **statics))

    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd_bwd(state, batch, mask):
        return jax.value_and_grad(lambda s: jnp.sum(task.loss(nnx.merge(graphdef, s), batch) * mask))(state)

    def plain():
        jax.block_until_ready(fwd_bwd(state, batch.arrays, batch.example_mask))

    rows = []
    for name, fn, flops in (
            ("scoring step", score, _compiled_flops(_score_step, side.placed, tracked.state, arrays, mask,
                                                    **statics)),
            ("forward+backward step", plain, _compiled_flops(fwd_bwd, state, batch.arrays, batch.example_mask))):
        floor, floor_flops = _square_matmul(flops)
        step_s, floor_s = _best(fn, repeats), _best(floor, repeats)
        floor_s *= flops / floor_flops  # the GEMM's time scaled to exactly the step's FLOPs
        rows.append({"step": name, "batch_size": batch_size, "gflop_per_step": flops / 1e9, "step_s": step_s,
                     "floor_s": floor_s, "ratio": step_s / floor_s})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def lm_run_ratios(path: Path, n_train: int | None, repeats: int) -> dict:
    """A trained ``influence.lm`` run: fit and 32-query scoring at the defaults on its
    training sequences (the first ``n_train``, or all), each ÷ one forward+backward pass
    over the same sequences, and the per-step floor rows of :func:`lm_step_floor`."""
    import influence as inf
    from benchmarks.speed import forward_backward
    from influence.lm import load_run

    run = load_run(path)
    train = run.train if n_train is None or n_train >= len(run.train) else run.train.select(range(n_train))
    queries = run.heldout.select(range(32))
    task = inf.tasks.CausalLM()
    layers = "mlp"
    times = {}

    def fit():
        t0 = time.perf_counter()
        factors = inf.fit_factors(run.model, task, train, layers=layers, progress=False)
        times.setdefault("fit", []).append(time.perf_counter() - t0)
        return factors

    factors = fit()  # the first call compiles; the best of the repeats after it is kept
    for _ in range(repeats):
        fit()
    chosen = factors.metadata["batch_size"]
    base = _best(forward_backward(run.model, task, train, chosen), repeats)

    def scores():
        t0 = time.perf_counter()
        result = inf.pairwise_scores(run.model, task, factors, queries, train, progress=False)
        result.values  # noqa: B018 (the scores on the host)
        times.setdefault("scores", []).append(time.perf_counter() - t0)
        return result

    result = scores()
    for _ in range(repeats):
        scores()
    fit_s, scores_s = min(times["fit"][1:]), min(times["scores"][1:])
    floor = lm_step_floor(run.model, task, factors, queries, train, result.metadata["batch_size"], max(repeats, 3),
                          layers)
    cfg = run.config
    out = {"config": {**cfg.to_dict(), "scale": run.train_config["scale"], "trained": True},
           "run": {"path": str(path), "step": run.step, "seed": run.train_config["seed"],
                   "made_by": "python -m experiments.scale_comparison --config full",
                   "train_sequences": len(run.train)},
           "fisher": factors.metadata.get("fisher"), "fisher_samples": factors.metadata.get("fisher_samples"),
           "layers": list(factors.layer_names), "n_train": len(train), "n_query": len(queries),
           "tokens": cfg.context_length, "batch_size": {"fit": chosen, "scores": result.metadata["batch_size"]},
           "forward_backward_s": base, "fit_s": fit_s, "scores_s": scores_s, "first_fit_s": times["fit"][0],
           "first_scores_s": times["scores"][0], "fit_ratio": fit_s / base, "scores_ratio": scores_s / base,
           "floor": floor}
    print(json.dumps(out), flush=True)
    return out


GOALS = {"steady": 10.0, "fresh": 3.0, "floor": 1.5, "lm_fit": 2.5, "lm_scores": 1.2}


def render(results: dict) -> str:
    """The section of docs/benchmarks.md, from the results file (tests hold the doc to it)."""
    m, mlp, first, floor, lm = (results[k] for k in ("machine", "mlp", "first_calls", "floor", "lm"))
    load = ", ".join(f"{x:.1f}" for x in results["load_start"])
    load_end = ", ".join(f"{x:.1f}" for x in results["load_end"])
    lines = [
        f"`{results['command']}` — {m['date'][:10]}, {m['cores']} cores ({m['processor']}), jax {m['jax']} "
        f"{m['device']}, load average {load} at the start and {load_end} at the end (1, 5, 15 min; "
        f"other jobs shared the machine), {results['seconds']:.0f} s.",
        "",
        f"{mlp['label']}, {mlp['n_train']:,} training and {mlp['n_query']} query digits, EK-FAC, empirical "
        "Fisher, λ = 1e-3; fit + pairwise scores, best of the repeats after a first call:",
        "",
        "| batch size | ours (s) | kronfluence (s) | kronfluence ÷ ours | kronfluence first call (s) | Pearson |",
        "|---|---|---|---|---|---|",
    ]
    for row in mlp["rows"]:
        if row["batch_size"] is None:
            chosen = row["ours_chosen"]
            name = f"defaults (ours: {chosen['fit']} fit, {chosen['scores']} scores; kronfluence: its search)"
        else:
            name = str(row["batch_size"])
        lines.append(f"| {name} | {row['ours_s']:.3f} | {row['kronfluence_s']:.2f} | {row['speedup']:.1f}× | "
                     f"{row['kronfluence_first_s']:.2f} | {row['agreement']['pearson']:.4f} |")
    defaults = mlp["rows"][0]
    fresh = defaults["kronfluence_first_s"] / first["warm"]["total_s"]
    lines += [
        "",
        "A fresh process's first fit + scores at the defaults (the same MLP, untrained weights; "
        "after the imports and data):",
        "",
        "| compilation cache | fit (s) | scores (s) | total (s) | kronfluence's first call ÷ ours |",
        "|---|---|---|---|---|",
    ]
    for key, name in (("off", "off"), ("cold", "on, empty folder"), ("warm", "on, warm (a second process)")):
        row = first[key]
        lines.append(f"| {name} | {row['fit_s']:.2f} | {row['scores_s']:.2f} | {row['total_s']:.2f} | "
                     f"{defaults['kronfluence_first_s'] / row['total_s']:.1f}× |")
    lines += [
        "",
        f"Scoring steps against the FLOP floor (the plain matmul [Q, D] × [D, B], Q = {floor['n_query']}, "
        f"D = {floor['tracked_parameters']:,} tracked parameters):",
        "",
        "| batch size | steps | ms per step | floor (ms) | GFLOP per step | step ÷ floor |",
        "|---|---|---|---|---|---|",
    ]
    for row in floor["rows"]:
        lines.append(f"| {row['batch_size']} | {row['steps']} | {row['step_s'] * 1e3:.2f} | "
                     f"{row['floor_s'] * 1e3:.2f} | {row['gflop_per_step']:.2f} | {row['ratio']:.2f} |")
    cfg = lm["config"]
    if cfg.get("trained"):
        run = lm["run"]
        subset = ("all" if lm["n_train"] == run["train_sequences"] else "the first") + f" {lm['n_train']:,}"
        where = (f"**trained** (the `{cfg['scale']}` rung, seed {run['seed']}, of `{run['made_by']}`, final step "
                 f"{run['step']}); {subset} of "
                 f"its {run['train_sequences']:,} training sequences, {lm['n_query']} of its held-out sequences as "
                 f"queries, EK-FAC with the default Fisher ({lm['fisher']}, {lm['fisher_samples']} draw"
                 f"{'s' if lm['fisher_samples'] != 1 else ''} per sequence)")
    else:
        where = f"untrained (random weights); {lm['n_train']} random sequences, {lm['n_query']} queries"
    lines += [
        "",
        f"LM: the `small` rung (d = {cfg['d_model']}, {cfg['n_layers']} blocks, {cfg['n_heads']} heads, "
        f"T = {lm['tokens']}, vocabulary {cfg['vocab_size']:,}), layers {', '.join(lm['layers'])}, {where}; "
        f"batch sizes chosen {lm['batch_size']['fit']} (fit) and {lm['batch_size']['scores']} (scores); best "
        "after a first call:",
        "",
        "| one forward+backward pass (s) | EK-FAC fit (s) | fit ÷ fwd+bwd | pairwise scores (s) | scores ÷ fwd+bwd |",
        "|---|---|---|---|---|",
        f"| {lm['forward_backward_s']:.2f} | {lm['fit_s']:.2f} | {lm['fit_ratio']:.2f}× | {lm['scores_s']:.2f} | "
        f"{lm['scores_ratio']:.2f}× |",
    ]
    if "floor" in lm:
        lines += [
            "",
            "LM steps against the FLOP floor (a plain square float32 GEMM timed and scaled to the FLOPs XLA "
            "counts for the step):",
            "",
            "| step | batch size | GFLOP per step | ms per step | floor (ms) | step ÷ floor |",
            "|---|---|---|---|---|---|",
        ]
        for row in lm["floor"]:
            lines.append(f"| {row['step']} | {row['batch_size']} | {row['gflop_per_step']:.1f} | "
                         f"{row['step_s'] * 1e3:.0f} | {row['floor_s'] * 1e3:.0f} | {row['ratio']:.2f} |")
    lines += [
        "",
        "Goals (issue 14) against this run:",
        "",
        f"- ≥ {GOALS['steady']:g}× kronfluence in steady state at the defaults: "
        f"{_met(defaults['speedup'] >= GOALS['steady'])} ({defaults['speedup']:.1f}×).",
        f"- ≥ {GOALS['fresh']:g}× in a fresh process with a warm compilation cache: "
        f"{_met(fresh >= GOALS['fresh'])} ({fresh:.1f}×).",
        f"- a scoring step within {GOALS['floor']:g}× of the floor at the chosen batch size: "
        f"{_met(floor['rows'][0]['ratio'] <= GOALS['floor'])} ({floor['rows'][0]['ratio']:.2f}×).",
        f"- LM fit ≤ {GOALS['lm_fit']:g} and scoring ≤ {GOALS['lm_scores']:g} forward+backward passes: fit "
        f"{_met(lm['fit_ratio'] <= GOALS['lm_fit'])} ({lm['fit_ratio']:.2f}), scoring "
        f"{_met(lm['scores_ratio'] <= GOALS['lm_scores'])} ({lm['scores_ratio']:.2f}).",
    ]
    if "floor" in lm:
        score_step, plain_step = lm["floor"][0], lm["floor"][1]
        lines.append(f"- the LM's scoring step within {GOALS['floor']:g}× of the floor: "
                     f"{_met(score_step['ratio'] <= GOALS['floor'])} ({score_step['ratio']:.2f}×; a plain "
                     f"forward+backward step of the same model runs at {plain_step['ratio']:.2f}× of its floor).")
    return "\n".join(lines) + "\n"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kron-python", default=os.environ.get("KRONFLUENCE_PYTHON", "/work/venv-kron/bin/python"))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--matched", default="128,512", help="batch sizes given to both libraries")
    parser.add_argument("--lm-sequences", type=int, default=256, help="random sequences of the untrained LM")
    parser.add_argument("--lm-run", type=Path, help="a trained influence.lm run folder: measure the LM on it "
                        "instead of the untrained small model")
    parser.add_argument("--lm-run-sequences", type=int, help="the first N of the run's training sequences "
                        "(default: all)")
    parser.add_argument("--lm-repeats", type=int, help="repeats of the LM times (default: --repeats)")
    parser.add_argument("--render", type=Path, help="print the markdown of a results file and stop")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())), end="")
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    t0 = time.perf_counter()
    command = " ".join(["python -m benchmarks.defaults", *(argv if argv is not None else sys.argv[1:])])
    results = {"command": command, "machine": machine(), "load_start": os.getloadavg()}
    matched = tuple(int(b) for b in args.matched.split(",") if b)
    results["mlp"] = mlp_against_kronfluence(args.kron_python, args.repeats, matched)
    results["first_calls"] = first_calls()
    chosen = results["mlp"]["rows"][0]["ours_chosen"]["scores"]
    results["floor"] = step_floor(tuple(dict.fromkeys((chosen, 32))))
    lm_repeats = args.lm_repeats or args.repeats
    results["lm"] = (lm_run_ratios(args.lm_run, args.lm_run_sequences, lm_repeats) if args.lm_run else
                     lm_ratios(args.lm_sequences, lm_repeats))
    results["load_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(render(results), end="")


if __name__ == "__main__":
    main()
