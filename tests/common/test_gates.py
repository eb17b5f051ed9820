"""Tests for ``pyflock.common._gates``: a closed gate stops the caller until opened."""

import os
import threading

from pyflock.common._gates import GATES_VARIABLE, gate


def test_open_gate_costs_nothing(tmp_path, monkeypatch):
    """Without the variable, or without the gate's FIFO, ``gate`` returns at once."""
    monkeypatch.delenv(GATES_VARIABLE, raising=False)
    gate("loop-attach")
    monkeypatch.setenv(GATES_VARIABLE, str(tmp_path))
    gate("loop-attach")
    (tmp_path / "loop-attached").write_text("not a fifo")
    gate("loop-attached")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop-attached"]


def test_closed_gate_waits_and_says_who(tmp_path, monkeypatch):
    """A closed gate writes the caller's pid beside the FIFO and waits for a line."""
    monkeypatch.setenv(GATES_VARIABLE, str(tmp_path))
    fifo = tmp_path / "loop-attach"
    os.mkfifo(fifo)
    passed = threading.Event()
    waiter = threading.Thread(target=lambda: (gate("loop-attach"), passed.set()))
    waiter.start()
    pid_file = tmp_path / "loop-attach.pid"
    for _ in range(500):
        if pid_file.exists():
            break
        passed.wait(0.01)
    assert pid_file.read_text() == f"{os.getpid()}\n"
    assert not passed.is_set()
    with open(fifo, "w") as f:
        f.write("go\n")
    waiter.join(10)
    assert passed.is_set()
