"""
What every route of the REST API shares: the Klein application, its JSON error answers
(declared errors, unknown routes and methods, an unavailable store, internal errors), the
caller's identity and what it may act for, body parsing and validation, URL checks, and the
site that logs failed requests. ``ControlAPI`` (``pyflock.control._api``) adds the routes.
"""

from __future__ import annotations

import json
import math
from typing import Callable, Optional
from urllib.parse import unquote_to_bytes

from klein import Klein
from twisted.logger import Logger, LogLevel
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from werkzeug.exceptions import MethodNotAllowed, NotFound

from pyflock.common._logging import log_event
from pyflock.control._persistence import StoreUnavailable
from pyflock.control._ratelimit import NodeLimits, QuotaCounts, WriteRateLimiter

#: Bodies larger than this are refused before parsing.
MAX_BODY = 1024 * 1024

#: The shortest and longest lease a node certificate may take, in seconds (issue 8): a
#: node cannot pin a dataset for longer than this without renewing it.
NODE_LEASE_BOUNDS = (1, 300)

_log = Logger()


class APIError(Exception):
    """An error response: status code, description and optional schema errors."""

    def __init__(self, code: int, description: str, errors: Optional[list[str]] = None,
                 holder: Optional[str] = None, zones: Optional[dict] = None,
                 headers: Optional[dict] = None):
        super().__init__(code, description)
        self.code = code
        self.description = description
        self.errors = errors
        self.holder = holder
        self.zones = zones
        self.headers = headers or {}


def _error_body(code: int, description: str, errors: Optional[list[str]] = None,
                holder: Optional[str] = None, zones: Optional[dict] = None) -> bytes:
    body: dict = {"description": description}
    if errors is not None:
        body["errors"] = errors
    if holder is not None:
        body["holder"] = holder
    if zones is not None:
        body["zones"] = zones
    return json.dumps(body).encode("utf-8")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes):
    """
    The JSON value of a request body, or ``APIError`` 400 saying why it is not one:
    malformed, NaN or Infinity, nested too deeply for the parser, or holding a string
    with a lone surrogate (which is no Unicode text, and could be neither stored nor
    answered).
    """
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"The request body is not valid JSON: {e}.")
    except RecursionError:
        raise APIError(400, "The request body is nested too deeply.")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "The request body is not valid Unicode: a string holds a lone "
                            "surrogate (a \\ud800-\\udfff escape that is not half of a "
                            "pair).")
    except RecursionError:
        raise APIError(400, "The request body is nested too deeply.")
    return body


def _encode(body) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


class _ValidURLs(Resource):
    """
    Answers a URL that is not UTF-8 with a JSON 400 before Klein sees it (Klein's own
    answer is plain text).
    """

    isLeaf = True

    def __init__(self, wrapped: Resource):
        super().__init__()
        self._wrapped = wrapped

    def render(self, request):
        try:
            unquote_to_bytes(request.path).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"application/json")
            return _error_body(400, "The URL is not valid UTF-8: percent-encode UTF-8 "
                                    "text, and name datasets by their UUID.")
        return self._wrapped.render(request)


class _LimitedRequest(Request):
    """
    A request whose body may not pass its site's ``max_body``: a larger one announced by
    ``Content-Length`` is answered 413 as soon as the headers are in, a chunked one when
    it passes the limit; either way the connection is closed, nothing more of the body is
    kept, and the request is never processed.
    """

    _received = 0
    _refused = False

    def gotLength(self, length) -> None:
        """Refuse at once a body announced larger than the limit."""
        if length is not None and length > self.channel.site.max_body:
            # No "100 Continue" after the refusal.
            self.requestHeaders.removeHeader(b"expect")
            self._refuse(length)
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Keep the chunk unless the body passes the limit with it."""
        self._received += len(data)
        if self._received > self.channel.site.max_body:
            self._refuse(None)
        if not self._refused:
            super().handleContentChunk(data)

    def process(self) -> None:
        """Process the request, unless its body was refused."""
        if not self._refused:
            super().process()

    def _refuse(self, length) -> None:
        """Answer 413 straight on the connection and close it (once)."""
        if self._refused:
            return
        self._refused = True
        limit = self.channel.site.max_body
        log_event(_log, "pyflock:control:request-too-large", LogLevel.warn,
                  peer=str(self.channel.transport.getPeer()), length=length, limit=limit)
        body = _error_body(413, f"The request body is larger than {limit} bytes.")
        # The request line may still be unread by the Request (it is set when the body is
        # complete), so the answer is written as Twisted answers a malformed request.
        self.channel.transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.channel.loseConnection()


class APISite(Site):
    """
    The HTTP site of the API: no form parsing (the API takes only JSON), request bodies
    of at most ``max_body`` bytes, and instead of an access line per request, a
    structured event for each request that failed.
    """

    def __init__(self, resource, max_body: int = MAX_BODY):
        super().__init__(resource, requestFactory=_LimitedRequest,
                         parsePOSTFormSubmission=False)
        self.max_body = max_body
        self.displayTracebacks = False
        self.noisy = False

    def log(self, request) -> None:
        if request.code >= 400:
            log_event(_log, "pyflock:control:request-error", method=request.method.decode(
                "ascii", "replace"), path=request.path.decode("utf-8", "replace"),
                code=request.code, certificate=_certificate_of(request))


def _certificate_of(request) -> Optional[str]:
    """The common name of the certificate a request was made with, once ``_caller`` has
    accepted it (else None)."""
    identity = getattr(request, "pyflock_caller", None)
    return None if identity is None else identity.common_name


class APIBase:
    """
    The Klein application the routes of ``ControlAPI`` hang on, with what they share.
    ``identify(request)`` tells who is calling (from the TLS client certificate in
    production); ``node_limits`` bounds what node certificates may make and how fast,
    counted by ``write_limiter`` (a new one if None; share one between instances that
    serve the same cluster).
    """

    app = Klein()

    def __init__(self, identify: Callable[[IRequest], object],
                 node_limits: NodeLimits = NodeLimits(),
                 write_limiter: Optional[WriteRateLimiter] = None):
        self._identify = identify
        self._node_limits = node_limits
        self._node_writes = write_limiter or WriteRateLimiter(node_limits.writes)
        self._quota_counts = QuotaCounts()

    def resource(self) -> Resource:
        """The API as a twisted.web resource."""
        return _ValidURLs(self.app.resource())

    # -- plumbing ---------------------------------------------------------------------

    @app.handle_errors(NotFound)
    def _not_found(self, request, failure):
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return _error_body(404, f"No such route: {request.path.decode('utf-8', 'replace')}. "
                                f"See /v1/openapi.json for the API.")

    @app.handle_errors(MethodNotAllowed)
    def _not_allowed(self, request, failure):
        allowed = ", ".join(getattr(failure.value, "valid_methods", None) or [])
        request.setResponseCode(405)
        request.setHeader(b"content-type", b"application/json")
        if allowed:
            request.setHeader(b"allow", allowed.encode("ascii"))
        return _error_body(405, f"Method {request.method.decode('ascii', 'replace')} is not "
                                f"allowed here; allowed: {allowed or 'none'}.")

    @app.handle_errors(APIError)
    def _api_error(self, request, failure):
        error = failure.value
        request.setResponseCode(error.code)
        request.setHeader(b"content-type", b"application/json")
        for name, value in error.headers.items():
            request.setHeader(name, value)
        return _error_body(error.code, error.description, error.errors, error.holder,
                           error.zones)

    @app.handle_errors(StoreUnavailable)
    def _unavailable(self, request, failure):
        request.setResponseCode(503)
        request.setHeader(b"content-type", b"application/json")
        return _error_body(503, f"The configuration store is unavailable "
                                f"({failure.value}); the change may or may not have been "
                                f"made: read the configuration, then retry.")

    @app.handle_errors(Exception)
    def _internal(self, request, failure):
        log_event(_log, "pyflock:control:request-failed", LogLevel.error, traceback=failure.getTraceback(),
                  path=request.path.decode("utf-8", "replace"))
        request.setResponseCode(500)
        request.setHeader(b"content-type", b"application/json")
        return _error_body(500, "Internal error; the control service's log has details.")

    def _json(self, request, body, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return body if isinstance(body, bytes) else _encode(body)

    def _caller(self, request):
        identity = self._identify(request)
        if identity is None or getattr(identity, "kind", None) not in ("user", "node"):
            raise APIError(403, "This certificate may not use the API: use a user-* or "
                                "node-* certificate signed by this cluster's CA.")
        request.pyflock_caller = identity
        return identity

    def _audit(self, request, event_type: str, **fields) -> None:
        """Log a change (``event_type``, ``fields``) naming the certificate that made it:
        the audit trail of who created, moved, deleted or restored what."""
        log_event(_log, event_type, certificate=_certificate_of(request), **fields)

    def _node_write(self, identity, now: float) -> None:
        """Count a dataset write of a node certificate at ``now``; 429 with Retry-After
        when it writes faster than its limit. User certificates are not limited."""
        if identity.kind != "node":
            return
        wait = self._node_writes.take(identity.node_uuid, now)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            policy = self._node_limits.writes
            raise APIError(429, f"Node {identity.node_uuid} changes datasets faster than "
                                f"{policy.rate:g} per second (bursts of {policy.burst}): "
                                f"retry in {seconds} s.",
                           headers={b"retry-after": str(seconds).encode("ascii")})

    def _node_quota(self, identity, configuration) -> None:
        """Refuse (403) a node certificate's create when its node is already the primary
        of its quota of live datasets. User certificates have no quota."""
        if identity.kind != "node":
            return
        quota = self._node_limits.dataset_quota
        count = self._quota_counts.at_quota(configuration, identity.node_uuid, quota)
        if count is not None:
            log_event(_log, "pyflock:control:request-refused", node_uuid=identity.node_uuid,
                      action="create a dataset past its quota", quota=quota)
            raise APIError(403, f"Node {identity.node_uuid} is already the primary of "
                                f"{count} live datasets, its quota: a node certificate may "
                                f"create no more; delete some, or create it with a user "
                                f"certificate.")

    def _act_as(self, identity, node_uuid: Optional[str], what: str) -> None:
        """Refuse unless ``identity`` may act for ``node_uuid``; nodes act only for themselves."""
        if identity.kind == "node" and identity.node_uuid != node_uuid:
            log_event(_log, "pyflock:control:request-refused", node_uuid=identity.node_uuid,
                      action=what)
            raise APIError(403, f"Node {identity.node_uuid} may not {what}: a node "
                                f"certificate acts only for its own node.")

    def _user_only(self, request, what: str):
        """The caller, who must hold a user certificate to ``what``; 403 for a node."""
        identity = self._caller(request)
        if identity.kind != "user":
            log_event(_log, "pyflock:control:request-refused", node_uuid=identity.node_uuid,
                      action=what)
            raise APIError(403, f"Only a user certificate may {what}; node certificates "
                                f"may not.")
        return identity

    def _node_lease(self, identity, node_uuid: str, expires) -> None:
        """Refuse a node's lease unless it is its own and ``expires`` is within
        ``NODE_LEASE_BOUNDS`` (never null); user certificates are not bound."""
        if identity.kind != "node":
            return
        self._act_as(identity, node_uuid, "take a lease for another node")
        low, high = NODE_LEASE_BOUNDS
        if expires is None or not low <= expires <= high:
            log_event(_log, "pyflock:control:request-refused", node_uuid=identity.node_uuid,
                      action="take an unbounded lease", expires=expires)
            given = "null (forever)" if expires is None else expires
            raise APIError(403, f"A node certificate may take a lease of {low} to {high} "
                                f"seconds only, not {given}: renew it while the dataset "
                                f"is in use.")

    def _body(self, request, validator) -> dict:
        raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if len(raw) > MAX_BODY:
            raise APIError(413, f"The request body is larger than {MAX_BODY} bytes.")
        body = parse_json(raw)
        if not validator.is_valid(body):
            raise APIError(400, "The provided JSON doesn't match the required schema.",
                           validator.errors(body))
        return body
