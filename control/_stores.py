"""
Which configuration store ``pyflock-control`` uses: its command-line options (``--store
sqlite|etcd``, ``--etcd-*``) and opening the store they name. SQLite, in ``--data-path``,
is the default; etcd needs ``--etcd-endpoints`` (docs/ha.md).
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any, Awaitable, Callable, Optional

from pyflock.control._etcd_client import EtcdTLS, parse_endpoints
from pyflock.control._election import SoleLeader
from pyflock.control._etcd_leader import (
    DEFAULT_COMPACTION_RETENTION, DEFAULT_LEADER_TTL, EtcdLeadership,
)
from pyflock.control._etcd_state import SharedReports
from pyflock.control._etcd_state_model import (
    DEFAULT_STATE_LEASE_TTL, ReplicaInfo, control_status,
)
from pyflock.control._etcd_store import EtcdConfigurationStore, open_etcd_store
from pyflock.control._etcd_watch import DEFAULT_CHECK_DEADLINE, DEFAULT_CHECK_INTERVAL, follow
from pyflock.control._sqlite_store import open_sqlite_store
from pyflock.control._store import StoreError

DEFAULT_ETCD_PREFIX = "/pyflock/"


def add_etcd_arguments(parser: argparse.ArgumentParser) -> None:
    """The options naming an etcd cluster and the prefix of the store in it."""
    parser.add_argument("--etcd-endpoints", metavar="URL[,URL...]", default=None,
                        help="etcd members' client URLs, e.g. http://10.0.0.1:2379,"
                             "http://10.0.0.2:2379 (their v3 JSON gateway is used)")
    parser.add_argument("--etcd-prefix", default=DEFAULT_ETCD_PREFIX,
                        help=f"the prefix of the store's keys in etcd (default "
                             f"{DEFAULT_ETCD_PREFIX})")
    parser.add_argument("--etcd-ca", metavar="FILE", default=None,
                        help="the CA certificate (PEM) that signed the etcd members' "
                             "certificates, for https:// endpoints")
    parser.add_argument("--etcd-cert", metavar="FILE", default=None,
                        help="a client certificate (PEM) for etcd's client "
                             "certificate authentication")
    parser.add_argument("--etcd-key", metavar="FILE", default=None,
                        help="the client certificate's key (PEM)")


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def add_store_choice(parser: argparse.ArgumentParser) -> None:
    """``--store`` and the options naming an etcd cluster."""
    parser.add_argument("--store", choices=("sqlite", "etcd"), default="sqlite",
                        help="where the configuration is kept: sqlite (in --data-path, "
                             "the default) or etcd (--etcd-endpoints; docs/ha.md)")
    add_etcd_arguments(parser)


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """``--store``, the etcd options and those of a running replica."""
    add_store_choice(parser)
    parser.add_argument("--etcd-check-interval", type=_positive,
                        default=DEFAULT_CHECK_INTERVAL, metavar="SECONDS",
                        help=f"seconds between checks that the etcd member in use still "
                             f"answers linearizable reads; a replica whose members do not "
                             f"answer within {DEFAULT_CHECK_DEADLINE:g} s (or the interval, "
                             f"if longer) refuses changes (default "
                             f"{DEFAULT_CHECK_INTERVAL:g})")
    add_replica_argument(parser)
    parser.add_argument("--leader-ttl", type=_positive, default=DEFAULT_LEADER_TTL,
                        metavar="SECONDS",
                        help=f"the TTL of the etcd lease behind this replica's campaign "
                             f"to lead the timed work (lease expiry, purging, compaction); "
                             f"a dead leader is replaced within about this (default "
                             f"{DEFAULT_LEADER_TTL:g})")
    parser.add_argument("--etcd-compaction-retention", type=_positive, metavar="SECONDS",
                        default=DEFAULT_COMPACTION_RETENTION,
                        help=f"seconds of etcd history the leader keeps when it compacts "
                             f"etcd (default {DEFAULT_COMPACTION_RETENTION:g})")
    parser.add_argument("--state-lease-ttl", type=_positive, default=DEFAULT_STATE_LEASE_TTL,
                        metavar="SECONDS",
                        help=f"on etcd, the TTL of the etcd lease this replica's agents' "
                             f"reports are bound to: they vanish this long after the "
                             f"replica dies (default {DEFAULT_STATE_LEASE_TTL:g}; etcd "
                             f"takes at least 2)")


def add_replica_argument(parser: argparse.ArgumentParser) -> None:
    """``--replica-name``: how this replica is known to the others and to ``status``."""
    parser.add_argument("--replica-name", default=None, metavar="NAME",
                        help="this replica's name among the control service's replicas, "
                             "unique in the cluster (default: HOSTNAME:API-PORT)")


def replica_name(options: argparse.Namespace) -> str:
    """This replica's name: ``--replica-name``, else the host's name and the API port."""
    name = getattr(options, "replica_name", None)
    if name:
        return name
    return f"{socket.gethostname()}:{_api_port(options)[1]}"


def _api_port(options: argparse.Namespace) -> tuple[Optional[str], str]:
    """The interface (None: any) and the port of the REST API: ``--port`` is a number or a
    ``tcp:PORT[:interface=HOST]`` endpoint."""
    parts = str(getattr(options, "port", "4523")).split(":")
    port = next((p for p in parts[1:] if p.isdigit()), parts[0]) if len(parts) > 1 \
        else parts[0]
    interface = next((p.split("=", 1)[1] for p in parts if p.startswith("interface=")),
                     None)
    return interface, port


def replica_address(options: argparse.Namespace) -> str:
    """Where this replica's REST API is reached: the ``interface`` of a ``tcp:`` endpoint
    given as ``--port``, else the host's name, and the port."""
    interface, port = _api_port(options)
    return f"{interface or socket.getfqdn()}:{port}"


def shared_reports(reactor: Any, store: Any, options: argparse.Namespace,
                   since: float) -> Optional[SharedReports]:
    """On etcd, this replica's part in the shared cluster state (not started); else None."""
    if not isinstance(store, EtcdConfigurationStore):
        return None
    replica = ReplicaInfo(replica_name(options), replica_address(options), since)
    return SharedReports(reactor, store.gateway, store.keys, replica,
                         ttl=getattr(options, "state_lease_ttl", DEFAULT_STATE_LEASE_TTL))


def status_source(shared: Optional[SharedReports], options: argparse.Namespace,
                  since: float) -> Callable[[], Awaitable[dict]]:
    """What ``GET /v1/state/control`` answers: on etcd, what etcd says; on SQLite, this one
    replica, which leads."""
    if shared is not None:
        return shared.status
    me = ReplicaInfo(replica_name(options), replica_address(options), since)

    async def alone() -> dict:
        return control_status(me.name, "sqlite", [me], me.name, [])
    return alone


def etcd_options(options: argparse.Namespace) -> tuple[tuple[str, ...], EtcdTLS]:
    """The endpoints and TLS files the options give; ``StoreError`` saying what is wrong."""
    if not options.etcd_endpoints:
        raise StoreError("the etcd store needs --etcd-endpoints URL[,URL...], the client "
                         "URLs of the etcd members (e.g. http://10.0.0.1:2379)")
    try:
        endpoints = parse_endpoints(options.etcd_endpoints)
    except ValueError as e:
        raise StoreError(f"--etcd-endpoints: {e}") from None
    if bool(options.etcd_cert) != bool(options.etcd_key):
        raise StoreError("--etcd-cert and --etcd-key go together: give both, or neither")
    for flag, path in (("--etcd-ca", options.etcd_ca), ("--etcd-cert", options.etcd_cert),
                       ("--etcd-key", options.etcd_key)):
        if path is not None and not os.access(path, os.R_OK):
            raise StoreError(f"{flag} {path}: the file does not exist or is not readable")
    return endpoints, EtcdTLS(options.etcd_ca, options.etcd_cert, options.etcd_key)


async def open_store(reactor: Any, options: argparse.Namespace) -> Any:
    """The store ``options`` name, open; ``StoreError`` when it cannot be used."""
    if getattr(options, "store", "sqlite") == "etcd":
        endpoints, tls = etcd_options(options)
        return await open_etcd_store(reactor, endpoints, options.etcd_prefix, tls)
    return await open_sqlite_store(reactor, options.data_path)


def start_following(reactor: Any, configuration: Any, store: Any,
                    options: argparse.Namespace) -> None:
    """On etcd, keep ``configuration`` current with what other replicas write."""
    if isinstance(store, EtcdConfigurationStore):
        interval = getattr(options, "etcd_check_interval", DEFAULT_CHECK_INTERVAL)
        follow(reactor, configuration, store, interval=interval,
               deadline=max(interval, DEFAULT_CHECK_DEADLINE))


def leadership_for(reactor: Any, configuration: Any, store: Any,
                   options: argparse.Namespace) -> Any:
    """
    On etcd, the replica's part in the election of the leader (``_etcd_leader``): the
    configuration service runs its timed work only while it leads. Call its ``start``
    to campaign and its ``stop`` before closing the store. None when alone: the
    service always leads.
    """
    if not isinstance(store, EtcdConfigurationStore):
        configuration.lead_with(SoleLeader(replica_name(options)))
        return None
    leadership = EtcdLeadership(
        reactor, store.gateway, store.keys, replica_name(options),
        ttl=getattr(options, "leader_ttl", DEFAULT_LEADER_TTL),
        compaction_retention=getattr(options, "etcd_compaction_retention",
                                     DEFAULT_COMPACTION_RETENTION))
    configuration.lead_with(leadership)
    return leadership


def store_description(options: argparse.Namespace) -> str:
    """Where the store is, for the log."""
    if getattr(options, "store", "sqlite") == "etcd":
        return f"etcd {options.etcd_endpoints} prefix {options.etcd_prefix}"
    return options.data_path
