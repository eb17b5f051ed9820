"""
Test gates: named points in pyflock where a process stops when a test asks it to, so that
the test can kill it exactly there (crash injection, like etcd's failpoints). A gate is
closed only while the environment variable ``PYFLOCK_TEST_GATES`` names a folder holding a
FIFO of the gate's name: the process then writes its pid to ``<name>.pid`` beside it and
waits until the test writes a line into the FIFO (or kills it). Otherwise passing a gate
costs one environment lookup. ``tests.harness.agents.CommandGates`` closes and opens them,
as it does for the external commands it wraps.
"""

from __future__ import annotations

import os
import stat

#: The environment variable naming the folder of closed gates.
GATES_VARIABLE = "PYFLOCK_TEST_GATES"


def gate(name: str) -> None:
    """Stop at the gate ``name`` while a test holds it closed (blocking)."""
    folder = os.environ.get(GATES_VARIABLE)
    if not folder:
        return
    path = os.path.join(folder, name)
    try:
        if not _is_fifo(path):
            return
        temporary = f"{path}.pid.tmp"
        with open(temporary, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(temporary, f"{path}.pid")
        with open(path) as fifo:
            fifo.readline()
    except OSError:
        return  # the test opened the gate meanwhile


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


__all__ = ["GATES_VARIABLE", "gate"]
