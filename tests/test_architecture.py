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
APPLICATIONS = ("lm", "query", "cli", "reference", "testing", "pretrained")

# package (first component under influence/) -> what it may import of influence
ALLOWED = {
    "errors": set(),
    "_version": set(),
    "tasks": set(),
    "testing": set(),
    "runtime": {"errors", "_version"},
    "capture": {"errors"},
    "curvature": {"capture", "runtime", "errors"},
    "factors": {"curvature", "capture", "runtime", "errors"},
    "fit": {"factors", "curvature", "capture", "runtime", "errors"},
    "scoring": {"factors", "curvature", "capture", "runtime", "errors", "index"},
    # the gradient index builds on the scoring's query side and result types
    "index": {"scoring", "factors", "curvature", "capture", "runtime", "errors", "_version"},
    "reference": {"capture", "curvature", "runtime", "errors", "tasks"},
    # a run fits its own factors (lm.run); a workspace opens a pretrained checkpoint (lm.workspace)
    "lm": {"errors", "runtime", "tasks", "fit", "factors", "pretrained"},
    "query": {"scoring", "factors", "tasks", "runtime", "errors", "lm"},
    "pretrained": {"errors"},  # Hugging Face checkpoints: models to study, like lm, but knowing nothing of it
}
LAZY_ONLY = {("query", "lm"),  # token offsets of influence.lm runs, imported inside a function
             ("scoring", "index")}  # the index= dispatch of pairwise_scores / rank_training: no import cycle


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


def test_importing_the_library_loads_no_application():
    import subprocess
    import sys

    code = ("import sys, influence; loaded = [m for m in sys.modules if m.split('.')[:2] in "
            f"[['influence', a] for a in {APPLICATIONS!r}]]; print(loaded); assert not loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
