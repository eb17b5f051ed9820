"""
The ``pyflock`` command line as argparse sees it: the options, the subcommands, the exit
statuses and the errors. It imports only the standard library, so that ``pyflock --help``
answers without loading Twisted, the client or anything of the server.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from typing import IO, Any, Optional, Sequence, Union

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
    from pyflock.common._model import MINIMUM_SIZE
    from pyflock.common._sizes import format_size, parse_size
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



def version_text() -> str:
    """This CLI's installed version ("unknown" when not installed)."""
    try:
        from importlib.metadata import version
        return version("pyflock")
    except Exception:
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version``: print this CLI's version and exit (looked up only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: Optional[str] = None):
        super().__init__(option_strings=option_strings, dest=dest, default=default,
                         nargs=0, help=help)

    def __call__(self, parser: Any, namespace: Any, values: Any,
                 option_string: Optional[str] = None) -> None:
        parser._print_message(f"pyflock {version_text()}\n", sys.stdout)
        parser.exit()


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
    parser.add_argument("--control-service", metavar="HOST[,HOST...]",
                        help="host name or address of the control service, or of each of "
                             "its replicas, separated by commas (tried in turn)")
    parser.add_argument("--control-port", metavar="PORT",
                        help=f"its REST API port (default {DEFAULT_PORT})")
    parser.add_argument("--certs-path", metavar="DIR",
                        help="folder with cluster.crt and USER.crt/.key "
                             "(default: the current folder)")
    parser.add_argument("--user", metavar="NAME",
                        help="API user whose certificate (NAME.crt/.key) to present")
    parser.add_argument("--version", action=_VersionAction,
                        help="show this CLI's version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(parent: Any, name: str, help: str) -> _Parser:
        sub = parent.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        sub.add_argument("--json", action="store_true",
                         help="print JSON (the API's objects) instead of a table")
        return sub

    command(commands, "version", "show the versions of this CLI and of the control service")
    command(commands, "status", "show the control service's replicas, which one leads, "
                                "and the etcd members")
    command(commands, "list-nodes", "list the cluster's nodes")
    sub = command(commands, "list", "list datasets with their size, node, state and lease")
    sub.add_argument("--all", action="store_true",
                     help="also list deleted datasets: those whose data is still kept show "
                          "until when ('pyflock restore' brings them back)")
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
    sub = command(commands, "destroy", "delete a dataset; its data is kept for the control "
                                       "service's retention period (default an hour)")
    sub.add_argument("dataset", metavar="DATASET",
                     help="dataset uuid, unique uuid prefix or name")
    sub.add_argument("--now", action="store_true",
                     help="destroy the data at once, never restorable (also purges a "
                          "dataset already deleted)")
    sub = command(commands, "restore", "bring back a deleted dataset whose data is kept")
    sub.add_argument("dataset", metavar="DATASET",
                     help="deleted dataset's uuid, unique uuid prefix or former name")
    sub.add_argument("--name", metavar="NEW",
                     help="restore it under this name (when its old one was taken since)")

    leases = commands.add_parser(
        "leases", help="list, acquire and release leases",
        description="A lease pins a dataset to a node: while a node holds it, the dataset "
                    "cannot be moved elsewhere or deleted.")
    lease_commands = leases.add_subparsers(dest="subcommand", metavar="COMMAND",
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

    node = commands.add_parser(
        "node", help="forget a dead node",
        description="A node whose machine is gone stays listed, dead, until it is "
                    "forgotten: by 'pyflock node forget', or by the control service once "
                    "it has been dead longer than its --forget-dead-nodes.")
    node_commands = node.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    sub = command(node_commands, "forget",
                  "forget a dead node that is the primary of no dataset and holds no lease")
    sub.add_argument("node", metavar="NODE",
                     help="node uuid, unique uuid prefix or address")
    _add_token_commands(commands, command)
    return parser


# -- join tokens (issue 10) ------------------------------------------------------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration_argument(text: str) -> float:
    """A duration: seconds, or a number with a unit s, m, h or d (``90m``, ``1h``)."""
    number, unit = text, "s"
    if text[-1:].lower() in _DURATION_UNITS:
        number, unit = text[:-1], text[-1].lower()
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 1):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration of at least 1 second (write 3600, 90m, 1h or 2d)")
    return seconds


def _uses_argument(text: str) -> int:
    """A number of uses, at least 1."""
    if not (text.isascii() and text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of uses, 1 or "
                                         f"more")
    return int(text)


def _add_token_commands(commands: Any, command: Any) -> None:
    """``pyflock token create|list|revoke``."""
    token = commands.add_parser(
        "token", help="create, list and revoke join tokens",
        description="A join token lets a new host join the cluster with "
                    "`pyflock-agent join`: the host makes its own key and gets its "
                    "certificate from the control service. Only its hash is stored.")
    token_commands = token.add_subparsers(dest="subcommand", metavar="COMMAND",
                                          required=True)
    sub = command(token_commands, "create",
                  "create a join token and print it alone on stdout")
    sub.add_argument("--ttl", type=_duration_argument, metavar="DURATION",
                     help="how long it is valid: seconds or 90m, 1h, 2d (default 1h)")
    sub.add_argument("--uses", type=_uses_argument, metavar="N",
                     help="how many hosts may join with it (default 1)")
    command(token_commands, "list", "list join tokens (never their secrets)")
    sub = command(token_commands, "revoke", "revoke a join token")
    sub.add_argument("token_id", metavar="ID", help="the token's id, as listed")



def parse(argv: Sequence[str], stdout: IO[str], stderr: IO[str]
          ) -> Union[argparse.Namespace, int]:
    """
    The parsed command line, or the exit status when argparse finished on its own
    (``--help``, ``--version``) or the command line is wrong (then one line on ``stderr``).
    """
    try:
        return _parser(stdout, stderr).parse_args(list(argv))
    except _Exit as e:
        return e.code
    except _UsageError as e:
        stderr.write(f"{e.prog}: error: {e.message} (see '{e.prog} --help')\n")
        return e.code
