"""
The peer transfer service's sending side, the thread shell of ``_peer_protocol`` and
``_peer_move``: it listens on the peer port (``node.address:node.peer-port``, mutual TLS
admitting node certificates of this cluster only: ``PEER_TRANSFER``) and serves one round
of a move per connection, to the dataset's primary in this node's view only.

Each connection is served in a thread of its own (``_peer_tls.PeerPort``), and the
backend's export writes its stream straight into the connection's TLS
(``_peer_tls.BlockingTLS``): the reactor judges the request by this node's view, and
hears of the progress. The bandwidth limit (``Throttle``) paces the thread. The
receiving side is ``_peer_receive``.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Optional

import attr
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger

from pyflock.agent._backends._peer import IPeerBackend
from pyflock.agent._peer_move import PHASE_FINAL, MoveView, send_refusal
from pyflock.agent._peer_protocol import (
    END_FRAME, MAX_LINE, ProtocolError, SendAnswer, Throttle, framed, parse_request,
)
from pyflock.agent._peer_rounds import prepare_send, send_stream
from pyflock.agent._peer_tls import BlockingTLS, ConnectionBroken, PeerPort
from pyflock.common._connections import DEFAULT_HANDSHAKE_TIMEOUT
from pyflock.common._records import Transfer
from pyflock.common._tls import PEER_TRANSFER, ClusterTLS

_log = Logger()

#: At most this many transfers at once per node, unless configured (``node.peer-transfers``).
DEFAULT_MAX_TRANSFERS = 2

#: Seconds a round may go without a byte moving (either way) before it is given up as
#: broken; generous, since a sender may scan a large tree before its stream goes on.
DEFAULT_IDLE_TIMEOUT = 300.0

#: Connections the peer port serves at once (a thread each): the rounds under way, those
#: being refused (busy, not named in a move), and strangers whose handshake has not failed
#: yet (each gets ``TransferSettings.handshake_timeout`` for its handshake and request).
_MAX_CONNECTIONS = 64


@attr.s(frozen=True, auto_attribs=True)
class TransferSettings:
    """
    A node's transfer limits: at most ``max_transfers`` rounds at once (sending and
    receiving together; a sender answers "busy" beyond it), ``bandwidth`` bytes per
    second per round (None: no limit), ``idle_timeout`` seconds without progress
    before a round is given up, and ``handshake_timeout`` seconds for a connection to the
    peer port to complete its handshake and send its request.
    """

    max_transfers: int = DEFAULT_MAX_TRANSFERS
    bandwidth: Optional[float] = None
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT


class Slots:
    """The rounds this node makes at once, bounded by ``TransferSettings.max_transfers``
    (taken and given back from any thread)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Take a slot if one is free; whether one was."""
        with self._lock:
            if self.used >= self.limit:
                return False
            self.used += 1
            return True

    def give_back(self) -> None:
        """Free a slot taken."""
        with self._lock:
            self.used -= 1


class _StreamWriter:
    """
    The file-like object an export writes into, from its connection's thread (no
    ``fileno``): each write goes out as frames, paced by the bandwidth limit, and is
    counted by ``sent(nbytes)`` once written.
    """

    def __init__(self, connection: BlockingTLS, bandwidth: Optional[float],
                 sent: Callable[[int], None]):
        self._connection = connection
        self._throttle = Throttle(bandwidth)
        self._sent = sent

    def write(self, data) -> int:
        """Send ``data`` as frames; its length."""
        nbytes = len(data)
        if not nbytes:
            return 0
        self._throttle, delay = self._throttle.take(time.monotonic(), nbytes)
        if delay:
            time.sleep(delay)
        self._connection.sendall(framed(data))
        self._sent(nbytes)
        return nbytes

    def flush(self) -> None:
        """Nothing is buffered here."""

    def writable(self) -> bool:
        """A stream is written, never read."""
        return True


def _read_request(connection: BlockingTLS) -> bytes:
    """The request line (without its newline); ``ProtocolError`` if it is too long, or
    if anything follows it (nothing may)."""
    buffered = b""
    while b"\n" not in buffered:
        if len(buffered) > MAX_LINE:
            raise ProtocolError("the request line is too long")
        buffered += connection.receive()
    line, _, rest = buffered.partition(b"\n")
    if rest:
        raise ProtocolError("data follows the request line")
    return line


class PeerTransferService:
    """
    The sending side of this node's peer transfer service. ``view_of(dataset_id)`` gives
    the ``MoveView`` of a dataset in this node's current view (None: not configured);
    ``tls`` is the node's ``ClusterTLS`` (the peer port admits ``PEER_TRANSFER``: node
    certificates of this cluster); ``slots`` the node's transfer limit, shared with its
    receiving side. ``progress`` holds each dataset being sent, by id: the agent reports
    it (``transfer`` in ``/v1/state/datasets``).
    """

    def __init__(self, reactor, backend: IPeerBackend, tls: ClusterTLS, *,
                 view_of: Callable, settings: TransferSettings = TransferSettings(),
                 slots: Optional[Slots] = None):
        self.reactor = reactor
        self.backend = backend
        self.settings = settings
        self._tls = tls
        self.slots = slots if slots is not None else Slots(settings.max_transfers)
        self._view_of = view_of
        self.progress: dict = {}
        self._sending_to: dict = {}
        #: Each move sent to its end, as its log event gives it (tests read it).
        self.finished: list = []
        #: Called with a dataset's id once its move is sent to its end: the convergence
        #: loop's discovery is stale then (the copy was frozen outside the loop).
        self.on_sent: Callable[[str], object] = lambda dataset_id: None
        #: The connections being served, and a Deferred of each one's end (``stop``).
        self.connections: set = set()
        self._serving: set = set()

    def listen(self, address: str, port: int) -> PeerPort:
        """Serve the peer port on ``address:port`` (``OSError`` if it cannot)."""
        return PeerPort(self.reactor, address, port, self._serve,
                        max(_MAX_CONNECTIONS, 4 * self.slots.limit))

    def stop(self) -> Deferred:
        """
        Break every connection being served and wait for their threads to end (an export
        sees its broken connection): the agent calls this before the reactor stops.
        """
        for connection in list(self.connections):
            connection.abort()
        return DeferredList(list(self._serving), consumeErrors=True)

    # -- in the reactor thread -----------------------------------------------------------

    def _admit_request(self, requester: str, request) -> Optional[str]:
        """Why ``requester``'s ``request`` is refused by this node's view or its transfer
        limit, or None (a slot is taken then)."""
        view: Optional[MoveView] = self._view_of(request.dataset_id)
        refusal = send_refusal(view, self.backend.node_uuid, requester, request.dataset_id)
        if refusal is None and not self.slots.take():
            refusal = (f"this node already makes {self.slots.limit} transfers at once; "
                       f"retry when one is done")
        if refusal is None and self._sending_to.get(request.dataset_id) != requester:
            # A new move (or one redirected elsewhere): its progress starts again.
            self._sending_to[request.dataset_id] = requester
            self.progress.pop(request.dataset_id, None)
        return refusal

    def _expecting(self, dataset_id: str, estimate: Optional[int]) -> None:
        self.progress[dataset_id] = self.progress.get(dataset_id, Transfer()).expecting(
            estimate)

    def _sent(self, dataset_id: str, nbytes: int) -> None:
        self.progress[dataset_id] = self.progress.get(dataset_id, Transfer()).sent(nbytes)

    def _move_sent(self, dataset_id: str, requester: str, snapshot: str) -> None:
        progress = self.progress.pop(dataset_id, Transfer())
        self._sending_to.pop(dataset_id, None)
        event = {"dataset_id": dataset_id, "to_node": requester, "snapshot": snapshot,
                 "bytes_done": progress.bytes_done, "bytes_total": progress.bytes_total}
        self.finished.append(event)
        _log.info("pyflock:peer:move-sent dataset {dataset_id} to {to_node}: "
                  "{bytes_done} bytes", event_type="pyflock:peer:move-sent", **event)
        self.on_sent(dataset_id)

    def _started(self, connection: BlockingTLS) -> list:
        """A connection is served: ``stop`` aborts it and waits for the Deferred in the
        one-item list (a list: ``blockingCallFromThread`` would wait for a Deferred)."""
        self.connections.add(connection)
        ended = Deferred()
        self._serving.add(ended)
        return [ended]

    def _ended(self, connection: BlockingTLS, ended: Deferred) -> None:
        self.connections.discard(connection)
        self._serving.discard(ended)
        ended.callback(None)

    # -- in the connection's thread ------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        """Serve one connection to the peer port: one round, or its refusal."""
        connection = BlockingTLS.server(sock, self._tls, self.settings.handshake_timeout)
        [ended] = blockingCallFromThread(self.reactor, self._started, connection)
        requester = None
        try:
            connection.handshake()
            admission = self._tls.check.admit_certificate(connection.peer_certificate(),
                                                          PEER_TRANSFER)
            if not admission.admitted:
                self._refuse(connection, admission.refusal, None)
                return
            requester = admission.identity.name
            try:
                request = parse_request(_read_request(connection))
                connection.set_timeout(self.settings.idle_timeout)
            except ProtocolError as e:
                self._refuse(connection, str(e), requester)
                return
            refusal = blockingCallFromThread(self.reactor, self._admit_request, requester,
                                             request)
            if refusal is not None:
                self._refuse(connection, refusal, requester)
                return
            try:
                self._send(connection, requester, request)
            finally:
                self.slots.give_back()
        except ConnectionBroken as e:
            _log.warn("pyflock:peer:send-failed {error}", error=str(e), requester=requester,
                      event_type="pyflock:peer:send-failed")
        except Exception:
            _log.failure("pyflock:peer:send-failed", requester=requester,
                         event_type="pyflock:peer:send-failed")
        finally:
            connection.close()
            self.reactor.callFromThread(self._ended, connection, ended)

    def _refuse(self, connection: BlockingTLS, reason: str,
                requester: Optional[str]) -> None:
        """Answer the receiver why this round is refused (the connection is closed next)."""
        _log.warn("pyflock:peer:send-refused {reason}", reason=reason, requester=requester,
                  event_type="pyflock:peer:send-refused")
        connection.sendall(SendAnswer(error=reason).to_line())

    def _send(self, connection: BlockingTLS, requester: str, request) -> None:
        """Answer ``request`` and send its stream, then its end frame."""
        dataset_id = request.dataset_id
        answer = prepare_send(self.backend, request)
        connection.sendall(answer.to_line())
        if answer.error is not None:
            return
        call = self.reactor.callFromThread
        call(self._expecting, dataset_id, answer.estimate)
        writer = _StreamWriter(connection, self.settings.bandwidth,
                               lambda nbytes: call(self._sent, dataset_id, nbytes))
        snapshot = send_stream(self.backend, dataset_id, answer, writer)
        connection.sendall(END_FRAME)
        if request.phase == PHASE_FINAL:
            call(self._move_sent, dataset_id, requester, snapshot)


def move_view(view, dataset_id: str) -> Optional[MoveView]:
    """The ``MoveView`` of ``dataset_id`` in an ``AgentView`` (None: not in it)."""
    entry = view.dataset(dataset_id) if view is not None else None
    if entry is None:
        return None
    return MoveView(primary=entry.primary, holders=tuple(entry.holders),
                    gone=entry.deleted and entry.retained_until is None)


__all__ = [
    "ConnectionBroken", "DEFAULT_IDLE_TIMEOUT", "DEFAULT_MAX_TRANSFERS", "PeerTransferService",
    "Slots", "TransferSettings", "move_view",
]
