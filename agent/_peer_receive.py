"""
The peer transfer service's receiving side: a move into this node, round after round,
each one a TLS connection to the sender's peer port that accepts only the node the move
comes from (its certificate's identity). The rounds and the backend calls run in a thread
(``_peer_rounds.receive_move``), and so does each round's connection
(``_peer_tls.BlockingTLS``): the import reads the stream from it through an
``_IncomingStream``, without the reactor.
"""

from __future__ import annotations

import socket
import threading
from collections import deque
from typing import Callable, Optional

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import blockingCallFromThread

from pyflock.agent._backends._peer import IPeerBackend
from pyflock.agent._peer_move import MovePolicy, MoveState, receive_refusal
from pyflock.agent._peer_protocol import Decoder, ProtocolError, parse_answer
from pyflock.agent._peer_rounds import TransferRefused, prepare_receive, receive_move
from pyflock.agent._peer_service import DEFAULT_IDLE_TIMEOUT, Slots
from pyflock.agent._peer_tls import BlockingTLS, ConnectionBroken
from pyflock.common._connections import DEFAULT_HANDSHAKE_TIMEOUT
from pyflock.common._records import Transfer
from pyflock.common._threads import RunBlocking
from pyflock.common._tls import ClusterTLS, Identity


class _IncomingStream:
    """
    One round's connection, read by its move's thread: ``read_answer`` gives the
    sender's answer line, then ``read`` is the file-like object the import reads the
    stream from (no ``fileno``): b"" at its end frame, ``ConnectionBroken`` if the
    connection ends before it (the import discards what it got). ``count`` is the
    stream's bytes so far (the reactor reads it for progress).
    """

    def __init__(self, dataset_id: str, connection: BlockingTLS):
        self.dataset_id = dataset_id
        self.connection = connection
        self._decoder = Decoder()
        self._chunks: deque = deque()
        self._offset = 0
        self._ended = False
        #: The sender's answer once it came (its ``estimate`` is the round's size).
        self.answer = None
        self.count = 0

    def _feed(self) -> list:
        """What the connection brings next, decoded (at least one byte's worth)."""
        try:
            return self._decoder.feed(self.connection.receive())
        except ProtocolError as e:
            raise ConnectionBroken(f"the sender broke the protocol: {e}") from None

    def _queue(self, items: list) -> None:
        for item in items:
            if item is None:
                self._ended = True
            else:
                self.count += len(item)
                self._chunks.append(item)

    def read_answer(self):
        """The sender's answer (a ``SendAnswer``): its first line."""
        items: list = []
        while not items:
            items = self._feed()
        try:
            self.answer = parse_answer(items[0])
        except ProtocolError as e:
            raise ConnectionBroken(f"the sender broke the protocol: {e}") from None
        self._queue(items[1:])
        return self.answer

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all, if negative) of the stream; b"" at its end."""
        out = []
        wanted = size if size is not None and size >= 0 else None
        got = 0
        while wanted is None or got < wanted:
            if not self._chunks:
                if self._ended:
                    break
                if got and wanted is not None:
                    break               # what is here now; the rest on the next read
                self._queue(self._feed())
                continue
            head = self._chunks[0]
            # The head chunk is consumed from ``_offset`` on, never copied whole (a
            # reader taking one byte at a time costs one byte each).
            take = len(head) - self._offset
            if wanted is not None:
                take = min(take, wanted - got)
            out.append(head[self._offset:self._offset + take] if take < len(head)
                       else head)
            self._offset += take
            if self._offset == len(head):
                self._chunks.popleft()
                self._offset = 0
            got += take
        return b"".join(out)      # bytes, as a file gives (one copy of the pieces)

    def readable(self) -> bool:
        """A stream is read."""
        return True

    def complete(self) -> bool:
        """Whether the whole stream arrived (its end frame)."""
        return self._ended


def _with_round(before: Transfer, stream: _IncomingStream) -> Transfer:
    """``before`` with the round of ``stream``: its estimate, and the bytes in."""
    answer = stream.answer
    return before.expecting(None if answer is None else answer.estimate) \
        .sent(stream.count)


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
        #: Open rounds (their threads add and remove them), and the moves under way
        #: (``stop`` ends them).
        self._lock = threading.Lock()
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
            with self._lock:
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
        with self._lock:
            before = self._received.get(dataset_id)
            rounds = list(self._rounds)
        for stream in rounds:
            if stream.dataset_id == dataset_id:
                return _with_round(before or Transfer(), stream)
        return before

    def stop(self) -> Deferred:
        """
        Abort every round and wait for the moves under way to end (their threads see the
        broken stream), so that the reactor can stop its threads.
        """
        with self._lock:
            rounds = list(self._rounds)
        for stream in rounds:
            stream.connection.abort()
        return DeferredList(list(self._moves))

    def _round(self, from_node: str, request) -> int:
        """One round, in the move's thread: its byte count."""
        dataset_id = request.dataset_id
        refusal = receive_refusal(self._view_of(dataset_id), self._backend.node_uuid,
                                  from_node, dataset_id)
        if refusal is not None:
            raise TransferRefused(refusal)
        host, port = blockingCallFromThread(self._reactor, self._open, from_node)
        stream = None
        try:
            # Connecting and the handshake get the handshake's timeout; the answer may
            # take the sender a while (a freeze, an estimate), so it gets the idle one.
            opening = min(DEFAULT_HANDSHAKE_TIMEOUT, self._idle_timeout)
            try:
                sock = socket.create_connection((host, port), timeout=opening)
            except OSError as e:
                raise ConnectionBroken(f"cannot reach node {from_node}'s peer port at "
                                       f"{host}:{port}: {e}") from None
            connection = BlockingTLS.client(sock, self._tls, Identity.node(from_node),
                                            opening)
            stream = _IncomingStream(dataset_id, connection)
            with self._lock:
                self._rounds.add(stream)
            connection.handshake()
            connection.set_timeout(self._idle_timeout)
            connection.sendall(request.to_line())
            answer = stream.read_answer()
            prepare_receive(self._backend, dataset_id, answer)
            self._backend.import_dataset(dataset_id, stream)
            if not stream.complete():
                raise ConnectionBroken("the stream ended early")
            return stream.count
        finally:
            self._slots.give_back()
            if stream is not None:
                with self._lock:
                    self._received[dataset_id] = _with_round(
                        self._received.get(dataset_id, Transfer()), stream)
                    self._rounds.discard(stream)
                stream.connection.close()

    def _open(self, from_node: str) -> tuple:
        """Where ``from_node``'s peer port is, a slot taken (reactor thread)."""
        address = self._address_of(from_node)
        if address is None:
            raise TransferRefused(f"node {from_node}'s address is not in this node's view")
        if not self._slots.take():
            raise TransferRefused(f"this node already makes {self._slots.limit} transfers "
                                  f"at once; retry when one is done")
        return address


__all__ = ["PeerReceiver"]
