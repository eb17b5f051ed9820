"""
Join tokens: what lets a new host join a cluster without anyone shipping it a private key.

A token is one string, ``pyflock-join1.<pin>.<token id>.<secret>``:

- ``pin``: the SHA-256 of the cluster CA's public key (its SubjectPublicKeyInfo, DER),
  base64url without padding (43 characters). The joining host trusts the control service
  only if its CA has this key, so a token also tells the host whom to trust.
- ``token id``: 16 lower-case hex digits; it names the token in ``pyflock token list``
  and ``revoke``, and is no secret.
- ``secret``: 32 random bytes (256 bits), base64url without padding (43 characters). The
  control service keeps only its SHA-256 (``secret_hash``): a secret of 256 random bits
  needs no slow hash, and a stolen store yields no usable token.

The parts never contain ``.``, so the string splits unambiguously.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from typing import Optional

import attr
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pyflock.common._jsonread import as_object, read, read_natural, read_number

#: The first part of every token; a later format gets a new one.
TOKEN_PREFIX = "pyflock-join1"

#: The join port of the control service (``pyflock-control --join-port``).
DEFAULT_JOIN_PORT = 4526

_B64_256 = re.compile(r"[A-Za-z0-9_-]{43}\Z")
_TOKEN_ID = re.compile(r"[0-9a-f]{16}\Z")


class InvalidToken(ValueError):
    """A string is not a join token; ``str()`` says what is wrong, in one line."""


def _b64(data: bytes) -> str:
    """``data`` as base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def authority_pin(certificate: x509.Certificate) -> str:
    """The pin of a CA certificate: base64url SHA-256 of its public key (SPKI, DER)."""
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _b64(hashlib.sha256(spki).digest())


def secret_hash(secret: str) -> str:
    """What the store keeps of a token's secret: its SHA-256, in hex."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Whether ``secret`` hashes to ``stored_hash`` (in constant time)."""
    return hmac.compare_digest(secret_hash(secret), stored_hash)


def valid_token_id(token_id: str) -> bool:
    """Whether ``token_id`` has the form of a token id (16 lower-case hex digits)."""
    return isinstance(token_id, str) and bool(_TOKEN_ID.match(token_id))


@attr.s(frozen=True, auto_attribs=True, repr=False)
class JoinToken:
    """A parsed join token: the CA ``pin``, the ``token_id`` and the ``secret``."""

    pin: str
    token_id: str
    secret: str

    @classmethod
    def new(cls, pin: str) -> "JoinToken":
        """A fresh token for the CA pinned by ``pin``, with a new id and secret."""
        return cls(pin=pin, token_id=secrets.token_hex(8),
                   secret=_b64(secrets.token_bytes(32)))

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}.{self.pin}.{self.token_id}.{self.secret}"

    def __repr__(self) -> str:
        # Never the secret: a token may end up in a log through a repr.
        return f"<JoinToken {self.token_id}>"


def parse_token(text: str) -> JoinToken:
    """The token ``text`` spells, or ``InvalidToken`` saying what is wrong with it."""
    if not isinstance(text, str):
        raise InvalidToken("a join token is a string")
    parts = text.strip().split(".")
    if parts[0] != TOKEN_PREFIX:
        raise InvalidToken(f"this is not a pyflock join token: it must start with "
                           f"{TOKEN_PREFIX}. (create one with `pyflock token create`)")
    if len(parts) != 4:
        raise InvalidToken(f"this join token has {len(parts)} parts, not 4: copy the "
                           f"whole token")
    _, pin, token_id, secret = parts
    if not _B64_256.match(pin):
        raise InvalidToken("the CA pin in this join token is malformed: copy the whole "
                           "token")
    if not _TOKEN_ID.match(token_id):
        raise InvalidToken("the token id in this join token is malformed: copy the whole "
                           "token")
    if not _B64_256.match(secret):
        raise InvalidToken("the secret in this join token is malformed: copy the whole "
                           "token")
    return JoinToken(pin=pin, token_id=token_id, secret=secret)


@attr.s(frozen=True, auto_attribs=True)
class TokenInfo:
    """
    A join token as the REST API shows it: ``token_id``, ``created`` and ``expires``
    (seconds on the control service's clock), ``uses``, ``used``, ``state`` (``usable``,
    ``expired``, ``used-up``), and ``token``, the whole token, only when just created.
    """

    token_id: str
    created: float
    expires: float
    uses: int
    used: int
    state: str
    token: Optional[str] = None

    @classmethod
    def from_json(cls, value) -> "TokenInfo":
        """The token a ``/v1/tokens`` answer describes; ``Malformed`` if it is not one."""
        obj = as_object(value, "token")
        return cls(token_id=read(obj, "token_id", (str,), "token"),
                   created=read_number(obj, "created", "token"),
                   expires=read_number(obj, "expires", "token"),
                   uses=read_natural(obj, "uses", "token"),
                   used=read_natural(obj, "used", "token"),
                   state=read(obj, "state", (str,), "token"),
                   token=read(obj, "token", (str,), "token", default=None))

    def to_json(self) -> dict:
        """The token as the REST API shows it."""
        value = {"token_id": self.token_id, "created": self.created,
                 "expires": self.expires, "uses": self.uses, "used": self.used,
                 "state": self.state}
        if self.token is not None:
            value["token"] = self.token
        return value


__all__ = [
    "DEFAULT_JOIN_PORT", "InvalidToken", "JoinToken", "TOKEN_PREFIX", "TokenInfo", "authority_pin",
    "parse_token", "secret_hash", "secret_matches", "valid_token_id",
]
