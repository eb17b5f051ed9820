"""
The join service: where a new host trades a join token and a certificate signing request
for its node certificate, on the join port (``pyflock-control --join-port``, 4526).

The port speaks server-authenticated TLS only (``ClusterTLS.join_listener``): the host has
no certificate yet. The exchange is two HTTPS requests:

1. ``GET /v1/join/authority`` answers ``cluster.crt`` (PEM). The host fetches it over a
   connection it does not trust yet and accepts it only if its public key has the token's
   pin.
2. ``POST /v1/join`` with ``{"token": ..., "csr": PEM}``, over a connection that now
   trusts only that CA and the control service's host name, answers
   ``{"node_uuid", "certificate", "authority"}`` (200); 400 for a malformed body or
   request, 403 with one line for a bad, expired or used-up token, 429 with
   ``Retry-After`` for a source address that failed too often, 503 when the certificate
   could not be issued. The token is sent only once the server is known, so a man in the
   middle never sees it; the private key never leaves the host.

A new node gets a new uuid; the request's subject is ignored.
"""

from __future__ import annotations

import json
import math
from typing import Callable
from uuid import uuid4

from cryptography.hazmat.primitives import serialization
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel
from twisted.web.server import Request, Site

from pyflock.common._ca import CertificateError, InvalidRequest, parse_signing_request
from pyflock.common._logging import log_event
from pyflock.common._tokens import InvalidToken, parse_token
from pyflock.control._store import StoreError
from pyflock.control._tokens import FailureLimiter, TokenRefused, TokenService

#: The largest join request body: a token and a P-256 request are well under 2 KiB.
MAX_JOIN_BODY = 16 * 1024

_log = Logger()


#: Seconds a join connection may stay idle before it is closed.
JOIN_IDLE_TIMEOUT = 30.0


class _LimitedRequest(Request):
    """
    A request whose body may not pass ``MAX_JOIN_BODY``: anyone may reach the join port,
    so a larger body (announced, or sent chunked) closes the connection at once, before
    it is kept in memory or on disk.
    """

    _received = 0
    _cut = False

    def gotLength(self, length) -> None:
        """Close the connection at once when the announced body is too large."""
        if length is not None and length > MAX_JOIN_BODY:
            self._cut_off()
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Keep the chunk unless the body passes the limit with it."""
        self._received += len(data)
        if self._received > MAX_JOIN_BODY:
            self._cut_off()
        if not self._cut:
            super().handleContentChunk(data)

    def _cut_off(self) -> None:
        """Drop the connection (once)."""
        if not self._cut:
            self._cut = True
            log_event(_log, "pyflock:control:join-refused", LogLevel.warn,
                      source=self.getClientAddress().host, token_id=None,
                      reason=f"the request body passes {MAX_JOIN_BODY} bytes")
            self.channel.transport.loseConnection()


class _Answer(Exception):
    """An error answer of the join service: status and the one line it says."""

    def __init__(self, code: int, description: str):
        super().__init__(code, description)
        self.code = code
        self.description = description


def _pem(certificate) -> str:
    """``certificate`` as PEM text."""
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


class JoinService:
    """
    The join port's Klein application: redeems tokens through ``tokens``, signs with
    ``sign(request, node_uuid)`` (a Deferred of the certificate, recorded in the CA's
    index; blocking work belongs in a thread), answers ``authority`` (the CA
    certificate) and refuses sources ``limiter`` holds back.
    """

    app = Klein()

    def __init__(self, tokens: TokenService, authority, sign: Callable[..., Deferred],
                 limiter: FailureLimiter):
        self._tokens = tokens
        self._authority = _pem(authority)
        self._sign = sign
        self._limiter = limiter

    def site(self, reactor=None) -> Site:
        """The join service as a twisted.web site, timing out idle connections on
        ``reactor`` (the global one if None)."""
        site = Site(self.app.resource(), requestFactory=_LimitedRequest,
                    timeout=JOIN_IDLE_TIMEOUT, parsePOSTFormSubmission=False,
                    reactor=reactor)
        site.displayTracebacks = False
        site.noisy = False
        site.log = lambda request: None
        return site

    @app.handle_errors(_Answer)
    def _answer(self, request, failure):
        answer = failure.value
        request.setResponseCode(answer.code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"description": answer.description}).encode("utf-8")

    @app.handle_errors(Exception)
    def _internal(self, request, failure):
        log_event(_log, "pyflock:control:join-failed", LogLevel.error,
                  source=request.getClientAddress().host, token_id=None,
                  reason=failure.getTraceback())
        request.setResponseCode(500)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"description": "internal error; the control service's log has "
                                          "details"}).encode("utf-8")

    @app.route("/v1/join/authority", methods=["GET"])
    def authority(self, request):
        """The cluster's CA certificate (PEM), for the host to check against its pin."""
        request.setHeader(b"content-type", b"application/x-pem-file")
        return self._authority.encode("ascii")

    def _refuse(self, source: str, token_id, reason: str) -> _Answer:
        """Count a failure of ``source`` and the 403 that says ``reason``."""
        self._limiter.failed(source)
        log_event(_log, "pyflock:control:join-refused", LogLevel.warn, source=source,
                  token_id=token_id, reason=reason)
        return _Answer(403, reason)

    def _read(self, request) -> tuple[str, str]:
        """The token and request text of the body, or a 400."""
        raw = request.content.read(MAX_JOIN_BODY + 1) if request.content else b""
        if len(raw) > MAX_JOIN_BODY:
            raise _Answer(400, f"the join request is larger than {MAX_JOIN_BODY} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            raise _Answer(400, "the join request is not JSON") from None
        if not (isinstance(body, dict) and isinstance(body.get("token"), str)
                and isinstance(body.get("csr"), str)):
            raise _Answer(400, 'the join request must be {"token": TEXT, "csr": PEM}')
        return body["token"], body["csr"]

    @app.route("/v1/join", methods=["POST"])
    async def join(self, request):
        """Redeem a token for a node certificate signed for the request's key."""
        source = request.getClientAddress().host
        wait = self._limiter.retry_after(source)
        if wait is not None:
            request.setHeader(b"retry-after", str(max(1, math.ceil(wait))).encode())
            raise _Answer(429, f"too many failed joins from {source}; try again in "
                               f"{max(1, math.ceil(wait))} s")
        text, pem = self._read(request)
        try:
            token = parse_token(text)
        except InvalidToken as e:
            raise self._refuse(source, None, str(e))
        try:
            signing_request = parse_signing_request(pem)
        except InvalidRequest as e:
            raise _Answer(400, str(e))
        try:
            await self._tokens.redeem(token)
        except TokenRefused as e:
            raise self._refuse(source, token.token_id, str(e))
        except StoreError as e:
            raise _Answer(503, f"the control service could not record the token's use "
                               f"({e}); try again")
        node_uuid = str(uuid4())
        try:
            certificate = await self._sign(signing_request, node_uuid)
        except CertificateError as e:
            log_event(_log, "pyflock:control:join-failed", LogLevel.error, source=source,
                      token_id=token.token_id, reason=str(e))
            raise _Answer(503, f"the control service could not issue the certificate "
                               f"({e}); its log has details")
        log_event(_log, "pyflock:control:joined", source=source, token_id=token.token_id,
                  node_uuid=node_uuid, serial=format(certificate.serial_number, "x"))
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"node_uuid": node_uuid, "certificate": _pem(certificate),
                           "authority": self._authority}).encode("utf-8")
