"""
Join tokens on the control service: what is kept of them, their rules, and the limit on
failed joins.

``TokenRecord`` is what the store keeps of a token: its id, the hash of its secret (never
the secret), when it was created and expires, and how many uses it allows and has had.
``TokenBook`` holds every record in memory and decides, with no IO (time is a parameter):
it makes new tokens, redeems a presented token (checking its pin, secret, expiry and use
count, and counting the use) and revokes tokens. ``TokenService`` writes each change
through the configuration store before it answers, so a token used or revoked stays so
after a restart. ``FailureLimiter`` refuses a source address that failed too often.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Optional

import attr
from twisted.internet.defer import Deferred

from pyflock.common._tokens import JoinToken, secret_hash, secret_matches

#: Defaults and bounds of ``POST /v1/tokens``: seconds a token lives, uses it allows.
DEFAULT_TTL = 3600.0
MAXIMUM_TTL = 30 * 24 * 3600.0
DEFAULT_USES = 1
MAXIMUM_USES = 100_000

#: Tokens expired or used up longer ago than this are dropped when a token is created.
KEPT_AFTER_END = 24 * 3600.0


@attr.s(frozen=True, auto_attribs=True)
class TokenRecord:
    """
    What is kept of a join token: ``token_id``, ``secret_hash`` (SHA-256 hex of the
    secret), ``created`` and ``expires`` (seconds since the epoch), ``uses`` allowed and
    ``used`` so far.
    """

    token_id: str
    secret_hash: str
    created: float
    expires: float
    uses: int
    used: int = 0

    def state(self, now: float) -> str:
        """``usable``, ``expired`` or ``used-up``."""
        if self.used >= self.uses:
            return "used-up"
        if now >= self.expires:
            return "expired"
        return "usable"

    def to_json(self, now: float) -> dict:
        """The token as ``GET /v1/tokens`` shows it (no secret, no hash)."""
        return {"token_id": self.token_id, "created": self.created,
                "expires": self.expires, "uses": self.uses, "used": self.used,
                "state": self.state(now)}


class TokenRefused(Exception):
    """A presented token may not be used; ``str()`` is the one line the joining host sees."""


class TokenUnknown(KeyError):
    """No token has this id."""

    def __str__(self) -> str:
        return f"no join token has the id {self.args[0]}"


class TokenBook:
    """Every token record by id, and the rules of tokens (pure: no IO, no clock)."""

    def __init__(self, records=(), pin: str = ""):
        self.pin = pin
        self._records: dict[str, TokenRecord] = {r.token_id: r for r in records}

    def records(self) -> list[TokenRecord]:
        """Every record, oldest first."""
        return sorted(self._records.values(), key=lambda r: (r.created, r.token_id))

    def create(self, now: float, ttl: float, uses: int
               ) -> tuple[JoinToken, TokenRecord, list[str]]:
        """
        A new token valid ``ttl`` seconds for ``uses`` uses; its record; and the ids of
        records that ended more than ``KEPT_AFTER_END`` ago, dropped now.
        """
        token = JoinToken.new(self.pin)
        while token.token_id in self._records:
            token = JoinToken.new(self.pin)
        record = TokenRecord(token_id=token.token_id, secret_hash=secret_hash(token.secret),
                             created=now, expires=now + ttl, uses=uses)
        dropped = [r.token_id for r in self._records.values()
                   if r.expires + KEPT_AFTER_END <= now
                   or (r.used >= r.uses and r.created + KEPT_AFTER_END <= now)]
        for token_id in dropped:
            del self._records[token_id]
        self._records[token.token_id] = record
        return token, record, dropped

    def redeem(self, now: float, token: JoinToken) -> TokenRecord:
        """Count one use of ``token``: its updated record, or ``TokenRefused`` saying why."""
        if token.pin != self.pin:
            raise TokenRefused("this join token is for another cluster: its CA pin is not "
                               "this control service's CA")
        record = self._records.get(token.token_id)
        if record is None or not secret_matches(token.secret, record.secret_hash):
            raise TokenRefused(f"join token {token.token_id} is not valid: it was revoked, "
                               f"never existed, or its secret is wrong")
        state = record.state(now)
        if state == "used-up":
            raise TokenRefused(f"join token {token.token_id} is used up: it allowed "
                               f"{record.uses} join(s); create a new one with `pyflock "
                               f"token create`")
        if state == "expired":
            raise TokenRefused(f"join token {token.token_id} has expired; create a new "
                               f"one with `pyflock token create`")
        record = attr.evolve(record, used=record.used + 1)
        self._records[record.token_id] = record
        return record

    def restore(self, record: TokenRecord) -> None:
        """Put back ``record`` (a revocation the store failed to keep)."""
        self._records[record.token_id] = record

    def revoke(self, token_id: str) -> TokenRecord:
        """Forget token ``token_id``: its record, or ``TokenUnknown``."""
        try:
            return self._records.pop(token_id)
        except KeyError:
            raise TokenUnknown(token_id) from None


class TokenService:
    """
    The tokens of a running control service: a ``TokenBook`` whose every change is
    written through ``store`` (``write_token``) before the Deferred fires; times come
    from ``clock``.
    """

    def __init__(self, store, clock, book: TokenBook):
        self._store = store
        self._clock = clock
        self.book = book

    @classmethod
    async def load(cls, store, clock, pin: str) -> "TokenService":
        """The service over the tokens ``store`` keeps, for the CA pinned by ``pin``."""
        return cls(store, clock, TokenBook(await store.load_tokens(), pin))

    def now(self) -> float:
        """The service's clock."""
        return self._clock.seconds()

    async def create(self, ttl: float = DEFAULT_TTL, uses: int = DEFAULT_USES
                     ) -> tuple[JoinToken, TokenRecord]:
        """A new token and its record, once the record is durable."""
        token, record, dropped = self.book.create(self.now(), ttl, uses)
        for token_id in dropped:
            await self._store.write_token(token_id, None)
        try:
            await self._store.write_token(record.token_id, record)
        except BaseException:
            self.book.revoke(record.token_id)
            raise
        return token, record

    def redeem(self, token: JoinToken) -> Deferred:
        """
        Count a use of ``token`` (synchronously, so that two joins never share the last
        use); fires with its record once durable, or fails with ``TokenRefused``.
        """
        record = self.book.redeem(self.now(), token)
        return self._store.write_token(record.token_id, record).addCallback(
            lambda _: record)

    async def revoke(self, token_id: str) -> TokenRecord:
        """Revoke ``token_id`` (``TokenUnknown`` if no such token), once durable."""
        record = self.book.revoke(token_id)
        try:
            await self._store.write_token(token_id, None)
        except BaseException:
            self.book.restore(record)
            raise
        return record


class FailureLimiter:
    """
    Refuses a source that failed ``limit`` times within ``window`` seconds, until the
    oldest of those failures leaves the window; remembers at most ``sources`` sources
    (the least recently failed are forgotten first). Time comes from ``clock``.
    """

    def __init__(self, clock, limit: int = 5, window: float = 60.0, sources: int = 10_000):
        self._clock = clock
        self._limit = limit
        self._window = window
        self._sources = sources
        self._failures: "OrderedDict[str, deque]" = OrderedDict()

    def _recent(self, source: str) -> deque:
        """The times of ``source``'s failures still within the window."""
        failures = self._failures.get(source, deque(maxlen=self._limit))
        cutoff = self._clock.seconds() - self._window
        while failures and failures[0] <= cutoff:
            failures.popleft()
        if not failures:
            self._failures.pop(source, None)
        return failures

    def retry_after(self, source: str) -> Optional[float]:
        """Seconds until ``source`` may try again, or None if it may now."""
        failures = self._recent(source)
        if len(failures) < self._limit:
            return None
        return failures[0] + self._window - self._clock.seconds()

    def failed(self, source: str) -> None:
        """Count a failure of ``source``."""
        failures = self._recent(source)
        failures.append(self._clock.seconds())
        self._failures[source] = failures
        self._failures.move_to_end(source)
        while len(self._failures) > self._sources:
            self._failures.popitem(last=False)
