"""
What keeps the connections of a TLS listener from exhausting the process (issue 8): a cap
on open connections, a deadline for the TLS handshake, and a periodic re-check of each
peer's certificate on long-lived connections (expired, or revoked once ``cluster.crl``
is read), closing those it no longer accepts.

``guarded_tls_factory`` wraps a protocol factory in TLS with these guards; the cap is
Twisted's ``ThrottlingFactory``, the deadline its ``TimeoutMixin``. Which certificate is
still acceptable is decided elsewhere (``PeerCheck.still_acceptable`` in ``_tls``), passed
in as ``judge(certificate, now)``: this module only applies the verdict.

It also keeps large writes cheap (issue 12): a large write is encrypted in one call and
handed to TCP in one piece (``_BatchedTLSTransport``), and the TCP connection under the
cap sends up to ``SEND_PER_CALL`` bytes per system call (``_SendLimited``).
"""

from __future__ import annotations

from typing import Callable, Optional

import attr
from OpenSSL import SSL
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.protocols.policies import ThrottlingFactory, ThrottlingProtocol, TimeoutMixin
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory

from pyflock.common._logging import log_event

_log = Logger()

#: At most this many connections are open on one listener; more are closed at once.
DEFAULT_MAX_CONNECTIONS = 1000

#: Seconds a client has to complete the TLS handshake.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

#: Seconds between re-checks of the peer certificates of open connections.
DEFAULT_RECHECK = 60.0

#: ``judge(certificate, now)``: why a peer presenting ``certificate`` (pyOpenSSL's) may no
#: longer stay connected at ``now`` (POSIX seconds), or None while it may.
Judge = Callable[[object, float], Optional[str]]


def _positive(instance, attribute, value) -> None:
    """attrs validator: a number greater than zero."""
    if not value > 0:
        raise ValueError(f"{attribute.name} must be greater than zero, not {value!r}")


@attr.s(frozen=True, auto_attribs=True)
class ConnectionLimits:
    """
    The guards of one listener: at most ``max_connections`` open connections, the TLS
    handshake done within ``handshake_timeout`` seconds, and peer certificates re-judged
    every ``recheck`` seconds.
    """

    max_connections: int = attr.ib(default=DEFAULT_MAX_CONNECTIONS, validator=_positive)
    handshake_timeout: float = attr.ib(default=DEFAULT_HANDSHAKE_TIMEOUT, validator=_positive)
    recheck: float = attr.ib(default=DEFAULT_RECHECK, validator=_positive)


#: The most application bytes one TLS record carries: a write no larger goes Twisted's way.
_RECORD = 2 ** 14

#: Bytes a TLS record adds to its payload, at most (AES-GCM adds 29 in TLS 1.2, 22 in 1.3).
_RECORD_OVERHEAD = 64


#: The most bytes one ``send`` system call of a listener's connection is given. Twisted's
#: default, 128 KiB, sent a list's 256 KiB chunk (as records) in two calls with a trip
#: through the reactor between them; this is a fifth of the service's CPU per list of
#: 100,000 datasets.
SEND_PER_CALL = 1024 * 1024


class _BatchedTLSTransport(BufferingTLSTransport):
    """
    Twisted's TLS transport, except that a large write is encrypted into the memory BIO
    (in one ``send``: ``tls_options`` turns partial writes off) and then handed to the
    TCP transport in one piece, instead of one piece per 16 KiB record: for an 18 MB
    list, a thousand trips through pyOpenSSL's ``bio_read``, the transport's ``write``
    and its buffer's join fewer (a third of the service's CPU per list). Anything else
    (a small write, an error, a handshake that wants to read, a lost connection) goes
    Twisted's own way, ``_write``.
    """

    def _write(self, data: bytes) -> None:
        """Encrypt ``data`` and write it to the transport, large writes in one piece."""
        if len(data) <= _RECORD or self._lostTLSConnection or self._appSendBuffer:
            super()._write(data)
            return
        connection = self.getHandle()
        view = memoryview(data)
        sent = 0
        try:
            while sent < len(data):
                sent += connection.send(view[sent:])
        except SSL.Error:
            # Twisted's own _write meets the same condition again and deals with it
            # (buffers the rest until the peer's bytes arrive, or closes).
            pass
        finally:
            self._flush_records(connection, sent)
        if sent < len(data):
            super()._write(data[sent:])

    def _flush_records(self, connection, sent: int) -> None:
        """Write the records encrypting ``sent`` bytes to the transport, as one piece."""
        size = sent + (sent // _RECORD + 1) * _RECORD_OVERHEAD
        records = []
        while True:
            try:
                records.append(connection.bio_read(size))
            except SSL.WantReadError:
                break
        if records:
            self.transport.write(records[0] if len(records) == 1 else b"".join(records))


class _DeadlineTLSProtocol(TimeoutMixin, _BatchedTLSTransport):
    """A server TLS connection aborted unless its handshake completes in time."""

    def makeConnection(self, transport) -> None:
        """Start the handshake's clock, then the handshake."""
        self.callLater = self.factory.clock.callLater
        self.setTimeout(self.factory.limits.handshake_timeout)
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        """Feed TLS; once the handshake is done, its clock stops."""
        super().dataReceived(data)
        if self._handshakeDone and self.timeOut is not None:
            self.setTimeout(None)

    def connectionLost(self, reason) -> None:
        """Stop the clock with the connection."""
        self.setTimeout(None)
        super().connectionLost(reason)

    def timeoutConnection(self) -> None:
        """Drop a client that did not finish the handshake in time."""
        log_event(_log, "pyflock:tls:handshake-timeout", LogLevel.warn,
                  peer=str(self.transport.getPeer()),
                  seconds=self.factory.limits.handshake_timeout)
        self.transport.abortConnection()

    @property
    def handshake_done(self) -> bool:
        """Whether the TLS handshake has completed."""
        return self._handshakeDone


class _GuardedTLSFactory(TLSMemoryBIOFactory):
    """
    Server TLS over ``wrapped`` with a handshake deadline and, every ``limits.recheck``
    seconds while it listens, ``judge`` asked about each connection's peer certificate.
    """

    protocol = _DeadlineTLSProtocol

    def __init__(self, options, wrapped, clock, limits: ConnectionLimits,
                 judge: Optional[Judge]):
        super().__init__(options, False, wrapped, clock=clock)
        self.clock = clock
        self.limits = limits
        self._judge = judge
        self._recheck: Optional[LoopingCall] = None

    def startFactory(self) -> None:
        """Start re-checking peers (when there is a judge)."""
        super().startFactory()
        if self._judge is not None:
            self._recheck = LoopingCall(self.recheck)
            self._recheck.clock = self.clock
            self._recheck.start(self.limits.recheck, now=False)

    def stopFactory(self) -> None:
        """Stop re-checking peers."""
        if self._recheck is not None and self._recheck.running:
            self._recheck.stop()
        super().stopFactory()

    def recheck(self) -> None:
        """Close every connection whose peer certificate the judge no longer accepts."""
        now = self.clock.seconds()
        for protocol in list(self.protocols):
            if not protocol.handshake_done:
                continue
            certificate = protocol.getPeerCertificate()
            if certificate is None:
                continue
            reason = self._judge(certificate, now)
            if reason is not None:
                log_event(_log, "pyflock:tls:connection-closed", LogLevel.warn,
                          peer=str(protocol.transport.getPeer()), reason=reason)
                protocol.abortConnection()


class _SendLimited(ThrottlingProtocol):
    """A capped connection whose TCP transport sends up to ``SEND_PER_CALL`` bytes a call."""

    def makeConnection(self, transport) -> None:
        """Raise ``transport``'s send limit, then connect."""
        transport.SEND_LIMIT = SEND_PER_CALL
        super().makeConnection(transport)


class _ConnectionCap(ThrottlingFactory):
    """``ThrottlingFactory``'s connection cap, saying in the log when it refuses; its
    connections are ``_SendLimited``, the outermost layer, which holds the TCP transport."""

    protocol = _SendLimited
    _refusing = False

    def buildProtocol(self, addr):
        """The wrapped protocol, or None (the connection is closed) at the cap."""
        protocol = super().buildProtocol(addr)
        if protocol is None and not self._refusing:
            self._refusing = True
            log_event(_log, "pyflock:tls:connections-full", LogLevel.warn,
                      max_connections=self.maxConnectionCount, peer=str(addr))
        return protocol

    def unregisterProtocol(self, p) -> None:
        """Count a closed connection; below the cap again, the next refusal is logged."""
        super().unregisterProtocol(p)
        self._refusing = False


def guarded_tls_factory(options, wrapped, clock, limits: ConnectionLimits = ConnectionLimits(),
                        judge: Optional[Judge] = None) -> ThrottlingFactory:
    """
    A server factory speaking TLS with ``options`` over ``wrapped``, guarded by
    ``limits``; with ``judge``, peers are re-judged periodically (on ``clock``).
    """
    return _ConnectionCap(_GuardedTLSFactory(options, wrapped, clock, limits, judge),
                          maxConnectionCount=limits.max_connections)


__all__ = ["ConnectionLimits", "DEFAULT_HANDSHAKE_TIMEOUT", "DEFAULT_MAX_CONNECTIONS",
           "DEFAULT_RECHECK", "Judge", "SEND_PER_CALL", "guarded_tls_factory"]
