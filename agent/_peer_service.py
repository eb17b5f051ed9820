"""
The peer transfer service's sending side, the Twisted shell of ``_peer_protocol`` and
``_peer_move``: it listens on the peer port (``node.address:node.peer-port``, mutual TLS
admitting node certificates of this cluster only: ``PEER_TRANSFER``) and serves one round
of a move per connection, to the dataset's primary in this node's view only.

The backend's export runs in a thread and writes into a ``_FrameWriter``, which hands its
chunks' frames to the reactor without waiting for each (at most ``_IN_FLIGHT`` chunks not
yet written): the transport's flow control and the bandwidth limit (``Throttle``) pace the
thread. The receiving side is ``_peer_receive``.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Optional

import attr
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pyflock.agent._backends._peer import IPeerBackend
from pyflock.agent._peer_move import PHASE_FINAL, MoveView, send_refusal
from pyflock.agent._peer_protocol import (
    END_FRAME, MAX_LINE, ProtocolError, SendAnswer, Throttle, frames, parse_request,
)
from pyflock.agent._peer_rounds import prepare_send, send_stream
from pyflock.common._records import Transfer
from pyflock.common._threads import RunBlocking

_log = Logger()

#: At most this many transfers at once per node, unless configured (``node.peer-transfers``).
DEFAULT_MAX_TRANSFERS = 2

#: Seconds a round may go without a byte moving (either way) before it is given up as
#: broken; generous, since a sender may scan a large tree before its stream goes on.
DEFAULT_IDLE_TIMEOUT = 300.0


#: The bytes a peer connection's socket reads at once, and holds before pausing its
#: producer (Twisted's default is 64 KiB: a reactor turn per 64 KiB of a stream).
_SOCKET_BUFFER = 4 * 1024 * 1024


def widen_buffers(transport) -> None:
    """Let the TCP connection under ``transport`` (TLS) read and buffer ``_SOCKET_BUFFER``
    bytes at a time: a stream takes a sixty-fourth of the reactor's turns."""
    # ``vars``: a TLS wrapper forwards unknown attributes to the transport under it.
    while transport is not None and "socket" not in vars(transport):
        transport = vars(transport).get("transport")
    if transport is not None:
        transport.bufferSize = _SOCKET_BUFFER


class ConnectionBroken(Exception):
    """The connection of a round closed before its stream ended."""


@attr.s(frozen=True, auto_attribs=True)
class TransferSettings:
    """
    A node's transfer limits: at most ``max_transfers`` rounds at once (sending and
    receiving together; a sender answers "busy" beyond it), ``bandwidth`` bytes per
    second per round (None: no limit), and ``idle_timeout`` seconds without progress
    before a round is given up.
    """

    max_transfers: int = DEFAULT_MAX_TRANSFERS
    bandwidth: Optional[float] = None
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT


class Slots:
    """The rounds this node makes at once, bounded by ``TransferSettings.max_transfers``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        """Take a slot if one is free; whether one was."""
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give_back(self) -> None:
        """Free a slot taken."""
        self.used -= 1


#: The chunks an export may hand the reactor before it waits for them to be written:
#: the export thread goes on reading ``btrfs send`` while the reactor encrypts and writes,
#: with no hand-off per chunk (a bound on the memory a slow receiver can pin).
_IN_FLIGHT = 8


@implementer(IPushProducer)
class _SendingRound(Protocol, TimeoutMixin):
    """
    One connection to the peer port: one round of a move, sent. Frames go out in order
    from ``_outgoing``, paced by the bandwidth limit; each queued piece's ``done(error)``
    is called once it is in the transport and the transport takes more (not paused), or
    with ``ConnectionBroken`` when the connection is lost first.
    """

    def __init__(self, service: "PeerTransferService"):
        self._service = service
        self.callLater = service.reactor.callLater
        self._buffer = b""
        self._requested = False
        self._paused = False
        self._outgoing: deque = deque()     # (frame, done or None)
        self._held: list = []               # done callbacks waiting for a resume
        self._delayed = None                # the bandwidth limit's pending write
        self._throttle = Throttle(service.settings.bandwidth)
        #: Set once the connection is gone; the export thread reads it.
        self.lost = False
        #: The export thread's credits: one per chunk in flight (``_FrameWriter``).
        self.credits = threading.Semaphore(_IN_FLIGHT)
        self.requester: Optional[str] = None

    def connectionMade(self) -> None:
        self._service.connections.add(self)
        widen_buffers(self.transport)
        self.transport.registerProducer(self, True)
        self.setTimeout(self._service.settings.idle_timeout)

    def timeoutConnection(self) -> None:
        _log.warn("pyflock:peer:send-stalled no progress for {seconds} s",
                  seconds=self.timeOut, requester=self.requester,
                  event_type="pyflock:peer:send-stalled")
        self.transport.abortConnection()

    # IPushProducer: the transport's buffer is full, or drained.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        held, self._held = self._held, []
        for done in held:
            done(None)

    def stopProducing(self) -> None:
        if self.lost:
            return
        self.lost = True
        if self._delayed is not None and self._delayed.active():
            self._delayed.cancel()
        broken = ConnectionBroken("the receiver closed the connection")
        waiting = self._held + [done for _, done in self._outgoing if done is not None]
        self._held, self._outgoing = [], deque()
        for done in waiting:
            done(broken)
        for _ in range(_IN_FLIGHT):
            self.credits.release()        # an export waiting for a credit sees ``lost``

    def connectionLost(self, reason) -> None:
        self._service.connections.discard(self)
        self.setTimeout(None)
        self.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        if self._requested:
            self.transport.abortConnection()      # nothing may follow the request
            return
        if self.requester is None:
            # Only now is the TLS handshake complete: the certificate is known.
            admission = self._service.admit(self.transport)
            if not admission.admitted:
                self.refuse(admission.refusal)
                return
            self.requester = admission.identity.name
        self._buffer += data
        line, found, _ = self._buffer.partition(b"\n")
        if not found:
            if len(self._buffer) > MAX_LINE:
                self.refuse("the request line is too long")
            return
        self._requested = True
        try:
            request = parse_request(line)
        except ProtocolError as e:
            self.refuse(str(e))
            return
        self._service.serve(self, request)

    def refuse(self, reason: str) -> None:
        """Answer the receiver why this round is refused, and hang up."""
        _log.warn("pyflock:peer:send-refused {reason}", reason=reason,
                  requester=self.requester, event_type="pyflock:peer:send-refused")
        self.transport.write(SendAnswer(error=reason).to_line())
        self.transport.loseConnection()

    def queue(self, pieces: list, done: Callable[[Optional[Exception]], None]) -> None:
        """Send the frames ``pieces`` after those queued before; then ``done`` (see the
        class). Reactor thread."""
        if self.lost:
            done(ConnectionBroken("the receiver closed the connection"))
            return
        for frame in pieces[:-1]:
            self._outgoing.append((frame, None))
        self._outgoing.append((pieces[-1], done))
        if self._delayed is None:
            self._pump()

    def send_frame(self, frame: bytes) -> Deferred:
        """Send ``frame`` after those queued; fires once it is written (reactor thread)."""
        d = Deferred()
        self.queue([frame], lambda error: d.callback(None) if error is None
                   else d.errback(error))
        return d

    def _pump(self) -> None:
        """Write what is queued, as fast as the bandwidth limit allows."""
        while self._outgoing and self._delayed is None and not self.lost:
            frame, done = self._outgoing.popleft()
            self._throttle, delay = self._throttle.take(self._service.reactor.seconds(),
                                                        len(frame))
            if delay:
                self._delayed = self.callLater(delay, self._write_later, frame, done)
                return
            self._write(frame, done)

    def _write_later(self, frame: bytes, done) -> None:
        self._delayed = None
        self._write(frame, done)
        self._pump()

    def _write(self, frame: bytes, done) -> None:
        self.transport.write(frame)
        self.resetTimeout()
        if done is None:
            return
        if self._paused:
            self._held.append(done)
        else:
            done(None)


class _FrameWriter:
    """
    The file-like object an export writes into, from its thread (no ``fileno``): each
    write takes one of the connection's credits and hands its frames to the reactor
    without waiting for them, so the export waits only while ``_IN_FLIGHT`` chunks are
    not yet written (flow control, the bandwidth limit).
    """

    def __init__(self, reactor, connection: _SendingRound, sent: Callable[[int], None]):
        self._reactor = reactor
        self._connection = connection
        self._sent = sent

    def write(self, data: bytes) -> int:
        """Queue ``data`` as frames; its length."""
        if not data:
            return 0
        connection = self._connection
        connection.credits.acquire()
        if connection.lost:
            raise ConnectionBroken("the receiver closed the connection")
        nbytes = len(data)

        def done(error: Optional[Exception]) -> None:
            if error is None:
                self._sent(nbytes)
            connection.credits.release()
        self._reactor.callFromThread(connection.queue, frames(bytes(data)), done)
        return nbytes

    def flush(self) -> None:
        """Nothing is buffered here."""

    def writable(self) -> bool:
        """A stream is written, never read."""
        return True


class PeerTransferService:
    """
    The sending side of this node's peer transfer service. ``view_of(dataset_id)`` gives
    the ``MoveView`` of a dataset in this node's current view (None: not configured);
    ``admit(transport)`` is the ``PEER_TRANSFER`` listener's (``ClusterTLS.listener``);
    ``slots`` the node's transfer limit, shared with its receiving side. ``progress``
    holds each dataset being sent, by id: the agent reports it
    (``transfer`` in ``/v1/state/datasets``).
    """

    def __init__(self, reactor, backend: IPeerBackend, *, view_of: Callable,
                 admit: Callable, run_blocking: RunBlocking,
                 settings: TransferSettings = TransferSettings(),
                 slots: Optional[Slots] = None):
        self.reactor = reactor
        self.backend = backend
        self.settings = settings
        self.admit = admit
        self.slots = slots if slots is not None else Slots(settings.max_transfers)
        self._view_of = view_of
        self._run_blocking = run_blocking
        self.progress: dict = {}
        self._sending_to: dict = {}
        #: Each move sent to its end, as its log event gives it (tests read it).
        self.finished: list = []
        #: Called with a dataset's id once its move is sent to its end: the convergence
        #: loop's discovery is stale then (the copy was frozen outside the loop).
        self.on_sent: Callable[[str], object] = lambda dataset_id: None
        #: Open connections, and the sends under way (``stop`` ends them).
        self.connections: set = set()
        self._sending: set = set()

    def factory(self) -> Factory:
        """What the peer port listens with."""
        return Factory.forProtocol(lambda: _SendingRound(self))

    def serve(self, connection: _SendingRound, request) -> None:
        """Serve ``request`` on ``connection`` if this node's view allows it."""
        view: Optional[MoveView] = self._view_of(request.dataset_id)
        refusal = send_refusal(view, self.backend.node_uuid, connection.requester,
                               request.dataset_id)
        if refusal is None and not self.slots.take():
            refusal = (f"this node already makes {self.slots.limit} transfers at once; "
                       f"retry when one is done")
        if refusal is not None:
            connection.refuse(refusal)
            return
        d = Deferred.fromCoroutine(self._send(connection, request))
        d.addBoth(self._done, connection)
        self._sending.add(d)
        d.addBoth(lambda _: self._sending.discard(d))

    def stop(self) -> Deferred:
        """
        Abort every connection and wait for the sends under way to end (their export
        threads see the closed connection): the agent calls this before the reactor
        stops, which would otherwise wait for those threads while they wait for it.
        """
        for connection in list(self.connections):
            connection.transport.abortConnection()
        return DeferredList(list(self._sending), consumeErrors=True)

    def _sent(self, dataset_id: str, nbytes: int) -> None:
        self.progress[dataset_id] = self.progress.get(dataset_id, Transfer()).sent(nbytes)

    async def _send(self, connection: _SendingRound, request) -> None:
        dataset_id = request.dataset_id
        if self._sending_to.get(dataset_id) != connection.requester:
            # A new move (or one redirected elsewhere): its progress starts again.
            self._sending_to[dataset_id] = connection.requester
            self.progress.pop(dataset_id, None)
        answer = await self._run_blocking(prepare_send, self.backend, request)
        connection.transport.write(answer.to_line())
        if answer.error is not None:
            connection.transport.loseConnection()
            return
        self.progress[dataset_id] = self.progress.get(dataset_id, Transfer()).expecting(
            answer.estimate)
        writer = _FrameWriter(self.reactor, connection, lambda n: self._sent(dataset_id, n))
        snapshot = await self._run_blocking(send_stream, self.backend, dataset_id, answer,
                                            writer)
        await connection.send_frame(END_FRAME)
        connection.transport.loseConnection()
        if request.phase == PHASE_FINAL:
            progress = self.progress.pop(dataset_id, Transfer())
            self._sending_to.pop(dataset_id, None)
            event = {"dataset_id": dataset_id, "to_node": connection.requester,
                     "snapshot": snapshot, "bytes_done": progress.bytes_done,
                     "bytes_total": progress.bytes_total}
            self.finished.append(event)
            _log.info("pyflock:peer:move-sent dataset {dataset_id} to {to_node}: "
                      "{bytes_done} bytes", event_type="pyflock:peer:move-sent", **event)
            self.on_sent(dataset_id)

    def _done(self, result, connection: _SendingRound):
        self.slots.give_back()
        if isinstance(result, Failure):
            # Abort, so that the receiver sees a broken round and discards it.
            if result.check(ConnectionBroken):
                _log.warn("pyflock:peer:send-failed {error}", error=result.getErrorMessage(),
                          requester=connection.requester,
                          event_type="pyflock:peer:send-failed")
            else:
                _log.failure("pyflock:peer:send-failed", result, requester=connection.requester,
                             event_type="pyflock:peer:send-failed")
            connection.transport.abortConnection()
        return None


def move_view(view, dataset_id: str) -> Optional[MoveView]:
    """The ``MoveView`` of ``dataset_id`` in an ``AgentView`` (None: not in it)."""
    entry = view.dataset(dataset_id) if view is not None else None
    if entry is None:
        return None
    return MoveView(primary=entry.primary, holders=tuple(entry.holders),
                    gone=entry.deleted and entry.retained_until is None)


__all__ = [
    "ConnectionBroken", "DEFAULT_IDLE_TIMEOUT", "widen_buffers", "DEFAULT_MAX_TRANSFERS", "PeerTransferService", "Slots",
    "TransferSettings", "move_view",
]
