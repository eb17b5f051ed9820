"""
The peer transfer service's receiving side: a move into this node, round after round,
each one a TLS connection to the sender's peer port that accepts only the node the move
comes from (its certificate's identity). The rounds and the backend calls run in a thread
(``_peer_rounds.receive_move``); the stream comes to the import through a
``_StreamReader`` that the reactor fills, pausing the connection while the import lags.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Optional

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.threads import blockingCallFromThread
from twisted.protocols.policies import TimeoutMixin

from pyflock.agent._backends._peer import IPeerBackend
from pyflock.agent._peer_move import MovePolicy, MoveState, receive_refusal
from pyflock.agent._peer_protocol import Decoder, MAX_FRAME, ProtocolError, parse_answer
from pyflock.agent._peer_rounds import TransferRefused, prepare_receive, receive_move
from pyflock.agent._peer_service import (
    DEFAULT_IDLE_TIMEOUT, ConnectionBroken, Slots, widen_buffers,
)
from pyflock.common._records import Transfer
from pyflock.common._threads import RunBlocking
from pyflock.common._tls import ClusterTLS, Identity

#: The bytes a reader holds before the connection is paused.
_HIGH_WATER = 16 * MAX_FRAME


class _StreamReader:
    """
    The file-like object an import reads from, in its thread (no ``fileno``); the
    reactor puts the stream's chunks in. A stream that does not end (the connection
    broke) raises ``ConnectionBroken`` from ``read``, so the import discards it.
    """

    def __init__(self, reactor, pause: Callable[[], None], resume: Callable[[], None]):
        self._reactor = reactor
        self._pause, self._resume = pause, resume
        self._chunks: deque = deque()
        self._offset = 0
        self._queued = 0
        self._paused = False
        self._end: Optional[BaseException] = None
        self._ended = False
        self._ready = threading.Condition()
        self.count = 0

    # -- the reactor's side ---------------------------------------------------------------

    def put(self, chunk: bytes) -> None:
        """A chunk arrived."""
        with self._ready:
            self._chunks.append(chunk)
            self._queued += len(chunk)
            self.count += len(chunk)
            pause = self._queued > _HIGH_WATER and not self._paused
            self._paused = self._paused or pause
            self._ready.notify_all()
        if pause:
            self._pause()

    def end(self, error: Optional[BaseException] = None) -> None:
        """The stream ended (``error``: it broke)."""
        with self._ready:
            if not self._ended:
                self._ended, self._end = True, error
            self._ready.notify_all()

    # -- the import's side ---------------------------------------------------------------

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all, if negative) of the stream; b"" at its end."""
        out = []
        wanted = size if size is not None and size >= 0 else None
        got = 0
        with self._ready:
            while wanted is None or got < wanted:
                while not self._chunks and not self._ended:
                    self._ready.wait()
                if not self._chunks:
                    if self._end is not None:
                        raise self._end
                    break
                head = self._chunks[0]
                # The head chunk is consumed from ``_offset`` on, never copied whole (a
                # reader taking one byte at a time costs one byte each).
                take = len(head) - self._offset
                if wanted is not None:
                    take = min(take, wanted - got)
                out.append(head[self._offset:self._offset + take])
                self._offset += take
                if self._offset == len(head):
                    self._chunks.popleft()
                    self._offset = 0
                got += take
                self._queued -= take
            resume = self._paused and self._queued <= _HIGH_WATER // 2
            self._paused = self._paused and not resume
        if resume:
            self._reactor.callFromThread(self._resume)
        return b"".join(out)

    def readable(self) -> bool:
        """A stream is read."""
        return True

    def complete(self) -> bool:
        """Whether the whole stream arrived (its end frame)."""
        with self._ready:
            return self._ended and self._end is None


class _ReceivingRound(Protocol, TimeoutMixin):
    """
    One connection to a sender: the request out, the answer and the stream in; given up
    as broken after ``idle_timeout`` seconds without data (while the import keeps up).
    """

    def __init__(self, request, reactor, idle_timeout: float):
        self._request = request
        self.dataset_id = request.dataset_id
        self._idle_timeout = idle_timeout
        self.callLater = reactor.callLater
        self._decoder = Decoder()
        self.answered: Deferred = Deferred()
        #: The sender's answer once it came (its ``estimate`` is the round's size).
        self.answer = None
        self.reader = _StreamReader(reactor, self._pause, self._resume)

    def _pause(self) -> None:
        # The import lags: the sender waits for it, which is no stall of the sender's.
        self.setTimeout(None)
        if self.transport is not None:
            self.transport.pauseProducing()

    def _resume(self) -> None:
        if self.transport is not None and self.transport.connected:
            self.setTimeout(self._idle_timeout)
            self.transport.resumeProducing()

    def connectionMade(self) -> None:
        widen_buffers(self.transport)
        self.setTimeout(self._idle_timeout)
        self.transport.write(self._request.to_line())

    def timeoutConnection(self) -> None:
        self._broken(ConnectionBroken(f"no data from the sender for "
                                      f"{self._idle_timeout:g} s"))

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        try:
            items = self._decoder.feed(data)
        except ProtocolError as e:
            self._broken(e)
            return
        for item in items:
            if not self.answered.called:
                try:
                    self.answer = parse_answer(item)
                    self.answered.callback(self.answer)
                except ProtocolError as e:
                    self._broken(e)
                    return
            elif item is None:
                self.reader.end()
            else:
                self.reader.put(item)

    def _broken(self, error: Exception) -> None:
        """Give the round up with ``error``, which the import and the answer's waiter see."""
        self.reader.end(error)
        if not self.answered.called:
            self.answered.errback(error)
        self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        self.setTimeout(None)
        broken = ConnectionBroken(f"the connection closed before the stream ended: "
                                  f"{reason.getErrorMessage()}")
        self.reader.end(broken)         # nothing if it ended (or broke) already
        if not self.answered.called:
            self.answered.errback(broken)


def _with_round(before: Transfer, connection: _ReceivingRound) -> Transfer:
    """``before`` with the round on ``connection``: its estimate, and the bytes in."""
    answer = connection.answer
    return before.expecting(None if answer is None else answer.estimate) \
        .sent(connection.reader.count)


class PeerReceiver:
    """
    The receiving side of this node's peer transfer service. ``view_of(dataset_id)``
    gives the dataset's ``MoveView`` in this node's current view, ``address_of(node)``
    the ``(host, peer_port)`` a node is reached at (None: unknown); ``tls`` presents this
    node's certificate; ``slots`` is shared with the sending side.
    """

    def __init__(self, reactor, backend: IPeerBackend, tls: ClusterTLS, *,
                 view_of: Callable, address_of: Callable, run_blocking: RunBlocking,
                 slots: Slots, policy: MovePolicy = MovePolicy(),
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT):
        self._reactor = reactor
        self._backend = backend
        self._tls = tls
        self._view_of = view_of
        self._address_of = address_of
        self._run_blocking = run_blocking
        self._slots = slots
        self._policy = policy
        self._idle_timeout = idle_timeout
        #: Open rounds, and the moves under way (``stop`` ends them).
        self._rounds: set = set()
        self._moves: set = set()
        #: The rounds of each move under way that ended, counted (``progress``).
        self._received: dict = {}

    def receive(self, dataset_id: str, from_node: str) -> Deferred:
        """
        Make the move of ``dataset_id`` from ``from_node`` into this node, whole; a
        Deferred of its final ``MoveState``. A broken round fails it; the copy stays at its
        last complete round, and the next move starts from there.
        """
        def one_round(request) -> int:
            return self._round(from_node, request)
        d = self._run_blocking(receive_move, self._backend, self._policy,
                               MoveState(dataset_id, from_node), one_round)
        # ``stop`` waits on this signal, never on ``d``, whose result is the caller's.
        ended = Deferred()
        self._moves.add(ended)

        def end(result):
            self._moves.discard(ended)
            self._received.pop(dataset_id, None)
            ended.callback(None)
            return result
        return d.addBoth(end)

    def progress(self, dataset_id: str) -> Optional[Transfer]:
        """
        The move of ``dataset_id`` into this node, as a ``Transfer`` counted like the
        sender's: the bytes received in its rounds so far, and the total the sender's
        estimates give (None: no move under way).
        """
        before = self._received.get(dataset_id)
        for connection in list(self._rounds):
            if connection.dataset_id == dataset_id:
                return _with_round(before or Transfer(), connection)
        return before

    def stop(self) -> Deferred:
        """
        Abort every round and wait for the moves under way to end (their threads see the
        broken stream), so that the reactor can stop its threads.
        """
        for connection in list(self._rounds):
            if connection.transport is not None:
                connection.transport.abortConnection()
        return DeferredList(list(self._moves))

    def _round(self, from_node: str, request) -> int:
        """One round, in the move's thread: its byte count."""
        dataset_id = request.dataset_id
        refusal = receive_refusal(self._view_of(dataset_id), self._backend.node_uuid,
                                  from_node, dataset_id)
        if refusal is not None:
            raise TransferRefused(refusal)
        connection = blockingCallFromThread(self._reactor, self._open, from_node, request)
        try:
            answer = blockingCallFromThread(self._reactor, lambda: connection.answered)
            prepare_receive(self._backend, dataset_id, answer)
            self._backend.import_dataset(dataset_id, connection.reader)
            if not connection.reader.complete():
                raise ConnectionBroken("the stream ended early")
            return connection.reader.count
        finally:
            self._reactor.callFromThread(self._close, connection)

    def _open(self, from_node: str, request) -> Deferred:
        """Connect to ``from_node``'s peer port for ``request`` (reactor thread)."""
        address = self._address_of(from_node)
        if address is None:
            raise TransferRefused(f"node {from_node}'s address is not in this node's view")
        if not self._slots.take():
            raise TransferRefused(f"this node already makes {self._slots.limit} transfers "
                                  f"at once; retry when one is done")
        host, port = address
        endpoint = self._tls.client_endpoint(self._reactor, host, port,
                                             Identity.node(from_node))
        connection = _ReceivingRound(request, self._reactor, self._idle_timeout)
        self._rounds.add(connection)

        def failed(failure):
            self._rounds.discard(connection)
            self._slots.give_back()
            return failure
        return connectProtocol(endpoint, connection).addCallbacks(
            lambda _: connection, failed)

    def _close(self, connection: _ReceivingRound) -> None:
        self._rounds.discard(connection)
        self._received[connection.dataset_id] = _with_round(
            self._received.get(connection.dataset_id, Transfer()), connection)
        self._slots.give_back()
        if connection.transport is not None:
            connection.transport.loseConnection()


__all__ = ["PeerReceiver"]
