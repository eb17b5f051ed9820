"""
Evolving the agent channel (docs/architecture.md): the handshake settles a version both
sides speak, an agent of the previous version (3, without the hello's ``resume``) is still
served, one two versions behind (2, 1) or too new is refused naming both sides' versions,
and within a version unknown keys are refused.
"""

import json

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._channel import AgentChannel, _ConnectionFactory
from pyflock.common._model import Dataset
from pyflock.common._tls import AGENT_CHANNEL
from pyflock.common._wire import (
    MESSAGE_KEYS, OLDEST_PROTOCOL, PROTOCOL_VERSION, BadMessage, Diff, Error, Heartbeat,
    Hello, ProtocolMismatch, Snapshot, StateReport, StoreRevision, ViewVersion, Welcome,
    decode, encode, negotiate,
)
from pyflock.control._agentchannel import AgentChannelServer
from pyflock.control.testing import NODE_A, APIHarness
from tests.control.test_agentchannel import RawAgent, frame, frames

A = NODE_A.node_uuid
DS = "11111111-2222-4333-8444-555555555555"

#: A hello exactly as pyflock 1 (protocol version 1) sends it, byte for byte.
V1_HELLO = (b'{"type":"hello","protocol":1,"node_uuid":"' + A.encode() + b'","era":"e1",'
            b'"address":"127.0.0.7","peer_port":4525,"known":null}')

#: A hello exactly as an agent of protocol version 2 (no zone) sends it, byte for byte.
V2_HELLO = (b'{"type":"hello","protocol":2,"node_uuid":"' + A.encode() + b'","era":"e1",'
            b'"address":"127.0.0.7","peer_port":4525,"known":null,"protocols":[1,2]}')

#: What this code speaks.
OURS = (OLDEST_PROTOCOL, PROTOCOL_VERSION)


def test_this_code_speaks_the_current_and_previous_version():
    """The control service (and agent) speak the current version and the one before."""
    assert OURS == (PROTOCOL_VERSION - 1, PROTOCOL_VERSION) == (3, 4)
    assert {3, 4} <= set(MESSAGE_KEYS)  # 2 stays only as what 3 is built on


def test_version_4_adds_the_resume_point():
    """Version 4 adds the hello's ``resume``, the welcome's and heartbeat's
    ``store_revision`` and the diff's ``base``; every version-3 key stays."""
    added = {kind: MESSAGE_KEYS[4][kind] - MESSAGE_KEYS[3][kind] for kind in MESSAGE_KEYS[4]}
    assert {k: v for k, v in added.items() if v} == {
        "hello": {"resume"}, "welcome": {"store_revision"},
        "heartbeat": {"store_revision"}, "diff": {"base"}}


def test_version_3_adds_the_hello_zone():
    """Version 3's hello has ``zone``, version 2's has not; every version-2 key stays."""
    assert "zone" in MESSAGE_KEYS[3]["hello"] and "zone" not in MESSAGE_KEYS[2]["hello"]
    assert all(MESSAGE_KEYS[2][kind] <= MESSAGE_KEYS[3][kind] for kind in MESSAGE_KEYS[2])


@pytest.mark.parametrize("theirs, ours, chosen", [
    ((2, 3), OURS, 3),
    ((3, 4), OURS, 4),
    ((4, 5), OURS, 4),
    ((2, 3), (1, 2), 2),
    ((3, 3), (3, 4), 3),
])
def test_negotiate_picks_the_newest_shared_version(theirs, ours, chosen):
    """The connection speaks the newest version both sides speak."""
    assert negotiate(theirs, ours) == chosen


@pytest.mark.parametrize("theirs, ours, named", [
    ((5, 6), OURS, "protocols 5 to 6, this side speaks protocols 3 to 4"),
    ((1, 2), OURS, "protocols 1 to 2, this side speaks protocols 3 to 4"),
    ((2, 3), (1, 1), "protocols 2 to 3, this side speaks protocols 3 to 4"),
])
def test_negotiate_refuses_disjoint_versions(theirs, ours, named):
    """Versions that share none are a ``ProtocolMismatch`` naming the peer's versions."""
    with pytest.raises(ProtocolMismatch) as error:
        negotiate(theirs, ours)
    assert (error.value.theirs_oldest, error.value.theirs) == theirs
    assert named in str(error.value)


def test_version_1_hello_is_two_versions_behind():
    """pyflock 1's hello (no ``protocols``: version 1 alone) is refused as a mismatch; it
    is still written as before."""
    with pytest.raises(ProtocolMismatch) as error:
        decode(V1_HELLO)
    assert (error.value.theirs_oldest, error.value.theirs) == (1, 1)
    assert encode(Hello(node_uuid=A, era="e1", address="127.0.0.7", peer_port=4525,
                        protocols=(1, 1))) == V1_HELLO


def test_version_2_hello_is_two_versions_behind():
    """A version-2 agent's hello (1 to 2) is refused as a mismatch since version 4."""
    with pytest.raises(ProtocolMismatch) as error:
        decode(V2_HELLO)
    assert (error.value.theirs_oldest, error.value.theirs) == (1, 2)


def test_new_hello_names_its_range_and_zone():
    """A new agent's hello carries ``protocols`` [oldest, newest], its newest and its zone
    (null when it has none)."""
    body = json.loads(encode(Hello(node_uuid=A, era="e", address="h", zone="eu-west-1a")))
    assert (body["protocol"], body["protocols"], body["zone"]) == \
        (PROTOCOL_VERSION, list(OURS), "eu-west-1a")
    assert json.loads(encode(Hello(node_uuid=A, era="e", address="h")))["zone"] is None


@pytest.mark.parametrize("zone", ["eu-west-1a", "us-west-2-lax-1a", None])
def test_hello_zone_round_trip(zone):
    """A version-3 hello's zone reads back as it was sent."""
    hello = Hello(node_uuid=A, era="e", address="h", zone=zone)
    assert decode(encode(hello)) == hello


def test_version_4_hello_as_a_version_3_control_reads_it():
    """Without ``resume``, a version-4 hello is a version-3 hello with the same fields, so
    a version-3 control service (which reads a newer agent's hello by its own keys and
    leaves the rest) serves it in 3."""
    hello = Hello(node_uuid=A, era="e", address="h", peer_port=4525, zone="eu-west-1a",
                  resume=StoreRevision(store="s", revision=7))
    body = json.loads(encode(hello))
    assert body["resume"] == {"store": "s", "revision": 7}
    del body["resume"]
    assert set(body) == MESSAGE_KEYS[3]["hello"]
    assert negotiate(hello.protocols, (2, 3)) == 3
    body["protocols"], body["protocol"] = [2, 3], 3
    assert decode(json.dumps(body).encode(), 3) == Hello(
        node_uuid=A, era="e", address="h", peer_port=4525, protocols=(2, 3),
        zone="eu-west-1a")


def test_resume_points_round_trip():
    """Version 4's resume points and a diff's base read back as they were sent."""
    point = StoreRevision(store="s", revision=7)
    for message in [Hello(node_uuid=A, era="e", address="h", resume=point),
                    Welcome(epoch="e", version=3, store_revision=point),
                    Heartbeat(view=ViewVersion("e", 3), store_revision=point),
                    Diff(epoch="e2", version=9, base=ViewVersion("e", 3))]:
        assert decode(encode(message)) == message


def hello_json(drop=(), **changes) -> bytes:
    """A hello of today's agent, with ``changes`` and without the keys in ``drop``."""
    body = dict(json.loads(encode(Hello(node_uuid=A, era="e", address="h"))), **changes)
    return json.dumps({k: v for k, v in body.items() if k not in drop}).encode()


@pytest.mark.parametrize("payload, expected", [
    (hello_json(protocol=3, protocols=[2, 3], resume={"store": "s", "revision": 1}),
     "hello has unknown keys 'resume'"),
    (hello_json(resume={"store": "s", "revision": 1, "x": 2}),
     "hello.resume has unknown keys 'x'"),
    (hello_json(resume={"store": "", "revision": 1}), "hello.resume.store must not be"),
    (hello_json(extra=1), "hello has unknown keys 'extra'"),
    (hello_json(protocols=[3, 2]), "hello.protocols must be [oldest, newest]"),
    (hello_json(protocols=[1, 2]), "ending with hello.protocol (4)"),
    (hello_json(zone=""), "hello.zone must be an availability zone name"),
    (hello_json(zone="eu west"), "hello.zone must be an availability zone name"),
    (hello_json(zone="z" * 65), "hello.zone must be an availability zone name"),
    (hello_json(zone=3), "hello.zone must be a string or null"),
    (hello_json(protocols=[1]), "hello.protocols must be"),
    (hello_json(protocols=[True, 2]), "hello.protocols must be"),
    (hello_json(known={"epoch": "e", "version": 1, "more": 2}),
     "hello.known has unknown keys 'more'"),
    (encode(StateReport(node_uuid=A))[:-1] + b',"new":1}', "state has unknown keys 'new'"),
    (b'{"type":"sync","please":true}', "sync has unknown keys 'please'"),
])
def test_unknown_keys_are_refused_within_a_version(payload, expected):
    """A key the settled (or newest) version does not have is refused, by name."""
    with pytest.raises(BadMessage) as error:
        decode(payload, PROTOCOL_VERSION)
    assert not isinstance(error.value, ProtocolMismatch)
    assert expected in str(error.value)


def test_unknown_keys_are_refused_in_version_2_too():
    """A connection settled on version 2 refuses a key version 2 does not have."""
    with pytest.raises(BadMessage, match="heartbeat has unknown keys 'x'"):
        decode(b'{"type":"heartbeat","view":null,"x":0}', 2)


def test_pages_are_version_3():
    """A snapshot page (``more``) is version 3: version 2 refuses the key."""
    page = encode(Snapshot(epoch="e", version=1, more=True))
    assert decode(page, 3).more is True
    with pytest.raises(BadMessage, match="snapshot has unknown keys 'more'"):
        decode(page, 2)


@pytest.mark.parametrize("payload, theirs", [
    (hello_json(("era",), protocol=6, protocols=[5, 6], shape="new"), (5, 6)),
    (V1_HELLO, (1, 1)),
    (V2_HELLO, (1, 2)),
    (b'{"type":"hello","protocol":"two"}', ("two", "two")),
    (b'{"type":"hello"}', (None, None)),
    (b'{"type":"welcome","protocol":5,"epoch":"e","version":1}', (5, 5)),
    (b'{"type":"welcome","protocol":2,"epoch":"e","version":1}', (2, 2)),
    (b'{"type":"welcome","protocol":1,"epoch":"e","version":1}', (1, 1)),
    (b'{"type":"welcome","protocol":0,"epoch":"e","version":1}', (0, 0)),
])
def test_handshakes_of_versions_we_do_not_speak(payload, theirs):
    """A hello or welcome naming no version of ours is a mismatch, whatever else it holds."""
    with pytest.raises(ProtocolMismatch) as error:
        decode(payload)
    assert (error.value.theirs_oldest, error.value.theirs) == theirs


def test_newer_agent_hello_is_read_by_our_keys():
    """A newer agent that also speaks our newest version is read, its new keys left."""
    hello = decode(hello_json(protocol=5, protocols=[4, 5], shape="new"))
    assert hello.protocols == (4, 5) and negotiate(hello.protocols) == 4


def test_other_versions_errors_are_read():
    """An error's shape never changes: one with a key of another version is still read."""
    error = decode(b'{"type":"error","code":"c","reason":"r","protocol":9,"more":1}', 2)
    assert error == Error(code="c", reason="r", protocol=9)


class NegotiationTests(SynchronousTestCase):
    """The control service serves old and new agents and refuses too-new ones."""

    def setUp(self):
        self.h = APIHarness()
        self.server = AgentChannelServer(
            self.h.configuration, self.h.cluster, self.h.clock,
            identify=lambda transport: AGENT_CHANNEL.admit(transport.identity))
        self.server.start()
        self.addCleanup(self.server.stop)

    def test_version_3_agent_is_served_version_3(self):
        """An agent of version 3 (no resume point) is welcomed in 3, without the welcome's
        ``store_revision``, and reports its state."""
        self.successResultOf(self.h.configuration.change([DS], lambda c: c.create(
            Dataset(dataset_id=DS, primary=A))))
        self.h.clock.advance(0)
        agent = RawAgent(self.server, NODE_A)
        welcome, snapshot = agent.send_raw(hello_json(protocol=3, protocols=[2, 3]))
        self.assertEqual(welcome, Welcome(epoch=self.server.epoch,
                                          version=self.server.version, protocol=3))
        self.assertIsInstance(snapshot, Snapshot)
        self.assertEqual(agent.protocol.protocol_version, 3)
        report = (b'{"type":"state","node_uuid":"' + A.encode() + b'","datasets":[{'
                  b'"dataset_id":"' + DS.encode() + b'","state":"mounted","path":"/m",'
                  b'"maximum_size":null}],"view":null}')
        [diff] = agent.send_raw(report)
        self.assertEqual(diff.datasets[0].holders, (A,))

    def test_version_2_agent_is_refused_naming_both_versions(self):
        """An agent of version 2, now two versions behind, is refused, told why."""
        agent = RawAgent(self.server, NODE_A)
        [error] = agent.send_raw(V2_HELLO)
        self.assertEqual(error.code, "protocol-version")
        self.assertIn("speaks protocols 3 to 4", error.reason)
        self.assertTrue(agent.closed)

    def test_version_3_agent_zone_is_kept_and_shown(self):
        """A version-3 agent's zone is kept on its node and shown by the REST API."""
        agent = RawAgent(self.server, NODE_A)
        [welcome, _] = agent.hello(zone="eu-west-1a")
        self.assertEqual(welcome.protocol, PROTOCOL_VERSION)
        self.assertEqual(self.h.cluster.state.nodes[A].zone, "eu-west-1a")
        [node] = self.h.request(self, "GET", "/v1/state/nodes").json
        self.assertEqual((node["uuid"], node["zone"]), (A, "eu-west-1a"))

    def test_zone_of_a_dead_node_stays_known(self):
        """A node that dies keeps the zone it last said (its volumes are still there)."""
        RawAgent(self.server, NODE_A).hello(zone="eu-west-1a")
        self.h.clock.advance(self.server.node_expiry + 1)
        [node] = self.h.request(self, "GET", "/v1/state/nodes").json
        self.assertEqual((node["alive"], node["zone"]), (False, "eu-west-1a"))

    def test_version_1_agent_is_refused_naming_both_versions(self):
        """pyflock 1's agent, two versions behind, is refused, told both sides' versions."""
        agent = RawAgent(self.server, NODE_A)
        [error] = agent.send_raw(V1_HELLO)
        self.assertEqual(error.code, "protocol-version")
        self.assertIn("the agent speaks agent-channel protocol 1, this control service "
                      "speaks protocols 3 to 4", error.reason)
        self.assertTrue(agent.closed)
        self.assertEqual(dict(self.h.cluster.state.nodes), {})

    def test_new_agent_is_served_the_newest_version(self):
        """An agent speaking the current and previous version gets the current one."""
        agent = RawAgent(self.server, NODE_A)
        [welcome, _] = agent.hello()
        self.assertEqual((welcome.protocol, agent.protocol.protocol_version),
                         (PROTOCOL_VERSION, PROTOCOL_VERSION))

    def test_too_new_agent_is_refused_naming_both_versions(self):
        """An agent speaking only newer versions is refused, told both sides' versions."""
        agent = RawAgent(self.server, NODE_A)
        [error] = agent.send_raw(hello_json(protocol=6, protocols=[5, 6]))
        self.assertEqual(error.code, "protocol-version")
        self.assertIn("the agent speaks agent-channel protocols 5 to 6, this control "
                      "service speaks protocols 3 to 4: upgrade the control service first",
                      error.reason)
        self.assertTrue(agent.closed)
        self.assertEqual(dict(self.h.cluster.state.nodes), {})

    def test_unknown_key_after_the_handshake_is_refused(self):
        """Once welcomed, a message with a key its version lacks closes the connection."""
        agent = RawAgent(self.server, NODE_A)
        agent.hello()
        [error] = agent.send_raw(b'{"type":"sync","since":3}')
        self.assertEqual(error.code, "bad-message")
        self.assertIn("sync has unknown keys 'since'", error.reason)
        self.assertTrue(agent.closed)


class AgentSideTests(SynchronousTestCase):
    """The agent offers its versions and speaks the one the welcome chose."""

    def make(self, zone=None):
        """An agent connection on a StringTransport, and what it sent first."""
        channel = AgentChannel(Clock(), None, A, "e", lambda view: None, address="h",
                               zone=zone)
        protocol = _ConnectionFactory(channel).buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        [hello] = frames(transport)
        return channel, protocol, transport, hello

    def test_hello_offers_both_versions(self):
        """The agent's hello offers the previous and the current version."""
        _, _, _, hello = self.make()
        self.assertEqual(hello.protocols, OURS)

    def test_hello_says_the_zone(self):
        """An agent given a zone says it in its hello; one without says none."""
        self.assertEqual(self.make(zone="eu-west-1b")[3].zone, "eu-west-1b")
        self.assertIsNone(self.make()[3].zone)

    def test_welcome_settles_the_version(self):
        """The welcome's version is the one the connection decodes by from then on."""
        channel, protocol, transport, _ = self.make()
        protocol.dataReceived(frame(encode(Welcome(epoch="e", version=0, protocol=3))))
        self.assertEqual((channel.connected, protocol.protocol_version), (True, 3))
        channel._heartbeats.stop()

    def test_version_3_control_serves_the_agent_in_3(self):
        """A version-4 agent welcomed in 3 by an older control service speaks version 3
        from then on: its state report has only version-3 keys."""
        channel, protocol, transport, _ = self.make(zone="eu-west-1a")
        protocol.dataReceived(frame(encode(Welcome(epoch="e", version=0, protocol=3))))
        channel.report_state([])
        sent = transport.value()
        self.assertEqual(int.from_bytes(sent[:4], "big"), len(sent) - 4)
        self.assertIsInstance(decode(sent[4:], 3), StateReport)
        self.assertEqual(protocol.protocol_version, 3)
        channel._heartbeats.stop()

    def test_welcome_to_a_version_not_spoken_is_refused(self):
        """A welcome choosing a version the agent does not speak is refused, naming both."""
        _, protocol, transport, _ = self.make()
        protocol.dataReceived(frame(b'{"type":"welcome","protocol":1,"epoch":"e",'
                                    b'"version":0}'))
        [error] = frames(transport)
        self.assertEqual(error.code, "protocol-version")
        self.assertEqual(error.reason, "the control service answered agent-channel "
                                       "protocol 1, this agent speaks protocols 3 to 4")
