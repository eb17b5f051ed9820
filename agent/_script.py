"""
``pyflock-agent``: the node agent, one per Docker host.

    pyflock-agent [run] --config /etc/pyflock/agent.yml
    pyflock-agent era --config /etc/pyflock/agent.yml
    pyflock-agent join --control-service HOST[:JOINPORT] --token TOKEN [--config FILE]

It loads its stored view of the cluster, starts converging from it at once, connects to
the control service's agent channel, and serves the Docker plugin socket. Stopping it
leaves every dataset mounted: containers keep running.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import socket
import sys
from typing import Optional, Sequence

import treq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError
from twisted.logger import Logger, LogLevel
from twisted.web.client import Agent, ResponseFailed, ResponseNeverReceived

from pyflock.agent._backends import BackendError, IPeerBackend, LoopbackBackend
from pyflock.agent._channel import AgentChannel, control_endpoint
from pyflock.agent._config import AgentConfig, ConfigError, boot_id, compute_era, load_config
from pyflock.agent._loop import node_convergence_loop
from pyflock.agent._peer_runner import PeerTransfers, peer_convergence_loop
from pyflock.agent._peer_service import TransferSettings
from pyflock.agent._fs import prepare_mount_root
from pyflock.agent._mounts import MountCounts, docker_volume_mounts
from pyflock.agent._pending import PendingCreations
from pyflock.agent._plugin import (
    DockerPlugin, LocalStates, PluginBackend, PluginSocketError, agent_view_source,
    is_mountpoint_in, listen_plugin, plugin_site,
)
from pyflock.agent._runner import FolderFilesystems, LocalFilesystems
from pyflock.agent._view import VIEW_FILE, ViewFile
from pyflock.agent._revocations import NodeRevocations
from pyflock.common._ca import (
    AUTHORITY_CERTIFICATE, CertificateError, common_name_of, load_certificate,
)
from pyflock.common._client import ControlClient
from pyflock.common._logging import log_event, start_json_logging
from pyflock.common._revocation import Revocations
from pyflock.common._threads import Pools
from pyflock.common._tls import ClusterTLS, Identity

_log = Logger()

#: How long the plugin's REST calls may take before they count as failed.
API_TIMEOUT = 30.0

#: With several control replicas, how long one attempt may take before the next replica
#: is tried (as the agent channel leaves a replica silent for two heartbeats), so that a
#: hung replica does not use up dockerd's patience.
REPLICA_ATTEMPT_TIMEOUT = 10.0

#: The agent's thread pools and their sizes: ``backend`` for discovery and the quick steps
#: of convergence (attach, detach, mount, unmount), ``bulk`` for its slow ones (create,
#: mkfs, destroy), so that a move never waits behind a burst of creations; ``plugin`` for
#: the Docker plugin's mount checks and the mount-count and view files, so that dockerd's
#: calls never wait behind convergence.
THREAD_POOLS = {"backend": 4, "bulk": 4, "plugin": 4}


class StartupError(Exception):
    """The agent cannot start; the message says why and what to do."""


def node_uuid_of(config: AgentConfig) -> str:
    """This node's uuid, from the common name of its certificate ``node.crt``."""
    path = os.path.join(config.certificates, "node.crt")
    try:
        identity = Identity.from_common_name(common_name_of(load_certificate(path)) or "")
    except CertificateError as e:
        raise StartupError(str(e))
    if identity is None or identity.kind != "node":
        raise StartupError(f"{path} is not a node certificate (its name must be node-<uuid>); "
                           f"create one with `pyflock-ca create-node-certificate`.")
    return identity.node_uuid


def make_backend(config: AgentConfig, node_uuid: str):
    """The dataset backend the configuration names."""
    if config.backend == "loopback":
        return LoopbackBackend(config.backend_options["root_path"], node_uuid,
                               default_size=config.default_size)
    if config.backend == "btrfs":
        from pyflock.agent._backends._btrfs import BtrfsBackend
        try:
            return BtrfsBackend.open(btrfs_pool(config), node_uuid,
                                     default_size=config.default_size)
        except BackendError as e:
            raise StartupError(str(e))
    if config.backend == "ebs":
        from pyflock.agent._backends._ebs import EBSBackend, EBSOptions
        from pyflock.common._ca import read_cluster_uuid
        cluster = read_cluster_uuid(config.certificates)
        return EBSBackend(cluster, node_uuid, EBSOptions.from_config(
            config.backend_options, config.default_size))
    raise StartupError(f"dataset.backend: {config.backend!r} is not available yet; "
                       f"use loopback, btrfs or ebs.")


def btrfs_pool(config: AgentConfig):
    """The btrfs pool ``dataset.pool_path`` names, mounted under the data path."""
    from pyflock.agent._backends._btrfs_pool import BtrfsPool
    return BtrfsPool(config.backend_options["pool_path"],
                     os.path.join(config.data_path, "btrfs-pool"),
                     config.backend_options.get("pool_size"))


async def backend_zone(backend, run_blocking) -> Optional[str]:
    """The node's availability zone, for backends that have one (ebs: its instance's);
    ``StartupError`` if the backend cannot tell (no metadata service)."""
    if not hasattr(backend, "availability_zone"):
        return None
    try:
        return await run_blocking(backend.availability_zone)
    except BackendError as e:
        raise StartupError(str(e))


#: What a dockerd that is down, starting or stuck makes a request fail with.
DOCKERD_UNANSWERED = (ConnectError, ConnectionError, CancelledError, ResponseFailed,
                      ResponseNeverReceived, TimeoutError, DeferredTimeoutError)

#: Seconds dockerd has to answer ``running_volume_mounts``.
DOCKERD_TIMEOUT = 5.0


async def running_volume_mounts(reactor, docker_socket: str) -> Optional[dict]:
    """
    The pyflock volumes that running containers hold, by name (from dockerd's API), or
    None when dockerd does not answer (down, starting, or not within ``DOCKERD_TIMEOUT``)
    or answers with an error or a document that is not JSON; each of those is logged.
    Any other exception is a bug and propagates.
    """
    agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(reactor, docker_socket))
    try:
        response = await treq.get("http://docker/containers/json", agent=agent,
                                  timeout=DOCKERD_TIMEOUT)
        body = await response.content()
    except DOCKERD_UNANSWERED as e:
        log_event(_log, "pyflock:agent:dockerd-unanswered", LogLevel.warn,
                  socket=docker_socket, reason=str(e) or type(e).__name__)
        return None
    if response.code != 200:
        log_event(_log, "pyflock:agent:dockerd-unanswered", LogLevel.warn,
                  socket=docker_socket, reason=f"HTTP {response.code}")
        return None
    try:
        containers = json.loads(body)
    except ValueError as e:
        log_event(_log, "pyflock:agent:dockerd-unanswered", LogLevel.warn,
                  socket=docker_socket, reason=f"the container list is not JSON: {e}")
        return None
    return docker_volume_mounts(containers)


class _UnixEndpoints:
    """An endpoint factory that connects every request to one unix socket."""

    def __init__(self, reactor, path: str):
        self._reactor = reactor
        self._path = path

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(self._reactor, self._path)


def lock_state(config: AgentConfig) -> int:
    """
    Hold the lock of this agent's data path (one agent per data path; ``release`` only
    while no agent runs); the file descriptor stays open for the process's life.
    """
    os.makedirs(config.state_path, mode=0o700, exist_ok=True)
    path = os.path.join(config.state_path, "agent.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"another pyflock-agent is running with data path "
                           f"{config.data_path} (it holds {path}); stop it first.")
    return fd


async def run(reactor, config: AgentConfig) -> None:
    """Start the agent and run until the reactor stops."""
    lock_state(config)
    node_uuid = node_uuid_of(config)
    era = compute_era(boot_id(), node_uuid)
    try:
        backend = make_backend(config, node_uuid)
        # issue 8: the revocation list the control service sends (NodeRevocations).
        revocations = Revocations()
        tls = ClusterTLS.load(config.certificates, "node", is_revoked=revocations.is_revoked)
        authority = load_certificate(os.path.join(config.certificates, AUTHORITY_CERTIFICATE))
        # issue 9: one endpoint per control service replica, in the configured order.
        channel_endpoints = [control_endpoint(reactor, host, config.control_port, tls)
                             for host in config.control_hostnames]
        http = tls.treq_client(reactor)
    except (CertificateError, OSError, ValueError) as e:
        raise StartupError(str(e))
    os.makedirs(config.state_path, mode=0o700, exist_ok=True)
    prepare_mount_root(config.mount_root)  # 0700: only root reaches the volumes
    pools = Pools.with_reactor(reactor, THREAD_POOLS)
    zone = await backend_zone(backend, pools.run_blocking("backend"))
    plugin_io = pools.run_blocking("plugin")
    view_file = ViewFile(os.path.join(config.state_path, VIEW_FILE), reactor,
                         run_in_thread=plugin_io)
    view = await view_file.load()
    # Revoked peers are refused from the start, with the list stored last time.
    node_crl = NodeRevocations(config.state_path, authority, revocations, plugin_io)
    await node_crl.load()

    states = LocalStates()
    channel: Optional[AgentChannel] = None

    def report(reports):
        states.report_all(reports)
        if channel is not None:
            channel.report_state(reports.values())

    transfers = None
    pending = None
    if IPeerBackend.providedBy(backend):
        transfers, peer_port = await start_peer_transfers(
            reactor, config, backend, tls, lambda: view if channel is None else channel.view)
        loop = peer_convergence_loop(reactor, backend, FolderFilesystems(), config.mount_root,
                                     report, transfers,
                                     run_blocking=pools.run_blocking("backend"),
                                     on_mounted=states.mounted_now)
    else:
        # The plugin's new volumes are made while their create request is under way.
        pending = PendingCreations()
        loop = node_convergence_loop(reactor, backend, LocalFilesystems(), config.mount_root,
                                     report, run_blocking=pools.run_blocking("backend"),
                                     slow=pools.run_blocking("bulk"),
                                     on_mounted=states.mounted_now, pending=pending)
    loop.start()
    # Converge from the stored view at once, but take nothing over from nodes it calls
    # dead: the first snapshot from the control service says who is alive now.
    loop.update(view.presuming_alive())
    first_view: Deferred = Deferred()
    plugin: Optional[DockerPlugin] = None

    def on_view(new_view):
        loop.update(new_view, channel.change)
        if plugin is not None:
            plugin.view_updated()
        if not first_view.called:
            first_view.callback(None)

    channel = AgentChannel(reactor, channel_endpoints, node_uuid, era, on_view,
                           names=[f"{host}:{config.control_port}"
                                  for host in config.control_hostnames],
                           address=config.address, peer_port=config.peer_port, view=view,
                           zone=zone, on_crl=node_crl.received,
                           save_view=lambda new_view: view_file.save(new_view,
                                                                     channel.change))
    channel.start()

    # The plugin's calls start at a random replica, so that nodes spread over them.
    client = ControlClient(http, [f"https://{host}:{config.control_api_port}"
                                  for host in config.control_hostnames],
                           reactor=reactor,
                           timeout=API_TIMEOUT if len(config.control_hostnames) == 1
                           else REPLICA_ATTEMPT_TIMEOUT,
                           first=random.randrange(len(config.control_hostnames)))
    # The plugin's blocking IO (view file, mount checks, mount-count writes) runs in the
    # plugin pool (plugin_io above), never behind the backend's or bulk pool's work.
    plugin_backend = PluginBackend(node_uuid, client,
                                   agent_view_source(lambda: channel.view), states,
                                   is_mountpoint_in(plugin_io),
                                   **({} if transfers is None
                                      else {"transfers": transfers.receiver.progress}))
    mounts = MountCounts.load(os.path.join(config.state_path, "plugin-mounts.json"),
                              plugin_io)

    def docker_mounts() -> Deferred:
        return Deferred.fromCoroutine(running_volume_mounts(reactor, config.docker_socket))
    plugin = DockerPlugin(plugin_backend, mounts, reactor, docker_mounts=docker_mounts,
                          pending=pending, mount_timeout=config.mount_timeout)
    in_use = await running_volume_mounts(reactor, config.docker_socket)
    if in_use is not None:
        await plugin.reconcile(in_use)
    plugin.start()
    if view.current is None:
        # Without a view, Get would answer "no such volume" for every volume, and dockerd
        # would forget them (and later make local volumes of those names): serve Docker
        # only once the control service has sent one. Until then dockerd retries and keeps
        # its records.
        log_event(_log, "pyflock:agent:waiting-for-view", LogLevel.warn,
                  reason="no stored view of the cluster; the Docker plugin starts once the "
                         "control service has sent one")
        await first_view
    try:
        plugin_port = listen_plugin(reactor, config.plugin_socket, plugin_site(plugin))
    except PluginSocketError as e:
        raise StartupError(str(e))
    except Exception as e:  # e.g. CannotListenError: the message names the cause
        raise StartupError(f"cannot serve the Docker plugin at {config.plugin_socket}: {e}")
    log_event(_log, "pyflock:agent:started", node_uuid=node_uuid, era=era,
              backend=config.backend, plugin_socket=config.plugin_socket,
              control=",".join(f"{host}:{config.control_port}"
                               for host in config.control_hostnames),
              reconciled=in_use is not None)

    async def shutdown():
        await plugin_port.stopListening()
        plugin.stop()
        await channel.stop()
        if transfers is not None:
            await peer_port.stopListening()
            await transfers.stop()
        await loop.stop()
        log_event(_log, "pyflock:agent:stopped", node_uuid=node_uuid)
    reactor.addSystemEventTrigger("before", "shutdown",
                                  lambda: Deferred.fromCoroutine(shutdown()))
    await Deferred()


def local_address_towards(host: str, port: int) -> str:
    """
    The address this host's connections to ``host:port`` leave from: the one the agent
    channel reports to the control service when ``node.address`` is unset (found with a
    connected UDP socket: no packet is sent). ``OSError`` if there is no route.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port,
                                                         type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.connect(address)
        return probe.getsockname()[0]


async def start_peer_transfers(reactor, config: AgentConfig, backend, tls, current_view):
    """
    The peer transfer service of an agent on a peer-to-peer backend, listening on
    ``node.address`` (or, when unset, the address the agent channel reports) and
    ``node.peer-port``: ``(PeerTransfers, listening port)``; ``StartupError`` if it cannot
    listen there. ``current_view()`` gives the agent's current view.
    """
    transfers = PeerTransfers(reactor, backend, tls, current_view=current_view,
                              settings=TransferSettings(config.peer_transfers,
                                                        config.peer_bandwidth))
    address = config.address
    try:
        address = address or local_address_towards(config.control_hostnames[0],
                                                    config.control_port)
        port = await transfers.listen(address, config.peer_port)
    except Exception as e:  # OSError, CannotListenError: the message names the cause
        await transfers.stop()
        raise StartupError(f"cannot serve peer transfers on node.address "
                           f"{address or '(unset)'}, node.peer-port "
                           f"{config.peer_port}: {e}; set node.address to this host's "
                           f"address that other nodes reach, and a free node.peer-port")
    log_event(_log, "pyflock:agent:peer-listening", address=address, port=config.peer_port)
    return transfers, port


def release(config: AgentConfig) -> list[str]:
    """
    Unmount and detach every dataset of this node (for ``make down`` and maintenance;
    the agent must be stopped); a btrfs pool is unmounted and its loop device detached.
    The datasets stay in the cluster: the next agent start attaches (a pool: mounts) and
    mounts them again. Returns what it could not release, with the reason. Blocking:
    runs outside any reactor.
    """
    from pyflock.agent._backends import BackendError
    from pyflock.agent._fs import FilesystemError, read_mountinfo, unmount
    lock = lock_state(config)
    node_uuid = node_uuid_of(config)
    # A btrfs pool is only unmounted, never formatted or mounted, by a release.
    backend = None if config.backend == "btrfs" else make_backend(config, node_uuid)
    root = os.path.realpath(config.mount_root) + "/"
    problems = []
    for mount in sorted(read_mountinfo(), key=lambda m: -len(m.mount_point)):
        if mount.mount_point.startswith(root):
            try:
                unmount(mount.mount_point)
            except (FilesystemError, OSError) as e:
                problems.append(f"{mount.mount_point}: {e}")
    if backend is None:
        problems += btrfs_pool(config).release()
        os.close(lock)
        return problems
    for volume in backend.list_volumes():
        if volume.attached_to == node_uuid:
            try:
                backend.detach_volume(volume.dataset_id)
            except BackendError as e:
                problems.append(f"{volume.dataset_id}: {e}")
    os.close(lock)
    return problems


#: The agent's configuration file unless ``--config`` names another.
DEFAULT_CONFIG = "/etc/pyflock/agent.yml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyflock-agent",
                                     description="The pyflock node agent.")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"the agent configuration file (default {DEFAULT_CONFIG})")
    sub = parser.add_subparsers(dest="command")
    for p in (sub.add_parser("run", help="run the agent (the default)"),
              sub.add_parser("era", help="print this node's era"),
              sub.add_parser("release", help="unmount and detach this node's datasets "
                                             "(with the agent stopped); they come back at "
                                             "the next start")):
        # SUPPRESS: a subcommand's parser sets ``config`` only when the option follows
        # it, so a --config given before the subcommand is not overwritten by a default.
        p.add_argument("--config", default=argparse.SUPPRESS,
                       help=f"the agent configuration file (default {DEFAULT_CONFIG})")
    _add_join_parser(sub)
    return parser


# -- joining (issue 10) ------------------------------------------------------------------------

def _add_join_parser(sub) -> None:
    """The ``join`` subcommand's options."""
    join = sub.add_parser(
        "join", help="join the cluster with a join token: make this node's key, get its "
                     "certificate and write node.crt, node.key and cluster.crt",
        description="Join a cluster with a token from `pyflock token create`. The key is "
                    "made here and never leaves this host; the files go into agent.yml's "
                    "certificates folder.")
    join.add_argument("--control-service", required=True, metavar="HOST[:JOINPORT]",
                      help="the control service's host name or address, as its "
                           "certificate names it, and its join port (default 4526)")
    join.add_argument("--token", required=True, metavar="TOKEN",
                      help="the join token ('-' reads it from standard input)")
    join.add_argument("--config", default=argparse.SUPPRESS,
                      help=f"the agent configuration file (default {DEFAULT_CONFIG})")


def _join(options: argparse.Namespace, config: AgentConfig) -> None:
    """Run ``pyflock-agent join`` and exit: 0 and one line on stdout, or 1 and why."""
    from pathlib import Path

    from pyflock.agent._join import JoinError, join
    token = sys.stdin.readline().strip() if options.token == "-" else options.token

    async def joining(reactor):
        try:
            joined = await join(reactor, options.control_service, token,
                                Path(config.certificates))
        except JoinError as e:
            print(f"pyflock-agent join: {e}", file=sys.stderr)
            raise SystemExit(1)
        print(f"Joined cluster {joined.cluster_uuid} as node {joined.node_uuid}: wrote "
              f"node.crt, node.key and cluster.crt into {joined.folder}.")
    from twisted.internet.task import react
    react(lambda reactor: Deferred.fromCoroutine(joining(reactor)))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``pyflock-agent``."""
    options = _parser().parse_args(argv)
    try:
        config = load_config(options.config)
        if options.command == "join":
            return _join(options, config)
        if options.command == "era":
            print(compute_era(boot_id(), node_uuid_of(config)))
            return
        if options.command == "release":
            problems = release(config)
            for problem in problems:
                print(f"pyflock-agent release: {problem}", file=sys.stderr)
            raise SystemExit(1 if problems else 0)
    except (ConfigError, StartupError) as e:
        print(f"pyflock-agent: {e}", file=sys.stderr)
        raise SystemExit(1)

    def started(reactor):
        start_json_logging(sys.stdout)
        d = Deferred.fromCoroutine(run(reactor, config))

        def failed(failure):
            failure.trap(StartupError)
            log_event(_log, "pyflock:agent:start-failed", LogLevel.critical,
                      reason=str(failure.value))
            print(f"pyflock-agent: {failure.value}", file=sys.stderr)
            raise SystemExit(1)
        return d.addErrback(failed)
    from twisted.internet.task import react
    react(started)
