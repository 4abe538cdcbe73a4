"""One tiny trained run for the command-line tests, trained once per test session and
shared by the pytest-xdist workers (a file lock in the session's common temporary folder):
a test module that writes into a run (fits factors, overwrites weights) copies it first.

The run trains on the first scenes of Macbeth, not the whole play: the commands fit
factors on, and score, every training sequence of a run, so the whole play (~1,100
sequences) made each fit and query of these tests several times slower without testing
anything more (the commands' code paths do not depend on the number of sequences)."""

from __future__ import annotations

import os
import shutil

import pytest
from filelock import FileLock

SCENES = 6
"""Macbeth's first six scenes (~19k characters, ~200 sequences of 32 tokens)."""


def macbeth_scenes():
    from influence.lm.corpus import load_corpus

    return load_corpus("shakespeare:macbeth")[:SCENES]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A finished tiny run (``tests.lm.helpers.tiny_config``: 48 steps, a checkpoint every 8)
    on :func:`macbeth_scenes`. Read it only; copy it to write into it."""
    from influence.lm import Trainer
    from tests.lm.helpers import tiny_config

    # Under xdist each worker has its own base folder; their parent is the session's.
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "cli-trained-run"
    with FileLock(str(root / "cli-trained-run.lock")):
        if not (out / "trained").exists():
            shutil.rmtree(out, ignore_errors=True)
            Trainer(tiny_config(corpus="shakespeare:macbeth"), out, macbeth_scenes()).run(progress=False)
            (out / "trained").write_text("")  # written last: a run stopped half-way is trained again
    return out
