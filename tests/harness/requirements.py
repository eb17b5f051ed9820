"""
What a test needs from the machine, checked one way everywhere: a test that cannot run here
(no root, no ``losetup``, no dockerd, ...) **fails** with the reason when the environment
variable ``CI`` is set (a machine meant to run it must not pass silently), and is skipped
with the same reason otherwise (``pytest -rs`` lists them).

Call ``require(condition, reason)`` inside a test, fixture or ``setUp``; or mark a test,
class or module with ``required(condition, reason)`` (``tests/conftest.py`` checks the mark
before the test's fixtures run). ``require_root()`` and ``ROOT`` are the common case.

A skip that is not about the machine (a backend whose devices are not real files) is an
ordinary ``pytest.skip``/``skipTest`` that says why; this module is for the machine only.
"""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["CI_VARIABLE", "MARK", "ROOT", "ROOT_REASON", "missing_commands", "require", "require_commands",
           "require_root", "required", "running_as_root"]

#: The environment variable that, when set, turns a test that cannot run here into a failure.
CI_VARIABLE = "CI"

#: The name of the mark that ``required`` puts on a test (read by tests/conftest.py).
MARK = "required"


def require(condition: object, reason: str) -> None:
    """Return if ``condition`` is true; else fail with ``reason`` under ``$CI``, skip otherwise."""
    if condition:
        return
    if os.environ.get(CI_VARIABLE):
        pytest.fail(f"{reason} (${CI_VARIABLE} is set, so a test that cannot run here "
                    f"fails instead of being skipped)", pytrace=False)
    pytest.skip(reason)


def required(condition: object, reason: str) -> pytest.MarkDecorator:
    """A mark for a test, class or module: ``require(condition, reason)`` before it runs."""
    return getattr(pytest.mark, MARK)(bool(condition), reason)


def running_as_root() -> bool:
    """Whether this process runs as root (loop devices, mounts and namespaces need it)."""
    return os.geteuid() == 0


#: The reason given by tests that need root.
ROOT_REASON = ("needs root (loop devices, mounts, mount namespaces): run pytest as root, "
               "e.g. sudo .venv/bin/pytest")

#: The mark of a test, class or module that needs root.
ROOT = required(running_as_root(), ROOT_REASON)


def require_root() -> None:
    """``require`` that this process runs as root."""
    require(running_as_root(), ROOT_REASON)


def missing_commands(*commands: str) -> list[str]:
    """Those of ``commands`` that are not on ``PATH``."""
    return [command for command in commands if shutil.which(command) is None]


def require_commands(*commands: str) -> None:
    """``require`` that every one of ``commands`` is on ``PATH``, naming those missing."""
    missing = missing_commands(*commands)
    require(not missing, f"needs {', '.join(missing)} on PATH (deploy/local/install.sh "
                         f"installs them)")
