"""The packages' layering (docs/architecture.md, "Code layout"): who may import whom."""

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
