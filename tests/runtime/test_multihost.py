"""Two processes on this machine, joined by ``jax.distributed`` (CPU, gloo collectives),
stand in for two hosts: they fit factors together, resume an interrupted joint fit, and
score their own shards; their merged parts equal one process's results on all the data.
The processes are ``tests/multihost_worker.py``."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import influence as inf
from influence import tasks
from influence.scoring.ranking import rank_training
from influence.testing import trained_mlp

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out: Path) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    port = str(_free_port())
    logs = [open(out / f"worker-{i}.log", "w") for i in (0, 1)]
    worker = str(ROOT / "tests" / "runtime" / "multihost_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(i), port, str(out)],
                              cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in (0, 1)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    report = "\n".join(f"--- worker {i}\n" + (out / f"worker-{i}.log").read_text()[-3000:] for i in (0, 1))
    assert codes == [0, 0], report


@pytest.mark.slow  # two JAX processes compiling the same steps: about a minute on 2 cores
def test_two_processes_fit_together_and_merge_their_parts(tmp_path):
    _run_workers(tmp_path)
    model, data, queries = trained_mlp()
    task = tasks.Classification()
    # A global batch of 16 is host 0's next 8 rows, then host 1's (rows 128 on).
    n, local = len(data["x"]), 8
    order = np.concatenate([np.r_[i * local:(i + 1) * local, n // 2 + i * local:n // 2 + (i + 1) * local]
                            for i in range(n // 2 // local)])
    reference = inf.fit_factors(model, task, {k: v[order] for k, v in data.items()}, strategy="ekfac",
                                batch_size=2 * local, progress=False)
    fitted = [inf.Factors.load(tmp_path / f"factors-{i}.npz") for i in (0, 1)]
    resumed = [inf.Factors.load(tmp_path / f"resumed-{i}.npz") for i in (0, 1)]
    assert fitted[0].metadata["mesh"] == {"axes": {"data": 4}, "platform": "cpu", "process_count": 2}
    assert fitted[0].metadata["n_examples"] == n
    for name, want in reference.layers.items():
        for got in fitted + resumed:  # both processes hold the same factors; resuming changes nothing
            for field in want._fields:
                np.testing.assert_array_equal(getattr(got.layers[name], field), getattr(fitted[0].layers[name], field))
        got = fitted[0].layers[name]
        for field in ("eigenvalues", "a_eigenvalues", "s_eigenvalues"):
            a, b = getattr(got, field), getattr(want, field)
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), (name, field)

    # Sampled targets are keyed by global row (host 1's rows follow host 0's): one process on
    # all the data, in its own order and batching, draws the same targets.
    sampled = inf.fit_factors(model, task, data, strategy="ekfac", fisher="sampled", batch_size=2 * local,
                              progress=False)
    for i in (0, 1):
        got = inf.Factors.load(tmp_path / f"sampled-{i}.npz")
        assert got.metadata["sample_rows"] == "global row (the processes' rows in process order)"
        for name, want in sampled.layers.items():
            a, b = got.layers[name].eigenvalues, want.eigenvalues
            assert np.abs(a - b).max() <= 5e-5 * np.abs(b).max(), name  # summed in another order

    factors = fitted[0]
    full = rank_training(model, task, factors, queries, data, k=5, batch_size=8, progress=False)
    indices, scores = inf.hosts.merge_rankings(tmp_path / "parts", out=tmp_path / "topk.npz",
                                               scores_path=tmp_path / "all.npy")
    np.testing.assert_array_equal(indices, full.indices)
    np.testing.assert_array_equal(scores, full.scores)
    pairwise = inf.pairwise_scores(model, task, factors, queries, data, batch_size=8, progress=False, per_layer=True)
    np.testing.assert_array_equal(np.load(tmp_path / "all.npy"), pairwise.values)
    merged = inf.hosts.merge_scores(tmp_path / "score-parts")
    np.testing.assert_array_equal(merged.values, pairwise.values)
    np.testing.assert_array_equal(merged.per_layer["l1"], pairwise.per_layer["l1"])
    assert merged.metadata["n_train"] == n
