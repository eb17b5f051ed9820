"""
A small client of etcd's v3 JSON gateway (``POST /v3/...``) over treq.

Each call goes to one member; a member that does not answer within ``timeout`` seconds,
refuses the connection, or answers that it has no leader or timed out, is left for the next
endpoint in the list, round and round, until ``deadline`` seconds have passed. Calls must
therefore be safe to repeat: reads are, and the store makes its transactions so (a compare
on the revision key and a nonce, ``control/_etcd_model.py``). An error etcd answers about
the request itself (a bad argument, a compacted revision) fails at once as ``EtcdError``.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

import attr
import treq
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout
from twisted.internet.error import ConnectError, ConnectionLost, TimeoutError as TCPTimeout
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from pyflock.common._logging import log_event

#: Seconds a member has to answer one request before the next one is tried.
DEFAULT_TIMEOUT = 1.0

#: Seconds a call keeps trying members before it fails with ``EtcdUnavailable``.
DEFAULT_DEADLINE = 20.0

#: Seconds between two rounds over every endpoint.
ROUND_PAUSE = 0.1

#: gRPC codes etcd answers when the member cannot serve now, but another one may:
#: Unavailable (no leader, leader changed), DeadlineExceeded (request timed out), Unknown
#: (some 3.4 server timeouts).
RETRYABLE_CODES = frozenset({14, 4, 2})

_log = Logger()


class EtcdError(Exception):
    """etcd answered the request with an error; ``code`` is its gRPC code."""

    def __init__(self, code: int, message: str, endpoint: str):
        super().__init__(f"etcd at {endpoint} answered: {message} (code {code})")
        self.code = code
        self.etcd_message = message


class EtcdUnavailable(Exception):
    """No member answered within the call's deadline; the message lists why."""


@attr.s(frozen=True, auto_attribs=True)
class EtcdTLS:
    """Files for TLS to etcd: the CA that signed its members, and a client certificate."""

    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None


def parse_endpoints(text: str) -> tuple[str, ...]:
    """``URL[,URL...]`` as a tuple of base URLs (``ValueError`` for a malformed one)."""
    endpoints = tuple(part.strip().rstrip("/") for part in text.split(",") if part.strip())
    if not endpoints:
        raise ValueError("no etcd endpoint given: give URLs like http://10.0.0.1:2379")
    for url in endpoints:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise ValueError(f"{url!r} is not an etcd endpoint: give URLs like "
                             f"http://10.0.0.1:2379 or https://etcd1:2379")
    return endpoints


@implementer(IPolicyForHTTPS)
class _EtcdPolicy:
    """Verifies etcd members against the given CA and presents the client certificate."""

    def __init__(self, tls: EtcdTLS):
        self._trust = None
        if tls.ca:
            with open(tls.ca, "rb") as f:
                self._trust = ssl.Certificate.loadPEM(f.read())
        self._client = None
        if tls.cert:
            with open(tls.cert, "rb") as c, open(tls.key or tls.cert, "rb") as k:
                self._client = ssl.PrivateCertificate.loadPEM(c.read() + b"\n" + k.read())

    def creatorForNetloc(self, hostname: bytes, port: int):
        """The TLS options for one member."""
        options: dict[str, Any] = {}
        if self._trust is not None:
            options["trustRoot"] = self._trust
        if self._client is not None:
            options["clientCertificate"] = self._client
        return ssl.optionsForClientTLS(hostname.decode("ascii"), **options)


def describe(error: BaseException) -> str:
    """A one-line account of ``error`` (a failed response names its first reason)."""
    if isinstance(error, ResponseFailed) and error.reasons:
        return f"response failed: {error.reasons[0].getErrorMessage()}"
    return str(error) or type(error).__name__


def _is_member_failure(error: BaseException) -> bool:
    """Whether ``error`` says the member is unreachable or cannot serve (try another)."""
    if isinstance(error, EtcdError):
        return error.code in RETRYABLE_CODES
    return isinstance(error, (CancelledError, DeferredTimeout, TCPTimeout, ConnectError,
                              ConnectionLost, ResponseFailed, OSError, ValueError))


class EtcdGateway:
    """
    Calls to etcd's gateway at ``endpoints`` (base URLs); ``endpoint`` is the member in
    use. ``close`` drops the kept connections. ``http`` (a treq-like client) replaces the
    real one in tests.
    """

    def __init__(self, reactor: Any, endpoints: Sequence[str], tls: Optional[EtcdTLS] = None,
                 timeout: float = DEFAULT_TIMEOUT, deadline: float = DEFAULT_DEADLINE,
                 http: Any = None):
        self._reactor = reactor
        self.endpoints = tuple(endpoints)
        self._current = 0
        self._timeout = timeout
        self._deadline = deadline
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.retryAutomatically = False
        policy = _EtcdPolicy(tls) if tls is not None and (tls.ca or tls.cert) else None
        agent = Agent(reactor, connectTimeout=timeout, pool=self._pool,
                      **({"contextFactory": policy} if policy is not None else {}))
        self._http = http if http is not None else treq.client.HTTPClient(agent)

    @property
    def endpoint(self) -> str:
        """The member calls go to now."""
        return self.endpoints[self._current]

    async def call(self, path: str, body: dict, deadline: Optional[float] = None) -> dict:
        """
        POST ``body`` to ``/v3/<path>`` on a member that answers; its JSON answer.
        ``deadline`` replaces the gateway's own for this call.
        """
        started = self._reactor.seconds()
        deadline = self._deadline if deadline is None else deadline
        failures: list[str] = []
        while True:
            for _ in range(len(self.endpoints)):
                endpoint = self.endpoint
                try:
                    return await self._once(endpoint, path, body)
                except Exception as e:
                    if not _is_member_failure(e):
                        raise
                    failures.append(f"{endpoint}: {describe(e)}")
                    self._current = (self._current + 1) % len(self.endpoints)
                    log_event(_log, "pyflock:control:etcd-member-failed", LogLevel.warn,
                              endpoint=endpoint, next=self.endpoint, path=path,
                              reason=describe(e))
                if self._reactor.seconds() - started > deadline:
                    raise EtcdUnavailable(
                        f"no etcd member answered /v3/{path} within {deadline:g} s "
                        f"(tried {', '.join(self.endpoints)}); last errors: "
                        + "; ".join(failures[-len(self.endpoints):]))
            await deferLater(self._reactor, ROUND_PAUSE, lambda: None)

    async def _once(self, endpoint: str, path: str, body: dict) -> dict:
        """One request to one member, within the timeout."""
        async def request():
            response = await self._http.post(
                f"{endpoint}/v3/{path}", data=json.dumps(body).encode("ascii"),
                headers={b"Content-Type": [b"application/json"]})
            return response.code, await response.content()
        d = Deferred.fromCoroutine(request())
        d.addTimeout(self._timeout, self._reactor)
        code, content = await d
        try:
            answer = json.loads(content)
        except ValueError:
            hint = (" (is etcd's v3 JSON gateway on? etcd started with --config-file needs "
                    "enable-grpc-gateway: true; docs/ha.md)") if code == 404 else ""
            raise ValueError(f"HTTP {code}, not JSON: {content[:200]!r}{hint}") from None
        if not isinstance(answer, dict):
            raise ValueError(f"HTTP {code}, not a JSON object: {content[:200]!r}")
        if "error" in answer or code != 200:
            raise EtcdError(int(answer.get("code", 2)),
                            str(answer.get("message") or answer.get("error") or
                                f"HTTP {code}"), endpoint)
        return answer

    async def stream(self, path: str, body: dict, headers: dict) -> Any:
        """
        POST ``body`` to ``/v3/<path>`` on the member in use and fire with the response
        once its headers came (its body not read: a stream); a member that does not
        answer within the timeout is left for the next one (``EtcdUnavailable``).
        """
        endpoint = self.endpoint
        all_headers = {b"Content-Type": [b"application/json"], **headers}
        d = self._http.post(f"{endpoint}/v3/{path}", data=json.dumps(body).encode("ascii"),
                            headers=all_headers, unbuffered=True)
        d.addTimeout(self._timeout * 2, self._reactor)
        try:
            response = await d
        except Exception as e:
            self.skip(endpoint)
            raise EtcdUnavailable(f"{endpoint}: {describe(e)}") from e
        if response.code != 200:
            content = await response.content()
            self.skip(endpoint)
            raise EtcdUnavailable(f"{endpoint} answered /v3/{path} with HTTP "
                                  f"{response.code}: {content[:200]!r}")
        return response

    def skip(self, endpoint: str) -> None:
        """Leave ``endpoint`` for the next member, unless calls already moved on."""
        if self.endpoint == endpoint:
            self._current = (self._current + 1) % len(self.endpoints)

    async def close(self) -> None:
        """Drop the kept connections."""
        await self._pool.closeCachedConnections()
