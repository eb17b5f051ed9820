"""
Applying ``cluster.crl`` in a running service: the revoked set every ``PeerCheck`` asks
(``Revocations``), the watcher that loads the file at start, on SIGHUP and when it changes
(``CRLWatcher``), and the listeners' open connections, of which those whose certificate
is now revoked are closed (``OpenConnections``).

A new connection with a revoked certificate fails its TLS handshake
(``PeerCheck.verify_client``); one already open is aborted as soon as the list naming it
is loaded, within ``DEFAULT_CRL_POLL`` seconds of the file changing.
"""

from __future__ import annotations

import os
import signal
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from cryptography import x509
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from zope.interface import directlyProvides, providedBy

from pyflock.common._ca import CertificateFileError, PathLike
from pyflock.common._crl import CRL_FILE, NOTHING_REVOKED, RevocationList, read_crl
from pyflock.common._logging import log_event
from pyflock.common._tls import PeerCheck, Role, _peer_certificate

#: Seconds between looks at ``cluster.crl`` for a change.
DEFAULT_CRL_POLL = 1.0

_log = Logger()


class Revocations:
    """
    The revocation list in force in a process: ``is_revoked`` is the hook of its
    ``PeerCheck``; ``subscribe`` to hear of each new list.
    """

    def __init__(self, current: RevocationList = NOTHING_REVOKED):
        self.current = current
        self._subscribers: list[Callable[[RevocationList], None]] = []

    def is_revoked(self, certificate: x509.Certificate) -> bool:
        """Whether ``certificate`` is on the list in force."""
        return self.current.is_revoked(certificate)

    def subscribe(self, callback: Callable[[RevocationList], None]) -> None:
        """Call ``callback(list)`` whenever a new list comes into force."""
        self._subscribers.append(callback)

    def replace(self, revocations: RevocationList) -> None:
        """Put ``revocations`` in force and tell the subscribers."""
        self.current = revocations
        for callback in list(self._subscribers):
            callback(revocations)


def _file_version(path: Path) -> Optional[tuple]:
    """What tells one version of ``path`` from another (None: no file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return ("error", e.errno)
    return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)


class CRLWatcher:
    """
    Loads ``path`` (``cluster.crl``, checked against ``authority``, ``cluster.crt``) into
    ``revocations``: at ``start``, on SIGHUP (``watch_sighup``) and whenever the file
    changes (looked at every ``interval`` seconds on ``clock``). A list that cannot be
    read or is not the CA's leaves the one in force and is logged as an error; an
    expired one is applied with a warning.
    """

    def __init__(self, clock, path: PathLike, authority: x509.Certificate,
                 revocations: Revocations, interval: float = DEFAULT_CRL_POLL,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self._clock = clock
        self.path = Path(path)
        self._authority = authority
        self.revocations = revocations
        self._interval = interval
        self._now = now
        self._seen: object = object()
        self._warned = False
        self._poll: Optional[LoopingCall] = None
        self._previous_handler = None

    def start(self) -> None:
        """Load the list now (``CertificateFileError`` if it is bad), then poll for changes."""
        self._seen = _file_version(self.path)
        self._apply(read_crl(self.path, self._authority))
        self._poll = LoopingCall(self._look)
        self._poll.clock = self._clock
        self._poll.start(self._interval, now=False)

    def stop(self) -> None:
        """Stop polling and give SIGHUP back to its previous handler."""
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None

    def watch_sighup(self, reactor) -> None:
        """Reload on SIGHUP (call from the main thread)."""
        self._previous_handler = signal.signal(
            signal.SIGHUP, lambda number, frame: reactor.callFromThread(self.reload))

    def _look(self) -> None:
        """Reload if the file changed since it was last loaded; warn (once) when the list
        in force runs past its next update."""
        if _file_version(self.path) != self._seen:
            self.reload()
        elif not self._warned and self.revocations.current.expired(self._now()):
            self._warn_expired(self.revocations.current)

    def reload(self) -> None:
        """Load the file now; keep the list in force if it cannot be loaded."""
        self._seen = _file_version(self.path)
        try:
            revocations = read_crl(self.path, self._authority)
        except CertificateFileError as e:
            log_event(_log, "pyflock:crl:unusable", LogLevel.error, path=str(self.path),
                      reason=str(e), revoked=len(self.revocations.current.serials))
            return
        self._apply(revocations)

    def _apply(self, revocations: RevocationList) -> None:
        """Put ``revocations`` in force, saying so (and warning if it is expired)."""
        self._warned = False
        if revocations.expired(self._now()):
            self._warn_expired(revocations)
        log_event(_log, "pyflock:crl:loaded", path=str(self.path),
                  revoked=len(revocations.serials),
                  next_update=(None if revocations.next_update is None
                               else revocations.next_update.isoformat()))
        self.revocations.replace(revocations)


    def _warn_expired(self, revocations: RevocationList) -> None:
        """Say that ``revocations`` is past its next update, and applied all the same."""
        self._warned = True
        log_event(_log, "pyflock:crl:expired", LogLevel.warn, path=str(self.path),
                  next_update=revocations.next_update.isoformat(),
                  reason="the revocation list is past its next update; it is applied "
                         "all the same: sign it anew with `pyflock-ca crl`")


class _TrackingFactory(Factory):
    """``wrapped``, with every protocol it builds remembered in ``connections``."""

    def __init__(self, wrapped, connections: "weakref.WeakSet"):
        self._wrapped = wrapped
        self._connections = connections
        # TLS asks the factory for ALPN protocols (a twisted.web Site offers them).
        directlyProvides(self, providedBy(wrapped))

    def __getattr__(self, name):
        return getattr(self._wrapped, name)

    def buildProtocol(self, addr):
        protocol = self._wrapped.buildProtocol(addr)
        if protocol is not None:
            self._connections.add(protocol)
        return protocol

    def logPrefix(self) -> str:
        return self._wrapped.logPrefix()

    def doStart(self) -> None:
        self._wrapped.doStart()

    def doStop(self) -> None:
        self._wrapped.doStop()


def _transport_of(protocol):
    """The transport of a tracked protocol (a twisted.web Site's protocol is a proxy
    whose channel holds it), or None."""
    transport = getattr(protocol, "transport", None)
    if transport is None:
        transport = getattr(getattr(protocol, "_channel", None), "transport", None)
    return transport


class OpenConnections:
    """
    The open connections of the listeners a factory was ``track``-ed for; whenever
    ``revocations`` changes, those whose peer's certificate ``check`` finds revoked are
    aborted.
    """

    def __init__(self, check: PeerCheck, revocations: Revocations):
        self._check = check
        self._tracked: dict[str, weakref.WeakSet] = {}
        revocations.subscribe(lambda _: self.close_revoked())

    def track(self, factory, role: Role):
        """``factory`` for a listener of ``role``, its connections remembered."""
        connections = self._tracked.setdefault(role.name, weakref.WeakSet())
        return _TrackingFactory(factory, connections)

    def close_revoked(self) -> int:
        """Abort every open connection whose certificate is revoked; how many."""
        closed = 0
        for role, connections in self._tracked.items():
            for protocol in list(connections):
                transport = _transport_of(protocol)
                certificate = _peer_certificate(transport)
                if certificate is None:
                    continue
                reason = self._check.revocation(certificate)
                if reason is None:
                    continue
                log_event(_log, "pyflock:crl:connection-closed", LogLevel.warn,
                          listener=role, peer=str(transport.getPeer()), reason=reason)
                connections.discard(protocol)
                transport.abortConnection()
                closed += 1
        return closed


def watch_revocations(reactor, certificates_directory: PathLike,
                      authority: x509.Certificate, revocations: Revocations,
                      interval: float = DEFAULT_CRL_POLL) -> CRLWatcher:
    """
    Start applying ``certificates_directory/cluster.crl`` to ``revocations``: loaded now
    (``CertificateFileError`` if it is bad), then on SIGHUP and on every change.
    """
    watcher = CRLWatcher(reactor, Path(certificates_directory) / CRL_FILE, authority,
                         revocations, interval)
    watcher.start()
    watcher.watch_sighup(reactor)
    return watcher


__all__ = ["CRLWatcher", "DEFAULT_CRL_POLL", "OpenConnections", "Revocations",
           "watch_revocations"]
