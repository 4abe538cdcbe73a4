"""Influence on Pythia-shaped checkpoints (random weights, written and loaded in the Hugging
Face format): EK-FAC fit and pairwise scoring as multiples of one forward+backward pass over
the same sequences, and peak memory.

  nice -n 10 python -m benchmarks.pretrained                       # writes docs/benchmarks/pretrained.json
  python -m benchmarks.pretrained --render docs/benchmarks/pretrained.json   # its section of docs/pretrained.md
  python -m benchmarks.pretrained --config gpu --out gpu.json       # 410M and 1B shapes (prepared, see below)

Each shape runs in its own process (so its peak resident memory is its own):

1. a random-weight model of the shape is written with ``influence.pretrained.save_pretrained``
   and loaded back with ``influence.pretrained.load`` (the path a user's checkpoint takes);
2. ``N`` random token sequences of ``T`` tokens are the training data, 4 more the queries;
3. **forward+backward**: a jitted gradient of the summed next-token loss with respect to
   every parameter, over the ``N`` sequences in batches of ``--batch-size``; best of two
   passes after a compiling one;
4. **fit**: ``fit_factors`` (EK-FAC, sampled Fisher: two passes) on the tracked layers;
5. **scores**: ``pairwise_scores`` of the 4 queries against the ``N`` sequences.

Fit and scores are timed as a user meets them, compilation included, so at these small
``N`` the fixed costs (compiling, the eigendecompositions of the tracked layers' factors)
weigh far more than they would on the issue's 2k–8k sequences. ``ru_maxrss`` after each
step is the process's peak resident memory so far.

The ``cpu`` config is REDUCED to what a 2-core machine shared with other jobs runs in a few
minutes: few sequences, 128 tokens, only block 0's MLP tracked. The ``gpu`` config (Pythia
410M and 1B shapes, 2,048 sequences of 512 tokens, every MLP tracked) is prepared for one
accelerator but has not been run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "pretrained.json"

# Pythia's shapes (GPT-NeoX: parallel residual, rotary on 25% of each head, untied head).
SHAPES = {
    "pythia-70m": {"d_model": 512, "n_layers": 6, "n_heads": 8, "d_mlp": 2048},
    "pythia-160m": {"d_model": 768, "n_layers": 12, "n_heads": 12, "d_mlp": 3072},
    "pythia-410m": {"d_model": 1024, "n_layers": 24, "n_heads": 16, "d_mlp": 4096},
    "pythia-1b": {"d_model": 2048, "n_layers": 16, "n_heads": 8, "d_mlp": 8192},
}
VOCAB = 50304
CONFIGS = {
    # (shape, sequences, tokens per sequence, batch size, layers)
    "cpu": [("pythia-70m", 8, 128, 4, r"blocks\.0\.mlp"), ("pythia-160m", 4, 128, 2, r"blocks\.0\.mlp")],
    "gpu": [("pythia-410m", 2048, 512, 16, "mlp"), ("pythia-1b", 2048, 512, 8, "mlp")],
    "smoke": [("pythia-70m", 4, 16, 2, r"blocks\.0\.mlp")],  # the test's: seconds
}


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def measure(shape: str, n: int, t: int, batch_size: int, layers: str, shrink_vocab: int | None = None) -> dict:
    """One shape's row (runs in the calling process)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import influence as inf
    import influence.pretrained as hf
    from influence.tasks import CausalLM

    vocab = shrink_vocab or VOCAB
    s = SHAPES[shape]
    arch = hf.ArchConfig(family="neox", model_type="gpt_neox", vocab_size=vocab, d_model=s["d_model"],
                         n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_heads"],
                         head_dim=s["d_model"] // s["n_heads"], d_mlp=s["d_mlp"], context_length=2048,
                         norm="layernorm", norm_eps=1e-5, activation="gelu", gated_mlp=False, parallel_residual=True,
                         tied_embeddings=False, qkv_bias=True, o_bias=True, mlp_bias=True,
                         rotary_dim=(s["d_model"] // s["n_heads"]) // 4, rope_theta=10000.0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        hf.save_pretrained(hf.PretrainedLM(arch, rngs=nnx.Rngs(0)), tmp)
        model, _ = hf.load_model(tmp)
        load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(n + 4, t), dtype=np.int32)
    train = {"input_ids": ids[:n], "loss_mask": np.ones((n, t), np.int32)}
    queries = {"input_ids": ids[n:], "loss_mask": np.ones((4, t), np.int32)}
    task = CausalLM()
    graphdef, params = nnx.split(model)

    @jax.jit
    def grad_step(params, batch):
        def loss(p):
            return task.loss(nnx.merge(graphdef, p), batch).sum()

        return jax.grad(loss)(params)

    def pass_over() -> float:
        t0 = time.perf_counter()
        for i in range(0, n, batch_size):
            batch = {k: jnp.asarray(v[i:i + batch_size]) for k, v in train.items()}
            jax.block_until_ready(grad_step(params, batch))
        return time.perf_counter() - t0

    first_fb = pass_over()
    fb = min(pass_over(), pass_over())
    peak_fb = _peak_gb()
    t0 = time.perf_counter()
    warnings.simplefilter("ignore", inf.UntrackedParametersWarning)  # intended: only `layers` are tracked
    factors = inf.fit_factors(model, task, train, layers=layers, batch_size=batch_size, progress=False)
    fit_s = time.perf_counter() - t0
    peak_fit = _peak_gb()
    t0 = time.perf_counter()
    scores = inf.pairwise_scores(model, task, factors, queries, train, batch_size=batch_size, progress=False)
    score_s = time.perf_counter() - t0
    peak_score = _peak_gb()
    assert np.isfinite(np.asarray(scores.values)).all()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    tracked = sum(int(np.prod(x.shape)) for name in factors.layer_names
                  for x in (factors.layers[name].q_a, factors.layers[name].q_s))
    return {"shape": shape, "parameters": n_params, "vocab": vocab, "sequences": n, "tokens": t,
            "batch_size": batch_size, "layers": layers, "tracked_layers": list(factors.layer_names),
            "factor_entries": tracked, "write_and_load_s": round(load_s, 2),
            "forward_backward_s": round(fb, 3), "forward_backward_first_s": round(first_fb, 2),
            "fit_s": round(fit_s, 2), "scores_s": round(score_s, 2),
            "fit_x": round(fit_s / fb, 2), "scores_x": round(score_s / fb, 2),
            "peak_gb_after_forward_backward": round(peak_fb, 2), "peak_gb_after_fit": round(peak_fit, 2),
            "peak_gb_after_scores": round(peak_score, 2), "device": str(jax.devices()[0].platform)}


def render(results: dict) -> str:
    """The generated section of docs/pretrained.md (a test holds the doc to it)."""
    m = results["machine"]
    lines = [f"`{results['command']}` — {m['date'][:10]}, {m['cores']} cores, jax {m['jax']} on {m['device']}, "
             f"load average {', '.join(f'{x:.1f}' for x in results['load_start'])} at the start and "
             f"{', '.join(f'{x:.1f}' for x in results['load_end'])} at the end (1, 5, 15 min; other jobs shared the "
             "machine). Random weights, Pythia shapes, REDUCED sizes (above); fit and scores include compilation "
             "and the eigendecompositions.", "",
             "| shape | parameters | data | tracked | forward+backward (s) | fit (s) | fit ÷ f+b | scores (s) "
             "| scores ÷ f+b | peak after f+b / fit / scores (GB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['shape']} | {r['parameters'] / 1e6:.0f}M | {r['sequences']} × {r['tokens']} tokens | "
                     f"{', '.join(r['tracked_layers'])} | {r['forward_backward_s']:.2f} | {r['fit_s']:.1f} | "
                     f"{r['fit_x']:.1f}× | {r['scores_s']:.1f} | {r['scores_x']:.1f}× | "
                     f"{r['peak_gb_after_forward_backward']:.1f} / {r['peak_gb_after_fit']:.1f} / "
                     f"{r['peak_gb_after_scores']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--render", metavar="RESULTS", help="print the doc section of a results file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one row as JSON
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    if args.one:
        shape, n, t, b, layers, vocab = json.loads(args.one)
        print("ROW " + json.dumps(measure(shape, n, t, b, layers, vocab)))
        return 0
    import jax

    load_start = os.getloadavg()
    rows = []
    for shape, n, t, b, layers in CONFIGS[args.config]:
        vocab = 512 if args.config == "smoke" else None
        out = subprocess.run([sys.executable, "-m", "benchmarks.pretrained", "--one",
                              json.dumps([shape, n, t, b, layers, vocab])], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(next(line[4:] for line in out.stdout.splitlines() if line.startswith("ROW "))))
        print(json.dumps(rows[-1]))
    results = {"command": f"nice -n 10 python -m benchmarks.pretrained --config {args.config}",
               "machine": {"date": datetime.datetime.now(datetime.UTC).isoformat(), "cores": os.cpu_count(),
                           "processor": platform.processor() or platform.machine(), "jax": jax.__version__,
                           "device": rows[0]["device"]},
               "load_start": [round(x, 2) for x in load_start], "load_end": [round(x, 2) for x in os.getloadavg()],
               "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
