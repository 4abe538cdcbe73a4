"""Sharded fitting and scoring on four forced CPU host devices, in a separate process.

The device count of a JAX process is fixed when JAX starts, and this process keeps its
single default device; so ``tests/runtime/multidevice/check_sharding.py`` runs in a pytest of its
own with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.early  # about a minute: started first so that it does not end the run alone
def test_sharded_checks_on_four_host_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "python_files=check_*.py",
         "tests/runtime/multidevice"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and "skipped" not in result.stdout, report
