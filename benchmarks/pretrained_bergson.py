"""bergson's EK-FAC and ours side by side: one random-weight GPT-NeoX (Pythia-shaped)
checkpoint, the same token windows, the same 2 CPU cores; score agreement (Pearson per
query, top-10 overlap) and fit / scoring times at two data sizes.

  nice -n 10 python -m benchmarks.pretrained_bergson --bergson-python /work/venv-bergson/bin/python
  python -m benchmarks.pretrained_bergson --render docs/benchmarks/pretrained-bergson.json

bergson (PyPI, with PyTorch) is NOT a dependency: it runs in its own virtual environment,
named by ``--bergson-python`` (docs/pretrained.md says how to make one), as a child
process; this module imports neither (the test suite imports only ``render``).

For each size ``N``:

1. the checkpoint (written once with ``influence.pretrained.save_pretrained``, float32, with
   a word-level ``tokenizer.json`` that bergson's ``AutoTokenizer`` loads and never uses)
   and ``N`` training plus 4 query windows of ``T`` random token ids, saved as
   pre-tokenized ``datasets`` folders (``input_ids``) for bergson;
2. **bergson**: ``bergson ekfac`` (K-FAC with eigenvalue correction, labels sampled from
   the model, ``damped_inverse`` with damping 0.1 × mean eigenvalue, summed loss, biases
   included, one score column per query), tracking only the MLPs (``--filter_modules``
   drops the attention and the output head), its steps timed from inside its process;
3. **ours** (``benchmarks.pretrained`` steps, each in its own process): ``fit_factors``
   (EK-FAC, sampled Fisher) on ``blocks.*.mlp`` and ``pairwise_scores`` of the 4 queries;
4. per query, the Pearson correlation of the two score vectors over the ``N`` sequences
   and the overlap of their top 10.

The same layers and conventions, but not the same sampled labels (each draws its own), so
the scores agree to sampling noise, not to rounding. Times include each tool's fixed
costs (model load, compilation for ours) as a user meets them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "pretrained-bergson.json"
CONFIG = {"shape": "pythia-14m", "tokens": 128, "sizes": [16, 64], "batch_size": 8, "vocab": None}
SMOKE = {"shape": "pythia-14m", "tokens": 16, "sizes": [4], "batch_size": 2, "vocab": 512}
OUR_LAYERS = r"blocks\.\d+\.mlp\."
BERGSON_EXCLUDE = "*attention*,embed_out"  # globs of HF module names: leaves dense_h_to_4h, dense_4h_to_h

# Run with bergson's Python: times the steps of bergson's EK-FAC pipeline from inside.
DRIVER = r"""
import json, resource, sys, time
import bergson.hessians.pipeline as P
times = {}
def cpu():
    who = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, who))
def timed(name, f):
    def g(*a, **k):
        t0, c0 = time.perf_counter(), cpu()
        try:
            return f(*a, **k)
        finally:
            times[name] = times.get(name, 0.0) + time.perf_counter() - t0
            times[name + "_cpu"] = times.get(name + "_cpu", 0.0) + cpu() - c0
    return g
P.build_query = timed("query_gradients", P.build_query)
P.approximate_hessians = timed("fit", P.approximate_hessians)
P.launch_distributed_run = timed("apply", P.launch_distributed_run)
P.score_dataset = timed("scores", P.score_dataset)
sys.argv = ["bergson"] + json.loads(sys.argv[1])
from bergson.__main__ import main
t0 = time.perf_counter()
main()
times["total"] = time.perf_counter() - t0
times["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
import bergson
times["version"] = bergson.__version__
print("TIMES " + json.dumps(times))
"""


def word_tokenizer(vocab: int) -> str:
    """A word-level ``tokenizer.json`` of ``vocab`` tokens (bergson loads a tokenizer; the
    data are token ids already)."""
    words = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    return json.dumps({"version": "1.0", "truncation": None, "padding": None,
                       "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                                         "rstrip": False, "normalized": False, "special": True}],
                       "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
                       "decoder": None, "model": {"type": "WordLevel", "vocab": words, "unk_token": "<|endoftext|>"}})


def bergson_args(run: Path, folder: Path, train: Path, queries: Path, t: int, batch_size: int) -> list[str]:
    return ["ekfac", str(run), "--model", str(folder), "--tokenizer", str(folder), "--data.dataset", str(train),
            "--query.dataset", str(queries), "--query.aggregation", "none", "--method", "kfac",
            "--hessian_cfg.ev_correction", "true", "--include_bias", "true", "--filter_modules", BERGSON_EXCLUDE,
            "--index_cfg.precision", "fp32", "--token_batch_size", str(t * batch_size), "--nproc_per_node", "1",
            "--score", "individual", "--loss_reduction", "sum"]


def read_bergson_scores(path: Path, n_queries: int):
    import numpy as np

    info = json.loads((path / "info.json").read_text())
    rows = np.memmap(path / "scores.bin", dtype=np.dtype(info["dtype"]), mode="r", shape=(info["num_rows"],))
    assert all(rows[f"written_{q}"].all() for q in range(n_queries)), "bergson left scores unwritten"
    return np.stack([np.asarray(rows[f"score_{q}"], np.float64) for q in range(n_queries)])  # [Q, N]


def agreement(ours, theirs, k: int = 10) -> dict:
    """Per query: Pearson correlation and top-``k`` overlap of two ``[Q, N]`` score arrays."""
    import numpy as np

    pearson = [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(ours, theirs)]
    k = min(k, ours.shape[1])
    top = [len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k for a, b in zip(ours, theirs)]
    return {"pearson": [round(x, 4) for x in pearson], "pearson_median": round(statistics.median(pearson), 4),
            "top10": [round(x, 2) for x in top], "top10_mean": round(float(np.mean(top)), 3)}


def _our_step(step: str, folder: Path, work: Path, n: int, t: int, b: int) -> dict:
    spec = [step, str(folder), str(work), n, t, b, OUR_LAYERS]
    out = subprocess.run([sys.executable, "-m", "benchmarks.pretrained", "--step", json.dumps(spec)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"our {step} failed:\n{out.stderr[-4000:]}")
    return json.loads(next(x[4:] for x in out.stdout.splitlines() if x.startswith("ROW ")))


def compare(config: dict, bergson_python: str, work: Path) -> list[dict]:
    import datasets
    import numpy as np

    from benchmarks.pretrained import N_QUERIES, VOCAB, token_data, write_checkpoint

    vocab, t, b = config["vocab"] or VOCAB, config["tokens"], config["batch_size"]
    folder = work / "checkpoint"
    write_checkpoint(config["shape"], folder, config["vocab"])
    (folder / "tokenizer.json").write_text(word_tokenizer(vocab))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "model_max_length": 2048}))
    rows = []
    for n in config["sizes"]:
        train, queries = token_data(n, t, vocab)
        data = {}
        for name, part in (("train", train), ("queries", queries)):
            data[name] = work / f"{name}-{n}"
            datasets.Dataset.from_dict({"input_ids": part["input_ids"].tolist()}).save_to_disk(str(data[name]))
        run = work / f"bergson-{n}"
        args = bergson_args(run, folder, data["train"], data["queries"], t, b)
        t0 = time.perf_counter()
        out = subprocess.run([bergson_python, "-c", DRIVER, json.dumps(args)], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                  "TOKENIZERS_PARALLELISM": "false"})
        wall = time.perf_counter() - t0
        if out.returncode:
            raise RuntimeError(f"bergson failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
        times = json.loads(next(x[6:] for x in out.stdout.splitlines() if x.startswith("TIMES ")))
        theirs = read_bergson_scores(run / "scores", N_QUERIES)
        fit = _our_step("fit", folder, work, n, t, b)
        scores = _our_step("scores", folder, work, n, t, b)
        ours = np.load(work / f"scores-{n}.npy").astype(np.float64)
        score_steps = ("query_gradients", "apply", "scores")
        row = {"sequences": n, "tokens": t, "agreement": agreement(ours, theirs),
               "ours": {"fit_cpu_s": fit["cpu_s"], "scores_cpu_s": scores["cpu_s"], "fit_s": fit["seconds"],
                        "scores_s": scores["seconds"], "peak_gb": max(fit["peak_gb"], scores["peak_gb"])},
               "bergson": {"fit_cpu_s": round(times["fit_cpu"], 2),
                           "scores_cpu_s": round(sum(times[k + "_cpu"] for k in score_steps), 2),
                           "fit_s": round(times["fit"], 2), "scores_s": round(sum(times[k] for k in score_steps), 2),
                           "steps_s": {k: round(v, 2) for k, v in times.items() if isinstance(v, float)},
                           "process_s": round(wall, 1), "peak_gb": round(times["peak_gb"], 2),
                           "version": times["version"]},
               "tracked_layers": fit["tracked_layers"]}
        row["fit_speedup"] = round(row["bergson"]["fit_cpu_s"] / row["ours"]["fit_cpu_s"], 2)
        row["scores_speedup"] = round(row["bergson"]["scores_cpu_s"] / row["ours"]["scores_cpu_s"], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def render(results: dict) -> str:
    """The generated section of docs/pretrained.md (a test holds the doc to it)."""
    m, c = results["machine"], results["config"]
    lines = [f"`{results['command']}` — {m['date'][:10]}, {m['cores']} cores, bergson {results['bergson_version']} "
             f"(torch, CPU) and ours (jax {m['jax']}, CPU), load average "
             f"{', '.join(f'{x:.1f}' for x in results['load_start'])} at the start and "
             f"{', '.join(f'{x:.1f}' for x in results['load_end'])} at the end (other jobs shared the machine). "
             f"{c['shape']}-shaped GPT-NeoX, random weights ({results['parameters'] / 1e6:.1f}M parameters), "
             f"windows of {c['tokens']} random tokens, 4 queries, every block's MLP tracked "
             f"({len(results['rows'][0]['tracked_layers'])} layers).", "",
             "| sequences | Pearson per query (median; min) | top-10 overlap (mean) | fit CPU s: bergson / ours "
             "| fit: ours faster by | scores CPU s: bergson / ours | scores: ours faster by | wall s, fit + scores: "
             "bergson / ours |", "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        a, b, o = r["agreement"], r["bergson"], r["ours"]
        lines.append(f"| {r['sequences']} × {r['tokens']} | {a['pearson_median']:.3f}; {min(a['pearson']):.3f} | "
                     f"{a['top10_mean']:.2f} | {b['fit_cpu_s']:.0f} / {o['fit_cpu_s']:.0f} | "
                     f"{r['fit_speedup']:.1f}× | {b['scores_cpu_s']:.0f} / {o['scores_cpu_s']:.0f} | "
                     f"{r['scores_speedup']:.1f}× | {b['fit_s'] + b['scores_s']:.0f} / "
                     f"{o['fit_s'] + o['scores_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bergson-python", help="the Python of a virtual environment with bergson installed")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--smoke", action="store_true", help="a tiny run (seconds), results not written")
    parser.add_argument("--work", help="folder for checkpoints, data and outputs (default: a temporary one)")
    parser.add_argument("--render", metavar="RESULTS", help="print the doc section of a results file")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    if not args.bergson_python:
        parser.error("--bergson-python is required (a venv with `pip install bergson`)")
    import jax

    config = SMOKE if args.smoke else CONFIG
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        rows = compare(config, args.bergson_python, Path(work))
    from benchmarks.pretrained import SHAPES

    s = SHAPES[config["shape"]]
    vocab = config["vocab"] or 50304
    parameters = 2 * vocab * s["d_model"] + s["n_layers"] * (12 * s["d_model"] ** 2)  # approximate, for the caption
    results = {"command": "nice -n 10 python -m benchmarks.pretrained_bergson --bergson-python VENV/bin/python",
               "machine": {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                           "cores": os.cpu_count(), "jax": jax.__version__},
               "bergson_version": rows[0]["bergson"]["version"], "config": config, "parameters": parameters,
               "load_start": [round(x, 2) for x in load_start], "load_end": [round(x, 2) for x in os.getloadavg()],
               "rows": rows}
    print(render(results))
    if not args.smoke:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
