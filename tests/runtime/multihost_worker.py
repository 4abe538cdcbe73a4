"""One of the two processes of ``tests/runtime/test_multihost.py``: ``jax.distributed`` on CPU.

Usage: python tests/runtime/multihost_worker.py PROCESS_ID PORT OUT_DIR. Two host devices per
process (four in all), gloo collectives. Writes, under OUT_DIR: the factors fitted
across both processes (``factors-<pid>.npz``, one per process: they must be equal), the
factors of an interrupted and resumed fit (``resumed-<pid>.npz``), a sampled-Fisher fit
(``sampled-<pid>.npz``), each host's ranking
and scores parts (``parts/``, ``score-parts/``, ``all-<pid>.npy``).
"""

import sys
from pathlib import Path

import jax

process_id, port, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                           initialization_timeout=120)

import influence as inf  # noqa: E402
from influence import tasks  # noqa: E402
from influence.scoring.ranking import rank_training  # noqa: E402
from influence.testing import trained_mlp  # noqa: E402

GLOBAL_BATCH = 16
INTERRUPT_AT = 5  # local batches read before the first attempt of the resumed fit fails


class Interrupted(RuntimeError):
    pass


def interrupted_once(part, batch):
    """Batches of ``part``; the first pass over them fails after ``INTERRUPT_AT`` batches."""
    calls = []

    def batches():
        calls.append(1)
        n = len(part["x"])
        for i, lo in enumerate(range(0, n, batch)):
            if len(calls) == 1 and i == INTERRUPT_AT:
                raise Interrupted("simulated failure")
            yield {k: v[lo:lo + batch] for k, v in part.items()}

    return batches


model, data, queries = trained_mlp()
task = tasks.Classification()
part, offset = inf.hosts.host_shard(data)
mesh = jax.make_mesh((jax.device_count(),), ("data",))
factors = inf.fit_factors(model, task, part, strategy="ekfac", mesh=mesh, batch_size=GLOBAL_BATCH, progress=False)
factors.save(out / f"factors-{process_id}.npz")
# The sampled Fisher keys each example by its global row: the same draws as one process on all the data.
inf.fit_factors(model, task, part, strategy="ekfac", fisher="sampled", mesh=mesh, batch_size=GLOBAL_BATCH,
                progress=False).save(out / f"sampled-{process_id}.npz")

stream = interrupted_once(part, GLOBAL_BATCH // 2)
settings = dict(strategy="ekfac", mesh=mesh, batch_size=GLOBAL_BATCH, progress=False, checkpoint_dir=out / "ckpt",
                checkpoint_every=3)
try:
    inf.fit_factors(model, task, stream, **settings)
    raise AssertionError("the first attempt should have been interrupted")
except Interrupted:
    pass
inf.fit_factors(model, task, stream, **settings).save(out / f"resumed-{process_id}.npz")

local = jax.local_devices()
ranking = rank_training(model, task, factors, queries, part, k=5, batch_size=8, mesh=local, progress=False,
                        scores_path=out / f"all-{process_id}.npy")
inf.hosts.save_ranking_part(out / "parts", ranking, offset, scores_file=out / f"all-{process_id}.npy")
scores = inf.pairwise_scores(model, task, factors, queries, part, batch_size=8, mesh=local, progress=False,
                             per_layer=True)
inf.hosts.save_scores_part(out / "score-parts", scores, offset)
jax.distributed.shutdown()
print("worker", process_id, "done")
