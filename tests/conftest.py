"""
Hooks for the whole suite: the ``required`` mark (``tests.harness.requirements``) is checked
before a test's fixtures run, so a test that cannot run on this machine fails under ``$CI``
and is skipped, saying why, otherwise; and a unit test (no ``integration`` or ``e2e``
marker) that starts a process fails.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.harness.requirements import MARK, require


def pytest_configure(config):
    """Declare the ``required`` mark."""
    config.addinivalue_line(
        "markers", f"{MARK}(condition, reason): the test needs the machine to satisfy "
                   f"condition; it fails under $CI and skips otherwise when it does not")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Check every ``required`` mark of the test (its own, its class's, its module's)."""
    for mark in item.iter_markers(MARK):
        require(*mark.args)


#: Markers of the tests that may start real processes, devices and servers.
REAL_WORLD_MARKERS = ("integration", "e2e")


class ProcessInUnitTest(AssertionError):
    """A unit test (no ``integration`` or ``e2e`` marker) tried to start a process."""


def _refuse_processes(spawned: list) -> list:
    """Make every way to start a process raise ``ProcessInUnitTest`` (noted in ``spawned``);
    the (owner, name, original) triples to put back."""
    targets = [(subprocess.Popen, "_execute_child"), (os, "fork"), (os, "posix_spawn"),
               (os, "posix_spawnp")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in targets
             if hasattr(owner, name)]

    def refuse(name):
        def refused(*args, **kwargs):
            spawned.append(name)
            raise ProcessInUnitTest(
                f"a unit test started a process ({name}): mark it pytest.mark.integration")
        return refused

    for owner, name, _ in saved:
        setattr(owner, name, refuse(name))
    return saved


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request):
    """A test without the ``integration`` or ``e2e`` marker that starts a process fails,
    even if the code under test swallowed the error (``make test-unit`` stays pure)."""
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
    if spawned:
        pytest.fail(f"this unit test started processes ({', '.join(spawned)}): mark it "
                    f"pytest.mark.integration", pytrace=False)
