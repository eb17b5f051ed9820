"""
Cluster state: what the agents report they have, kept in memory and rebuilt from them.

Nothing here is durable: after a restart of the control service the agents report again.
A node that stays silent longer than the expiry is dead, and its state is wiped. A dead
node that holds no dataset (as primary) and no lease may be forgotten: by a user
(``forget``, ``DELETE /v1/state/nodes/<uuid>``), or once it has been dead longer than
``forget_after`` seconds (``start_forgetting``; ``pyflock-control --forget-dead-nodes``).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

import attr
from pyrsistent import PClass, field, pmap_field
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

from pyflock.common._logging import log_event
from pyflock.common._model import Configuration

from pyflock.common._records import DatasetReport

#: A node silent for this long is dead (DESIGN.md).
DEFAULT_NODE_EXPIRY = 30.0
#: A node dead this long (7 days) that holds no dataset and no lease is forgotten.
DEFAULT_FORGET_DEAD_NODES = 7 * 24 * 3600.0
#: At most this many seconds between two looks for dead nodes to forget.
FORGET_SWEEP_INTERVAL = 60.0
#: A live node holds back the purge of a deleted dataset at most this long (issue 8).
DEFAULT_PURGE_DEADLINE = 3600.0

_log = Logger()


class ForgetRefused(Exception):
    """A node cannot be forgotten; ``description`` says why and what to do."""

    def __init__(self, node_uuid: str, description: str):
        super().__init__(node_uuid, description)
        self.node_uuid = node_uuid
        self.description = description


class NodeUnknown(ForgetRefused):
    """No node with this uuid is known (never reported, or already forgotten)."""

    def __init__(self, node_uuid: str):
        super().__init__(node_uuid, f"No node {node_uuid} is known: it never reported, or "
                                    f"it has been forgotten already.")


class NodeAlive(ForgetRefused):
    """The node is alive: only a dead node may be forgotten."""

    def __init__(self, node_uuid: str, silent: float, expiry: float):
        super().__init__(node_uuid, f"Node {node_uuid} is alive (last heard from "
                                    f"{silent:.0f} s ago): only a dead node can be "
                                    f"forgotten. Stop its agent, wait {expiry:g} s until "
                                    f"the node is dead, then forget it.")
        self.silent = silent


#: What a node may hold that keeps it from being forgotten: how to say it, what to do.
_HOLDS = {
    "primary": ("is the primary of", "move them to another node or delete them"),
    "lease": ("holds the lease on", "release those leases"),
}


class NodeHolds(ForgetRefused):
    """The node is the primary of live datasets (``holds`` "primary") or holds leases on
    datasets ("lease"): ``dataset_ids`` are those datasets."""

    def __init__(self, node_uuid: str, holds: str, dataset_ids: tuple[str, ...]):
        relation, todo = _HOLDS[holds]
        super().__init__(node_uuid, f"Node {node_uuid} {relation} {len(dataset_ids)} "
                                    f"dataset(s) ({', '.join(dataset_ids)}): {todo}, then "
                                    f"forget the node.")
        self.holds = holds
        self.dataset_ids = dataset_ids


def check_forgettable(node: "NodeState", now: float, expiry: float,
                      config: Configuration) -> None:
    """Raise the ``ForgetRefused`` that keeps ``node`` from being forgotten, if any."""
    if node.alive(now, expiry):
        raise NodeAlive(node.uuid, now - node.last_seen, expiry)
    primaries = tuple(sorted(d.dataset_id for d in config.datasets.values()
                             if d.primary == node.uuid and not d.deleted))
    if primaries:
        raise NodeHolds(node.uuid, "primary", primaries)
    leases = tuple(sorted(lease.dataset_id for lease in config.leases.values()
                          if lease.node_uuid == node.uuid and not lease.expired(now)))
    if leases:
        raise NodeHolds(node.uuid, "lease", leases)


class NodeState(PClass):
    """What one node last reported (its datasets' ``DatasetReport`` by id), and when; its
    availability zone as its hello said (None: not known, or a node outside any zone);
    ``remote``: the replica that published it, when its agent talks to another replica
    (issue 9; None: reported here)."""

    uuid = field(type=str, mandatory=True)
    host = field(type=str, mandatory=True)
    era = field(type=(str, type(None)), initial=None)
    last_seen = field(type=float, mandatory=True, factory=float)
    peer_port = field(type=(int, type(None)), initial=None)
    zone = field(type=(str, type(None)), initial=None)
    datasets = pmap_field(str, DatasetReport)
    remote = field(type=(str, type(None)), initial=None)

    def alive(self, now: float, expiry: float) -> bool:
        """Whether the node has been heard from less than ``expiry`` seconds before
        ``now``; a remote node is alive while its replica publishes its report."""
        # Strict, so that a node is dead at the very moment its expiry timer fires.
        return self.remote is not None or now - self.last_seen < expiry


class ZoneMismatch(Exception):
    """
    A dataset on ``source`` (in zone ``source_zone``) cannot move to ``target`` (in
    ``target_zone``): its volume lives in one availability zone.
    """

    def __init__(self, dataset_id: str, source: str, source_zone: str, target: str,
                 target_zone: str):
        super().__init__(dataset_id, source, source_zone, target, target_zone)
        self.dataset_id, self.source, self.target = dataset_id, source, target
        self.source_zone, self.target_zone = source_zone, target_zone

    @property
    def description(self) -> str:
        """The refusal, naming both nodes and both zones."""
        return (f"Dataset {self.dataset_id} is on node {self.source} in zone "
                f"{self.source_zone}; node {self.target} is in zone {self.target_zone}, and "
                f"an EBS volume cannot move between zones: create a dataset on node "
                f"{self.target} and copy the data instead.")


def check_same_zone(state: "ClusterState", dataset_id: str, source: str,
                    target: str) -> None:
    """
    Raise ``ZoneMismatch`` if moving ``dataset_id`` from node ``source`` to ``target``
    crosses availability zones; a move is allowed while either zone is unknown (pure).
    """
    if source == target:
        return
    zones = [getattr(state.nodes.get(uuid), "zone", None) for uuid in (source, target)]
    if None not in zones and zones[0] != zones[1]:
        raise ZoneMismatch(dataset_id, source, zones[0], target, zones[1])


class ClusterState(PClass):
    """Every known node's reported state."""

    nodes = pmap_field(str, NodeState)

    def update_node(self, node: NodeState) -> "ClusterState":
        """Replace a node's reported state."""
        return self.set(nodes=self.nodes.set(node.uuid, node))

    def remove_nodes(self, uuids: Iterable[str]) -> "ClusterState":
        """Forget the state of the nodes named."""
        nodes = self.nodes.evolver()
        for uuid in uuids:
            if uuid in nodes:
                del nodes[uuid]
        return self.set(nodes=nodes.persistent())

    def node_by_era(self, era: str) -> Optional[NodeState]:
        """The node whose current era is ``era``, if any."""
        for node in self.nodes.values():
            if node.era == era:
                return node
        return None

    def holders(self, dataset_id: str) -> list[str]:
        """The nodes that report holding ``dataset_id``."""
        return [n.uuid for n in self.nodes.values() if dataset_id in n.datasets]


@attr.s(frozen=True, auto_attribs=True)
class Tombstone:
    """A deleted dataset not yet purged: the view ``version`` in which it was first seen
    deleted, and when (``seen``, seconds)."""

    version: int
    seen: float


def purgeable(tombstones: Mapping[str, Tombstone], live: Iterable[NodeState],
              acks: Mapping[str, int], now: float, deadline: float) -> list[str]:
    """
    The deleted datasets that may be purged at ``now`` (pure). A live node holds one back
    while it reports holding it, or while it has not acknowledged (``acks``: the latest
    view version each node stored) a view showing it deleted; but not once ``deadline``
    seconds have passed since the deletion was seen: a node that never acknowledges, or
    keeps reporting a deleted dataset, cannot keep it from being purged for ever.
    """
    live = list(live)
    result = []
    for dataset_id, tombstone in tombstones.items():
        if now - tombstone.seen < deadline and any(
                dataset_id in node.datasets or acks.get(node.uuid, -1) < tombstone.version
                for node in live):
            continue
        result.append(dataset_id)
    return result


class ClusterStateService:
    """
    Holds the cluster state; ``version`` changes with every update of what nodes hold,
    not when a heartbeat merely refreshes a node's ``last_seen``.
    """

    def __init__(self, reactor, node_expiry: float = DEFAULT_NODE_EXPIRY,
                 forget_after: float = DEFAULT_FORGET_DEAD_NODES):
        self._reactor = reactor
        self.node_expiry = node_expiry
        self.forget_after = forget_after
        self.state = ClusterState()
        self.version = 0
        self._sweep: Optional[LoopingCall] = None
        self._forget_listeners: list[Callable[[str], None]] = []

    def on_forget(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(uuid)`` whenever a node is forgotten."""
        self._forget_listeners.append(listener)

    def update(self, state: ClusterState) -> None:
        """Replace the whole cluster state."""
        self.state = state
        self.version += 1

    def seen(self, uuid: str, now: float) -> None:
        """Record that node ``uuid`` was heard from at ``now`` (``version`` stays)."""
        node = self.state.nodes.get(uuid)
        if node is not None:
            self.state = self.state.update_node(node.set(last_seen=now))

    def wipe(self, uuid: str) -> None:
        """Forget what node ``uuid`` reported holding (it died); the node stays, dead."""
        node = self.state.nodes.get(uuid)
        if node is not None and node.datasets:
            self.update(self.state.update_node(node.set(datasets={})))

    def merge_remote(self, uuid: str, node: Optional[NodeState],
                     last: Optional[NodeState] = None) -> None:
        """
        Issue 9: another replica publishes ``node`` (remote), or node ``uuid``, whose report
        vanished, is dead (None): then dead here, its datasets wiped, until an agent
        reports it again; one not known here is added dead as ``last`` (published by a
        replica: remote) describes it.
        """
        now = self._reactor.seconds()
        if node is not None:
            self.update(self.state.update_node(node.set(last_seen=now)))
            return
        known = self.state.nodes.get(uuid, last)
        if known is not None and known.remote is not None:
            self.update(self.state.update_node(known.set(
                remote=None, datasets={},
                last_seen=min(known.last_seen, now - self.node_expiry))))

    def is_alive(self, node: NodeState) -> bool:
        """Whether ``node`` has been heard from recently enough."""
        return node.alive(self._reactor.seconds(), self.node_expiry)

    def forget(self, uuid: str, config: Configuration, reason: str = "user") -> NodeState:
        """
        Forget dead node ``uuid``, which is the primary of no live dataset and holds no
        lease in ``config``; the node forgotten, or ``ForgetRefused`` saying why not.
        """
        node = self.state.nodes.get(uuid)
        if node is None:
            raise NodeUnknown(uuid)
        now = self._reactor.seconds()
        check_forgettable(node, now, self.node_expiry, config)
        return self._remove(node, now, reason)

    def forget_elsewhere(self, uuid: str) -> Optional[NodeState]:
        """
        Issue 9: another replica forgot node ``uuid``: forget it here too if it is dead
        (the node forgotten; None if unknown or alive). Its holdings are not judged again:
        that replica judged them on the shared configuration, which may be a moment ahead
        of this replica's, and a refusal here would list the node here for ever.
        """
        node = self.state.nodes.get(uuid)
        now = self._reactor.seconds()
        if node is None or node.alive(now, self.node_expiry):
            return None
        return self._remove(node, now, "replica")

    def _remove(self, node: NodeState, now: float, reason: str) -> NodeState:
        self.update(self.state.remove_nodes([node.uuid]))
        for listener in self._forget_listeners:
            listener(node.uuid)
        log_event(_log, "pyflock:control:node-forgotten", node_uuid=node.uuid,
                  host=node.host, reason=reason,
                  dead_for=round(now - node.last_seen - self.node_expiry, 3))
        return node

    def forget_dead(self, config: Configuration) -> list[NodeState]:
        """Forget every node dead longer than ``forget_after`` that holds nothing."""
        now = self._reactor.seconds()
        deadline = self.node_expiry + self.forget_after
        forgotten = []
        for node in list(self.state.nodes.values()):
            if now - node.last_seen < deadline:
                continue
            try:
                forgotten.append(self.forget(node.uuid, config, reason="dead"))
            except ForgetRefused:
                continue
        return forgotten

    def start_forgetting(self, configuration: Callable[[], Configuration],
                         leading: Callable[[], bool] = lambda: True) -> None:
        """Forget long-dead nodes (``forget_dead``) now and then until ``stop_forgetting``,
        while ``leading()`` (with replicas, only the leader does); ``configuration()`` is
        the configuration to judge their holdings by."""
        def sweep() -> None:
            if not leading():
                return
            try:
                self.forget_dead(configuration())
            except Exception as e:
                log_event(_log, "pyflock:control:node-forget-failed", LogLevel.error,
                          reason=f"{type(e).__name__}: {e}")
        self._sweep = LoopingCall(sweep)
        self._sweep.clock = self._reactor
        self._sweep.start(min(FORGET_SWEEP_INTERVAL, self.forget_after), now=False)

    def stop_forgetting(self) -> None:
        """Stop looking for dead nodes to forget."""
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        self._sweep = None
