"""The ``influence`` command line: one sub-command per capability.

Each sub-command lives in the module that owns the capability and exposes
``configure(parser)`` (adds its arguments) and ``run(args) -> int``. This file only
wires them together, so capabilities can be added without editing each other.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported lazily so `influence --help`
# stays fast and a broken optional capability cannot break the others.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("influence.cli.demo", "end to end on Shakespeare: train a small LM, fit EK-FAC, explain completions (HTML report)"),
    "train": ("influence.cli.train", "train a language model of the scale ladder on bundled text"),
    "fit": ("influence.cli.fit", "fit curvature factors (EK-FAC, ...) for a trained run"),
    "query": ("influence.cli.query", "rank a run's training sequences by influence on a prompt's completion"),
    "digits": ("influence.cli.digits", "influence on images: an MLP on scikit-learn's bundled digits"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influence",
        description="Influence functions (EK-FAC) for flax NNX models: which training "
        "sequences made the model say what it said.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not module_name.startswith(e.name):
                raise
            continue  # capability not part of this build
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.configure(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
