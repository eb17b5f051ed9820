"""
Test helpers that run a real ``pyflock-control`` process and talk to it over real TLS.

``ControlProcess`` starts the console script from the running interpreter's ``bin`` folder
on a free port of a random 127.0.0.x address (kept across restarts, so clients and agents
find it again), waits until it listens, stops it with SIGTERM or SIGKILL, runs its
``backup`` command and reads its JSON-lines log. ``APIClient`` makes REST API calls with a
certificate and, given the OpenAPI document, checks every response against it.
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

from treq.client import HTTPClient
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS

from pyflock.common._ca import PathLike
from pyflock.common._tls import client_tls_policy
from pyflock.control.testing import Response, validate_response

#: How long ``start`` waits for the service to listen, and ``stop`` for it to exit.
DEFAULT_TIMEOUT = 30.0

_POLL = 0.02


class ControlProcessExited(Exception):
    """The control service exited while it was expected to start or to keep running."""

    def __init__(self, returncode: int, stderr: str):
        super().__init__(f"pyflock-control exited with status {returncode}: {stderr.strip()}")
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


class ControlProcess:
    """
    One ``pyflock-control run`` process on ``data_path`` with the certificates folder
    ``certificates_directory`` (cluster.crt, control-service.crt/.key), listening on
    ``host:port`` (by default a free port of a random 127.0.0.x address). It may be
    started again after it stopped; each run writes its own log files in
    ``log_directory`` (by default ``data_path``'s parent folder). ``close`` kills it.
    """

    def __init__(self, data_path: PathLike, certificates_directory: PathLike, *,
                 host: Optional[str] = None, port: Optional[int] = None,
                 agent_port: Optional[int] = None, lease_grace: Optional[float] = None,
                 log_directory: Optional[PathLike] = None,
                 extra_arguments: Sequence[str] = ()):
        self.data_path = Path(data_path)
        self.certificates_directory = Path(certificates_directory)
        self.host = host or f"127.0.0.{random.randint(2, 254)}"
        self._fixed_ports = port is not None
        self.port = port if port is not None else free_port(self.host)
        self.agent_port = agent_port if agent_port is not None else free_port(self.host)
        self.lease_grace = lease_grace
        self.log_directory = Path(log_directory) if log_directory is not None \
            else self.data_path.parent
        self.extra_arguments = tuple(extra_arguments)
        self.runs = 0
        self._process: Optional[subprocess.Popen] = None
        self._name = f"control-{self.host}-{os.getpid()}-{id(self):x}"

    # -- where --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The REST API's base URL, e.g. ``https://127.0.0.9:40123``."""
        return f"https://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The JSON-lines log (stdout) of the current or latest run."""
        return self.log_directory / f"{self._name}-{self.runs}.log"

    @property
    def stderr_path(self) -> Path:
        """The stderr of the current or latest run."""
        return self.log_directory / f"{self._name}-{self.runs}.err"

    def arguments(self) -> list[str]:
        """The command line of ``run``."""
        arguments = [
            script_path("pyflock-control"), "run",
            "--data-path", str(self.data_path),
            "--port", f"tcp:{self.port}:interface={self.host}",
            "--agent-port", f"tcp:{self.agent_port}:interface={self.host}",
            "--certificates-directory", str(self.certificates_directory),
        ]
        if self.lease_grace is not None:
            arguments += ["--lease-grace", str(self.lease_grace)]
        return arguments + list(self.extra_arguments)

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

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """
        Start the service and wait until it listens (it logs ``pyflock:control:started``
        after its port is open); return that event. Raises ``ControlProcessExited`` if it
        exits first. On a first start whose ports were taken meanwhile, it tries others.
        """
        first = self.runs == 0
        for attempt in range(3):
            try:
                return self._start_once(timeout)
            except ControlProcessExited as e:
                if (not first or self._fixed_ports or attempt == 2
                        or "cannot listen" not in e.stderr):
                    raise
                self.port, self.agent_port = free_port(self.host), free_port(self.host)
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> dict:
        if self.running:
            raise RuntimeError("this control service is already running")
        self.runs += 1
        self.log_directory.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            # A session of its own: a ^C meant for pytest does not reach it first.
            self._process = subprocess.Popen(
                self.arguments(), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            started = self.log_events("pyflock:control:started")
            if started:
                return started[0]
            if self._process.poll() is not None:
                raise ControlProcessExited(self._process.returncode, self.stderr)
            if time.monotonic() > deadline:
                self.kill9()
                raise TimeoutError(f"pyflock-control did not start within {timeout} s; "
                                   f"stderr: {self.stderr.strip()}")
            time.sleep(_POLL)

    def stop(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Stop the service with SIGTERM and wait for it; its exit status."""
        return self._signal(signal.SIGTERM, timeout)

    def kill9(self) -> int:
        """Kill the service with SIGKILL at once, as a crash would, and reap it."""
        return self._signal(signal.SIGKILL, DEFAULT_TIMEOUT)

    def _signal(self, number: int, timeout: float) -> int:
        process = self._process
        if process is None:
            raise RuntimeError("this control service was never started")
        if process.poll() is None:
            process.send_signal(number)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise TimeoutError(f"pyflock-control did not exit within {timeout} s of "
                                   f"signal {number}; it was killed") from None
        return process.returncode

    def close(self) -> None:
        """Kill the process if it still runs (a finalizer: safe to call at any time)."""
        if self.running:
            self.kill9()

    def __enter__(self) -> "ControlProcess":
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
        if not every_run:
            return read_events(self.log_path, event_type)
        events = []
        for run in range(1, self.runs + 1):
            events += read_events(self.log_directory / f"{self._name}-{run}.log",
                                  event_type)
        return events

    async def wait_for_event(self, reactor, event_type: str,
                             where: Callable[[dict], bool] = lambda event: True,
                             timeout: float = DEFAULT_TIMEOUT) -> dict:
        """
        Fire with the first event of the current run of ``event_type`` for which ``where``
        is true, polling the log on ``reactor``; ``TimeoutError`` after ``timeout``.
        """
        deadline = reactor.seconds() + timeout
        while True:
            for event in self.log_events(event_type):
                if where(event):
                    return event
            if not self.running:
                raise ControlProcessExited(self.returncode, self.stderr)
            if reactor.seconds() > deadline:
                raise TimeoutError(f"no {event_type} event within {timeout} s")
            await deferLater(reactor, _POLL * 5, lambda: None)

    # -- backup -------------------------------------------------------------------------

    def backup(self, destination: PathLike, timeout: float = DEFAULT_TIMEOUT
               ) -> subprocess.CompletedProcess:
        """Run ``pyflock-control backup`` of this data path to ``destination``; blocks."""
        return subprocess.run(
            [script_path("pyflock-control"), "backup", "--data-path", str(self.data_path),
             str(destination)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def _not_json(constant: str):
    """Refuse the NaN and Infinity that Python's json accepts but JSON does not have."""
    raise ValueError(f"{constant} is not JSON")


class APIClient:
    """
    REST API calls to ``url`` over mutual TLS, presenting ``<certificate_name>.crt/.key``
    from ``certificates_directory`` (or any HTTPS ``policy``). Once ``openapi`` is set,
    every response must be JSON and match that OpenAPI document. ``close`` drops the
    connections it keeps.
    """

    def __init__(self, reactor, url: str, certificates_directory: Optional[PathLike] = None,
                 certificate_name: Optional[str] = None, *,
                 policy: Optional[IPolicyForHTTPS] = None, openapi: Optional[dict] = None,
                 timeout: float = DEFAULT_TIMEOUT):
        if policy is None:
            policy = client_tls_policy(certificates_directory, certificate_name)
        self.url = url.rstrip("/")
        self.openapi = openapi
        self.timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self.http = HTTPClient(Agent(reactor, contextFactory=policy, pool=self._pool))

    async def request(self, method: str, path: str, body=None, *,
                      headers: Optional[dict] = None, raw: Optional[bytes] = None
                      ) -> Response:
        """Make one request with a JSON ``body`` (or ``raw`` bytes); the parsed response."""
        data = raw if raw is not None else (
            None if body is None else json.dumps(body).encode("utf-8"))
        headers = dict(headers or {})
        if data is not None:
            headers.setdefault("content-type", "application/json")
        response = await self.http.request(method, self.url + path, data=data,
                                           headers=headers, timeout=self.timeout)
        content = await response.content()
        all_headers = {k.decode("latin-1").lower(): v[0].decode("latin-1")
                       for k, v in response.headers.getAllRawHeaders()}
        if self.openapi is not None:
            content_type = all_headers.get("content-type")
            if content_type != "application/json":
                raise AssertionError(f"{method} {path} -> {response.code} has content-type "
                                     f"{content_type!r}: {content[:200]!r}")
        try:
            parsed = json.loads(content, parse_constant=_not_json)
        except ValueError:
            raise AssertionError(f"{method} {path} -> {response.code} is not JSON: "
                                 f"{content[:200]!r}") from None
        if self.openapi is not None:
            validate_response(self.openapi, method, path.split("?")[0], response.code,
                              parsed)
        return Response(response.code, all_headers, parsed)

    async def get(self, path: str, **kwargs) -> Response:
        """GET ``path``."""
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, body=None, **kwargs) -> Response:
        """POST ``body`` to ``path``."""
        return await self.request("POST", path, body, **kwargs)

    async def delete(self, path: str, **kwargs) -> Response:
        """DELETE ``path``."""
        return await self.request("DELETE", path, **kwargs)

    async def fetch_openapi(self) -> dict:
        """Fetch ``/v1/openapi.json`` and check every later response against it."""
        response = await self.get("/v1/openapi.json")
        assert response.code == 200, response
        self.openapi = response.json
        return self.openapi

    async def close(self) -> None:
        """Close the connections this client keeps open."""
        await self._pool.closeCachedConnections()


__all__ = ["APIClient", "ControlProcess", "ControlProcessExited", "DEFAULT_TIMEOUT",
           "free_address", "free_port", "read_events", "script_path"]
