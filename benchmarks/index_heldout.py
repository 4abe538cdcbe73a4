"""The index's compressions on model kinds that did not set its default (issue 28).

Three settings, trained here in seconds, every trackable layer tracked (output heads
included), EK-FAC factors, 256 training rows, 24 held-out queries (reduced sizes: the
development machine is a loaded 2-core box):

* ``mha-char``: two ``nnx.MultiHeadAttention`` blocks (their query/key/value/out
  projections are ``LinearGeneral`` layers), MLPs and head, on 16-character windows of a
  character stream from a fixed random Markov chain over 24 symbols;
* ``digits-cnn``: two ``nnx.Conv`` layers and a linear head on scikit-learn's 8×8 digits;
* ``gpt-char``: ``influence.lm``'s GPT (2 layers, d = 32) on 24-character windows of this
  repository's own docs, the ``lm_head`` tracked.

For each: the rescan's scores (the reference), then indexes built with ``fidelity:0.95:int4``
(chosen from a probe of held-out training rows, :mod:`influence.index.choose`), the
package's old fixed default ``select:0.375:int4``, ``none:int4``, and a bergson-style
baseline: one global count-sketch (a sparse random-sign projection, each coordinate of the
whole gradient to one of m buckets) of the preconditioned query and training gradients,
stored in float16 at the fidelity index's bytes per sequence. Top-10 agreement (mean, least
query) and Pearson against the rescan, and bytes per sequence as a share of the full float32
gradient.

  nice python -m benchmarks.index_heldout                 # all settings -> docs/benchmarks/index-heldout.json
  nice python -m benchmarks.index_heldout --settings gpt-char   # one, the others kept
The section of docs/index.md is rendered from the JSON by ``benchmarks.index.render``
(:func:`render`); tests/index/test_docs.py holds the doc to both JSON files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from scipy.stats import pearsonr

import influence as inf
from influence import testing
from influence.runtime.io import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks" / "index-heldout.json"
N_TRAIN, N_QUERY, TOP = 256, 24, 10
COMPRESSIONS = ("fidelity:0.95:int4", "select:0.375:int4", "none:int4")
QUIET = {"progress": False}


class MHA(nnx.Module):
    """Embeddings, two pre-LayerNorm blocks of ``nnx.MultiHeadAttention`` (causal) + MLP, head."""

    def __init__(self, vocab: int, d: int = 32, heads: int = 2, context: int = 16, *, rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, d)))
        self.ln = nnx.List([nnx.LayerNorm(d, rngs=rngs) for _ in range(5)])
        self.attn = nnx.List([nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs) for _ in range(2)])
        self.up = nnx.List([nnx.Linear(d, 2 * d, rngs=rngs) for _ in range(2)])
        self.down = nnx.List([nnx.Linear(2 * d, d, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, ids):
        t = ids.shape[1]
        x = self.embed(ids) + self.pos[...][:t]
        mask = nnx.make_causal_mask(ids)
        for i in range(2):
            x = x + self.attn[i](self.ln[2 * i](x), mask=mask)
            x = x + self.down[i](jax.nn.gelu(self.up[i](self.ln[2 * i + 1](x))))
        return self.head(self.ln[4](x))


class CNN(nnx.Module):
    """8×8×1 → conv 3×3 (8) → conv 3×3 stride 2 (16) → linear head (10)."""

    def __init__(self, *, rngs):
        self.c1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(8, 16, (3, 3), strides=(2, 2), rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 16, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.c1(x.reshape(-1, 8, 8, 1)))
        x = jax.nn.relu(self.c2(x))
        return self.head(x.reshape(x.shape[0], -1))


def _lm_loss(m, d):
    logits = m(d["input_ids"])[:, :-1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, d["input_ids"][:, 1:])
    mask = d["loss_mask"][:, 1:]
    return jnp.sum(ce * mask) / jnp.sum(mask)


def _windows(ids: np.ndarray, n: int, length: int, seed: int) -> dict[str, np.ndarray]:
    starts = np.random.default_rng(seed).choice(len(ids) - length, n, replace=False)
    windows = np.stack([ids[s:s + length] for s in starts]).astype(np.int32)
    mask = np.ones_like(windows)
    mask[:, 0] = 0
    return {"input_ids": windows, "loss_mask": mask}


def mha_setting():
    vocab, length = 24, 16
    chain = np.random.default_rng(11)
    successors = np.stack([chain.choice(vocab, 3, replace=False) for _ in range(vocab)])
    rng = np.random.default_rng(12)
    stream = np.zeros(20_000, np.int64)
    for t in range(1, len(stream)):
        stream[t] = successors[stream[t - 1], rng.integers(3)]
    data = _windows(stream, N_TRAIN + N_QUERY, length, 13)
    train = {k: v[:N_TRAIN] for k, v in data.items()}
    queries = {k: v[N_TRAIN:] for k, v in data.items()}
    model = MHA(vocab, rngs=nnx.Rngs(3))
    testing.train(model, _lm_loss, train, 150, lr=5e-3)
    return model, inf.tasks.CausalLM(), train, queries


def cnn_setting():
    x, y = testing.digits()
    order = np.random.default_rng(5).permutation(len(x))
    train = {"x": x[order[:N_TRAIN]], "y": y[order[:N_TRAIN]]}
    queries = {"x": x[order[-N_QUERY:]], "y": y[order[-N_QUERY:]]}
    model = CNN(rngs=nnx.Rngs(4))

    def loss(m, d):
        return optax.softmax_cross_entropy_with_integer_labels(m(d["x"]), d["y"]).mean()

    testing.train(model, loss, train, 200, lr=5e-3)
    return model, inf.tasks.Classification(), train, queries


def gpt_setting():
    from influence.lm.model import GPTConfig, init_model

    text = "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], np.int64)
    data = _windows(ids, N_TRAIN + N_QUERY, 24, 17)
    train = {k: v[:N_TRAIN] for k, v in data.items()}
    queries = {k: v[N_TRAIN:] for k, v in data.items()}
    model = init_model(GPTConfig(vocab_size=len(chars), context_length=24, d_model=32, n_layers=2, n_heads=2), seed=6)
    testing.train(model, _lm_loss, train, 150, lr=5e-3)
    return model, inf.tasks.CausalLM(), train, queries


SETTINGS = {"mha-char": mha_setting, "digits-cnn": cnn_setting, "gpt-char": gpt_setting}


def agreement(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per query, the share of the reference's top 10 rows the scores also rank top 10."""
    a = np.argsort(-scores, axis=1, kind="stable")[:, :TOP]
    r = np.argsort(-reference, axis=1, kind="stable")[:, :TOP]
    return np.array([len(set(x) & set(y)) / TOP for x, y in zip(a, r)])


def row(scores: np.ndarray, reference: np.ndarray, bytes_per_sequence: float, full: float) -> dict:
    top = agreement(scores, reference)
    return {"top10": round(float(top.mean()), 4), "least_top10": round(float(top.min()), 2),
            "pearson": round(float(pearsonr(scores.ravel(), reference.ravel())[0]), 4),
            "bytes_per_sequence": round(float(bytes_per_sequence), 1), "share": round(bytes_per_sequence / full, 4)}


def count_sketch(model, task, factors, train, queries, exact_path: Path, m: int, seed: int = 0) -> np.ndarray:
    """Scores ``[Q, N]`` of one global count-sketch of dimension ``m`` (float16) applied to the
    whole preconditioned query gradient and the whole training gradient (bergson's
    one global projection, with a sparse random-sign matrix): the rotated gradients of an
    exact index dot as the raw ones do, so they are sketched instead."""
    from influence.index.score import IndexSource

    index = inf.index.Index(exact_path)
    source = IndexSource(model, task, factors, queries, None, index, None, None, inf.Execution(progress=False))
    keys = np.concatenate([np.asarray(k, np.float64) for k in source.keys], axis=1)  # [Q, D]
    rows = np.concatenate([np.concatenate([np.asarray(d, np.float64) for d, _ in arrays], axis=1)
                           for _, _, arrays in index.chunks(index.n_rows)])  # [N, D]
    rng = np.random.default_rng(seed)
    bucket = rng.integers(0, m, keys.shape[1])
    sign = rng.choice([-1.0, 1.0], keys.shape[1])

    def sketch(x):
        out = np.zeros((x.shape[0], m))
        np.add.at(out.T, bucket, (x * sign).T)
        return out.astype(np.float16).astype(np.float64)

    return sketch(keys) @ sketch(rows).T


def measure(name: str) -> dict:
    t0 = time.perf_counter()
    model, task, train, queries = SETTINGS[name]()
    factors = inf.fit_factors(model, task, train, strategy="ekfac", batch_size=32, **QUIET)
    full = 4.0 * sum(i.d_a * i.d_out for i in factors.layer_infos)
    reference = inf.pairwise_scores(model, task, factors, queries, train, batch_size=32, **QUIET).values
    out = {"layers": len(factors.layer_names), "parameters_tracked": int(full // 4),
           "full_bytes_per_sequence": full, "compressions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for comp in COMPRESSIONS + ("none",):
            index = inf.build_index(model, task, factors, train, path=Path(tmp) / comp.replace(":", "_"),
                                    compression=comp, batch_size=32, **QUIET)
            if comp == "none":
                continue
            scores = inf.pairwise_scores(model, task, factors, queries, None, index=index, **QUIET).values
            out["compressions"][comp] = row(scores, reference, index.bytes_per_sequence, full)
            if index.chosen:
                out["chosen"] = {k: index.chosen[k] for k in ("top10", "least_top10", "reached", "dtype",
                                                               "share_of_full", "probe", "probe_queries",
                                                               "sample_rows")}
                out["chosen"]["layers"] = index.chosen["layers"]
        fid = out["compressions"]["fidelity:0.95:int4"]["bytes_per_sequence"]
        m = max(1, int(fid // 2))  # float16 buckets at the fidelity index's bytes
        sketched = count_sketch(model, task, factors, train, queries, Path(tmp) / "none", m)
        out["compressions"]["count-sketch (bergson-style)"] = row(sketched, reference, 2.0 * m, full)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def render(results: dict) -> list[str]:
    """The section of docs/index.md on these settings (every number from ``results``)."""
    lines = ["## On models that did not set the default", "",
             "The settings above chose the default `select:0.375:int4`. On three model kinds they do not resemble "
             "(`python -m benchmarks.index_heldout`: every trackable layer tracked, output heads included; "
             f"{N_TRAIN} training rows, {N_QUERY} held-out queries, reduced for a loaded machine), "
             "`fidelity:0.95:int4` measures per layer what to keep at build time "
             "(see [api.md](api.md#infbuild_index--infindexindex)); the bergson-style baseline is one global "
             "count-sketch of the whole gradient in float16 at the fidelity index's bytes.", "",
             f"Measured by `{results['command']}` ({results['machine']}; load average {results['load']}: "
             "timings not reported). Top-10 agreement with the rescan (mean over "
             f"{N_QUERY} held-out queries, least query in brackets), Pearson over all pairs, and bytes per "
             "sequence as a share of the full float32 gradient:", "",
             "| setting | layers | " + " | ".join(f"`{c}`" for c in COMPRESSIONS) + " | count-sketch (bergson-style) |",
             "|---|---|" + "---|" * (len(COMPRESSIONS) + 1)]
    for name, s in results["settings"].items():
        cells = []
        for comp in COMPRESSIONS + ("count-sketch (bergson-style)",):
            r = s["compressions"][comp]
            cells.append(f"{r['top10']:.3f} ({r['least_top10']:.1f}), r {r['pearson']:.3f} / {r['share']:.3f}")
        lines.append(f"| {name} | {s['layers']} | " + " | ".join(cells) + " |")
    rows = {name: s["compressions"]["fidelity:0.95:int4"] for name, s in results["settings"].items()}
    met = [n for n, r in rows.items() if r["top10"] >= 0.95 and r["share"] <= 1 / 16]
    missed = ", ".join(f"{n} (top-10 {r['top10']:.3f} at {r['share']:.3f})" for n, r in rows.items() if n not in met)
    lines += ["", f"The issue's bar (top-10 ≥ 0.95 within 1/16 of the full bytes) holds for `fidelity:0.95:int4` on "
              f"{len(met)} of {len(rows)} settings" + (f"; not on {missed}." if missed else ".")]
    lines += ["", "What the fidelity choice measured on its own probe (held-out training rows) at build time:", ""]
    for name, s in results["settings"].items():
        c = s["chosen"]
        lines.append(f"* {name}: top-10 {c['top10']:.3f} (least {c['least_top10']:.1f}), "
                     f"{'reached' if c['reached'] else 'not reached'} in {c['dtype']}, {c['share_of_full']:.3f} "
                     "of the full bytes")
    return lines + [""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"settings": {}}
    for name in args.settings:
        results["settings"][name] = measure(name)
        results["settings"] = {k: results["settings"][k] for k in SETTINGS if k in results["settings"]}
        results.update(command="nice python -m benchmarks.index_heldout", machine=platform.machine() + ", "
                       + f"{os.cpu_count()} CPUs, jax {jax.__version__}", load=round(os.getloadavg()[0], 1))
        atomic_write_json(args.out, results)
    print(f"wrote {args.out}; docs/index.md: python -c 'import benchmarks.index as b, json; "
          "b.DOC.write_text(b.render(json.loads(b.OUT.read_text())))'")


if __name__ == "__main__":
    main()
