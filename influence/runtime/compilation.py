"""Compile once per machine: JAX's persistent compilation cache, in one documented place.

Every jitted step of the library (a fit's passes, query gradients, scoring, ranking) is
compiled by XLA on its first call in a process: seconds per step on a CPU, paid again by
every new process. :func:`enable_compilation_cache` points JAX's persistent cache at a
folder, so a second process (a second ``influence query``, a re-run script) loads the
executables of the same shapes instead of compiling them (tracing is still paid: it is
Python). The CLI turns it on for every command (``--no-cache`` or
``INFLUENCE_COMPILATION_CACHE=0`` turns it off); a library user calls it once::

    import influence as inf
    inf.enable_compilation_cache()  # ~/.cache/influence/jax, or $INFLUENCE_CACHE_DIR

The cache is trusted code: keep it in a folder only you can write to (JAX's warning).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

CACHE_DIR_ENV = "INFLUENCE_CACHE_DIR"
"""Environment variable naming the default cache folder."""

CACHE_SWITCH_ENV = "INFLUENCE_COMPILATION_CACHE"
"""Environment variable: ``0``, ``false``, ``no`` or ``off`` keeps the CLI from enabling the cache."""


def default_cache_dir() -> Path:
    """``$INFLUENCE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/influence/jax`` (default
    ``~/.cache/influence/jax``)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "influence" / "jax"


def cache_enabled_by_environment() -> bool:
    """``False`` when ``INFLUENCE_COMPILATION_CACHE`` says off (the CLI then leaves the cache off)."""
    return os.environ.get(CACHE_SWITCH_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Save every compiled executable of this process in ``path`` and load it from there
    in later processes (default :func:`default_cache_dir`). Every compilation is kept,
    however short or small (JAX's own thresholds would skip the library's small steps).
    Returns the folder (created if needed). Safe to call more than once and after jitted
    code has run: later compilations use the folder."""
    folder = Path(path).expanduser() if path is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size threshold
    _restart_cache()
    return folder


def disable_compilation_cache() -> None:
    """Stop reading and writing the persistent cache in this process."""
    jax.config.update("jax_enable_compilation_cache", False)
    _restart_cache()


def _restart_cache() -> None:
    """JAX decides whether to use the cache once, at the first compilation; make it
    decide again with the settings just made."""
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()
