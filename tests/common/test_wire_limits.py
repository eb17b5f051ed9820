"""
The agent channel's limits (issue 8), pure parts: frames reassembled in linear time and
refused from their length prefix, snapshots in pages and big diffs as several so that no
frame outgrows the limit, hello addresses, metadata byte limits, and sending only as fast
as the peer reads.
"""

import json
import struct
import time

from hypothesis import given, settings, strategies as st
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._limits import (
    AGENT_MESSAGE_LIMIT, MAX_MESSAGE, MAXIMUM_METADATA_BYTES, metadata_problem,
)
from pyflock.common._jsonread import is_host
from pyflock.common._wire import (
    BadMessage, DatasetEntry, Diff, FrameReader, FrameTooLarge, Hello, MessageProtocol,
    Node, Snapshot, SyncRequest, decode, encode, frame, group_by_size, join_pages,
    message_to_json, snapshot_pages, split_diff,
)

A = "aaaaaaaa-0000-4000-8000-000000000001"


def dataset_id(number: int) -> str:
    """The uuid of test dataset ``number``."""
    return f"{number:08x}-0000-4000-8000-000000000000"


def big_entry(number: int, char: str = "\U0001f600") -> DatasetEntry:
    """A dataset with metadata at Flocker's limits (16 pairs of 256 characters): before
    issue 8's byte limits, about 100 KB of JSON with ``char`` outside the BMP."""
    metadata = {f"{i:02d}" + char * 254: char * 256 for i in range(16)}
    return DatasetEntry(dataset_id=dataset_id(number), primary=A, metadata=metadata)


# -- frames --------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(payloads=st.lists(st.binary(max_size=300), max_size=8),
       cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=20))
def test_frames_reassembled_however_chunked(payloads, cuts):
    """Whatever chunks the stream comes in, the frames come out whole and in order."""
    stream = b"".join(frame(p) for p in payloads)
    reader = FrameReader(limit=300)
    points = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    received = []
    for start, end in zip(points, points[1:]):
        received += reader.feed(stream[start:end])
    assert received == payloads


def test_frame_over_limit_refused_from_its_prefix():
    """A length prefix over the limit is refused before a byte of the frame arrives."""
    reader = FrameReader(limit=AGENT_MESSAGE_LIMIT)
    try:
        reader.feed(struct.pack("!I", AGENT_MESSAGE_LIMIT + 1))
    except FrameTooLarge as e:
        assert (e.length, e.limit) == (AGENT_MESSAGE_LIMIT + 1, AGENT_MESSAGE_LIMIT)
    else:
        raise AssertionError("not refused")


def test_reassembly_is_linear():
    """A 32 MiB frame in 16 KiB chunks is reassembled in well under a second (joining
    the buffer with every chunk, as Int32StringReceiver does, copies about 32 GB)."""
    payload = b"x" * MAX_MESSAGE
    data = frame(payload)
    reader = FrameReader(limit=MAX_MESSAGE)
    started = time.perf_counter()
    received = []
    for start in range(0, len(data), 16 * 1024):
        received += reader.feed(data[start:start + 16 * 1024])
    assert time.perf_counter() - started < 1.0
    assert received == [payload]


# -- pages and split diffs -----------------------------------------------------------------


def test_group_by_size():
    """Consecutive items are grouped within the budget; an oversize item stands alone."""
    assert group_by_size([3, 3, 3, 9, 1], 6) == [range(0, 2), range(2, 3), range(3, 4),
                                                  range(4, 5)]
    assert group_by_size([], 6) == [range(0, 0)]


def test_small_snapshot_is_one_page_as_encoded():
    """A snapshot within the budget is one page, byte for byte its plain encoding."""
    snapshot = Snapshot(epoch="e", version=3, datasets=(big_entry(1),),
                        nodes=(Node(uuid=A, host="10.0.0.1"),))
    assert snapshot_pages(snapshot) == [encode(snapshot)]
    assert snapshot_pages(Snapshot(epoch="e", version=1)) == [
        encode(Snapshot(epoch="e", version=1))]


def test_snapshot_of_any_size_goes_in_pages_within_the_limit():
    """400 datasets with large non-ASCII metadata (over 32 MiB in one frame) go in pages
    of at most 1 MiB that decode, in version 3, back to the whole snapshot."""
    snapshot = Snapshot(epoch="e", version=9, datasets=tuple(big_entry(i) for i in range(400)),
                        nodes=tuple(Node(uuid=dataset_id(i), host=f"h{i}")
                                    for i in range(50)))
    pages = snapshot_pages(snapshot)
    assert sum(map(len, pages)) > MAX_MESSAGE
    assert max(map(len, pages)) <= 1024 * 1024
    decoded = [decode(page, 3) for page in pages]
    assert [p.more for p in decoded] == [True] * (len(pages) - 1) + [False]
    assert join_pages(decoded) == snapshot


def test_pages_of_other_views_refused():
    """Pages of different versions, or a last page missing, are a bad message."""
    first = Snapshot(epoch="e", version=1, more=True)
    for pages in ([first, Snapshot(epoch="e", version=2)], [first, first]):
        try:
            join_pages(pages)
        except BadMessage:
            continue
        raise AssertionError(f"{pages} joined")


def test_big_diff_split_into_consecutive_diffs():
    """A diff over the budget becomes diffs of consecutive versions within it, together
    holding everything; a small one stays as it is."""
    diff = Diff(epoch="e", version=5, datasets=tuple(big_entry(i) for i in range(40)),
                removed=(dataset_id(1000),), nodes=(Node(uuid=A, host="h"),))
    parts = split_diff(diff, 1024 * 1024)
    assert [p.version for p in parts] == list(range(5, 5 + len(parts)))
    assert len(parts) > 1 and max(len(encode(p)) for p in parts) <= 1024 * 1024
    assert sum((p.datasets for p in parts), ()) == diff.datasets
    assert sum((p.removed for p in parts), ()) == diff.removed
    assert sum((p.nodes for p in parts), ()) == diff.nodes
    small = Diff(epoch="e", version=5, datasets=(big_entry(1),))
    assert split_diff(small) == [small]


# -- hello address and metadata --------------------------------------------------------------


def test_hosts():
    """IP addresses and RFC 1123 host names are hosts; anything else is not."""
    for host in ("10.0.0.5", "::1", "node-1.example.com", "localhost", "h."):
        assert is_host(host), host
    for host in ("", "x y", "-a", "a_b", "999.1.1.1", "a" * 64, "<script>", "a..b",
                 "h\n", "a" * 250 + ".com"):
        assert not is_host(host), host


def test_hello_address_must_be_a_host():
    """A hello whose address is neither an IP address nor a host name is refused."""
    hello = message_to_json(Hello(node_uuid=A, era="e", address="10.0.0.5"))
    for address in ("x y", "", "\u202enode", "a/b"):
        try:
            decode(json.dumps(dict(hello, address=address)).encode())
        except BadMessage as e:
            assert "hello.address must be an IP address or a host name" in str(e)
        else:
            raise AssertionError(f"{address!r} accepted")


def test_unknown_keys_of_a_reported_dataset_refused():
    """A dataset in a state report with a key it does not have is refused, by name."""
    report = {"type": "state", "node_uuid": A, "view": None, "datasets": [{
        "dataset_id": dataset_id(1), "state": "mounted", "path": None,
        "maximum_size": None, "padding": "x"}]}
    try:
        decode(json.dumps(report).encode(), 3)
    except BadMessage as e:
        assert "state.datasets[0] has unknown keys 'padding'" in str(e)
    else:
        raise AssertionError("accepted")


def test_reported_transfer_accepted():
    """A dataset a node sends to another (a peer-to-peer move) is reported with its
    ``transfer``, which the control service decodes (it once refused it as unknown, and
    dropped the agent's channel at every progress report)."""
    report = {"type": "state", "node_uuid": A, "view": None, "datasets": [{
        "dataset_id": dataset_id(1), "state": "moving", "path": None,
        "maximum_size": None, "transfer": {"bytes_done": 5, "bytes_total": 9}}]}
    [decoded] = decode(json.dumps(report).encode(), 3).datasets
    assert (decoded.transfer.bytes_done, decoded.transfer.bytes_total) == (5, 9)


def test_metadata_byte_limits():
    """Flocker's limits hold; on top, 8 KiB of UTF-8 per dataset at most."""
    assert metadata_problem({"k" * 256: "\U0001f600" * 256}) is None  # 1,280 bytes
    ascii_full = {f"{i:03d}" + "k" * 253: "v" * 256 for i in range(16)}
    assert metadata_problem(ascii_full) is None  # exactly 8 KiB
    over = dict(ascii_full)
    over["000" + "k" * 253] = "é" + "v" * 255
    assert f"at most {MAXIMUM_METADATA_BYTES} bytes" in metadata_problem(over)
    assert "at most 1024 bytes" in metadata_problem({"k": "\U0001f600" * 257})


# -- sending as fast as the peer reads ------------------------------------------------------


class Sender(MessageProtocol):
    """A MessageProtocol that only sends."""

    def message_received(self, message):
        pass


class BackpressureTests(SynchronousTestCase):
    """What is sent waits while the transport is full, and a peer that never reads is
    dropped once too much waits."""

    def setUp(self):
        self.protocol = Sender(send_limit=1000)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_registered_as_producer(self):
        """The protocol is its transport's streaming producer."""
        self.assertEqual((self.transport.producer, self.transport.streaming),
                         (self.protocol, True))

    def test_sends_wait_while_paused_and_go_in_order(self):
        """While paused nothing is written; on resume everything goes, in order."""
        self.protocol.pauseProducing()
        self.protocol.send(SyncRequest())
        pulled = []

        def pages():
            for i in range(3):
                pulled.append(i)
                yield encode(Snapshot(epoch="e", version=i))
        self.protocol.send_stream(pages())
        self.protocol.send(Hello(node_uuid=A, era="e", address="h"))
        self.assertEqual((self.transport.value(), pulled, self.protocol.streaming),
                         (b"", [], True))
        self.protocol.resumeProducing()
        data = self.transport.value()
        self.assertEqual(data, b"".join(frame(encode(m)) for m in [
            SyncRequest(), Snapshot(epoch="e", version=0), Snapshot(epoch="e", version=1),
            Snapshot(epoch="e", version=2), Hello(node_uuid=A, era="e", address="h")]))
        self.assertFalse(self.protocol.streaming)

    def test_stream_made_only_as_it_goes_out(self):
        """A stream's frames are made one at a time, only while the transport takes them."""
        pulled = []

        def pages():
            for i in range(3):
                pulled.append(i)
                if i == 0:
                    self.protocol.pauseProducing()  # the transport's buffer fills
                yield encode(Snapshot(epoch="e", version=i))
        self.protocol.send_stream(pages())
        self.assertEqual(pulled, [0])
        self.protocol.resumeProducing()
        self.assertEqual(pulled, [0, 1, 2])

    def test_peer_not_reading_is_dropped(self):
        """Once more than the limit waits, the connection is aborted and it is logged."""
        self.protocol.pauseProducing()
        for _ in range(20):
            self.protocol.send_payload(b"x" * 60)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.protocol.unsent, 0)
        [event] = [e for e in self.events
                   if e.get("event_type") == "pyflock:peer:channel-overflow"]
        self.assertEqual(event["limit"], 1000)


def test_many_small_items_stay_within_the_page():
    """Pages and split diffs of many small items stay within the budget, commas included."""
    entries = tuple(DatasetEntry(dataset_id=dataset_id(i), primary=A) for i in range(3000))
    pages = snapshot_pages(Snapshot(epoch="e", version=1, datasets=entries), 64 * 1024)
    assert len(pages) > 3 and max(map(len, pages)) <= 64 * 1024
    diffs = split_diff(Diff(epoch="e", version=2, datasets=entries), 64 * 1024)
    assert len(diffs) > 3 and max(len(encode(d)) for d in diffs) <= 64 * 1024


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=256), max_size=40),
       nodes=st.integers(min_value=0, max_value=10),
       budget=st.integers(min_value=2000, max_value=20_000))
def test_pages_join_back_to_the_snapshot(sizes, nodes, budget):
    """Any snapshot's pages decode and join back to it, each page within the budget."""
    snapshot = Snapshot(epoch="e", version=4, datasets=tuple(
        DatasetEntry(dataset_id=dataset_id(i), primary=A, metadata={"k": "é" * size})
        for i, size in enumerate(sizes)), nodes=tuple(
        Node(uuid=dataset_id(1000 + i), host=f"h{i}") for i in range(nodes)))
    pages = snapshot_pages(snapshot, budget)
    assert max(map(len, pages)) <= budget
    assert join_pages([decode(page, 3) for page in pages]) == snapshot
