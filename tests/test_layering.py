"""The code's shape (docs/architecture.md, "Code layout"): who may import whom, and no class
in agent/ or control/ over 350 lines."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: For each package folder, the pyflock packages its modules may import.
ALLOWED = {
    "common": {"common"},
    "control": {"common", "control"},
    "agent": {"common", "agent"},
    "cli": {"common", "cli"},
}


def pyflock_imports(source: str) -> set[str]:
    """The pyflock packages (``common``, ``control``, ...) a module's source imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "pyflock" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_pyflock_imports_reads_every_form():
    """Plain, from and nested imports all count; relative and other packages do not."""
    source = ("import pyflock.agent._fs\nfrom pyflock.control import x\n"
              "def f():\n    from pyflock.cli._cli import main\nimport os\nfrom . import y\n")
    assert pyflock_imports(source) == {"agent", "control", "cli"}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package):
    """No module of ``package`` imports a pyflock package the layering forbids."""
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        extra = pyflock_imports(path.read_text()) - ALLOWED[package]
        if extra:
            wrong[str(path.relative_to(ROOT))] = sorted(extra)
    assert wrong == {}, f"imports the layering forbids (docs/architecture.md): {wrong}"


#: The longest a class in ``agent/`` or ``control/`` may be (docs/architecture.md).
MAX_CLASS_LINES = 350


def long_classes(source: str, limit: int = MAX_CLASS_LINES) -> dict[str, int]:
    """The classes of a module's source longer than ``limit`` lines, with their length."""
    return {node.name: node.end_lineno - node.lineno + 1
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > limit}


def test_long_classes_counts_lines():
    """A class of 4 lines is over a limit of 3 and not over a limit of 4."""
    source = "class A:\n    x = 1\n\n    y = 2\n"
    assert (long_classes(source, 3), long_classes(source, 4)) == ({"A": 4}, {})


@pytest.mark.parametrize("package", ["agent", "control"])
def test_no_long_classes(package):
    """No class in ``package`` is over ``MAX_CLASS_LINES`` lines: split it by concern."""
    found = {f"{path.relative_to(ROOT)}:{name}": length
             for path in sorted((ROOT / package).rglob("*.py"))
             for name, length in long_classes(path.read_text()).items()}
    assert found == {}, f"classes over {MAX_CLASS_LINES} lines: {found}"
