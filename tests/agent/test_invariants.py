"""
The agent checks its invariants with explicit errors, never with bare ``assert``
statements, which ``python -O`` removes.
"""

import ast
from pathlib import Path

import pyflock.agent

#: Modules still being rewritten elsewhere (issue 7, point 2: the plugin core).
EXEMPT = {"_plugin.py"}


def test_no_bare_asserts():
    """No module of ``pyflock.agent`` (the plugin aside) holds an ``assert`` statement."""
    root = Path(pyflock.agent.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name in EXEMPT:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assert):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert found == []
