"""
The join service in memory (``JoinService`` through ``StubTreq``, a real CA, a Clock): a
good token buys a node certificate recorded in the CA's index; bad, expired and used-up
tokens get one line; repeated failures are held back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from cryptography import x509
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._join import check_certificate, signing_request
from pyflock.common._ca import (
    CertificateIndex, OutputPathError, initialize, load_signing_authority,
    sign_node_request,
)
from pyflock.common._tokens import authority_pin
from pyflock.control._join import JOIN_IDLE_TIMEOUT, MAX_JOIN_BODY, JoinService
from pyflock.control._store import MemoryConfigurationStore
from pyflock.control._tokens import FailureLimiter, TokenService

URL = "https://control.example:4526/v1/join"


def _folder(testcase) -> str:
    """A new temporary folder, removed after ``testcase``."""
    folder = tempfile.mkdtemp(prefix="pyflock-join-")
    testcase.addCleanup(shutil.rmtree, folder, True)
    return folder


class JoinServiceTests(SynchronousTestCase):
    """What the join port answers."""

    def setUp(self):
        folder = _folder(self)
        initialize(folder, "test")
        self.authority = load_signing_authority(f"{folder}/cluster.crt",
                                                f"{folder}/cluster.key")
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = MemoryConfigurationStore()
        self.tokens = self.successResultOf(Deferred.fromCoroutine(TokenService.load(
            self.store, self.clock, authority_pin(self.authority.certificate))))
        self.sign_error = None
        self.service = service = JoinService(self.tokens, self.authority.certificate, self.sign,
                              FailureLimiter(self.clock, limit=3, window=60.0))
        self.http = StubTreq(service.app.resource())

    def sign(self, request, node_uuid):
        """Sign synchronously (the service runs it in a thread)."""
        if self.sign_error is not None:
            return fail(self.sign_error)
        return succeed(sign_node_request(self.authority, request, node_uuid))

    def token(self, **kwargs) -> str:
        """A new token's text."""
        token, _ = self.successResultOf(Deferred.fromCoroutine(self.tokens.create(**kwargs)))
        return str(token)

    def post(self, body) -> tuple[int, dict, object]:
        """POST ``body`` (JSON unless bytes); (code, headers, parsed answer)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = self.successResultOf(self.http.post(URL, data=data))
        content = self.successResultOf(response.content())
        headers = {k.decode().lower(): v[0].decode()
                   for k, v in response.headers.getAllRawHeaders()}
        return response.code, headers, json.loads(content)

    def join(self, token: str):
        """Join with ``token`` and a new key; (code, answer, key)."""
        key, csr = signing_request()
        code, _, answer = self.post({"token": token, "csr": csr})
        return code, answer, key

    def test_authority(self):
        """``GET /v1/join/authority`` answers the CA certificate."""
        response = self.successResultOf(self.http.get(URL + "/authority"))
        pem = self.successResultOf(response.content())
        self.assertEqual(self.authority.certificate, x509.load_pem_x509_certificate(pem))

    def test_join(self):
        """A good token buys a node certificate for the request's key, in the index."""
        code, answer, key = self.join(self.token())
        self.assertEqual(200, code, answer)
        certificate, node_uuid = check_certificate(answer["certificate"],
                                                   self.authority.certificate, key)
        self.assertEqual(node_uuid, answer["node_uuid"])
        [entry] = self.authority.index.entries()
        self.assertEqual((certificate.serial_number, f"node-{node_uuid}", "join"),
                         (entry.serial, entry.common_name, entry.issued_by))

    def test_used_up(self):
        """A one-use token joins once; the second join is refused in one line."""
        token = self.token()
        self.assertEqual(200, self.join(token)[0])
        code, answer, _ = self.join(token)
        self.assertEqual(403, code)
        self.assertIn("is used up", answer["description"])
        self.assertEqual(1, len(self.authority.index.entries()))

    def test_expired(self):
        """An expired token is refused."""
        token = self.token(ttl=10.0)
        self.clock.advance(10)
        code, answer, _ = self.join(token)
        self.assertEqual((403, True), (code, "has expired" in answer["description"]))

    def test_malformed_token(self):
        """Text that is no token is refused with what is wrong with it."""
        code, answer, _ = self.join("pyflock-join1.x")
        self.assertEqual(403, code)
        self.assertIn("parts", answer["description"])

    def test_bad_requests(self):
        """Bodies that are not the join request, or bad requests, answer 400."""
        token = self.token()
        for body in (b"[", b"[" * 16_000, {"token": token},
                     {"token": token, "csr": "nonsense"}):
            with self.subTest(body=body):
                self.assertEqual(400, self.post(body)[0])
        self.assertEqual(0, self.tokens.book.records()[0].used)

    def test_rate_limited(self):
        """After 3 failures the source gets 429 with Retry-After, even with a good token."""
        for _ in range(3):
            self.assertEqual(403, self.join("pyflock-join1.x")[0])
        key, csr = signing_request()
        code, headers, answer = self.post({"token": self.token(), "csr": csr})
        self.assertEqual((429, "60"), (code, headers["retry-after"]))
        self.assertIn("too many failed joins", answer["description"])
        self.clock.advance(60)
        self.assertEqual(200, self.join(self.token())[0])

    def test_bug_answers_500(self):
        """A signer that fails unexpectedly answers a JSON 500, no traceback."""
        self.sign_error = ZeroDivisionError("bug")
        code, answer, _ = self.join(self.token())
        self.assertEqual(500, code)
        self.assertNotIn("Traceback", answer["description"])

    def test_signing_fails(self):
        """A certificate that cannot be issued answers 503 saying why."""
        self.sign_error = OutputPathError("cannot write the CA's index")
        code, answer, _ = self.join(self.token())
        self.assertEqual(503, code)
        self.assertIn("cannot write the CA's index", answer["description"])


    def connect(self):
        """The join site's protocol on a fake connection from 10.0.0.9; its transport."""
        protocol = self.service.site(self.clock).buildProtocol(
            IPv4Address("TCP", "10.0.0.9", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 40000))
        protocol.makeConnection(transport)
        return protocol, transport

    def test_announced_large_body_cut(self):
        """A body announced larger than the limit closes the connection at once."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST /v1/join HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: %d\r\n\r\n" % (MAX_JOIN_BODY + 1))
        self.assertTrue(transport.disconnecting)

    def test_chunked_large_body_cut(self):
        """A chunked body is cut off as soon as it passes the limit."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST /v1/join HTTP/1.1\r\nHost: x\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 4096
        for _ in range(MAX_JOIN_BODY // len(chunk)):
            protocol.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"1\r\nx\r\n")
        self.assertTrue(transport.disconnecting)

    def test_idle_connection_closed(self):
        """A connection that sends nothing is closed after the idle timeout."""
        protocol, transport = self.connect()
        self.clock.advance(JOIN_IDLE_TIMEOUT)
        self.assertTrue(transport.disconnecting)


class IndexTests(SynchronousTestCase):
    """The CA's index of issued certificates."""

    def test_torn_line_ignored_and_cut(self):
        """A torn last line is ignored, and the next entry replaces it."""
        folder = _folder(self)
        initialize(folder, "test")
        authority = load_signing_authority(f"{folder}/cluster.crt", f"{folder}/cluster.key")
        key, csr = signing_request()
        request = x509.load_pem_x509_csr(csr.encode())
        sign_node_request(authority, request, "11111111-2222-4333-8444-555555555555")
        with open(authority.index.path, "ab") as f:
            f.write(b'{"kind": "issued", "ser')
        self.assertEqual(1, len(CertificateIndex(authority.index.path).entries()))
        sign_node_request(authority, request, "11111111-2222-4333-8444-666666666666")
        self.assertEqual(2, len(authority.index.entries()))
        self.assertEqual(0o600, os.stat(authority.index.path).st_mode & 0o777)
