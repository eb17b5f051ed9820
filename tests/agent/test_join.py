"""
``pyflock-agent join``'s pure parts: the control service's address, the checks of the
certificates folder, of the CA against the pin and of the answered certificate, and
writing the files.
"""

from __future__ import annotations

import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pyflock.agent._join import (
    JoinError, check_authority, check_certificate, check_folder, install,
    parse_join_address, signing_request,
)
from pyflock.common._ca import (
    initialize, load_certificate, load_signing_authority, sign_node_request,
)
from pyflock.common._tokens import JoinToken, authority_pin

NODE = "11111111-2222-4333-8444-555555555555"


@pytest.mark.parametrize("text, expected", [
    ("control.example", ("control.example", 4526)),
    ("10.0.0.1:5000", ("10.0.0.1", 5000)),
    ("[fd00::1]:5000", ("fd00::1", 5000)),
    ("[fd00::1]", ("fd00::1", 4526)),
])
def test_address(text, expected):
    """HOST[:PORT] forms, the join port 4526 by default."""
    assert parse_join_address(text) == expected


@pytest.mark.parametrize("text", ["", "host:0", "host:http", "[fd00::1]x", "host:70000"])
def test_bad_address(text):
    """Malformed addresses are refused in one line."""
    with pytest.raises(JoinError, match="HOST"):
        parse_join_address(text)


def test_folder_already_joined(tmp_path):
    """A folder that holds node.key already is refused before anything is sent."""
    (tmp_path / "node.key").write_text("")
    with pytest.raises(JoinError, match="has joined already"):
        check_folder(tmp_path)
    check_folder(tmp_path / "missing")


@pytest.fixture
def ca(tmp_path):
    """A CA, loaded for signing."""
    folder = tmp_path / "ca"
    folder.mkdir()
    initialize(folder, "test")
    return load_signing_authority(folder / "cluster.crt", folder / "cluster.key")


def test_pin_checked(ca):
    """The CA is accepted only with the token's pin."""
    pem = load_certificate_pem(ca)
    assert check_authority(pem, JoinToken.new(authority_pin(ca.certificate)), "h:1") == (
        ca.certificate)
    with pytest.raises(JoinError, match="not the one this token is for"):
        check_authority(pem, JoinToken.new("p" * 43), "h:1")
    with pytest.raises(JoinError, match="answered no CA certificate"):
        check_authority(b"<html>", JoinToken.new("p" * 43), "h:1")


def load_certificate_pem(ca) -> bytes:
    """The CA certificate as PEM."""
    return ca.certificate.public_bytes(serialization.Encoding.PEM)


def _signed(ca, key_pem: str) -> str:
    """A node certificate for the request ``key_pem``, as PEM."""
    request = x509.load_pem_x509_csr(key_pem.encode())
    return sign_node_request(ca, request, NODE).public_bytes(
        serialization.Encoding.PEM).decode()


def test_certificate_checked(ca):
    """The answer must be the CA's node certificate for this host's own key."""
    key, csr = signing_request()
    certificate, node_uuid = check_certificate(_signed(ca, csr), ca.certificate, key)
    assert node_uuid == NODE
    other_key, other_csr = signing_request()
    with pytest.raises(JoinError, match="for another key"):
        check_certificate(_signed(ca, other_csr), ca.certificate, key)
    with pytest.raises(JoinError, match="did not issue"):
        check_certificate("nonsense", ca.certificate, key)


def test_install(ca, tmp_path):
    """The files are written with their modes into a new 0700 folder."""
    key, csr = signing_request()
    certificate, _ = check_certificate(_signed(ca, csr), ca.certificate, key)
    folder = tmp_path / "certs"
    install(folder, key, certificate, ca.certificate)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(folder / "node.key").st_mode) == 0o600
    assert load_certificate(folder / "node.crt") == certificate
    assert load_certificate(folder / "cluster.crt") == ca.certificate


def test_install_refuses_other_cluster(ca, tmp_path):
    """A cluster.crt of another CA already in the folder is refused; nothing is written."""
    key, csr = signing_request()
    certificate, _ = check_certificate(_signed(ca, csr), ca.certificate, key)
    folder = tmp_path / "certs"
    folder.mkdir()
    (folder / "cluster.crt").write_bytes(b"another CA")
    with pytest.raises(JoinError, match="another cluster's CA"):
        install(folder, key, certificate, ca.certificate)
    assert sorted(os.listdir(folder)) == ["cluster.crt"]
