"""
Test helpers that run real ``pyflock-agent`` processes, alone or as a whole local cluster.

``AgentProcess`` (a ``tests.harness.processes.ServiceProcess``) runs
``pyflock-agent run --config FILE`` (an existing ``agent.yml``, or one written from keyword
parameters), waits until it has started (and, if asked, until its agent channel is
welcomed), stops it with SIGTERM or SIGKILL, and reads its JSON-lines log.

``LocalCluster`` builds, in one folder, a cluster's certificates, one ``ControlProcess``
on 127.0.0.1 and N agents on 127.0.0.11, 127.0.0.12, ... sharing one loopback root (the
host's "cloud block store"); ``close()`` stops everything and cleans up, even after a test
failed half-way: it unmounts every filesystem mounted under the folder and detaches every
loop device backed by a file in the loopback root. Needs root (loop devices, mounts).

Layout of a cluster's folder::

    certs/                  the CA, control and user certificates; certs/nodes/<uuid>/
    control/                the control service's data
    logs/                   every process's stdout (JSON lines) and stderr, one pair per run
    loopback/               the shared loopback root
    n1/ n2/ ...             one folder per agent: agent.yml, data/ (data/mounts/<id>), p.sock
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import attr
import yaml

from pyflock.agent._backends._loopback import LoopbackBackend, scan_loop_devices
from tests.contracts.backends import detach_loop_devices_under
from pyflock.agent._config import AgentConfig, load_config
from pyflock.agent._fs import read_mountinfo
from pyflock.common._ca import PathLike, common_name_of, load_certificate
from pyflock.common._gates import GATES_VARIABLE
from tests.harness.processes import (
    DEFAULT_TIMEOUT, ServiceProcess, ServiceProcessExited, free_port, run_to_completion,
    script_path,
)
from tests.harness.certificates import ClusterCertificates, make_cluster_certificates
from tests.harness.control import APIClient, ControlProcess

#: How often ``CommandGates`` looks whether a gated command has arrived.
_GATE_POLL = 0.005

#: Unix socket paths longer than this do not fit in ``sockaddr_un``.
_MAX_SOCKET_PATH = 100


class AgentProcessExited(ServiceProcessExited):
    """The agent exited while it was expected to start or to keep running."""

    program = "pyflock-agent"


def agent_document(*, control_hostname: str, control_port: int, control_api_port: int,
                   certificates: PathLike, data_path: PathLike,
                   mount_root: Optional[PathLike] = None, address: Optional[str] = None,
                   peer_port: Optional[int] = None, backend: str = "loopback",
                   root_path: Optional[PathLike] = None,
                   default_size: Union[str, int, None] = None,
                   plugin_socket: Optional[PathLike] = None,
                   docker_socket: Optional[PathLike] = None,
                   pool_path: Optional[PathLike] = None,
                   pool_size: Union[str, int, None] = None,
                   peer_bandwidth: Union[str, int, None] = None,
                   mount_timeout: Optional[float] = None) -> dict:
    """An ``agent.yml`` document (a dict to dump as YAML) from typed parameters
    (``pool_path`` and ``pool_size`` for the btrfs backend)."""
    document: dict = {
        "version": 1,
        "control-service": {"hostname": control_hostname, "port": control_port,
                            "api-port": control_api_port},
        "certificates": str(certificates),
        "data-path": str(data_path),
        "dataset": {"backend": backend},
    }
    if mount_root is not None:
        document["mount-root"] = str(mount_root)
    node = {}
    if address is not None:
        node["address"] = address
    if peer_port is not None:
        node["peer-port"] = peer_port
    if peer_bandwidth is not None:
        node["peer-bandwidth"] = peer_bandwidth
    if node:
        document["node"] = node
    if root_path is not None:
        document["dataset"]["root_path"] = str(root_path)
    if pool_path is not None:
        document["dataset"]["pool_path"] = str(pool_path)
    if pool_size is not None:
        document["dataset"]["pool_size"] = pool_size
    if default_size is not None:
        document["dataset"]["default_size"] = default_size
    plugin = {}
    if plugin_socket is not None:
        plugin["socket"] = str(plugin_socket)
    if docker_socket is not None:
        plugin["docker"] = str(docker_socket)
    if mount_timeout is not None:
        plugin["mount-timeout"] = mount_timeout
    if plugin:
        document["plugin"] = plugin
    return document


def write_agent_config(path: PathLike, document: dict) -> Path:
    """Write ``document`` as YAML to ``path`` (mode 0600); the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    path.chmod(0o600)
    return path


class AgentProcess(ServiceProcess):
    """
    One ``pyflock-agent run`` process named ``name`` with the configuration file
    ``config_path``; given ``parameters`` (the keyword arguments of ``agent_document``),
    that file is written first (to ``config_path``, by default
    ``<data_path>/../agent.yml``). It runs with ``environment`` added to this process's
    environment. It may be started again after it stopped; each run writes its own log
    files in ``log_directory`` (default: the configuration file's folder). ``close``
    stops it.
    """

    program = "pyflock-agent"
    what = "agent"
    exited = AgentProcessExited

    def __init__(self, config_path: Optional[PathLike] = None, *,
                 log_directory: Optional[PathLike] = None, name: Optional[str] = None,
                 environment: Optional[dict] = None, **parameters):
        if parameters:
            if config_path is None:
                config_path = Path(parameters["data_path"]).parent / "agent.yml"
            write_agent_config(config_path, agent_document(**parameters))
        elif config_path is None:
            raise TypeError("give the path of an agent.yml, or the parameters to write one")
        self.config_path = Path(config_path)
        self._config: Optional[AgentConfig] = None
        self._node_uuid: Optional[str] = None
        super().__init__(name or f"agent-{os.getpid()}-{id(self):x}",
                         log_directory if log_directory is not None
                         else self.config_path.parent, environment)

    # -- what ---------------------------------------------------------------------------

    @property
    def config(self) -> AgentConfig:
        """The validated configuration file (read once)."""
        if self._config is None:
            self._config = load_config(str(self.config_path))
        return self._config

    @property
    def node_uuid(self) -> str:
        """The node's uuid, from its certificate ``node.crt``."""
        if self._node_uuid is None:
            name = common_name_of(load_certificate(
                os.path.join(self.config.certificates, "node.crt"))) or ""
            self._node_uuid = name[len("node-"):]
        return self._node_uuid

    @property
    def mount_root(self) -> Path:
        """Where this agent mounts datasets."""
        return Path(os.path.realpath(self.config.mount_root))

    def mount_point(self, dataset_id: str) -> Path:
        """Where this agent mounts ``dataset_id``."""
        return self.mount_root / dataset_id

    def era(self, timeout: float = DEFAULT_TIMEOUT) -> subprocess.CompletedProcess:
        """Run ``pyflock-agent era`` with this configuration; blocks."""
        return run_to_completion(
            [script_path("pyflock-agent"), "era", "--config", str(self.config_path)], timeout)

    def arguments(self) -> list[str]:
        """The command line of ``run``."""
        return [script_path("pyflock-agent"), "run", "--config", str(self.config_path)]

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = DEFAULT_TIMEOUT, connected: bool = True) -> dict:
        """
        Start the agent and wait until it has started (it logs ``pyflock:agent:started``
        once its plugin socket listens) and, if ``connected``, until the control service
        has welcomed it (``pyflock:agent:channel-connected``); return that last event.
        Raises ``AgentProcessExited`` if it exits first.
        """
        return self._start(["pyflock:agent:started"]
                           + (["pyflock:agent:channel-connected"] if connected else []),
                           timeout)

    def close(self, timeout: float = 10.0) -> None:
        """
        Stop the process if it still runs, with SIGTERM, or SIGKILL after ``timeout``
        (a finalizer: safe to call at any time).
        """
        if self.running:
            try:
                self.stop(timeout)
            except TimeoutError:
                pass


@attr.s(frozen=True, auto_attribs=True)
class Holders:
    """
    Who holds one dataset's volume at one moment: the loop devices backed by its image
    file, the node its attachment record names (None: no record), and the nodes that have
    it mounted at their mount point.
    """

    devices: tuple
    recorded_node: Optional[str]
    mounted_on: frozenset


_GATE_SCRIPT = """#!/bin/sh
# A pyflock test gate (tests.harness.agents.CommandGates): while the FIFO
# $PYFLOCK_TEST_GATES/{name} exists, stop before running {real} and wait to be let through.
gate="$PYFLOCK_TEST_GATES/{name}"
if [ -n "$PYFLOCK_TEST_GATES" ] && [ -p "$gate" ]; then
    echo $$ > "$gate.pid.tmp" && mv "$gate.pid.tmp" "$gate.pid"
    read _ < "$gate"
fi
exec {real} "$@"
"""


class CommandGates:
    """
    Stop an agent half-way through an operation, to kill it there: wrappers, in
    ``<folder>/bin``, of the ``commands`` the agent runs (none by default) that, while a
    gate is closed, stop just before running the real command, say so and wait to be let
    through; and the gates inside pyflock (``pyflock.common._gates``: ``loop-attach``
    just before a loop device is bound, ``loop-attached`` just after, ``unmounted`` just
    after an unmount), which stop the agent itself the same way. Give an agent
    ``environment(name)`` (its ``PATH`` and gate folder), then
    ``close(name, command)``, make it act, ``wait_reached``, kill the agent, and
    ``release`` (a wrapped command then runs, after the agent died) or ``kill`` (it never
    runs). Gates that are open cost one ``sh`` per wrapped command.
    """

    def __init__(self, folder: PathLike, commands: Sequence[str] = ()):
        self.folder = Path(folder)
        self._bin = self.folder / "bin"
        self._bin.mkdir(parents=True, exist_ok=True)
        for command in commands:
            real = shutil.which(command)
            if real is None:
                raise FileNotFoundError(f"{command} is not installed")
            script = self._bin / command
            script.write_text(_GATE_SCRIPT.format(
                name=command, real=real))
            script.chmod(0o755)

    def _gate(self, name: str, command: str) -> Path:
        return self.folder / "gates" / name / command

    def environment(self, name: str) -> dict:
        """The environment variables that put agent ``name`` behind these gates."""
        (self.folder / "gates" / name).mkdir(parents=True, exist_ok=True)
        return {"PATH": f"{self._bin}:{os.environ.get('PATH', os.defpath)}",
                GATES_VARIABLE: str(self.folder / "gates" / name)}

    def close(self, name: str, command: str) -> None:
        """From now on, agent ``name``'s next ``command`` stops at the gate."""
        gate = self._gate(name, command)
        self._remove(gate)
        os.mkfifo(gate, 0o600)

    def reached(self, name: str, command: str) -> Optional[int]:
        """The pid of agent ``name``'s ``command`` waiting at the gate, or None (not yet)."""
        try:
            return int(Path(f"{self._gate(name, command)}.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def wait_reached(self, name: str, command: str, timeout: float = DEFAULT_TIMEOUT
                     ) -> int:
        """Block until agent ``name``'s ``command`` waits at the gate; its pid."""
        deadline = time.monotonic() + timeout
        while True:
            pid = self.reached(name, command)
            if pid is not None:
                return pid
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}'s {command} did not reach its gate "
                                   f"within {timeout} s")
            time.sleep(_GATE_POLL)

    def release(self, name: str, command: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Open the gate: the waiting command (if any) runs, and the next ones too."""
        gate = self._gate(name, command)
        if self.reached(name, command) is not None:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    # Non-blocking, so a waiter that died meanwhile cannot hang us.
                    fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(_GATE_POLL)
                    continue
                try:
                    os.write(fd, b"go\n")
                finally:
                    os.close(fd)
                break
        self._remove(gate)

    def kill(self, name: str, command: str) -> None:
        """Kill the command waiting at the gate (it never runs) and open the gate."""
        pid = self.reached(name, command)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._remove(self._gate(name, command))

    def _remove(self, gate: Path) -> None:
        for path in (gate, Path(f"{gate}.pid")):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def release_all(self) -> None:
        """Open every gate, letting every waiting command run (a finalizer)."""
        gates = self.folder / "gates"
        if gates.exists():
            for folder in gates.iterdir():
                for gate in folder.iterdir():
                    if gate.is_fifo():
                        self.release(folder.name, gate.name, timeout=1.0)


def mounts_under(path: PathLike) -> list:
    """The mounts (``MountInfo``) at or below ``path`` in this mount namespace."""
    return read_mountinfo(under=os.path.realpath(path))


def loop_devices_under(path: PathLike) -> list:
    """The loop devices (``LoopDevice``) backed by a file below ``path``."""
    return scan_loop_devices(os.path.realpath(path) + "/")


def unmount_all_under(path: PathLike) -> list[str]:
    """
    Unmount every filesystem mounted at or below ``path``, innermost and latest first,
    for as long as each attempt removes its mount; the problems met (a busy mount is
    unmounted lazily, and reported; one that stays ends the attempts).
    """
    problems = []
    tried = None
    while mounts := mounts_under(path):
        # mountinfo lists mounts in the order they were made: undo them in reverse.
        mount = mounts[-1]
        if mount.mount_id == tried:
            problems.append(f"{mount.mount_point} stays mounted, even lazily unmounted; "
                            f"still under {path}: {[m.mount_point for m in mounts]}")
            break
        tried = mount.mount_id
        done = subprocess.run(["umount", mount.mount_point], capture_output=True, text=True)
        if done.returncode != 0:
            problems.append(f"umount {mount.mount_point}: {done.stderr.strip()}; "
                            f"unmounted lazily")
            subprocess.run(["umount", "-l", mount.mount_point], capture_output=True)
    return problems


class LocalCluster:
    """
    A whole cluster on this host in the folder ``path`` (made if missing; by default a new
    temporary folder, removed by ``close``): certificates for ``nodes`` nodes and
    ``users``, a ``ControlProcess`` on ``control_host`` (its REST API and agent channel on
    free ports), and one ``AgentProcess`` per node on ``127.0.0.<first_address + i>``,
    all with the loopback backend over ``<path>/loopback`` and datasets of
    ``default_size`` unless told otherwise. ``agent_options`` are extra keyword
    parameters of ``agent_document`` for every agent, ``control_arguments`` extra
    ``pyflock-control run`` arguments. With ``gated_commands`` (a sequence, perhaps
    empty), every agent runs behind ``gates`` (a ``CommandGates`` wrapping those commands,
    and holding pyflock's own gates; agents are named n1, n2, ...).
    With ``btrfs_pool_size``, every agent runs the btrfs backend on a pool of its own, a
    file ``n<i>/pool.img`` of that size. Nothing runs until ``start``.
    """

    def __init__(self, path: Optional[PathLike] = None, nodes: int = 3, *,
                 users: Sequence[str] = ("alice",), control_host: str = "127.0.0.1",
                 first_address: int = 11, default_size: Union[str, int] = "64M",
                 control_arguments: Sequence[str] = (),
                 agent_options: Optional[dict] = None,
                 gated_commands: Optional[Sequence[str]] = None,
                 btrfs_pool_size: Union[str, int, None] = None):
        if os.geteuid() != 0:
            raise PermissionError("a LocalCluster needs root: loop devices and mounts")
        self._own_folder = path is None
        self.path = Path(tempfile.mkdtemp(prefix="pf-cluster-") if path is None else path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.loopback_root = self.path / "loopback"
        self.log_directory = self.path / "logs"
        self.agents: list[AgentProcess] = []
        self.control: Optional[ControlProcess] = None
        self.gates: Optional[CommandGates] = None
        self._socket_folder: Optional[Path] = None
        try:
            if gated_commands is not None:
                self.gates = CommandGates(self.path / "gates", gated_commands)
            agent_options = dict(agent_options or {})
            if btrfs_pool_size is not None:
                agent_options.update(backend="btrfs", root_path=None,
                                     pool_size=btrfs_pool_size)
            self._build(nodes, users, control_host, first_address, default_size,
                        control_arguments, agent_options)
        except BaseException:
            self.close()
            raise

    def _build(self, nodes, users, control_host, first_address, default_size,
               control_arguments, agent_options) -> None:
        (self.path / "certs").mkdir(exist_ok=True)
        self.loopback_root.mkdir(exist_ok=True)
        self.certificates: ClusterCertificates = make_cluster_certificates(
            self.path / "certs", nodes=nodes, users=users, control_host=control_host)
        self.control = self._make_control(control_host, control_arguments)
        for i, node_uuid in enumerate(self.certificates.node_uuids):
            name = f"n{i + 1}"
            folder = self.path / name
            folder.mkdir(exist_ok=True)
            address = f"127.0.0.{first_address + i}"
            parameters = dict(
                self._control_parameters(),
                certificates=self.certificates.node_directory(node_uuid),
                data_path=folder / "data", address=address, peer_port=free_port(address),
                root_path=self.loopback_root, default_size=default_size,
                plugin_socket=self._socket_path(folder, name, "p.sock"),
                docker_socket=folder / "docker.sock")
            parameters.update(agent_options)
            if parameters.get("backend") == "btrfs":
                parameters["pool_path"] = folder / "pool.img"
            environment = {} if self.gates is None else self.gates.environment(name)
            self.agents.append(AgentProcess(folder / "agent.yml", name=name,
                                            log_directory=self.log_directory,
                                            environment=environment, **parameters))

    def _make_control(self, control_host, control_arguments) -> ControlProcess:
        """The control service process (``ReplicatedCluster`` makes several)."""
        return ControlProcess(self.path / "control", self.certificates.path,
                              host=control_host, log_directory=self.log_directory,
                              extra_arguments=control_arguments)

    def _control_parameters(self) -> dict:
        """Where agents find the control service (``agent_document``'s parameters)."""
        return dict(control_hostname=self.control.host, control_port=self.control.agent_port,
                    control_api_port=self.control.port)

    def _socket_path(self, folder: Path, name: str, base: str) -> Path:
        path = folder / base
        if len(str(path)) <= _MAX_SOCKET_PATH:
            return path
        if self._socket_folder is None:
            self._socket_folder = Path(tempfile.mkdtemp(prefix="pf-"))
        return self._socket_folder / f"{name}-{base}"

    # -- who ----------------------------------------------------------------------------

    @property
    def node_uuids(self) -> tuple[str, ...]:
        """The nodes' uuids, in the order of ``agents``."""
        return self.certificates.node_uuids

    def agent(self, node: Union[int, str]) -> AgentProcess:
        """The agent of a node, by index in ``agents`` or by uuid."""
        if isinstance(node, int):
            return self.agents[node]
        return self.agents[self.node_uuids.index(node)]

    def api_client(self, reactor, user: str = "alice", **kwargs) -> APIClient:
        """A REST API client presenting ``user``'s certificate, or a node's (its uuid)."""
        if user in self.node_uuids:
            return APIClient(reactor, self.control.url,
                             self.certificates.node_directory(user), "node", **kwargs)
        return APIClient(reactor, self.control.url, self.certificates.path, user, **kwargs)

    def cli_arguments(self, user: str = "alice") -> list[str]:
        """The ``pyflock`` command line up to the subcommand, for this cluster."""
        return [script_path("pyflock"), "--control-service", self.control.host,
                "--control-port", str(self.control.port),
                "--certs-path", str(self.certificates.path), "--user", user]

    def run_cli(self, *arguments: str, user: str = "alice", timeout: float = DEFAULT_TIMEOUT
                ) -> subprocess.CompletedProcess:
        """Run ``pyflock ARGUMENTS...`` against this cluster; blocks."""
        return run_to_completion(self.cli_arguments(user) + list(arguments), timeout)

    # -- what the host holds ------------------------------------------------------------

    def image_path(self, dataset_id: str) -> Path:
        """The loopback image file of ``dataset_id``."""
        return self.loopback_root / "volumes" / f"{dataset_id}.img"

    def record_path(self, dataset_id: str) -> Path:
        """The attachment record of ``dataset_id`` in the shared root."""
        return self.loopback_root / "attachments" / f"{dataset_id}.json"

    def backend_snapshot(self):
        """The loopback root and the host's loop devices, read at one moment under its lock."""
        return LoopbackBackend(str(self.loopback_root), self.node_uuids[0]).snapshot()

    def loop_devices(self, dataset_id: str) -> list[str]:
        """The loop devices backed by ``dataset_id``'s image file (as ``losetup -j``)."""
        image = os.path.realpath(self.image_path(dataset_id))
        return [d.device for d in scan_loop_devices() if d.backing_file == image]

    def mounted_on(self, dataset_id: str) -> dict[str, object]:
        """The nodes that have ``dataset_id`` mounted at their mount point: uuid -> MountInfo."""
        mounts = {m.mount_point: m for m in read_mountinfo()}
        found = {}
        for agent in self.agents:
            mount = mounts.get(str(agent.mount_point(dataset_id)))
            if mount is not None:
                found[agent.node_uuid] = mount
        return found

    @contextlib.contextmanager
    def backend_locked(self) -> Iterator[None]:
        """
        Hold the loopback root's lock shared: no agent attaches or detaches meanwhile, so
        what is read inside is one consistent moment of the shared block store.
        """
        self.loopback_root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.loopback_root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def holders(self, dataset_id: str) -> Holders:
        """Who holds ``dataset_id``'s volume (``Holders``), read at one moment."""
        with self.backend_locked():
            snapshot = LoopbackBackend(str(self.loopback_root),
                                       self.node_uuids[0]).snapshot()
            # Mounts change outside the lock, but only the recorded node may mount an
            # attached device, so even a read spread over time sees no other node's mount.
            mounts = {m.mount_point for m in read_mountinfo()}
        record = snapshot.records.get(dataset_id)
        return Holders(
            devices=tuple(d.device for d in snapshot.devices_of(dataset_id)),
            recorded_node=None if record is None else record.node_uuid,
            mounted_on=frozenset(a.node_uuid for a in self.agents
                                 if str(a.mount_point(dataset_id)) in mounts))

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> "LocalCluster":
        """Start the control service, then every agent, and wait until all are connected."""
        if not self.control.running:
            self.control.start(timeout)
        for agent in self.agents:
            if not agent.running:
                agent.spawn()
        for agent in self.agents:
            agent.wait_for_event_sync("pyflock:agent:channel-connected", timeout=timeout)
        return self

    def close(self) -> None:
        """
        Stop every process, unmount everything under the folder and detach every loop
        device backed by a file in the loopback root (a finalizer: safe to call at any
        time, even half-built); raise ``AssertionError`` listing what could not be
        cleaned up, after trying everything.
        """
        problems = []
        if self.gates is not None:
            # An agent waiting at a gate could not stop cleanly.
            try:
                self.gates.release_all()
            except Exception as e:
                problems.append(f"opening the command gates: {e!r}")
        for agent in self.agents:
            try:
                agent.close()
            except Exception as e:
                problems.append(f"stopping {agent.config_path}: {e!r}")
        if self.control is not None:
            try:
                self.control.close()
            except Exception as e:
                problems.append(f"stopping the control service: {e!r}")
        try:
            problems += unmount_all_under(self.path)
        except Exception as e:
            problems.append(f"unmounting under {self.path}: {e!r}")
        if self.path.exists():
            try:
                # The loopback root's volumes, and the agents' btrfs pools.
                detach_loop_devices_under(str(self.path))
            except Exception as e:
                problems.append(str(e))
        if self._socket_folder is not None:
            shutil.rmtree(self._socket_folder, ignore_errors=True)
            self._socket_folder = None
        if self._own_folder and not problems:
            shutil.rmtree(self.path, ignore_errors=True)
        if problems:
            raise AssertionError("cleaning up the local cluster: " + "; ".join(problems))

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


__all__ = ["AgentProcess", "AgentProcessExited", "CommandGates", "DEFAULT_TIMEOUT", "Holders",
           "LocalCluster", "agent_document", "loop_devices_under", "mounts_under",
           "unmount_all_under", "write_agent_config"]
