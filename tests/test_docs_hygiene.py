"""README.md and docs/ carry no absolute path of the machine they were written on: a
reader's machine has no /work, /home/<someone> or /tmp/<something> of the author's."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:work|home|root|tmp|Users|mnt|scratch)/[\w.+-]+(?:/[\w.+-]+)*")

# Command lines recorded in results files written before this check, rendered into the
# docs as their generated sections (the results files are kept as measured). Nothing may
# be added here: render new results with relative paths.
KNOWN = {
    "docs/benchmarks.md": {"/work/venv-kron/bin/python", "/work/small-run-perf"},
    "docs/index.md": {"/work/bench/tiny.json", "/work/bench/all.json", "/work/small-run-index"},
    "docs/experiments/scale.md": {"/work/scale-full-out", "/work/scale-full-pub"},
    "docs/experiments/scale-v2/report.md": {"/work/scale-full-out", "/work/scale-full-pub"},
}


def test_docs_name_no_absolute_path_of_a_machine():
    found = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        rel = path.relative_to(ROOT).as_posix()
        paths = set(MACHINE_PATH.findall(path.read_text())) - KNOWN.get(rel, set())
        if paths:
            found[rel] = sorted(paths)
    assert found == {}, f"write paths relative to the repository (e.g. runs/...): {found}"


def test_the_pattern_catches_machine_paths_and_spares_relative_ones():
    text = "--out /work/bench/x.json, /tmp/tiny, /home/me/run; runs/tiny, docs/x.md, ~/.cache, a/tmp/b"
    assert MACHINE_PATH.findall(text) == ["/work/bench/x.json", "/tmp/tiny", "/home/me/run"]
