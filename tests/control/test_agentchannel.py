"""
The agent channel's wire format and its server: handshake and identity, snapshots and
diffs, state reports as the REST API shows them, node expiry and the purge of deleted
datasets (in memory, on a Clock); and, over real TLS, a real ``pyflock-control`` refusing
certificates that are not a node's.
"""

import json
import struct

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._model import MINIMUM_SIZE, Dataset, Lease
from pyflock.common._tls import AGENT_CHANNEL, client_tls_options, tls_client_endpoint
from pyflock.common._wire import (
    PROTOCOL_VERSION, BadMessage, DatasetEntry, DatasetReport, Diff, Error, Heartbeat,
    Hello, MessageProtocol, Node, ProtocolMismatch, Snapshot, StateReport,
    SyncRequest, ViewVersion, Welcome, decode, encode, message_to_json,
)
from pyflock.control._agentchannel import (
    AgentChannelServer, holders_of, view_datasets,
)
from pyflock.control._clusterstate import ClusterState
from pyflock.control._store import StoreError
from pyflock.control.testing import ALICE, NODE_A, NODE_B, APIHarness

A = NODE_A.node_uuid
B = NODE_B.node_uuid
DS = "11111111-2222-4333-8444-555555555555"
DS2 = "22222222-3333-4444-8555-666666666666"
DS3 = "33333333-4444-4555-8666-777777777777"


# -- the wire ------------------------------------------------------------------------------


ENTRY = DatasetEntry(dataset_id=DS, primary=A, maximum_size=MINIMUM_SIZE,
                     metadata={"name": "db", "profile": "gold"}, deleted=False,
                     lease=Lease(DS, node_uuid=A, expiration=1234.5), holders=(B, A))
MESSAGES = [
    Hello(node_uuid=A, era="era-1", address="10.0.0.5", peer_port=4525,
          known=ViewVersion("e", 3)),
    Hello(node_uuid=A, era="era-1", address="10.0.0.5"),
    Welcome(epoch="e", version=7),
    Error(code="identity", reason="why"),
    Snapshot(epoch="e", version=7, datasets=(ENTRY, DatasetEntry(dataset_id=DS2, primary=B)),
             nodes=(Node(uuid=A, host="10.0.0.5", peer_port=4525, alive=True),)),
    Diff(epoch="e", version=8, datasets=(ENTRY,), removed=(DS2,),
         nodes=(Node(uuid=B, host="h", alive=False),)),
    StateReport(node_uuid=A, datasets=(
        DatasetReport(dataset_id=DS, state="mounted", path="/m/x", maximum_size=1024),
        DatasetReport(dataset_id=DS2, state="creating")), view=ViewVersion("e", 8)),
    Heartbeat(view=ViewVersion("e", 8)),
    Heartbeat(),
    SyncRequest(),
]


class WireTests(SynchronousTestCase):
    """Messages encode to JSON frames and decode back; malformed input is refused clearly."""

    def test_round_trip(self):
        """Every message decodes to an equal value after encoding."""
        for message in MESSAGES:
            self.assertEqual(decode(encode(message)), message)

    def test_lease_expiration_integer(self):
        """An integral lease expiration in JSON decodes as a float."""
        payload = json.dumps(dict(message_to_json(MESSAGES[5]), datasets=[dict(
            message_to_json(MESSAGES[5])["datasets"][0], lease={"node_uuid": A,
                                                                "expiration": 5})]))
        self.assertEqual(decode(payload.encode()).datasets[0].lease.expiration, 5.0)

    def test_bad_input(self):
        """Each kind of malformed frame raises ``BadMessage`` saying what is wrong."""
        state = message_to_json(MESSAGES[6])
        hello = message_to_json(MESSAGES[0])
        snapshot = message_to_json(MESSAGES[4])
        report = state["datasets"][0]
        cases = [
            (b"\xff\xfe", "not UTF-8 JSON"),
            (b"{nope", "not UTF-8 JSON"),
            (b"[1, 2]", "must be an object"),
            (b'{"type": "launch"}', "unknown message type 'launch'"),
            (b'{"type": 3}', "unknown message type 3"),
            (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
            (dict(state, node_uuid="A" * 8), "state.node_uuid must be a lower-case UUID"),
            (dict(state, node_uuid=A.upper()), "lower-case UUID"),
            ({k: v for k, v in hello.items() if k != "era"}, "hello lacks 'era'"),
            (dict(hello, era=""), "must not be empty"),
            (dict(hello, peer_port=70000), "hello.peer_port must be between 1 and 65535"),
            (dict(hello, peer_port=True), "hello.peer_port must be an integer, not a boolean"),
            (dict(hello, peer_port="4525"), "must be an integer or null, not str"),
            (dict(hello, address="x" * 5000), "longer than 1024 characters"),
            (dict(hello, known={"epoch": "e", "version": -1}), "hello.known.version"),
            (dict(state, datasets=[dict(report, state="exploded")]), "must be one of"),
            (dict(state, datasets=[report, report]), "names " + DS + " twice"),
            (dict(state, datasets=[dict(report, maximum_size=1.5)]), "an integer"),
            (dict(snapshot, datasets=[dict(snapshot["datasets"][0], metadata={"a": 1})]),
             "metadata values must be strings"),
            (json.dumps(snapshot).replace("1234.5", "1e400").encode(), "finite"),
            (dict(snapshot, nodes="all"), "snapshot.nodes must be an array"),
            (dict(snapshot, datasets=[dict(snapshot["datasets"][0], holders=A)]),
             "snapshot.datasets[0].holders must be an array"),
            (dict(snapshot, datasets=[dict(snapshot["datasets"][0], holders=["x"])]),
             "snapshot.datasets[0].holders[0] must be a lower-case UUID"),
            (dict(snapshot, datasets=[dict(snapshot["datasets"][0], holders=[A, A])]),
             "snapshot.datasets[0].holders names " + A + " twice"),
            ({"type": "diff", "epoch": "e", "version": 0, "datasets": [], "removed": [],
              "nodes": []}, "diff.version must be between 1"),
            ({"type": "diff", "epoch": "e", "version": 1, "datasets": [], "removed": ["x"],
              "nodes": []}, "diff.removed[0] must be a lower-case UUID"),
        ]
        for payload, expected in cases:
            if not isinstance(payload, bytes):
                payload = json.dumps(payload).encode()
            with self.assertRaises(BadMessage, msg=expected) as caught:
                decode(payload)
            self.assertIn(expected, str(caught.exception))

    def test_holders_sorted_and_optional(self):
        """Holders are kept sorted; an entry without them (an older view file) has none."""
        self.assertEqual(ENTRY.holders, tuple(sorted([A, B])))
        snapshot = message_to_json(MESSAGES[4])
        del snapshot["datasets"][0]["holders"]
        self.assertEqual(decode(json.dumps(snapshot).encode()).datasets[0].holders, ())

    def test_nan_refused(self):
        """JSON's non-standard NaN and Infinity are refused."""
        payload = json.dumps(message_to_json(MESSAGES[4])).replace("1234.5", "NaN")
        with self.assertRaises(BadMessage):
            decode(payload.encode())

    def test_other_protocol_version(self):
        """A hello of another version is a ``ProtocolMismatch``, whatever else it holds."""
        with self.assertRaises(ProtocolMismatch) as caught:
            decode(json.dumps({"type": "hello", "protocol": 99, "new": "shape"}).encode())
        self.assertEqual(caught.exception.theirs, 99)

    def test_protocol_answers_bad_frames(self):
        """A malformed frame gets an ``error`` message and a disconnect, not an exception."""
        protocol = MessageProtocol(max_message=100)
        protocol.message_received = lambda message: None
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(frame(b"{}"))
        self.assertEqual([m.code for m in frames(transport)], ["bad-message"])
        self.assertTrue(transport.disconnecting)

    def test_protocol_size_limit(self):
        """A frame announcing more than the limit is refused before it is read."""
        protocol = MessageProtocol(max_message=100)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(struct.pack("!I", 101))
        [error] = frames(transport)
        self.assertEqual(error.code, "too-large")
        self.assertIn("101 bytes exceeds the limit of 100", error.reason)


def frame(payload: bytes) -> bytes:
    """``payload`` framed as on the wire."""
    return struct.pack("!I", len(payload)) + payload


def frames(transport: StringTransport) -> list:
    """Decode and clear the messages written to ``transport``."""
    data = transport.value()
    transport.clear()
    messages = []
    while data:
        (length,) = struct.unpack("!I", data[:4])
        messages.append(decode(data[4:4 + length]))
        data = data[4 + length:]
    return messages


# -- the server ----------------------------------------------------------------------------


class RawAgent:
    """One connection to the server, speaking raw messages with a given identity."""

    def __init__(self, server: AgentChannelServer, identity, host="127.0.0.7"):
        self.protocol = server.factory().buildProtocol(IPv4Address("TCP", host, 40000))
        self.transport = StringTransport(
            peerAddress=IPv4Address("TCP", host, 40000))
        self.transport.identity = identity
        self.protocol.makeConnection(self.transport)

    def send(self, message) -> list:
        """Send a message; the messages the server answered with."""
        return self.send_raw(encode(message))

    def send_raw(self, payload: bytes) -> list:
        """Send a raw frame payload; the messages the server answered with."""
        self.protocol.dataReceived(frame(payload))
        return self.received()

    def received(self, heartbeats: bool = False) -> list:
        """The messages the server sent since last asked (heartbeats only if asked)."""
        return [m for m in frames(self.transport)
                if heartbeats or not isinstance(m, Heartbeat)]

    def hello(self, node_uuid=None, known=None, **kwargs) -> list:
        """Say hello as the node of this connection's identity (or ``node_uuid``)."""
        node_uuid = node_uuid or self.transport.identity.node_uuid
        return self.send(Hello(node_uuid=node_uuid, era=kwargs.pop("era", f"era-{node_uuid}"),
                               address=kwargs.pop("address", "127.0.0.7"),
                               peer_port=kwargs.pop("peer_port", 4525), known=known,
                               **kwargs))

    @property
    def closed(self) -> bool:
        """Whether the server hung up."""
        return self.transport.disconnecting

    def lose(self) -> None:
        """The connection drops."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


class ServerTests(SynchronousTestCase):
    """The server with an in-memory configuration service, on a Clock."""

    def setUp(self):
        self.h = APIHarness()
        self.clock = self.h.clock
        self.configuration = self.h.configuration
        self.server = self.start_server()
        # Past the start's purge grace, as in a control service that has run a while.
        self.clock.advance(self.h.cluster.node_expiry)

    def tearDown(self):
        self.server.stop()

    def start_server(self) -> AgentChannelServer:
        """A started server on the harness's configuration and cluster state."""
        server = AgentChannelServer(self.configuration, self.h.cluster, self.clock,
                                    identify=lambda transport: AGENT_CHANNEL.admit(
                                        transport.identity))
        server.start()
        return server

    def change(self, dataset_id, transform):
        """Change the configuration and let its push go out; return the new one."""
        config = self.successResultOf(self.configuration.change([dataset_id], transform))
        self.clock.advance(0)
        return config

    def create(self, dataset_id=DS, primary=A, name="db"):
        """Create a dataset."""
        return self.change(dataset_id, lambda c: c.create(Dataset(
            dataset_id=dataset_id, primary=primary, metadata={"name": name})))

    def delete(self, dataset_id=DS):
        """Delete a dataset."""
        return self.change(dataset_id, lambda c: c.delete(self.clock.seconds(), dataset_id))

    def connect(self, identity=NODE_A, server=None, **kwargs) -> tuple[RawAgent, list]:
        """A welcomed agent connection and what the server sent it."""
        agent = RawAgent(server or self.server, identity)
        return agent, agent.hello(**kwargs)

    def get(self, path):
        """A REST API GET as alice."""
        return self.h.request(self, "GET", path, identity=ALICE).json

    # handshake and identity

    def test_welcome_and_snapshot(self):
        """A hello is answered with a welcome and a snapshot of the whole view."""
        self.create()
        agent, [welcome, snapshot] = self.connect()
        self.assertEqual(welcome, Welcome(epoch=self.server.epoch,
                                          version=self.server.version))
        self.assertEqual((snapshot.epoch, snapshot.version),
                         (self.server.epoch, self.server.version))
        self.assertEqual({d.dataset_id: d for d in snapshot.datasets},
                         view_datasets(self.configuration.committed,
                                       holders_of(self.h.cluster.state)))
        self.assertEqual(snapshot.nodes, (Node(uuid=A, host="127.0.0.7",
                                                    peer_port=4525, alive=True),))
        self.assertFalse(agent.closed)

    def test_current_view_gets_no_snapshot(self):
        """An agent that already has the current view only gets a welcome."""
        self.create()
        first, _ = self.connect()
        first.lose()
        agent, received = self.connect(known=self.server.current)
        self.assertEqual(received, [Welcome(epoch=self.server.epoch,
                                            version=self.server.version)])

    def test_other_epoch_gets_snapshot(self):
        """A view of another control service run (epoch) is replaced by a snapshot."""
        agent, [_, snapshot] = self.connect(
            known=ViewVersion("an-older-run", self.server.version))
        self.assertEqual(snapshot.epoch, self.server.epoch)

    def test_protocol_mismatch(self):
        """A hello of another protocol version is refused naming both versions."""
        agent = RawAgent(self.server, NODE_A)
        hello = dict(message_to_json(Hello(node_uuid=A, era="e", address="h")),
                     protocol=PROTOCOL_VERSION + 1)
        del hello["protocols"]
        [error] = agent.send_raw(json.dumps(hello).encode())
        self.assertEqual(error.code, "protocol-version")
        self.assertIn(f"protocol {PROTOCOL_VERSION + 1},", error.reason)
        self.assertIn(f"protocols {PROTOCOL_VERSION - 1} to {PROTOCOL_VERSION}", error.reason)
        self.assertTrue(agent.closed)
        self.assertEqual(self.get("/v1/state/nodes"), [])

    def test_user_certificate_refused(self):
        """A user certificate is refused with a reason naming it."""
        agent = RawAgent(self.server, ALICE)
        agent.protocol.handshakeCompleted()
        [error] = agent.received()
        self.assertEqual(error.code, "identity")
        self.assertIn("only node-* certificates", error.reason)
        self.assertIn("user-alice", error.reason)
        self.assertTrue(agent.closed)

    def test_no_identity_refused(self):
        """A certificate that names no identity is refused; its hello is ignored."""
        agent = RawAgent(self.server, None)
        [error] = agent.hello(node_uuid=A)
        self.assertEqual(error.code, "identity")
        self.assertIn("names no pyflock identity", error.reason)
        self.assertEqual(self.get("/v1/state/nodes"), [])

    def test_hello_for_another_node(self):
        """A node cannot say hello as another node."""
        agent = RawAgent(self.server, NODE_A)
        [error] = agent.hello(node_uuid=B)
        self.assertEqual(error.code, "identity")
        self.assertIn(f"certificate is node-{A}; it cannot speak for node {B}", error.reason)
        self.assertEqual(self.get("/v1/state/nodes"), [])

    def test_report_for_another_node(self):
        """A node cannot report state for another node; nothing of it is stored."""
        agent, _ = self.connect()
        [error] = agent.send(StateReport(node_uuid=B, datasets=(
            DatasetReport(dataset_id=DS, state="mounted", path="/m"),)))
        self.assertEqual(error.code, "identity")
        self.assertIn(f"node {A} may report only its own state", error.reason)
        self.assertTrue(agent.closed)
        self.assertEqual(self.get("/v1/state/datasets"), [])

    def test_first_message_must_be_hello(self):
        """Anything before the hello is a protocol error."""
        agent = RawAgent(self.server, NODE_A)
        [error] = agent.send(Heartbeat())
        self.assertEqual((error.code, agent.closed), ("bad-message", True))
        self.assertIn("first message must be a hello", error.reason)

    def test_bad_message_after_hello(self):
        """A malformed message gets an error and a disconnect; the server carries on."""
        agent, _ = self.connect()
        [error] = agent.send_raw(b'{"type": "state", "node_uuid": 7, "datasets": []}')
        self.assertEqual(error.code, "bad-message")
        self.assertIn("state.node_uuid must be a string", error.reason)
        self.assertTrue(agent.closed)
        other, [welcome, _] = self.connect(NODE_B)
        self.assertIsInstance(welcome, Welcome)

    def test_server_messages_from_agent_refused(self):
        """An agent sending a message only the server sends is refused."""
        agent, _ = self.connect()
        [error] = agent.send(Welcome(epoch="e", version=1))
        self.assertIn("agents do not send Welcome", error.reason)

    def test_no_hello_times_out(self):
        """A connection that never says hello is closed after the node expiry."""
        agent = RawAgent(self.server, NODE_A)
        self.clock.advance(self.h.cluster.node_expiry)
        [error] = agent.received()
        self.assertEqual((error.code, agent.closed), ("timeout", True))

    def test_newer_connection_replaces_older(self):
        """A node's second connection replaces its first, which is told why."""
        first, _ = self.connect()
        second, _ = self.connect()
        [error] = first.received()
        self.assertEqual((error.code, first.closed), ("replaced", True))
        first.lose()
        self.assertEqual(self.server.connected_nodes, {A})
        self.create()
        self.assertIsInstance(second.received()[0], Diff)

    # pushes

    def test_push_waits_one_turn_and_coalesces(self):
        """Changes go to agents a reactor turn after they are made, those of one turn as one diff."""
        agent, _ = self.connect()
        version = self.server.version
        for dataset_id, name in ((DS, "db"), (DS2, "logs")):
            self.successResultOf(self.configuration.change([dataset_id], lambda c: c.create(
                Dataset(dataset_id=dataset_id, primary=A, metadata={"name": name}))))
        self.assertEqual(agent.received(), [])
        self.clock.advance(0)
        [diff] = agent.received()
        self.assertEqual((diff.version, [d.dataset_id for d in diff.datasets]),
                         (version + 1, [DS, DS2]))

    def test_changes_pushed_as_diffs(self):
        """A create, a move and a lease renewal each arrive at once as a one-dataset diff."""
        self.create()
        agent, [_, snapshot] = self.connect()
        other, _ = self.connect(NODE_B)
        agent.received()
        version = snapshot.version
        now = self.clock.seconds()

        self.create(DS2, name="logs")
        [diff] = agent.received()
        self.assertEqual(diff, Diff(epoch=self.server.epoch, version=version + 1 + 1,
                                    datasets=(DatasetEntry.of(
                                        self.configuration.committed.datasets[DS2]),)))

        self.change(DS2, lambda c: c.update(now, DS2, primary=B))
        [diff] = agent.received()
        self.assertEqual([d.primary for d in diff.datasets], [B])

        self.change(DS, lambda c: c.acquire_lease(now, DS, A, 60))
        self.clock.advance(20)
        self.change(DS, lambda c: c.acquire_lease(self.clock.seconds(), DS, A, 60))
        [acquired, renewed] = agent.received()
        self.assertEqual([d.dataset_id for d in renewed.datasets], [DS])
        self.assertEqual(renewed.datasets[0].lease,
                         Lease(DS, node_uuid=A, expiration=self.clock.seconds() + 60))
        self.assertEqual(renewed.version, acquired.version + 1)
        self.assertEqual(len(other.received()), 4)

    def test_unchanged_commit_pushes_nothing(self):
        """A commit that changes nothing agents see pushes nothing."""
        self.create()
        agent, _ = self.connect()
        version = self.server.version
        self.change(DS, lambda c: c.set(generation=c.generation + 1))
        self.assertEqual((agent.received(), self.server.version), ([], version))

    def test_store_recovery_pushes_everything_changed(self):
        """After a store recovery (touched ids unknown) the diff holds what changed."""
        self.create()
        agent, _ = self.connect()
        # The store holds a dataset the service's memory lost track of.
        self.h.store.config = self.h.store.config.create(Dataset(dataset_id=DS2, primary=B))
        self.h.store.fail_next = StoreError("disk full")
        self.failureResultOf(self.configuration.change(
            [DS3], lambda c: c.create(Dataset(dataset_id=DS3, primary=A))))
        self.h.clock.advance(0)
        [diff] = agent.received()
        self.assertEqual([d.dataset_id for d in diff.datasets], [DS2])
        self.assertEqual({d.dataset_id: d for d in self.server.snapshot().datasets},
                         view_datasets(self.configuration.committed,
                                       holders_of(self.h.cluster.state)))

    def test_node_changes_pushed(self):
        """A node connecting is pushed to the others as a node diff."""
        agent, _ = self.connect()
        self.connect(NODE_B)
        [diff] = agent.received()
        self.assertEqual(diff.nodes, (Node(uuid=B, host="127.0.0.7", peer_port=4525),))

    def test_heartbeats_sent(self):
        """Every heartbeat interval each agent gets the current view version."""
        agent, _ = self.connect()
        self.clock.advance(self.server.heartbeat)
        self.assertEqual(agent.received(heartbeats=True),
                         [Heartbeat(view=self.server.current)])

    def test_sync_request_gets_snapshot(self):
        """An agent that asks for a resync gets a snapshot of the current view."""
        self.create()
        agent, _ = self.connect()
        [snapshot] = agent.send(SyncRequest())
        self.assertEqual(snapshot, self.server.snapshot())

    def test_stop_closes_connections(self):
        """Stopping the server tells every agent and closes its connection."""
        agent, _ = self.connect()
        d = self.server.stop()
        [error] = agent.received()
        self.assertEqual(error.code, "shutting-down")
        self.assertNoResult(d)
        agent.lose()
        self.successResultOf(d)

    # state reports

    def test_report_shown_by_api(self):
        """A report appears in /v1/state/datasets and the node in /v1/state/nodes."""
        self.create()
        self.create(DS2, name="logs")
        agent, _ = self.connect(era="boot-1")
        agent.send(StateReport(node_uuid=A, datasets=(
            DatasetReport(dataset_id=DS, state="mounted", path="/m/ds",
                          maximum_size=MINIMUM_SIZE),
            DatasetReport(dataset_id=DS2, state="creating"))))
        self.assertEqual(sorted(self.get("/v1/state/datasets"), key=lambda d: d["dataset_id"]),
                         [{"dataset_id": DS, "primary": A, "maximum_size": MINIMUM_SIZE,
                           "path": "/m/ds", "state": "mounted"},
                          {"dataset_id": DS2, "primary": A, "maximum_size": None,
                           "state": "creating"}])
        self.clock.advance(3)
        self.assertEqual(self.get("/v1/state/nodes"), [
            {"uuid": A, "host": "127.0.0.7", "alive": True, "last_seen": 3.0,
             "zone": None}])
        self.assertEqual(self.get("/v1/state/nodes/by_era/boot-1"), {"uuid": A})

    def test_heartbeat_refreshes_last_seen_only(self):
        """A heartbeat refreshes the node's last_seen but not the cluster state version."""
        agent, _ = self.connect()
        version = self.h.cluster.version
        self.clock.advance(4)
        agent.send(Heartbeat())
        self.assertEqual(self.get("/v1/state/nodes")[0]["last_seen"], 0.0)
        self.assertEqual(self.h.cluster.version, version)

    # holders

    def states(self, agent, node_uuid, **states):
        """Report holding the datasets named DS, DS2, DS3 in the states given."""
        ids = {"ds": DS, "ds2": DS2, "ds3": DS3}
        return agent.send(StateReport(node_uuid=node_uuid, datasets=tuple(
            DatasetReport(dataset_id=ids[name], state=state)
            for name, state in sorted(states.items()))))

    def test_holders_pushed_when_they_change(self):
        """
        A report that adds or drops datasets pushes one diff of just their entries, with
        the nodes holding each; a report changing only their state there pushes nothing.
        """
        self.create()
        self.create(DS2, name="logs")
        a, _ = self.connect()
        b, _ = self.connect(NODE_B)
        a.received()
        b.received()
        self.states(a, A, ds="creating", ds2="creating", ds3="creating")
        [diff] = b.received()
        self.assertEqual(diff.version, self.server.version)
        self.assertEqual({d.dataset_id: d.holders for d in diff.datasets},
                         {DS: (A,), DS2: (A,)})
        self.states(a, A, ds="mounted", ds2="attaching", ds3="creating")
        self.assertEqual(b.received(), [])
        [diff] = self.states(b, B, ds="moving")
        self.assertEqual([(d.dataset_id, d.holders) for d in diff.datasets],
                         [(DS, tuple(sorted([A, B])))])
        self.states(a, A, ds2="mounted", ds3="creating")
        [diff] = b.received()
        self.assertEqual([(d.dataset_id, d.holders) for d in diff.datasets], [(DS, (B,))])
        self.assertEqual({d.dataset_id: d for d in self.server.snapshot().datasets},
                         view_datasets(self.configuration.committed,
                                       holders_of(self.h.cluster.state)))

    def test_report_of_unknown_dataset_ignored(self):
        """A report naming a dataset the configuration lacks holds nothing of it (issue 8):
        it is not stored, nor a holder of the dataset once created."""
        a, _ = self.connect()
        self.states(a, A, ds="creating")
        self.assertEqual((a.received(), self.get("/v1/state/datasets")), ([], []))
        self.assertFalse(a.closed)
        self.create()
        [diff] = a.received()
        self.assertEqual(diff.datasets[0].holders, ())
        [diff] = self.states(a, A, ds="mounted")
        self.assertEqual(diff.datasets[0].holders, (A,))

    def test_holders_in_snapshot(self):
        """A snapshot, also one made by a server started later, carries the holders."""
        self.create()
        a, _ = self.connect()
        self.states(a, A, ds="mounted")
        _, [_, snapshot] = self.connect(NODE_B)
        self.assertEqual([d.holders for d in snapshot.datasets], [(A,)])
        self.server.stop()
        self.server = self.start_server()
        self.assertEqual([d.holders for d in self.server.snapshot().datasets], [(A,)])

    def test_dead_node_no_longer_holds(self):
        """A node's death and the datasets it no longer holds arrive in one diff."""
        self.create()
        a, _ = self.connect()
        self.states(a, A, ds="mounted")
        other, _ = self.connect(NODE_B)
        other.received()
        self.clock.advance(self.h.cluster.node_expiry - 1)
        other.send(Heartbeat())
        self.clock.advance(1)
        [diff] = [m for m in other.received() if isinstance(m, Diff)]
        self.assertEqual(([d.holders for d in diff.datasets], [n.alive for n in diff.nodes]),
                         ([()], [False]))

    # expiry

    def test_heartbeats_keep_node_alive(self):
        """A node heard from within every expiry period stays alive."""
        agent, _ = self.connect()
        for _ in range(10):
            self.clock.advance(self.h.cluster.node_expiry - 1)
            agent.send(Heartbeat())
        self.assertEqual(self.get("/v1/state/nodes")[0]["alive"], True)
        self.assertFalse(agent.closed)

    def test_silent_node_dies(self):
        """A silent node is dead after the expiry: state wiped, agents told, hung up on."""
        self.create()
        agent, _ = self.connect()
        agent.send(StateReport(node_uuid=A, datasets=(
            DatasetReport(dataset_id=DS, state="mounted", path="/m"),)))
        other, _ = self.connect(NODE_B)
        other.received()
        self.clock.advance(self.h.cluster.node_expiry - 1)
        other.send(Heartbeat())
        self.assertEqual(len(self.get("/v1/state/datasets")), 1)
        self.clock.advance(1)
        self.assertEqual(self.get("/v1/state/datasets"), [])
        self.assertEqual(self.h.cluster.state.nodes[A].datasets, {})
        nodes = {n["uuid"]: n["alive"] for n in self.get("/v1/state/nodes")}
        self.assertEqual(nodes, {A: False, B: True})
        diffs = [m for m in other.received() if isinstance(m, Diff)]
        self.assertEqual([d.nodes for d in diffs],
                         [(Node(uuid=A, host="127.0.0.7", peer_port=4525,
                                     alive=False),)])
        error = agent.received()[-1]
        self.assertEqual((error.code, agent.closed), ("silent", True))

    def test_dead_node_comes_back(self):
        """A dead node that says hello again is alive again, and agents are told."""
        agent, _ = self.connect()
        agent.lose()
        other, _ = self.connect(NODE_B)
        self.clock.advance(self.h.cluster.node_expiry - 1)
        other.send(Heartbeat())
        self.clock.advance(1)
        self.assertEqual(self.h.cluster.is_alive(self.h.cluster.state.nodes[A]), False)
        other.received()
        again, _ = self.connect()
        [diff] = other.received()
        self.assertEqual(diff.nodes[0].alive, True)
        self.assertEqual({n["uuid"]: n["alive"] for n in self.get("/v1/state/nodes")},
                         {A: True, B: True})

    def test_reconnect_within_expiry_keeps_state(self):
        """A node reconnecting before it expires keeps its reported state meanwhile."""
        self.create()
        agent, _ = self.connect()
        agent.send(StateReport(node_uuid=A, datasets=(
            DatasetReport(dataset_id=DS, state="mounted", path="/m"),)))
        agent.lose()
        self.clock.advance(10)
        self.connect()
        self.assertEqual(len(self.get("/v1/state/datasets")), 1)

    # purging deleted datasets

    def report(self, agent, node_uuid, *dataset_ids, view=None):
        """Report holding ``dataset_ids``, acknowledging ``view`` (default: current)."""
        return agent.send(StateReport(
            node_uuid=node_uuid, view=view or self.server.current,
            datasets=tuple(DatasetReport(dataset_id=i, state="deleting")
                           for i in dataset_ids)))

    def test_purged_when_last_holder_lets_go(self):
        """A deleted dataset is purged once no live node holds it; agents are told."""
        self.create()
        a, _ = self.connect()
        b, _ = self.connect(NODE_B)
        self.report(a, A, DS)
        self.report(b, B)
        self.delete()
        self.report(b, B)
        self.assertIn(DS, self.configuration.committed.datasets)
        self.report(a, A)
        self.assertNotIn(DS, self.configuration.committed.datasets)
        self.clock.advance(0)
        diffs = [m for m in b.received() if isinstance(m, Diff)]
        self.assertEqual(diffs[-1].removed, (DS,))
        self.assertNotIn(DS, self.server.snapshot().datasets)

    def test_purge_waits_for_every_live_node(self):
        """A node that has not stored a view showing the deletion holds the purge back."""
        self.create()
        a, _ = self.connect()
        b, _ = self.connect(NODE_B)
        old = self.server.current
        self.report(b, B, view=old)
        self.delete()
        self.report(a, A)
        self.assertIn(DS, self.configuration.committed.datasets)
        b.send(Heartbeat(view=self.server.current))
        self.assertNotIn(DS, self.configuration.committed.datasets)

    def test_heartbeat_ack_needs_a_report(self):
        """A connection's heartbeats vouch for nothing until it has reported its state."""
        self.create()
        a, _ = self.connect()
        self.report(a, A)
        b, _ = self.connect(NODE_B)
        self.delete()
        self.report(a, A)
        b.send(Heartbeat(view=self.server.current))
        self.assertIn(DS, self.configuration.committed.datasets)
        self.report(b, B)
        self.assertNotIn(DS, self.configuration.committed.datasets)

    def test_purged_when_holder_dies(self):
        """A deleted dataset held only by a node that dies is purged."""
        self.create()
        a, _ = self.connect()
        b, _ = self.connect(NODE_B)
        self.report(a, A, DS)
        self.delete()
        self.report(b, B)
        self.assertIn(DS, self.configuration.committed.datasets)
        self.clock.advance(self.h.cluster.node_expiry - 1)
        b.send(Heartbeat(view=self.server.current))
        self.clock.advance(1)
        self.assertNotIn(DS, self.configuration.committed.datasets)

    def test_purged_at_once_without_live_nodes(self):
        """A dataset deleted while no node is alive is purged at once."""
        self.create()
        self.delete()
        self.assertNotIn(DS, self.configuration.committed.datasets)

    def test_restart_waits_for_nodes_before_purging(self):
        """After a restart nothing is purged until nodes had an expiry to report."""
        self.create()
        a, _ = self.connect()
        self.report(a, A, DS)
        self.delete()
        self.server.stop()
        self.h.cluster.update(ClusterState())
        self.server = self.start_server()
        again, _ = self.connect()
        self.report(again, A, view=ViewVersion("an-older-run", 5))
        again.send(Heartbeat(view=self.server.current))
        self.assertIn(DS, self.configuration.committed.datasets)
        self.clock.advance(self.h.cluster.node_expiry - 1)
        again.send(Heartbeat(view=self.server.current))
        self.assertIn(DS, self.configuration.committed.datasets)
        self.clock.advance(1)
        self.assertNotIn(DS, self.configuration.committed.datasets)

    def test_future_version_refused(self):
        """An acknowledgement of a version the server never sent is a protocol error."""
        a, _ = self.connect()
        [error] = self.report(a, A, view=ViewVersion(self.server.epoch, 10_000))
        self.assertEqual(error.code, "bad-message")
        self.assertIn("newer than this control service's", error.reason)


# -- over real TLS, a real pyflock-control -------------------------------------------------


class _Collector(MessageProtocol):
    """Collects messages; ``done`` fires with them when the connection closes."""

    def __init__(self, first):
        super().__init__()
        self.first = first
        self.messages = []
        self.done = Deferred()

    def connectionMade(self):
        if self.first is not None:
            self.send(self.first)

    def message_received(self, message):
        self.messages.append(message)
        if isinstance(message, Welcome):
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback(self.messages)


async def exchange(reactor, control, certificates_directory, name, first):
    """Connect to the agent port with ``name``'s certificate, send ``first``; replies."""
    options = client_tls_options(certificates_directory, name, control.host)
    endpoint = tls_client_endpoint(reactor, control.host, control.agent_port, options)
    protocol = _Collector(first)
    factory = Factory.forProtocol(lambda: protocol)
    await endpoint.connect(factory)
    return await protocol.done


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs."""
    from twisted.internet import reactor
    return reactor


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_real_control_refuses_non_node_certificates(reactor, tmp_path):
    """Over real TLS the agent port refuses a user certificate and a false hello."""
    from tests.harness.certificates import make_cluster_certificates
    from tests.harness.control import ControlProcess, free_address

    folder = tmp_path / "certs"
    folder.mkdir()
    host, _ = free_address()
    cluster = make_cluster_certificates(folder, nodes=2, control_host=host)
    a, b = cluster.node_uuids
    with ControlProcess(tmp_path / "data", folder, host=host,
                        log_directory=tmp_path / "logs") as control:
        control.start()
        [error] = await exchange(reactor, control, folder, "alice", None)
        assert error.code == "identity" and "user-alice" in error.reason

        node = cluster.node_directory(a)
        [error] = await exchange(reactor, control, node, "node", Hello(
            node_uuid=b, era="e", address=host))
        assert error.code == "identity" and f"cannot speak for node {b}" in error.reason

        replies = await exchange(reactor, control, node, "node", Hello(
            node_uuid=a, era="e", address=host))
        assert isinstance(replies[0], Welcome) and isinstance(replies[1], Snapshot)
        assert control.stop() == 0
