"""
Issue 12: what a thousand agents connecting together cost the agent channel's server. One
snapshot encoding (and compression) serves every agent, followed by the diffs since it; an
agent that reconnects with a view of this run gets only the diffs it missed; a bounded
number of snapshots stream at once while the others wait and still get heartbeats; and
compressed frames (protocol 3) are refused when they could hurt.
"""

import zlib

import pytest
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._view import AgentView
from pyflock.common._model import Dataset
from pyflock.common._wire import (
    BadMessage, DatasetEntry, Diff, Heartbeat, Snapshot, ViewVersion, Welcome, compress, decode, encode,
    inflate, join_pages,
)
from pyflock.control._viewlog import Turns, ViewLog
from pyflock.control.testing import NODE_A, NODE_B
from tests.control import test_agentchannel as base
from tests.control.test_agentchannel import RawAgent

A = NODE_A.node_uuid
IDS = [f"{number:08x}-0000-4000-8000-000000000000" for number in range(12)]


def diff(version: int) -> bytes:
    """The payload of an empty diff to ``version``."""
    return encode(Diff(epoch="e", version=version))


# -- the history, pure ---------------------------------------------------------------------


def test_diffs_since_a_version_it_still_has():
    """The diffs after a recorded version come back in order; none for the current one."""
    log = ViewLog()
    for version in range(2, 6):
        log.record(version, diff(version))
    assert log.since(3, 5) == [diff(4), diff(5)]
    assert log.since(1, 5) == [diff(v) for v in range(2, 6)]
    assert log.since(5, 5) == []


@pytest.mark.parametrize("version", [0, 6])
def test_no_diffs_from_a_version_it_does_not_have(version):
    """A version older than the history, or newer than the view, has no diffs (None)."""
    log = ViewLog()
    for number in range(2, 6):
        log.record(number, diff(number))
    assert log.since(version, 5) is None


def test_history_keeps_its_budget():
    """Past its budget the history forgets its oldest diffs first."""
    log = ViewLog(budget=3 * len(diff(2)))
    for version in range(2, 8):
        log.record(version, diff(version))
    assert log.since(4, 7) == [diff(5), diff(6), diff(7)]
    assert log.since(3, 7) is None


def test_catch_up_prefers_a_snapshot_past_a_limit():
    """Diffs weighing more than the limit are not worth sending (None)."""
    log = ViewLog()
    for version in range(2, 6):
        log.record(version, diff(version))
    assert log.catch_up(1, 5, 4 * len(diff(2))) is not None
    assert log.catch_up(1, 5, 4 * len(diff(2)) - 1) is None


def test_one_snapshot_encoding_then_the_diffs_since():
    """Agents needing the whole view share one encoding, followed by the diffs since it,
    until those diffs outweigh half of it."""
    log = ViewLog()
    datasets = tuple(DatasetEntry.of(Dataset(dataset_id=i, primary=A)) for i in IDS)
    first = log.snapshot(1, lambda: Snapshot(epoch="e", version=1, datasets=datasets), 1024)
    log.record(2, diff(2))
    assert log.snapshot(2, None, 1024) == first + [diff(2)]
    assert log.encodings == 1
    version = 2
    while sum(len(p) for p in log.since(1, version)) <= log.snapshot_size / 2:
        version += 1
        log.record(version, diff(version))
    log.snapshot(version, lambda: Snapshot(epoch="e", version=version), 1024)
    assert log.encodings == 2


def test_compressed_pages_are_the_same_view():
    """The compressed pages expand to the plain ones."""
    log = ViewLog()

    def make():
        return Snapshot(epoch="e", version=1, datasets=())
    plain = log.snapshot(1, make, 1024)
    packed = log.snapshot(1, make, 1024, compressed=True)
    assert [zlib.decompress(p) for p in packed] == plain


# -- turns ---------------------------------------------------------------------------------


def test_turns_are_bounded_and_first_come_first_served():
    """At most ``width`` start; the next in line starts when one is done or gone."""
    turns = Turns(width=2)
    started = []
    for key in "abcd":
        turns.request(key, lambda key=key: started.append(key))
    assert started == ["a", "b"] and turns.waiting == 2
    turns.request("c", lambda: started.append("again"))
    turns.done("a")
    assert started == ["a", "b", "c"]
    turns.done("d")  # gone while waiting
    turns.done("b")
    assert started == ["a", "b", "c"] and turns.waiting == 0


def test_a_stream_ends_its_turn():
    """A turn ends once its stream is consumed."""
    turns = Turns(width=1)
    started = []
    turns.request("a", lambda: started.append("a"))
    turns.request("b", lambda: started.append("b"))
    assert list(turns.stream("a", [b"1", b"2"])) == [b"1", b"2"]
    assert started == ["a", "b"]


# -- compressed frames ---------------------------------------------------------------------


def test_compressed_frame_decodes_in_version_3():
    """A compressed frame carries the same message from version 3 on."""
    message = Heartbeat(view=ViewVersion("e", 3))
    assert decode(compress(encode(message)), 3) == message


@pytest.mark.parametrize("payload, protocol, expected", [
    (compress(encode(Heartbeat())), 2, "not part of agent-channel protocol 2"),
    (b"x\x9cnot zlib", 3, "not a zlib stream"),
    (compress(b" " * 2000), 3, "expands past the limit of 1000 bytes"),
    (compress(encode(Heartbeat()))[:-3], 3, "ends before its zlib stream"),
])
def test_bad_compressed_frames_are_refused(payload, protocol, expected):
    """A compressed frame in an older version, corrupt, cut short or too big is refused."""
    with pytest.raises(BadMessage, match=expected):
        inflate(payload, protocol, limit=1000)


# -- the server ----------------------------------------------------------------------------


def view_of(messages) -> AgentView:
    """The view an agent builds from ``messages`` (pages joined), from nothing."""
    view, pages = AgentView(), []
    for message in messages:
        if isinstance(message, Snapshot):
            pages.append(message)
            if not message.more:
                view, pages = view.apply(join_pages(pages)), []
        elif isinstance(message, Diff):
            view = view.apply(message)
    return view


class ServerHistoryTests(SynchronousTestCase):
    """The server's shared snapshot, resumption and turns (in memory, on a Clock)."""

    setUp = base.ServerTests.setUp
    tearDown = base.ServerTests.tearDown
    start_server = base.ServerTests.start_server
    change = base.ServerTests.change
    create = base.ServerTests.create

    def populate(self):
        """Make a few datasets."""
        for number, dataset_id in enumerate(IDS[:4]):
            self.create(dataset_id, name=f"d{number}")

    def test_agents_share_one_snapshot_encoding(self):
        """Agents connecting one after another (each one a node diff) cost one encoding,
        and each ends with the server's current view."""
        self.populate()
        RawAgent(self.server, NODE_A).hello()
        later = RawAgent(self.server, NODE_B).hello()
        self.assertEqual(self.server.catchup.history.encodings, 1)
        self.assertEqual(view_of(later).current, self.server.current)
        self.assertEqual(view_of(later).datasets,
                         AgentView().apply(self.server.snapshot()).datasets)

    def test_reconnecting_agent_gets_only_the_diffs_it_missed(self):
        """An agent whose view is of this run gets the diffs since its version, no
        snapshot, and has the current view after them."""
        self.populate()
        agent = RawAgent(self.server, NODE_A)
        view = view_of(agent.hello())
        agent.lose()
        self.create(IDS[5], name="new")
        again = RawAgent(self.server, NODE_A)
        received = again.hello(known=view.current)
        self.assertEqual([type(m) for m in received], [Welcome, Diff])
        for message in received[1:]:
            view = view.apply(message)
        self.assertEqual(view.current, self.server.current)
        self.assertEqual(view.datasets, AgentView().apply(self.server.snapshot()).datasets)

    def test_view_of_another_run_gets_a_snapshot(self):
        """A view of another epoch (another run) gets a snapshot."""
        self.populate()
        received = RawAgent(self.server, NODE_A).hello(known=ViewVersion("other", 2))
        self.assertEqual([type(m) for m in received][:2], [Welcome, Snapshot])

    def test_snapshots_wait_their_turn_with_heartbeats(self):
        """Past the width, an agent's snapshot waits; it gets heartbeats meanwhile, and
        its snapshot once a turn is free."""
        self.populate()
        self.server.catchup.turns.width = 1
        busy = RawAgent(self.server, NODE_A)
        busy.transport.producer.pauseProducing()  # a reader that does not read yet
        busy.hello()
        waiting = RawAgent(self.server, NODE_B)
        self.assertEqual([type(m) for m in waiting.hello()], [Welcome])
        self.clock.advance(self.server.heartbeat)
        self.assertEqual([type(m) for m in waiting.received(heartbeats=True)], [Heartbeat])
        busy.transport.producer.resumeProducing()
        self.assertIn(Snapshot, [type(m) for m in waiting.received()])

    def test_a_waiting_agent_is_sent_no_diffs_until_its_turn(self):
        """Diffs pushed while an agent waits for its snapshot's turn are not sent to it
        (it would drop them): its snapshot stream, once it starts, brings it to the view
        then current, diffs of that wait included."""
        self.populate()
        self.server.catchup.turns.width = 1
        busy = RawAgent(self.server, NODE_A)
        busy.transport.producer.pauseProducing()  # a reader that does not read yet
        busy.hello()
        waiting = RawAgent(self.server, NODE_B)
        waiting.hello()
        self.create(IDS[6], name="meanwhile")
        self.assertEqual(waiting.received(), [])
        busy.transport.producer.resumeProducing()
        received = waiting.received()
        self.assertIn(Snapshot, [type(m) for m in received])
        self.assertEqual(view_of(received).current, self.server.current)
        self.assertIn(IDS[6], view_of(received).datasets)
