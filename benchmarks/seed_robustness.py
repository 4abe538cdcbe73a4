"""Do the tests that depend on how a model trained hold on other seeds?

XLA's CPU numerics differ between processors, so a trained fixture is a slightly different
model on another machine. An assertion that holds only for the one model this machine
trains would fail elsewhere. This runs the training-dependent test files with every
trained fixture's seed offset (``INFLUENCE_TEST_SEED``, see :mod:`influence.testing`) set
to each of ``--seeds``, in a fresh process each, and records every test's outcome:

    python -m benchmarks.seed_robustness --seeds 1 2 3        # ~10 min on 2 idle cores

It writes ``docs/testing/seed_robustness.json`` (outcome per test and seed, with the
failure's last line) and prints a table of the tests that did not pass on every seed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The test files whose assertions involve a model trained by the tests (fixtures of
# influence.testing or models the test trains itself).
TRAINED = [
    "tests/scoring/test_pairwise.py", "tests/scoring/test_ranking.py", "tests/scoring/test_finite.py",
    "tests/curvature/test_curvature.py", "tests/curvature/test_blocks.py", "tests/capture/test_tracking.py",
    "tests/reference/test_counterfactual.py", "tests/reference/test_ihvp.py", "tests/reference/test_pbrf.py",
    "tests/runtime/test_resume.py", "tests/runtime/test_hosts.py", "tests/test_api.py", "tests/test_errors.py",
    "tests/query/test_engine.py",
]
OUT = ROOT / "docs" / "testing" / "seed_robustness.json"


def run_seed(seed: int, paths: list[str]) -> dict[str, dict]:
    """``{test id: {"outcome": passed|failed|skipped, "message": str}}`` for one seed."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        env = {**os.environ, "INFLUENCE_TEST_SEED": str(seed), "JAX_PLATFORMS": "cpu"}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        *paths], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False)
        outcomes = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            test = f"{case.get('classname')}::{case.get('name')}"
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    # the assertion pytest reports ("E   ..." lines), else the element's message
                    lines = [ln[1:].strip() for ln in (child.text or "").splitlines() if ln.startswith("E ")]
                    outcome, message = "failed", (lines[0] if lines else (child.get("message") or "").strip())[:300]
                elif child.tag == "skipped":
                    outcome = "skipped"
            outcomes[test] = {"outcome": outcome, "message": message}
        return outcomes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="seed offsets to run (0 is the suite's own)")
    parser.add_argument("--paths", nargs="+", default=TRAINED, help="test files or folders (default: the trained ones)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    results = {str(seed): run_seed(seed, args.paths) for seed in args.seeds}
    tests = sorted({t for r in results.values() for t in r})
    unstable = [t for t in tests if any(r.get(t, {}).get("outcome") == "failed" for r in results.values())]
    payload = {
        "command": "python -m benchmarks.seed_robustness --seeds " + " ".join(map(str, args.seeds)),
        "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "paths": args.paths, "n_tests": len(tests), "unstable": unstable, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"{len(tests)} tests × seeds {args.seeds}: {len(unstable)} failed on some seed")
    for t in unstable:
        cells = ", ".join(f"seed {s}: {results[s].get(t, {}).get('outcome', 'absent')}" for s in results)
        print(f"  {t}  ({cells})")
        for s, r in results.items():
            if r.get(t, {}).get("outcome") == "failed":
                print(f"      seed {s}: {r[t]['message']}")
    print(f"written: {args.out}")
    return 1 if unstable else 0


if __name__ == "__main__":
    sys.exit(main())
