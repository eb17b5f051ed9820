"""
The OpenAPI document is valid, documents exactly the routes the service has, and every
response it documents is one some test saw: each (path, method, status) in it is exercised
(``SEEN_RESPONSES`` collects what the API tests' responses were validated as), checked by a
test that runs after all others when the whole suite runs.
"""

import pytest
from openapi_spec_validator import validate
from twisted.trial.unittest import SynchronousTestCase

from pyflock.control._api import ControlAPI, __version__
from pyflock.control._openapi import build_openapi, klein_rule_to_openapi
from pyflock.control._store import StoreError
from pyflock.control.testing import NODE_A, SEEN_RESPONSES, APIHarness

A = NODE_A.node_uuid
DS = "11111111-2222-4333-8444-555555555555"
DATASETS = "/v1/configuration/datasets"
LEASES = "/v1/configuration/leases"


def documented_responses(document: dict) -> set:
    """Every (path template, method, status) the document lists."""
    return {(path, method, int(status))
            for path, operations in document["paths"].items()
            for method, operation in operations.items()
            for status in operation["responses"]}


def test_document_is_valid_openapi():
    """The document passes the OpenAPI 3.1 validator."""
    validate(build_openapi(__version__))


def test_every_route_documented():
    """Every (path, method) Klein serves is in the document, and nothing else is."""
    served = set()
    for rule in ControlAPI.app.url_map.iter_rules():
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            served.add((klein_rule_to_openapi(rule.rule), method.lower()))
    document = build_openapi(__version__)
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert served == documented


class DocumentedResponsesTests(SynchronousTestCase):
    """Documented responses no other API test needs: the document itself, a certificate
    that is neither a user's nor a node's on every route, and a failing store on every
    write."""

    def setUp(self):
        self.h = APIHarness()

    def req(self, *args, **kwargs):
        """One request through the harness (its response is checked against the document)."""
        return self.h.request(self, *args, **kwargs)

    def test_document_served(self):
        """``GET /v1/openapi.json`` answers the document the service was built with."""
        r = self.req("GET", "/v1/openapi.json")
        self.assertEqual((r.code, r.json), (200, build_openapi(__version__)))

    def test_every_route_refuses_other_certificates(self):
        """Every documented operation answers 403 to a caller that is neither a user nor a
        node, before looking at its input."""
        for template, operations in build_openapi(__version__)["paths"].items():
            path = template.replace("{dataset_id}", DS).replace("{era}", "era")
            for method in operations:
                with self.subTest(method=method, path=template):
                    r = self.req(method.upper(), path, {} if method == "post" else None,
                                 identity=None)
                    self.assertEqual(r.code, 403)
                    self.assertIn("may not use the API", r.json["description"])

    def test_failing_store_answers_503_on_every_write(self):
        """Moving, deleting, leasing and releasing answer 503 when the store fails the
        write, and change nothing."""
        writes = [
            ("POST", f"{DATASETS}/{DS}", {"metadata": {"name": "moved"}}),
            ("POST", LEASES, {"dataset_id": DS, "node_uuid": A, "expires": 60}),
            ("DELETE", f"{LEASES}/{DS}", None),
            ("DELETE", f"{DATASETS}/{DS}", None),
        ]
        self.assertEqual(self.req("POST", DATASETS, {"dataset_id": DS, "primary": A}).code,
                         201)
        for method, path, body in writes:
            with self.subTest(method=method, path=path):
                before = (self.h.store.config.datasets, self.h.store.config.leases)
                self.h.store.fail_next = StoreError("disk full")
                r = self.req(method, path, body)
                self.assertEqual(r.code, 503)
                self.assertIn("disk full", r.json["description"])
                self.assertEqual(
                    (self.h.store.config.datasets, self.h.store.config.leases), before)
                # The same write then succeeds, so the next one has something to act on.
                self.assertIn(self.req(method, path, body).code, (200, 201))


@pytest.mark.runs_last
def test_every_documented_response_exercised(whole_suite):
    """Every (path, method, status) the document lists was answered in some test of this
    run (runs after all others; only a run of the whole suite can judge)."""
    if whole_suite is not None:
        pytest.skip(f"cannot judge which documented responses no test exercises: "
                    f"{whole_suite}; run the whole suite (make test or make test-unit)")
    missing = documented_responses(build_openapi(__version__)) - SEEN_RESPONSES
    assert not missing, "documented responses no test exercised:\n" + "\n".join(
        f"  {method.upper()} {path} -> {status}" for path, method, status in sorted(missing))
