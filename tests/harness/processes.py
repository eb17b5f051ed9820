"""
What the test helpers that run pyflock's own services have in common.

``ServiceProcess`` is one console-script process (``pyflock-control run``,
``pyflock-agent run``; a subclass names the script and its command line) that a test
starts, stops with SIGTERM or SIGKILL and starts again. Each run writes its stdout (the
JSON-lines log) and its stderr to files of its own, which stay after it ends; the test
reads the log's events and waits for one (on a reactor, or blocking). Around it: free
ports on 127.0.0.x, the console scripts of the running interpreter, reading a JSON-lines
log, and running a command to completion.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from twisted.internet.task import deferLater

from pyflock.common._ca import PathLike

#: How long a service may take to start, to exit, or to log an awaited event.
DEFAULT_TIMEOUT = 30.0

_POLL = 0.02

#: How much of a service's stderr a timeout's message quotes.
_STDERR_QUOTED = 2000


class ServiceProcessExited(Exception):
    """A service exited while it was expected to start or to keep running."""

    #: The console script, for the message.
    program = "the service"

    def __init__(self, returncode: Optional[int], stderr: str):
        super().__init__(f"{self.program} exited with status {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


def script_path(name: str) -> str:
    """The console script ``name`` installed beside the running interpreter."""
    return os.path.join(os.path.dirname(sys.executable), name)


def free_address() -> tuple[str, int]:
    """A random 127.0.0.x address and a TCP port that was free on it a moment ago."""
    host = f"127.0.0.{random.randint(2, 254)}"
    return host, free_port(host)


def free_port(host: str) -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def read_events(path: PathLike, event_type: Optional[str] = None) -> list[dict]:
    """The JSON-lines log events in ``path`` (of ``event_type`` only, if given)."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            # The last line may be half written by a running (or killed) process.
            continue
        if event_type is None or event.get("event_type") == event_type:
            events.append(event)
    return events


def run_to_completion(argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT
                      ) -> subprocess.CompletedProcess:
    """Run ``argv`` with no input and wait for it; its output is captured as text."""
    return subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


class ServiceProcess:
    """
    One process of the console script ``program`` with the command line ``arguments()``
    (both given by a subclass), named ``name`` and run with ``environment`` added to this
    process's environment. It may be started again after it stopped; run N writes its
    stdout to ``<log_directory>/<name>-N.log`` and its stderr to ``<name>-N.err``.
    ``close`` kills it (a subclass may stop it more gently).
    """

    #: The console script, for messages.
    program = "the service"

    #: What the process is, for messages.
    what = "service"

    #: Raised when the process exits while it is expected to start or to keep running.
    exited = ServiceProcessExited

    def __init__(self, name: str, log_directory: PathLike,
                 environment: Optional[dict] = None):
        self.name = name
        self.log_directory = Path(log_directory)
        #: Variables added to this process's environment for the next runs.
        self.environment = dict(environment or {})
        self.runs = 0
        self._process: Optional[subprocess.Popen] = None

    def arguments(self) -> list[str]:
        """The command line of a run."""
        raise NotImplementedError

    # -- where --------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        """The JSON-lines log (stdout) of the current or latest run."""
        return self._log_path(self.runs)

    @property
    def stderr_path(self) -> Path:
        """The stderr of the current or latest run."""
        return self.log_directory / f"{self.name}-{self.runs}.err"

    def _log_path(self, run: int) -> Path:
        return self.log_directory / f"{self.name}-{run}.log"

    # -- life cycle ---------------------------------------------------------------------

    @property
    def pid(self) -> Optional[int]:
        """The process id of the current or latest run."""
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        """Whether the process runs now."""
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        """The exit status of the latest run (negative: killed by that signal), or None."""
        return None if self._process is None else self._process.poll()

    def spawn(self) -> None:
        """Start a new run and return at once (``start`` also waits for it)."""
        if self.running:
            raise RuntimeError(f"this {self.what} is already running")
        self.runs += 1
        self.log_directory.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            # A session of its own: a ^C meant for pytest does not reach it first.
            self._process = subprocess.Popen(
                self.arguments(), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                env=dict(os.environ, **self.environment), start_new_session=True)

    def _start(self, event_types: Sequence[str], timeout: float) -> dict:
        """
        Spawn a run and wait for each of ``event_types`` in turn; the last one. A run
        that does not log them in time is killed.
        """
        self.spawn()
        try:
            for event_type in event_types:
                event = self.wait_for_event_sync(event_type, timeout=timeout)
        except TimeoutError:
            self.kill9()
            raise
        return event

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the process to exit by itself; its exit status (``TimeoutError``)."""
        if self._process is None:
            raise RuntimeError(f"this {self.what} was never started")
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.program} did not exit within {timeout} s") from None

    def stop(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Stop the process with SIGTERM and wait for it; its exit status."""
        return self._signal(signal.SIGTERM, timeout)

    def kill9(self) -> int:
        """Kill the process with SIGKILL at once, as a crash would, and reap it."""
        return self._signal(signal.SIGKILL, DEFAULT_TIMEOUT)

    def _signal(self, number: int, timeout: float) -> int:
        process = self._process
        if process is None:
            raise RuntimeError(f"this {self.what} was never started")
        if process.poll() is None:
            process.send_signal(number)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise TimeoutError(f"{self.program} did not exit within {timeout} s of "
                                   f"signal {number}; it was killed") from None
        return process.returncode

    def close(self) -> None:
        """Kill the process if it still runs (a finalizer: safe to call at any time)."""
        if self.running:
            self.kill9()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- output -------------------------------------------------------------------------

    @property
    def stderr(self) -> str:
        """What the current or latest run wrote to stderr."""
        try:
            return self.stderr_path.read_text()
        except FileNotFoundError:
            return ""

    def log_events(self, event_type: Optional[str] = None, *,
                   every_run: bool = False) -> list[dict]:
        """The log events of the current run (of all runs if ``every_run``)."""
        runs = range(1, self.runs + 1) if every_run else (self.runs,)
        return [event for run in runs for event in read_events(self._log_path(run),
                                                               event_type)]

    def _look(self, event_type: str, where: Callable[[dict], bool], after: int,
              timeout: float, deadline: float, now: float) -> Optional[dict]:
        """The awaited event if logged; None to look again later; raises when in vain."""
        matching = [e for e in self.log_events(event_type) if where(e)]
        if len(matching) > after:
            return matching[after]
        if not self.running:
            raise self.exited(self.returncode, self.stderr)
        if now > deadline:
            stderr = self.stderr.strip()[-_STDERR_QUOTED:]
            raise TimeoutError(f"no {event_type} event from {self.name} within {timeout} s"
                               + (f"; stderr: {stderr}" if stderr else ""))
        return None

    async def wait_for_event(self, reactor, event_type: str,
                             where: Callable[[dict], bool] = lambda event: True,
                             timeout: float = DEFAULT_TIMEOUT, after: int = 0) -> dict:
        """
        Fire with the first event of the current run of ``event_type`` for which ``where``
        is true, past the first ``after`` such events, polling the log on ``reactor``;
        ``TimeoutError`` after ``timeout``, ``exited`` if the process exits.
        """
        deadline = reactor.seconds() + timeout
        while (event := self._look(event_type, where, after, timeout, deadline,
                                   reactor.seconds())) is None:
            await deferLater(reactor, _POLL * 5, lambda: None)
        return event

    def wait_for_event_sync(self, event_type: str,
                            where: Callable[[dict], bool] = lambda event: True,
                            timeout: float = DEFAULT_TIMEOUT, after: int = 0) -> dict:
        """``wait_for_event``, blocking the calling thread (for code without a reactor)."""
        deadline = time.monotonic() + timeout
        while (event := self._look(event_type, where, after, timeout, deadline,
                                   time.monotonic())) is None:
            time.sleep(_POLL)
        return event


__all__ = ["DEFAULT_TIMEOUT", "ServiceProcess", "ServiceProcessExited", "free_address",
           "free_port", "read_events", "run_to_completion", "script_path"]
