"""
Join tokens' format: making, printing and parsing them, the CA pin and the secret's hash.
"""

from __future__ import annotations

import pytest

from pyflock.common._ca import initialize, load_certificate
from pyflock.common._tokens import (
    InvalidToken, JoinToken, TokenInfo, authority_pin, parse_token, secret_hash,
    secret_matches,
)

PIN = "p" * 43


def test_round_trip():
    """A new token printed and parsed again is the same token."""
    token = JoinToken.new(PIN)
    assert parse_token(str(token)) == token
    assert parse_token(f"  {token}\n") == token


def test_secret_strength():
    """A token's secret carries 256 random bits, and two tokens never share id or secret."""
    first, second = JoinToken.new(PIN), JoinToken.new(PIN)
    assert len(first.secret) == 43  # 32 bytes in base64url
    assert first.secret != second.secret and first.token_id != second.token_id


def test_repr_hides_secret():
    """A token's repr names its id, never its secret."""
    token = JoinToken.new(PIN)
    assert token.token_id in repr(token) and token.secret not in repr(token)


@pytest.mark.parametrize("text, fragment", [
    ("hello", "not a pyflock join token"),
    ("pyflock-join1.abc", "has 2 parts, not 4"),
    (f"pyflock-join1.short.0123456789abcdef.{'s' * 43}", "CA pin"),
    (f"pyflock-join1.{PIN}.0123456789ABCDEF.{'s' * 43}", "token id"),
    (f"pyflock-join1.{PIN}.0123456789abcdef.{'s' * 42}", "secret"),
    (f"pyflock-join1.{PIN}.0123456789abcdef.{'s' * 42}!", "secret"),
])
def test_malformed(text, fragment):
    """Each malformed part is named in one line."""
    with pytest.raises(InvalidToken, match=fragment) as raised:
        parse_token(text)
    assert "\n" not in str(raised.value)


def test_hash():
    """The stored hash matches its secret only, and is not the secret."""
    token = JoinToken.new(PIN)
    stored = secret_hash(token.secret)
    assert token.secret not in stored
    assert secret_matches(token.secret, stored)
    assert not secret_matches(JoinToken.new(PIN).secret, stored)


def test_pin_is_the_public_key(tmp_path):
    """The pin is the CA's public key hash: stable, and another CA's differs."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    initialize(tmp_path / "a", "a")
    initialize(tmp_path / "b", "b")
    first = load_certificate(tmp_path / "a" / "cluster.crt")
    pin = authority_pin(first)
    assert len(pin) == 43 and pin == authority_pin(first)
    assert pin != authority_pin(load_certificate(tmp_path / "b" / "cluster.crt"))


def test_info_codec():
    """A token as the API shows it reads back into the same value."""
    info = TokenInfo(token_id="0123456789abcdef", created=1.5, expires=3601.5, uses=2,
                     used=1, state="usable", token="t")
    assert TokenInfo.from_json(info.to_json()) == info
