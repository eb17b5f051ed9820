"""
The etcd store's pure core (key layout, encodings, revisions, batches and transactions)
and its gateway client (endpoint rotation, timeouts, errors) against a stub gateway.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from pyflock.common._records import Dataset, Lease
from pyflock.control._etcd_client import (
    EtcdError, EtcdGateway, EtcdUnavailable, parse_endpoints,
)
from pyflock.control._etcd_model import (
    MAX_TXN_BYTES, MAX_TXN_OPS, REVISION_SCALE, EtcdDataError, KeyValue, Keys, Meta, b64,
    batch_of, decode_dataset, decode_lease, decode_rows, decode_token, encode_dataset,
    encode_lease, encode_token, etcd_floor, keepalive_ttl, prefix_end, prune_requests, split, splittable,
    store_revision, take_batch, write_outcome, write_request,
)
from pyflock.control._store import StoreWrite
from tests.contracts.store import NODE_A, NODE_B, dataset_id, sample_token

KEYS = Keys.under("/p")
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


def test_prefix_end():
    """The range end of a prefix is the prefix with its last byte below 0xFF raised."""
    assert prefix_end(b"/pyflock/") == b"/pyflock0"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"


def test_keys_under():
    """A prefix gets a trailing slash; an empty one is refused."""
    assert Keys.under("/p").prefix == Keys.under("/p/").prefix == b"/p/"
    assert KEYS.dataset("x") == b"/p/config/rows/dataset/x"
    assert KEYS.rows < KEYS.dataset("x") < prefix_end(KEYS.rows)
    assert not KEYS.generation.startswith(KEYS.rows)
    with pytest.raises(ValueError):
        Keys.under("")


@given(primary=st.uuids().map(str),
       size=st.none() | st.integers(2 ** 16, 2 ** 52).map(lambda n: n * 1024),
       metadata=st.dictionaries(st.text(min_size=1, max_size=256), st.text(max_size=256),
                                max_size=4),
       deleted=st.booleans(), retained=st.none() | st.floats(0, 2 ** 40))
def test_dataset_round_trip(primary, size, metadata, deleted, retained):
    """Any dataset decodes as it was encoded, a deleted one's ``retained_until`` too."""
    dataset = Dataset(dataset_id=dataset_id(1), primary=primary, maximum_size=size,
                      metadata=metadata, deleted=deleted,
                      retained_until=retained if deleted else None)
    assert decode_dataset(dataset.dataset_id, encode_dataset(dataset)) == dataset


@given(expiration=st.none() | st.floats(allow_nan=False, allow_infinity=False))
def test_lease_round_trip(expiration):
    """Any lease decodes as it was encoded."""
    lease = Lease(dataset_id=dataset_id(1), node_uuid=NODE_A, expiration=expiration)
    assert decode_lease(lease.dataset_id, encode_lease(lease)) == lease


def test_tombstones_and_tokens():
    """None encodes as an empty value (a tombstone) and decodes back; tokens round-trip."""
    assert encode_dataset(None) == encode_lease(None) == b""
    assert decode_dataset("x", b"") is None and decode_lease("x", b"") is None
    token = sample_token("0000000000000001", used=2)
    assert decode_token(encode_token(token)) == token


def test_damaged_row_names_its_key():
    """A row that is not a stored dataset fails with ``EtcdDataError`` naming its key."""
    with pytest.raises(EtcdDataError, match="/p/config/rows/dataset/x"):
        decode_rows(KEYS, [KeyValue(KEYS.dataset("x"), b"{}", 5, 5)])
    with pytest.raises(EtcdDataError, match="generation"):
        Meta.of(KEYS, [KeyValue(KEYS.generation, b"many", 5, 5)])


@given(st.integers(1, 2 ** 40), st.integers(0, REVISION_SCALE - 1))
def test_revisions_of_a_batch(etcd_revision, after):
    """
    The writes of one transaction get increasing store revisions above every earlier
    transaction's; the change feed from any of them reads the transaction's rows again
    unless it is the last.
    """
    revision = store_revision(etcd_revision, after)
    assert store_revision(etcd_revision - 1) < revision <= store_revision(etcd_revision)
    assert etcd_floor(revision) == (etcd_revision if after == 0 else etcd_revision - 1)


def dataset_write(n: int, generation: int = 1, **metadata) -> StoreWrite:
    """A write of dataset ``n``."""
    dataset = Dataset(dataset_id=dataset_id(n), primary=NODE_A, metadata=metadata)
    return StoreWrite(datasets=((dataset.dataset_id, dataset),), generation=generation)


def lease_write(n: int, generation: int = 1) -> StoreWrite:
    """A write of a lease on dataset ``n``."""
    lease = Lease(dataset_id=dataset_id(n), node_uuid=NODE_B)
    return StoreWrite(leases=((lease.dataset_id, lease),), generation=generation)


def test_batch_later_values_win():
    """A batch holds each row once, with the last value written to it."""
    batch = batch_of(KEYS, [dataset_write(1, 1, name="a"), dataset_write(1, 2, name="b")], 0)
    assert [k for k, _ in batch.rows] == [KEYS.dataset(dataset_id(1))]
    assert json.loads(batch.rows[0][1])["metadata"] == {"name": "b"}
    assert (batch.generation, batch.writes, batch.operations()) == (2, 2, 3)


def test_generation_written_only_when_it_may_change():
    """
    A batch writes the generation key with a dataset change or a generation change, not
    with leases alone.
    """
    assert batch_of(KEYS, [dataset_write(1, 5)], 5).writes_generation
    assert batch_of(KEYS, [StoreWrite(generation=5)], 5).writes_generation
    assert not batch_of(KEYS, [lease_write(1, 5)], 5).writes_generation
    assert batch_of(KEYS, [lease_write(1, 6)], 5).writes_generation


def test_take_batch_within_limits():
    """Batches stay within etcd's operation and size limits and the revision scale."""
    singles = [dataset_write(n) for n in range(300)]
    assert take_batch(KEYS, singles, 0) == MAX_TXN_OPS - 2
    big = [dataset_write(n, name="x" * 100_000) for n in range(30)]
    count = take_batch(KEYS, big, 0)
    assert batch_of(KEYS, big[:count], 0).size() <= MAX_TXN_BYTES < batch_of(
        KEYS, big[:count + 1], 0).size()
    same_row = [dataset_write(1, n) for n in range(300)]
    assert take_batch(KEYS, same_row, 0) == REVISION_SCALE


def test_only_lease_changes_split():
    """A lease-only write keeping the generation splits into parts within the limit."""
    expire = StoreWrite(leases=tuple((dataset_id(n), None) for n in range(300)),
                        generation=3)
    assert splittable(expire, 3)
    assert not splittable(expire, 2)
    assert not splittable(dataset_write(1, 3), 3)
    parts = split(expire)
    assert [len(p.leases) for p in parts] == [126, 126, 48]
    assert sum((p.leases for p in parts), ()) == expire.leases
    assert all(batch_of(KEYS, [p], 3).fits() for p in parts)


def test_write_outcome():
    """
    A write committed at the answer's revision; a failed compare is its own earlier
    attempt when the revision key holds its nonce, another writer's otherwise.
    """
    request = write_request(KEYS, batch_of(KEYS, [dataset_write(1)], 0), 7, "n1")
    assert request["compare"] == [{"key": b64(KEYS.revision), "target": "MOD",
                                   "result": "EQUAL", "mod_revision": "7"}]
    assert request["success"][-1]["request_put"]["value"] == b64(b"n1")
    assert write_outcome(KEYS, {"succeeded": True, "header": {"revision": "9"}}, "n1") == 9

    def failed(nonce):
        return {"header": {"revision": "12"}, "responses": [{"response_range": {"kvs": [
            {"key": b64(KEYS.revision), "value": b64(nonce), "mod_revision": "10"}]}}]}
    assert write_outcome(KEYS, failed(b"n1"), "n1") == 10
    assert write_outcome(KEYS, failed(b"n2"), "n1") is None


def test_prune_requests_compare_each_tombstone():
    """Tombstones are deleted in transactions that each check they were not rewritten."""
    tombstones = [KeyValue(KEYS.lease(str(n)), b"", 3, 2) for n in range(100)]
    requests = prune_requests(KEYS, tombstones, 50)
    assert [len(r["success"]) for r in requests] == [64, 36]
    assert requests[0]["compare"][0] == {"key": b64(KEYS.lease("0")), "target": "MOD",
                                         "result": "LESS", "mod_revision": "51"}


def test_oldest_kept():
    """The change feed keeps the later of the pruned revision and ``retained`` back."""
    assert Meta(revision=100, oldest=10).oldest_kept(50) == 50
    assert Meta(revision=100, oldest=80).oldest_kept(50) == 80


def test_parse_endpoints():
    """Endpoints are comma-separated http(s) URLs without a path."""
    assert parse_endpoints("http://a:2379/, https://b:2379") == ("http://a:2379",
                                                                  "https://b:2379")
    for bad in ("", "a:2379", "http://a:2379/v3", "ftp://a"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)


class _Gateway(Resource):
    """A stub etcd gateway: ``answers[host]`` is a JSON answer, or None to hang."""

    isLeaf = True

    def __init__(self, answers):
        super().__init__()
        self.answers = answers
        self.asked: list[str] = []

    def render_POST(self, request):
        host = request.getHeader(b"host").decode()
        self.asked.append(host)
        answer = self.answers[host]
        if answer is None:
            return NOT_DONE_YET
        request.setResponseCode(200 if "error" not in answer else 503)
        return json.dumps(answer).encode()


class GatewayTests(SynchronousTestCase):
    """The gateway client leaves a member that fails for the next one."""

    def gateway(self, answers, deadline=5.0):
        """A client of ``a``, ``b`` (and ``c``) answered by a stub."""
        self.clock, self.stub = Clock(), _Gateway(answers)
        self.http = StubTreq(self.stub)
        return EtcdGateway(self.clock, ["http://a", "http://b", "http://c"][:len(answers)],
                           timeout=1.0, deadline=deadline, http=self.http)

    def call(self, gateway) -> Deferred:
        """Start a range call."""
        d = Deferred.fromCoroutine(gateway.call("kv/range", {"key": "AA=="}))
        self.http.flush()
        return d

    def test_member_without_leader_is_left(self):
        """A member answering 'no leader' is left for the next, which answers."""
        gateway = self.gateway({"a": {"error": "no leader", "code": 14},
                                "b": {"header": {"revision": "3"}}})
        result = self.successResultOf(self.call(gateway))
        assert result == {"header": {"revision": "3"}}
        assert gateway.endpoint == "http://b" and self.stub.asked == ["a", "b"]

    def test_silent_member_is_left_after_the_timeout(self):
        """A member that does not answer is left once the timeout has passed."""
        gateway = self.gateway({"a": None, "b": {"kvs": []}})
        d = self.call(gateway)
        self.assertNoResult(d)
        self.clock.advance(1.0)
        self.http.flush()
        assert self.successResultOf(d) == {"kvs": []}
        assert gateway.endpoint == "http://b"

    def test_request_errors_fail_at_once(self):
        """An error about the request itself fails the call without trying others."""
        gateway = self.gateway({"a": {"error": "compacted", "message": "compacted",
                                      "code": 11}, "b": {}})
        failure = self.failureResultOf(self.call(gateway), EtcdError)
        assert failure.value.code == 11 and self.stub.asked == ["a"]

    def test_unavailable_after_the_deadline(self):
        """When no member answers within the deadline, the call fails naming them."""
        gateway = self.gateway({"a": None, "b": None}, deadline=3.0)
        d = self.call(gateway)
        for _ in range(10):
            self.clock.advance(1.0)
            self.http.flush()
        failure = self.failureResultOf(d, EtcdUnavailable)
        assert "http://a" in str(failure.value) and "http://b" in str(failure.value)


class GatewayOffTests(SynchronousTestCase):
    """A member whose gateway is off is named as such."""

    def test_404_says_the_gateway_may_be_off(self):
        """A 404 that is not JSON fails, after the deadline, saying how to turn the gateway on."""
        class Off(Resource):
            isLeaf = True

            def render_POST(self, request):
                request.setResponseCode(404)
                return b"404 page not found\n"
        clock, http = Clock(), StubTreq(Off())
        gateway = EtcdGateway(clock, ["http://a"], timeout=1.0, deadline=0.5, http=http)
        d = Deferred.fromCoroutine(gateway.call("kv/range", {}))
        for _ in range(3):
            http.flush()
            clock.advance(0.2)
        failure = self.failureResultOf(d, EtcdUnavailable)
        assert "enable-grpc-gateway: true" in str(failure.value)


class _ScriptedGateway:
    """A gateway answering each call with the next scripted answer (or raising it)."""

    endpoints = ("http://scripted",)

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls: list[tuple[str, dict]] = []

    async def call(self, path, body):
        """The next answer, or raise it if it is an exception."""
        self.calls.append((path, body))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def close(self):
        """Nothing to close."""


def _kv(key: bytes, value: bytes, revision: int) -> dict:
    return {"key": b64(key), "value": b64(value), "mod_revision": str(revision),
            "create_revision": str(revision)}


class PagedLoadTests(SynchronousTestCase):
    """A load reads page after page at one revision, and starts again after compaction."""

    def test_compaction_during_paging_restarts_the_read(self):
        """A page refused as compacted makes the load start again from the first page."""
        from pyflock.control._etcd_store import EtcdConfigurationStore
        first_page = {"header": {"revision": "50"}, "responses": [
            {"response_range": {"kvs": [_kv(KEYS.store_id, b"abc", 2)]}},
            {"response_range": {"kvs": [_kv(KEYS.generation, b"3", 40)]}},
            {"response_range": {"kvs": [_kv(KEYS.dataset(dataset_id(1)),
                                            encode_dataset(Dataset(dataset_id=dataset_id(1),
                                                                   primary=NODE_A)), 40)],
                                "more": True}}]}
        second_page = {"kvs": [_kv(KEYS.dataset(dataset_id(2)), encode_dataset(
            Dataset(dataset_id=dataset_id(2), primary=NODE_B)), 41)]}
        gateway = _ScriptedGateway([
            first_page, EtcdError(11, "mvcc: required revision has been compacted", "x"),
            first_page, second_page])
        store = EtcdConfigurationStore(gateway, "/p")
        snapshot = self.successResultOf(store.load())
        assert set(snapshot.configuration.datasets) == {dataset_id(1), dataset_id(2)}
        assert snapshot.configuration.generation == 3 and snapshot.store_id == "abc"
        assert [path for path, _ in gateway.calls] == ["kv/txn", "kv/range"] * 2
        assert gateway.calls[-1][1]["revision"] == "50"


def test_conflict_reads_tell_what_changed():
    """
    A refused write's answer gives the meta keys and the rows changed since, unless the
    rows filled more than one page.
    """
    from pyflock.control._etcd_model import conflict_reads
    request = write_request(KEYS, batch_of(KEYS, [dataset_write(1)], 0), 7, "n1")
    assert request["failure"][2]["request_range"]["min_mod_revision"] == "8"
    row = {"key": b64(KEYS.dataset("d")), "value": b64(b""), "mod_revision": "9"}
    answer = {"responses": [
        {"response_range": {"kvs": []}},
        {"response_range": {"kvs": [{"key": b64(KEYS.revision), "value": b64(b"x"),
                                     "mod_revision": "9"}]}},
        {"response_range": {"kvs": [row]}}]}
    meta, rows = conflict_reads(KEYS, answer)
    assert meta.revision == 9 and [r.key for r in rows] == [KEYS.dataset("d")]
    answer["responses"][2]["response_range"]["more"] = True
    assert conflict_reads(KEYS, answer) is None


def test_keepalive_ttl():
    """A keep-alive answer gives the lease's seconds left (under the gateway's ``result``);
    a lease etcd no longer has gives 0."""
    assert keepalive_ttl({"result": {"ID": "7", "TTL": "9"}}) == 9
    assert keepalive_ttl({"result": {"ID": "7"}}) == 0
    assert keepalive_ttl({"TTL": "3"}) == 3
