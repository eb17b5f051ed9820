"""
The agent channel's ``revocations`` message (issue 8, point 5): the cluster's CRL as PEM
text, part of protocol 3 (added before version 3 was released), refused on a version-2
connection and checked like every other message.
"""

import json

import pytest

from pyflock.common._wire import (
    MESSAGE_KEYS, REVOCATION_LISTS, BadMessage, CRLUpdate, decode, encode,
)

PEM = "-----BEGIN X509 CRL-----\nMIIB\n-----END X509 CRL-----\n"


def test_round_trip():
    """A ``revocations`` message encodes as type and PEM text, and decodes back."""
    message = CRLUpdate(crl=PEM)
    assert json.loads(encode(message)) == {"type": "revocations", "crl": PEM}
    assert decode(encode(message), 3) == message
    assert decode(encode(message)) == message


def test_it_is_a_version_3_message():
    """Version 3 has the message with its two keys; version 2 has no such message."""
    assert REVOCATION_LISTS == 3
    assert MESSAGE_KEYS[3]["revocations"] == {"type", "crl"}
    assert "revocations" not in MESSAGE_KEYS[2]


def test_version_2_connection_refuses_it():
    """A connection settled on version 2 refuses the message as not part of it."""
    with pytest.raises(BadMessage, match="revocations messages are not part of "
                                         "agent-channel protocol 2"):
        decode(encode(CRLUpdate(crl=PEM)), 2)


@pytest.mark.parametrize("body, expected", [
    ({"type": "revocations", "crl": PEM, "serials": []},
     "revocations has unknown keys 'serials'"),
    ({"type": "revocations"}, "revocations lacks 'crl'"),
    ({"type": "revocations", "crl": None}, "revocations.crl"),
    ({"type": "revocations", "crl": 3}, "revocations.crl"),
    ({"type": "revocations", "crl": ""}, "revocations.crl must be a PEM revocation list"),
    ({"type": "revocations", "crl": "caf\u00e9"},
     "revocations.crl must be a PEM revocation list"),
])
def test_malformed_messages_are_refused(body, expected):
    """Another key, a missing, null, non-string, empty or non-ASCII ``crl`` is refused."""
    with pytest.raises(BadMessage) as error:
        decode(json.dumps(body).encode(), 3)
    assert expected in str(error.value)
