"""The tree keeps the layering of docs/architecture.md: what may import what.

Read from the source (every ``import``/``from`` statement of every module, at any depth,
function-local imports included), so a violation fails here before it tangles the tree.
"""

import ast
from pathlib import Path

import pytest

import influence

ROOT = Path(influence.__file__).parent
CORE = ("errors", "tasks", "capture", "curvature", "factors", "fit", "scoring", "index", "runtime", "_version")
APPLICATIONS = ("lm", "query", "cli", "reference", "testing", "unrolled", "diagnose", "pretrained")

# package (first component under influence/) -> what it may import of influence
ALLOWED = {
    "errors": set(),
    "_version": set(),
    "tasks": {"errors"},
    "testing": {"errors"},
    "runtime": {"errors", "_version"},
    "capture": {"errors"},
    "curvature": {"capture", "runtime", "errors"},
    "factors": {"curvature", "capture", "runtime", "errors"},
    "fit": {"factors", "curvature", "capture", "runtime", "errors"},
    "scoring": {"factors", "curvature", "capture", "runtime", "errors"},
    # the gradient index builds on the scoring: its query side, and it is a source of score blocks
    "index": {"scoring", "factors", "curvature", "capture", "runtime", "errors", "_version"},
    "reference": {"capture", "curvature", "runtime", "errors", "tasks", "fit", "scoring", "unrolled"},
    # training runs as functions of example weights; lm only for the `influence train` adapter
    "unrolled": {"scoring", "fit", "errors", "tasks", "lm"},
    # a run fits its own factors (lm.run); a workspace opens a pretrained checkpoint (lm.workspace)
    "lm": {"errors", "runtime", "tasks", "fit", "pretrained"},
    "query": {"scoring", "factors", "tasks", "runtime", "errors", "lm"},
    # strategy vs exact influence on a subset: fits, scores, and the exact references
    "diagnose": {"fit", "factors", "scoring", "reference", "capture", "runtime", "errors"},
    "pretrained": {"errors"},  # Hugging Face checkpoints: models to study, like lm, but knowing nothing of it
}
LAZY_ONLY = {("query", "lm"),  # token offsets of influence.lm runs, imported inside a function
             ("unrolled", "lm")}  # lm_run, the adapter of `influence train` runs


def _package(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path):
    """(imported influence package, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "influence"]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "influence" and len(parts) > 1:
                yield parts[1], id(node) in top_level


MODULES = sorted(p for p in ROOT.rglob("*.py") if _package(p) not in ("__init__", "__main__", "cli"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_imports_only_what_its_layer_may(path):
    own = _package(path)
    allowed = ALLOWED[own] | {own}
    for imported, top_level in _imports(path):
        if imported in allowed and not ((own, imported) in LAZY_ONLY and top_level):
            continue
        raise AssertionError(
            f"influence/{path.relative_to(ROOT)} imports influence.{imported}"
            f"{' at module level' if (own, imported) in LAZY_ONLY else ''}; "
            f"{own} may import {sorted(ALLOWED[own]) or 'nothing of influence'} (docs/architecture.md, Layering)"
        )


def test_every_allowed_import_is_used():
    """The table claims no more than the code does: each allowed edge is an import
    (``errors`` aside: any package may raise the library's errors)."""
    used = {(_package(p), imported) for p in MODULES for imported, _ in _imports(p)}
    unused = {(own, other) for own, others in ALLOWED.items() for other in others if other != "errors"} - used
    assert not unused, f"ALLOWED lists imports no module makes: {sorted(unused)}; remove them"


# docs/architecture.md's layering table is generated from ALLOWED and LAZY_ONLY
# (`python -m tests.test_architecture` rewrites it) and held to them here.
DOC = ROOT.parent / "docs" / "architecture.md"
BEGIN, END = "<!-- imports:begin (python -m tests.test_architecture) -->", "<!-- imports:end -->"
FIXED_ROWS = ["| `cli/` | anything |",
              "| `influence/__init__.py` | every public name lazily, on first use (PEP 562): `import influence` "
              "loads no JAX |"]


def _name(package: str) -> str:
    return f"`{package}.py`" if (ROOT / f"{package}.py").is_file() else f"`{package}/`"


def import_table() -> str:
    """The markdown table of who may import whom (from :data:`ALLOWED`, :data:`LAZY_ONLY`)."""
    rows = ["| package | may import |", "|---|---|"]
    for own, others in ALLOWED.items():
        names = [f"`{o}`" + (" (only inside a function)" if (own, o) in LAZY_ONLY else "") for o in sorted(others)]
        rows.append(f"| {_name(own)} | {', '.join(names) or 'nothing of `influence`'} |")
    return "\n".join(rows + FIXED_ROWS)


def _doc_with_table(text: str) -> str:
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{import_table()}\n{END}{tail}"


def test_the_documented_import_table_is_the_checked_one():
    text = DOC.read_text()
    assert _doc_with_table(text) == text, "stale import table (docs/architecture.md): python -m tests.test_architecture"


def _module_graph(roots):
    """``{module: modules of the same tree it imports}`` (any depth, function-local too)."""
    files = {}
    for root in roots:
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != module and files[name].name != "__init__.py":  # package faces hand names on
                    targets.add(name)
        graph[module] = targets
    return graph


def _loops(graph):
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, loops = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                loops.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return loops


def test_no_import_loops():
    roots = [ROOT] + [ROOT.parent / d for d in ("experiments", "benchmarks") if (ROOT.parent / d).is_dir()]
    assert _loops(_module_graph(roots)) == []


def test_the_loop_check_finds_a_loop():
    assert _loops({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_importing_the_library_loads_no_application():
    import subprocess
    import sys

    code = ("import sys, influence; loaded = [m for m in sys.modules if m.split('.')[:2] in "
            f"[['influence', a] for a in {APPLICATIONS!r}]]; print(loaded); assert not loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


if __name__ == "__main__":
    DOC.write_text(_doc_with_table(DOC.read_text()))
    print(f"wrote the import table of {DOC}")
