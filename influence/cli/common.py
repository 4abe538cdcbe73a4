"""What the sub-commands share: argument helpers, output-path checks, error reporting,
terminal-safe text, and the optional dependencies (extras of ``pyproject.toml``) a
command needs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from influence.errors import ConfigError, MissingFileError, OutputPathError  # OutputPathError: importable from here too

# The library's strategy names (influence.curvature.STRATEGIES), written out so that
# building the parser (``influence --help``) does not import JAX; tests/cli/test_conventions.py
# holds the two equal.
STRATEGY_NAMES = ("identity", "diagonal", "kfac", "ekfac")

__all__ = ["DISTRIBUTION", "EXIT_ERROR", "EXIT_NUMERICAL", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "OutputPathError",
           "add_factor_arguments", "check_layers", "check_output_dir", "check_output_file", "fail",
           "fit_command", "install_hint", "missing_extra", "strategy_given", "terminal_text",
           # helpers of both `influence index` and `influence query`
           "FIDELITY", "INDEXES", "choose_index", "find_factors", "find_index", "load_factors", "read_fidelity"]

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


# Shared by `influence index` and `influence query` (kept here so neither verb imports the other).
INDEXES = "index"
FIDELITY = "fidelity.json"


def find_factors(loaded, strategy: str, layers: str, chosen: str | None = None) -> tuple[Path, str | None]:
    """The factors folder a query on ``loaded`` uses, and a note to print when it is not
    the one of the default settings.

    Raises:
      FileNotFoundError: none fits (or several do); the message says which ``influence fit``
        line to run, or which folders to choose from with ``--factors``.
    """
    from influence.lm.run import (
        FACTORS,
        describe_settings,
        factor_settings,
        fitted_factors,
        read_settings,
        weights_digest,
    )

    run = loaded.path
    if chosen is not None:
        folder = Path(chosen)
        if not (folder / "factors.npz").is_file() and (run / FACTORS / chosen / "factors.npz").is_file():
            folder = run / FACTORS / chosen
        if not (folder / "factors.npz").is_file():
            raise MissingFileError(f"--factors {chosen}: no factors.npz there (fitted sets are in {run / FACTORS})")
        settings = read_settings(folder)
        if settings is not None and settings.get("step") != loaded.step:
            line = fit_command(run, settings["strategy"], settings["layers"], settings)
            raise ConfigError(f"--factors {folder} were fitted on the weights of step {settings.get('step')}, the run "
                             f"is at step {loaded.step}; refit with:\n  {line} --force")
        if settings is not None and settings.get("weights_digest") != weights_digest(run, loaded.step):
            line = fit_command(run, settings["strategy"], settings["layers"], settings)
            raise ConfigError(f"--factors {folder} were fitted on other weights than the run's checkpoint of step "
                             f"{loaded.step} holds now (it was overwritten, or they predate weight digests); refit "
                             f"with:\n  {line} --force")
        if settings is None:
            return folder, (f"using the factors in {folder}, which has no settings.json: the Fisher, seed and weights "
                            "they were fitted with are unknown, so check they are this run's final weights")
        return folder, f"using the factors in {folder} ({describe_settings(settings)})"
    own = loaded.factors_dir(strategy, layers)
    expected = factor_settings(run, strategy, layers, step=loaded.step)
    if (own / "factors.npz").is_file() and read_settings(own) == expected:
        return own, None
    found = fitted_factors(run)
    same = [(d, s) for d, s in found if s is not None and s["strategy"] == strategy and s["layers"] == layers]
    current = [(d, s) for d, s in same
               if s.get("step") == loaded.step and s.get("weights_digest") == expected["weights_digest"]]
    stale = [d for d, s in same if s.get("step") == loaded.step and d not in {c for c, _ in current}]
    if stale and not current:
        raise MissingFileError(f"the {strategy} factors for layers '{layers}' in {stale[0]} were fitted on other "
                                f"weights than the run's checkpoint of step {loaded.step} holds now (it was "
                                f"overwritten, or they predate weight digests); fit them again with:\n  "
                                f"{fit_command(run, strategy, layers, read_settings(stale[0]))} --force")
    if len(current) == 1:
        folder, settings = current[0]
        return folder, (f"using the only {strategy} factors fitted for layers '{layers}': "
                        f"{describe_settings(settings)} ({folder})")
    line = fit_command(run, strategy, layers)
    if len(current) > 1:
        options = "\n".join(f"  --factors {d.name}   ({describe_settings(s)})" for d, s in current)
        raise MissingFileError(f"{len(current)} sets of {strategy} factors for layers '{layers}' are fitted in {run} "
                                f"with other settings than the defaults; choose one:\n{options}\nor fit the "
                                f"default ones with:\n  {line}")
    # Earlier versions named the folder <strategy>-<layers, sanitised> and kept no settings.
    old = run / FACTORS / f"{strategy}-{re.sub(r'[^A-Za-z0-9_-]', '_', layers)}"
    if (old / "factors.npz").is_file() and read_settings(old) is None:
        raise MissingFileError(f"{old}: factors without the settings.json that says what they were fitted with (an "
                                f"older version wrote them), so they are not used unless chosen with --factors "
                                f"{old.name}; fit them again with:\n  {line}\n(and remove the old folder)")
    if same:
        steps = sorted({s.get("step") for _, s in same})
        raise MissingFileError(f"the {strategy} factors for layers '{layers}' in {run} were fitted on the weights "
                                f"of step {steps}, the run is at step {loaded.step}; fit them again with:\n  {line}")
    others = [(d, s) for d, s in found if s is not None and s["strategy"] == strategy and s.get("step") == loaded.step
              and s.get("weights_digest") == expected["weights_digest"]]
    if others:  # e.g. the scale experiments' factors, fitted for the pattern '\.mlp\.'
        options = "\n".join(f"  --factors {d.name}   (layers '{s['layers']}', {describe_settings(s)})"
                             for d, s in others)
        raise MissingFileError(f"no {strategy} factors for layers '{layers}' in {run}, but some for other layer "
                                f"selections on these weights; choose one:\n{options}\nor fit them with:\n  {line}")
    raise MissingFileError(f"no {strategy} factors for layers '{layers}' in {run}; fit them first with:\n  {line}")


def load_factors(command: str, args: argparse.Namespace, loaded) -> tuple[Path, dict, object] | int:
    """``(folder, settings, Factors)`` of the run's factors that ``--strategy/--layers/--factors``
    choose (loaded against the run's model), or the exit status of a failure, its
    message printed with the command that fits them."""
    from influence.errors import FileFormatError, ModelMismatch
    from influence.factors import Factors
    from influence.lm.run import read_settings

    try:
        path, note = find_factors(loaded, args.strategy, args.layers, args.factors)
    except FileNotFoundError as e:
        return fail(command, str(e))
    if note:
        print(note)
    settings = read_settings(path) or {"strategy": args.strategy, "layers": args.layers}
    try:
        factors = Factors.load(path, model=loaded.model)
    except (FileFormatError, ModelMismatch) as e:
        line = fit_command(args.run, settings["strategy"], settings["layers"], settings)
        return fail(command, f"{e}; refit with:\n  {line} --force")
    if strategy_given(args.strategy) and factors.strategy != args.strategy:
        return fail(command, f"--strategy {args.strategy} was asked for, but {path} holds {factors.strategy} "
                             f"factors; drop --strategy, or choose {args.strategy} factors (or fit them with "
                             f"`{fit_command(args.run, args.strategy, settings['layers'])}`)")
    return path, settings, factors


def find_index(factors_folder: Path) -> Path | None:
    """The index of a factors folder that `influence query` uses: the uncompressed one if
    built, else the one built last."""
    found = sorted((p for p in (Path(factors_folder) / INDEXES).glob("*") if (p / "manifest.json").is_file()),
                   key=lambda p: (p.name != "none", -(p / "manifest.json").stat().st_mtime))
    return found[0] if found else None


def read_fidelity(index_path: Path) -> dict | None:
    file = Path(index_path) / FIDELITY
    return json.loads(file.read_text()) if file.is_file() else None


def choose_index(args, factors_folder: Path, loaded, factors) -> tuple[Path | None, str]:
    """The index `influence query` answers from (``None``: rescan) and what the report says
    answered. A found index that does not match the run's model, factors or data is named
    and passed over (the query rescans)."""
    import influence as inf
    from influence.index.store import Index
    from influence.index.write import built_from

    if getattr(args, "no_index", False):
        return None, "rescan (--no-index)"
    found = find_index(factors_folder)
    if found is None:
        return None, "rescan (no index; build one with `influence index`)"
    try:
        index = Index(found)
        tracked = inf.track(loaded.model, list(factors.layer_names))
        index.check(built_from(tracked, factors, inf.tasks.CausalLM()))
        if index.n_rows != len(loaded.train):
            raise inf.DataError(f"it holds {index.n_rows} sequences, the run has {len(loaded.train)}")
    except inf.InfluenceError as e:
        print(f"not using the index at {found}: {' '.join(str(e).split())}; rescanning (rebuild it with "
              "`influence index --force`)")
        return None, f"rescan (the index at {found} does not match)"
    fidelity = read_fidelity(found)
    measured = (f"; fidelity vs rescan on {fidelity['queries']}: Pearson {fidelity['pearson']:.4f}, Spearman "
                f"{fidelity['spearman']:.4f}, top-10 overlap {fidelity['top10_overlap']:.2f}" if fidelity
                else "; fidelity not measured (influence index --check N)")
    print(f"answering from the index at {found} ({index.compression}); --no-index rescans")
    return found, f"index {found} ({index.compression}, {index.bytes_per_sequence:.0f} bytes per sequence{measured})"
