"""
``pyflock-control``: run the control service, or take a backup of its store.

    pyflock-control [run] [--data-path DIR] [--port PORT] [--agent-port PORT]
                          [--certificates-directory DIR] [--lease-grace SECONDS]
                          [--heartbeat SECONDS] [--node-expiry SECONDS]
                          [--forget-dead-nodes SECONDS]
                          [--agent-message-limit BYTES] [--agent-send-limit BYTES]
                          [--purge-deadline SECONDS] [--deleted-retention SECONDS]
                          [--join-port PORT] [--ca-key FILE]
                          [--store sqlite|etcd] [--etcd-endpoints URL[,URL...]]
                          [--etcd-prefix PREFIX] [--etcd-ca FILE]
                          [--etcd-cert FILE --etcd-key FILE] [--replica-name NAME]
                          [--etcd-check-interval SECONDS] [--leader-ttl SECONDS]
                          [--state-lease-ttl SECONDS]
                          [--etcd-compaction-retention SECONDS]
                          [--max-connections N] [--tls-handshake-timeout SECONDS]
                          [--tls-recheck SECONDS] [--node-dataset-quota N]
                          [--node-write-rate PER_SECOND] [--node-write-burst N]
                          [--agent-admission-rate PER_SECOND]
    pyflock-control backup --out FILE [--data-path DIR | --store etcd --etcd-*]
    pyflock-control backup --data-path DIR FILE      (SQLite only: a copy of the file)
    pyflock-control restore FILE [--data-path DIR | --store etcd --etcd-*]
    pyflock-control migrate --from-data-path DIR --etcd-endpoints URL[,URL...] [--etcd-*]
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel

from pyflock.common._ca import (
    AUTHORITY_CERTIFICATE, AUTHORITY_KEY, CertificateError, load_certificate,
    load_signing_authority, sign_node_request,
)
from pyflock.common._revocation import OpenConnections, Revocations, watch_revocations
from pyflock.common._threads import in_reactor_pool
from pyflock.common._tokens import DEFAULT_JOIN_PORT, authority_pin
from pyflock.control._join import JoinService
from pyflock.control._tokens import FailureLimiter, TokenService
from pyflock.common._logging import log_event, start_json_logging
from pyflock.common._connections import (
    DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_RECHECK, ConnectionLimits,
)
from pyflock.common._tls import AGENT_CHANNEL, REST_API, ClusterTLS
from pyflock.control._viewlog import DEFAULT_ADMISSION_BURST, DEFAULT_ADMISSION_RATE
from pyflock.control._agentchannel import (
    DEFAULT_HEARTBEAT, VIEW_CHECKPOINT, AgentChannelServer,
)
from pyflock.control._api import ControlAPI, __version__
from pyflock.control._api_base import APISite
from pyflock.control._clusterstate import (
    DEFAULT_FORGET_DEAD_NODES, DEFAULT_NODE_EXPIRY, DEFAULT_PURGE_DEADLINE, ClusterStateService,
)
from pyflock.common._limits import AGENT_MESSAGE_LIMIT, SEND_LIMIT
from pyflock.control._openapi import build_openapi
from pyflock.control._ratelimit import (
    DEFAULT_NODE_DATASET_QUOTA, DEFAULT_NODE_WRITE_BURST, DEFAULT_NODE_WRITE_RATE, NodeLimits,
    TokenBucketPolicy,
)
from pyflock.control._persistence import (
    DEFAULT_LEASE_RESTART_GRACE, DEFAULT_RETENTION, ConfigurationService,
)
from pyflock.control._sqlite_store import backup
from pyflock.control._migrate import add_migrate_parser, migrate_main
from pyflock.control._backup import add_backup_parsers, backup_main
from pyflock.control._crl_sync import share_revocations
from pyflock.control._stores import (
    add_store_arguments, leadership_for, open_store, shared_reports, start_following,
    status_source, store_description,
)
from pyflock.control._store import StoreError

_log = Logger()

DEFAULT_DATA_PATH = "/var/lib/pyflock/control"

#: The cyclic garbage collector's thresholds in the control service (Python's: 700, 10, 10).
GC_THRESHOLDS = (50_000, 20, 100)
DEFAULT_CERTIFICATES = "/etc/pyflock"


def _whole_number(noun: str) -> Callable[[str], int]:
    """An argparse type: a whole number greater than zero, called ``noun`` when refused."""
    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit() and int(text) > 0):
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}")
        return int(text)
    return parse


def _seconds(zero: bool, noun: str) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds, greater than zero (or, with
    ``zero``, zero or more), called ``noun`` when refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not (0 <= value if zero else 0 < value) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}")
        return value
    return parse


_positive_bytes = _whole_number("a positive number of bytes")
_positive_count = _whole_number("a whole number greater than 0")
_positive_seconds = _seconds(False, "a positive number of seconds")
#: A rate that 0 turns off.
_rate_or_zero = _seconds(True, "a number per second, 0 or more")
#: A retention: 0 turns it off.
_retention_seconds = _seconds(True, "a number of seconds, 0 or more")


#: The options of issue 8's limits: (flag, type, metavar, default, help with {default}).
_LIMIT_OPTIONS = (
    ("--max-connections", _positive_count, "N", DEFAULT_MAX_CONNECTIONS,
     "open connections each port (REST API, agent channel, join) accepts at most; more "
     "are closed at once"),
    ("--tls-handshake-timeout", _positive_seconds, "SECONDS", DEFAULT_HANDSHAKE_TIMEOUT,
     "a client that has not completed the TLS handshake this many seconds after "
     "connecting is dropped"),
    ("--tls-recheck", _positive_seconds, "SECONDS", DEFAULT_RECHECK,
     "seconds between re-checks of the certificates of open connections; an expired or "
     "revoked one is closed"),
    ("--node-dataset-quota", _positive_count, "N", DEFAULT_NODE_DATASET_QUOTA,
     "a node certificate may create datasets while its node is the primary of fewer live "
     "datasets than this (user certificates: no limit)"),
    ("--node-write-rate", _positive_seconds, "PER_SECOND", DEFAULT_NODE_WRITE_RATE,
     "dataset creates, moves and deletes a node certificate may make per second; more "
     "answer 429"),
    ("--node-write-burst", _positive_count, "N", DEFAULT_NODE_WRITE_BURST,
     "how many of them it may make at once after a quiet spell"),
    ("--agent-admission-rate", _rate_or_zero, "PER_SECOND", DEFAULT_ADMISSION_RATE,
     f"agents welcomed per second at most, after {DEFAULT_ADMISSION_BURST} at once; the "
     f"others wait their turn (0: no limit)"),
)


def _add_limits(p: argparse.ArgumentParser) -> None:
    """The options of issue 8's limits on connections and node certificates."""
    for flag, kind, metavar, default, text in _LIMIT_OPTIONS:
        p.add_argument(flag, type=kind, metavar=metavar, default=default,
                       help=f"{text} (default {default:g})")


def node_limits(options: argparse.Namespace) -> NodeLimits:
    """The limits on node certificates, from the command line."""
    return NodeLimits(dataset_quota=options.node_dataset_quota,
                      writes=TokenBucketPolicy(options.node_write_rate,
                                               options.node_write_burst))


def connection_limits(options: argparse.Namespace) -> ConnectionLimits:
    """The guards of every listening port, from the command line."""
    return ConnectionLimits(max_connections=options.max_connections,
                            handshake_timeout=options.tls_handshake_timeout,
                            recheck=options.tls_recheck)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyflock-control",
        description="The pyflock control service: desired configuration and REST API.")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the control service (the default)")
    for p in (parser, run):
        p.add_argument("--data-path", default=DEFAULT_DATA_PATH,
                       help=f"folder of the configuration store (default {DEFAULT_DATA_PATH})")
        p.add_argument("--port", default="4523",
                       help="REST API port: a number or a tcp: endpoint (TLS always on)")
        p.add_argument("--agent-port", default="4524",
                       help="agent channel port: a number or a tcp: endpoint")
        p.add_argument("--certificates-directory", default=DEFAULT_CERTIFICATES,
                       help="folder with cluster.crt and control-service.crt/.key")
        p.add_argument("--lease-grace", type=float, default=DEFAULT_LEASE_RESTART_GRACE,
                       help="after a restart no lease expires sooner than this (seconds)")
        p.add_argument("--heartbeat", type=_positive_seconds, default=DEFAULT_HEARTBEAT,
                       help=f"seconds between heartbeats to agents (default "
                            f"{DEFAULT_HEARTBEAT:g})")
        p.add_argument("--node-expiry", type=_positive_seconds, default=DEFAULT_NODE_EXPIRY,
                       help=f"a node silent this many seconds is dead (default "
                            f"{DEFAULT_NODE_EXPIRY:g})")
        p.add_argument("--forget-dead-nodes", type=_positive_seconds, metavar="SECONDS",
                       default=DEFAULT_FORGET_DEAD_NODES,
                       help=f"forget a node dead this many seconds that holds no dataset "
                            f"and no lease (default {DEFAULT_FORGET_DEAD_NODES:g}: 7 days)")
        # Agent channel limits (issue 8, docs/security.md).
        p.add_argument("--agent-message-limit", type=_positive_bytes, metavar="BYTES",
                       default=AGENT_MESSAGE_LIMIT, help=f"refuse agents' messages longer "
                       f"than this (default {AGENT_MESSAGE_LIMIT})")
        p.add_argument("--agent-send-limit", type=_positive_bytes, metavar="BYTES",
                       default=SEND_LIMIT, help=f"drop an agent that lets more than this "
                       f"wait unread (default {SEND_LIMIT})")
        p.add_argument("--purge-deadline", type=_positive_seconds, metavar="SECONDS",
                       default=DEFAULT_PURGE_DEADLINE, help=f"a node holds back the purge "
                       f"of a deleted dataset at most this long (default "
                       f"{DEFAULT_PURGE_DEADLINE:g})")
        p.add_argument("--deleted-retention", type=_retention_seconds, metavar="SECONDS",
                       default=DEFAULT_RETENTION,
                       help=f"keep a deleted dataset's data this long, restorable (default "
                            f"{DEFAULT_RETENTION:g}: an hour; 0: delete at once)")
        p.add_argument("--join-port", default=str(DEFAULT_JOIN_PORT),
                       help=f"join port, where new hosts trade a join token for their "
                            f"certificate: a number or a tcp: endpoint (default "
                            f"{DEFAULT_JOIN_PORT}; server-authenticated TLS only)")
        p.add_argument("--ca-key", metavar="FILE", default=None,
                       help="the cluster CA's key, to sign joining nodes' certificates "
                            "(default: cluster.key in the certificates folder; without "
                            "it, no joins are served)")
        add_store_arguments(p)
        _add_limits(p)
    add_backup_parsers(sub, DEFAULT_DATA_PATH)
    add_migrate_parser(sub)
    return parser


class StartupError(Exception):
    """The service cannot start; the message says why and what to do."""


# -- joins (issue 10) ------------------------------------------------------------------------

async def start_joins(reactor, options: argparse.Namespace, tls: ClusterTLS, store):
    """
    The token service and the join port's listening port, or (None, None) when there is
    no CA key (said in the log); ``StartupError`` when the key given cannot be used.
    """
    folder = Path(options.certificates_directory)
    key_path = Path(options.ca_key) if options.ca_key else folder / AUTHORITY_KEY
    if options.ca_key is None and not key_path.exists():
        log_event(_log, "pyflock:control:joins-off", LogLevel.warn,
                  reason=f"no CA key at {key_path}: no joins are served and no join "
                         f"tokens can be made; give the CA key with --ca-key to serve them")
        return None, None
    if options.ca_key is None:
        log_event(_log, "pyflock:control:ca-key-beside-certificates", LogLevel.warn,
                  ca_key=str(key_path),
                  reason="the CA key lies in the control service's certificates folder: "
                         "move it to a folder of its own and give it with --ca-key "
                         "(docs/security.md, Where the keys belong)")
    try:
        authority = load_signing_authority(folder / AUTHORITY_CERTIFICATE, key_path)
        endpoint = tls.join_listener(reactor, options.join_port, connection_limits(options))
    except (CertificateError, ValueError) as e:
        raise StartupError(f"cannot serve joins: {e}")
    tokens = await TokenService.load(store, reactor, authority_pin(authority.certificate))
    run_blocking = in_reactor_pool(reactor)
    service = JoinService(
        tokens, authority.certificate,
        lambda request, node_uuid: run_blocking(sign_node_request, authority, request,
                                                node_uuid),
        FailureLimiter(reactor))
    try:
        port = await endpoint.listen(service.site(reactor))
    except Exception as e:
        raise StartupError(f"cannot listen on {options.join_port}: {e}")
    address = port.getHost()
    log_event(_log, "pyflock:control:joins-on", address=f"{address.host}:{address.port}",
              ca_key=str(key_path), index=str(authority.index.path))
    return tokens, port


async def run(reactor, options: argparse.Namespace) -> None:
    """Start the control service and run until the reactor stops."""
    start_json_logging(sys.stdout)
    revocations = Revocations()
    # cluster.crl as loaded; on etcd, the list in force is the newer of it and etcd's.
    from_file = Revocations()
    try:
        tls = ClusterTLS.load(options.certificates_directory, "control-service",
                              is_revoked=revocations.is_revoked)
        limits = connection_limits(options)
        api_listener = tls.listener(reactor, options.port, REST_API, limits)
        agent_listener = tls.listener(reactor, options.agent_port, AGENT_CHANNEL, limits)
        # cluster.crl: at start, on SIGHUP, on every change; revoked peers are cut off.
        authority = load_certificate(
            Path(options.certificates_directory) / AUTHORITY_CERTIFICATE)
        crl = watch_revocations(reactor, options.certificates_directory, authority, from_file)
    except (CertificateError, ValueError) as e:
        raise StartupError(str(e))
    connections = OpenConnections(tls.check, revocations)
    try:
        store = await open_store(reactor, options)
    except StoreError as e:
        raise StartupError(str(e))
    shared_crl = await share_revocations(reactor, store, authority, from_file, revocations)
    # Loading builds tens of thousands of records that cannot form cycles; the cyclic
    # collector would walk them again and again, doubling the time. Nothing else runs yet,
    # so the process may go without it until the configuration is loaded.
    gc.disable()
    try:
        configuration = await ConfigurationService.load(
            store, reactor, options.lease_grace, options.deleted_retention)
    except StoreError as e:
        await store.close()
        raise StartupError(str(e))
    finally:
        gc.enable()
    # The configuration lives as long as the service and grows with it: keep the cyclic
    # garbage collector from walking it again and again (60 ms a full pass with 10,000
    # datasets), and let it run less often: request handling makes few cycles. Measured
    # with `make bench`: 16 clients create 446/s with Python's defaults.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    leadership = leadership_for(reactor, configuration, store, options)
    configuration.start_lease_expiry()
    start_following(reactor, configuration, store, options)
    cluster = ClusterStateService(reactor, node_expiry=options.node_expiry,
                                  forget_after=options.forget_dead_nodes)
    try:
        tokens, join_port = await start_joins(reactor, options, tls, store)
    except StartupError:
        await configuration.stop()
        raise
    # Issue 9: on etcd, agents' reports are shared with the other replicas.
    shared = shared_reports(reactor, store, options, reactor.seconds())
    if shared is not None and leadership is not None:
        shared.follow_leader(leadership)  # only the leader marks a vanished node dead
    api = ControlAPI(configuration, cluster, api_listener.identities(),
                     build_openapi(__version__), tokens=tokens,
                     node_limits=node_limits(options),
                     run_off_reactor=in_reactor_pool(reactor),
                     status=status_source(shared, options, reactor.seconds()))
    site = APISite(api.resource())
    channel = AgentChannelServer(configuration, cluster, reactor,
                                 identify=agent_listener.admit,
                                 heartbeat=options.heartbeat,
                                 agent_message_limit=options.agent_message_limit,
                                 send_limit=options.agent_send_limit,
                                 purge_deadline=options.purge_deadline, reports=shared,
                                 checkpoint=view_checkpoint(options),
                                 admission_rate=options.agent_admission_rate)
    channel.start()
    if shared is not None:
        try:
            await shared.start(channel.shared.merge)
        except Exception as e:
            if join_port is not None:
                await join_port.stopListening()
            await channel.stop()
            await configuration.stop()
            raise StartupError(f"cannot share the cluster state on etcd: {e}")
    # issue 8: agents get cluster.crl, now and on each change (after revoked connections
    # are closed: OpenConnections subscribed first).
    channel.publish_crl(revocations.current.pem)
    revocations.subscribe(lambda crl: channel.publish_crl(crl.pem))
    try:
        agent_port = await agent_listener.endpoint.listen(
            connections.track(channel.factory(), AGENT_CHANNEL))
    except Exception as e:
        if join_port is not None:
            await join_port.stopListening()
        await channel.stop()
        await configuration.stop()
        raise StartupError(f"cannot listen on {options.agent_port}: {e}")
    try:
        port = await api_listener.endpoint.listen(connections.track(site, REST_API))
    except Exception as e:
        await agent_port.stopListening()
        if join_port is not None:
            await join_port.stopListening()
        await channel.stop()
        await configuration.stop()
        raise StartupError(f"cannot listen on {options.port}: {e}")
    if leadership is not None:
        leadership.start()
    cluster.start_forgetting(lambda: configuration.pending,
                             leading=lambda: configuration.leader.leading)
    address = port.getHost()
    agent_address = agent_port.getHost()
    log_event(_log, "pyflock:control:started", version=__version__,
              address=f"{address.host}:{address.port}",
              agent_address=f"{agent_address.host}:{agent_address.port}",
              epoch=channel.epoch, data_path=store_description(options),
              datasets=len(configuration.committed.datasets), cluster_uuid=tls.cluster_uuid)

    async def shutdown():
        crl.stop()
        if shared_crl is not None:
            await shared_crl.stop()
        cluster.stop_forgetting()
        await port.stopListening()
        await agent_port.stopListening()
        if join_port is not None:
            await join_port.stopListening()
        if shared is not None:
            await shared.stop()
        await channel.stop()
        if leadership is not None:
            await leadership.stop()  # revoked: another replica leads at once
        await configuration.stop()
        log_event(_log, "pyflock:control:stopped")
    reactor.addSystemEventTrigger("before", "shutdown",
                                  lambda: Deferred.fromCoroutine(shutdown()))
    await Deferred()  # run until the reactor stops


def view_checkpoint(options) -> Optional[Path]:
    """Issue 12: where the agents' view is kept across a restart (SQLite store only: with
    replicas on etcd, agents reconnect to another replica and get a snapshot)."""
    if options.store != "sqlite":
        return None
    return Path(options.data_path) / VIEW_CHECKPOINT


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``pyflock-control``."""
    options = _parser().parse_args(argv)
    if options.command == "migrate":
        return migrate_main(options)
    if options.command == "restore" or (options.command == "backup" and (
            options.out or not options.file or options.store != "sqlite")):
        return backup_main(options)
    if options.command == "backup":
        try:
            backup(options.data_path, options.file)
        except StoreError as e:
            print(f"pyflock-control backup: {e}", file=sys.stderr)
            raise SystemExit(1)
        print(f"backed up {options.data_path} to {options.file}")
        return

    def started(reactor):
        d = Deferred.fromCoroutine(run(reactor, options))

        def failed(failure):
            failure.trap(StartupError)
            print(f"pyflock-control: {failure.value}", file=sys.stderr)
            raise SystemExit(1)
        return d.addErrback(failed)
    from twisted.internet.task import react
    react(started)
