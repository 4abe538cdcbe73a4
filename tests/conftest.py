"""Shared test setup: no network, deterministic CPU runs."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI turns on the persistent compilation cache: never in the user's home from the tests
# (tests/runtime/test_compilation.py turns it on in temporary folders).
os.environ.setdefault("INFLUENCE_COMPILATION_CACHE", "0")
