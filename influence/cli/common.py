"""What the sub-commands share: argument helpers, output-path checks, error reporting,
terminal-safe text, and the optional dependencies (extras of ``pyproject.toml``) a
command needs."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from influence.errors import ConfigError, OutputPathError  # OutputPathError: importable from here too

# The library's strategy names (influence.curvature.STRATEGIES), written out so that
# building the parser (``influence --help``) does not import JAX; tests/cli/test_conventions.py
# holds the two equal.
STRATEGY_NAMES = ("identity", "diagonal", "kfac", "ekfac")

__all__ = ["DISTRIBUTION", "EXIT_ERROR", "EXIT_NUMERICAL", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "OutputPathError",
           "add_factor_arguments", "check_layers", "check_output_dir", "check_output_file", "fail",
           "fit_command", "install_hint", "missing_extra", "strategy_given", "terminal_text"]

# Exit statuses (documented in influence.cli and docs/lm.md): bad input of any kind
# (arguments, files, data, settings) is 2, like argparse's usage errors; a numerical
# failure (NaN/Inf in a model, loss or factors) 3; Ctrl-C 130 and SIGTERM 143, as shells
# report them (128 + the signal's number).
EXIT_ERROR = 2
EXIT_NUMERICAL = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

DISTRIBUTION = "jax-influence"
# pip's name of a module whose import name differs.
_PIP_NAMES = {"sklearn": "scikit-learn"}


class _Default(str):
    """A default value that can be told from the same value typed by the user."""


def strategy_given(value: str) -> bool:
    """Whether ``--strategy`` was given (and so must match ``--factors``), not defaulted."""
    return not isinstance(value, _Default)


def add_factor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", choices=STRATEGY_NAMES, default=_Default("ekfac"),
                        help="curvature approximation (default: ekfac)")
    parser.add_argument("--layers", default="mlp",
                        help="regular expression on module paths of the nnx.Linear layers to track; "
                             "'mlp' (default) tracks the MLP layers as in Grosse et al., 'all' every linear layer")


def check_layers(layers: str) -> None:
    """Refuse a ``--layers`` selection that is not a valid regular expression, before any work."""
    if layers == "all":
        return
    try:
        re.compile(layers)
    except re.error as e:
        raise ConfigError(f"--layers {layers!r} is not a valid regular expression: {e}") from None


def fit_command(run_dir, strategy: str, layers: str, settings: dict | None = None) -> str:
    """The ``influence fit`` line that fits the factors a command is missing; ``settings``
    (of :func:`influence.lm.run.factor_settings`) adds the options that differ from
    ``influence fit``'s defaults."""
    import shlex

    line = f"influence fit --run {shlex.quote(str(run_dir))} --strategy {strategy} --layers {shlex.quote(layers)}"
    settings = settings or {}
    if settings.get("fisher", "sampled") != "sampled":
        line += f" --fisher {settings['fisher']}"
    if settings.get("seed", 0) != 0:
        line += f" --seed {settings['seed']}"
    if settings.get("blocks") is not None:
        line += f" --blocks {settings['blocks']}"
    if settings.get("factor_dtype", "float32") != "float32":
        line += f" --factor-dtype {settings['factor_dtype']}"
    return line


def fail(command: str, message: str, status: int = EXIT_ERROR) -> int:
    """Print ``influence COMMAND: error: MESSAGE`` to stderr; returns ``status`` (2)."""
    print(f"influence {command}: error: {message}", file=sys.stderr)
    return status


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_parent(path: Path, option: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable folder."""
    ancestor = _first_existing(path.parent if str(path.parent) else Path("."))
    if not ancestor.is_dir():
        raise OutputPathError(f"{option} {path}: {ancestor} is a file, not a folder; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: cannot write in {ancestor} (permission denied); choose another path")


def check_output_file(path, option: str) -> None:
    """Refuse, before any work, a file output that cannot be written: ``path`` is a
    folder, a parent is a file, or the folder it goes in is not writable."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{option} {path} is a folder; give a file name (e.g. {path / 'out'})")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{option} {path}: the file is not writable; choose another path")
    _check_parent(path, option)


def check_output_dir(path, option: str) -> None:
    """Refuse, before any work, a folder output that cannot be written: ``path`` is a
    file, a parent is a file, or it (or its nearest existing parent) is not writable."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {path} is a file; give a folder (it is created if missing)")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{option} {path}: cannot write in this folder (permission denied)")
        return
    _check_parent(path, option)


# Characters that move the cursor, recolour or rewrite the terminal, or reorder text:
# C0/C1 controls (ESC starts ANSI sequences), line/paragraph separators and bidi controls.
_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _unsafe(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _BIDI


def terminal_text(text, keep_newlines: bool = False) -> str:
    """``text`` safe to print: control characters (and bidi overrides) written as escapes
    (``\\x1b``, ``\\u202e``); newlines kept with ``keep_newlines``, else escaped too."""
    text = str(text)
    out = []
    for ch in text:
        if (ch == "\n" and keep_newlines) or not _unsafe(ch):
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)


def install_hint(extra: str) -> str:
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def missing_extra(command: str, extra: str, modules: Sequence[str]) -> str | None:
    """``None`` when every one of ``modules`` (import names) can be imported, else a line
    saying which packages ``influence COMMAND`` needs and which extra installs them, e.g.
    ``influence digits needs scikit-learn and matplotlib: pip install 'jax-influence[experiments]'``."""
    missing = [_PIP_NAMES.get(m, m) for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return f"influence {command} needs {' and '.join(missing)}: {install_hint(extra)}"
