"""
The revocation list shared by the control service's replicas (issue 9, point 5).

Each replica loads ``cluster.crl`` from its certificates folder (``CRLWatcher``). On the
etcd store the list in force is the newer (by its signing time) of that file and the list
kept in etcd under ``P crl`` (PEM): a list put in the folder of any one replica is written
to etcd, and every replica watches that key (asking for a leader, like the configuration
watch) and reads it again at each change, putting a newer list in force, so a certificate
revoked through one replica is refused by every other as soon as the watch tells it. A
watch that ends (a member lost, compaction) is opened again after a fresh read, from the
revision of that read, so no change is missed. A list read from etcd is checked against
the cluster CA exactly as the file is; one that fails the check is logged and ignored. On
the SQLite store the file alone is in force, as before.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from pyflock.common._ca import CertificateFileError
from pyflock.common._crl import RevocationList, parse_crl
from pyflock.common._logging import log_event
from pyflock.common._revocation import Revocations
from pyflock.control._etcd_client import describe
from pyflock.control._etcd_model import (
    b64, compare, header_revision, put, range_request, txn, unb64,
)
from pyflock.control._etcd_watch import WATCH_RETRY, _Lines, read_watch_message, stream_lines

_log = Logger()

_OLDEST = datetime.min.replace(tzinfo=timezone.utc)


def newer(candidate: RevocationList, than: RevocationList) -> bool:
    """Whether ``candidate`` was signed after ``than`` (a list never signed is oldest)."""
    return (candidate.last_update or _OLDEST) > (than.last_update or _OLDEST)


async def read_shared_crl(gateway: Any, keys: Any) -> Optional[bytes]:
    """The revocation list (PEM) kept under ``keys.crl``, or None."""
    return (await _read_at(gateway, keys))[0]


async def _read_at(gateway: Any, keys: Any) -> tuple[Optional[bytes], int]:
    """The list kept under ``keys.crl`` (None: none) and the etcd revision of the read."""
    answer = await gateway.call("kv/range", range_request(keys.crl))
    found = answer.get("kvs") or []
    return (unb64(found[0].get("value")) if found else None), header_revision(answer)


def crl_watch_request(keys: Any, start_revision: int) -> dict:
    """The body of a ``/v3/watch`` on the shared list's key from ``start_revision`` on."""
    return {"create_request": {"key": b64(keys.crl), "start_revision": str(start_revision)}}


async def write_shared_crl(gateway: Any, keys: Any, pem: bytes,
                           replacing: Optional[bytes] = None) -> bool:
    """
    Keep ``pem`` under ``keys.crl`` if the key still holds ``replacing`` (None: if it is
    absent), so that two replicas never overwrite a list they have not seen; whether it
    was written.
    """
    check = (compare(keys.crl, "CREATE", "EQUAL", 0) if replacing is None
             else compare(keys.crl, "VALUE", "EQUAL", replacing))
    answer = await gateway.call("kv/txn", txn(compares=[check], success=[put(keys.crl, pem)]))
    return bool(answer.get("succeeded"))


class SharedRevocations:
    """
    Puts in force (``in_force``) the newer of the list loaded from the file
    (``from_file``) and the one in etcd, and writes a newer file list to etcd.
    """

    def __init__(self, clock: Any, gateway: Any, keys: Any, authority: x509.Certificate,
                 from_file: Revocations, in_force: Revocations):
        self._clock = clock
        self._gateway = gateway
        self._keys = keys
        self._authority = authority
        self._from_file = from_file
        self._in_force = in_force
        self._shared_pem: Optional[bytes] = None
        # The etcd revision of the latest read (the watch starts after it).
        self._read_revision = 0
        self._stream: Optional[_Lines] = None
        self._watching: Optional[Deferred] = None
        self._stopped = False
        self._busy = False
        self._again = False
        self._waiters: list[Deferred] = []

    def start(self) -> Deferred:
        """Put the file's list in force, then look at etcd now (the Deferred fires when
        done) and at every change of its key (a watch)."""
        self._in_force.replace(self._from_file.current)
        self._from_file.subscribe(lambda _: self.sync())
        first = self.sync()
        first.addCallback(lambda _: self._watch())
        return first

    def _watch(self) -> None:
        if not self._stopped:
            self._watching = Deferred.fromCoroutine(self._watch_forever())

    def stop(self) -> Deferred:
        """Stop watching etcd; fires once the watch has ended."""
        self._stopped = True
        if self._stream is not None:
            self._stream.abort()
        watching, self._watching = self._watching, None
        return watching if watching is not None else Deferred.fromCoroutine(_nothing())

    async def _watch_forever(self) -> None:
        """Watch the key from the latest read on; after the watch ends, read again (a
        change may have come meanwhile) and watch from there."""
        while not self._stopped:
            try:
                await stream_lines(self._gateway,
                                   crl_watch_request(self._keys, self._read_revision + 1),
                                   self._line, self._opened)
            except Exception as e:
                log_event(_log, "pyflock:crl:shared-watch-failed", LogLevel.warn,
                          reason=describe(e))
            if self._stopped:
                return
            await deferLater(self._clock, WATCH_RETRY, lambda: None)
            if not self._stopped:
                await self.sync()

    def _opened(self, stream: Optional[_Lines]) -> None:
        self._stream = stream
        if stream is not None and self._stopped:
            stream.abort()

    def _line(self, line: bytes) -> None:
        try:
            kind = read_watch_message(line).kind
        except ValueError:
            kind = "error"
        if kind == "events":
            self.sync()
        elif kind in ("canceled", "error") and self._stream is not None:
            self._stream.abort()  # read again and watch anew

    def sync(self) -> Deferred:
        """
        Read etcd's list, put the newest in force and publish the file's if newer; fires
        when a look that began after this call is done (one in progress is followed by
        another).
        """
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        if self._busy:
            self._again = True
        else:
            self._run()
        return waiter

    def _run(self) -> None:
        self._busy, self._again = True, False
        waiting, self._waiters = self._waiters, []

        def done(result):
            self._busy = False
            if isinstance(result, Failure):
                log_event(_log, "pyflock:crl:shared-failed", LogLevel.error,
                          reason=result.getErrorMessage())
            for waiter in waiting:
                waiter.callback(None)
            if self._again:
                self._run()
        Deferred.fromCoroutine(self._sync()).addBoth(done)

    async def _sync(self) -> None:
        try:
            pem, self._read_revision = await _read_at(self._gateway, self._keys)
        except Exception as e:
            log_event(_log, "pyflock:crl:shared-unreadable", LogLevel.warn, reason=str(e))
            return
        shared = self._parse(pem)
        self._shared_pem = pem
        local = self._from_file.current
        best = shared if shared is not None and not newer(local, shared) else local
        if newer(best, self._in_force.current) or (
                best.last_update == self._in_force.current.last_update
                and best.serials != self._in_force.current.serials):
            log_event(_log, "pyflock:crl:in-force", revoked=len(best.serials),
                      source="etcd" if best is shared else "file")
            self._in_force.replace(best)
        if local.pem and (shared is None or newer(local, shared)):
            try:
                written = await write_shared_crl(self._gateway, self._keys,
                                                 local.pem.encode("ascii"), pem)
            except Exception as e:
                log_event(_log, "pyflock:crl:shared-unwritable", LogLevel.warn,
                          reason=str(e))
                return
            if written:
                self._shared_pem = local.pem.encode("ascii")
                log_event(_log, "pyflock:crl:shared", revoked=len(local.serials))

    def _parse(self, pem: Optional[bytes]) -> Optional[RevocationList]:
        if pem is None:
            return None
        try:
            return parse_crl(pem, self._authority, "etcd " + self._keys.crl.decode())
        except CertificateFileError as e:
            if pem != self._shared_pem:
                log_event(_log, "pyflock:crl:unusable", LogLevel.error,
                          path="etcd " + self._keys.crl.decode(), reason=str(e))
            return None


async def _nothing() -> None:
    pass


async def share_revocations(clock: Any, store: Any, authority: x509.Certificate,
                            from_file: Revocations, in_force: Revocations
                            ) -> Optional[SharedRevocations]:
    """
    Put the file's list in force: on the etcd store through a started
    ``SharedRevocations`` (returned, to ``stop``), on SQLite directly (None).
    """
    if hasattr(store, "gateway"):
        shared = SharedRevocations(clock, store.gateway, store.keys, authority, from_file,
                                   in_force)
        await shared.start()
        return shared
    in_force.replace(from_file.current)
    from_file.subscribe(in_force.replace)
    return None


__all__ = ["SharedRevocations", "newer", "read_shared_crl", "share_revocations",
           "write_shared_crl"]
