"""
The suite's own rules: a test that cannot run on this machine fails under ``$CI`` and skips
otherwise (``tests.harness.requirements``); ``unwritable`` stops root too; a unit test cannot
start a process; a check of the whole suite knows when a run is partial (tests/conftest.py).
"""

import os
import socket
import subprocess
from types import SimpleNamespace

import pytest

from tests.conftest import ProcessInUnitTest, _not_whole_suite, _refuse_processes
from tests.harness.files import unwritable
from tests.harness.requirements import (
    CI_VARIABLE, missing_commands, require, require_commands, required,
)


def test_require_passes_when_met(monkeypatch):
    """A condition that holds neither fails nor skips, with or without ``$CI``."""
    monkeypatch.setenv(CI_VARIABLE, "1")
    require(True, "never shown")
    monkeypatch.delenv(CI_VARIABLE)
    require(True, "never shown")


def test_require_fails_under_ci(monkeypatch):
    """Under ``$CI`` an unmet requirement fails the test, giving the reason."""
    monkeypatch.setenv(CI_VARIABLE, "true")
    with pytest.raises(pytest.fail.Exception, match="needs a unicorn"):
        require(False, "needs a unicorn")


def test_require_skips_without_ci(monkeypatch):
    """Without ``$CI`` an unmet requirement skips the test with the reason."""
    monkeypatch.delenv(CI_VARIABLE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="^needs a unicorn$"):
        require(False, "needs a unicorn")


def test_required_mark_carries_its_check():
    """``required`` is a mark holding the condition (as a bool) and the reason."""
    mark = required("", "needs a unicorn").mark
    assert (mark.name, mark.args) == ("required", (False, "needs a unicorn"))


def test_missing_commands_named(monkeypatch):
    """Commands not on PATH are named, and ``require_commands`` says which."""
    monkeypatch.delenv(CI_VARIABLE, raising=False)
    assert missing_commands("sh", "no-such-command-here") == ["no-such-command-here"]
    with pytest.raises(pytest.skip.Exception, match="needs no-such-command-here on PATH"):
        require_commands("sh", "no-such-command-here")


def test_unwritable_folder(tmp_path):
    """Inside ``unwritable`` no file can be made in the folder, even by root; afterwards
    it can."""
    with unwritable(tmp_path):
        with pytest.raises(PermissionError):
            (tmp_path / "f").write_text("x")
    (tmp_path / "f").write_text("x")


def test_unit_test_cannot_start_a_process_or_server():
    """Every way to start a process, and listening on a socket, raise
    ``ProcessInUnitTest`` and are noted."""
    spawned = []
    saved = _refuse_processes(spawned)
    try:
        with pytest.raises(ProcessInUnitTest, match="mark it pytest.mark.integration"):
            subprocess.run(["true"])
        with pytest.raises(ProcessInUnitTest):
            os.posix_spawnp("true", ["true"], os.environ)
        with socket.socket() as server, pytest.raises(ProcessInUnitTest):
            server.bind(("127.0.0.1", 0))
            server.listen()
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
    assert spawned == ["_execute_child", "posix_spawnp", "listen"]


def _session(tmp_path, items=(), deselected=(), keyword="", args=("tests",)):
    """A stand-in for a pytest session over a suite in ``tmp_path/tests``."""
    from tests.conftest import _DESELECTED
    config = SimpleNamespace(option=SimpleNamespace(keyword=keyword), args=list(args),
                             rootpath=tmp_path, stash={_DESELECTED: list(deselected)})
    return SimpleNamespace(config=config, items=list(items))


def _item(path, marker=None):
    """A stand-in for a collected test in module ``path``, with ``marker`` if given."""
    return SimpleNamespace(path=path, nodeid=f"{path.name}::t",
                           get_closest_marker=lambda name: name if name == marker else None)


def test_whole_suite_judged(tmp_path):
    """A run is whole when every module was collected and only integration or e2e tests
    were deselected; selecting by name, node id, or leaving a module out makes it partial."""
    (tmp_path / "tests").mkdir()
    a, b = tmp_path / "tests" / "test_a.py", tmp_path / "tests" / "test_b.py"
    a.touch()
    b.touch()
    assert _not_whole_suite(_session(tmp_path, [_item(a)], [_item(b, "integration")])) \
        is None
    assert "-k" in _not_whole_suite(_session(tmp_path, [_item(a), _item(b)], keyword="x"))
    assert "node id" in _not_whole_suite(_session(tmp_path, [_item(a)],
                                                  args=["tests/test_a.py::t"]))
    assert "unit tests were deselected" in _not_whole_suite(
        _session(tmp_path, [_item(a)], [_item(b)]))
    assert "tests/test_b.py" in _not_whole_suite(_session(tmp_path, [_item(a)]))
