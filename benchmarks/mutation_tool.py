"""Mutation testing with a PyPI tool: cosmic-ray's mutants of curvature/, scoring/,
index/compress.py and tasks.py, a seeded random sample of them run against the tests of
each mutated module.

benchmarks/mutation.py runs fifteen mutants written by hand; this one lets cosmic-ray
(``pip install 'jax-influence[mutation]'``) generate every mutant its operators make
(numbers replaced, operators swapped, comparisons flipped, ``break``/``continue`` swapped,
decorators removed, ...), so the sample is not chosen by the person who wrote the tests.
There are thousands of them and each runs a pytest process of its own (JAX starts and
compiles each time), so a seeded random sample is run, the same number from each of the
four targets, and the kill rate is published with its sample size and a 95 % Wilson
interval.

Each mutant is applied to a private copy of the package (``--session``/tree), never to the
working tree, with cosmic-ray's own ``mutate_and_test``, and runs only the tests that
exercise its module (``TESTS``) with ``-x``, no cache and a timeout. Results go into
cosmic-ray's session database as each mutant finishes, so a run stopped at its
``--budget`` (or killed) resumes where it stopped::

    nice -n 10 python -m benchmarks.mutation_tool --per-target 20 --budget 480   # repeat until done
    python -m benchmarks.mutation_tool --report docs/testing/mutation_tool.json  # summary, survivors' diffs
    python -m benchmarks.mutation_tool --render docs/testing/mutation_tool.json  # the docs/testing.md section

Surviving mutants judged equivalent (no input can tell them apart) are listed in
``EQUIVALENT`` with the reason; the report carries it, and the kill rate is given both
over all mutants run and over the non-equivalent ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from influence.runtime.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("influence", "tests", "experiments", "benchmarks", "pyproject.toml")
SESSION = ROOT / "runs" / "mutation-tool"

# The four targets of the issue, each a list of modules (relative to the repository root).
TARGETS = {
    "curvature": sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "influence" / "curvature").glob("*.py")
                        if p.name != "__init__.py"),
    "scoring": sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "influence" / "scoring").glob("*.py")
                      if p.name != "__init__.py"),
    "index/compress.py": ["influence/index/compress.py"],
    "tasks.py": ["influence/tasks.py"],
}

# The tests that exercise each module (found from the tests' imports), fastest and most
# direct first so that -x stops a killed mutant early. A module not listed uses its
# target's entry.
_CURVATURE = ("tests/curvature/test_token_convention.py", "tests/curvature/test_curvature.py")
_SCORING = ("tests/scoring/test_pairwise.py", "tests/scoring/test_ranking.py", "tests/scoring/test_per_token.py",
            "tests/scoring/test_blocks.py", "tests/scoring/test_finite.py")
TESTS = {
    "curvature": _CURVATURE,
    "scoring": _SCORING,
    "influence/scoring/hosts.py": ("tests/runtime/test_hosts.py",),
    "influence/scoring/topk.py": ("tests/scoring/test_ranking.py", "tests/runtime/test_hosts.py"),
    "influence/scoring/results.py": ("tests/scoring/test_ranking.py", "tests/scoring/test_pairwise.py",
                                     "tests/test_api.py"),
    "influence/scoring/attribution.py": ("tests/scoring/test_ranking.py",),
    "influence/scoring/contractions.py": ("tests/scoring/test_per_token.py", "tests/scoring/test_pairwise.py"),
    "influence/scoring/blocks.py": ("tests/scoring/test_blocks.py", "tests/curvature/test_blocks.py",
                                    "tests/runtime/test_hosts.py"),
    "influence/scoring/finite.py": ("tests/scoring/test_finite.py", "tests/scoring/test_blocks.py"),
    "influence/curvature/blocks.py": ("tests/curvature/test_blocks.py", "tests/scoring/test_blocks.py"),
    "influence/curvature/strategies.py": ("tests/curvature/test_curvature.py", "tests/curvature/test_layer_kinds.py"),
    "index/compress.py": ("tests/index/test_int_roundtrip.py", "tests/index/test_index.py"),
    "tasks.py": ("tests/test_tasks.py", "tests/curvature/test_token_convention.py", "tests/test_builtin_tasks.py",
                 "tests/test_fisher.py"),
}

# Survivors looked at and found equivalent: (module, the mutated line after the change) ->
# why no input can tell the mutant from the original. Filled in after reading each diff.
_ANNOTATION = ("the mutated code is a type annotation, never evaluated: the module has "
               "`from __future__ import annotations`, so annotations stay strings that nothing reads")
EQUIVALENT: dict[tuple[str, str], str] = {  # (mutants in annotations are found by in_annotation)
    ("influence/curvature/covariance.py", "limit = 1 if m.shape[0] >= _THREADED_EIGH_SIZE else None"):
        "it changes how many BLAS threads `eigh` may use (speed only), not what it computes",
    ("influence/curvature/covariance.py", "limit = 1 if m.shape[0] <= _THREADED_EIGH_SIZE else None"):
        "it changes how many BLAS threads `eigh` may use (speed only), not what it computes",
}

# Survivors that showed a real gap, and the test written afterwards that kills them
# (checked by applying the mutant by hand and running that test).
GAPS: dict[tuple[str, str], str] = {
    ("influence/curvature/blocks.py", "if n_a < 1 and n_s < 1 or n_a > info.d_a or n_s > info.d_out:"):
        "tests/curvature/test_blocks.py::test_each_block_count_is_checked_on_its_own",
    ("influence/curvature/eigenvalues.py", "sq = sq.sum(axis= 1)"):
        "tests/curvature/test_eigenvalue_sums.py::test_lambda_sums_over_directions_and_weighted_examples",
    ("influence/tasks.py",
     'raise ConfigError(f"labels {self.y_key!r} must be 0 or 1; row {first_row << row} has another value")'):
        "tests/test_builtin_tasks.py::test_multilabel_names_the_row_of_a_bad_label_in_the_whole_data",
}

# Survivors that a test of the suite outside this module's TESTS kills (checked by hand):
# gaps of the mapping, not of the suite (the mapping now lists the test's file).
CAUGHT_ELSEWHERE: dict[tuple[str, str], str] = {
    ("influence/scoring/blocks.py", "pad = [(0, -1), (0, q_pad - n_query), (0, 0)]"):
        "tests/runtime/test_hosts.py::test_merging_top_k_lists_ties_and_resumed_slots",
}


def in_annotation(module: str, position: tuple[int, int]) -> bool:
    """Whether ``position`` (line, column) of ``module`` lies in a type annotation of a
    module that never evaluates them (``from __future__ import annotations``)."""
    import ast

    tree = ast.parse((ROOT / module).read_text())
    if not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
               any(a.name == "annotations" for a in n.names) for n in tree.body):
        return False
    notes = [n.annotation for n in ast.walk(tree) if isinstance(n, ast.arg | ast.AnnAssign) and n.annotation]
    notes += [n.returns for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.returns]
    return any((n.lineno, n.col_offset) <= tuple(position) < (n.end_lineno, n.end_col_offset) for n in notes)


def target_of(module: str) -> str:
    return next(t for t, modules in TARGETS.items() if module in modules)


def tests_for(module: str) -> tuple[str, ...]:
    return TESTS.get(module) or TESTS[target_of(module)]


def test_command(module: str) -> str:
    return f"{sys.executable} -m pytest -q -x -p no:cacheprovider " + " ".join(tests_for(module))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion k/n (n > 0)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _sync_tree(tree: Path) -> None:
    """Make ``tree`` a pristine copy of the repository's package and tests."""
    for name in COPIED:
        src, dst = ROOT / name, tree / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "runs"))
        else:
            shutil.copy2(src, dst)


def _mutated_line(diff: str) -> str:
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return added[0] if added else ""


def _open(session: Path):
    from cosmic_ray.work_db import WorkDB

    return WorkDB(str(session / "session.sqlite"), WorkDB.Mode.open)


def init(session: Path) -> None:
    """Let cosmic-ray generate every mutant of the four targets (with its default operators)."""
    from cosmic_ray.commands.init import init as cr_init
    from cosmic_ray.work_db import WorkDB

    session.mkdir(parents=True, exist_ok=True)
    db = WorkDB(str(session / "session.sqlite"), WorkDB.Mode.create)
    try:
        modules = [Path(m) for target in TARGETS.values() for m in target]  # relative: run from the tree
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            cr_init(modules, db, {})
        finally:
            os.chdir(cwd)
    finally:
        db.close()


def _key(item) -> tuple:
    m = item.mutations[0]
    return (str(m.module_path), m.operator_name, json.dumps(m.operator_args, sort_keys=True), m.occurrence)


def sample(items, per_target: int, seed: int) -> list:
    """The first ``per_target`` mutants of each target in a seeded shuffle (of the mutants
    ordered by their mutation, not by cosmic-ray's random job ids): a larger
    ``per_target`` extends a sample without changing the mutants already in it."""
    by_target: dict[str, list] = {t: [] for t in TARGETS}
    for item in sorted(items, key=_key):
        by_target[target_of(str(item.mutations[0].module_path))].append(item)
    chosen = []
    for i, target in enumerate(TARGETS):
        group = by_target[target]
        random.Random(seed * 1000 + i).shuffle(group)
        chosen += group[:per_target]
    return chosen


_CACHED = 200  # mutants per target kept in the sample file (a larger --per-target reads the database)


def sampled(session: Path, per_target: int, seed: int) -> tuple[list, Counter]:
    """:func:`sample` and the number of mutants generated per target, from a cache file
    written on first use (reading all of cosmic-ray's work items takes minutes on a loaded
    machine, the cached sample a moment)."""
    from cosmic_ray.work_item import MutationSpec, WorkItem

    cache = session / f"sample-seed{seed}.json"
    if not cache.exists() or per_target > _CACHED:
        db = _open(session)
        try:
            items = db.work_items
        finally:
            db.close()
        generated = Counter(target_of(str(i.mutations[0].module_path)) for i in items)
        if per_target > _CACHED:
            return sample(items, per_target, seed), generated
        rows = [{"job_id": i.job_id, "module_path": str(m.module_path), "operator_name": m.operator_name,
                 "occurrence": m.occurrence, "start_pos": list(m.start_pos), "end_pos": list(m.end_pos),
                 "operator_args": m.operator_args, "definition_name": m.definition_name}
                for i in sample(items, _CACHED, seed) for m in i.mutations[:1]]
        atomic_write_json(cache, {"generated": generated, "sample": rows})
    saved = json.loads(cache.read_text())
    items = [WorkItem.single(r.pop("job_id"), MutationSpec(**{**r, "start_pos": tuple(r["start_pos"]),
                                                               "end_pos": tuple(r["end_pos"])}))
             for r in saved["sample"]]
    by_target: dict[str, list] = {t: [] for t in TARGETS}
    for item in items:
        by_target[target_of(str(item.mutations[0].module_path))].append(item)
    return [i for t in TARGETS for i in by_target[t][:per_target]], Counter(saved["generated"])


def run(session: Path, per_target: int, seed: int, budget: float, timeout: float, shard: tuple[int, int] = (0, 1)
        ) -> None:
    """Run the sample's mutants not yet done, until ``budget`` seconds have passed;
    ``shard=(i, n)`` runs every n-th of them from the i-th (n processes at once, each with
    a copy of the package of its own)."""
    from cosmic_ray.mutating import mutate_and_test

    if not (session / "session.sqlite").exists():
        init(session)
    tree = session / ("tree" if shard[1] == 1 else f"tree-{shard[0]}")
    _sync_tree(tree)
    db = _open(session)
    t0 = time.perf_counter()
    done = {r[0] for r in db.results}
    chosen = sampled(session, per_target, seed)[0]
    # Rotate through the targets, so that a partial run spreads across all four; the shards
    # split this fixed order (not what is left of it), so two never take the same mutant.
    queues = {t: [i for i in chosen if target_of(str(i.mutations[0].module_path)) == t] for t in TARGETS}
    order = [q.pop(0) for _ in range(len(chosen)) for q in queues.values() if q][: len(chosen)]
    todo = [item for item in order[shard[0]::shard[1]] if item.job_id not in done]
    print(f"{len(todo)} of the sample's mutants to run", flush=True)
    cwd = os.getcwd()
    os.chdir(tree)
    os.environ["PYTHONPATH"] = str(tree)
    try:
        for item in todo:
            if time.perf_counter() - t0 > budget:
                print("budget spent; run again to resume", flush=True)
                break
            m = item.mutations[0]
            shutil.copy2(ROOT / m.module_path, tree / m.module_path)  # pristine, even after a killed run
            with open(session / "loads.txt", "a") as log:  # the 1-minute load as each mutant starts
                log.write(f"{os.getloadavg()[0]:.1f}\n")
            start = time.perf_counter()
            result = mutate_and_test(item.mutations, test_command(str(m.module_path)), timeout)
            db.set_result(item.job_id, result)
            print(f"{m.module_path} {m.operator_name} #{m.occurrence}: {result.test_outcome} "
                  f"({'timeout' if result.output == 'timeout' else f'{time.perf_counter() - start:.0f} s'})",
                  flush=True)
    finally:
        os.chdir(cwd)
        db.close()


def report(session: Path, per_target: int, seed: int, timeout: float) -> dict:
    """The results file: counts per target, the kill rate with its interval, survivors' diffs."""
    log = session / "loads.txt"
    loads = [float(x) for x in log.read_text().split()] if log.exists() else []
    db = _open(session)
    try:
        results = dict(db.results)
    finally:
        db.close()
    chosen, generated = sampled(session, per_target, seed)
    per_target_rows = {t: {"generated": generated[t], "sampled": 0, "run": 0, "killed": 0, "survived": 0,
                           "timed_out": 0, "incompetent": 0} for t in TARGETS}
    survivors = []
    for item in chosen:
        m = item.mutations[0]
        row = per_target_rows[target_of(str(m.module_path))]
        row["sampled"] += 1
        result = results.get(item.job_id)
        if result is None or result.test_outcome is None:
            continue
        row["run"] += 1
        outcome = str(result.test_outcome.value)
        if result.output == "timeout":
            row["timed_out"] += 1  # cosmic-ray counts a timeout as killed; kept apart here
        elif outcome == "killed":
            row["killed"] += 1
        elif outcome == "survived":
            row["survived"] += 1
            line = _mutated_line(result.diff)
            diff = "\n".join(line for line in result.diff.splitlines()  # without the ---/+++ header
                             if not line.startswith(("---", "+++")))
            survivors.append({"module": str(m.module_path), "operator": m.operator_name.split("/")[-1],
                              "occurrence": m.occurrence, "line": m.start_pos[0], "mutated": line,
                              "diff": diff[:600],
                              "equivalent": (_ANNOTATION if in_annotation(str(m.module_path), m.start_pos)
                                             else EQUIVALENT.get((str(m.module_path), line))),
                              "killed_since_by": GAPS.get((str(m.module_path), line)),
                              "killed_elsewhere_by": CAUGHT_ELSEWHERE.get((str(m.module_path), line))})
        else:
            row["incompetent"] += 1
    run_ = sum(r["run"] for r in per_target_rows.values())
    killed = sum(r["killed"] for r in per_target_rows.values())
    equivalent = sum(s["equivalent"] is not None for s in survivors)
    out = {
        "tool": f"cosmic-ray {_version()}", "operators": "cosmic-ray's defaults (core/*)",
        "command": f"nice -n 10 python -m benchmarks.mutation_tool --per-target {per_target} --seed {seed} "
                   f"--timeout {timeout:g}",
        "seed": seed, "per_target": per_target, "timeout_s": timeout,
        "load": {"min": round(min(loads), 1), "max": round(max(loads), 1)} if loads else None,
        "generated": sum(generated.values()), "sampled": len(chosen), "run": run_, "killed": killed,
        "timed_out": sum(r["timed_out"] for r in per_target_rows.values()),
        "survived": len(survivors), "equivalent": equivalent,
        "kill_rate": round(killed / run_, 3) if run_ else None,
        "wilson95": [round(x, 3) for x in wilson(killed, run_)] if run_ else None,
        "kill_rate_non_equivalent": (round(killed / (run_ - equivalent), 3) if run_ - equivalent else None),
        "wilson95_non_equivalent": ([round(x, 3) for x in wilson(killed, run_ - equivalent)]
                                    if run_ - equivalent else None),
        "targets": per_target_rows,
        "tests": {t: list(TESTS[t]) for t in TARGETS},
        "survivors": survivors,
    }
    return out


def _version() -> str:
    from importlib.metadata import version

    return version("cosmic-ray")


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def render(results: dict) -> str:
    """The docs/testing.md section of a results file."""
    r = results
    lo, hi = r["wilson95"]
    lines = [
        f"{r['tool']} generated {r['generated']} mutants of the four targets; a seeded sample of "
        f"{r['sampled']} (seed {r['seed']}, {r['per_target']} per target) was drawn and {r['run']} of them were run: "
        f"**{r['killed']} killed of {r['run']} ({_pct(r['kill_rate'])}, 95 % Wilson interval "
        f"{_pct(lo)}–{_pct(hi)})**, {r['survived']} survived, {r['timed_out']} timed out "
        f"(counted as not killed; limit {r['timeout_s']:g} s). "
        + (f"Of the survivors {r['equivalent']} are equivalent mutants (below); over the others the kill rate is "
           f"{_pct(r['kill_rate_non_equivalent'])} ({_pct(r['wilson95_non_equivalent'][0])}–"
           f"{_pct(r['wilson95_non_equivalent'][1])}). " if r["equivalent"] else "")
        + f"Run under load average {r['load']['min']}–{r['load']['max']} on the shared 2-core machine "
          f"(`{r['command']}`).",
        "",
        "| target | mutants generated | sampled | run | killed | survived | timed out |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, row in r["targets"].items():
        lines.append(f"| `{t}` | {row['generated']} | {row['sampled']} | {row['run']} | {row['killed']} | "
                     f"{row['survived']} | {row['timed_out']} |")
    if r["survivors"]:
        lines += ["", "| surviving mutant | line after the mutation | verdict |", "|---|---|---|"]
        for s in r["survivors"]:
            verdict = (f"equivalent: {s['equivalent']}" if s["equivalent"] else
                       f"a gap, killed since by `{s['killed_since_by'].removeprefix('tests/')}`"
                       if s["killed_since_by"] else
                       f"killed by `{s['killed_elsewhere_by'].removeprefix('tests/')}`, a test outside the "
                       "module's list (added to it since)" if s.get("killed_elsewhere_by") else "not looked at yet")
            mutated = s["mutated"].replace("|", "\\|")
            lines.append(f"| `{s['module'].removeprefix('influence/')}:{s['line']}` {s['operator']} | "
                         f"`{mutated}` | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--session", type=Path, default=SESSION, help="session folder (default: runs/mutation-tool)")
    parser.add_argument("--per-target", type=int, default=20, help="mutants sampled per target (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default: 0)")
    parser.add_argument("--budget", type=float, default=480,
                        help="start no mutant after this many seconds; run again to resume (default: 480)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per mutant's tests (default: 240)")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="run every N-th mutant from the I-th, for N processes at once (default: 0/1)")
    parser.add_argument("--report", type=Path, metavar="JSON", help="write the results file instead of running")
    parser.add_argument("--render", type=Path, metavar="JSON", help="print the docs section of a results file")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())), end="")
        return 0
    if args.report:
        results = report(args.session, args.per_target, args.seed, args.timeout)
        args.report.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.report, results)
        print(render(results), end="")
        return 0
    i, n = (int(x) for x in args.shard.split("/"))
    run(args.session, args.per_target, args.seed, args.budget, args.timeout, (i, n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
