"""The index scan's decoding block size: stored bytes per second of ``_chunk_scores``.

The scan decodes stored rows to float32 a block at a time before each product
(``influence.index.source.BLOCK_BYTES``). This times one chunk of synthetic stored rows
(random numbers of the given dtype, widths like a ``small`` ladder run's
``select:0.375:int4`` index by default) at several block sizes and a whole-chunk decode,
at 1 and 32 queries, and prints the stored bytes scanned per second of each, measured in
one process. Nothing is written; the rates depend on the machine's caches.

  python -m benchmarks.index_scan
  python -m benchmarks.index_scan --dtype int8 --widths 65664,65664 --rows 512
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from influence.index import source
from influence.index.compress import encode_numpy

SMALL_WIDTHS = "35339,22949,21186,24836,21713,22153"
"""Per-layer coordinates a ``select:0.375:int4`` index keeps on the v2 ``small`` run."""


def rate(chunk, keys, dtype: str, block_bytes: int, repeats: int) -> float:
    """Stored bytes per second of scoring ``chunk`` against ``keys`` with ``block_bytes``."""
    source.BLOCK_BYTES = block_bytes
    jax.clear_caches()  # the block size is read when the scan is traced

    def run():
        return source._chunk_scores(keys, chunk, dtype=dtype, keep_layers=False, shapes=(None,) * len(keys))

    run().block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        run().block_until_ready()
    seconds = (time.perf_counter() - t0) / repeats
    return sum(part.nbytes for layer in chunk for part in layer) / seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="int4", choices=("int4", "int8", "bfloat16", "float32"))
    parser.add_argument("--widths", default=SMALL_WIDTHS, help="numbers stored per row, per layer")
    parser.add_argument("--rows", type=int, default=905, help="rows in the chunk (default: a 64 MiB chunk's)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    rng = np.random.default_rng(0)
    chunk = tuple(tuple(jnp.asarray(p) for p in encode_numpy(rng.standard_normal((args.rows, w)), args.dtype))
                  for w in widths)
    default = source.BLOCK_BYTES
    whole = 4 * args.rows * max(2 * -(-w // 2) for w in widths)  # one block: the whole chunk decoded at once
    print(f"{args.rows} rows of {args.dtype}, widths {widths}; jax {jax.__version__} {jax.devices()[0].platform}")
    print("block (MiB of float32) | 1 query (GB/s stored) | 32 queries (GB/s stored)")
    for block in (1 << 21, 1 << 22, 1 << 23, 1 << 24, 1 << 25, whole):
        rates = [rate(chunk, tuple(jnp.asarray(rng.standard_normal((q, w)), jnp.float32) for w in widths), args.dtype,
                      block, args.repeats) for q in (1, 32)]
        label = f"{block / 2**20:.0f}" + (" (the default)" if block == default else "")
        label += " (whole chunk)" if block == whole else ""
        print(f"{label:>22s} | {rates[0] / 1e9:21.2f} | {rates[1] / 1e9:24.2f}", flush=True)
    source.BLOCK_BYTES = default


if __name__ == "__main__":
    main()
