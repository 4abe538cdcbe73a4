"""Every exception the package raises on purpose is an InfluenceError (influence/errors.py),
so ``except influence.InfluenceError`` catches all of them: found by reading every
``raise`` statement of influence/ with ``ast`` and resolving the raised name in its
module."""

import ast
import importlib
from pathlib import Path

import pytest

import influence
from influence import errors

PACKAGE = Path(influence.__file__).parent
# Raised on purpose but not errors of the library: PEP 562's AttributeError for unknown
# names, and SIGTERM turned into a KeyboardInterrupt by the command line.
EXEMPT = {("influence/__init__.py", "AttributeError"), ("influence/cli/__init__.py", "Terminated")}


def _raised_names(path: Path):
    """(line, name) of each ``raise NAME(...)``/``raise NAME``/``raise mod.NAME(...)``;
    re-raising a caught exception (``raise``, ``raise e``) is not a new error."""
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Raise) or node.exc is None:
            continue
        target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        if isinstance(target, ast.Attribute):
            yield node.lineno, ast.unparse(target)
        elif isinstance(target, ast.Name) and (isinstance(node.exc, ast.Call) or target.id[:1].isupper()):
            yield node.lineno, target.id


def test_every_exception_the_package_raises_on_purpose_is_an_influence_error():
    import builtins

    offenders, local = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        module_name = rel[:-3].replace("/", ".").removesuffix(".__init__")
        if module_name.endswith("__main__"):
            continue
        module = importlib.import_module(module_name)
        for line, name in _raised_names(path):
            if (rel, name.split(".")[-1]) in EXEMPT:
                continue
            head, *rest = name.split(".")
            # ``inf`` is the package, imported inside functions (``import influence as inf``).
            value = influence if head == "inf" else vars(module).get(head, getattr(builtins, head, None))
            for part in rest:
                value = getattr(value, part, None)
            if value is None:
                local.append(f"{rel}:{line} {name}")  # a local variable: checked below by hand
            elif not (isinstance(value, type) and issubclass(value, errors.InfluenceError)):
                offenders.append(f"{rel}:{line} raise {name}")
    assert offenders == [], "raise an influence.errors class instead (add one there if needed):\n" + "\n".join(
        offenders)
    # The only raise of a local name: store.py picks ModelMismatch or InfluenceError.
    assert [entry.split(":")[0] for entry in local] == ["influence/index/store.py"], local


@pytest.mark.parametrize(("cls", "builtin"), [
    (errors.ConfigError, ValueError), (errors.ConfigTypeError, TypeError),
    (errors.NonFiniteError, FloatingPointError), (errors.MissingFileError, FileNotFoundError),
    (errors.Unsupported, NotImplementedError), (errors.MissingPackageError, ModuleNotFoundError),
])
def test_each_class_is_also_the_builtin_it_replaces(cls, builtin):
    assert issubclass(cls, errors.InfluenceError) and issubclass(cls, builtin)
    with pytest.raises(builtin, match="what is wrong"):
        raise cls("what is wrong")
    assert getattr(influence, cls.__name__) is cls


def test_missing_package_error_keeps_the_module_name():
    e = errors.MissingPackageError("needs tokenizers: pip install 'jax-influence[lm]'", name="tokenizers")
    assert e.name == "tokenizers" and isinstance(e, ModuleNotFoundError)
