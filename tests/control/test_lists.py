"""
The large lists of the REST API (issue 12): ``Accept-Encoding`` is read as HTTP says, each
body is built once per generation and shared, a write is read back at once, gzip bodies
decode to the same JSON, and concurrent requests share one build and one compression.
"""

import gzip
import json
from uuid import uuid4

import treq

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from pyflock.common._model import Configuration, Dataset
from pyflock.common._records import DatasetReport
from pyflock.control._lists import (
    CHUNK, ChangeLog, ListCache, accepts_gzip, chunked, encode_items, gzip_pieces,
)
from pyflock.control.testing import ALICE, NODE_A, NODE_B, APIHarness

A = NODE_A.node_uuid
B = NODE_B.node_uuid
DATASETS = "/v1/configuration/datasets"
STATE = "/v1/state/datasets"


class AcceptEncodingTests(SynchronousTestCase):
    """``accepts_gzip`` reads the header's codings and q-values."""

    def test_gzip_accepted(self):
        """Headers that accept gzip, plainly, by q-value, as x-gzip or through ``*``."""
        for header in (b"gzip", b"gzip, deflate, br", b"GZIP", b"deflate;q=1, gzip;q=0.5",
                       b"x-gzip", b"*", b"br, *;q=0.1", b"gzip ; q=1.0",
                       b"identity;q=0.5, gzip", b"gzip;q=0.8, identity;q=0.8"):
            self.assertTrue(accepts_gzip(header), header)

    def test_gzip_refused(self):
        """No header, other codings only, q=0, or a preferred identity get plain JSON."""
        for header in (None, b"", b"identity", b"deflate, br", b"gzip;q=0",
                       b"gzip;q=0.000", b"*;q=0", b"gzip;q=0, *", b"gzip;q=0.5, identity",
                       b"gzip;q=nonsense", b"gzip;q=2"):
            self.assertFalse(accepts_gzip(header), header)


class ListAnswerTests(SynchronousTestCase):
    """The two lists over HTTP (in memory), one ``ControlAPI`` serving every request."""

    def setUp(self):
        self.h = APIHarness()
        self.api = self.h.api(ALICE)
        self.client = self.h.client()

    def get(self, path, accept_encoding=None):
        """(response, body) of a GET through the shared API."""
        agent = RequestTraversalAgent(self.api.resource())
        headers = Headers({} if accept_encoding is None
                          else {b"accept-encoding": [accept_encoding]})
        response = self.successResultOf(agent.request(
            b"GET", (self.h.base_url + path).encode(), headers))
        return response, self.successResultOf(treq.content(response))

    def create(self, count, offset=0):
        """Create ``count`` named datasets on node A (through the API)."""
        for i in range(offset, offset + count):
            self.successResultOf(self.client.create_dataset(A, metadata={"name": f"d{i}"}))

    def test_same_bytes_reused(self):
        """Two lists of one generation are answered from one build, the same bytes."""
        self.create(3)
        _, first = self.get(DATASETS)
        _, second = self.get(DATASETS)
        self.assertEqual((first, self.api._configuration_list.builds), (second, 1))
        self.assertIs(self.api._configuration_list._ready[1].chunks,
                      self.api._configuration_list._ready[1].chunks)
        self.assertEqual(len(json.loads(first)), 3)

    def test_write_is_read_back(self):
        """A list right after a create shows it, with the create's configuration tag."""
        self.create(2)
        self.get(DATASETS)
        created = self.successResultOf(self.client.create_dataset(A))
        response, body = self.get(DATASETS)
        self.assertIn(created.dataset_id, [d["dataset_id"] for d in json.loads(body)])
        self.assertEqual(response.headers.getRawHeaders(b"x-configuration-tag"),
                         [self.h.configuration.tag.encode()])
        self.assertEqual(self.api._configuration_list.builds, 2)

    def test_gzip_round_trips(self):
        """A gzip answer says so, varies on Accept-Encoding and decodes to the plain JSON."""
        self.create(50)
        plain_response, plain = self.get(DATASETS)
        zipped_response, zipped = self.get(DATASETS, b"gzip")
        self.assertEqual(zipped_response.headers.getRawHeaders(b"content-encoding"),
                         [b"gzip"])
        self.assertIsNone(plain_response.headers.getRawHeaders(b"content-encoding"))
        for response in (plain_response, zipped_response):
            self.assertEqual(response.headers.getRawHeaders(b"vary"), [b"Accept-Encoding"])
        self.assertEqual(json.loads(gzip.decompress(zipped)), json.loads(plain))
        self.assertEqual(zipped_response.length, len(zipped))

    def test_large_body_in_chunks(self):
        """A body of several chunks arrives whole, with its length."""
        count = 1 + 2 * CHUNK // 100
        self.h = APIHarness(Configuration.from_records(
            [Dataset(dataset_id=str(uuid4()), primary=A) for _ in range(count)], [], 1))
        self.api = self.h.api(ALICE)
        response, body = self.get(DATASETS)
        self.assertGreater(len(body), 2 * CHUNK)
        self.assertEqual(response.length, len(body))
        self.assertEqual(len(json.loads(body)), count)

    def test_incremental_list_matches_full(self):
        """After creates, moves, deletes and a purge, the list built from the changes
        alone is the list built from scratch."""
        self.create(40)
        self.get(DATASETS)
        ids = [d.dataset_id for d in self.successResultOf(self.client.list_datasets()).datasets]
        for i, dataset_id in enumerate(ids[:12]):
            if i % 3 == 0:
                self.successResultOf(self.client.move_dataset(dataset_id, B))
            elif i % 3 == 1:
                self.successResultOf(self.client.delete_dataset(dataset_id))
            else:
                self.successResultOf(self.client.delete_dataset(dataset_id, purge=True))
            self.get(DATASETS)
        self.create(5, offset=100)
        _, incremental = self.get(DATASETS)
        self.api = self.h.api(ALICE)  # a new API builds its list from scratch
        _, full = self.get(DATASETS)
        self.assertEqual(sorted(json.dumps(d) for d in json.loads(incremental)),
                         sorted(json.dumps(d) for d in json.loads(full)))
        self.assertEqual(len(json.loads(full)), 45 - 4)
        self.assertEqual(self.api._configuration_list.builds, 1)

    def test_state_list_follows_liveness(self):
        """The state list is rebuilt when a node dies, though nothing it reported changed."""
        self.h.report_node(A, "10.0.0.1", [DatasetReport(
            dataset_id="11111111-2222-4333-8444-555555555555", node_uuid=A,
            maximum_size=None, path="/mnt/x")])
        _, alive = self.get(STATE, b"gzip")
        self.assertEqual(len(json.loads(gzip.decompress(alive))), 1)
        self.h.clock.advance(self.h.cluster.node_expiry)
        _, dead = self.get(STATE, b"gzip")
        self.assertEqual(json.loads(gzip.decompress(dead)), [])
        self.assertEqual(self.api._state_list.builds, 2)


class ListCacheTests(SynchronousTestCase):
    """``ListCache`` with a runner whose work the test finishes by hand."""

    def setUp(self):
        self.started = []
        self.cache = ListCache(self.build, self.hold)

    def hold(self, f, *args):
        """Hold ``f(*args)`` until the test fires it."""
        d = Deferred()
        self.started.append((d, f, args))
        return d

    def finish(self, index=-1):
        """Run the held work number ``index`` and fire its Deferred."""
        d, f, args = self.started[index]
        d.callback(f(*args))

    @staticmethod
    def build(items, previous):
        """Encode ``items`` (a list of (key, value))."""
        return encode_items(items, previous, lambda v: v)

    def test_concurrent_requests_share_one_build(self):
        """Requests for the key being built wait for that one build and get its body."""
        first = self.cache.body((1,), [("a", 1)], "t1")
        second = self.cache.body((1,), [("a", 1)], "t1")
        self.assertEqual(len(self.started), 1)
        self.assertNoResult(first)
        self.finish()
        body, tag = self.successResultOf(first)
        self.assertIs(self.successResultOf(second)[0], body)
        self.assertEqual((body.raw, tag), (b"[1]", "t1"))

    def test_gone_client_does_not_disturb_others(self):
        """A request cancelled while it waits (its client left) leaves the build and the
        other requests as they were."""
        gone = self.cache.body((1,), [("a", 1)])
        staying = self.cache.body((1,), [("a", 1)])
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        self.finish()
        self.assertEqual(self.successResultOf(staying)[0].raw, b"[1]")

    def test_newer_key_waits_for_its_own_build(self):
        """A request for a newer key during a build gets the newer body, never the older."""
        old = self.cache.body((1,), [("a", 1)])
        newer = self.cache.body((2,), [("a", 1), ("b", 2)], "t2")
        newest = self.cache.body((3,), [("a", 1), ("b", 3)], "t3")
        self.finish()
        self.assertEqual(self.successResultOf(old)[0].raw, b"[1]")
        self.assertNoResult(newer)
        self.assertEqual(len(self.started), 2)
        self.finish()
        self.assertEqual([sorted(json.loads(self.successResultOf(d)[0].raw))
                          for d in (newer, newest)], [[1, 3], [1, 3]])

    def test_unchanged_items_not_encoded_again(self):
        """A rebuild reuses the encoding of every item that is the same object."""
        item, seen = {"big": list(range(3))}, []

        def to_json(value):
            seen.append(value)
            return value
        segments, _ = encode_items([("a", item)], None, to_json)
        _, pieces = encode_items([("a", item), ("b", 2)], segments, to_json)
        self.assertEqual(seen, [item, 2])
        self.assertCountEqual(json.loads(b"".join(pieces)), [{"big": [0, 1, 2]}, 2])

    def test_change_log(self):
        """The keys changed between two numbers; unknown after a change of anything."""
        log = ChangeLog()
        log.record(None, ["a"])
        log.record(None, ["b", "c"])
        log.record(None, None)
        log.record(None, ["d"])
        self.assertEqual(log.between(0, 2), {"a", "b", "c"})
        self.assertIsNone(log.between(2, 4))
        log.record(None, ["e"])
        self.assertEqual(log.between(4, 5), {"e"})
        self.assertIsNone(log.between(0, 5))

    def test_change_log_bounded(self):
        """Without builds the log keeps at most its limit; an older base starts afresh."""
        log = ChangeLog(limit=10)
        for i in range(25):
            log.record(None, [str(i)])
        self.assertLessEqual(len(log._entries), 10)
        self.assertIsNone(log.between(0, 25))
        self.assertEqual(log.between(23, 25), {"23", "24"})

    def test_gzip_recompresses_only_changes(self):
        """The next generation's gzip reuses every unchanged segment and decodes whole."""
        items = [(str(i), {"n": i}) for i in range(1000)]
        _, pieces = encode_items(items, None, lambda v: v)
        first, compressed = gzip_pieces(pieces, {})
        items[7] = ("7", {"n": "changed"})
        _, changed = encode_items(items, None, lambda v: v)
        second, again = gzip_pieces(changed, compressed)
        fresh = [p for p in changed if again[p] is not compressed.get(p)]
        self.assertEqual(len(fresh), 1)
        self.assertEqual(gzip.decompress(second), b"".join(changed))
        self.assertEqual(gzip.decompress(first), b"".join(pieces))

    def test_chunked(self):
        """A body is cut into chunks of the given size that join into it; a small body is
        one chunk."""
        pieces = [b"[", b"a" * 25, b",", b"b" * 14, b"]"]
        self.assertEqual([len(c) for c in chunked(pieces, 10)], [10, 10, 10, 10, 2])
        self.assertEqual(b"".join(chunked(pieces, 10)), b"".join(pieces))
        self.assertEqual(chunked([b"[", b"]"], 10), (b"[]",))

    def test_gzip_made_once(self):
        """Concurrent requests for the gzip copy share one compression."""
        self.cache.body((1,), [("a", 1)])
        self.finish()
        body, _ = self.successResultOf(self.cache.body((1,), None))
        first, second = body.gzipped(self.hold), body.gzipped(self.hold)
        self.assertEqual(len(self.started), 2)
        self.finish()
        compressed = self.successResultOf(first)
        self.assertEqual(gzip.decompress(b"".join(compressed)), b"[1]")
        self.assertIs(self.successResultOf(second), compressed)
        self.assertIs(self.successResultOf(body.gzipped(self.hold)), compressed)

    def test_failed_build_is_retried(self):
        """A build that fails fails its requests; the next request builds again."""
        def broken(items, previous):
            raise ValueError("broken")
        cache = ListCache(broken)
        self.failureResultOf(cache.body((1,), []), ValueError)
        self.flushLoggedErrors(ValueError)
        self.failureResultOf(cache.body((1,), []), ValueError)
        self.flushLoggedErrors(ValueError)
        self.assertEqual(cache.builds, 2)
