"""
Cluster state: what the agents report they have, kept in memory and rebuilt from them.

Nothing here is durable: after a restart of the control service the agents report again.
A node that stays silent longer than the expiry is dead, and its state is wiped.
"""

from __future__ import annotations

from typing import Iterable, Optional

from pyrsistent import PClass, field, pmap_field

from pyflock.common._records import DatasetReport

#: A node silent for this long is dead (DESIGN.md).
DEFAULT_NODE_EXPIRY = 30.0


class NodeState(PClass):
    """What one node last reported (its datasets' ``DatasetReport`` by id), and when."""

    uuid = field(type=str, mandatory=True)
    host = field(type=str, mandatory=True)
    era = field(type=(str, type(None)), initial=None)
    last_seen = field(type=float, mandatory=True, factory=float)
    peer_port = field(type=(int, type(None)), initial=None)
    datasets = pmap_field(str, DatasetReport)

    def alive(self, now: float, expiry: float) -> bool:
        """Whether the node has been heard from less than ``expiry`` seconds before ``now``."""
        # Strict, so that a node is dead at the very moment its expiry timer fires.
        return now - self.last_seen < expiry


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


class ClusterStateService:
    """
    Holds the cluster state; ``version`` changes with every update of what nodes hold,
    not when a heartbeat merely refreshes a node's ``last_seen``.
    """

    def __init__(self, reactor, node_expiry: float = DEFAULT_NODE_EXPIRY):
        self._reactor = reactor
        self.node_expiry = node_expiry
        self.state = ClusterState()
        self.version = 0

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

    def is_alive(self, node: NodeState) -> bool:
        """Whether ``node`` has been heard from recently enough."""
        return node.alive(self._reactor.seconds(), self.node_expiry)
