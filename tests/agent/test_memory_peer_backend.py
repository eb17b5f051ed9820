"""
The in-memory peer-to-peer backend passes the ``IPeerBackend`` contract suite, and its
file hooks behave as a container's writes would.
"""

import io

import pytest

from pyflock.agent._backends import IncompleteCopy, MemoryPeerBackend
from tests.contracts.backends import NODE_A, SIZE
from tests.contracts.peer_backends import make_ipeerbackend_tests, memory_peer_harness


class MemoryPeerBackendConformanceTests(make_ipeerbackend_tests(memory_peer_harness)):
    """``MemoryPeerBackend`` honours ``IPeerBackend``."""


def test_files_only_in_complete_copies():
    """A partial copy takes no writes: only a complete copy is a writable dataset."""
    sender, receiver = MemoryPeerBackend(NODE_A), MemoryPeerBackend("other")
    sender.create_dataset("ds", SIZE)
    stream = io.BytesIO()
    sender.export_dataset("ds", stream)
    receiver.import_dataset("ds", io.BytesIO(stream.getvalue()))
    with pytest.raises(IncompleteCopy):
        receiver.write_file("ds", "a", b"x")
