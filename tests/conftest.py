"""
Hooks for the whole suite: the ``required`` mark (``tests.harness.requirements``) is checked
before a test's fixtures run, so a test that cannot run on this machine fails under ``$CI``
and is skipped, saying why, otherwise.
"""

from __future__ import annotations

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
