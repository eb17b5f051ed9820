"""
A whole pyflock cluster on real dockerd, for end-to-end tests and benchmarks.

``PyflockDockerCluster`` runs, in one short ``/tmp/pfe-XXXXXXXX`` folder, a real
``pyflock-control`` on 127.0.0.1 (free ports) and two simulated Docker hosts, ``n1`` and
``n2`` (``tests.harness.dockerd``), each with a ``pyflock-agent`` started inside
its mount namespace before its dockerd. Each agent serves the plugin at the default
``/run/docker/plugins/pyflock.sock`` (private to its node), mounts datasets inside the
node's namespace where its dockerd sees them, reconciles mount counts with its node's
dockerd socket, and keeps its data path in the node's folder; both share one loopback root
(``<workdir>/loop``), the host's "block store". ``close`` stops everything, and detaches
the loop devices backed by that root. ``RestClient`` makes blocking REST API calls for
assertions. Needs root, dockerd and busybox-static (``docker_available``).
"""

from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path
from typing import Callable, Optional

from tests.contracts.backends import detach_loop_devices_under
from pyflock.agent._config import DEFAULT_SOCKET
from tests.harness.agents import agent_document, write_agent_config
from tests.harness.dockerd import (
    DEFAULT_STORAGE_DRIVER, DockerCluster, DockerNode, NodeCleanupFailed, NodeCommand, wait_for,
)
from tests.harness.processes import free_port, read_events, script_path
from tests.harness.certificates import ClusterCertificates, make_cluster_certificates
from tests.harness.control import ControlProcess

#: The REST API user the cluster's ``RestClient`` acts as.
USER = "alice"

#: Size of volumes created without ``-o size``: small, so mkfs is quick.
DEFAULT_SIZE = "64M"

#: The name under which each node records its agent process (its log: logs/agent.log).
AGENT = "agent"

#: How long to wait for an agent to start or to connect to the control service.
AGENT_TIMEOUT = 30.0


class RestClient:
    """Blocking REST API calls over mutual TLS, as user ``USER`` (for assertions only)."""

    def __init__(self, host: str, port: int, certificates: ClusterCertificates,
                 user: str = USER):
        self.host, self.port = host, port
        self._context = ssl.create_default_context(
            cafile=str(certificates.path / "cluster.crt"))
        self._context.load_cert_chain(str(certificates.path / f"{user}.crt"),
                                      str(certificates.path / f"{user}.key"))

    def request(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        """One request; ``(status, parsed JSON body)``."""
        connection = http.client.HTTPSConnection(self.host, self.port, timeout=30,
                                                 context=self._context)
        try:
            payload = None if body is None else json.dumps(body).encode()
            connection.request(method, path, body=payload,
                               headers={"content-type": "application/json"})
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def get(self, path: str) -> object:
        """GET ``path``, which must answer 200; its JSON."""
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path} answered {status}: {body}"
        return body


class PyflockDockerCluster:
    """
    A control service and two Docker hosts running pyflock agents (see the module's
    docstring); ``start`` brings it up, ``close`` takes it down and checks nothing is left.
    """

    names = ("n1", "n2")

    def __init__(self, workdir: Path, storage_driver: str = DEFAULT_STORAGE_DRIVER,
                 default_size: str = DEFAULT_SIZE, *,
                 btrfs_pool_size: Optional[str] = None,
                 agent_options: Optional[dict] = None):
        self.workdir = workdir
        self.storage_driver, self.default_size = storage_driver, default_size
        #: With a pool size, each agent runs the btrfs backend on a pool file of its own
        #: (``loop/<node>-pool.img``); ``agent_options`` are more ``agent_document``
        #: parameters for every agent.
        self.btrfs_pool_size = btrfs_pool_size
        self.agent_options = dict(agent_options or {})
        self.loopback_root = workdir / "loop"
        self.logs = workdir / "logs"
        self.certificates: Optional[ClusterCertificates] = None
        self.control: Optional[ControlProcess] = None
        self.docker: Optional[DockerCluster] = None
        self.rest: Optional[RestClient] = None

    # -- life cycle

    def start(self) -> "PyflockDockerCluster":
        """Certificates, control service, then both nodes (agents before dockerd), in
        parallel; return once both agents are connected to the control service."""
        (self.workdir / "certs").mkdir()
        self.loopback_root.mkdir()
        self.certificates = make_cluster_certificates(
            self.workdir / "certs", nodes=len(self.names), users=(USER,),
            control_host="127.0.0.1")
        self.control = ControlProcess(self.workdir / "control", self.certificates.path,
                                      host="127.0.0.1", log_directory=self.logs)
        self.control.start()
        self.rest = RestClient(self.control.host, self.control.port, self.certificates)
        self.docker = DockerCluster(self.names, workdir=self.workdir,
                                    before_dockerd=self._agent_commands,
                                    storage_driver=self.storage_driver)
        self.docker.start()
        for node in self.nodes:
            self.wait_agent_event(node, "pyflock:agent:channel-connected")
        return self

    def _agent_commands(self, node: DockerNode) -> list[NodeCommand]:
        node_uuid = self.node_uuid(node)
        node.directory.mkdir(parents=True, exist_ok=True)
        parameters = dict(
            control_hostname=self.control.host, control_port=self.control.agent_port,
            control_api_port=self.control.port,
            certificates=self.certificates.node_directory(node_uuid),
            data_path=node.directory / "pyflock", address=node.address,
            peer_port=free_port(node.address), root_path=self.loopback_root,
            default_size=self.default_size, docker_socket=node.socket)
        if self.btrfs_pool_size is not None:
            # In the loopback root, whose loop devices ``close`` detaches.
            parameters.update(backend="btrfs", root_path=None,
                              pool_path=self.loopback_root / f"{node.name}-pool.img",
                              pool_size=self.btrfs_pool_size)
        parameters.update(self.agent_options)
        config = write_agent_config(node.directory / "agent.yml", agent_document(**parameters))
        return [NodeCommand(AGENT, [script_path("pyflock-agent"), "run", "--config", config],
                            ready_path=DEFAULT_SOCKET)]

    def close(self) -> None:
        """Stop the nodes (containers, dockerd, agents, mounts), the control service, and
        detach the loopback root's loop devices; raise listing anything left behind."""
        problems = []
        if self.docker is not None:
            try:
                self.docker.close()
            except NodeCleanupFailed as e:
                problems.append(str(e))
        if self.control is not None:
            self.control.close()
        if self.loopback_root.exists():
            try:
                detach_loop_devices_under(str(self.loopback_root))
            except Exception as e:
                problems.append(str(e))
        if problems:
            raise AssertionError("cleaning up the e2e cluster:\n" + "\n".join(problems))

    # -- who and where

    @property
    def nodes(self) -> list[DockerNode]:
        """The Docker hosts, n1 then n2."""
        return list(self.docker)

    def __getitem__(self, name: str) -> DockerNode:
        return self.docker[name]

    def node_uuid(self, node: DockerNode) -> str:
        """The uuid of ``node``'s agent (from its certificate)."""
        return self.certificates.node_uuids[self.names.index(node.name)]

    def mount_point(self, node: DockerNode, dataset_id: str) -> str:
        """Where ``node``'s agent mounts ``dataset_id`` (inside the node's namespace)."""
        return str(node.directory / "pyflock" / "mounts" / dataset_id)

    def mounted_on(self, node: DockerNode, dataset_id: str) -> bool:
        """Whether ``dataset_id`` is mounted in ``node``'s namespace."""
        return self.mount_point(node, dataset_id) in node.namespace_mounts()

    # -- the agents' logs

    def agent_events(self, node: DockerNode, event_type: Optional[str] = None) -> list[dict]:
        """Every event ``node``'s agent has logged (all its runs), oldest first."""
        return read_events(node.logs / f"{AGENT}.log", event_type)

    def wait_agent_event(self, node: DockerNode, event_type: str,
                         where: Callable[[dict], bool] = lambda event: True,
                         after: int = 0, timeout: float = AGENT_TIMEOUT) -> dict:
        """The first event of ``event_type`` (past the first ``after`` of them) for which
        ``where`` is true, waiting for it."""
        def found():
            matching = [e for e in self.agent_events(node, event_type)[after:] if where(e)]
            return matching[0] if matching else None
        return wait_for(found, timeout, f"{event_type} from {node.name}'s agent")

    def restart_agent(self, node: DockerNode) -> None:
        """Stop ``node``'s agent (SIGTERM), start it again, and wait until it is connected."""
        connected = len(self.agent_events(node, "pyflock:agent:channel-connected"))
        node.restart_process(AGENT)
        self.wait_agent_event(node, "pyflock:agent:channel-connected", after=connected)

    # -- the cluster, through the REST API

    def dataset(self, name: str) -> Optional[dict]:
        """The live dataset configured with ``metadata.name`` ``name``, if any."""
        found = [d for d in self.rest.get("/v1/configuration/datasets")
                 if d["metadata"].get("name") == name and not d["deleted"]]
        assert len(found) <= 1, found
        return found[0] if found else None

    def lease_holder(self, dataset_id: str) -> Optional[str]:
        """The node holding ``dataset_id``'s lease, or None."""
        for lease in self.rest.get("/v1/configuration/leases"):
            if lease["dataset_id"] == dataset_id:
                return lease["node_uuid"]
        return None

    def state(self, dataset_id: str) -> dict[str, str]:
        """``dataset_id``'s state by node uuid, as the agents report it."""
        return {s["primary"]: s["state"] for s in self.rest.get("/v1/state/datasets")
                if s["dataset_id"] == dataset_id}


__all__ = ["AGENT", "AGENT_TIMEOUT", "DEFAULT_SIZE", "PyflockDockerCluster", "RestClient",
           "USER"]
