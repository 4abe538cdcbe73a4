"""How long the README's test command takes, read from the log of a run of it.

    uptime > suite.log; python -m pytest -q -n 2 --durations=15 >> suite.log 2>&1
    python -m benchmarks.suite_time --from-log suite.log       # writes docs/testing/suite_time.json
    python -m benchmarks.suite_time --render docs/testing/suite_time.json   # the docs/testing.md section

The log's first line is ``uptime``'s (the load when the run started); pytest's closing line
gives the counts and the wall time, ``--durations`` the slowest tests. The results file
records those with the processor and core count, and docs/testing.md's "Suite time" section
is its rendering (tests/test_suite_time_docs.py holds the two together), so the time the
README promises is a measurement, not a hand-typed number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "testing" / "suite_time.json"
COMMAND = "python -m pytest -q -n 2"
BUDGET_S = 600  # the target: under 10 minutes on 2 idle cores (issue 27)

_SUMMARY = re.compile(r"^=*\s*(?P<counts>(?:\d+ \w+(?:, )?)+) in (?P<seconds>[\d.]+)s\b", re.M)
_LOAD = re.compile(r"load average:\s*(?P<one>[\d.]+),\s*(?P<five>[\d.]+),\s*(?P<fifteen>[\d.]+)")
_DURATION = re.compile(r"^(?P<seconds>[\d.]+)s (?P<phase>call|setup|teardown)\s+(?P<test>\S+)$", re.M)


def parse_log(text: str, slowest: int = 5) -> dict:
    """The counts, wall seconds, starting load and slowest tests of a pytest log.

    Raises:
      ValueError: the log has no pytest closing line or no ``uptime`` load line.
    """
    summaries = list(_SUMMARY.finditer(text))
    if not summaries:
        raise ValueError("no pytest closing line ('N passed ... in S s') in the log")
    last = summaries[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", last["counts"])}
    load = _LOAD.search(text)
    if load is None:
        raise ValueError("no load line in the log: start it with the output of `uptime`")
    durations = sorted(((float(m["seconds"]), m["phase"], m["test"]) for m in _DURATION.finditer(text)),
                       reverse=True)[:slowest]
    return {"counts": counts, "seconds": float(last["seconds"]),
            "load_at_start": [float(load["one"]), float(load["five"]), float(load["fifteen"])],
            "slowest": [{"test": t, "phase": p, "seconds": s} for s, p, t in durations]}


def render(results: dict) -> str:
    """The "Suite time" numbers of docs/testing.md from a results file."""
    counts = ", ".join(f"{n} {word}" for word, n in results["counts"].items())
    minutes, seconds = divmod(round(results["seconds"]), 60)
    verdict = "within" if results["seconds"] < BUDGET_S else "over"
    lines = [f"Measured on {results['date']}: `{results['command']}` took **{minutes} min {seconds:02d} s** "
             f"({counts}) on {results['cores']} cores of {results['processor']}, load average "
             f"{results['load_at_start'][0]} when it started: {verdict} the 10-minute target "
             f"(`python -m benchmarks.suite_time --from-log`)."]
    if results["slowest"]:
        lines += ["", "| slowest default tests | seconds |", "|---|---|"]
        lines += [f"| `{r['test']}` ({r['phase']}) | {r['seconds']:.1f} |" for r in results["slowest"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-log", type=Path, metavar="LOG", help="parse this log into --out")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="results file (default: docs/testing/suite_time.json)")
    parser.add_argument("--render", type=Path, metavar="RESULTS", help="print the docs section of a results file")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())), end="")
        return 0
    if args.from_log is None:
        parser.error("give --from-log LOG or --render RESULTS")
    try:
        results = parse_log(args.from_log.read_text())
    except ValueError as e:
        parser.error(f"{args.from_log}: {e}")
    results = {"command": COMMAND, "date": datetime.date.today().isoformat(),
               "processor": platform.processor() or platform.machine(), "cores": os.cpu_count(), **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(args.out)  # atomic: a reader never sees half a file
    print(render(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
