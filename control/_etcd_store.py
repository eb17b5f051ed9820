"""
The configuration store on etcd 3.4, through its v3 JSON gateway (``_etcd_client``), with
the key layout, encodings and transactions of ``_etcd_model`` (read its docstring for the
keys and for how store revisions map to etcd revisions).

Requests leave one at a time, in submission order. Writes that queue while a request is
in flight leave together in one transaction (group commit) as far as etcd's limits allow
(``MAX_TXN_OPS`` operations, ``MAX_TXN_BYTES``); each fires with its own store revision
once etcd has committed the transaction. A single write too big for one transaction is
split only when every part leaves a valid configuration (a lease-only write keeping the
generation: lease expiry); any other is refused with ``StoreError`` and nothing written.

One writer's view. Every write transaction compares the revision key's mod revision with
the one this store object last saw (at open, ``load``, or its own last write), so a write
based on a configuration another writer has changed since fails with ``StoreError`` and
writes nothing; the configuration service then reloads (``_persistence``), as after any
failed write. A write retried on another member after a timeout carries the same nonce,
so that the store tells its own committed attempt from another writer's.

History. Removed rows stay as tombstones (empty values) so that ``changes_since`` can
tell them; the change feed is a range of rows by mod revision, so it does not depend on
etcd's own history, and etcd compaction never makes it fail. The store keeps
``retained`` etcd revisions of history; once the latest write is ``retained`` past
``config/oldest`` by ``retained // 8``, it raises ``config/oldest`` and deletes the
tombstones at or before it (each still unchanged, by a compare).
"""

from __future__ import annotations

import secrets
from collections import deque
from itertools import islice
from typing import Any, Optional, Sequence

import attr
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from pyflock.common._logging import log_event
from pyflock.common._model import Configuration
from pyflock.control._etcd_client import EtcdError, EtcdGateway, EtcdTLS, EtcdUnavailable
from pyflock.control._etcd_model import (
    COMPACTED_CODE, MAX_TXN_BYTES, MAX_TXN_OPS, PAGE, REVISION_SCALE, SCHEMA_VERSION,
    EtcdDataError, KeyValue, Keys, Meta, b64, batch_of, conflict_changes, decode_rows,
    decode_token, encode_token, etcd_floor, fence_broken, get, header_revision,
    init_request, more, prefix_end, prune_requests, raise_oldest_request, range_request,
    read_first_page, responses, splittable, split, store_revision, take_batch, txn,
    write_outcome, write_request,
)
from pyflock.control._store import (
    RETAINED_REVISIONS, Fenced, HistoryGone, IConfigurationStore, StoreChanges, StoreConflict,
    StoreError,
    StoreSnapshot, StoreWrite, check_history, new_store_id,
)

_log = Logger()

#: Attempts at a paged read that etcd compaction interrupted.
READ_ATTEMPTS = 3


@attr.s(auto_attribs=True)
class _Job:
    kind: str
    payload: Any
    waiting: list


@implementer(IConfigurationStore)
class EtcdConfigurationStore:
    """
    A configuration store under ``prefix`` in the etcd cluster ``gateway`` talks to; open
    it with ``open_etcd_store``. ``transactions`` counts committed write transactions.
    """

    def __init__(self, gateway: EtcdGateway, prefix: str = "/pyflock/",
                 retained: int = RETAINED_REVISIONS):
        self.keys = Keys.under(prefix)
        self._gateway = gateway
        self._retained = retained
        self._queue: deque[_Job] = deque()
        self._busy = False
        self._delivering = False
        self._closed = False
        self._meta = Meta()
        self.store_id = ""
        self.transactions = 0
        # What the latest refused write read of the other writers' changes: the meta and
        # the changes since this store's revision, for the next ``catch_up``.
        self._conflict: Optional[tuple[Meta, StoreChanges]] = None
        # The replica's part in the leader election (``_etcd_leader``), if any: then only
        # the leader prunes, with its fence.
        self.leadership: Any = None

    @property
    def tag_revision(self) -> int:
        """
        The etcd mod revision of the generation key as of this store's last load or write:
        it changes with every dataset change and never with a lease-only one, the same on
        every replica (for the configuration tag, issue 9 point 2).
        """
        return self._meta.generation_revision

    @property
    def where(self) -> str:
        """The prefix and members, for messages."""
        return (f"etcd prefix {self.keys.prefix.decode('utf-8', 'replace')!r} at "
                f"{', '.join(self._gateway.endpoints)}")

    # -- the interface ---------------------------------------------------------------------

    def load(self) -> Deferred:
        """Read the whole configuration, after every write submitted before this call."""
        return self._request("load", None)

    def write(self, change: StoreWrite) -> Deferred:
        """Commit ``change`` (with the writes queued beside it); fires with its revision."""
        return self._request("write", change)

    def changes_since(self, revision: int) -> Deferred:
        """The rows changed after ``revision``, after every write submitted before."""
        return self._request("changes", revision)

    def catch_up(self, revision: int) -> Deferred:
        """
        Like ``changes_since``, and from now on writes compare with what it read: call it
        only with no write of this store in flight, and apply what it answers.
        """
        return self._request("catch_up", revision)

    @property
    def gateway(self) -> EtcdGateway:
        """The gateway this store talks through (the watch and health check use it)."""
        return self._gateway

    def load_tokens(self) -> Deferred:
        """Every stored join token."""
        return self._request("tokens", None)

    def write_token(self, token_id: str, record) -> Deferred:
        """Store (or with None forget) a join token; fires with None once committed."""
        return self._request("token", (token_id, record))

    def close(self) -> Deferred:
        """Finish what is queued, then drop the connections; idempotent."""
        kind = "closed" if self._closed else "close"
        self._closed = True
        waiting: Deferred = Deferred()
        self._queue.append(_Job(kind, None, [waiting]))
        self._pump()
        return waiting

    # -- the queue -------------------------------------------------------------------------

    def _request(self, kind: str, payload: Any) -> Deferred:
        if self._closed:
            return fail(StoreError(f"{self.where}: the configuration store is closed."))
        waiting: Deferred = Deferred()
        self._queue.append(_Job(kind, payload, [waiting]))
        self._pump()
        return waiting

    def _pump(self) -> None:
        """Start the next job; consecutive writes become one batch."""
        if self._busy or self._delivering or not self._queue:
            return
        jobs = [self._queue.popleft()]
        if jobs[0].kind == "write" and jobs[0].payload.fence is None:
            queued = [jobs[0].payload]
            for job in islice(self._queue, REVISION_SCALE - 1):
                # A leader-only write goes alone: its fence must not refuse others.
                if job.kind != "write" or job.payload.fence is not None:
                    break
                queued.append(job.payload)
            count = take_batch(self.keys, queued, self._meta.generation)
            jobs += [self._queue.popleft() for _ in range(count - 1)]
        self._busy = True
        d = Deferred.fromCoroutine(self._run(jobs))
        d.addBoth(self._finished, jobs)

    def _finished(self, result: Any, jobs: list[_Job]) -> None:
        self._busy = False
        if isinstance(result, Failure) and not result.check(StoreError, HistoryGone, Fenced):
            result = Failure(StoreError(f"{self.where}: unexpected error: {result.value!r}"))
        results = result if jobs[0].kind == "write" and not isinstance(result, Failure) \
            else [result] * len(jobs)
        # What the callbacks submit leaves together once they have all run, so that
        # writers that write again on success share one transaction.
        self._delivering = True
        try:
            for job, outcome in zip(jobs, results):
                for waiting in job.waiting:
                    if isinstance(outcome, Failure):
                        waiting.errback(outcome)
                    else:
                        waiting.callback(outcome)
        finally:
            self._delivering = False
        self._pump()

    async def _run(self, jobs: list[_Job]) -> Any:
        kind = jobs[0].kind
        try:
            if kind == "write":
                return await self._write([job.payload for job in jobs])
            if kind == "close":
                await self._gateway.close()
                return None
            if kind == "closed":
                return None
            return await getattr(self, "_do_" + kind)(jobs[0].payload)
        except (EtcdError, EtcdUnavailable) as e:
            raise StoreError(f"{self.where}: {e}") from e
        except EtcdDataError as e:
            raise StoreError(f"{self.where}: the store is damaged: {e}. Restore it from "
                             f"a backup.") from e

    # -- opening ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Make the prefix a store if it is empty, check it and read its meta keys."""
        keys = self.keys
        store_keys = keys.prefix + b"store/"
        try:
            answer = await self._gateway.call("kv/txn", txn(success=[
                get(store_keys, prefix_end(store_keys)),
                get(keys.prefix, prefix_end(keys.prefix), count_only=True)]))
            meta = Meta.of(keys, responses(answer)[0])
            count = int(answer["responses"][1]["response_range"].get("count", 0))
            if meta.store_id is None:
                if count:
                    raise StoreError(
                        f"{self.where}: the prefix holds {count} keys but no pyflock store "
                        f"(no {keys.store_id.decode()!r}). Choose an empty prefix with "
                        f"--etcd-prefix, or remove those keys if they are not needed.")
                # Two replicas starting at once on an empty prefix: one initialises it.
                await self._gateway.call("kv/txn", init_request(keys, new_store_id()))
            self._know(await self._read_meta())
        except (EtcdError, EtcdUnavailable, EtcdDataError) as e:
            raise StoreError(f"{self.where}: cannot open the configuration store: {e}") from e
        if self._meta.schema is not None and self._meta.schema > SCHEMA_VERSION:
            raise StoreError(f"{self.where}: the store has schema version "
                             f"{self._meta.schema}, but this pyflock-control knows versions "
                             f"up to {SCHEMA_VERSION}. Run a pyflock-control at least as "
                             f"new as the one that wrote it.")

    async def _read_meta(self) -> Meta:
        """Read the store and meta keys alone."""
        keys = self.keys
        answer = await self._gateway.call("kv/txn", txn(success=[
            get(keys.prefix + b"store/", prefix_end(keys.prefix + b"store/")),
            get(keys.config, keys.rows)]))
        return Meta.of(keys, [kv for found in responses(answer) for kv in found])

    def _know(self, meta: Meta) -> None:
        self._meta = meta
        self.store_id = meta.store_id or ""

    # -- reading ---------------------------------------------------------------------------

    async def _read(self, since: Optional[int] = None, check=lambda meta: None
                    ) -> tuple[Meta, list[KeyValue]]:
        """
        The meta keys and the rows (changed after etcd revision ``since`` if given), all
        at one etcd revision; ``check(meta)`` runs before rows past the first page are read.
        """
        for attempt in range(READ_ATTEMPTS):
            try:
                answer = await self._gateway.call("kv/txn", read_first_page(self.keys, since))
                store, meta_kvs, rows = responses(answer)
                meta = Meta.of(self.keys, store + meta_kvs)
                check(meta)
                if more(answer, 2):
                    rows += await self._pages(rows[-1].key + b"\0", prefix_end(self.keys.rows),
                                              header_revision(answer),
                                              0 if since is None else since + 1)
                return meta, rows
            except EtcdError as e:
                if e.code != COMPACTED_CODE or attempt == READ_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _pages(self, start: bytes, end: bytes, revision: int = 0,
                     min_mod_revision: int = 0, max_mod_revision: int = 0) -> list[KeyValue]:
        """Every key from ``start`` to ``end`` at ``revision`` (0: now), page by page."""
        found: list[KeyValue] = []
        while True:
            answer = await self._gateway.call("kv/range", range_request(
                start, end, revision=revision, limit=PAGE, min_mod_revision=min_mod_revision,
                max_mod_revision=max_mod_revision))
            page = [KeyValue.of(kv) for kv in answer.get("kvs", [])]
            found += page
            if not answer.get("more") or not page:
                return found
            revision = revision or header_revision(answer)
            start = page[-1].key + b"\0"

    async def _do_load(self, _: None) -> StoreSnapshot:
        meta, rows = await self._read()
        datasets, leases = decode_rows(self.keys, rows)
        try:
            config = Configuration.from_records(
                [d for d in datasets.values() if d is not None],
                [lease for lease in leases.values() if lease is not None], meta.generation)
        except Exception as e:
            raise EtcdDataError(f"the rows do not form a valid configuration: {e}") from e
        self._know(meta)
        self._conflict = None
        return StoreSnapshot(config, store_revision(meta.revision), self.store_id)

    async def _do_changes(self, since: int, know: bool = False) -> StoreChanges:
        def check(meta: Meta) -> None:
            check_history(since, store_revision(meta.oldest_kept(self._retained)),
                          store_revision(meta.revision))
        meta, rows = await self._read(etcd_floor(since), check)
        datasets, leases = decode_rows(self.keys, rows)
        if know:
            self._know(meta)
        change = StoreWrite(datasets=tuple(datasets.items()), leases=tuple(leases.items()),
                            generation=meta.generation)
        return StoreChanges(since=since, revision=store_revision(meta.revision),
                            change=change, store_id=meta.store_id or self.store_id)

    async def _do_catch_up(self, since: int) -> StoreChanges:
        conflict, self._conflict = self._conflict, None
        if conflict is not None and conflict[1].since == since:
            # The refused write read them already, at one revision: no round trip.
            self._know(attr.evolve(conflict[0], store_id=self.store_id,
                                   schema=self._meta.schema))
            return conflict[1]
        return await self._do_changes(since, know=True)

    async def _do_tokens(self, _: None) -> tuple:
        kvs = await self._pages(self.keys.tokens, prefix_end(self.keys.tokens))
        try:
            return tuple(decode_token(kv.value) for kv in kvs)
        except Exception as e:
            raise EtcdDataError(f"a join token cannot be read: {e}") from e

    async def _do_token(self, payload: tuple) -> None:
        token_id, record = payload
        key = self.keys.token(token_id)
        if record is None:
            await self._gateway.call("kv/deleterange", range_request(key))
        else:
            await self._gateway.call("kv/put", {"key": b64(key),
                                                "value": b64(encode_token(record))})

    # -- writing ---------------------------------------------------------------------------

    async def _write(self, changes: Sequence[StoreWrite]) -> list[int]:
        """Commit ``changes`` (in one transaction, unless one alone is split); revisions."""
        batch = batch_of(self.keys, changes, self._meta.generation)
        fence = changes[0].fence
        if batch.fits():
            committed = await self._commit(batch, fence)
            revisions = [store_revision(committed, len(changes) - 1 - i)
                         for i in range(len(changes))]
        elif len(changes) == 1 and splittable(changes[0], self._meta.generation):
            for part in split(changes[0]):
                committed = await self._commit(batch_of(self.keys, [part],
                                                        self._meta.generation), fence)
            revisions = [store_revision(committed)]
        else:
            raise StoreError(
                f"{self.where}: this change writes {batch.operations()} keys "
                f"({batch.size()} bytes); one etcd transaction carries at most "
                f"{MAX_TXN_OPS} operations and {MAX_TXN_BYTES} bytes, and only a change "
                f"of leases alone may be split over several. Nothing was written.")
        self._schedule_pruning()
        return revisions

    async def _commit(self, batch, fence=None) -> int:
        """Commit one transaction if nobody else wrote since (and ``fence``, if any,
        holds); its etcd revision."""
        nonce = secrets.token_hex(8)
        answer = await self._gateway.call(
            "kv/txn", write_request(self.keys, batch, self._meta.revision, nonce, fence))
        committed = write_outcome(self.keys, answer, nonce)
        if committed is None and fence_broken(answer, fence):
            raise Fenced(f"{self.where}: this replica no longer leads (its campaign key, "
                         f"created at etcd revision {fence.revision}, is gone); nothing of "
                         f"this leader-only change was written")
        if committed is None:
            self._conflict = conflict_changes(self.keys, answer, self._meta.revision,
                                              self._retained, self.store_id)
            raise StoreConflict(
                f"{self.where}: another writer changed the configuration since this "
                f"control service read it (at etcd revision {self._meta.revision}); nothing "
                f"of this change was written. The configuration is reloaded.")
        self._conflict = None
        self._meta = attr.evolve(
            self._meta, revision=committed, generation=batch.generation,
            generation_revision=committed if batch.writes_generation
            else self._meta.generation_revision)
        self.transactions += 1
        return committed

    def _schedule_pruning(self) -> None:
        # With replicas, only the leader prunes, with its fence (``leadership``).
        leadership = self.leadership
        if leadership is not None and not leadership.leading:
            return
        step = max(1, self._retained // 8)
        if (self._meta.revision - self._retained - self._meta.oldest >= step and not any(
                job.kind == "prune" for job in self._queue)):
            self._queue.append(_Job("prune", getattr(leadership, "fence", None), []))

    async def _do_prune(self, fence: Any) -> None:
        """Raise the oldest kept revision, then delete the tombstones it leaves behind."""
        await _prune(self, fence)


async def _prune(store: EtcdConfigurationStore, fence: Any) -> None:
    """
    Raise ``store``'s oldest kept revision, then delete the tombstones it leaves behind,
    each transaction with the leader's ``fence`` (None: the store has no leader election).
    """
    seen, oldest = store._meta.oldest, store._meta.revision - store._retained
    keys, gateway = store.keys, store.gateway
    try:
        answer = await gateway.call("kv/txn", raise_oldest_request(keys, seen, oldest, fence))
        if not answer.get("succeeded"):
            # Another store pruned first (or the fence broke). Only the oldest revision is
            # taken from what is read: the compare of writes stays on what the store loaded.
            found = await store._read_meta()
            store._meta = attr.evolve(store._meta, oldest=found.oldest)
            return
        store._meta = attr.evolve(store._meta, oldest=oldest)
        rows = await store._pages(keys.rows, prefix_end(keys.rows),
                                  min_mod_revision=seen + 1, max_mod_revision=oldest)
        tombstones = [kv for kv in rows if not kv.value]
        for request in prune_requests(keys, tombstones, oldest, fence=fence):
            await gateway.call("kv/txn", request)
        log_event(_log, "pyflock:control:etcd-pruned", oldest=oldest,
                  tombstones=len(tombstones))
    except Exception as e:
        log_event(_log, "pyflock:control:etcd-prune-failed", LogLevel.warn, reason=str(e))


async def open_etcd_store(reactor: Any, endpoints: Sequence[str], prefix: str = "/pyflock/",
                          tls: Optional[EtcdTLS] = None, retained: int = RETAINED_REVISIONS,
                          timeout: Optional[float] = None,
                          deadline: Optional[float] = None) -> EtcdConfigurationStore:
    """
    Open (or create) the store under ``prefix`` on the etcd members at ``endpoints``
    (``timeout`` and ``deadline``: see ``EtcdGateway``); fails with ``StoreError`` when it
    cannot be used.
    """
    options = {name: value for name, value in (("timeout", timeout), ("deadline", deadline))
               if value is not None}
    gateway = EtcdGateway(reactor, endpoints, tls, **options)
    store = EtcdConfigurationStore(gateway, prefix, retained)
    try:
        await store.open()
    except BaseException:
        await gateway.close()
        raise
    return store


__all__ = ["EtcdConfigurationStore", "open_etcd_store"]
