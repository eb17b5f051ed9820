"""
Test helpers for the control service: an in-memory API harness whose every response is
validated against the OpenAPI document.
"""

from __future__ import annotations

import json
from typing import Optional

import attr
from treq.testing import StubTreq
from twisted.internet.task import Clock

from pyflock.common._model import Configuration
from pyflock.common._tls import Identity
from pyflock.control._api import ControlAPI, __version__
from pyflock.control._clusterstate import ClusterStateService
from pyflock.control._openapi import build_openapi, match_path, response_validator
from pyflock.control._persistence import ConfigurationService
from pyflock.control._store import MemoryConfigurationStore

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


class APIHarness:
    """The control service's API in memory, on a ``Clock``, for one or more callers."""

    def __init__(self, config: Configuration = Configuration(), clock: Optional[Clock] = None,
                 store: Optional[MemoryConfigurationStore] = None):
        self.clock = clock or Clock()
        self.clock.advance(1_000_000)
        self.store = store or MemoryConfigurationStore(config)
        self.configuration = ConfigurationService(self.store, self.clock, self.store.config)
        self.cluster = ClusterStateService(self.clock)
        self.openapi = build_openapi(__version__)

    def api(self, identity: Optional[Identity]) -> ControlAPI:
        """The API as ``identity`` sees it."""
        return ControlAPI(self.configuration, self.cluster, lambda request: identity,
                          self.openapi)

    def request(self, testcase, method: str, path: str, body=None, *,
                identity: Optional[Identity] = ALICE, headers: Optional[dict] = None,
                raw: Optional[bytes] = None) -> Response:
        """Make one request; its response must match the OpenAPI document."""
        treq = StubTreq(self.api(identity).resource())
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        d = treq.request(method, "https://control.example" + path, data=data,
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
