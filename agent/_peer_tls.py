"""
The peer transfer service's TLS on blocking sockets: each round of a move runs in a
thread of its own, and its stream goes between ``btrfs send``/``receive`` and the
network without the reactor. OpenSSL encrypts and decrypts a chunk at a time without
the GIL; the reactor only hears of progress.

The TLS is every other pyflock port's: each connection comes from ``ClusterTLS``'s own
server options or client creator (TLS 1.2 or later, the AEAD suites, this cluster's CA
only, no renegotiation, a revoked client refused in the handshake, the server's identity
checked by ``PeerCheck``), over memory BIOs that ``BlockingTLS`` moves to and from the
socket. ``PeerPort`` is the listening side: one thread accepting, one per connection.
"""

from __future__ import annotations

import socket
import threading
from typing import Callable, Optional

from OpenSSL import SSL
from twisted.logger import Logger

from pyflock.common._tls import ClusterTLS, Identity

_log = Logger()

#: The bytes moved between the socket and TLS at once: many records, and few enough that
#: TLS's buffers stay small and in the CPU's cache (megabytes at once cost more in copies
#: and page faults than they save in calls).
_PIECE = 256 * 1024

#: The most plaintext one TLS record carries.
_RECORD = 16 * 1024


class ConnectionBroken(Exception):
    """The connection of a round failed or closed before its stream ended."""


class _Handshake:
    """What Twisted's TLS protocol is to the connection creators and their verify
    callbacks: a failed identity check lands in ``failure``."""

    class factory:                      # protosFromProtocol: no ALPN
        wrappedFactory = None

    def __init__(self) -> None:
        self.failure = None

    def failVerification(self, failure) -> None:
        self.failure = failure


class BlockingTLS:
    """
    A TLS connection over a connected blocking ``sock``, used by one thread (``abort``
    from any). ``peer`` names the other end in errors ("sender", "receiver"); a read or
    write waiting more than ``timeout`` seconds breaks the connection (``set_timeout``
    changes it: a listener gives a new connection only the handshake's timeout until its
    request came, as every pyflock listener does).
    """

    def __init__(self, sock: socket.socket, connection: SSL.Connection,
                 handshake: _Handshake, peer: str, timeout: Optional[float]):
        self._sock = sock
        self._tls = connection
        self._handshake = handshake
        self._peer = peer
        self._timeout = timeout
        self._incoming = memoryview(bytearray(_PIECE))
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    def server(cls, sock: socket.socket, tls: ClusterTLS,
               timeout: Optional[float]) -> "BlockingTLS":
        """The accepting end, with ``tls``'s server options (client certificate required)."""
        handshake = _Handshake()
        connection = tls.server_options().serverConnectionForTLS(handshake)
        connection.set_accept_state()
        return cls(sock, connection, handshake, "receiver", timeout)

    @classmethod
    def client(cls, sock: socket.socket, tls: ClusterTLS, expected: Identity,
               timeout: Optional[float]) -> "BlockingTLS":
        """The connecting end, accepting only a server presenting ``expected``."""
        handshake = _Handshake()
        connection = tls.client_options(expected).clientConnectionForTLS(handshake)
        connection.set_connect_state()
        return cls(sock, connection, handshake, "sender", timeout)

    def _broken(self, error: BaseException) -> ConnectionBroken:
        """What ``error`` means for the round: why the connection broke."""
        if self._handshake.failure is not None:
            return ConnectionBroken(f"the {self._peer} was refused: "
                                    f"{self._handshake.failure.getErrorMessage()}")
        if isinstance(error, socket.timeout):
            return ConnectionBroken(f"no data from the {self._peer} for "
                                    f"{self._timeout:g} s")
        if isinstance(error, SSL.Error):
            return ConnectionBroken(f"TLS with the {self._peer} failed: {error}")
        return ConnectionBroken(f"the connection closed before the stream ended: {error}")

    def _flush(self) -> None:
        """Write to the socket what TLS has made."""
        while True:
            try:
                data = self._tls.bio_read(_PIECE + _PIECE // 8)
            except SSL.WantReadError:
                return
            self._sock.sendall(data)

    def _fill(self) -> None:
        """Hand TLS what the socket has."""
        count = self._sock.recv_into(self._incoming)
        if not count:
            raise ConnectionBroken(f"the {self._peer} closed the connection")
        self._tls.bio_write(self._incoming[:count])

    def handshake(self) -> None:
        """Make the TLS handshake; ``ConnectionBroken`` saying why it failed."""
        try:
            while True:
                try:
                    self._tls.do_handshake()
                    self._flush()
                    return
                except SSL.WantReadError:
                    self._flush()
                    self._fill()
        except SSL.Error as e:
            try:
                self._flush()           # the alert telling the peer why
            except OSError:
                pass
            raise self._broken(e) from None
        except (OSError, socket.timeout) as e:
            raise self._broken(e) from None

    def set_timeout(self, timeout: Optional[float]) -> None:
        """Break the connection once a read or write waits ``timeout`` seconds from now on."""
        self._timeout = timeout
        self._sock.settimeout(timeout)

    def peer_certificate(self):
        """The certificate the peer presented (pyOpenSSL), or None."""
        return self._tls.get_peer_certificate()

    def sendall(self, data) -> None:
        """Send ``data`` whole, a piece at a time."""
        view = memoryview(data)
        try:
            for start in range(0, len(view), _PIECE):
                self._tls.sendall(view[start:start + _PIECE])
                self._flush()
        except (SSL.Error, OSError) as e:
            raise self._broken(e) from None

    def receive(self) -> bytes:
        """What arrived: at least one byte; ``ConnectionBroken`` at the end of the
        connection (a stream ends with its own end frame, before)."""
        out = []
        try:
            while True:
                try:
                    out.append(self._tls.recv(_RECORD))
                except SSL.WantReadError:
                    if out:
                        return b"".join(out)
                    self._fill()
        except SSL.ZeroReturnError:
            if out:
                return b"".join(out)
            raise ConnectionBroken(f"the {self._peer} closed the connection") from None
        except (SSL.Error, OSError) as e:
            raise self._broken(e) from None

    def abort(self) -> None:
        """Break the connection now (any thread): its reads and writes fail."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Close the socket (no close_notify: a stream ends with its end frame)."""
        self._sock.close()


class _Host:
    """Where a ``PeerPort`` listens (as Twisted's ``getHost``)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port


class PeerPort:
    """
    The peer port: listens on ``address:port`` and calls ``serve(sock)`` in a thread of
    its own for each connection, at most ``limit`` at once (the others are closed at
    once). ``stopListening`` closes it; the connections served go on.
    """

    def __init__(self, reactor, address: str, port: int,
                 serve: Callable[[socket.socket], None], limit: int):
        self._reactor = reactor
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self._listening = socket.create_server((address, port), family=family, backlog=64)
        self._serve = serve
        self._served = threading.BoundedSemaphore(limit)
        self._thread = threading.Thread(target=self._accept, daemon=True,
                                        name=f"peer-port-{address}")
        self._stopped = False
        self._thread.start()

    def getHost(self) -> _Host:
        """Where it listens."""
        host, port = self._listening.getsockname()[:2]
        return _Host(host, port)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listening.accept()
            except OSError:
                if self._stopped:
                    return
                continue                # e.g. the peer reset before accept: go on
            if not self._served.acquire(blocking=False):
                _log.warn("pyflock:peer:too-many-connections", event_type=
                          "pyflock:peer:too-many-connections")
                sock.close()
                continue
            threading.Thread(target=self._one, args=(sock,), daemon=True,
                             name="peer-round").start()

    def _one(self, sock: socket.socket) -> None:
        try:
            self._serve(sock)
        finally:
            self._served.release()

    def stopListening(self):
        """Stop accepting; a Deferred that fires once the accepting thread ended."""
        from twisted.internet.threads import deferToThreadPool
        self._stopped = True
        try:
            self._listening.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listening.close()
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                 self._thread.join, 10)


__all__ = ["BlockingTLS", "ConnectionBroken", "PeerPort"]
