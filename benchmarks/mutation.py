"""Mutation testing of the math: curated one-line bugs put into curvature/, scoring/,
index/compress.py and tasks.py, each run against the tests that should catch it.

A mutant is *killed* when its tests fail (or error), and *survives* when they pass: a
surviving mutant is a bug the suite would let through. Each mutant runs in a fresh copy
of the package (a temporary folder), so the working tree is never modified.

Run (slow: one pytest process per mutant), then render the section of docs/testing.md::

    nice -n 10 python -m benchmarks.mutation --out docs/testing/mutation.json
    python -m benchmarks.mutation --render docs/testing/mutation.json

``--only ID ...`` runs some mutants; ``--tests-per-mutant N`` runs only the first N test
targets of each (a reduced run; the results file records which targets ran).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a mutant's copy holds: the package and what its tests import.
COPIED = ("influence", "tests", "experiments", "benchmarks", "pyproject.toml")


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str          # relative to the repository root
    find: str          # must occur exactly once in the file
    replace: str
    what: str          # the bug, in words
    tests: tuple[str, ...]


MUTANTS = (
    Mutant("token-mask-last", "influence/tasks.py",
           "jnp.concatenate([m, jnp.zeros((m.shape[0], 1), m.dtype)], axis=1)",
           "jnp.concatenate([m, jnp.ones((m.shape[0], 1), m.dtype)], axis=1)",
           "CausalLM counts the last position (it predicts nothing) in A and S",
           ("tests/curvature/test_token_convention.py", "tests/curvature/test_curvature.py")),
    Mutant("targets-shift", "influence/tasks.py", "return batch[self.input_key][:, 1:]",
           "return batch[self.input_key][:, :-1]", "CausalLM predicts the current token, not the next",
           ("tests/curvature/test_token_convention.py", "tests/test_tasks.py")),
    Mutant("fisher-sqrt", "influence/tasks.py", "psi = jnp.sqrt(p) * (outputs - mean_logit)",
           "psi = p * (outputs - mean_logit)", "exact categorical Fisher directions use p instead of √p",
           ("tests/curvature/test_curvature.py::test_exact_fisher_eigenvalues_equal_projected_gauss_newton",
            "tests/test_fisher.py")),
    Mutant("int4-levels", "influence/index/compress.py", 'LEVELS = {"int8": 127, "int4": 7}',
           'LEVELS = {"int8": 127, "int4": 8}', "int4 uses 8 levels: +8 wraps to -8 in four bits",
           ("tests/index/test_int_roundtrip.py", "tests/index/test_index.py")),
    Mutant("int8-levels", "influence/index/compress.py", 'LEVELS = {"int8": 127, "int4": 7}',
           'LEVELS = {"int8": 128, "int4": 7}', "int8 uses 128 levels: +128 wraps to -128",
           ("tests/index/test_int_roundtrip.py", "tests/index/test_index.py")),
    Mutant("int4-pack-shift", "influence/index/compress.py", "(q[:, :half] & 0xF) | (q[:, half:] << 4)",
           "(q[:, :half] & 0xF) | (q[:, half:] << 3)", "int4 packs the high nibble one bit low",
           ("tests/index/test_int_roundtrip.py", "tests/index/test_index.py")),
    Mutant("int-decode-scale", "influence/index/compress.py", "rows = levels(parts, dtype) * parts[1][:, None]",
           "rows = levels(parts, dtype) * parts[1][:1, None]", "integer rows decoded with the first row's scale",
           ("tests/index/test_int_roundtrip.py", "tests/index/test_index.py")),
    Mutant("damping-half", "influence/curvature/layer.py",
           "v = v / (curvature.eigenvalues.astype(v.dtype) + damping)",
           "v = v / (curvature.eigenvalues.astype(v.dtype) + 0.5 * damping)", "preconditioning adds half the damping",
           ("tests/curvature/test_curvature.py::test_kfac_preconditioning_equals_dense_kronecker_inverse",
            "tests/curvature/test_curvature.py")),
    Mutant("damping-default", "influence/curvature/layer.py", "DEFAULT_DAMPING_FACTOR = 0.1",
           "DEFAULT_DAMPING_FACTOR = 0.01", "default damping 0.01 × mean Λ instead of 0.1 ×",
           ("tests/curvature/test_curvature.py::test_default_damping_is_a_tenth_of_mean_eigenvalue",
            "tests/scoring/test_pairwise.py")),
    Mutant("a-unweighted", "influence/curvature/covariance.py",
           'a_sum = jnp.einsum("bti,btj->ij", a * weights[..., None], a)',
           'a_sum = jnp.einsum("bti,btj->ij", a, a)', "A ignores the token weights (padding counted)",
           ("tests/curvature/test_token_convention.py", "tests/curvature/test_curvature.py")),
    Mutant("a-count", "influence/curvature/covariance.py", '/ n_tokens[name], name, "A")',
           '/ (n_tokens[name] + 1), name, "A")', "A divided by one token too many",
           ("tests/curvature/test_token_convention.py", "tests/curvature/test_curvature.py")),
    Mutant("lambda-example-weights", "influence/curvature/eigenvalues.py",
           "a2 = (a[:, 0] ** 2) * example_weights[:, None]", "a2 = (a[:, 0] ** 2)",
           "diagonal Λ ignores which examples count (padding rows of a batch)",
           ("tests/curvature/test_curvature.py::test_ekfac_eigenvalues_equal_mean_square_of_rotated_per_example_gradients",
            "tests/curvature/test_curvature.py")),
    Mutant("self-square", "influence/scoring/self_influence.py", "return jnp.sum(dw * dw * weights)",
           "return jnp.sum(dw * weights)", "self-influence sums gradients instead of their squares",
           ("tests/scoring/test_pairwise.py::test_per_layer_scores_sum_to_total_and_self_scores_match_pairwise",
            "tests/scoring/test_pairwise.py")),
    Mutant("contraction-transpose", "influence/scoring/contractions.py",
           'return jnp.einsum("bti,bij,btj->bt", a, queries.full, g)',
           'return jnp.einsum("bti,bji,btj->bt", a, queries.full, g)',
           "per-token scores contract the query gradient transposed",
           ("tests/scoring/test_per_token.py", "tests/scoring/test_ranking.py")),
    Mutant("top-k-sign", "influence/scoring/topk.py", 'np.argsort(-scores, axis=-1, kind="stable")[..., :k]',
           'np.argsort(scores, axis=-1, kind="stable")[..., :k]', "top-k keeps the lowest scores",
           ("tests/scoring/test_ranking.py",)),
)


def apply(mutant: Mutant, root: Path) -> None:
    """Apply ``mutant`` to the copy at ``root`` (its ``find`` text must occur once)."""
    path = root / mutant.file
    text = path.read_text()
    if text.count(mutant.find) != 1:
        raise SystemExit(f"mutant {mutant.id}: {mutant.find!r} occurs {text.count(mutant.find)} times in "
                         f"{mutant.file}; update benchmarks/mutation.py")
    path.write_text(text.replace(mutant.find, mutant.replace))


def run_mutant(mutant: Mutant, tests: tuple[str, ...], timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.id}-") as tmp:
        root = Path(tmp)
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "runs"))
            else:
                shutil.copy2(src, root / name)
        apply(mutant, root)
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                  cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
        seconds = time.perf_counter() - t0
    # pytest: 0 all passed, 1 some failed, 2-4 errors/usage, 5 nothing collected.
    outcome = {0: "survived", 5: "no tests"}.get(code, "timeout" if code is None else "killed")
    return {"id": mutant.id, "file": mutant.file, "what": mutant.what, "tests": list(tests), "outcome": outcome,
            "seconds": round(seconds, 1)}


def render(results: dict) -> str:
    """The mutation section of docs/testing.md from a results file."""
    ran = {r["id"]: r for r in results["mutants"]}
    killed = sum(r["outcome"] == "killed" for r in ran.values())  # a timeout is not counted as killed
    n = results.get("tests_per_mutant")
    against = f"the first {n} listed test file(s) of each" if n else "all its listed test files"
    lines = [f"{killed} of the {len(ran)} mutants run were killed ({killed / max(len(ran), 1):.0%}; "
             f"{len(MUTANTS) - len(ran)} of the {len(MUTANTS)} curated mutants not run yet), each run against "
             f"{against} (`{results['command']}`; load average up to {results['load']} on the shared 2-core "
             "machine).", "",
             "| mutant | file | the bug | run against | outcome |", "|---|---|---|---|---|"]
    for m in MUTANTS:
        r = ran.get(m.id)
        tests = ", ".join(f"`{t.removeprefix('tests/')}`" for t in (r["tests"] if r else m.tests))
        lines.append(f"| {m.id} | `{m.file.removeprefix('influence/')}` | {m.what} | {tests} | "
                     f"{r['outcome'] if r else 'not run'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "testing" / "mutation.json",
                        help="results file (default: docs/testing/mutation.json)")
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    parser.add_argument("--tests-per-mutant", type=int, help="run only the first N test targets of each mutant")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant (default: 900)")
    parser.add_argument("--render", type=Path, metavar="RESULTS", help="print the docs section of a results file")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())), end="")
        return 0
    chosen = [m for m in MUTANTS if not args.only or m.id in args.only]
    command = "python -m benchmarks.mutation" + (f" --tests-per-mutant {args.tests_per_mutant}"
                                                 if args.tests_per_mutant else "")
    # With --only, the other mutants' rows of an earlier run are kept (several partial
    # runs make one results file); each row says which tests it ran against.
    earlier = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {"mutants": []}
    rows = {r["id"]: r for r in earlier["mutants"]}
    loads = [earlier["load"]] if "load" in earlier else []  # the highest load of the runs merged
    for m in chosen:
        tests = m.tests[: args.tests_per_mutant] if args.tests_per_mutant else m.tests
        loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
        rows[m.id] = run_mutant(m, tests, args.timeout)
        print(f"{m.id}: {rows[m.id]['outcome']} ({rows[m.id]['seconds']} s)", flush=True)
        results = {"command": command, "tests_per_mutant": args.tests_per_mutant, "load": round(max(loads), 1),
                   "mutants": [rows[x.id] for x in MUTANTS if x.id in rows]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")  # after each mutant: a long run keeps its rows
    print(render(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
