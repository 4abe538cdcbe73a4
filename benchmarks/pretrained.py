"""Influence on Pythia-shaped checkpoints (random weights, written and loaded in the Hugging
Face format): EK-FAC fit, pairwise scoring, index build and index query as multiples of one
forward+backward pass over the same sequences, with the fixed costs (compilation,
eigendecompositions) taken apart from the per-token cost, and each step's peak memory.

  nice -n 10 python -m benchmarks.pretrained --work runs/pretrained-bench   # writes docs/benchmarks/pretrained.json
  python -m benchmarks.pretrained --render docs/benchmarks/pretrained.json   # its section of docs/pretrained.md
  python -m benchmarks.pretrained --config gpu --out gpu.json       # 410M and 1B shapes (prepared, see below)

For each row (a shape, a sequence length, a layer selection) the parent process writes one
random-weight checkpoint with ``influence.pretrained.save_pretrained``; then, for each data
size ``N`` of the row, every step runs in its OWN process (so its peak resident memory,
``ru_maxrss``, is its own), loading the checkpoint with ``influence.pretrained.load_model``
as a user's would:

* ``fb`` — one training step's work, repeated: a jitted gradient of the summed next-token
  loss with respect to EVERY parameter, batch after batch over the ``N`` sequences, after a
  compiling call on the first batch; the pass's time is the median batch time × batches.
  Its peak memory is one training step's (parameters, gradients, activations of one batch;
  no optimizer state).
* ``fit`` — ``fit_factors`` (EK-FAC; the sampled Fisher the task's rule picks: two passes).
* ``scores`` — ``pairwise_scores`` of 4 query sequences against the ``N``.
* ``index`` — ``build_index`` (the default compression) of the ``N``.
* ``query`` — ``pairwise_scores(..., index=)``: the same 4 queries answered from the index.

Each step after ``fb`` runs twice in its process on the same inputs: the first run as a
user meets it (compilation included), the second with its compiled functions cached and
the fit's float64 eigendecompositions timed apart. The per-token multiple,
``(second − eigendecompositions) ÷ forward+backward``, is the step's cost per token in
forward+backward passes (the small per-call setup left in). Times are CPU seconds (user +
system, all threads; on an accelerator, wall seconds) with wall seconds beside them: on a
machine shared with other jobs, wall time measures the share of the cores a step got.

Finished steps are appended to ``WORK/<shape>-<tokens>/steps.jsonl``: a rerun with the same
``--work`` resumes. The ``cpu`` config is what a 2-core machine shared with four other jobs
ran in about half an hour; the JSON records an estimate of one forward+backward and of a
fit over 2,048 × 512 tokens from the measured per-token costs. The ``gpu`` config (Pythia
410M and 1B shapes, 512 and 2,048 sequences of 512 tokens, every MLP tracked) is prepared
for one accelerator.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "pretrained.json"

# Pythia's shapes (GPT-NeoX: parallel residual, rotary on 25% of each head, untied head).
SHAPES = {
    "pythia-14m": {"d_model": 128, "n_layers": 6, "n_heads": 4, "d_mlp": 512},
    "pythia-70m": {"d_model": 512, "n_layers": 6, "n_heads": 8, "d_mlp": 2048},
    "pythia-160m": {"d_model": 768, "n_layers": 12, "n_heads": 12, "d_mlp": 3072},
    "pythia-410m": {"d_model": 1024, "n_layers": 24, "n_heads": 16, "d_mlp": 4096},
    "pythia-1b": {"d_model": 2048, "n_layers": 16, "n_heads": 8, "d_mlp": 8192},
}
VOCAB = 50304
N_QUERIES = 4
STEPS = ("fb", "fit", "scores", "index", "query")
# Every attention and MLP projection of every block (not the 512 x 50,304 output head).
BLOCKS = r"blocks\.\d+\.(attn|mlp)\."
CONFIGS = {
    # rows of (shape, [N₁, N₂] sequences, tokens per sequence, batch size, layers, vocabulary or None)
    "cpu": [("pythia-70m", [6], 512, 2, BLOCKS, None)],
    "gpu": [("pythia-410m", [512, 2048], 512, 16, "mlp", None), ("pythia-1b", [512, 2048], 512, 8, "mlp", None)],
    "smoke": [("pythia-14m", [2, 4], 16, 2, r"blocks\.0\.mlp", 512)],  # the test's: seconds
}


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (all threads).
    On a machine shared with other jobs it measures the work, where wall time measures
    the share of the cores the job got."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


class _Timer:
    """Wall and CPU seconds of a ``with`` block (``.wall``, ``.cpu``)."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w0, cpu_seconds() - self.c0


def arch_of(shape: str, vocab: int | None = None):
    """The ``ArchConfig`` of a Pythia shape (GPT-NeoX) with ``vocab`` tokens (default Pythia's)."""
    import influence.pretrained as hf

    s = SHAPES[shape]
    head = s["d_model"] // s["n_heads"]
    return hf.ArchConfig(family="neox", model_type="gpt_neox", vocab_size=vocab or VOCAB, d_model=s["d_model"],
                         n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_heads"], head_dim=head,
                         d_mlp=s["d_mlp"], context_length=2048, norm="layernorm", norm_eps=1e-5, activation="gelu",
                         gated_mlp=False, parallel_residual=True, tied_embeddings=False, qkv_bias=True, o_bias=True,
                         mlp_bias=True, rotary_dim=head // 4, rope_theta=10000.0)


def write_checkpoint(shape: str, folder: str | Path, vocab: int | None = None, seed: int = 0) -> None:
    """A random-weight checkpoint of ``shape`` in the Hugging Face format (float32)."""
    from flax import nnx

    import influence.pretrained as hf

    hf.save_pretrained(hf.PretrainedLM(arch_of(shape, vocab), rngs=nnx.Rngs(seed)), folder)


def token_data(n: int, t: int, vocab: int, n_queries: int = N_QUERIES):
    """``(train, queries)``: ``n`` random sequences of ``t`` tokens (those of a smaller ``n``
    are a prefix of a larger's) and ``n_queries`` more drawn apart, as CausalLM batches."""
    import numpy as np

    train = np.random.default_rng(0).integers(0, vocab, size=(n, t), dtype=np.int32)
    queries = np.random.default_rng(1).integers(0, vocab, size=(n_queries, t), dtype=np.int32)
    return ({"input_ids": train, "loss_mask": np.ones((n, t), np.int32)},
            {"input_ids": queries, "loss_mask": np.ones((n_queries, t), np.int32)})


def run_step(step: str, folder: str, work: str, n: int, t: int, batch_size: int, layers: str,
             again: bool = False) -> dict:
    """One step at one size, in the calling process (see the module docstring). With
    ``again``, a step after ``fb`` runs a second time on the same inputs: its compiled
    functions are then cached, so the second run's time is the work without compilation,
    and the fit's eigendecompositions are timed apart (``eigh_cpu_s``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import influence as inf
    import influence.curvature.covariance as covariance
    import influence.index.source as index_score
    import influence.pretrained as hf
    import influence.scoring.pairwise as pairwise
    from influence.tasks import CausalLM

    model, arch = hf.load_model(folder)
    train, queries = token_data(n, t, arch.vocab_size)
    task = CausalLM()
    work = Path(work)
    factors_file = work / f"factors-{n}.npz"
    warnings.simplefilter("ignore", inf.UntrackedParametersWarning)  # intended: only `layers` are tracked
    row: dict = {"step": step, "sequences": n}
    if step == "fb":
        graphdef, params = nnx.split(model)

        @jax.jit
        def grad_step(params, batch):
            return jax.grad(lambda p: task.loss(nnx.merge(graphdef, p), batch).sum())(params)

        first = {k: jnp.asarray(v[:batch_size]) for k, v in train.items()}
        with _Timer() as first_t:
            jax.block_until_ready(grad_step(params, first))  # compiles
        row.update(first_batch_s=round(first_t.wall, 2), first_batch_cpu_s=round(first_t.cpu, 2))
        walls, cpus = [], []
        for i in range(0, n, batch_size):
            batch = {k: jnp.asarray(v[i:i + batch_size]) for k, v in train.items()}
            with _Timer() as bt:
                jax.block_until_ready(grad_step(params, batch))
            walls.append(bt.wall)
            cpus.append(bt.cpu)
        row.update(batch_s=[round(x, 3) for x in walls], batch_cpu_s=[round(x, 2) for x in cpus],
                   seconds=round(statistics.median(walls) * len(walls), 2),
                   cpu_s=round(statistics.median(cpus) * len(cpus), 2))
        row["parameters"] = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
        row["peak_gb"] = round(_peak_gb(), 2)
        row["device"] = str(jax.devices()[0].platform)
        return row

    def fit():
        return inf.fit_factors(model, task, train, layers=layers, batch_size=batch_size, progress=False)

    def scores():
        return inf.pairwise_scores(model, task, inf.Factors.load(factors_file), queries, train,
                                   batch_size=batch_size, progress=False)

    def index():
        return inf.build_index(model, task, inf.Factors.load(factors_file), train, path=work / f"index-{n}",
                               overwrite=True, batch_size=batch_size, progress=False)

    def query():
        return inf.pairwise_scores(model, task, inf.Factors.load(factors_file), queries, train,
                                   index=work / f"index-{n}", batch_size=batch_size, progress=False)

    calls = {"fit": fit, "scores": scores, "index": index, "query": query}
    if step not in calls:
        raise ValueError(f"unknown step {step!r}; expected one of {STEPS}")
    with _Timer() as timer:
        result = calls[step]()
    row.update(seconds=round(timer.wall, 2), cpu_s=round(timer.cpu, 2))
    if again:
        eigh, eigh_cpu, eigh_wall = covariance._eigh, [0.0], [0.0]

        def timed_eigh(*args):  # the fit's float64 eigendecompositions, timed apart
            c0, w0 = cpu_seconds(), time.perf_counter()
            try:
                return eigh(*args)
            finally:
                eigh_cpu[0] += cpu_seconds() - c0
                eigh_wall[0] += time.perf_counter() - w0

        prepare, side_t = pairwise.prepare_queries, []

        def timed_prepare(*args, **kwargs):  # the query side of a rescan (gradients, preconditioning)
            with _Timer() as timer:
                out = prepare(*args, **kwargs)
                jax.block_until_ready(out.placed)
            side_t.append(timer)
            return out

        covariance._eigh = timed_eigh
        pairwise.prepare_queries = index_score.prepare_queries = timed_prepare
        try:
            with _Timer() as again_t:
                result = calls[step]()
        finally:
            covariance._eigh, pairwise.prepare_queries, index_score.prepare_queries = eigh, prepare, prepare
        row.update(again_s=round(again_t.wall, 2), again_cpu_s=round(again_t.cpu, 2),
                   eigh_s=round(eigh_wall[0], 2), eigh_cpu_s=round(eigh_cpu[0], 2))
        if side_t:
            row.update(query_side_s=round(sum(x.wall for x in side_t), 2),
                       query_side_cpu_s=round(sum(x.cpu for x in side_t), 2))
    if step == "fit":
        result.save(factors_file)
        row["tracked_layers"] = list(result.layer_names)
        row["tracked_parameters"] = sum(int(np.prod(kernel.shape)) for _, kernel in
                                        _kernels(model, result.layer_names))
        row["fisher"] = result.metadata.get("fisher")
    elif step == "scores":
        values = np.asarray(result.values)
        assert np.isfinite(values).all()
        np.save(work / f"scores-{n}.npy", values)
    elif step == "index":
        row["compression"] = str(result.compression)
        row["index_mb"] = round(sum(f.stat().st_size for f in (work / f"index-{n}").rglob("*") if f.is_file()) / 1e6,
                                1)
    else:
        exact = np.load(work / f"scores-{n}.npy")
        approx = np.asarray(result.values)
        k = min(10, n)
        top = [len(set(np.argsort(-e)[:k]) & set(np.argsort(-a)[:k])) / k for e, a in zip(exact, approx)]
        row["top10_vs_rescan"] = round(float(np.mean(top)), 3)
    row["peak_gb"] = round(_peak_gb(), 2)
    row["device"] = str(jax.devices()[0].platform)
    return row


def _kernels(model, names):
    from flax import nnx

    modules = dict((".".join(map(str, path)), m) for path, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear))
    return [(name, modules[name].kernel.value) for name in names if name in modules]


def summarize(sizes: list[int], steps: dict[str, list[dict]], t: int, clock: str = "cpu_s") -> dict:
    """Per size and step, in CPU seconds (``clock="cpu_s"``: the work, which the load does
    not stretch; on an accelerator ``"seconds"``, wall): the first run (as a user meets it)
    and the second (compiled functions cached) as multiples of the forward+backward over
    the same sequences, the fit's eigendecompositions, and the **per-token multiple**
    ``(second − eigendecompositions) ÷ forward+backward``: what the step costs per token in
    forward+backward passes, the fixed costs (compilation, eigendecompositions) taken out
    (the small per-call setup stays in, so it errs high). Peak memory ÷ the training step's
    (the forward+backward process's peak)."""
    again_key = "again_cpu_s" if clock == "cpu_s" else "again_s"
    eigh_key = "eigh_cpu_s" if clock == "cpu_s" else "eigh_s"
    out: dict = {"clock": clock, "sizes": {}}
    for i, n in enumerate(sizes):
        fb_row = steps["fb"][i]
        fb = fb_row[clock]
        first, batches = (("first_batch_cpu_s", "batch_cpu_s") if clock == "cpu_s" else ("first_batch_s", "batch_s"))
        per: dict = {"fb": {"first": round(fb_row[first] - fb_row[batches][0] + fb, 2), "again": fb,
                            "per_token_x": 1.0, "peak_gb": fb_row["peak_gb"],
            "peak_x_step": 1.0, "wall": [fb_row["seconds"], fb_row["seconds"]]}}
        for step in (x for x in STEPS[1:] if steps.get(x)):  # a partial run (--steps) lacks some
            r = steps[step][i]
            again = r.get(again_key)
            eigh = r.get(eigh_key, 0.0) if step == "fit" else 0.0
            side = r.get("query_side_cpu_s" if clock == "cpu_s" else "query_side_s")  # the queries' own work
            per[step] = {"first": r[clock], "first_x": round(r[clock] / fb, 2), "again": again,
                         "again_x": None if again is None else round(again / fb, 2),
                         "eigh": eigh if step == "fit" else None,
                         "query_side": side,
                         "per_token_x": None if again is None else round((again - eigh - (side or 0.0)) / fb, 2),
                         "peak_gb": r["peak_gb"], "peak_x_step": round(r["peak_gb"] / fb_row["peak_gb"], 2),
                         "wall": [r["seconds"], r.get("again_s")]}
        out["sizes"][str(n)] = per
    last = out["sizes"][str(sizes[-1])]
    fb_2k = steps["fb"][-1][clock] / (sizes[-1] * t) * 2048 * 512
    out["fb_s_2048x512_estimate"] = round(fb_2k)
    fit = last["fit"]
    out["fit_s_2048x512_estimate"] = (None if fit["per_token_x"] is None else
                                      round(fit["eigh"] + fit["per_token_x"] * fb_2k))
    return out


GOALS = {"fit": 2.0, "scores": 1.5}  # forward+backward passes over the same data (issue 23, item 5)
PEAK_GOAL = 2.0  # × one training step's peak memory


def verdict(summary: dict) -> str:
    """The goals against the largest size's per-token multiples and the peaks, in words."""
    def met(value, goal):
        return "met" if value <= goal else "missed"

    last = summary["sizes"][max(summary["sizes"], key=int)]
    parts = []
    for step, goal in GOALS.items():
        x = last[step]["per_token_x"] if step in last else None
        if x is not None:
            parts.append(f"{STEP_NAMES[step]} {x:.2f}× forward+backward per token (goal ≤ {goal:g}: {met(x, goal)})")
    peak = max(r["peak_x_step"] for per in summary["sizes"].values() for r in per.values())
    parts.append(f"peak memory at most {peak:.2f}× the training step's (goal ≤ {PEAK_GOAL:g}: "
                 f"{met(peak, PEAK_GOAL)})")
    return "Goals, per token (compilation and eigendecompositions taken out): " + "; ".join(parts) + "."


STEP_NAMES = {"fb": "forward+backward", "fit": "factor fit", "scores": f"pairwise scores ({N_QUERIES} queries)",
              "index": "index build", "query": f"index query ({N_QUERIES} queries)"}


def _num(x, fmt: str = ".1f") -> str:
    return "—" if x is None else format(x, fmt)


def render(results: dict) -> str:
    """The generated section of docs/pretrained.md (a test holds the doc to it)."""
    m = results["machine"]
    lines = [f"`{results['command']}` — {m['date'][:10]}, {m['cores']} cores, jax {m['jax']} on {m['device']}, "
             f"load average {', '.join(f'{x:.1f}' for x in results['load_start'])} at the start and "
             f"{', '.join(f'{x:.1f}' for x in results['load_end'])} at the end (1, 5, 15 min; other jobs shared the "
             "machine). Random weights, Pythia shapes; each step in its own process.", ""]
    for row in results["rows"]:
        s, t = row["summary"], row["tokens"]
        unit = "CPU s" if s["clock"] == "cpu_s" else "s"
        fit_est = s["fit_s_2048x512_estimate"]
        hours = f"{'CPU ' if s['clock'] == 'cpu_s' else ''}hours"
        lines += [f"**{row['shape']}** ({row['parameters'] / 1e6:.0f}M parameters), batches of {row['batch_size']} "
                  f"sequences of {t} tokens; tracked: {len(row['tracked_layers'])} layers "
                  f"(`{row['layers']}`, {row['tracked_parameters'] / 1e6:.1f}M parameters), Fisher "
                  f"{row['fisher']}" + (f"; index compression `{row['compression']}`" if row["compression"] else "")
                  + ". At the measured cost per token, one "
                  f"forward+backward over 2,048 × 512 tokens is about {s['fb_s_2048x512_estimate'] / 3600:.1f} "
                  f"{hours} here"
                  + (f" and the factor fit about {fit_est / 3600:.1f}" if fit_est is not None else "") + ".", ""]
        for n, per in s["sizes"].items():
            lines += [f"N = {n} sequences ({int(n) * t:,} tokens):", "",
                      f"| step | first run, {unit} | ÷ f+b | again (compiled), {unit} | ÷ f+b "
                      f"| timed apart: eigendecompositions (fit), the queries' side (scores, query), {unit} "
                      "| per token, × f+b | wall s, first / again | peak GB "
                      "| peak ÷ training step's |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for step in (x for x in STEPS if x in per):
                r = per[step]
                first_x = "1.00" if step == "fb" else _num(r["first_x"], ".2f")
                again_x = "1.00" if step == "fb" else _num(r["again_x"], ".2f")
                lines.append(f"| {STEP_NAMES[step]} | {_num(r['first'])} | {first_x} | {_num(r['again'])} | "
                             f"{again_x} | {_num(r['eigh'] if r.get('eigh') is not None else r.get('query_side'))} | "
                             f"{_num(r['per_token_x'], '.2f')} | "
                             f"{' / '.join(_num(x, '.0f') for x in r['wall'])} | {r['peak_gb']:.2f} | "
                             f"{r['peak_x_step']:.2f} |")
            lines.append("")
        lines.append(verdict(s))
        lines.append("")
        if row.get("top10_vs_rescan"):
            lines.append("Index top-10 agreement with the rescan's scores: "
                         + ", ".join(f"{x:.2f} at N={n}" for n, x in zip(row["sizes"], row["top10_vs_rescan"]))
                         + f"; index size {' / '.join(f'{x:.1f}' for x in row['index_mb'])} MB.")
            lines.append("")
    return "\n".join(lines).rstrip()


def measure_row(shape: str, sizes: list[int], t: int, batch_size: int, layers: str, vocab: int | None,
                work: str, in_process: bool = False, again: bool = True, only: tuple = STEPS) -> dict:
    """One row: a checkpoint written once, then every step at every size (each in its own
    process unless ``in_process``, the test's smoke run)."""
    folder = str(Path(work) / "checkpoint")
    t0 = time.perf_counter()
    if not (Path(folder) / "config.json").is_file():  # a kept work folder resumes (same seed, same weights)
        write_checkpoint(shape, folder, vocab)
    write_s = time.perf_counter() - t0
    # Each finished step is appended to steps.jsonl: a rerun with the same --work skips it.
    log = Path(work) / "steps.jsonl"
    done = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done[(r["step"], r["sequences"])] = r
    steps: dict[str, list[dict]] = {step: [] for step in STEPS if step in only}
    for n in sizes:
        for step in steps:
            spec = [step, folder, work, n, t, batch_size, layers, again]
            if (step, n) in done:
                result = done[(step, n)]
            elif in_process:
                result = run_step(*spec)
            else:
                out = subprocess.run([sys.executable, "-m", "benchmarks.pretrained", "--step", json.dumps(spec)],
                                     capture_output=True, text=True)
                if out.returncode:
                    raise RuntimeError(f"step {spec} failed:\n{out.stderr[-4000:]}")
                result = json.loads(next(x[4:] for x in out.stdout.splitlines() if x.startswith("ROW ")))
            if (step, n) not in done:
                with log.open("a") as f:
                    f.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
            steps[step].append(result)
    fit = steps["fit"][-1]
    return {"shape": shape, "parameters": steps["fb"][0]["parameters"], "vocab": vocab or VOCAB, "sizes": sizes,
            "tokens": t, "batch_size": batch_size, "layers": layers, "tracked_layers": fit["tracked_layers"],
            "tracked_parameters": fit["tracked_parameters"], "fisher": fit["fisher"],
            "compression": steps["index"][-1]["compression"] if steps.get("index") else None,
            "index_mb": [r["index_mb"] for r in steps.get("index", [])],
            "top10_vs_rescan": [r["top10_vs_rescan"] for r in steps.get("query", [])],
            "write_checkpoint_s": round(write_s, 1), "device": steps["fb"][0]["device"],
            "fb_first_batch_s": [r["first_batch_s"] for r in steps["fb"]],
            "summary": summarize(sizes, steps, t, "cpu_s" if steps["fb"][0]["device"] == "cpu" else "seconds"),
            "steps": {step: [{k: v for k, v in r.items() if k not in ("tracked_layers", "device")} for r in rows]
                      for step, rows in steps.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--work", help="folder for the checkpoint, factors, index and finished steps, kept: a rerun "
                        "resumes (default: a temporary one)")
    parser.add_argument("--sizes", help="comma-separated data sizes N, replacing the config's (e.g. 4,8)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated steps to run (of {STEPS}; fb and "
                        "fit are needed by the others)")
    parser.add_argument("--render", metavar="RESULTS", help="print the doc section of a results file")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # a child process: one step as JSON
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    if args.step:
        print("ROW " + json.dumps(run_step(*json.loads(args.step))))
        return 0
    import jax

    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        for shape, sizes, t, b, layers, vocab in CONFIGS[args.config]:
            if args.sizes:
                sizes = [int(x) for x in args.sizes.split(",")]
            sub = Path(work) / f"{shape}-{t}"
            sub.mkdir(parents=True, exist_ok=True)
            rows.append(measure_row(shape, sizes, t, b, layers, vocab, str(sub), only=tuple(args.steps.split(","))))
    sizes_arg = f" --sizes {args.sizes}" if args.sizes else ""
    results = {"command": f"nice -n 10 python -m benchmarks.pretrained --config {args.config}{sizes_arg}",
               "machine": {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                           "cores": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                           "jax": jax.__version__, "device": rows[0]["device"]},
               "load_start": [round(x, 2) for x in load_start], "load_end": [round(x, 2) for x in os.getloadavg()],
               "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(args.out)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
