"""
Test helpers that run a real ``pyflock-control`` process and talk to it over real TLS.

``ControlProcess`` (a ``tests.harness.processes.ServiceProcess``) starts the
console script from the running interpreter's ``bin`` folder on a free port of a random
127.0.0.x address (kept across restarts, so clients and agents find it again), waits until
it listens, stops it with SIGTERM or SIGKILL, runs its ``backup`` command and reads its
JSON-lines log. ``APIClient`` makes REST API calls with a certificate and, given the
OpenAPI document, checks every response against it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Optional, Sequence

from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS

from pyflock.common._ca import PathLike
from tests.harness.processes import (
    DEFAULT_TIMEOUT, ServiceProcess, ServiceProcessExited, free_address, free_port,
    read_events, run_to_completion, script_path,
)
from pyflock.common._tls import client_tls_policy
from pyflock.control.testing import Response, validate_response


class ControlProcessExited(ServiceProcessExited):
    """The control service exited while it was expected to start or to keep running."""

    program = "pyflock-control"


class ControlProcess(ServiceProcess):
    """
    One ``pyflock-control run`` process on ``data_path`` with the certificates folder
    ``certificates_directory`` (cluster.crt, control-service.crt/.key), listening on
    ``host:port`` (by default a free port of a random 127.0.0.x address). It may be
    started again after it stopped; each run writes its own log files in
    ``log_directory`` (by default ``data_path``'s parent folder). ``close`` kills it.
    """

    program = "pyflock-control"
    what = "control service"
    exited = ControlProcessExited

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
        #: The join port (served when the certificates folder holds cluster.key).
        self.join_port = free_port(self.host)
        self.lease_grace = lease_grace
        self.extra_arguments = tuple(extra_arguments)
        super().__init__(
            f"control-{self.host}-{os.getpid()}-{id(self):x}",
            log_directory if log_directory is not None else self.data_path.parent)

    @property
    def url(self) -> str:
        """The REST API's base URL, e.g. ``https://127.0.0.9:40123``."""
        return f"https://{self.host}:{self.port}"

    def arguments(self) -> list[str]:
        """The command line of ``run``."""
        arguments = [
            script_path("pyflock-control"), "run",
            "--data-path", str(self.data_path),
            "--port", f"tcp:{self.port}:interface={self.host}",
            "--agent-port", f"tcp:{self.agent_port}:interface={self.host}",
            "--join-port", f"tcp:{self.join_port}:interface={self.host}",
            "--certificates-directory", str(self.certificates_directory),
        ]
        if self.lease_grace is not None:
            arguments += ["--lease-grace", str(self.lease_grace)]
        return arguments + list(self.extra_arguments)

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """
        Start the service and wait until it listens (it logs ``pyflock:control:started``
        after its port is open); return that event. Raises ``ControlProcessExited`` if it
        exits first. On a first start whose ports were taken meanwhile, it tries others.
        """
        first = self.runs == 0
        for attempt in range(3):
            try:
                return self._start(["pyflock:control:started"], timeout)
            except ControlProcessExited as e:
                if (not first or self._fixed_ports or attempt == 2
                        or "cannot listen" not in e.stderr):
                    raise
                self.port, self.agent_port = free_port(self.host), free_port(self.host)
                self.join_port = free_port(self.host)
        raise AssertionError("unreachable")

    def backup(self, destination: PathLike, timeout: float = DEFAULT_TIMEOUT
               ) -> subprocess.CompletedProcess:
        """Run ``pyflock-control backup`` of this data path to ``destination``; blocks."""
        return run_to_completion(
            [script_path("pyflock-control"), "backup", "--data-path", str(self.data_path),
             str(destination)], timeout)


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
