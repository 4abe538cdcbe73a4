"""Scaling: speed-up with the number of devices, and memory per layer against its width.

  python -m benchmarks.scaling                       # every part, 4 forced CPU devices here
  python -m benchmarks.scaling --part speed --devices 1 2 4 8
  python -m benchmarks.scaling --part memory --widths 256 512 1024 2048 4096
  python -m benchmarks.scaling --part plan           # analytic memory of a transformer's MLP layers

Speed: a transformer LM (``--d`` wide, ``--context`` tokens, random weights: timing
only) is fitted with EK-FAC and its training set scored against ``--queries`` queries,
on meshes of 1, 2, 4… devices of this one process, after a warm-up run that compiles.
On CPU the devices are forced host devices (``--xla_force_host_platform_device_count``),
which share the machine's cores, so the speed-up is bounded by the core count; on a
multi-GPU host the same command measures the GPUs.

Memory: what one dense layer of width d (``d_in = d_out = d``) costs, analytically
(float32 accumulators per device, float64 eigendecomposition on the host, factors and
preconditioned queries while scoring), and measured: the peak resident memory of a fresh
process that fits EK-FAC on a one-layer model of that width, less that of width 64.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("speed", "memory", "plan", "all"), default="all")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--d", type=int, default=128, help="LM width (speed part)")
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--n-train", type=int, default=1024)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 4], help="block counts for the memory part")
    p.add_argument("--measure-one", type=int, nargs=2, metavar=("WIDTH", "BLOCKS"), help=argparse.SUPPRESS)
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.measure_one is None:
    # The device count is fixed when JAX starts: ask for enough host devices first.
    flag = f"--xla_force_host_platform_device_count={max(ARGS.devices)}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import influence as inf  # noqa: E402
from influence.testing import TinyLM, lm_sequences  # noqa: E402

MIB = 2**20


def speed(args) -> None:
    available = len(jax.local_devices())
    counts = [n for n in args.devices if n <= available]
    model = TinyLM(vocab=64, d=args.d, heads=4, context=args.context, rngs=nnx.Rngs(0))
    task = inf.tasks.CausalLM()
    train = lm_sequences(args.n_train, length=args.context, vocab=64)
    queries = lm_sequences(args.queries, length=args.context, vocab=64, seed=1)
    print(f"\n## Speed-up with devices ({jax.local_devices()[0].platform}, {available} devices in this process)")
    print(f"TinyLM d={args.d}, context {args.context}, {args.n_train} training sequences, {args.queries} queries, "
          f"batch {args.batch_size}, EK-FAC, best of {args.repeats} (round-robin) after a warm-up\n")
    print("| devices | fit (s) | speed-up | pairwise scores (s) | speed-up |")
    print("|---|---|---|---|---|")
    runs = {}
    for n in counts:
        factors = inf.fit_factors(model, task, train, strategy="ekfac", batch_size=args.batch_size, progress=False,
                                  mesh=n)  # compiles
        inf.pairwise_scores(model, task, factors, queries, train, batch_size=args.batch_size, progress=False, mesh=n)
        runs[n] = factors
    best = {n: [np.inf, np.inf] for n in counts}
    # Round-robin over the device counts, so that a busy spell on a shared machine does
    # not fall on one count only; the best time of each is kept.
    for _ in range(args.repeats):
        for n in counts:
            t0 = time.perf_counter()
            inf.fit_factors(model, task, train, strategy="ekfac", batch_size=args.batch_size, progress=False, mesh=n)
            t1 = time.perf_counter()
            inf.pairwise_scores(model, task, runs[n], queries, train, batch_size=args.batch_size, progress=False,
                                mesh=n)
            t2 = time.perf_counter()
            best[n] = [min(best[n][0], t1 - t0), min(best[n][1], t2 - t1)]
    base = best[counts[0]]
    for n in counts:
        t_fit, t_score = best[n]
        print(f"| {n} | {t_fit:.2f} | {base[0] / t_fit:.2f} | {t_score:.2f} | {base[1] / t_score:.2f} |")


def analytic(d_in: int, d_out: int, blocks: int = 1, *, queries: int = 32, rank: int | None = None,
             factor_bytes: int = 4) -> dict:
    """Bytes for one dense layer ``[d_in (+1 bias), d_out]`` split into ``blocks`` × ``blocks``.

    fit_device: the larger of the covariance pass (float32 A and S slots) and the
    eigenvalue pass (rotations in ``factor_bytes`` plus the float32 Λ slot), per device;
    per-example gradient chunks (≤ 256 MiB) and the model's activations come on top.
    fit_host: the eigendecomposition of the largest block, one at a time (its float64
    copy, the symmetrised copy LAPACK works in, eigenvectors and divide-and-conquer work,
    ≈ 5 m² float64).
    factors: the fitted Q_A, Q_S, Λ. queries: ``queries`` preconditioned query gradients,
    full or rank-``rank``."""
    d_a = d_in + 1
    ma, ms = -(-d_a // blocks), -(-d_out // blocks)
    a_sq, s_sq = blocks * ma * ma, blocks * ms * ms  # Σ of the diagonal blocks' sizes (upper bound)
    fit_device = max(4 * (a_sq + s_sq), factor_bytes * (a_sq + s_sq) + 4 * d_a * d_out)
    fit_host = 8 * 5 * max(ma, ms) ** 2
    factors = factor_bytes * (a_sq + s_sq + d_a * d_out)
    q = 4 * queries * (d_a * d_out if rank is None else rank * (d_a + d_out))
    return {"fit_device": fit_device, "fit_host": fit_host, "factors": factors, "queries": q}


def plan(args) -> None:
    """The memory of a transformer block's largest layers (the MLP's d → 4d and 4d → d,
    which cost the same to a bias row) by width."""
    gib = 2**30
    print("\n## A transformer's MLP layer (d → 4d, or 4d → d), per layer, GiB, analytic")
    print("float32 accumulators; fit/host = float64 eigendecompositions; 32 queries; bf16 = factor_dtype='bfloat16'\n")
    print("| d_model | blocks | fit/device | fit/host | factors f32 | factors bf16 | "
          "32 queries full | 32 queries rank 32 |")
    print("|---|---|---|---|---|---|---|---|")
    for d in (1024, 2048, 4096, 8192, 16384):
        for blocks in (1, 4, 16):
            a = analytic(d, 4 * d, blocks)
            bf = analytic(d, 4 * d, blocks, factor_bytes=2)
            low = analytic(d, 4 * d, blocks, rank=32)
            print(f"| {d} | {blocks} | {a['fit_device'] / gib:.2f} | {a['fit_host'] / gib:.2f} | "
                  f"{a['factors'] / gib:.2f} | {bf['factors'] / gib:.2f} | {a['queries'] / gib:.1f} | "
                  f"{low['queries'] / gib:.3f} |")


class _OneLayer(nnx.Module):
    def __init__(self, width: int, rngs):
        self.linear = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)


def _peak_rss() -> int:
    """This process's peak resident memory in bytes. VmHWM, not getrusage's ru_maxrss,
    which Linux carries over from the parent across fork and exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: a bound


def measure_one(width: int, blocks: int) -> None:
    """In a fresh process: peak resident memory of an EK-FAC fit of a one-layer model."""
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(64, width)).astype(np.float32), "y": rng.normal(size=(64, width)).astype(np.float32)}
    model = _OneLayer(width, nnx.Rngs(0))
    t0 = time.perf_counter()
    inf.fit_factors(model, inf.tasks.Regression(), data, strategy="ekfac", fisher="empirical", batch_size=32,
                    progress=False, blocks=blocks)
    peak = _peak_rss()
    device = jax.local_devices()[0].memory_stats() or {}
    print(f"{peak} {device.get('peak_bytes_in_use', -1)} {time.perf_counter() - t0:.2f}")


def _measured(width: int, blocks: int) -> tuple[float, float, float]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--measure-one", str(width), str(blocks)],
                         capture_output=True, text=True, env=env, check=True).stdout.split()
    return float(out[0]), float(out[1]), float(out[2])


def memory(args) -> None:
    print("\n## Memory per layer (d_in = d_out = width, with bias), MiB")
    print("Analytic: per-device accumulators while fitting (float32), host memory of the float64")
    print("eigendecompositions, fitted factors (float32), 32 full-rank preconditioned queries.")
    print("Measured: peak RSS of a fresh process fitting EK-FAC on that one layer, less the same at width 64;")
    print("'device' is the accelerator's peak bytes in use (CPU: not reported).\n")
    print("| width | blocks | fit/device | fit/host | factors | queries (32) | measured RSS | device peak | fit (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    base_rss, _, _ = _measured(64, 1)
    for width in args.widths:
        for blocks in args.blocks:
            a = analytic(width, width, blocks)
            rss, device, seconds = _measured(width, blocks)
            dev = f"{device / MIB:.1f}" if device >= 0 else "—"
            print(f"| {width} | {blocks} | {a['fit_device'] / MIB:.1f} | {a['fit_host'] / MIB:.1f} | "
                  f"{a['factors'] / MIB:.1f} | {a['queries'] / MIB:.1f} | {(rss - base_rss) / MIB:.1f} | "
                  f"{dev} | {seconds:.2f} |")


def main() -> None:
    args = ARGS
    if args.measure_one is not None:
        measure_one(*args.measure_one)
        return
    print(f"# benchmarks.scaling — {platform.node()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
    print("command: python -m benchmarks.scaling " + " ".join(sys.argv[1:]))
    if args.part in ("speed", "all"):
        speed(args)
    if args.part in ("memory", "all"):
        memory(args)
    if args.part in ("plan", "all"):
        plan(args)


if __name__ == "__main__":
    main()
