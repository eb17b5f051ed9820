"""
The cluster's revocation list on a node (issue 8, point 5).

The control service sends its ``cluster.crl`` over the agent channel (the ``revocations``
message, protocol 3). The agent checks that the cluster CA (``cluster.crt``) signed it,
puts it in force in its ``Revocations``, whose ``is_revoked`` is the hook of the agent's
``ClusterTLS`` (so every listener the agent runs with its node certificate, such as the
peer port, refuses a revoked certificate in the handshake, and every client refuses a
revoked server), and stores it in its state folder (``<data-path>/agent/cluster.crl``), so
that an agent restarted while the control service is down still refuses revoked peers.
A listener closes its open connections whose certificate becomes revoked with
``OpenConnections(tls.check, node_crl.revocations).track(factory, PEER_TRANSFER)``
(``pyflock.common._revocation``), as the control service does.

An agent keeps the newest list it has been sent: a list that is not the CA's, or that was
signed before the one in force, is refused (logged), so a list is never rolled back; and a
control service without a list sends none, which leaves the agent's in force (pyflock-ca
never takes a revocation back).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from cryptography import x509
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.logger import Logger, LogLevel

from pyflock.common._ca import CertificateError, CertificateFileError, PathLike
from pyflock.common._crl import CRL_FILE, RevocationList, parse_crl, read_crl, write_crl
from pyflock.common._logging import log_event
from pyflock.common._revocation import Revocations
from pyflock.common._threads import RunBlocking, run_now

_log = Logger()

#: What a list the control service sent is called in refusals.
_SENT = "the revocation list from the control service"


class CRLRefused(Exception):
    """A revocation list the control service sent is not applied; the text says why."""


def judge_crl(pem: str, authority: x509.Certificate,
              current: RevocationList) -> Optional[RevocationList]:
    """
    The list to put in force for ``pem`` (PEM text the control service sent), given the
    list in force (``current``): the new list, or None when it is ``current`` already;
    ``CRLRefused`` if ``authority`` (``cluster.crt``) did not sign it or it was signed
    before ``current`` (pure).
    """
    try:
        offered = parse_crl(pem.encode("ascii", "replace"), authority, _SENT)
    except CertificateFileError as e:
        raise CRLRefused(e.reason) from None
    if offered.pem == current.pem:
        return None
    if current.last_update is not None and offered.last_update < current.last_update:
        raise CRLRefused(f"it was signed at {offered.last_update.isoformat()}, before the "
                         f"list in force ({current.last_update.isoformat()}): a list is "
                         f"never rolled back")
    return offered


def _store(folder: Path, pem: str) -> Path:
    """Write ``pem`` to ``folder/cluster.crl`` durably, in one rename (blocking)."""
    return write_crl(folder, x509.load_pem_x509_crl(pem.encode("ascii")))


def _describe(revocations: RevocationList) -> dict:
    """The fields log events give of a list."""
    return {"revoked": len(revocations.serials),
            "last_update": (None if revocations.last_update is None
                            else revocations.last_update.isoformat()),
            "next_update": (None if revocations.next_update is None
                            else revocations.next_update.isoformat())}


class NodeRevocations:
    """
    This node's revocation list: ``revocations`` (give ``revocations.is_revoked`` to
    ``ClusterTLS.load``), loaded from ``folder/cluster.crl`` (the agent's state folder)
    by ``load`` and replaced by each list the control service sends (``received``, the
    agent channel's ``on_crl``), which is then stored there. Lists are checked against
    ``authority`` (``cluster.crt``); file IO runs in ``run_in_thread``, one write at a
    time; ``now`` tells an expired list (applied all the same, with a warning).
    """

    def __init__(self, folder: PathLike, authority: x509.Certificate,
                 revocations: Optional[Revocations] = None,
                 run_in_thread: RunBlocking = run_now,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self.folder = Path(folder)
        self.authority = authority
        self.revocations = Revocations() if revocations is None else revocations
        self._run = run_in_thread
        self._now = now
        self._writes = DeferredLock()

    @property
    def path(self) -> Path:
        """Where the list is stored."""
        return self.folder / CRL_FILE

    def load(self) -> Deferred:
        """
        Put the stored list in force; fires once it is. No file: nothing is revoked until
        the control service sends a list. A file that is unreadable or not the CA's is
        logged and left for the next list to replace.
        """
        def loaded(revocations: RevocationList) -> None:
            if revocations.pem is None:
                return
            log_event(_log, "pyflock:agent:crl-loaded", path=str(self.path),
                      **_describe(revocations))
            self._apply(revocations)

        def unusable(failure) -> None:
            failure.trap(CertificateError)
            log_event(_log, "pyflock:agent:crl-unusable", LogLevel.error,
                      path=str(self.path), reason=str(failure.value))
        return self._run(read_crl, self.path, self.authority).addCallbacks(loaded, unusable)

    def received(self, pem: str) -> Deferred:
        """
        A list the control service sent: put it in force at once if it is the CA's and
        newer than the one in force, then store it; fires once it is stored (or was not
        to be). Nothing here fails: refusals and failed writes are logged.
        """
        try:
            revocations = judge_crl(pem, self.authority, self.revocations.current)
        except CRLRefused as e:
            log_event(_log, "pyflock:agent:crl-refused", LogLevel.error, reason=str(e),
                      **_describe(self.revocations.current))
            return succeed(None)
        if revocations is None:
            return succeed(None)
        log_event(_log, "pyflock:agent:crl-received", **_describe(revocations))
        self._apply(revocations)

        def stored(path: Optional[Path]) -> None:
            if path is None:  # a newer list came in meanwhile, and is stored next
                return
            log_event(_log, "pyflock:agent:crl-stored", path=str(path),
                      **_describe(revocations))

        def failed(failure) -> None:
            log_event(_log, "pyflock:agent:crl-store-failed", LogLevel.error,
                      path=str(self.path), reason=str(failure.value))
        return self._writes.run(self._write, revocations.pem).addCallbacks(stored, failed)

    def _write(self, pem: str) -> Deferred:
        """Store ``pem`` unless a newer list came in meanwhile (it is stored next)."""
        if pem != self.revocations.current.pem:
            return succeed(None)
        return self._run(_store, self.folder, pem)

    def _apply(self, revocations: RevocationList) -> None:
        """Put ``revocations`` in force, warning if it is past its next update."""
        if revocations.expired(self._now()):
            log_event(_log, "pyflock:agent:crl-expired", LogLevel.warn,
                      next_update=revocations.next_update.isoformat(),
                      reason="the revocation list is past its next update; it is applied "
                             "all the same: sign it anew with `pyflock-ca crl`")
        self.revocations.replace(revocations)


__all__ = ["CRLRefused", "NodeRevocations", "judge_crl"]
