"""
The control service's token rules (``TokenBook``, ``TokenService``) on a Clock, and the
limit on failed joins (``FailureLimiter``).
"""

from __future__ import annotations

import attr
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._tokens import JoinToken, secret_hash
from pyflock.control._store import MemoryConfigurationStore, StoreError
from pyflock.control._tokens import (
    KEPT_AFTER_END, FailureLimiter, TokenBook, TokenRefused, TokenService, TokenUnknown,
)

PIN = "p" * 43


class TokenBookTests(SynchronousTestCase):
    """Expiry, use counts, revocation and the pin, with time as a parameter."""

    def setUp(self):
        self.book = TokenBook(pin=PIN)

    def test_record_keeps_hash(self):
        """A new token's record holds the secret's hash, its lifetime and uses."""
        token, record, dropped = self.book.create(100.0, 60.0, 2)
        self.assertEqual((token.token_id, secret_hash(token.secret), 100.0, 160.0, 2, 0, []),
                         (record.token_id, record.secret_hash, record.created,
                          record.expires, record.uses, record.used, dropped))

    def test_uses_counted(self):
        """A token of two uses redeems twice, then is refused as used up."""
        token, _, _ = self.book.create(0.0, 60.0, 2)
        self.assertEqual(1, self.book.redeem(1.0, token).used)
        self.assertEqual(2, self.book.redeem(2.0, token).used)
        with self.assertRaisesRegex(TokenRefused, "is used up: it allowed 2 join"):
            self.book.redeem(3.0, token)
        self.assertEqual("used-up", self.book.records()[0].state(3.0))

    def test_expiry(self):
        """A token works until its expiry and is refused from then on."""
        token, _, _ = self.book.create(0.0, 60.0, 5)
        self.book.redeem(59.9, token)
        with self.assertRaisesRegex(TokenRefused, "has expired"):
            self.book.redeem(60.0, token)
        self.assertEqual("expired", self.book.records()[0].state(60.0))

    def test_wrong_secret(self):
        """A token with the right id and a wrong secret is refused, and not counted."""
        token, _, _ = self.book.create(0.0, 60.0, 1)
        forged = attr.evolve(token, secret=JoinToken.new(PIN).secret)
        with self.assertRaisesRegex(TokenRefused, "is not valid"):
            self.book.redeem(1.0, forged)
        self.assertEqual(0, self.book.records()[0].used)

    def test_other_cluster(self):
        """A token pinning another CA is refused as another cluster's."""
        token, _, _ = self.book.create(0.0, 60.0, 1)
        with self.assertRaisesRegex(TokenRefused, "another cluster"):
            self.book.redeem(1.0, attr.evolve(token, pin="q" * 43))

    def test_revoked(self):
        """A revoked token is refused; revoking an unknown id is ``TokenUnknown``."""
        token, _, _ = self.book.create(0.0, 60.0, 1)
        self.book.revoke(token.token_id)
        with self.assertRaisesRegex(TokenRefused, "is not valid"):
            self.book.redeem(1.0, token)
        self.assertRaises(TokenUnknown, self.book.revoke, token.token_id)

    def test_old_tokens_dropped(self):
        """Creating a token drops the ones ended more than a day ago, only those."""
        old, _, _ = self.book.create(0.0, 10.0, 1)
        recent, _, _ = self.book.create(KEPT_AFTER_END, 10.0, 1)
        _, _, dropped = self.book.create(KEPT_AFTER_END + 10.0, 10.0, 1)
        self.assertEqual([old.token_id], dropped)
        self.assertIn(recent.token_id, [r.token_id for r in self.book.records()])


class TokenServiceTests(SynchronousTestCase):
    """The service writes every change through the store before it answers."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = MemoryConfigurationStore()
        self.service = self.successResultOf(
            Deferred.fromCoroutine(TokenService.load(self.store, self.clock, PIN)))

    def create(self, **kwargs):
        """Create a token through the service."""
        return self.successResultOf(Deferred.fromCoroutine(self.service.create(**kwargs)))

    def test_use_is_durable(self):
        """A redeemed use is in the store once the Deferred fires, and survives a reload."""
        token, _ = self.create(uses=1)
        self.successResultOf(self.service.redeem(token))
        reloaded = TokenBook(self.store.reopen().tokens.values(), PIN)
        self.assertRaises(TokenRefused, reloaded.redeem, self.clock.seconds(), token)

    def test_clock_expires(self):
        """The service's clock decides expiry."""
        token, _ = self.create(ttl=30.0)
        self.clock.advance(30)
        self.assertRaises(TokenRefused, self.service.redeem, token)

    def test_failed_create_keeps_nothing(self):
        """A create the store refuses leaves no token behind."""
        self.store.fail_next = StoreError("disk full")
        self.failureResultOf(Deferred.fromCoroutine(self.service.create()), StoreError)
        self.assertEqual([], self.service.book.records())


class FailureLimiterTests(SynchronousTestCase):
    """Repeated failures from one source are held back; others are not."""

    def test_limit_and_window(self):
        """After 3 failures in 10 s a source waits until the oldest leaves the window."""
        clock = Clock()
        limiter = FailureLimiter(clock, limit=3, window=10.0)
        for _ in range(3):
            self.assertIsNone(limiter.retry_after("10.0.0.1"))
            limiter.failed("10.0.0.1")
            clock.advance(1)
        self.assertEqual(7.0, limiter.retry_after("10.0.0.1"))
        self.assertIsNone(limiter.retry_after("10.0.0.2"))
        clock.advance(7)
        self.assertIsNone(limiter.retry_after("10.0.0.1"))

    def test_bounded_sources(self):
        """Only the most recent sources are remembered."""
        clock = Clock()
        limiter = FailureLimiter(clock, limit=1, window=10.0, sources=2)
        for source in ("a", "b", "c"):
            limiter.failed(source)
        self.assertIsNone(limiter.retry_after("a"))
        self.assertIsNotNone(limiter.retry_after("c"))
