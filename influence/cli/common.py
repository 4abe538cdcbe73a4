"""What the sub-commands share: argument helpers, error reporting, and the optional
dependencies (extras of ``pyproject.toml``) a command needs."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

from influence.curvature import STRATEGIES
from influence.lm.run import factors_dir

# factors_dir lives in influence.lm.run; it stays importable from here for benchmarks/query_engine.py.
__all__ = ["DISTRIBUTION", "add_factor_arguments", "factors_dir", "fail", "fit_command", "install_hint",
           "missing_extra"]

DISTRIBUTION = "jax-influence"
# pip's name of a module whose import name differs.
_PIP_NAMES = {"sklearn": "scikit-learn"}


def add_factor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", choices=STRATEGIES, default="ekfac", help="curvature approximation (default: ekfac)")
    parser.add_argument("--layers", default="mlp",
                        help="regular expression on module paths of the nnx.Linear layers to track; "
                             "'mlp' (default) tracks the MLP layers as in Grosse et al., 'all' every linear layer")


def fit_command(run_dir, strategy: str, layers: str) -> str:
    """The ``influence fit`` line that fits the factors a command is missing."""
    return f"influence fit --run {run_dir} --strategy {strategy} --layers {layers}"


def fail(command: str, message: str) -> int:
    """Print ``influence COMMAND: error: MESSAGE`` to stderr; returns the exit status 2."""
    print(f"influence {command}: error: {message}", file=sys.stderr)
    return 2


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
