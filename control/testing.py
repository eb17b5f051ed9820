"""
An in-memory double of the control service, for people who build on pyflock.

``APIHarness`` is the real REST API (``ControlAPI``, the real configuration model and
cluster state) on an in-memory store and a ``Clock``, reached without sockets or TLS
through ``treq.testing.StubTreq``. Every answer is checked against the service's OpenAPI
document, so a test written against the harness fails where the real service would
disagree. Use ``harness.client()`` for an ``IControlClient`` (the same ``ControlClient``
that talks to a real ``pyflock-control``), ``report_node`` to play a node agent's report,
and ``clock.advance`` to let time pass (leases run out, nodes die, join tokens expire;
``APIHarness(joins=False)`` plays a control service without the CA key)::

    from pyflock.control.testing import APIHarness

    harness = APIHarness()
    harness.report_node("aaaaaaaa-0000-4000-8000-000000000001", "10.0.0.1")
    client = harness.client()
    d = client.create_dataset("aaaaaaaa-0000-4000-8000-000000000001",
                              metadata={"name": "db"})
    # d has fired: the harness answers synchronously.

A test in pyflock's tree (``tests/control/test_testing.py``) runs the same assertions
against the harness and against a real ``pyflock-control`` over TLS.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Optional
from urllib.parse import urlsplit

import attr
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from pyflock.common._client import ControlClient
from pyflock.common._model import Configuration
from pyflock.common._records import DatasetReport
from pyflock.common._tls import Identity
from pyflock.control._api import ControlAPI, __version__
from pyflock.control._clusterstate import ClusterStateService, NodeState
from pyflock.control._openapi import build_openapi, match_path, response_validator
from pyflock.control._persistence import DEFAULT_RETENTION, ConfigurationService
from pyflock.control._ratelimit import NodeLimits, WriteRateLimiter
from pyflock.control._store import MemoryConfigurationStore
from pyflock.control._tokens import TokenBook, TokenService

ALICE = Identity.user("alice")
NODE_A = Identity.node("aaaaaaaa-0000-4000-8000-000000000001")
NODE_B = Identity.node("bbbbbbbb-0000-4000-8000-000000000002")

#: (template, method, status) of every response validated in this test run.
SEEN_RESPONSES: set = set()


class OpenAPIMismatch(AssertionError):
    """A response did not match the OpenAPI document."""


def validate_response(document: dict, method: str, path: str, code: int, body) -> None:
    """Raise ``OpenAPIMismatch`` unless the response is documented and its body valid."""
    template = match_path(document, path)
    if template is None:
        if code == 404:
            return
        raise OpenAPIMismatch(f"{path} is not documented")
    operations = document["paths"][template]
    if method.lower() not in operations:
        if code == 405:
            return
        raise OpenAPIMismatch(f"{method} {template} is not documented")
    if str(code) not in operations[method.lower()]["responses"]:
        raise OpenAPIMismatch(f"{method} {template} -> {code} is not documented")
    errors = list(response_validator(document, template, method, code).iter_errors(body))
    if errors:
        raise OpenAPIMismatch(f"{method} {path} -> {code}: {errors[0].message}")
    SEEN_RESPONSES.add((template, method.lower(), code))


@attr.s(auto_attribs=True, frozen=True)
class Response:
    """A response as tests look at it."""

    code: int
    headers: dict
    json: object


@attr.s(auto_attribs=True, frozen=True)
class _Answer:
    """A treq response whose body has been read already (``content()`` may be repeated)."""

    code: int
    headers: Any
    body: bytes

    def content(self) -> Deferred:
        """The body."""
        return succeed(self.body)


class _CheckedHTTP:
    """A treq-like client of an in-memory resource that checks answers against OpenAPI."""

    def __init__(self, resource, openapi: dict):
        self._treq = StubTreq(resource)
        self._openapi = openapi

    def request(self, method: str, url: str, **kwargs) -> Deferred:
        """Make the request; the answer, after checking it against the OpenAPI document."""
        async def go() -> _Answer:
            response = await self._treq.request(method, url, **kwargs)
            body = await response.content()
            try:
                parsed = json.loads(body)
            except ValueError:
                raise OpenAPIMismatch(f"{method} {url} -> {response.code} is not JSON: "
                                      f"{body[:200]!r}") from None
            validate_response(self._openapi, method, urlsplit(url).path, response.code,
                              parsed)
            return _Answer(response.code, response.headers, body)
        return Deferred.fromCoroutine(go())


class APIHarness:
    """
    The control service's REST API in memory, on a ``Clock``, for one or more callers
    (see the module's documentation). ``clock``, ``store`` (a
    ``MemoryConfigurationStore``), ``configuration`` (the ``ConfigurationService``) and
    ``cluster`` (the ``ClusterStateService``) are the real service's parts, open to
    inspection.
    """

    #: The base URL the harness's clients use (no request leaves the process).
    base_url = "https://control.example"

    #: The CA pin of the harness's join tokens (it has no CA).
    pin = "pyflockHarnessPinAAAAAAAAAAAAAAAAAAAAAAAAAA"

    def __init__(self, config: Configuration = Configuration(), clock: Optional[Clock] = None,
                 store: Optional[MemoryConfigurationStore] = None, joins: bool = True,
                 retention: float = DEFAULT_RETENTION,
                 node_limits: NodeLimits = NodeLimits()):
        self.clock = clock or Clock()
        self.clock.advance(1_000_000)
        self.store = store or MemoryConfigurationStore(config)
        self.configuration = ConfigurationService(self.store, self.clock, self.store.config,
                                                  self.store.revision, self.store.store_id,
                                                  retention)
        self.cluster = ClusterStateService(self.clock)
        self.openapi = build_openapi(__version__)
        #: The limits on node certificates, and the one count of their writes.
        self.node_limits = node_limits
        self.write_limiter = WriteRateLimiter(node_limits.writes)
        #: The join tokens (``TokenService``), or None for a service that serves no joins.
        self.tokens = (TokenService(self.store, self.clock, TokenBook(self.store.tokens.values(),
                                                                      self.pin))
                       if joins else None)
        #: What ``GET /v1/state/control`` answers: an async callable (None: one replica).
        self.status = None

    def api(self, identity: Optional[Identity]) -> ControlAPI:
        """The API as ``identity`` sees it."""
        return ControlAPI(self.configuration, self.cluster, lambda request: identity,
                          self.openapi, tokens=self.tokens, node_limits=self.node_limits,
                          write_limiter=self.write_limiter, status=self.status)

    def request(self, testcase, method: str, path: str, body=None, *,
                identity: Optional[Identity] = ALICE, headers: Optional[dict] = None,
                raw: Optional[bytes] = None) -> Response:
        """Make one request; its response must match the OpenAPI document."""
        treq = StubTreq(self.api(identity).resource())
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        d = treq.request(method, self.base_url + path, data=data,
                         headers=headers or {})
        response = testcase.successResultOf(d)
        content = testcase.successResultOf(response.content())
        testcase.assertEqual(response.headers.getRawHeaders("content-type"),
                             ["application/json"])
        parsed = json.loads(content)
        validate_response(self.openapi, method, path, response.code, parsed)
        headers = {k.decode().lower(): v[0].decode()
                   for k, v in response.headers.getAllRawHeaders()}
        return Response(response.code, headers, parsed)

    def client(self, identity: Optional[Identity] = ALICE) -> ControlClient:
        """An ``IControlClient`` of this API calling as ``identity`` (a user by default);
        its Deferreds fire at once, and every answer is checked against the OpenAPI
        document (``OpenAPIMismatch`` if it does not match)."""
        return ControlClient(_CheckedHTTP(self.api(identity).resource(), self.openapi),
                             self.base_url, reactor=self.clock)

    def report_node(self, node_uuid: str, host: str, datasets: Iterable[DatasetReport] = (),
                    silent: float = 0.0, era: Optional[str] = None,
                    zone: Optional[str] = None) -> None:
        """
        Play node ``node_uuid``'s agent reporting from ``host`` (in availability zone
        ``zone``, if any) that it holds ``datasets``, last heard from ``silent`` seconds
        ago (dead once that reaches the node expiry).
        """
        self.cluster.update(self.cluster.state.update_node(NodeState(
            uuid=node_uuid, host=host, era=era, zone=zone,
            last_seen=self.clock.seconds() - silent,
            datasets={d.dataset_id: attr.evolve(d, node_uuid=node_uuid)
                      for d in datasets})))
