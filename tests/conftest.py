"""
Hooks for the whole suite: the ``required`` mark (``tests.harness.requirements``) is checked
before a test's fixtures run, so a test that cannot run on this machine fails under ``$CI``
and is skipped, saying why, otherwise; a unit test (no ``integration`` or ``e2e`` marker)
that starts a process or listens on a socket fails; and tests marked ``runs_last`` run
after all others, with the ``whole_suite`` fixture telling them whether this run can judge
the whole suite (checks of what the other tests exercised, such as every documented API
response).
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Optional

import pytest

from tests.harness.requirements import MARK, require

#: Markers of the tests that may start real processes, devices and servers.
REAL_WORLD_MARKERS = ("integration", "e2e")

#: The mark of a test that runs after every other test of the run.
RUNS_LAST = "runs_last"

#: The tests this run deselected (``-m``, ``-k``), kept for ``whole_suite``.
_DESELECTED = pytest.StashKey[list]()


def pytest_configure(config):
    """Declare the ``required`` and ``runs_last`` marks."""
    config.addinivalue_line(
        "markers", f"{MARK}(condition, reason): the test needs the machine to satisfy "
                   f"condition; it fails under $CI and skips otherwise when it does not")
    config.addinivalue_line(
        "markers", f"{RUNS_LAST}: run after every other test (checks of what they did)")
    config.stash[_DESELECTED] = []


def pytest_deselected(items):
    """Remember what ``-m`` and ``-k`` deselected."""
    if items:
        items[0].config.stash[_DESELECTED].extend(items)


def pytest_collection_modifyitems(items):
    """Move the tests marked ``runs_last`` to the end, keeping the order of the others."""
    items.sort(key=lambda item: item.get_closest_marker(RUNS_LAST) is not None)


def _not_whole_suite(session) -> Optional[str]:
    """Why this run does not cover every unit test of the suite, or None if it does."""
    config = session.config
    if config.option.keyword:
        return f"tests were selected by name (-k {config.option.keyword!r})"
    if any("::" in argument for argument in config.args):
        return "single tests were selected by node id"
    deselected = config.stash[_DESELECTED]
    unit = [item.nodeid for item in deselected
            if not any(item.get_closest_marker(m) for m in REAL_WORLD_MARKERS)]
    if unit:
        return f"{len(unit)} unit tests were deselected (e.g. {unit[0]})"
    collected = {Path(item.path) for item in [*session.items, *deselected]}
    modules = sorted(Path(config.rootpath, "tests").rglob("test_*.py"))
    missing = [str(m.relative_to(config.rootpath)) for m in modules if m not in collected]
    if missing:
        return f"only some test modules were collected ({len(missing)} not, e.g. {missing[0]})"
    return None


@pytest.fixture
def whole_suite(request) -> Optional[str]:
    """None when this run covers every unit test of the suite; else why it does not (a
    ``runs_last`` check of what other tests exercised can then only skip)."""
    return _not_whole_suite(request.session)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Check every ``required`` mark of the test (its own, its class's, its module's)."""
    for mark in item.iter_markers(MARK):
        require(*mark.args)


class ProcessInUnitTest(AssertionError):
    """A unit test (no ``integration`` or ``e2e`` marker) tried to start a process or to
    listen on a socket."""


def _refuse_processes(spawned: list) -> list:
    """Make every way to start a process or listen on a socket raise ``ProcessInUnitTest``
    (noted in ``spawned``); the (owner, name, original) triples to put back."""
    targets = [(subprocess.Popen, "_execute_child"), (os, "fork"), (os, "posix_spawn"),
               (os, "posix_spawnp"), (socket.socket, "listen")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in targets
             if hasattr(owner, name)]

    def refuse(name):
        def refused(*args, **kwargs):
            spawned.append(name)
            raise ProcessInUnitTest(
                f"a unit test started a process or a server ({name}): mark it "
                f"pytest.mark.integration")
        return refused

    for owner, name, _ in saved:
        setattr(owner, name, refuse(name))
    return saved


#: Whether a test's call failed (then its teardown does not report the same process again).
_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Note whether the test's call failed."""
    outcome = yield
    if call.when == "call":
        item.stash[_CALL_FAILED] = outcome.get_result().failed


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request):
    """A test without the ``integration`` or ``e2e`` marker that starts a process or listens
    on a socket (a real server) fails, even if the code under test swallowed the error
    (``make test-unit`` stays pure)."""
    if any(request.node.get_closest_marker(m) for m in REAL_WORLD_MARKERS):
        yield
        return
    spawned: list = []
    saved = _refuse_processes(spawned)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
    if spawned and not request.node.stash.get(_CALL_FAILED, False):
        pytest.fail(f"this unit test started processes or servers ({', '.join(spawned)}): "
                    f"mark it pytest.mark.integration", pytrace=False)
