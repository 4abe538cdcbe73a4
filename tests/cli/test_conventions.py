"""The command line's conventions (as pip, pytest or huggingface-cli have them): --version,
fast help that prints its examples literally and explains every option, one-line
warnings, --quiet for every progress bar, exit statuses and messages for signals."""

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
import warnings
from pathlib import Path

import pytest

import influence
from influence import cli
from influence.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"influence {influence.__version__}"


def test_help_of_every_command_imports_no_jax():
    # A fresh interpreter: this one has JAX loaded by other tests.
    proc = _python(f"""
        import sys
        from influence.cli import main
        for command in {sorted(COMMANDS)!r}:
            try:
                main([command, "--help"])
            except SystemExit as e:
                assert e.code == 0, (command, e.code)
        import influence
        influence.__version__, influence.InfluenceError
        print("jax loaded:", sorted(m for m in sys.modules if m == "jax" or m.startswith(("jax.", "flax"))))
    """)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip().splitlines()[-1] == "jax loaded: []"


def test_help_prints_examples_literally():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices["query"].format_help()
    # The example's escape is what a user types, not a line break.
    assert '--prompt "ROMEO:\\n" --completion "But soft, what light"' in text


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, p in [("influence", parser), *sub.choices.items()]
               for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and not (a.help and a.help.strip())]
    assert missing == []


def test_choices_written_out_for_fast_help_are_the_librarys():
    from influence.cli.common import STRATEGY_NAMES
    from influence.cli.train import SCALES
    from influence.curvature import STRATEGIES
    from influence.lm.model import LADDER

    assert STRATEGY_NAMES == tuple(STRATEGIES)
    assert SCALES == tuple(LADDER)
    from influence.cli.validate import METHODS as CLI_METHODS
    from influence.reference.validate import METHODS

    assert CLI_METHODS == METHODS


def _fake_command(monkeypatch, name: str, run) -> None:
    """Register ``run`` as the command ``name`` (a module with configure/run)."""
    module = types.ModuleType(f"fake_{name}")
    module.configure = lambda p: p.add_argument("--quiet", action="store_true", help="no progress bars")
    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(COMMANDS, name, (module.__name__, "a fake command"))


def test_warnings_are_one_line_unless_full_warnings(monkeypatch, capsys):
    def run(args):
        warnings.warn("first line of the warning\nsecond line with details", influence.UntrackedParametersWarning,
                      stacklevel=1)
        return 0

    _fake_command(monkeypatch, "warns", run)
    assert main(["warns"]) == 0
    err = capsys.readouterr().err
    assert err == "warning: UntrackedParametersWarning: first line of the warning\n"
    # In full, the warning goes through Python's own machinery (here pytest's recorder).
    with pytest.warns(influence.UntrackedParametersWarning, match="second line with details"):
        assert main(["warns", "--full-warnings"]) == 0


def test_quiet_silences_datasets_progress_bars_while_the_command_runs(monkeypatch):
    import datasets

    seen = []
    _fake_command(monkeypatch, "bars", lambda args: seen.append(datasets.are_progress_bars_disabled()) or 0)
    assert not datasets.are_progress_bars_disabled()
    assert main(["bars", "--quiet"]) == 0
    assert main(["bars"]) == 0
    assert seen == [True, False] and not datasets.are_progress_bars_disabled()


def test_sigterm_handler_is_restored_after_the_command(monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    _fake_command(monkeypatch, "noop", lambda args: 0)
    assert main(["noop"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize(("sig", "status", "name", "rerun"), [
    (signal.SIGINT, 130, "fit", "interrupted; running the same command again resumes the fit from its checkpoint"),
    (signal.SIGTERM, 143, "query", "terminated (SIGTERM); running it again starts over"),
])
def test_signals_exit_with_the_shells_status_and_say_what_a_rerun_does(sig, status, name, rerun):
    # A real process and a real signal; the command is a stand-in that waits to be stopped.
    proc = _python(f"""
        import signal, sys, time, types
        # A shell without job control starts background jobs with SIGINT ignored, and
        # Python then installs no KeyboardInterrupt handler: restore it, as a terminal has it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from influence import cli
        module = types.ModuleType("sleeper")
        module.configure = lambda p: None
        def run(args):
            print("ready", flush=True)
            time.sleep(60)
        module.run = run
        sys.modules["sleeper"] = module
        cli.COMMANDS[{name!r}] = ("sleeper", "waits")
        sys.exit(cli.main([{name!r}]))
    """)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status
    assert err.strip().startswith(f"influence {name}: error: {rerun}")


def test_a_file_given_as_the_run_folder_is_called_a_file(tmp_path, capsys):
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0\n")
    assert main(["fit", "--run", str(a_file), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{a_file} is a file, not a run folder" in err and "--out" not in err.split("not a run folder")[0]


def test_public_names_resolve_and_are_listed():
    # One table (influence._PUBLIC) holds every public name; each must import.
    for name in influence._PUBLIC:
        assert getattr(influence, name) is not None, name
    assert set(influence.__all__) == {"__version__", *influence._PUBLIC}
    assert set(influence._PUBLIC) <= set(dir(influence))
    with pytest.raises(AttributeError):
        influence.no_such_name  # noqa: B018
    assert cli.Terminated.__mro__[1] is KeyboardInterrupt
