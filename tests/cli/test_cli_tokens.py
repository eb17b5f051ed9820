"""
``pyflock token create|list|revoke`` against the real REST API in memory (APIHarness).
"""

from __future__ import annotations

import json

from pyflock.cli._cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from pyflock.common._tokens import parse_token
from pyflock.control.testing import APIHarness
from tests.cli.test_cli import CLITestCase


class TokenCommandTests(CLITestCase):
    """Creating, listing and revoking join tokens from the command line."""

    def test_create_prints_token_alone(self):
        """``token create`` prints the token alone: one line, parseable, nothing else."""
        code, out, err = self.cli("token", "create")
        self.assertEqual((EXIT_OK, ""), (code, err))
        self.assertEqual(1, out.count("\n"))
        token = parse_token(out.strip())
        [record] = self.harness.store.tokens.values()
        self.assertEqual((token.token_id, 1, 3600.0),
                         (record.token_id, record.uses, record.expires - record.created))

    def test_create_ttl_and_uses(self):
        """``--ttl 90m --uses 5`` makes a token valid 5400 s for five joins."""
        code, out, _ = self.cli("token", "create", "--ttl", "90m", "--uses", "5", "--json")
        self.assertEqual(EXIT_OK, code)
        answer = json.loads(out)
        self.assertEqual((5400.0, 5), (answer["expires"] - answer["created"],
                                       answer["uses"]))
        self.assertEqual(answer["token_id"], parse_token(answer["token"]).token_id)

    def test_create_bad_options(self):
        """A malformed duration or use count is a usage error on one line."""
        for argv in (("--ttl", "soon"), ("--ttl", "0"), ("--uses", "0"), ("--uses", "2.5")):
            with self.subTest(argv=argv):
                self.assertOneLineError(self.cli("token", "create", *argv), EXIT_USAGE,
                                        argv[1])

    def test_list(self):
        """``token list`` shows each token's id, state, uses and expiry, never a secret."""
        first = parse_token(self.cli("token", "create", "--ttl", "60")[1].strip())
        self.harness.clock.advance(1)
        second = parse_token(self.cli("token", "create", "--uses", "3")[1].strip())
        self.harness.clock.advance(60)
        code, out, _ = self.cli("token", "list")
        self.assertEqual(EXIT_OK, code)
        lines = out.splitlines()
        self.assertEqual(["ID", "STATE", "USED", "EXPIRES"], lines[0].split())
        self.assertEqual([first.token_id, "expired", "0/1", "1s", "ago"], lines[1].split())
        self.assertEqual([second.token_id, "usable", "0/3", "in", "59m00s"],
                         lines[2].split())
        self.assertNotIn(first.secret, out)

    def test_list_json(self):
        """``token list --json`` prints the API's objects."""
        self.cli("token", "create")
        code, out, _ = self.cli("token", "list", "--json")
        [token] = json.loads(out)
        self.assertEqual((EXIT_OK, "usable"), (code, token["state"]))
        self.assertNotIn("token", token)

    def test_revoke(self):
        """``token revoke ID`` revokes the token: it is no longer listed."""
        token = parse_token(self.cli("token", "create")[1].strip())
        code, out, _ = self.cli("token", "revoke", token.token_id)
        self.assertEqual((EXIT_OK, f"Revoked join token {token.token_id} (0 of 1 use(s) "
                                   f"made).\n"), (code, out))
        self.assertEqual({}, self.harness.store.tokens)

    def test_revoke_unknown(self):
        """Revoking an unknown token fails with one line naming it."""
        self.assertOneLineError(self.cli("token", "revoke", "0123456789abcdef"),
                                EXIT_FAILED, "0123456789abcdef")

    def test_no_joins(self):
        """Against a control service without the CA key, the line says to give --ca-key."""
        self.harness = APIHarness(joins=False)
        self.assertOneLineError(self.cli("token", "create"), EXIT_FAILED, "--ca-key")
