"""The OpenAPI document is valid and documents exactly the routes the service has."""

from openapi_spec_validator import validate

from pyflock.control._api import ControlAPI, __version__
from pyflock.control._openapi import build_openapi, klein_rule_to_openapi


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
