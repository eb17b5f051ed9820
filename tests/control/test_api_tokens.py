"""
The join-token routes (``/v1/tokens``, a pyflock addition): a user creates, lists and
revokes tokens; the store keeps only hashes; every answer matches the OpenAPI document.
"""

from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._tokens import parse_token, secret_hash
from pyflock.control._store import StoreError
from pyflock.control._tokens import TokenRefused
from pyflock.control.testing import NODE_A, APIHarness

TOKENS = "/v1/tokens"


class TokenRouteTests(SynchronousTestCase):
    """Creating, listing and revoking join tokens through the REST API."""

    def setUp(self):
        self.h = APIHarness()

    def create(self, body=None, **kwargs):
        """POST a new token."""
        return self.h.request(self, "POST", TOKENS, {} if body is None else body, **kwargs)

    def test_create_defaults(self):
        """A new token lasts an hour for one use; the answer carries the whole token."""
        r = self.create()
        self.assertEqual(201, r.code)
        now = self.h.clock.seconds()
        self.assertEqual((now, now + 3600, 1, 0, "usable"),
                         (r.json["created"], r.json["expires"], r.json["uses"],
                          r.json["used"], r.json["state"]))
        token = parse_token(r.json["token"])
        self.assertEqual((self.h.pin, r.json["token_id"]), (token.pin, token.token_id))

    def test_store_keeps_only_the_hash(self):
        """The store holds the secret's hash, and the secret appears nowhere in it."""
        r = self.create({"ttl": 60, "uses": 3})
        token = parse_token(r.json["token"])
        [record] = self.h.store.tokens.values()
        self.assertEqual((secret_hash(token.secret), 3, 60.0),
                         (record.secret_hash, record.uses, record.expires - record.created))
        self.assertNotIn(token.secret, repr(self.h.store.tokens))

    def test_list_without_secrets(self):
        """The list shows every token and its state, never a secret."""
        first = self.create({"ttl": 10}).json
        self.h.clock.advance(1)
        second = self.create({"uses": 2}).json
        self.h.clock.advance(10)
        r = self.h.request(self, "GET", TOKENS)
        self.assertEqual(200, r.code)
        self.assertEqual([(first["token_id"], "expired"), (second["token_id"], "usable")],
                         [(t["token_id"], t["state"]) for t in r.json])
        self.assertNotIn("token", r.json[0])

    def test_revoke(self):
        """A revoked token is gone from the list and the store and can no longer join."""
        created = self.create().json
        r = self.h.request(self, "DELETE", f"{TOKENS}/{created['token_id']}")
        self.assertEqual((200, created["token_id"]), (r.code, r.json["token_id"]))
        self.assertEqual([], self.h.request(self, "GET", TOKENS).json)
        self.assertEqual({}, self.h.store.tokens)
        self.assertRaises(TokenRefused, self.h.tokens.redeem, parse_token(created["token"]))

    def test_revoke_unknown(self):
        """Revoking a token that does not exist answers 404."""
        r = self.h.request(self, "DELETE", f"{TOKENS}/0123456789abcdef")
        self.assertEqual(404, r.code)
        self.assertIn("0123456789abcdef", r.json["description"])

    def test_revoke_bad_id(self):
        """A token id that is not 16 hex digits answers 400."""
        r = self.h.request(self, "DELETE", f"{TOKENS}/not-an-id")
        self.assertEqual(400, r.code)

    def test_bad_bodies(self):
        """A ttl or use count out of range, or an unknown field, answers 400."""
        for body in ({"ttl": 0}, {"uses": 0}, {"uses": 1.5}, {"ttl": 10 ** 9},
                     {"colour": "red"}, []):
            with self.subTest(body=body):
                r = self.create(body)
                self.assertEqual(400, r.code)
        self.assertEqual({}, self.h.store.tokens)

    def test_node_certificate_refused(self):
        """A node certificate may not create, list or revoke tokens: 403."""
        for method, path, body in (("POST", TOKENS, {}), ("GET", TOKENS, None),
                                   ("DELETE", f"{TOKENS}/0123456789abcdef", None)):
            with self.subTest(method=method):
                r = self.h.request(self, method, path, body, identity=NODE_A)
                self.assertEqual(403, r.code)
                self.assertIn("Only a user certificate", r.json["description"])

    def test_no_joins_conflict(self):
        """A control service without the CA key answers 409 on every token route."""
        h = APIHarness(joins=False)
        for method, path, body in (("POST", TOKENS, {}), ("GET", TOKENS, None),
                                   ("DELETE", f"{TOKENS}/0123456789abcdef", None)):
            with self.subTest(method=method):
                r = h.request(self, method, path, body)
                self.assertEqual(409, r.code)
                self.assertIn("--ca-key", r.json["description"])

    def test_store_failure(self):
        """A store that fails the write answers 503 and keeps nothing, either way."""
        self.h.store.fail_next = StoreError("disk full")
        r = self.create()
        self.assertEqual(503, r.code)
        self.assertIn("disk full", r.json["description"])
        self.assertEqual([], self.h.request(self, "GET", TOKENS).json)
        created = self.create().json
        self.h.store.fail_next = StoreError("disk full")
        r = self.h.request(self, "DELETE", f"{TOKENS}/{created['token_id']}")
        self.assertEqual(503, r.code)
        self.assertEqual([created["token_id"]],
                         [t["token_id"] for t in self.h.request(self, "GET", TOKENS).json])
