"""
The etcd store's pure core: where each row lives under the prefix, how rows and tokens are
encoded, and the JSON bodies of the gateway requests (``/v3/kv/range``, ``/v3/kv/txn``)
the store sends, with the decoding of their answers. No IO: ``control/_etcd_store.py``
sends what this module builds.

Keys under the prefix ``P`` (default ``/pyflock/``), values UTF-8:

- ``P store/id``: the store id (hex); ``P store/schema``: ``SCHEMA_VERSION``. Written
  once, by the transaction that initialises the prefix (create revision 0 compared).
- ``P config/generation``: the configuration's generation (decimal). Written by every
  write that changes a dataset or the generation, never by lease-only writes: its mod
  revision can serve as the configuration tag (issue 9, point 2).
- ``P config/revision``: written by every configuration write (its value is the writing
  transaction's nonce); its mod revision is the etcd revision of the latest write.
- ``P config/oldest``: the etcd revision up to which tombstones may have been pruned.
- ``P config/rows/dataset/<id>``, ``P config/rows/lease/<id>``: one JSON object per
  dataset and per lease; an empty value is a tombstone (a row removed; kept so that the
  change feed can tell), pruned once older than the retained history.
- ``P tokens/<id>``: one JSON object per join token; outside the configuration's revisions.

Revisions. Concurrent writes share one etcd transaction, so one etcd revision, but each
write needs a revision of its own: the store revision of a write is ``E * REVISION_SCALE
- k``, where ``E`` is the etcd revision of its transaction and ``k`` the number of writes
after it in the same transaction. The latest write of a transaction, and a ``load``, are
at exactly ``E * REVISION_SCALE``. The change feed since store revision ``R`` is every row
whose etcd mod revision is above ``R // REVISION_SCALE``.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Iterable, Optional, Sequence

import attr

from pyflock.common._records import (
    Dataset, Lease, dataset_from_json, dataset_to_json,
)
from pyflock.control._store import StoreChanges, StoreWrite
from pyflock.control._tokens import TokenRecord

#: The schema version of the keys this code writes under a prefix.
SCHEMA_VERSION = 1

#: Store revisions per etcd revision: the most writes one transaction carries.
REVISION_SCALE = 128

#: etcd's ``--max-txn-ops`` default: the most operations in each list of a transaction.
MAX_TXN_OPS = 128

#: The most bytes of keys and values one transaction carries: etcd refuses requests over
#: 1.5 MiB (``--max-request-bytes``); this leaves room for the encoding around them.
MAX_TXN_BYTES = 1024 * 1024

#: What one operation costs in a request beside its key and value (protobuf framing).
OP_OVERHEAD = 16

#: Rows read per range request when paging through a prefix.
PAGE = 1000

#: The ``code`` of an etcd error for a revision already compacted (gRPC OutOfRange).
COMPACTED_CODE = 11


class EtcdDataError(Exception):
    """What etcd holds under the prefix cannot be read as a pyflock store; says which key."""


def b64(data: bytes) -> str:
    """``data`` base64-encoded, as the gateway takes keys and values."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: Optional[str]) -> bytes:
    """The bytes of a base64 field of a gateway answer (absent: empty)."""
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


@attr.s(frozen=True, auto_attribs=True)
class Keys:
    """The keys of one store under ``prefix`` (bytes, ends with ``/``)."""

    prefix: bytes

    @classmethod
    def under(cls, prefix: str) -> "Keys":
        """The keys under ``prefix``, with a ``/`` added when it lacks one."""
        if not prefix:
            raise ValueError("the etcd prefix must not be empty")
        return cls((prefix if prefix.endswith("/") else prefix + "/").encode("utf-8"))

    @property
    def store_id(self) -> bytes:
        """The store id's key."""
        return self.prefix + b"store/id"

    @property
    def schema(self) -> bytes:
        """The schema version's key."""
        return self.prefix + b"store/schema"

    @property
    def config(self) -> bytes:
        """The prefix of everything with a revision: meta keys and rows."""
        return self.prefix + b"config/"

    @property
    def generation(self) -> bytes:
        """The generation's key; its mod revision changes with every dataset change."""
        return self.config + b"generation"

    @property
    def revision(self) -> bytes:
        """The key every configuration write puts; its mod revision is the latest write's."""
        return self.config + b"revision"

    @property
    def oldest(self) -> bytes:
        """The etcd revision up to which tombstones may be gone."""
        return self.config + b"oldest"

    @property
    def rows(self) -> bytes:
        """The prefix of dataset and lease rows."""
        return self.config + b"rows/"

    def dataset(self, dataset_id: str) -> bytes:
        """The key of a dataset's row."""
        return self.rows + b"dataset/" + dataset_id.encode("utf-8")

    def lease(self, dataset_id: str) -> bytes:
        """The key of a lease's row."""
        return self.rows + b"lease/" + dataset_id.encode("utf-8")

    @property
    def tokens(self) -> bytes:
        """The prefix of join tokens."""
        return self.prefix + b"tokens/"

    def token(self, token_id: str) -> bytes:
        """The key of a join token."""
        return self.tokens + token_id.encode("utf-8")

    @property
    def replicas(self) -> bytes:
        """The prefix of the replicas' own keys, each bound to its replica's etcd lease."""
        return self.prefix + b"replicas/"

    def replica(self, name: str) -> bytes:
        """The key a replica announces itself with (``--replica-name``)."""
        return self.replicas + name.encode("utf-8")

    @property
    def reports(self) -> bytes:
        """The prefix of agents' state reports, published by the replica they talk to."""
        return self.prefix + b"state/nodes/"

    def report(self, node_uuid: str) -> bytes:
        """The key of one node's state report."""
        return self.reports + node_uuid.encode("utf-8")

    @property
    def state(self) -> bytes:
        """The prefix of the shared cluster state: reports and deaths."""
        return self.prefix + b"state/"

    @property
    def deaths(self) -> bytes:
        """The prefix of the leader's marks of dead nodes."""
        return self.prefix + b"state/dead/"

    def death(self, node_uuid: str) -> bytes:
        """The key the leader marks node ``node_uuid`` dead with (fenced)."""
        return self.deaths + node_uuid.encode("utf-8")

    @property
    def election(self) -> bytes:
        """
        The prefix of the leader campaign: one key per candidate, bound to its etcd lease;
        the key with the lowest create revision leads.
        """
        return self.prefix + b"election/"

    @property
    def crl(self) -> bytes:
        """The cluster's certificate revocation list (PEM), shared by every replica."""
        return self.prefix + b"crl"


# -- rows ------------------------------------------------------------------------------------

def encode_dataset(dataset: Optional[Dataset]) -> bytes:
    """A dataset's stored value; empty (a tombstone) for None."""
    if dataset is None:
        return b""
    fields = dataset_to_json(dataset)
    del fields["dataset_id"]  # the key names it
    return _canonical(fields)


def decode_dataset(dataset_id: str, value: bytes) -> Optional[Dataset]:
    """The dataset a stored value holds; None for a tombstone."""
    if not value:
        return None
    return dataset_from_json(dict(json.loads(value), dataset_id=dataset_id),
                             f"stored dataset {dataset_id}")


def encode_lease(lease: Optional[Lease]) -> bytes:
    """A lease's stored value; empty (a tombstone) for None."""
    if lease is None:
        return b""
    return _canonical({"node_uuid": lease.node_uuid, "expiration": lease.expiration})


def decode_lease(dataset_id: str, value: bytes) -> Optional[Lease]:
    """The lease a stored value holds; None for a tombstone."""
    if not value:
        return None
    fields = json.loads(value)
    return Lease(dataset_id=dataset_id, node_uuid=fields["node_uuid"],
                 expiration=fields["expiration"])


def encode_token(record: TokenRecord) -> bytes:
    """A join token's stored value."""
    return _canonical(attr.asdict(record))


def decode_token(value: bytes) -> TokenRecord:
    """The join token a stored value holds."""
    fields = json.loads(value)
    return TokenRecord(token_id=fields["token_id"], secret_hash=fields["secret_hash"],
                       created=float(fields["created"]), expires=float(fields["expires"]),
                       uses=int(fields["uses"]), used=int(fields["used"]))


@attr.s(frozen=True, auto_attribs=True)
class KeyValue:
    """One key as a range answers it: its value and etcd revisions."""

    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int

    @classmethod
    def of(cls, kv: dict) -> "KeyValue":
        """Decode one ``kvs`` entry of a gateway answer."""
        return cls(key=unb64(kv.get("key")), value=unb64(kv.get("value")),
                   mod_revision=int(kv.get("mod_revision", 0)),
                   create_revision=int(kv.get("create_revision", 0)))


def decode_rows(keys: Keys, kvs: Iterable[KeyValue]) -> tuple[dict, dict]:
    """The datasets and leases (None for tombstones) by id that row keys hold."""
    datasets: dict[str, Optional[Dataset]] = {}
    leases: dict[str, Optional[Lease]] = {}
    for kv in kvs:
        kind, _, dataset_id = kv.key[len(keys.rows):].decode("utf-8").partition("/")
        try:
            if kind == "dataset":
                datasets[dataset_id] = decode_dataset(dataset_id, kv.value)
            elif kind == "lease":
                leases[dataset_id] = decode_lease(dataset_id, kv.value)
            else:
                raise ValueError(f"unknown kind of row {kind!r}")
        except Exception as e:
            raise EtcdDataError(f"the etcd key {kv.key.decode('utf-8', 'replace')!r} "
                                f"cannot be read: {e}") from e
    return datasets, leases


# -- revisions -------------------------------------------------------------------------------

def store_revision(etcd_revision: int, after: int = 0) -> int:
    """The store revision of a write at ``etcd_revision`` with ``after`` writes after it
    in its transaction."""
    return etcd_revision * REVISION_SCALE - after


def etcd_floor(revision: int) -> int:
    """The etcd revision whose rows a configuration at store ``revision`` holds entirely."""
    return revision // REVISION_SCALE


@attr.s(frozen=True, auto_attribs=True)
class Meta:
    """What the meta keys say: the latest write's etcd revision (0: none yet), the
    generation and the etcd revision it was last written at (the configuration tag's
    revision), the oldest kept etcd revision, the store id and schema."""

    revision: int = 0
    generation: int = 0
    generation_revision: int = 0
    oldest: int = 0
    store_id: Optional[str] = None
    schema: Optional[int] = None

    @classmethod
    def of(cls, keys: Keys, kvs: Iterable[KeyValue]) -> "Meta":
        """The meta keys among ``kvs``, checked."""
        meta = cls()
        for kv in kvs:
            try:
                if kv.key == keys.revision:
                    meta = attr.evolve(meta, revision=kv.mod_revision)
                elif kv.key == keys.generation:
                    meta = attr.evolve(meta, generation=int(kv.value),
                                       generation_revision=kv.mod_revision)
                elif kv.key == keys.oldest:
                    meta = attr.evolve(meta, oldest=int(kv.value))
                elif kv.key == keys.store_id:
                    meta = attr.evolve(meta, store_id=kv.value.decode("ascii"))
                elif kv.key == keys.schema:
                    meta = attr.evolve(meta, schema=int(kv.value))
            except ValueError as e:
                raise EtcdDataError(f"the etcd key {kv.key.decode('utf-8', 'replace')!r} "
                                    f"holds {kv.value[:40]!r}: {e}") from e
        return meta

    def oldest_kept(self, retained: int) -> int:
        """The oldest etcd revision the change feed answers for, keeping ``retained``."""
        return max(self.oldest, self.revision - retained)


# -- requests --------------------------------------------------------------------------------

def range_request(key: bytes, end: Optional[bytes] = None, *, revision: int = 0,
                  limit: int = 0, min_mod_revision: int = 0, max_mod_revision: int = 0,
                  count_only: bool = False) -> dict:
    """The body of a ``/v3/kv/range`` (or a transaction's range) request."""
    body: dict[str, Any] = {"key": b64(key)}
    if end is not None:
        body["range_end"] = b64(end)
    for name, value in (("revision", revision), ("limit", limit),
                        ("min_mod_revision", min_mod_revision),
                        ("max_mod_revision", max_mod_revision)):
        if value:
            body[name] = str(value)
    if count_only:
        body["count_only"] = True
    return body


def put(key: bytes, value: bytes) -> dict:
    """A transaction's put operation."""
    return {"request_put": {"key": b64(key), "value": b64(value)}}


def delete(key: bytes) -> dict:
    """A transaction's delete operation of one key."""
    return {"request_delete_range": {"key": b64(key)}}


def get(key: bytes, end: Optional[bytes] = None, **options: Any) -> dict:
    """A transaction's range operation."""
    return {"request_range": range_request(key, end, **options)}


def compare(key: bytes, target: str, result: str, value: Any) -> dict:
    """One compare: ``target`` (``MOD``, ``CREATE``, ``VERSION``, ``VALUE``) of ``key``
    against ``value`` with ``result`` (``EQUAL``, ``LESS``, ...)."""
    field = {"MOD": "mod_revision", "CREATE": "create_revision", "VERSION": "version",
             "VALUE": "value"}[target]
    return {"key": b64(key), "target": target, "result": result,
            field: b64(value) if target == "VALUE" else str(value)}


def txn(compares: Sequence[dict] = (), success: Sequence[dict] = (),
        failure: Sequence[dict] = ()) -> dict:
    """The body of a ``/v3/kv/txn`` request."""
    return {"compare": list(compares), "success": list(success), "failure": list(failure)}


def read_first_page(keys: Keys, since: Optional[int]) -> dict:
    """
    A read-only transaction: the store and meta keys, and the first page of rows (those
    changed after etcd revision ``since`` if given), all at one revision.
    """
    return txn(success=[
        get(keys.prefix + b"store/", prefix_end(keys.prefix + b"store/")),
        get(keys.config, keys.rows),
        get(keys.rows, prefix_end(keys.rows), limit=PAGE,
            min_mod_revision=0 if since is None else since + 1)])


def responses(answer: dict) -> list[list[KeyValue]]:
    """The keys each range of a transaction's answer returned, in order."""
    return [[KeyValue.of(kv) for kv in r.get("response_range", {}).get("kvs", [])]
            for r in answer.get("responses", [])]


def more(answer: dict, index: int) -> bool:
    """Whether the ``index``-th range of a transaction's answer had more keys than its limit."""
    return bool(answer.get("responses", [])[index].get("response_range", {}).get("more"))


def header_revision(answer: dict) -> int:
    """The etcd revision an answer was made at."""
    return int(answer.get("header", {}).get("revision", 0))


def keepalive_ttl(answer: dict) -> int:
    """The seconds an etcd lease has left by a ``lease/keepalive`` answer (the gateway
    puts it under ``result``); 0 when etcd no longer has the lease."""
    return int(answer.get("result", answer).get("TTL", 0))


def init_request(keys: Keys, store_id: str) -> dict:
    """The transaction that makes the prefix a store, unless another did first."""
    return txn(compares=[compare(keys.store_id, "CREATE", "EQUAL", 0)],
               success=[put(keys.store_id, store_id.encode("ascii")),
                        put(keys.schema, str(SCHEMA_VERSION).encode("ascii"))],
               failure=[get(keys.prefix + b"store/", prefix_end(keys.prefix + b"store/"))])


# -- writes ----------------------------------------------------------------------------------

@attr.s(frozen=True, auto_attribs=True)
class Batch:
    """
    The rows a transaction writes for ``writes`` consecutive writes (later values win), and
    whether it writes the generation key.
    """

    rows: tuple[tuple[bytes, bytes], ...]
    generation: int
    writes_generation: bool
    writes: int

    def operations(self) -> int:
        """The operations of its success list: rows, the generation, the revision key."""
        return len(self.rows) + (1 if self.writes_generation else 0) + 1

    def size(self) -> int:
        """The bytes of keys and values it carries, with each operation's overhead."""
        return sum(len(k) + len(v) + OP_OVERHEAD for k, v in self.rows) + 128

    def fits(self) -> bool:
        """Whether one transaction can carry it within etcd's limits."""
        return (self.operations() <= MAX_TXN_OPS and self.size() <= MAX_TXN_BYTES
                and self.writes <= REVISION_SCALE)


def _rows(keys: Keys, change: StoreWrite) -> list[tuple[bytes, bytes]]:
    return ([(keys.dataset(i), encode_dataset(d)) for i, d in change.datasets]
            + [(keys.lease(i), encode_lease(lease)) for i, lease in change.leases])


def batch_of(keys: Keys, changes: Sequence[StoreWrite], known_generation: int) -> Batch:
    """
    The batch writing ``changes`` in order over a store whose generation is
    ``known_generation``: a lease-only batch leaves the generation key alone unless the
    generation differs.
    """
    rows: dict[bytes, bytes] = {}
    touches_datasets = False
    for change in changes:
        rows.update(_rows(keys, change))
        touches_datasets |= bool(change.datasets) or not change.leases
    generation = changes[-1].generation
    return Batch(rows=tuple(rows.items()), generation=generation,
                 writes_generation=touches_datasets or generation != known_generation,
                 writes=len(changes))


def take_batch(keys: Keys, queued: Sequence[StoreWrite], known_generation: int) -> int:
    """How many of the ``queued`` writes (at least one) the next transaction carries."""
    count = 1
    while count < len(queued) and batch_of(keys, queued[:count + 1],
                                           known_generation).fits():
        count += 1
    return count


def splittable(change: StoreWrite, known_generation: int) -> bool:
    """
    Whether a write too big for one transaction may be split over several: only a
    lease-only one that keeps the generation (lease expiry), whose parts each leave a
    valid configuration.
    """
    return not change.datasets and bool(change.leases) and (
        change.generation == known_generation)


def split(change: StoreWrite, rows_per_part: int = MAX_TXN_OPS - 2) -> list[StoreWrite]:
    """A lease-only write as several, each with at most ``rows_per_part`` leases."""
    leases = change.leases
    return [StoreWrite(leases=leases[i:i + rows_per_part], generation=change.generation,
                       fence=change.fence)
            for i in range(0, len(leases), rows_per_part)]


def fence_compares(fence: Any) -> list[dict]:
    """The compare a leader-only write carries: the leader's campaign key still exists,
    created at the fence's revision (none without a fence)."""
    return [] if fence is None else [compare(fence.key, "CREATE", "EQUAL", fence.revision)]


def write_request(keys: Keys, batch: Batch, expected: int, nonce: str,
                  fence: Any = None) -> dict:
    """
    The transaction writing ``batch`` if the latest write is still the one at etcd revision
    ``expected`` (0: none), marked with ``nonce``, and ``fence`` (if any) holds; else it
    reads the revision key, to tell a conflict from an earlier attempt of its own that
    committed, what changed (``conflict_reads``), and the fence's key (``fence_broken``).
    """
    success = [put(k, v) for k, v in batch.rows]
    if batch.writes_generation:
        success.append(put(keys.generation, str(batch.generation).encode("ascii")))
    success.append(put(keys.revision, nonce.encode("ascii")))
    # On failure it also reads what the other writers changed (the meta keys and a page
    # of rows), so that the writer can catch up without another round trip.
    return txn(compares=[compare(keys.revision, "MOD", "EQUAL", expected)]
               + fence_compares(fence),
               success=success, failure=[
                   get(keys.revision), get(keys.config, keys.rows),
                   get(keys.rows, prefix_end(keys.rows), limit=PAGE,
                       min_mod_revision=expected + 1)]
               + ([get(fence.key)] if fence is not None else []))


def fence_broken(answer: dict, fence: Any) -> bool:
    """Whether a refused write with ``fence`` was refused because the fence no longer
    holds (its key, read last on failure, is gone or was created at another revision)."""
    if fence is None or answer.get("succeeded"):
        return False
    found = responses(answer)[-1]
    return not found or found[0].create_revision != fence.revision


def conflict_reads(keys: Keys, answer: dict) -> Optional[tuple[Meta, list[KeyValue]]]:
    """
    What a write refused for another writer's read on failure: the meta keys and every
    row changed since; None when the rows were more than one page (read them apart).
    """
    found = responses(answer)
    if len(found) < 3 or more(answer, 2):
        return None
    return Meta.of(keys, found[1]), found[2]


def write_outcome(keys: Keys, answer: dict, nonce: str) -> Optional[int]:
    """
    The etcd revision a write transaction committed at, or None if another writer wrote
    first: a failed compare whose revision key holds ``nonce`` was an earlier attempt of
    this very transaction, which committed.
    """
    if answer.get("succeeded"):
        return header_revision(answer)
    found = responses(answer)[0]
    if found and found[0].value == nonce.encode("ascii"):
        return found[0].mod_revision
    return None


def conflict_changes(keys: Keys, answer: dict, since: int, retained: int, store_id: str
                     ) -> Optional[tuple[Meta, StoreChanges]]:
    """
    What a write expecting etcd revision ``since`` and refused read: the meta and the
    changes since (None if it could not read them all, or they reach past the history
    kept, ``retained`` revisions).
    """
    found = conflict_reads(keys, answer)
    if found is None or since < found[0].oldest_kept(retained):
        return None
    meta, rows = found
    datasets, leases = decode_rows(keys, rows)
    return meta, StoreChanges(
        since=store_revision(since), revision=store_revision(meta.revision),
        change=StoreWrite(datasets=tuple(datasets.items()), leases=tuple(leases.items()),
                          generation=meta.generation),
        store_id=store_id)


def prune_requests(keys: Keys, tombstones: Sequence[KeyValue], oldest: int,
                   per_txn: int = MAX_TXN_OPS // 2, fence: Any = None) -> list[dict]:
    """
    Transactions deleting ``tombstones`` that are still at or before etcd revision
    ``oldest`` (one rewritten since, or a ``fence`` broken, makes its transaction do
    nothing).
    """
    return [txn(compares=[compare(kv.key, "MOD", "LESS", oldest + 1) for kv in part]
                + fence_compares(fence),
                success=[delete(kv.key) for kv in part])
            for part in (tombstones[i:i + per_txn]
                         for i in range(0, len(tombstones), per_txn))]


def raise_oldest_request(keys: Keys, seen: int, oldest: int, fence: Any = None) -> dict:
    """The transaction raising the oldest kept revision from ``seen`` to ``oldest``, while
    ``fence`` (if any) holds."""
    current = [compare(keys.oldest, "VALUE", "EQUAL", str(seen).encode("ascii"))] if seen \
        else [compare(keys.oldest, "CREATE", "EQUAL", 0)]
    return txn(compares=current + fence_compares(fence),
               success=[put(keys.oldest, str(oldest).encode("ascii"))])
