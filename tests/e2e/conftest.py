"""
Fixtures of the end-to-end tests: a whole pyflock cluster on real dockerd.

``PyflockDockerCluster`` runs, in one short ``/tmp/pfe-XXXXXXXX`` folder, a real
``pyflock-control`` on 127.0.0.1 (free ports) and two simulated Docker hosts, ``n1`` and
``n2`` (``pyflock.common._dockerd_testing``), each with a ``pyflock-agent`` started inside
its mount namespace before its dockerd. Each agent serves the plugin at the default
``/run/docker/plugins/pyflock.sock`` (private to its node), mounts datasets inside the
node's namespace where its dockerd sees them, reconciles mount counts with its node's
dockerd socket, and keeps its data path in the node's folder; both share one loopback root
(``<workdir>/loop``), the host's "block store". ``close`` stops everything, and detaches
the loop devices backed by that root.

End-to-end tests never pass silently on a machine that cannot run them: without root,
dockerd or busybox-static they fail, saying what is missing, when ``$CI`` is set, and are
skipped with the same explanation otherwise.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
from pathlib import Path
from typing import Callable, Optional

import pytest

from pyflock.agent._backends.testing import detach_loop_devices_under
from pyflock.agent._backends._loopback import scan_loop_devices
from pyflock.agent._config import DEFAULT_SOCKET
from pyflock.agent._fs import read_mountinfo
from pyflock.agent._process_testing import agent_document, write_agent_config
from pyflock.common._dockerd_testing import (
    DockerCluster, DockerNode, NodeCleanupFailed, NodeCommand,
    docker_available, short_workdir, wait_for,
)
from pyflock.common.testing import ClusterCertificates, make_cluster_certificates
from pyflock.control._process_testing import (
    ControlProcess, free_port, read_events, script_path,
)

#: The REST API user the tests act as.
USER = "alice"

#: Size of volumes created without ``-o size``: small, so mkfs is quick.
DEFAULT_SIZE = "64M"

#: The name under which each node records its agent process (its log: logs/agent.log).
AGENT = "agent"

#: How long to wait for an agent to start or to connect to the control service.
AGENT_TIMEOUT = 30.0

#: The major device number of loop devices.
LOOP_MAJOR = 7


def require_e2e() -> None:
    """Fail (with ``$CI`` set) or skip, explaining why, unless end-to-end tests can run."""
    availability = docker_available()
    if availability:
        return
    if os.environ.get("CI"):
        pytest.fail(availability.explain(), pytrace=False)
    pytest.skip(availability.explain())


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

    def __init__(self, workdir: Path):
        self.workdir = workdir
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
                                    before_dockerd=self._agent_commands)
        self.docker.start()
        for node in self.nodes:
            self._release_inherited_loop_mounts(node)
        for node in self.nodes:
            self.wait_agent_event(node, "pyflock:agent:channel-connected")
        return self

    def _release_inherited_loop_mounts(self, node: DockerNode) -> None:
        # A new mount namespace starts as a copy of the host's, with the filesystems that
        # other work on this machine has mounted from loop devices: the copies would keep
        # those devices busy (their owners could not detach them) for as long as the node
        # lives. None of ours exists yet (no dataset does), and ours are all in workdir.
        ours = str(self.workdir) + "/"
        for mount in reversed(read_mountinfo(str(node.holder_pid))):
            if mount.major == LOOP_MAJOR and not mount.mount_point.startswith(ours):
                node.run_in_namespace(["umount", "--lazy", mount.mount_point], check=False)

    def _agent_commands(self, node: DockerNode) -> list[NodeCommand]:
        node_uuid = self.node_uuid(node)
        node.directory.mkdir(parents=True, exist_ok=True)
        config = write_agent_config(node.directory / "agent.yml", agent_document(
            control_hostname=self.control.host, control_port=self.control.agent_port,
            control_api_port=self.control.port,
            certificates=self.certificates.node_directory(node_uuid),
            data_path=node.directory / "pyflock", address=node.address,
            peer_port=free_port(node.address), root_path=self.loopback_root,
            default_size=DEFAULT_SIZE, docker_socket=node.socket))
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
        prefix = os.path.realpath(self.loopback_root) + "/"
        left = [d.device for d in scan_loop_devices() if d.backing_file.startswith(prefix)]
        if left:
            problems.append(f"loop devices still attached: {left}")
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


@pytest.fixture(scope="module")
def pyflock():
    """A control service and nodes n1 and n2 with agents and dockerd, for one module."""
    require_e2e()
    # The folder is removed afterwards unless $PYFLOCK_E2E_KEEP is set (never through
    # a mount point that cleanup failed to remove).
    with short_workdir() as workdir:
        cluster = PyflockDockerCluster(workdir)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.close()


@pytest.fixture
def nodes(pyflock):
    """n1 and n2; after the test, every container on them is removed (even on failure),
    so one test's containers never hold another test's volumes."""
    yield pyflock["n1"], pyflock["n2"]
    for node in pyflock.nodes:
        if node.dockerd_running():
            node.remove_all_containers()



@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with the last lines of each node's agent and dockerd
    logs and of the control service's log (the cluster's folder goes after the module)."""
    outcome = yield
    report = outcome.get_result()
    cluster = item.funcargs.get("pyflock") if hasattr(item, "funcargs") else None
    if report.when != "call" or not report.failed or cluster is None:
        return
    for node in cluster.nodes:
        for log in (AGENT, "dockerd"):
            report.sections.append((f"{node.name} {log} log (end)", node.log_tail(log, 25)))
    if cluster.control is not None:
        lines = cluster.control.log_path.read_text(errors="replace").splitlines()[-25:] \
            if cluster.control.log_path.exists() else []
        report.sections.append(("control service log (end)", "\n".join(lines)))
