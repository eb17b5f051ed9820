"""
The agent channel's server: pushes the cluster's view to every node agent the moment the
configuration changes, and takes each agent's report of what its node holds.

The view is every dataset (id, primary, size, metadata, deleted flag, lease, and the
nodes that report holding it) and every node (uuid, host, peer port, alive). It is
versioned: each change bumps ``version`` and is pushed as a ``Diff`` holding only what
changed; a connecting agent whose view is of another version (or of another ``epoch``: each
run of the control service has its own) gets a ``Snapshot`` first. The configuration
service calls us on every commit, and a state report that adds a node to a dataset's
holders or takes it away is pushed too (a node that lets go of a moved dataset wakes the
node waiting for it), so no one polls.

Only ``node-*`` certificates are accepted, and a node speaks only for itself. A node silent
for the cluster state's expiry is dead: what it reported is wiped and agents see it dead.
With replicas (issue 9) its replica only withdraws its report and, as every replica, wipes
it once the leader marks it dead (``_SharedState``).
Deleted datasets are purged from the configuration once no live node holds them, judged
only on reports made by agents that had stored a view in which the dataset was deleted,
and never during the first ``node_expiry`` seconds of a run, while agents reconnect; a
node holds a purge back at most ``purge_deadline`` seconds. With replicas, only the leader
purges (the configuration service's ``leader``), once it has led for ``node_expiry``
seconds, with its fence.

A node that does not read cannot make the server hold its data (issue 8): a connection
sends as fast as its agent reads (``MessageProtocol`` is its transport's producer), has at
most one snapshot under way (a ``sync`` meanwhile is ignored: the snapshot under way is
the current view or is followed by the diffs since), and is dropped once more than
``send_limit`` bytes wait for it. An agent's frames are at most ``agent_message_limit``
bytes; snapshots go in pages (protocol version 3) and big diffs as several, so that no
frame to an agent outgrows the limit, however big the cluster.

A thousand agents connecting at once (issue 12, ``control/_viewlog.py``) share one
snapshot encoding, compressed, followed by the diffs since it; at most a few snapshots
stream at once while the other agents wait with heartbeats; and an agent reconnecting with
a view of this run gets only the diffs it missed while they are kept. Given a ``checkpoint``
file, the view also goes on across a restart (``_Restored``): the next run keeps the epoch
and version, and agents reconnecting get only what changed since their version.

Agents of protocol 3 are also sent the cluster's revocation list (``publish_crl``): after
the welcome and snapshot, and again whenever the control service loads a new one, so that
their own listeners refuse revoked certificates too (issue 8).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional
from uuid import uuid4

import attr
from pyrsistent import pmap
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from pyflock.common._files import write_atomically
from pyflock.common._logging import log_event
from pyflock.common._model import Configuration
from pyflock.common._records import DatasetEntry
from pyflock.common._tls import Admission
from pyflock.common._wire import (
    AGENT_MESSAGE_LIMIT, MAX_MESSAGE, OLDEST_PROTOCOL, PROTOCOL_VERSION,
    SEND_LIMIT, SNAPSHOT_PAGE, BadMessage, Diff, Error, Heartbeat, Hello, MessageProtocol,
    Node, ProtocolMismatch, Snapshot, StateReport, SyncRequest, ViewVersion,
    describe_protocols, encode, negotiate, split_diff,
)
from pyflock.common._wire import CRLUpdate, REVOCATION_LISTS  # issue 8
from pyflock.common._wire import frame  # issue 12: a broadcast framed once
from pyflock.control._clusterstate import (
    DEFAULT_PURGE_DEADLINE, ClusterState, ClusterStateService, NodeState, Tombstone,
    purgeable,
)
from pyflock.control._persistence import ConfigurationService
from pyflock.control._viewlog import (
    DEFAULT_ADMISSION_RATE, Admissions, Catchup, CheckpointInvalid, checkpoint_bytes,
    read_checkpoint,
)
from pyflock.control._viewlog import StoreResume

#: Seconds between heartbeats (DESIGN.md).
DEFAULT_HEARTBEAT = 5.0

#: The file in the control service's data path that keeps the view across a restart.
VIEW_CHECKPOINT = "agent-view.checkpoint"

_log = Logger()


def view_datasets(config: Configuration,
                  holders: Mapping[str, Iterable[str]] = pmap()) -> dict[str, DatasetEntry]:
    """
    What agents see of every dataset of ``config``, by id, given the nodes holding each
    (``holders_of(cluster_state)``; none by default).
    """
    return {i: DatasetEntry.of(d, config.leases.get(i), holders.get(i, ()))
            for i, d in config.datasets.items()}


def holders_of(state: ClusterState) -> dict[str, frozenset[str]]:
    """The nodes whose latest report lists each dataset, by dataset id (O(cluster))."""
    holders: dict[str, set[str]] = {}
    for node in state.nodes.values():
        for dataset_id in node.datasets:
            holders.setdefault(dataset_id, set()).add(node.uuid)
    return {i: frozenset(nodes) for i, nodes in holders.items()}


@implementer(IHandshakeListener)
class _AgentConnection(MessageProtocol):
    """One agent's connection: a hello first, then state reports and heartbeats."""

    side = "control"

    def __init__(self, server: "AgentChannelServer"):
        super().__init__(server.agent_message_limit, server.send_limit)
        self._server = server
        self._admission: Optional[Admission] = None
        self.node_uuid: Optional[str] = None
        self.welcomed = False
        #: Said hello, waits to be admitted (the server's ``admission``), or was.
        self.admitting = False
        self.reported = False
        self._hello_timeout = None
        self._abort = None

    # -- life cycle ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._server._opened(self)
        # A peer that never completes the handshake or never says hello is dropped.
        self._hello_timeout = self._server.reactor.callLater(
            self._server.node_expiry, self._no_hello)

    def handshakeCompleted(self) -> None:
        self._check_identity()

    def connectionLost(self, reason) -> None:
        self.connected = False
        self.closing = True
        for call in (self._hello_timeout, self._abort):
            if call is not None and call.active():
                call.cancel()
        self._server.admission.cancel(self)
        self._server._closed(self)
        super().connectionLost(reason)

    def close(self, code: str, reason: str) -> None:
        """Tell the agent why and hang up; abort if it does not let go in time."""
        self.fail(code, reason)
        if self.connected and self._abort is None:
            self._abort = self._server.reactor.callLater(
                self._server.heartbeat, self.transport.abortConnection)

    def _admitted(self, hello: Hello) -> None:
        if not self.closing:
            self._server._hello(self, hello)

    def _no_hello(self) -> None:
        self._hello_timeout = None
        self.close("timeout", f"no hello within {self._server.node_expiry} s of connecting")

    # -- identity -----------------------------------------------------------------------

    def _check_identity(self) -> bool:
        """Whether the peer's certificate is a node's; if not, refuse it, saying why."""
        if self._admission is None:
            # Only now is the TLS handshake complete (or the first data in: the same).
            self._admission = self._server.identify(self.transport)
        if not self._admission.admitted:
            self.close("identity", self._admission.refusal)
            return False
        return True

    # -- messages -----------------------------------------------------------------------

    def bad_message(self, error: BadMessage) -> None:
        if isinstance(error, ProtocolMismatch):
            self.close("protocol-version",
                       f"the agent speaks agent-channel {error.describe_theirs()}, this "
                       f"control service speaks "
                       f"{describe_protocols(OLDEST_PROTOCOL, PROTOCOL_VERSION)}: upgrade "
                       f"the control service first, then the agents (a control service "
                       f"speaks its own protocol and the previous one)")
        else:
            self.close("bad-message", str(error))

    def message_received(self, message) -> None:
        if not self._check_identity():
            return
        if isinstance(message, Error):
            log_event(_log, "pyflock:control:agent-error", node_uuid=self.node_uuid,
                      code=message.code, reason=message.reason)
            self.closing = True
            self.transport.loseConnection()
            return
        if not self.welcomed:
            if not isinstance(message, Hello):
                raise BadMessage(f"the first message must be a hello, not "
                                 f"{type(message).__name__}")
            if self.admitting:
                return  # said hello already: waits to be admitted (issue 12)
            if self._hello_timeout is not None and self._hello_timeout.active():
                self._hello_timeout.cancel()
            self._hello_timeout = None
            self.admitting = True
            self._server.admission.request(self, lambda: self._admitted(message))
            return
        self._server._heard(self.node_uuid)
        if isinstance(message, Heartbeat):
            if self.reported:
                self._server._ack(self.node_uuid, message.view)
        elif isinstance(message, StateReport):
            self._server._report(self, message)
        elif isinstance(message, SyncRequest):
            # One snapshot under way at most: it, and the diffs queued behind it, bring
            # the agent to the current view anyway.
            if not self.streaming and not self._server.catchup.turns.has(self):
                self._server._send_snapshot(self)
        elif isinstance(message, Hello):
            raise BadMessage("a connection says hello only once")
        else:
            raise BadMessage(f"agents do not send {type(message).__name__} messages")

    @property
    def identity(self):
        """The verified identity of the peer (None before it is known or if it has none)."""
        return None if self._admission is None else self._admission.identity


class _ChannelFactory(Factory):
    """Builds one ``_AgentConnection`` per accepted connection."""

    def __init__(self, server: "AgentChannelServer"):
        self._server = server

    def buildProtocol(self, addr):
        return _AgentConnection(self._server)


class AgentChannelServer:
    """
    The control side of the agent channel. ``identify(transport)`` judges the certificate
    a connection presented, as an ``Admission`` (the agent channel ``Listener``'s ``admit``
    in production: ``ClusterTLS.listener(reactor, port, AGENT_CHANNEL)``); ``factory()`` is
    what to listen with (``listener.endpoint.listen(server.factory())``). Node expiry is the
    cluster state's ``node_expiry``, so that the REST API and the channel agree. Limits
    (issue 8): an agent's frames are at most ``agent_message_limit`` bytes, an agent that
    lets more than ``send_limit`` bytes wait is dropped, snapshots go in pages of about
    ``page_size`` bytes, and a node holds a purge back at most ``purge_deadline`` seconds.
    """

    def __init__(self, configuration: ConfigurationService, cluster: ClusterStateService,
                 reactor, *, identify: Callable[[object], object],
                 heartbeat: float = DEFAULT_HEARTBEAT,
                 agent_message_limit: int = AGENT_MESSAGE_LIMIT,
                 send_limit: int = SEND_LIMIT, page_size: int = SNAPSHOT_PAGE,
                 purge_deadline: float = DEFAULT_PURGE_DEADLINE,
                 epoch: Optional[str] = None, reports=None,
                 checkpoint: Optional[Path] = None,
                 admission_rate: Optional[float] = DEFAULT_ADMISSION_RATE):
        self.configuration = configuration
        self.cluster = cluster
        self.reactor = reactor
        self.identify = identify
        self.heartbeat = heartbeat
        self.agent_message_limit = agent_message_limit
        self.send_limit = send_limit
        self.page_size = page_size
        self.purge_deadline = purge_deadline
        self.shared = _SharedState(self, reports)
        self.epoch = epoch or uuid4().hex
        self.version = 0
        self._datasets: dict[str, DatasetEntry] = {}
        self._nodes: dict[str, Node] = {}
        # dataset id -> the nodes whose latest report lists it
        self._holders: dict[str, frozenset[str]] = {}
        self._purger = _Purger(self)
        # node uuid -> the latest view version of this epoch it acknowledged as stored
        self._acks: dict[str, int] = {}
        self._connections: dict[str, _AgentConnection] = {}
        self._open: set[_AgentConnection] = set()
        self._expiry: dict[str, object] = {}
        self._heartbeats: Optional[LoopingCall] = None
        # (version, payload): version-2 agents reconnecting together share one encoding
        # issue 12: the diffs pushed and one snapshot, encoded once for every agent
        self.catchup = Catchup(self)
        self._running = False
        self._crl = _CRLPublisher(self)  # issue 8
        self.resumes = StoreResume(self, reports)  # issue 9 point 5: across replicas
        self._pending = _PendingPush(reactor, self.resumes.from_store(self._push_pending))
        self.restored = _Restored(self, checkpoint)  # issue 12: across a restart
        self.admission = Admissions(reactor, admission_rate)  # issue 12: hellos per second

    @property
    def node_expiry(self) -> float:
        """Seconds of silence after which a node is dead."""
        return self.cluster.node_expiry

    def factory(self) -> Factory:
        """The protocol factory to listen with."""
        return _ChannelFactory(self)

    def start(self) -> None:
        """Build the view from the committed configuration; push every change from now on."""
        config = self.configuration.committed
        self._holders = holders_of(self.cluster.state)
        self._datasets = view_datasets(config, self._holders)
        self.version = 1
        self.restored.load(config)
        self.resumes.start()
        self._purger.start(config, self.version)
        self._running = True
        self.configuration.subscribe(self._configuration_changed)
        self.cluster.on_forget(self._forget_node)
        self._heartbeats = LoopingCall(self._send_heartbeats)
        self._heartbeats.clock = self.reactor
        self._heartbeats.start(self.heartbeat, now=False)

    def stop(self) -> Deferred:
        """Stop pushing, close every agent's connection; fires once they are closed."""
        self._running = False
        if self._heartbeats is not None and self._heartbeats.running:
            self._heartbeats.stop()
        self._purger.stop()
        self._pending.cancel()
        self.admission.stop()
        for call in self._expiry.values():
            if call.active():
                call.cancel()
        self._expiry.clear()
        self.restored.save()
        waiting = []
        for connection in list(self._open):
            waiting.append(connection.when_lost())
            connection.close("shutting-down", "the control service is stopping")
        return gatherResults(waiting).addCallback(lambda _: None)

    @property
    def current(self) -> ViewVersion:
        """The version of the view agents are being sent."""
        return ViewVersion(epoch=self.epoch, version=self.version)

    def snapshot(self) -> Snapshot:
        """The whole view now."""
        return Snapshot(epoch=self.epoch, version=self.version,
                        datasets=tuple(self._datasets.values()),
                        nodes=tuple(self._nodes.values()))

    @property
    def connected_nodes(self) -> frozenset[str]:
        """The nodes with a welcomed connection now."""
        return frozenset(self._connections)

    # -- pushing ------------------------------------------------------------------------

    def _publish(self, datasets: Iterable[DatasetEntry] = (), removed: Iterable[str] = (),
                 nodes: Iterable[Node] = ()) -> None:
        """Bump the version and push what changed to every agent (a change too big for
        one frame as several diffs, a version each)."""
        diff = Diff(epoch=self.epoch, version=self.version + 1, datasets=tuple(datasets),
                    removed=tuple(removed), nodes=tuple(nodes))
        payload = encode(diff)
        self.resumes.record(diff)
        parts = [(diff, payload)] if len(payload) <= self.page_size else [
            (part, encode(part)) for part in split_diff(diff, self.page_size)]
        for part, payload in parts:
            self.version = part.version
            self.catchup.history.record(part.version, payload)
            framed = frame(payload)
            for connection in self._connections.values():
                if self.catchup.turns.queued(connection):
                    continue  # issue 12: its snapshot's stream, when it starts, has this
                connection.send_frame(framed)

    def _send_snapshot(self, connection: _AgentConnection) -> None:
        self.catchup.snapshot(connection)  # issue 12: shared pages, a few at once

    def _send_heartbeats(self) -> None:
        # A replica that has just become leader purges what waited meanwhile.
        self._purge_unheld()
        self.resumes.heartbeats(self._connections.values())

    def _configuration_changed(self, config: Configuration,
                               touched: Optional[tuple[str, ...]]) -> None:
        if self._running:
            self._pending.add(config, touched)

    def _push_pending(self, config: Configuration,
                      touched: Optional[tuple[str, ...]]) -> None:
        if not self._running:
            return
        ids = set(config.datasets) | set(self._datasets) if touched is None else touched
        changed, removed = [], []
        for dataset_id in ids:
            dataset = config.datasets.get(dataset_id)
            if dataset is None:
                if self._datasets.pop(dataset_id, None) is not None:
                    removed.append(dataset_id)
                self._purger.tombstones.pop(dataset_id, None)
                continue
            entry = DatasetEntry.of(dataset, config.leases.get(dataset_id),
                                    self._holders.get(dataset_id, ()))
            if self._datasets.get(dataset_id) != entry:
                self._datasets[dataset_id] = entry
                changed.append(entry)
        if not changed and not removed:
            return
        self._publish(datasets=changed, removed=removed)
        if self._purger.deleted([e.dataset_id for e in changed if e.purging], self.version):
            self._purge_unheld()

    def _set_holdings(self, uuid: str, before: Iterable[str],
                      after: Iterable[str]) -> list[DatasetEntry]:
        """
        Node ``uuid`` now holds the datasets ``after`` rather than ``before``: the view's
        entries whose holders changed, to push. A report that only changes a dataset's
        state there (creating -> mounted) changes none: O(change).
        """
        before, after = frozenset(before), frozenset(after)
        changed = []
        for dataset_id in sorted(before ^ after):
            holders = self._holders.get(dataset_id, frozenset())
            holders = holders | {uuid} if dataset_id in after else holders - {uuid}
            if holders:
                self._holders[dataset_id] = holders
            else:
                self._holders.pop(dataset_id, None)
            entry = self._datasets.get(dataset_id)
            if entry is not None:
                entry = attr.evolve(entry, holders=holders)
                self._datasets[dataset_id] = entry
                changed.append(entry)
        return changed

    def _set_node(self, entry: Node, datasets: Iterable[DatasetEntry] = ()) -> None:
        """Push a node's entry if it changed, with dataset entries changed alongside."""
        datasets = tuple(datasets)
        nodes = [entry] if self._nodes.get(entry.uuid) != entry else []
        self._nodes[entry.uuid] = entry
        if nodes or datasets:
            self._publish(datasets=datasets, nodes=nodes)

    # -- connections --------------------------------------------------------------------

    def _opened(self, connection: _AgentConnection) -> None:
        self._open.add(connection)

    def _closed(self, connection: _AgentConnection) -> None:
        self._open.discard(connection)
        self.catchup.turns.done(connection)
        uuid = connection.node_uuid
        if uuid is not None and self._connections.get(uuid) is connection:
            del self._connections[uuid]
            log_event(_log, "pyflock:control:agent-disconnected", node_uuid=uuid)

    def _hello(self, connection: _AgentConnection, hello: Hello) -> None:
        uuid = connection.identity.node_uuid
        if hello.node_uuid != uuid:
            connection.close("identity", f"this connection's certificate is node-{uuid}; "
                                         f"it cannot speak for node {hello.node_uuid}")
            return
        if not self._running:
            connection.close("shutting-down", "the control service is stopping")
            return
        previous = self._connections.pop(uuid, None)
        if previous is not None:
            previous.close("replaced", "a newer connection from this node replaced this one")
        now = self.reactor.seconds()
        known = self.cluster.state.nodes.get(uuid)
        datasets = known.datasets if known is not None and self.cluster.is_alive(known) \
            else pmap()
        self.shared.claim(NodeState(
            uuid=uuid, host=hello.address, era=hello.era, last_seen=now,
            peer_port=hello.peer_port, zone=hello.zone, datasets=datasets))
        # Acknowledgements count from this connection's first report on.
        self._acks.pop(uuid, None)
        self._heard(uuid)
        self._set_node(Node(uuid=uuid, host=hello.address, peer_port=hello.peer_port,
                                 alive=True),
                       self._set_holdings(uuid, () if known is None else known.datasets,
                                          datasets))
        connection.node_uuid = uuid
        connection.welcomed = True
        # decode has refused a hello whose versions share none with ours.
        connection.protocol_version = negotiate(hello.protocols)
        self._connections[uuid] = connection
        connection.send(self.resumes.welcome(connection))
        snapshot = hello.known != self.current and not self.catchup.resume(
            connection, hello.known) and not self.resumes.resume(connection, hello)
        if snapshot:
            self._send_snapshot(connection)
        self._crl.send(connection)  # issue 8: after the snapshot's pages
        log_event(_log, "pyflock:control:agent-connected", node_uuid=uuid, era=hello.era,
                  host=hello.address, peer_port=hello.peer_port, zone=hello.zone,
                  snapshot=snapshot,
                  version=self.version, protocol=connection.protocol_version)

    def publish_crl(self, pem: Optional[str]) -> None:
        """Issue 8: send the revocation list ``pem`` (PEM text; None: none) to agents of
        protocol 3, now and on connecting (``_CRLPublisher``)."""
        self._crl.publish(pem)

    def _heard(self, uuid: str) -> None:
        """The node spoke: it is alive for another ``node_expiry`` seconds."""
        self.cluster.seen(uuid, self.reactor.seconds())
        call = self._expiry.get(uuid)
        if call is not None and call.active():
            call.reset(self.node_expiry)
        else:
            self._expiry[uuid] = self.reactor.callLater(self.node_expiry, self._expire, uuid)

    def _report(self, connection: _AgentConnection, report: StateReport) -> None:
        uuid = connection.node_uuid
        if report.node_uuid != uuid:
            connection.close("identity", f"node {uuid} may report only its own state, "
                                         f"not node {report.node_uuid}'s")
            return
        node = self.cluster.state.nodes[uuid]
        unknown = [r.dataset_id for r in report.datasets if r.dataset_id not in self._datasets]
        if unknown:
            # Only configured datasets (deleted ones included) may be held: anything else
            # would take memory, and the holders of a dataset not created yet.
            log_event(_log, "pyflock:control:report-unknown-datasets", LogLevel.warn,
                      node_uuid=uuid, count=len(unknown), dataset_ids=sorted(unknown)[:10])
        datasets = pmap({r.dataset_id: attr.evolve(r, node_uuid=uuid)
                         for r in report.datasets if r.dataset_id in self._datasets})
        presumed = self.restored.presumed.pop(uuid, frozenset())
        if datasets != node.datasets or presumed:
            if datasets != node.datasets:
                self.shared.update(node.set(datasets=datasets))
                log_event(_log, "pyflock:control:node-state", node_uuid=uuid,
                          datasets=len(datasets))
            changed = self._set_holdings(uuid, presumed | set(node.datasets), datasets)
            if changed:
                self._publish(datasets=changed)
        connection.reported = True
        self._ack(uuid, report.view)
        self._purge_unheld()

    def _ack(self, uuid: str, view: Optional[ViewVersion]) -> None:
        if view is None or view.epoch != self.epoch:
            return
        if view.version > self.version:
            raise BadMessage(f"view version {view.version} is newer than this control "
                             f"service's ({self.version})")
        if view.version > self._acks.get(uuid, -1):
            self._acks[uuid] = view.version
            self._purge_unheld()

    def _forget_node(self, uuid: str) -> None:
        """A dead node was forgotten: snapshots leave it out from now on (views already
        pushed keep it, dead, until their next snapshot: a Diff cannot remove a node)."""
        self._nodes.pop(uuid, None)
        self._acks.pop(uuid, None)
        self.catchup.history.forget_snapshot()
        self.shared.report("forget", uuid)  # issue 9: the leader's mark of its death goes

    def _expire(self, uuid: str) -> None:
        """Nothing heard from ``uuid`` for ``node_expiry``: it is dead (with replicas: its
        report is withdrawn, and it is dead once the leader marks it)."""
        self._expiry.pop(uuid, None)
        node = self.cluster.state.nodes.get(uuid)
        presumed = self.restored.presumed.pop(uuid, None)
        if node is None and presumed is not None:
            self.restored.expire(uuid, presumed)
            return
        if node is None or node.remote is not None:
            return  # its agent went on to another replica, which now publishes it
        self._acks.pop(uuid, None)
        connection = self._connections.pop(uuid, None)
        if connection is not None:
            connection.close("silent", f"nothing heard from this node for "
                                       f"{self.node_expiry} s")
        held = set(node.datasets) | (presumed or set())
        if self.shared.withdraw(node, held):
            return
        self.cluster.wipe(uuid)
        self._set_node(Node(uuid=uuid, host=node.host, peer_port=node.peer_port,
                            alive=False), self._set_holdings(uuid, held, ()))
        log_event(_log, "pyflock:control:node-dead", node_uuid=uuid,
                  wiped=len(node.datasets), silent=self.node_expiry)
        self._purge_unheld()

    def _purge_unheld(self) -> None:
        self._purger.check(self._acks)


class _SharedState:
    """
    Issue 9: the server's part in the cluster state shared between replicas (the server's
    ``shared``). ``reports``, the server's argument (``SharedReports`` on etcd; None: a
    single control service), is told of each hello (``claim``), changed report
    (``publish``), silent node (``withdraw``) and forgotten node (``forget``);
    ``merge(uuid, node or None)`` takes what other replicas publish, and deaths.

    A node that goes silent here is not wiped here at once: that would show it dead here
    while the other replicas wait for the leader's mark, and would let a replica that is
    not the leader (paused, or cut off from the others) declare a live node dead. It keeps
    showing as it was, published by this replica, as the others show it, until the mark
    comes through the watch (``merge(uuid, None)``), as on every replica.
    """

    def __init__(self, server: AgentChannelServer, reports):
        self._server = server
        self._reports = reports
        self._echo: Optional[str] = None  # a node forgotten as another replica forgot it
        if reports is not None:
            reports.on_forgotten = self.forgotten

    def forgotten(self, uuid: str) -> None:
        """Another replica forgot dead node ``uuid`` (its mark deleted, no report came):
        forget it here too, as ``DELETE /v1/state/nodes`` does, but delete no mark."""
        self._echo = uuid
        try:
            self._server.cluster.forget_elsewhere(uuid)
        finally:
            self._echo = None

    def claim(self, node: NodeState) -> None:
        """``node``'s agent said hello here: it is in the cluster state, claimed."""
        self._server.cluster.update(self._server.cluster.state.update_node(node))
        self.report("claim", node)

    def update(self, node: NodeState) -> None:
        """``node``'s report changed: it is in the cluster state, published."""
        self._server.cluster.update(self._server.cluster.state.update_node(node))
        self.report("publish", node)

    def withdraw(self, node: NodeState, held: set[str]) -> bool:
        """``node``, which holds ``held`` in the view, went silent here: with replicas, its
        report is withdrawn and it waits for the leader's mark; whether it does (else it
        is for the caller to wipe)."""
        server = self._server
        if self._reports is None:
            return False
        server.cluster.update(server.cluster.state.update_node(
            node.set(remote=self._reports.replica.name)))
        # Datasets only a restored view presumed it held are not in its report.
        released = server._set_holdings(node.uuid, held - set(node.datasets), ())
        if released:
            server._publish(datasets=released)
        self._reports.withdraw(node)
        log_event(_log, "pyflock:control:node-withdrawn", node_uuid=node.uuid,
                  silent=server.node_expiry)
        return True

    def report(self, hook: str, node) -> None:
        """Hand ``node`` (a uuid for ``forget``) to the reports' ``hook``, if shared."""
        if self._reports is not None and not (hook == "forget" and node == self._echo):
            getattr(self._reports, hook)(node)

    def merge(self, uuid: str, node: Optional[NodeState],
              last: Optional[NodeState] = None) -> None:
        """
        Another replica publishes ``node`` (its agent talks to that replica), or the leader
        marked ``uuid`` dead (None; ``last``: as it was last published, for a node this
        replica never saw): update the cluster state and push what changed. A connection
        of that node here is stale: the agent has moved on.
        """
        server = self._server
        before = server.cluster.state.nodes.get(uuid)
        if node is not None:
            connection = server._connections.pop(uuid, None)
            if connection is not None:
                connection.close("replaced", "this node's agent talks to another replica")
            server._acks.pop(uuid, None)
        server.cluster.merge_remote(uuid, node, last)
        after = server.cluster.state.nodes.get(uuid)
        if after is None:
            return
        changed = server._set_holdings(uuid, () if before is None else before.datasets,
                                       after.datasets)
        with server.resumes.origin(getattr(self._reports, "watched", 0)):
            server._set_node(Node(uuid=uuid, host=after.host, peer_port=after.peer_port,
                                  alive=server.cluster.is_alive(after)), changed)
        if node is None and before is not None and before.remote is not None:
            log_event(_log, "pyflock:control:node-dead", node_uuid=uuid,
                      wiped=len(before.datasets), replica=before.remote)
        server._purge_unheld()


class _Restored:
    """
    Issue 12: the server's view across a restart (the server's ``restored``). On stopping,
    the view and its recent diffs go to the ``checkpoint`` file; the next run reads it
    once (and removes it), keeps its epoch and version, and pushes what changed in the
    store meanwhile as one diff, so that agents reconnecting with their version get diffs.

    Until a node of the old view reports again, the datasets that view said it holds are
    ``presumed`` held by it (so the view does not lose and regain every holder while agents
    reconnect); a node that does not come back within ``node_expiry`` is dead, as in a run
    that had heard it.
    """

    def __init__(self, server: AgentChannelServer, checkpoint: Optional[Path]):
        self._server = server
        self.checkpoint = checkpoint
        #: node uuid -> the datasets the restored view says it holds, until it reports
        self.presumed: dict[str, set[str]] = {}

    def load(self, config: Configuration) -> bool:
        """Take the view of the checkpoint, if one is there, and push what changed since
        in ``config``; whether there was one to take (else the server's fresh view stays)."""
        server, path = self._server, self.checkpoint
        if path is None or not path.exists():
            return False
        try:
            data = path.read_bytes()
            path.unlink()  # once: a run that crashes leaves none behind
            view, diffs = read_checkpoint(data)
        except (OSError, CheckpointInvalid) as e:
            log_event(_log, "pyflock:control:checkpoint-unread", LogLevel.warn,
                      path=str(path), reason=str(e))
            return False
        server.epoch, server.version = view.epoch, view.version
        server._nodes = {n.uuid: n for n in view.nodes}
        self.presumed = {n.uuid: set() for n in view.nodes if n.alive}
        for entry in view.datasets:
            for uuid in entry.holders:
                self.presumed.setdefault(uuid, set()).add(entry.dataset_id)
        holders = {e.dataset_id: frozenset(e.holders) for e in view.datasets if e.holders}
        server._holders = holders | holders_of(server.cluster.state)
        for version, payload in diffs:
            server.catchup.history.record(version, payload)
        old = {e.dataset_id: e for e in view.datasets}
        server._datasets = view_datasets(config, server._holders)
        changed = [e for i, e in server._datasets.items() if old.get(i) != e]
        removed = [i for i in old if i not in server._datasets]
        if changed or removed:
            server._publish(datasets=changed, removed=removed)
        for uuid in self.presumed:
            server._expiry[uuid] = server.reactor.callLater(server.node_expiry,
                                                            server._expire, uuid)
        log_event(_log, "pyflock:control:view-restored", epoch=server.epoch,
                  version=server.version, changed=len(changed), removed=len(removed),
                  diffs=len(diffs))
        return True

    def expire(self, uuid: str, presumed: set[str]) -> None:
        """A node of the restored view not heard from in this run is dead."""
        server = self._server
        entry = server._nodes.get(uuid)
        released = server._set_holdings(uuid, presumed, ())
        if entry is not None:
            server._set_node(attr.evolve(entry, alive=False), released)
        elif released:
            server._publish(datasets=released)

    def save(self) -> None:
        """Write the view now and its recent diffs to the checkpoint (if there is one)."""
        server, path = self._server, self.checkpoint
        if path is None or server.version < 1:
            return
        try:
            write_atomically(path, checkpoint_bytes(server.snapshot(),
                                                    server.catchup.history.kept()))
        except OSError as e:
            log_event(_log, "pyflock:control:checkpoint-unwritten", LogLevel.warn,
                      path=str(path), reason=str(e))


class _PendingPush:
    """
    Configuration changes waiting for their push to agents. The push waits one reactor
    turn: the REST answer that made a change goes out first (its client is waiting on it;
    agents are not), and the changes of one turn go out as one diff.
    """

    def __init__(self, reactor,
                 push: Callable[[Configuration, Optional[tuple[str, ...]]], None]):
        self._reactor = reactor
        self._push = push
        self._call = None
        self._config: Optional[Configuration] = None
        # In the order they changed; None: any dataset may have changed.
        self._touched: Optional[dict[str, None]] = {}

    def add(self, config: Configuration, touched: Optional[tuple[str, ...]]) -> None:
        """``config`` is the newest; ``touched`` (None: all) changed in it."""
        self._config = config
        if touched is None or self._touched is None:
            self._touched = None
        else:
            self._touched.update(dict.fromkeys(touched))
        if self._call is None:
            self._call = self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        config, touched = self._config, self._touched
        self._call, self._config, self._touched = None, None, {}
        self._push(config, None if touched is None else tuple(touched))

    def cancel(self) -> None:
        """Drop what waits (the server stops)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call, self._config, self._touched = None, None, {}


class _CRLPublisher:
    """
    Issue 8: the revocation list agents of protocol 3 are sent, as the payload of a
    ``revocations`` message (None while the control service has none).
    """

    def __init__(self, server: AgentChannelServer):
        self._server = server
        self.payload: Optional[bytes] = None

    def publish(self, pem: Optional[str]) -> None:
        """Put ``pem`` in force and send it to every agent of protocol 3 now; a list
        already sent is not sent again, and none (None) is not sent at all."""
        payload = None if pem is None else encode(CRLUpdate(crl=pem))
        if payload is not None and len(payload) > MAX_MESSAGE:
            log_event(_log, "pyflock:control:crl-too-large", LogLevel.error,
                      size=len(payload), limit=MAX_MESSAGE)
            payload = None
        if payload == self.payload:
            return
        self.payload = payload
        sent = sum(self.send(c) for c in self._server._connections.values())
        log_event(_log, "pyflock:control:crl-published", agents=sent,
                  empty=payload is None)

    def send(self, connection: _AgentConnection) -> bool:
        """Send the list in force to ``connection`` if there is one and its version
        carries it; whether it did."""
        if self.payload is None or connection.protocol_version < REVOCATION_LISTS:
            return False
        connection.send_payload(self.payload)
        return True


class _Purger:
    """
    Purges the deleted datasets no live node holds (see the module's docstring): keeps
    when each was first seen deleted, the grace after a start, and the deadline.
    """

    def __init__(self, server: AgentChannelServer):
        self._server = server
        # dataset id -> when it was first seen deleted (view version, time)
        self.tombstones: dict[str, Tombstone] = {}
        self._purging: set[str] = set()
        self._calls: set = set()
        self._grace = None

    def start(self, config: Configuration, version: int) -> None:
        """Every dataset of ``config`` whose data may go is a tombstone; purge nothing for
        an expiry."""
        self.deleted([i for i, d in config.datasets.items() if d.purging], version)
        # Until every node alive has had time to reconnect and report, nobody knows who
        # holds what: purge nothing before then.
        self._grace = self._server.reactor.callLater(self._server.node_expiry,
                                                     self._grace_over)

    def stop(self) -> None:
        """Cancel every timer."""
        for call in list(self._calls) + [self._grace]:
            if call is not None and call.active():
                call.cancel()

    def deleted(self, dataset_ids, version: int) -> bool:
        """Datasets seen deleted at view ``version``; whether any was not seen before."""
        new = [i for i in dataset_ids if i not in self.tombstones]
        now = self._server.reactor.seconds()
        for dataset_id in new:
            self.tombstones[dataset_id] = Tombstone(version, now)
        if new:
            # Look again once these deletions pass the purge deadline.
            def passed():
                self._calls.discard(call)
                self._server._purge_unheld()
            call = self._server.reactor.callLater(self._server.purge_deadline, passed)
            self._calls.add(call)
        return bool(new)

    def _grace_over(self) -> None:
        self._grace = None
        self._server._purge_unheld()

    def check(self, acks: dict[str, int]) -> None:
        """Purge the deleted datasets no live node holds, on the word of every live node
        (a node that has not stored a view showing the deletion may still act on the
        dataset without having reported it yet), or held back past the deadline."""
        server = self._server
        if not self.tombstones or self._grace is not None or not server._running:
            return
        leader = server.configuration.leader
        if not leader.settled(server.reactor.seconds(), server.node_expiry):
            return
        cluster = server.cluster
        live = [n for n in cluster.state.nodes.values() if cluster.is_alive(n)]
        for dataset_id in purgeable(self.tombstones, live, acks, server.reactor.seconds(),
                                    server.purge_deadline):
            if dataset_id not in self._purging:
                self._purge(dataset_id)

    def _purge(self, dataset_id: str) -> None:
        self._purging.add(dataset_id)
        configuration = self._server.configuration
        d = configuration.change([dataset_id], lambda c: c.purge(dataset_id),
                                 fence=configuration.leader.fence)

        def purged(_):
            log_event(_log, "pyflock:control:dataset-purged", dataset_id=dataset_id)

        def failed(failure):
            log_event(_log, "pyflock:control:dataset-purge-failed", dataset_id=dataset_id,
                      reason=str(failure.value))
        d.addCallbacks(purged, failed)
        d.addBoth(lambda _: self._purging.discard(dataset_id))


__all__ = ["AgentChannelServer", "DEFAULT_HEARTBEAT", "holders_of", "view_datasets"]
