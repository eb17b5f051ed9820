"""
The OpenAPI 3.1 document of the REST API, built from the same schemas that validate
requests (``_schema``); a test checks that every route is documented and that every
response the tests see validates against it.
"""

from __future__ import annotations

import re
from typing import Optional

from jsonschema import Draft202012Validator

from pyflock.control import _schema as s

_JSON = "application/json"

_ERRORS = {
    400: "Malformed input: bad JSON, a schema violation (see `errors`) or a bad id.",
    403: "The certificate may not do this (a node acting for another node, taking a lease "
         "of more than 300 s, or creating past its dataset quota; or a certificate that "
         "is neither a user's nor a node's).",
    404: "No such dataset, lease or node.",
    405: "The dataset is deleted.",
    409: "Conflict: id or name taken, a lease held by another node (then the error's "
         "``holder`` is that node's uuid), or a move between availability zones (then "
         "its ``zones`` names both).",
    410: "The deleted dataset's data is no longer kept: it cannot be restored.",
    412: "X-If-Configuration-Matches did not match the current configuration tag.",
    413: "The request body is larger than 1 MiB (answered as soon as Content-Length says "
         "so, or when a chunked body passes it; the connection is then closed).",
    429: "A node certificate changes datasets faster than its limit (20 a second, bursts "
         "of 100 by default); retry after the seconds of the Retry-After header. User "
         "certificates are not limited.",
    503: "The configuration store failed a write; retry shortly.",
}

_TAG_HEADER = {"X-Configuration-Tag": {
    "description": "The configuration generation after this request.",
    "schema": {"type": "string"}}}

#: The large lists answer gzip to clients that accept it (issue 12, docs/api.md).
_ACCEPT_ENCODING = {"name": "Accept-Encoding", "in": "header", "required": False,
                    "description": "With gzip accepted (q-value above 0, and no lower than "
                                   "identity's if identity is named), the list is sent "
                                   "gzip-compressed.",
                    "schema": {"type": "string"}}
_GZIP_HEADERS = {
    "Content-Encoding": {"description": "gzip when the list is sent compressed; absent "
                                        "otherwise.", "schema": {"const": "gzip"}},
    "Vary": {"description": "Accept-Encoding: the encoding depends on it.",
             "schema": {"type": "string"}}}

_RETRY_AFTER = {"Retry-After": {
    "description": "Whole seconds to wait before retrying.",
    "schema": {"type": "integer", "minimum": 1}}}

_IF_MATCHES = {"name": "X-If-Configuration-Matches", "in": "header", "required": False,
               "description": "Apply the change only if the configuration tag still "
                              "equals this value (else 412).",
               "schema": {"type": "string"}}


def _op(summary: str, ok: dict, errors: tuple[int, ...] = (), body: Optional[dict] = None,
        params: tuple = (), ok_headers: Optional[dict] = None) -> dict:
    responses = {}
    for code, (description, schema) in ok.items():
        response = {"description": description,
                    "content": {_JSON: {"schema": schema}}}
        if ok_headers:
            response["headers"] = ok_headers
        responses[str(code)] = response
    # Every route refuses a certificate that is neither a user's nor a node's (403), and
    # every route with a body one that is too large (413); each operation lists the
    # other errors it can answer (a test checks each is exercised).
    for code in sorted(set(errors) | {403} | ({413} if body is not None else set())):
        responses[str(code)] = {"description": _ERRORS[code],
                                "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}
        if code == 429:
            responses[str(code)]["headers"] = _RETRY_AFTER
    op = {"summary": summary, "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {_JSON: {"schema": body}}}
    if params:
        op["parameters"] = list(params)
    return op


def _path_param(name: str, description: str, schema: dict) -> dict:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": schema}


_DATASET_ID = _path_param("dataset_id", "The dataset's UUID.", s.UUID)
_ERA = _path_param("era", "A node's era (changes when the node reboots).", {"type": "string"})
_NODE_UUID = _path_param("node_uuid", "The node's UUID.", s.UUID)


_PURGE = {"name": "purge", "in": "query", "required": False,
          "description": "pyflock addition: `true` lets the data go now rather than "
                         "after the retention period (user certificates only: 403 for a "
                         "node).",
          "schema": {"type": "string", "enum": ["true", "false"]}}


def _restore_op() -> dict:
    """pyflock addition: restoring a deleted dataset (user certificates only)."""
    op = _op("pyflock addition: restore a deleted dataset whose data is still kept, "
             "optionally under a new `metadata.name` (user certificates only).",
             {200: ("The restored dataset.", {"$ref": "#/components/schemas/Dataset"})},
             (400, 404, 409, 410, 412, 503), body=s.RESTORE_DATASET,
             params=(_DATASET_ID, _IF_MATCHES), ok_headers=_TAG_HEADER)
    op["requestBody"]["required"] = False
    return op


_TOKEN_ID = _path_param("token_id", "The token's id (16 hex digits).",
                        {"type": "string"})

#: What the join-token routes' errors mean (they differ from the datasets' ones).
_TOKEN_ERRORS = {
    403: "Only a user certificate may manage join tokens.",
    404: "No join token has this id.",
    409: "This control service serves no joins: it was started without the CA key "
         "(--ca-key).",
}


def _token_op(summary: str, ok: dict, errors: tuple[int, ...] = (),
              body: Optional[dict] = None, params: tuple = ()) -> dict:
    """An operation of the join-token routes (user certificates only)."""
    op = _op(summary, ok, errors + (409,), body=body, params=params)
    for code, description in _TOKEN_ERRORS.items():
        if str(code) in op["responses"]:
            op["responses"][str(code)]["description"] = description
    return op


def _token_paths() -> dict:
    """The join-token routes (issue 10)."""
    token = {"$ref": "#/components/schemas/Token"}
    return {
        "/v1/tokens": {
            "get": _token_op("pyflock addition: every join token (never their secrets).",
                             {200: ("Join tokens.", s.array_of(token))}),
            "post": _token_op("pyflock addition: create a join token; the answer is the "
                              "only place its secret is ever shown.",
                              {201: ("The new token.", s.NEW_TOKEN)}, (400, 503),
                              body=s.CREATE_TOKEN),
        },
        "/v1/tokens/{token_id}": {"delete": _token_op(
            "pyflock addition: revoke a join token.", {200: ("The revoked token.", token)},
            (400, 404, 503), params=(_TOKEN_ID,))},
    }


def build_openapi(version: str) -> dict:
    """The OpenAPI document for this version of the service."""
    ref = {name: {"$ref": f"#/components/schemas/{name}"}
           for name in ("Dataset", "DatasetState", "Node", "Lease")}
    paths = {
        "/v1/version": {"get": _op("The versions of the API and of pyflock.",
                                   {200: ("Versions.", s.VERSION)})},
        "/v1/openapi.json": {"get": _op("This document.",
                                        {200: ("The OpenAPI document.", {"type": "object"})})},
        "/v1/configuration/datasets": {
            "get": _op("Every live dataset, every deleted one whose data is kept "
                       "(`retained_until`), and deleted ones some node still holds.",
                       {200: ("Datasets.", s.array_of(ref["Dataset"]))},
                       params=(_ACCEPT_ENCODING,), ok_headers={**_TAG_HEADER, **_GZIP_HEADERS}),
            "post": _op("Create a dataset.",
                        {201: ("The new dataset.", ref["Dataset"])},
                        (400, 409, 412, 429, 503),
                        body=s.CREATE_DATASET, params=(_IF_MATCHES,),
                        ok_headers=_TAG_HEADER),
        },
        "/v1/configuration/datasets/{dataset_id}": {
            "post": _op("Move a dataset (set `primary`) and/or replace its metadata.",
                        {200: ("The updated dataset.", ref["Dataset"])},
                        (400, 404, 405, 409, 412, 429, 503),
                        body=s.UPDATE_DATASET, params=(_DATASET_ID, _IF_MATCHES),
                        ok_headers=_TAG_HEADER),
            "delete": _op("Delete a dataset (idempotent); its data is kept, restorable, "
                          "for the control service's --deleted-retention unless "
                          "`purge=true`.",
                          {200: ("The deleted dataset.", ref["Dataset"])},
                          (400, 404, 409, 412, 429, 503),
                          params=(_DATASET_ID, _IF_MATCHES, _PURGE), ok_headers=_TAG_HEADER),
        },
        "/v1/configuration/datasets/{dataset_id}/restore": {"post": _restore_op()},
        "/v1/state/datasets": {"get": _op(
            "Datasets as the live nodes report them.",
            {200: ("Dataset states.", s.array_of(ref["DatasetState"]))},
            params=(_ACCEPT_ENCODING,), ok_headers=_GZIP_HEADERS)},
        "/v1/state/nodes": {"get": _op(
            "Every known node.", {200: ("Nodes.", s.array_of(ref["Node"]))})},
        "/v1/state/nodes/by_era/{era}": {"get": _op(
            "The node whose current era is given.",
            {200: ("The node.", s.NODE_BY_ERA)}, (400, 404), params=(_ERA,))},
        "/v1/state/control": {"get": _op(
            "pyflock addition: the control service's replicas, the one that leads and, on "
            "etcd, the etcd members.", {200: ("The control service.", s.CONTROL_STATUS)},
            (503,))},
        "/v1/state/nodes/{node_uuid}": {"delete": _op(
            "pyflock addition: forget a dead node that is the primary of no live dataset "
            "and holds no lease (user certificates only; 409 says what holds it).",
            {200: ("The forgotten node.", ref["Node"])}, (400, 404, 409),
            params=(_NODE_UUID,))},
        "/v1/configuration/leases": {
            "get": _op("Every valid lease.", {200: ("Leases.", s.array_of(ref["Lease"]))}),
            "post": _op("Take (201) or renew (200) a lease.",
                        {200: ("The renewed lease.", ref["Lease"]),
                         201: ("The new lease.", ref["Lease"])}, (400, 404, 409, 503),
                        body=s.ACQUIRE_LEASE),
        },
        "/v1/configuration/leases/{dataset_id}": {"delete": _op(
            "Release a lease.", {200: ("The released lease.", ref["Lease"])}, (400, 404, 503),
            params=(_DATASET_ID,))},
        **_token_paths(),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "pyflock control service", "version": version,
                 "description": "Flocker-compatible REST API v1 over mutual TLS. "
                                "See docs/api.md."},
        "paths": paths,
        "components": {"schemas": {
            "Dataset": s.DATASET, "DatasetState": s.DATASET_STATE, "Node": s.NODE,
            "Lease": s.LEASE, "Error": s.ERROR, "Token": s.TOKEN}},
    }


def klein_rule_to_openapi(rule: str) -> str:
    """``/a/<x>`` (Klein/werkzeug) as ``/a/{x}`` (OpenAPI)."""
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule)


def match_path(document: dict, path: str) -> Optional[str]:
    """The documented path template that ``path`` matches, if any."""
    for template in document["paths"]:
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            return template
    return None


def response_validator(document: dict, template: str, method: str,
                       status: int) -> Draft202012Validator:
    """A validator of the documented body of one response."""
    operation = document["paths"][template][method.lower()]
    schema = operation["responses"][str(status)]["content"][_JSON]["schema"]
    return Draft202012Validator({**schema, "components": document["components"]})
