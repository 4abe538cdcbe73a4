"""Shared pieces of the run-based commands: where factors live, and loading a run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from influence.curvature import STRATEGIES


def add_factor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", choices=STRATEGIES, default="ekfac", help="curvature approximation (default: ekfac)")
    parser.add_argument("--layers", default="mlp",
                        help="regular expression on module paths of the nnx.Linear layers to track; "
                             "'mlp' (default) tracks the MLP layers as in Grosse et al., 'all' every linear layer")


def layer_filter(layers: str) -> str | None:
    return None if layers == "all" else layers


def factors_dir(run_dir: str | Path, strategy: str, layers: str) -> Path:
    """``<run>/factors/<strategy>-<layers>``: one folder per fitted configuration."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in layers)
    return Path(run_dir) / "factors" / f"{strategy}-{safe}"


def fit_command(run_dir, strategy: str, layers: str) -> str:
    return f"influence fit --run {run_dir} --strategy {strategy} --layers {layers}"


def fail(command: str, message: str) -> int:
    print(f"influence {command}: error: {message}", file=sys.stderr)
    return 2
