"""
``pyflock``: the command line for a cluster's datasets, nodes and leases.

``run(argv, client_factory, stdout, stderr, env)`` is the whole command: it parses
``argv`` (``_parser``), works out where the control service and the certificates are
(``_settings``: flags, then ``PYFLOCK_*`` environment variables, then ``cli.yml``), asks
``client_factory`` for an ``IControlClient``, and prints tables or JSON (``_commands``).
Every failure becomes one line on ``stderr`` and an exit status (``EXIT_*``); only
``main()`` touches the reactor.

This module imports only ``_parser`` (the standard library): ``pyflock --help`` and a
wrong command line are answered before Twisted, the client or the certificates are loaded.
"""

from __future__ import annotations

import os
import sys
from typing import IO, TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from pyflock.cli._parser import (
    EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, CLIError, parse,
)

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from pyflock.cli._settings import Settings
    from pyflock.common._client import IControlClient

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_UNREACHABLE", "EXIT_USAGE", "CLIError", "main",
           "run"]


def run(argv: Sequence[str], client_factory: Callable[["Settings"], "IControlClient"],
        stdout: IO[str], stderr: IO[str], env: Mapping[str, str],
        clock: Any = None) -> "Deferred[int]":
    """Run the ``pyflock`` command ``argv`` (without the program name); the Deferred
    fires with the exit status and never fails. ``clock`` (IReactorTime) paces waits."""
    from twisted.internet.defer import Deferred, succeed

    args = parse(argv, stdout, stderr)
    if isinstance(args, int):
        return succeed(args)
    from pyflock.cli._commands import execute
    if clock is None:
        from twisted.internet.task import Clock
        clock = Clock()
    return Deferred.fromCoroutine(execute(args, client_factory, stdout, stderr, env, clock))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The ``pyflock`` console script: run the command with the real reactor and exit."""
    args = parse(list(sys.argv[1:] if argv is None else argv), sys.stdout, sys.stderr)
    if isinstance(args, int):
        # --help, --version or a wrong command line: answered without Twisted.
        raise SystemExit(args)
    from twisted.internet.task import react

    from pyflock.cli._commands import execute
    from pyflock.cli._settings import default_client_factory

    async def go(reactor: Any) -> None:
        code = await execute(args, default_client_factory(reactor), sys.stdout,
                             sys.stderr, os.environ, reactor)
        if code:
            raise SystemExit(code)

    react(go)
