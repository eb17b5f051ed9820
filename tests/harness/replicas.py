"""
A local cluster whose control service is several ``pyflock-control`` replicas on one etcd
prefix (issue 9): ``ReplicatedCluster(etcd_endpoints)`` is a ``LocalCluster`` (agents with
the loopback backend, certificates, clean-up) with ``replicas`` control processes, each on
its own 127.0.0.x address with the same REST and agent-channel ports, so that the agents'
``agent.yml`` lists every replica's address under one port, as a real deployment would. The
control certificate names every replica. Every agent starts on the first replica.
``replicas_on_etcd(root, endpoints)`` makes bare replicas without agents: a cluster's
certificates in ``root`` and one ``ControlProcess`` per entry of ``endpoints`` (the etcd
client URLs that replica is given), on one fresh prefix and one 127.0.0.x address, each
named ``replica<n>`` (``--replica-name``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence
from uuid import uuid4

from pyflock.common._client import ControlClient
from pyflock.common._tls import treq_client
from tests.harness.agents import LocalCluster
from tests.harness.certificates import make_cluster_certificates
from tests.harness.control import APIClient, ControlProcess, free_address
from tests.harness.processes import DEFAULT_TIMEOUT, free_port


class ReplicatedCluster(LocalCluster):
    """
    ``nodes`` agents and ``replicas`` control service replicas on etcd (``etcd_endpoints``,
    a fresh prefix); the agents list every replica. ``replicas`` are the processes; the
    inherited ``control`` is the first of them.
    """

    def __init__(self, etcd_endpoints: Sequence[str], path=None, nodes: int = 2, *,
                 replicas: int = 3, control_arguments: Sequence[str] = (), **kwargs):
        self.replica_hosts = [f"127.0.0.{n}" for n in random.sample(range(200, 250),
                                                                     replicas)]
        self.prefix = f"/ha-{uuid4().hex[:8]}/"
        self._etcd = ",".join(etcd_endpoints)
        self.replicas: list[ControlProcess] = []
        super().__init__(path, nodes, control_host=self.replica_hosts,
                         control_arguments=control_arguments, **kwargs)

    def _make_control(self, control_host, control_arguments) -> ControlProcess:
        port, agent_port = free_port(control_host[0]), free_port(control_host[0])
        self.replicas = [
            ControlProcess(self.path / f"control{n}", self.certificates.path, host=host,
                           port=port, agent_port=agent_port, log_directory=self.log_directory,
                           extra_arguments=["--store", "etcd", "--etcd-endpoints", self._etcd,
                                            "--etcd-prefix", self.prefix,
                                            "--replica-name", f"r{n}",
                                            *control_arguments])
            for n, host in enumerate(control_host)]
        return self.replicas[0]

    def _control_parameters(self) -> dict:
        return dict(control_hostname=list(self.replica_hosts),
                    control_port=self.control.agent_port, control_api_port=self.control.port)

    def replica_of(self, host: str) -> ControlProcess:
        """The replica listening on ``host``."""
        return self.replicas[self.replica_hosts.index(host)]

    def api_client(self, reactor, user: str = "alice", replica: int = 0,
                   **kwargs) -> APIClient:
        """The harness's REST client of one replica, presenting ``user``'s certificate."""
        return APIClient(reactor, self.replicas[replica].url, self.certificates.path, user,
                         **kwargs)

    def control_client(self, reactor, first: int = 0, user: str = "alice",
                       timeout: float = 5.0, pool=None) -> ControlClient:
        """pyflock's own REST client of every replica, trying replica ``first`` first."""
        urls = [p.url for p in self.replicas]
        return ControlClient(treq_client(reactor, self.certificates.path, user, pool=pool),
                             urls[first:] + urls[:first], reactor=reactor, timeout=timeout)

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> "ReplicatedCluster":
        """Start the first replica, the agents (so that all of them use that replica:
        the others refuse them yet), then the other replicas."""
        super().start(timeout)
        for replica in self.replicas[1:]:
            if not replica.running:
                replica.start(timeout)
        return self

    def close(self) -> None:
        """Stop the replicas beyond the first, then everything ``LocalCluster`` stops."""
        problems: list[str] = []
        for replica in self.replicas[1:]:
            try:
                replica.close()
            except Exception as e:
                problems.append(f"stopping replica {replica.host}: {e!r}")
        try:
            super().close()
        except AssertionError as e:
            problems.append(str(e))
        if problems:
            raise AssertionError("; ".join(problems))

    def connected_replica(self, agent: int, after: int = 0,
                          timeout: float = DEFAULT_TIMEOUT) -> ControlProcess:
        """The replica that welcomed an agent's ``after``-th connection of this run."""
        event = self.agents[agent].wait_for_event_sync(
            "pyflock:agent:channel-connected", timeout=timeout, after=after)
        return self.replica_of(event["replica"].rsplit(":", 1)[0])


def replicas_on_etcd(root: Path, endpoints: Sequence[str], extra_arguments: Sequence[str] = (),
                     **options) -> tuple:
    """
    (the cluster's certificates, the prefix, the replicas, not started): replica ``n``
    talks to the etcd members ``endpoints[n]`` (``URL[,URL...]``); ``extra_arguments``
    and ``options`` (``ControlProcess``'s) go to every replica.
    """
    folder = root / "certs"
    folder.mkdir()
    host, _ = free_address()
    cluster = make_cluster_certificates(folder, nodes=1, users=("alice",), control_host=host)
    prefix = f"/replicas-{uuid4().hex[:8]}/"
    processes = [ControlProcess(root / f"data{n}", folder, host=host,
                                log_directory=root / "logs", extra_arguments=[
                                    "--store", "etcd", "--etcd-endpoints", members,
                                    "--etcd-prefix", prefix, "--replica-name", f"replica{n}",
                                    *extra_arguments], **options)
                 for n, members in enumerate(endpoints)]
    return cluster, prefix, processes


__all__ = ["ReplicatedCluster", "replicas_on_etcd"]
