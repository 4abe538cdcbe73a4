"""The persistent compilation cache: a second process loads what the first compiled.

Each check runs in fresh interpreters (the cache is process-wide JAX state) with the
cache in a temporary folder, never the user's home.
"""

import json
import os
import subprocess
import sys

import pytest

# Compile a pairwise-scores call of a tiny MLP and count the cache's hits and misses.
SCRIPT = """
import json, sys
import jax
import jax.monitoring
import numpy as np
from flax import nnx
import influence as inf
from influence.testing import MLP

events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
if sys.argv[1] == "on":
    folder = inf.enable_compilation_cache(sys.argv[2])
    assert str(folder) == sys.argv[2], folder
model = MLP(d_in=4, hidden=3, d_out=2, rngs=nnx.Rngs(0))
rng = np.random.default_rng(0)
data = {"x": rng.normal(size=(12, 4)).astype(np.float32), "y": rng.integers(0, 2, 12)}
task = inf.tasks.Classification()
factors = inf.fit_factors(model, task, data, progress=False, batch_size=4)
inf.pairwise_scores(model, task, factors, data, data, progress=False, batch_size=4)
print(json.dumps({"hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _run(*args, env=None):
    out = subprocess.run([sys.executable, "-c", SCRIPT, *args], check=True, capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


# default-suite time; test_the_cli_enables_the_cache_in_its_folder_unless_told_not_to stays
@pytest.mark.slow
def test_a_second_process_loads_every_step_from_the_cache(tmp_path):
    folder = tmp_path / "jax-cache"
    first = _run("on", str(folder))
    assert first["misses"] > 0 and first["hits"] == 0
    written = list(folder.iterdir())
    assert written  # small, quick kernels are kept too (no size or compile-time threshold)
    second = _run("on", str(folder))
    assert second["misses"] == 0 and second["hits"] == first["misses"]
    off = _run("off", "")
    assert off["hits"] == 0 and len(list(folder.iterdir())) == len(written)


def test_the_cli_enables_the_cache_in_its_folder_unless_told_not_to(tmp_path):
    """``influence fit`` on a missing run fails fast, after turning the cache on (the folder
    is made) — or not, with INFLUENCE_COMPILATION_CACHE=0 or --no-cache."""
    def cli(folder, *flags, switch="1"):
        env = {**os.environ, "INFLUENCE_CACHE_DIR": str(folder), "INFLUENCE_COMPILATION_CACHE": switch}
        subprocess.run([sys.executable, "-m", "influence", *flags, "fit", "--run", str(tmp_path / "no-run")],
                       env=env, capture_output=True, text=True)
        return folder.exists()

    assert cli(tmp_path / "on")
    assert not cli(tmp_path / "off", switch="0")
    assert not cli(tmp_path / "flag", "--no-cache")
