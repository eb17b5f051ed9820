"""
``pyflock``: the command line for a cluster's datasets, nodes and leases.

``run(argv, client_factory, stdout, stderr, env)`` is the whole command: it parses
``argv``, works out where the control service and the certificates are (flags, then
``PYFLOCK_*`` environment variables, then ``cli.yml``), asks ``client_factory`` for an
``IControlClient``, and prints tables or JSON. Every failure becomes one line on
``stderr`` and an exit status (``EXIT_*``); only ``main()`` touches the reactor.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import traceback
import uuid as _uuid
from typing import IO, Any, Callable, Iterable, Mapping, Optional, Sequence

import attr
import yaml
from twisted.internet.task import deferLater
from twisted.internet.defer import Deferred, FirstError, gatherResults

from pyflock.common._client import (
    ControlClient, ControlError, ControlUnreachable, IControlClient, NodeInfo,
)
from pyflock.common._records import (
    Dataset, DatasetReport, Lease, dataset_to_json, lease_to_json,
)
from pyflock.common._model import MINIMUM_SIZE
from pyflock.common._sizes import format_size, parse_size

#: Success.
EXIT_OK = 0
#: The control service refused the request, or a dataset or node name matched nothing
#: (or more than one thing).
EXIT_FAILED = 1
#: The command line was wrong (unknown option, bad size, bad metadata).
EXIT_USAGE = 2
#: The CLI could not talk to the control service: not configured, certificates missing
#: or unusable, connection refused, TLS failure, no answer in time.
EXIT_UNREACHABLE = 3

DEFAULT_PORT = 4523
#: Seconds to wait for each answer from the control service.
DEFAULT_TIMEOUT = 30.0

_PROG = "pyflock"
_CONFIG_KEYS = ("control-service", "control-port", "certs-path", "user")
_ENVIRONMENT = {
    "control-service": "PYFLOCK_CONTROL_SERVICE",
    "control-port": "PYFLOCK_CONTROL_PORT",
    "certs-path": "PYFLOCK_CERTS_PATH",
    "user": "PYFLOCK_USER",
}


class CLIError(Exception):
    """A failure to report as one line, with the exit status to leave with."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.message = message
        self.code = code


class _UsageError(CLIError):
    """The command line could not be parsed; ``prog`` is the (sub)command's name."""

    def __init__(self, prog: str, message: str):
        super().__init__(message, EXIT_USAGE)
        self.prog = prog


class _Exit(Exception):
    """argparse finished on its own (``--help``, ``--version``)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@attr.s(frozen=True, auto_attribs=True)
class Settings:
    """
    Where the control service and the certificates are, and, for each setting, where its
    value came from (``--user``, ``PYFLOCK_USER``, a cli.yml path or ``default``).
    """

    control_service: str
    control_port: int
    certs_path: str
    user: str
    origins: Mapping[str, str] = attr.ib(factory=dict, eq=False)

    @property
    def base_url(self) -> str:
        """The API root, ``https://HOST:PORT``."""
        host = self.control_service
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"https://{host}:{self.control_port}"


def config_file_path(env: Mapping[str, str]) -> Optional[str]:
    """Where ``cli.yml`` is: ``$XDG_CONFIG_HOME/pyflock`` or ``$HOME/.config/pyflock``."""
    xdg = env.get("XDG_CONFIG_HOME", "")
    # The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "pyflock", "cli.yml")
    home = env.get("HOME", "")
    if home:
        return os.path.join(home, ".config", "pyflock", "cli.yml")
    return None


def _read_config_file(path: str) -> dict[str, Any]:
    """The settings in cli.yml at ``path`` ({} if there is no such file)."""
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e.strerror}", EXIT_UNREACHABLE) from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise CLIError(f"{path} is not valid YAML{line}: "
                       f"{getattr(e, 'problem', None) or e}", EXIT_UNREACHABLE) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise CLIError(f"{path} must be a YAML mapping with the keys "
                       f"{', '.join(_CONFIG_KEYS)}", EXIT_UNREACHABLE)
    unknown = sorted(str(k) for k in loaded if k not in _CONFIG_KEYS)
    if unknown:
        raise CLIError(f"{path}: unknown key {', '.join(map(repr, unknown))}; the keys are "
                       f"{', '.join(_CONFIG_KEYS)}", EXIT_UNREACHABLE)
    result = {}
    for key, value in loaded.items():
        if value is None:
            continue
        if isinstance(value, (dict, list, bool)):
            raise CLIError(f"{path}: {key} must be a single value, not {value!r}",
                           EXIT_UNREACHABLE)
        result[key] = str(value)
    if "certs-path" in result:
        # A relative folder in the file means relative to the file, not to wherever
        # the command happens to run.
        result["certs-path"] = os.path.join(os.path.dirname(os.path.abspath(path)),
                                            os.path.expanduser(result["certs-path"]))
    return result


def _port(text: str, origin: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise CLIError(f"{origin}: {text!r} is not a port number (1-65535)", EXIT_USAGE)
    return port


def resolve_settings(flags: Mapping[str, Optional[str]], env: Mapping[str, str]) -> Settings:
    """
    The settings from ``flags`` (keys as in cli.yml, None when not given), else the
    environment, else cli.yml, else the defaults (port 4523, certificates in the current
    folder); ``CLIError`` when the control service or user is given nowhere.
    """
    values: dict[str, str] = {}
    origins: dict[str, str] = {}
    for key in _CONFIG_KEYS:
        if flags.get(key) not in (None, ""):
            values[key], origins[key] = str(flags[key]), f"--{key}"
        elif env.get(_ENVIRONMENT[key]):
            values[key], origins[key] = env[_ENVIRONMENT[key]], _ENVIRONMENT[key]
    path = config_file_path(env)
    if len(values) < len(_CONFIG_KEYS) and path is not None:
        for key, value in _read_config_file(path).items():
            if key not in values:
                values[key], origins[key] = value, path
    shown_path = path or "~/.config/pyflock/cli.yml"
    if "control-service" not in values:
        raise CLIError(
            "no control service given: use --control-service HOST, set "
            f"PYFLOCK_CONTROL_SERVICE, or put 'control-service: HOST' in {shown_path}",
            EXIT_UNREACHABLE)
    if "user" not in values:
        raise CLIError(
            "no API user given: use --user NAME (NAME.crt and NAME.key in the "
            f"certificates folder), set PYFLOCK_USER, or put 'user: NAME' in {shown_path}",
            EXIT_UNREACHABLE)
    port = DEFAULT_PORT
    if "control-port" in values:
        port = _port(values["control-port"], origins["control-port"])
    else:
        origins["control-port"] = "default"
    if "certs-path" not in values:
        values["certs-path"], origins["certs-path"] = ".", "default"
    return Settings(
        control_service=values["control-service"], control_port=port,
        certs_path=os.path.abspath(os.path.expanduser(values["certs-path"])),
        user=values["user"], origins=origins)


def check_certificates(settings: Settings) -> None:
    """Raise ``CLIError`` saying which file is missing and how to make it, if one is."""
    folder = settings.certs_path
    origin = settings.origins.get("certs-path", "default")
    where = (f"the certificates folder {folder}" if origin != "default"
             else f"the current folder {folder} (no --certs-path, PYFLOCK_CERTS_PATH "
                  "or certs-path in cli.yml)")
    authority = os.path.join(folder, "cluster.crt")
    if not os.path.isfile(authority):
        raise CLIError(
            f"{authority} is missing: {where} needs the cluster's cluster.crt (written by "
            "'pyflock-ca initialize NAME'); copy it there or point --certs-path at the "
            "folder that holds it", EXIT_UNREACHABLE)
    for suffix in ("crt", "key"):
        path = os.path.join(folder, f"{settings.user}.{suffix}")
        if not os.path.isfile(path):
            raise CLIError(
                f"{path} is missing: create the certificate of API user "
                f"'{settings.user}' with 'pyflock-ca create-api-certificate "
                f"{settings.user}' in the folder holding cluster.key, then copy "
                f"{settings.user}.crt and {settings.user}.key into {folder}",
                EXIT_UNREACHABLE)
        if not os.access(path, os.R_OK):
            raise CLIError(f"{path} cannot be read by this user; check its owner and "
                           "permissions", EXIT_UNREACHABLE)


def default_client_factory(reactor: Any, timeout: float = DEFAULT_TIMEOUT
                           ) -> Callable[[Settings], IControlClient]:
    """A factory of ``ControlClient`` speaking mutual TLS with the settings' certificates."""
    def make(settings: Settings) -> IControlClient:
        check_certificates(settings)
        from pyflock.common._ca import CertificateError
        from pyflock.common._tls import treq_client
        try:
            http = treq_client(reactor, settings.certs_path, settings.user)
        except CertificateError as e:
            raise CLIError(f"cannot use the certificates: {e}", EXIT_UNREACHABLE) from None
        return ControlClient(http, settings.base_url, reactor=reactor, timeout=timeout)
    return make


# -- command line ---------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that writes to the given streams and raises instead of exiting."""

    def __init__(self, *args: Any, stdout: IO[str], stderr: IO[str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._stdout = stdout
        self._stderr = stderr

    def _print_message(self, message: str, file: Optional[IO[str]] = None) -> None:
        if message:
            (self._stderr if file is sys.stderr else self._stdout).write(message)

    def exit(self, status: int = 0, message: Optional[str] = None) -> Any:
        if message:
            self._stderr.write(message)
        raise _Exit(status)

    def error(self, message: str) -> Any:
        if "unrecognized arguments" in message and any(
                f"--{key}" in message for key in _CONFIG_KEYS):
            message += (" (--control-service, --control-port, --certs-path and --user go "
                        "before the subcommand: pyflock --user NAME list)")
        raise _UsageError(self.prog, message)

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", functools.partial(
            _Parser, stdout=self._stdout, stderr=self._stderr))
        return super().add_subparsers(**kwargs)


def _size_argument(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    # The API takes whole KiB; rounding up keeps "at least what was asked for".
    size = -(-size // 1024) * 1024
    if size < MINIMUM_SIZE:
        raise argparse.ArgumentTypeError(
            f"{text} is below the smallest dataset size, {format_size(MINIMUM_SIZE)}")
    return size


def _seconds_argument(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds greater than 0 (leave --expires out "
            "for a lease that never expires)")
    return seconds


def _metadata_argument(text: str) -> dict[str, str]:
    result = {}
    for item in text.split(","):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not KEY=VALUE (write --metadata key=value,key2=value2)")
        result[key] = value
    return result


def _version_text() -> str:
    try:
        from importlib.metadata import version
        return version("pyflock")
    except Exception:
        return "unknown"


def _parser(stdout: IO[str], stderr: IO[str]) -> _Parser:
    """The command-line parser of ``pyflock``."""
    parser = _Parser(
        prog=_PROG, stdout=stdout, stderr=stderr,
        description="Manage a pyflock cluster's datasets, nodes and leases through its "
                    "control service's REST API.",
        epilog="Settings come from the options, else PYFLOCK_CONTROL_SERVICE, "
               "PYFLOCK_CONTROL_PORT, PYFLOCK_CERTS_PATH and PYFLOCK_USER, else "
               "~/.config/pyflock/cli.yml. Datasets are named by uuid, unique uuid prefix "
               "or name; nodes by uuid, unique uuid prefix or address.")
    parser.add_argument("--control-service", metavar="HOST",
                        help="host name or address of the control service")
    parser.add_argument("--control-port", metavar="PORT",
                        help=f"its REST API port (default {DEFAULT_PORT})")
    parser.add_argument("--certs-path", metavar="DIR",
                        help="folder with cluster.crt and USER.crt/.key "
                             "(default: the current folder)")
    parser.add_argument("--user", metavar="NAME",
                        help="API user whose certificate (NAME.crt/.key) to present")
    parser.add_argument("--version", action="version",
                        version=f"pyflock {_version_text()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(parent: Any, name: str, help: str) -> _Parser:
        sub = parent.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        sub.add_argument("--json", action="store_true",
                         help="print JSON (the API's objects) instead of a table")
        return sub

    command(commands, "version", "show the versions of this CLI and of the control service")
    command(commands, "list-nodes", "list the cluster's nodes")
    sub = command(commands, "list", "list datasets with their size, node, state and lease")
    sub.add_argument("--all", action="store_true",
                     help="also list deleted datasets that nodes still hold")
    sub = command(commands, "create", "create a dataset on a node")
    sub.add_argument("--node", required=True, metavar="NODE",
                     help="node uuid, unique uuid prefix or address")
    sub.add_argument("--size", type=_size_argument, metavar="SIZE",
                     help="maximum size, binary units (10G, 500M, 1.5TiB; at least 64M); "
                          "default: the backend's default size")
    sub.add_argument("--metadata", type=_metadata_argument, action="append", default=[],
                     metavar="KEY=VALUE,...", help="metadata pairs (may be repeated)")
    sub.add_argument("--name", metavar="NAME",
                     help="the dataset's name (metadata name; its Docker volume name)")
    sub = command(commands, "move", "move a dataset, with its data, to another node")
    sub.add_argument("dataset", metavar="DATASET",
                     help="dataset uuid, unique uuid prefix or name")
    sub.add_argument("--to", required=True, metavar="NODE",
                     help="target node: uuid, unique uuid prefix or address")
    sub.add_argument("--wait", action="store_true",
                     help="wait until the dataset is mounted on the target node, showing "
                          "its progress")
    sub.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                     help="with --wait: give up after this long (default 300)")
    sub = command(commands, "destroy", "delete a dataset and its data")
    sub.add_argument("dataset", metavar="DATASET",
                     help="dataset uuid, unique uuid prefix or name")

    leases = commands.add_parser(
        "leases", help="list, acquire and release leases",
        description="A lease pins a dataset to a node: while a node holds it, the dataset "
                    "cannot be moved elsewhere or deleted.")
    lease_commands = leases.add_subparsers(dest="lease_command", metavar="COMMAND",
                                           required=True)
    command(lease_commands, "list", "list leases")
    sub = command(lease_commands, "acquire", "take or renew a node's lease on a dataset")
    sub.add_argument("dataset", metavar="DATASET",
                     help="dataset uuid, unique uuid prefix or name")
    sub.add_argument("--node", required=True, metavar="NODE",
                     help="node uuid, unique uuid prefix or address")
    sub.add_argument("--expires", type=_seconds_argument, metavar="SECONDS",
                     help="seconds until the lease expires (default: never)")
    sub = command(lease_commands, "release", "release the lease on a dataset")
    sub.add_argument("dataset", metavar="DATASET",
                     help="dataset uuid, unique uuid prefix or name")
    return parser


# -- naming ---------------------------------------------------------------------------

def _is_uuid(text: str) -> bool:
    try:
        return str(_uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


def short_ids(uuids: Iterable[str], minimum: int = 8) -> dict[str, str]:
    """For each uuid, its shortest prefix of at least ``minimum`` characters that no other
    uuid given shares."""
    uuids = sorted(set(uuids))
    result = {}
    for i, u in enumerate(uuids):
        length = minimum
        for neighbour in uuids[max(0, i - 1):i] + uuids[i + 1:i + 2]:
            common = len(os.path.commonprefix([u, neighbour]))
            length = max(length, common + 1)
        result[u] = u[:length]
    return result


def _dataset_label(dataset: Dataset) -> str:
    return dataset.dataset_id + (f" ({dataset.name})" if dataset.name else "")


def resolve_dataset(text: str, datasets: Sequence[Dataset]
                    ) -> tuple[str, Optional[Dataset]]:
    """
    The dataset ``text`` names: an exact id (even one not listed), else a live dataset's
    name, else the one live dataset whose id starts with ``text``; ``CLIError`` otherwise.
    """
    wanted = text.strip().lower()
    for dataset in datasets:
        if dataset.dataset_id.lower() == wanted:
            return dataset.dataset_id, dataset
    if _is_uuid(wanted):
        return wanted, None
    live = [d for d in datasets if not d.deleted]
    named = [d for d in live if d.name == text]
    if named:
        return named[0].dataset_id, named[0]
    matches = [d for d in live if d.dataset_id.lower().startswith(wanted)] if wanted else []
    if len(matches) == 1:
        return matches[0].dataset_id, matches[0]
    if matches:
        candidates = ", ".join(_dataset_label(d) for d in
                               sorted(matches, key=lambda d: d.dataset_id))
        raise CLIError(f"{text!r} matches {len(matches)} datasets: {candidates}; give more "
                       "of the id, or the name")
    raise CLIError(f"no dataset has the id, id prefix or name {text!r}; 'pyflock list' "
                   "shows them")


def resolve_node(text: str, nodes: Sequence[NodeInfo]) -> str:
    """
    The uuid of the node ``text`` names: a known node's uuid, any well-formed uuid (a node
    may be named before its agent first connects), a node's address, or a unique prefix
    of a known node's uuid; ``CLIError`` otherwise.
    """
    wanted = text.strip().lower()
    for node in nodes:
        if node.uuid.lower() == wanted:
            return node.uuid
    if _is_uuid(wanted):
        return wanted
    for kind, matches in (
            ("address", [n for n in nodes if n.host.lower() == wanted]),
            ("uuid prefix", [n for n in nodes if wanted and n.uuid.lower().startswith(wanted)])):
        if len(matches) == 1:
            return matches[0].uuid
        if matches:
            candidates = ", ".join(f"{n.uuid} ({n.host})" for n in
                                   sorted(matches, key=lambda n: n.uuid))
            raise CLIError(f"{text!r} is the {kind} of {len(matches)} nodes: {candidates}; "
                           "give the node's uuid or a longer prefix of it")
    raise CLIError(f"no node has the uuid, uuid prefix or address {text!r}; "
                   "'pyflock list-nodes' shows them")


# -- output ---------------------------------------------------------------------------

def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """``rows`` under ``headers`` in left-aligned columns two spaces apart."""
    rows = [list(map(str, row)) for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [list(headers)] + rows]
    return "\n".join(lines) + "\n"


def _print_json(out: IO[str], value: Any) -> None:
    out.write(json.dumps(value, indent=2) + "\n")


def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "never"
    minutes, seconds = divmod(int(round(value)), 60)
    if minutes == 0:
        return f"{seconds}s"
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class _Nodes:
    """How to show node uuids: a short id, and the address when the node is known."""

    def __init__(self, nodes: Sequence[NodeInfo], also: Iterable[str] = ()):
        self._hosts = {n.uuid: n.host for n in nodes}
        self._short = short_ids([n.uuid for n in nodes] + list(also))

    def label(self, uuid: str) -> str:
        short = self._short.get(uuid, uuid[:8])
        host = self._hosts.get(uuid)
        return f"{short} ({host})" if host else short


def _dataset_state(dataset: Dataset,
                   states: Sequence[DatasetReport]) -> tuple[str, Optional[str]]:
    """What the dataset is doing, as far as the nodes report it, and its mount path."""
    if dataset.deleted:
        return "deleted", None
    here = [s for s in states if s.node_uuid == dataset.primary]
    if here:
        state = here[0]
        return state.state or ("mounted" if state.path else "attached"), state.path
    if states:
        return "moving", None
    return "pending", None


async def _gather(*deferreds: Deferred) -> list:
    try:
        return await gatherResults(list(deferreds), consumeErrors=True)
    except FirstError as e:
        e.subFailure.raiseException()
        raise  # pragma: no cover


# -- commands -------------------------------------------------------------------------

async def _version(client: IControlClient, args: argparse.Namespace, out: IO[str]) -> int:
    info = await client.version()
    if args.json:
        _print_json(out, dict(info.to_json(), client=_version_text()))
    else:
        out.write(f"client:          pyflock {_version_text()}\n"
                  f"control service: pyflock {info.pyflock or 'unknown'} "
                  f"(API version {info.flocker})\n")
    return EXIT_OK


async def _list_nodes(client: IControlClient, args: argparse.Namespace,
                      out: IO[str]) -> int:
    nodes, listing = await _gather(client.list_nodes(), client.list_datasets())
    nodes = sorted(nodes, key=lambda n: (n.host, n.uuid))
    if args.json:
        _print_json(out, [n.to_json() for n in nodes])
        return EXIT_OK
    counts: dict[str, int] = {}
    for dataset in listing.datasets:
        if not dataset.deleted:
            counts[dataset.primary] = counts.get(dataset.primary, 0) + 1
    short = short_ids(n.uuid for n in nodes)
    rows = []
    for node in nodes:
        alive = {True: "yes", False: "no", None: "-"}[node.alive]
        if isinstance(node.last_seen, (int, float)):
            seen = _seconds(node.last_seen) + " ago"
        else:
            seen = node.last_seen or "-"
        rows.append([short[node.uuid], node.host, alive, seen,
                     str(counts.get(node.uuid, 0))])
    out.write(format_table(["NODE", "ADDRESS", "ALIVE", "LAST SEEN", "DATASETS"], rows))
    return EXIT_OK


async def _list(client: IControlClient, args: argparse.Namespace, out: IO[str]) -> int:
    listing, states, leases, nodes = await _gather(
        client.list_datasets(), client.state_datasets(), client.list_leases(),
        client.list_nodes())
    datasets = [d for d in listing.datasets if args.all or not d.deleted]
    datasets.sort(key=lambda d: (d.deleted, d.name is None, d.name or "", d.dataset_id))
    states_of: dict[str, list[DatasetReport]] = {}
    for state in states:
        states_of.setdefault(state.dataset_id, []).append(state)
    lease_of = {lease.dataset_id: lease for lease in leases}
    if args.json:
        result = []
        for d in datasets:
            state, path = _dataset_state(d, states_of.get(d.dataset_id, []))
            lease = lease_of.get(d.dataset_id)
            result.append(dict(dataset_to_json(d), state=state, path=path,
                               lease=None if lease is None else
                               {"node_uuid": lease.node_uuid,
                                "expires": lease.remaining(client.seconds())}))
        _print_json(out, result)
        return EXIT_OK
    short = short_ids(d.dataset_id for d in listing.datasets)
    names = _Nodes(nodes, [d.primary for d in datasets] + [l.node_uuid for l in leases])
    rows = []
    for d in datasets:
        state, path = _dataset_state(d, states_of.get(d.dataset_id, []))
        lease = lease_of.get(d.dataset_id)
        rows.append([
            short[d.dataset_id], d.name or "-",
            "-" if d.maximum_size is None else format_size(d.maximum_size),
            names.label(d.primary), state,
            "-" if lease is None else f"{names.label(lease.node_uuid)} "
                                      f"{_seconds(lease.remaining(client.seconds()))}",
            path or "-"])
    out.write(format_table(["DATASET", "NAME", "SIZE", "PRIMARY", "STATE", "LEASE", "PATH"],
                           rows))
    return EXIT_OK


def _show_dataset(out: IO[str], args: argparse.Namespace, dataset: Dataset,
                  sentence: str) -> int:
    if args.json:
        _print_json(out, dataset_to_json(dataset))
    else:
        out.write(sentence + "\n")
    return EXIT_OK


async def _create(client: IControlClient, args: argparse.Namespace, out: IO[str]) -> int:
    metadata: dict[str, str] = {}
    for pairs in args.metadata:
        metadata.update(pairs)
    if args.name is not None:
        if metadata.get("name", args.name) != args.name:
            raise CLIError(f"--name {args.name!r} and --metadata name={metadata['name']!r} "
                           "disagree; give the name once", EXIT_USAGE)
        metadata["name"] = args.name
    nodes = await client.list_nodes()
    primary = resolve_node(args.node, nodes)
    dataset = await client.create_dataset(primary, maximum_size=args.size,
                                          metadata=metadata or None)
    size = "default size" if dataset.maximum_size is None else \
        format_size(dataset.maximum_size)
    return _show_dataset(out, args, dataset,
                         f"Created dataset {_dataset_label(dataset)}, {size}, on node "
                         f"{_Nodes(nodes, [primary]).label(primary)}.")


async def _move(client: IControlClient, args: argparse.Namespace, out: IO[str]) -> int:
    listing, nodes = await _gather(client.list_datasets(), client.list_nodes())
    dataset_id, before = resolve_dataset(args.dataset, listing.datasets)
    target = resolve_node(args.to, nodes)
    dataset = await client.move_dataset(dataset_id, target)
    names = _Nodes(nodes, [target] + ([before.primary] if before else []))
    if before is not None and before.primary == target:
        sentence = (f"Dataset {_dataset_label(dataset)} is already on node "
                    f"{names.label(target)}.")
    elif before is not None:
        sentence = (f"Moving dataset {_dataset_label(dataset)} from node "
                    f"{names.label(before.primary)} to node {names.label(target)}.")
    else:
        sentence = f"Moving dataset {_dataset_label(dataset)} to node {names.label(target)}."
    if not args.wait:
        return _show_dataset(out, args, dataset, sentence)
    if not args.json:
        out.write(sentence + "\n")
    await _wait_mounted(client, dataset_id, target, names, out, args)
    if args.json:
        _print_json(out, dataset_to_json(dataset))
    return EXIT_OK


#: How often ``move --wait`` asks the control service where the dataset is.
WAIT_INTERVAL = 0.1


async def _wait_mounted(client: IControlClient, dataset_id: str, target: str,
                        names: "_Nodes", out: IO[str], args: argparse.Namespace) -> None:
    """Show the dataset's states on every node until it is mounted on ``target`` alone."""
    clock = args.clock
    started = clock.seconds()
    last = None
    while True:
        states = [s for s in await client.state_datasets() if s.dataset_id == dataset_id]
        progress = ", ".join(f"{s.state} on {names.label(s.node_uuid)}" for s in states) \
            or "not reported by any node yet"
        elapsed = clock.seconds() - started
        if progress != last and not args.json:
            out.write(f"  {elapsed:5.1f}s  {progress}\n")
            last = progress
        if [(s.node_uuid, s.state) for s in states] == [(target, "mounted")]:
            if not args.json:
                path = states[0].path
                out.write(f"Mounted on node {names.label(target)}"
                          f"{' at ' + path if path else ''} after {elapsed:.1f}s.\n")
            return
        if elapsed > args.timeout:
            raise CLIError(f"the move did not finish within {args.timeout:g}s (now: {progress}); "
                           f"the node agents' logs say why. The move goes on: check again with "
                           f"'pyflock list'.", EXIT_FAILED)
        await deferLater(clock, WAIT_INTERVAL, lambda: None)


async def _destroy(client: IControlClient, args: argparse.Namespace, out: IO[str]) -> int:
    listing = await client.list_datasets()
    dataset_id, _ = resolve_dataset(args.dataset, listing.datasets)
    dataset = await client.delete_dataset(dataset_id)
    return _show_dataset(out, args, dataset,
                         f"Deleted dataset {_dataset_label(dataset)}; its node removes "
                         "the data.")


async def _leases_list(client: IControlClient, args: argparse.Namespace,
                       out: IO[str]) -> int:
    leases, listing, nodes = await _gather(client.list_leases(), client.list_datasets(),
                                           client.list_nodes())
    leases = sorted(leases, key=lambda lease: lease.dataset_id)
    if args.json:
        _print_json(out, [lease_to_json(lease, client.seconds()) for lease in leases])
        return EXIT_OK
    by_id = {d.dataset_id: d for d in listing.datasets}
    short = short_ids(list(by_id) + [lease.dataset_id for lease in leases])
    names = _Nodes(nodes, [lease.node_uuid for lease in leases])
    rows = []
    for lease in leases:
        dataset = by_id.get(lease.dataset_id)
        rows.append([short[lease.dataset_id], (dataset and dataset.name) or "-",
                     names.label(lease.node_uuid),
                     "never" if lease.expiration is None
                     else "in " + _seconds(lease.remaining(client.seconds()))])
    out.write(format_table(["DATASET", "NAME", "NODE", "EXPIRES"], rows))
    return EXIT_OK


def _show_lease(out: IO[str], args: argparse.Namespace, lease: Lease, now: float,
                sentence: str) -> int:
    if args.json:
        _print_json(out, lease_to_json(lease, now))
    else:
        out.write(sentence + "\n")
    return EXIT_OK


async def _leases_acquire(client: IControlClient, args: argparse.Namespace,
                          out: IO[str]) -> int:
    listing, nodes = await _gather(client.list_datasets(), client.list_nodes())
    dataset_id, dataset = resolve_dataset(args.dataset, listing.datasets)
    node = resolve_node(args.node, nodes)
    lease = await client.acquire_lease(dataset_id, node, args.expires)
    label = dataset_id if dataset is None else _dataset_label(dataset)
    now = client.seconds()
    until = ("with no expiry" if lease.expiration is None
             else f"for {_seconds(lease.remaining(now))}")
    return _show_lease(out, args, lease, now,
                       f"Node {_Nodes(nodes, [node]).label(node)} holds the lease on dataset "
                       f"{label} {until}.")


async def _leases_release(client: IControlClient, args: argparse.Namespace,
                          out: IO[str]) -> int:
    listing, nodes = await _gather(client.list_datasets(), client.list_nodes())
    dataset_id, dataset = resolve_dataset(args.dataset, listing.datasets)
    lease = await client.release_lease(dataset_id)
    label = dataset_id if dataset is None else _dataset_label(dataset)
    holder = _Nodes(nodes, [lease.node_uuid]).label(lease.node_uuid)
    return _show_lease(out, args, lease, client.seconds(),
                       f"Released node {holder}'s lease on dataset {label}.")


_COMMANDS: dict[tuple[str, Optional[str]], Callable[..., Any]] = {
    ("version", None): _version,
    ("list-nodes", None): _list_nodes,
    ("list", None): _list,
    ("create", None): _create,
    ("move", None): _move,
    ("destroy", None): _destroy,
    ("leases", "list"): _leases_list,
    ("leases", "acquire"): _leases_acquire,
    ("leases", "release"): _leases_release,
}


def _control_error_line(error: ControlError) -> str:
    text = str(error)
    if error.code is not None and error.code >= 500:
        text += f" (HTTP {error.code})"
    return text


async def _run(argv: Sequence[str], client_factory: Callable[[Settings], IControlClient],
               stdout: IO[str], stderr: IO[str], env: Mapping[str, str], clock) -> int:
    try:
        try:
            args = _parser(stdout, stderr).parse_args(list(argv))
        except _Exit as e:
            return e.code
        command = _COMMANDS[(args.command, getattr(args, "lease_command", None))]
        settings = resolve_settings({
            "control-service": args.control_service, "control-port": args.control_port,
            "certs-path": args.certs_path, "user": args.user}, env)
        client = client_factory(settings)
        args.clock = clock
        try:
            return await command(client, args, stdout)
        except ControlUnreachable as e:
            origin = settings.origins.get("control-service")
            raise CLIError(f"{e} (control service from {origin})", EXIT_UNREACHABLE) from None
    except _UsageError as e:
        stderr.write(f"{e.prog}: error: {e.message} (see '{e.prog} --help')\n")
        return e.code
    except CLIError as e:
        stderr.write(f"{_PROG}: error: {e.message}\n")
        return e.code
    except ControlError as e:
        stderr.write(f"{_PROG}: error: {_control_error_line(e)}\n")
        return EXIT_FAILED
    except Exception as e:
        if env.get("PYFLOCK_DEBUG"):
            stderr.write(traceback.format_exc())
        stderr.write(f"{_PROG}: error: unexpected {type(e).__name__}: {e} (set "
                     "PYFLOCK_DEBUG=1 to see where; please report it)\n")
        return EXIT_FAILED


def run(argv: Sequence[str], client_factory: Callable[[Settings], IControlClient],
        stdout: IO[str], stderr: IO[str], env: Mapping[str, str],
        clock=None) -> "Deferred[int]":
    """Run the ``pyflock`` command ``argv`` (without the program name); the Deferred
    fires with the exit status and never fails. ``clock`` (IReactorTime) paces waits."""
    if clock is None:
        from twisted.internet.task import Clock
        clock = Clock()
    return Deferred.fromCoroutine(_run(argv, client_factory, stdout, stderr, env, clock))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The ``pyflock`` console script: run the command with the real reactor and exit."""
    from twisted.internet.task import react

    arguments = list(sys.argv[1:] if argv is None else argv)

    async def go(reactor: Any) -> None:
        code = await run(arguments, default_client_factory(reactor), sys.stdout,
                         sys.stderr, os.environ, reactor)
        if code:
            raise SystemExit(code)

    react(go)
