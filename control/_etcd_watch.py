"""
Keeping a replica's configuration current from etcd: a watch on the revision key and a
periodic health check of the etcd member in use (issue 9, point 2; docs/ha.md).

Every configuration write puts ``P config/revision`` (``_etcd_model``), so one watch on
that key tells every write of every replica. The watch is a trigger: it tells the
configuration service the etcd revision of the latest write (``notice``), and the service
reads what changed through the store (``catch_up``), between its own writes. A watch that
etcd cancels because its start revision was compacted asks for a full reload
(``reload``). Watches ask for a leader (``Grpc-Metadata-hasleader: true``), so a member
cut off from the majority ends the stream instead of keeping it silent.

Every ``interval`` seconds a linearizable read of the revision key checks the member: one
that cannot answer within ``deadline`` (a minority member has no leader and times out)
makes the service refuse writes (``unhealthy``) and the watch start again on another
member; a member that answers again makes it take writes (``healthy``). The read also
tells the latest write's revision, a safety net against a lost watch event.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import attr
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger, LogLevel

from pyflock.common._logging import log_event
from pyflock.control._etcd_client import describe
from pyflock.control._etcd_model import (
    KeyValue, Keys, b64, header_revision, range_request, store_revision,
)

#: Seconds between two checks of the etcd member (``--etcd-check-interval``).
DEFAULT_CHECK_INTERVAL = 2.0

#: Seconds a check may take, trying members in turn, before writes are refused.
DEFAULT_CHECK_DEADLINE = 2.0

#: Seconds before a watch that ended is opened again.
WATCH_RETRY = 0.2

#: The metadata asking etcd to fail a watch rather than keep it on a member with no leader.
HAS_LEADER = {b"Grpc-Metadata-hasleader": [b"true"]}

_log = Logger()


@attr.s(frozen=True, auto_attribs=True)
class WatchMessage:
    """
    One message of a watch stream: ``kind`` is ``created``, ``events`` (``revision``: the
    highest mod revision among them), ``progress`` (``revision``: the answer's),
    ``canceled`` (``revision``: the compaction revision, 0 if none) or ``error``.
    """

    kind: str
    revision: int = 0
    reason: str = ""


def watch_request(keys: Keys, start_revision: int) -> dict:
    """The body of a ``/v3/watch`` on the revision key from ``start_revision`` on."""
    return {"create_request": {"key": b64(keys.revision), "start_revision": str(start_revision),
                               "progress_notify": True}}


def read_watch_message(line: bytes) -> WatchMessage:
    """Decode one line of a watch stream (``ValueError`` for one that is not JSON)."""
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError(f"a watch message is not a JSON object: {line[:200]!r}")
    if "error" in message:
        error = message["error"]
        return WatchMessage("error", reason=str(error.get("message", error))
                            if isinstance(error, dict) else str(error))
    result = message.get("result", {})
    if result.get("canceled"):
        return WatchMessage("canceled", int(result.get("compact_revision", 0)),
                            str(result.get("cancel_reason", "")))
    events = result.get("events") or []
    if events:
        return WatchMessage("events", max(KeyValue.of(e.get("kv", {})).mod_revision
                                          for e in events))
    return WatchMessage("created" if result.get("created") else "progress",
                        header_revision(result))


class _Lines(Protocol):
    """A response body read as lines, each handed to ``handle``; ``finished`` fires at its end."""

    def __init__(self, handle: Callable[[bytes], None]):
        self._handle = handle
        self._buffer = b""
        self.finished: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        """Hand on every complete line."""
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self._handle(line)

    def connectionLost(self, reason: Any = None) -> None:
        """The stream ended."""
        self.finished.callback(None)

    def abort(self) -> None:
        """Drop the connection."""
        if self.transport is not None:
            self.transport.stopProducing()


async def stream_lines(gateway: Any, body: dict, handle: Callable[[bytes], None],
                       opened: Callable[[Optional[_Lines]], None]) -> None:
    """
    Open a watch (``body``, asking for a leader) on the member ``gateway`` uses and hand
    each line of its answer to ``handle`` until it ends; ``opened`` is told the stream once
    it delivers (to abort it), and None once it has ended.
    """
    response = await gateway.stream("watch", body, HAS_LEADER)
    stream = _Lines(handle)
    response.deliverBody(stream)
    opened(stream)
    try:
        await stream.finished
    finally:
        opened(None)


class EtcdFollower:
    """
    Keeps ``service`` (a ``ConfigurationService`` on the etcd store ``store``) current:
    ``start`` opens the watch and the checks, ``stop`` ends them. ``compactions`` counts
    the watches etcd cancelled for compaction (each made the service reload).
    """

    def __init__(self, reactor: Any, store: Any, service: Any,
                 interval: float = DEFAULT_CHECK_INTERVAL,
                 deadline: float = DEFAULT_CHECK_DEADLINE):
        self._reactor = reactor
        self._gateway = store.gateway
        self._keys = store.keys
        self._service = service
        self._interval = interval
        self._deadline = deadline
        self._watched = 0
        self._stream: Optional[_Lines] = None
        self._stopped = False
        self._checking = False
        self._checks: Optional[LoopingCall] = None
        self._watching: Optional[Deferred] = None
        self._watch_endpoint: Optional[str] = None
        self.compactions = 0

    def start(self) -> None:
        """Watch from the revision the service holds; check the member every interval."""
        self._watching = Deferred.fromCoroutine(self._watch_forever())
        self._checks = LoopingCall(self.check)
        self._checks.clock = self._reactor
        self._checks.start(self._interval, now=False)

    def stop(self) -> Deferred:
        """End the watch and the checks; fires when the watch is closed."""
        self._stopped = True
        if self._checks is not None and self._checks.running:
            self._checks.stop()
        if self._stream is not None:
            self._stream.abort()
        watching, self._watching = self._watching, None
        return watching if watching is not None else Deferred.fromCoroutine(_nothing())

    # -- the watch -------------------------------------------------------------------------

    async def _watch_forever(self) -> None:
        while not self._stopped:
            try:
                await self._watch_once()
            except Exception as e:
                log_event(_log, "pyflock:control:etcd-watch-failed", LogLevel.warn,
                          endpoint=self._gateway.endpoint, reason=describe(e))
            if not self._stopped:
                await deferLater(self._reactor, WATCH_RETRY, lambda: None)

    def _start_revision(self) -> int:
        return max(self._watched, self._service.revision // store_revision(1)) + 1

    async def _watch_once(self) -> None:
        endpoint = self._gateway.endpoint
        start = self._start_revision()

        def opened(stream: Optional[_Lines]) -> None:
            self._stream = stream
            if stream is None:
                return
            self._watch_endpoint = endpoint
            if self._stopped:
                stream.abort()
            log_event(_log, "pyflock:control:etcd-watching", endpoint=endpoint, start=start)
        await stream_lines(self._gateway, watch_request(self._keys, start), self._line,
                           opened)

    def _line(self, line: bytes) -> None:
        try:
            message = read_watch_message(line)
        except ValueError as e:
            log_event(_log, "pyflock:control:etcd-watch-failed", LogLevel.warn, reason=str(e))
            return self._abort()
        if message.kind == "events":
            self._watched = max(self._watched, message.revision)
            self._service.notice(store_revision(message.revision))
        elif message.kind == "canceled":
            log_event(_log, "pyflock:control:etcd-watch-canceled", LogLevel.warn,
                      compacted=message.revision, reason=message.reason)
            if message.revision:
                self.compactions += 1
                # History before it is gone: read everything, watch from there on.
                self._watched = max(self._watched, message.revision - 1)
                self._service.reload()
            self._abort()
        elif message.kind == "error":
            # Say, no leader: this member is cut off; watch through the next one.
            endpoint = self._gateway.endpoint
            log_event(_log, "pyflock:control:etcd-watch-failed", LogLevel.warn,
                      endpoint=endpoint, reason=message.reason)
            self._gateway.skip(endpoint)
            self._abort()

    def _abort(self) -> None:
        if self._stream is not None:
            self._stream.abort()

    # -- the check -------------------------------------------------------------------------

    def check(self) -> Deferred:
        """Read the revision key linearizably; tell the service whether it may write."""
        if self._checking or self._stopped:
            return Deferred.fromCoroutine(_nothing())
        self._checking = True
        d = Deferred.fromCoroutine(self._check())

        def done(result):
            self._checking = False
            return result
        return d.addBoth(done)

    async def _check(self) -> None:
        try:
            answer = await self._gateway.call("kv/range", range_request(self._keys.revision),
                                              deadline=self._deadline)
        except Exception as e:
            reason = (f"no etcd member ({', '.join(self._gateway.endpoints)}) answered a "
                      f"linearizable read within {self._deadline:g} s ({e}); a member may "
                      f"be cut off from the majority, so this replica takes no changes "
                      f"until one answers")
            self._service.unhealthy(reason)
            self._abort()
            return
        if self._watch_endpoint not in (None, self._gateway.endpoint):
            self._abort()  # the calls moved to another member: so does the watch
        self._service.healthy()
        found = [KeyValue.of(kv) for kv in answer.get("kvs", [])]
        if found:
            self._service.notice(store_revision(found[0].mod_revision))


async def _nothing() -> None:
    return None


def follow(reactor: Any, service: Any, store: Any, interval: float = DEFAULT_CHECK_INTERVAL,
           deadline: float = DEFAULT_CHECK_DEADLINE) -> EtcdFollower:
    """Start keeping ``service`` current from the etcd ``store``; stopped with the service."""
    follower = EtcdFollower(reactor, store, service, interval, deadline)
    service.follow_with(follower)
    follower.start()
    return follower


__all__ = ["EtcdFollower", "WatchMessage", "follow", "read_watch_message", "stream_lines",
           "watch_request"]
