"""
The pure parts of following etcd (``control/_etcd_watch.py``): the watch request, the
decoding of a watch stream's messages and lines, and how gateway errors are described.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed

from pyflock.control._etcd_client import describe
from pyflock.control._etcd_model import Keys, b64
from pyflock.control._etcd_watch import WatchMessage, _Lines, read_watch_message, watch_request


def line(message: dict) -> bytes:
    """One line of a watch stream."""
    return json.dumps(message).encode()


def test_watch_request_names_the_revision_key_and_start():
    """The watch is on the revision key alone, from the given revision, with progress."""
    keys = Keys.under("/p/")
    request = watch_request(keys, 42)["create_request"]
    assert request == {"key": b64(b"/p/config/revision"), "start_revision": "42",
                       "progress_notify": True}


@pytest.mark.parametrize("message, expected", [
    ({"result": {"header": {"revision": "7"}, "created": True}}, WatchMessage("created", 7)),
    ({"result": {"header": {"revision": "9"}, "events": [
        {"kv": {"key": "eA==", "mod_revision": "8"}},
        {"kv": {"key": "eA==", "mod_revision": "9"}}]}}, WatchMessage("events", 9)),
    ({"result": {"header": {"revision": "12"}}}, WatchMessage("progress", 12)),
    ({"result": {"canceled": True, "compact_revision": "30",
                 "cancel_reason": "compacted"}}, WatchMessage("canceled", 30, "compacted")),
    ({"error": {"grpc_code": 14, "message": "etcdserver: no leader"}},
     WatchMessage("error", reason="etcdserver: no leader")),
])
def test_watch_messages_are_read(message, expected):
    """Each kind of message the gateway streams is told apart, with its revision."""
    assert read_watch_message(line(message)) == expected


def test_a_line_that_is_not_an_object_is_refused():
    """A line of JSON that is not an object is a ValueError, as one that is not JSON."""
    with pytest.raises(ValueError):
        read_watch_message(b"[1]")
    with pytest.raises(ValueError):
        read_watch_message(b"{not json")


def test_lines_are_joined_across_chunks():
    """Chunks are cut anywhere: every complete line is handed on once, blank ones skipped."""
    seen = []
    lines = _Lines(seen.append)
    for chunk in (b'{"a":', b'1}\n\n{"b"', b':2}\n{"c"'):
        lines.dataReceived(chunk)
    assert seen == [b'{"a":1}', b'{"b":2}']


def test_failed_response_is_described_by_its_reason():
    """A failed response names its first reason, not a list of Failure objects."""
    error = ResponseFailed([Failure(ConnectionLost("the member went away"))])
    assert "the member went away" in describe(error)
    assert "Failure" not in describe(error)
    assert describe(TimeoutError()) == "TimeoutError"
