"""
The CA's index of issued certificates (``issued.jsonl`` beside ``cluster.key``) and
signing a node's certificate signing request.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pyflock.common._ca import (
    INDEX_FILE, CertificateFileError, CertificateIndex, InvalidRequest, OutputExists,
    create_api_certificate, create_control_certificate, create_node_certificate,
    initialize, load_certificate, load_signing_authority, parse_signing_request,
    sign_node_request,
)
from pyflock.common._ca_script import main as ca_main

NOW = datetime(2026, 12, 4, 16, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def ca(tmp_path):
    """A new CA in ``tmp_path``."""
    initialize(tmp_path, "test")
    return tmp_path


def _request(key) -> str:
    """A PEM request for ``key``."""
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM).decode())


def test_pyflock_ca_records_what_it_issues(ca):
    """Every certificate pyflock-ca issues is in the index: serial, subject, dates."""
    control = create_control_certificate(ca, ca, "127.0.0.1", now=NOW)
    node_uuid = create_node_certificate(ca, ca, now=NOW)
    user = create_api_certificate(ca, ca, "alice", now=NOW)
    entries = CertificateIndex(ca / INDEX_FILE).entries()
    issued = [load_certificate(path) for path in (
        control.certificate_path, ca / f"{node_uuid}.crt", user.certificate_path)]
    assert [(e.serial, e.subject, e.not_after, e.issued_at, e.issued_by)
            for e in entries] == [
        (c.serial_number, c.subject.rfc4514_string(), c.not_valid_after_utc, NOW,
         "pyflock-ca") for c in issued]
    assert [e.common_name for e in entries] == [
        "control-service", f"node-{node_uuid}", "user-alice"]


def test_cli_records(ca, capsys):
    """``pyflock-ca create-node-certificate`` writes its entry beside the CA key."""
    assert ca_main(["create-node-certificate", "-i", str(ca), "-o", str(ca)]) == 0
    node_uuid = capsys.readouterr().out.strip()
    [entry] = CertificateIndex.beside(ca / "cluster.key").entries()
    assert entry.common_name == f"node-{node_uuid}"


def test_refused_issue_records_nothing(ca):
    """Issuing into a name that exists is refused before anything is recorded."""
    create_api_certificate(ca, ca, "alice")
    with pytest.raises(OutputExists):
        create_api_certificate(ca, ca, "alice")
    assert len(CertificateIndex(ca / INDEX_FILE).entries()) == 1


def test_other_kinds_skipped_and_damage_named(ca):
    """Lines of kinds this version does not know are skipped; a garbled line is named."""
    index = CertificateIndex(ca / INDEX_FILE)
    create_api_certificate(ca, ca, "alice")
    with open(index.path, "a") as f:
        f.write('{"kind": "revoked", "serial": "1"}\n')
    assert len(index.entries()) == 1
    with open(index.path, "a") as f:
        f.write("garbage\n")
    with pytest.raises(CertificateFileError, match="line 3 is not a JSON object"):
        index.entries()


def test_sign_node_request(ca):
    """A node certificate for the request's key, the request's subject ignored."""
    authority = load_signing_authority(ca / "cluster.crt", ca / "cluster.key")
    key = ec.generate_private_key(ec.SECP256R1())
    request = parse_signing_request(_request(key))
    certificate = sign_node_request(authority, request,
                                    "11111111-2222-4333-8444-555555555555", now=NOW)
    certificate.verify_directly_issued_by(authority.certificate)
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "node-11111111-2222-4333-8444-555555555555")
    assert certificate.public_key() == key.public_key()
    [entry] = authority.index.entries()
    assert (entry.serial, entry.issued_by) == (certificate.serial_number, "join")


@pytest.mark.parametrize("pem, fragment", [
    ("nonsense", "not a PEM request"),
    (None, "not an ECDSA P-256 key"),
])
def test_bad_requests(pem, fragment):
    """A request that is not PEM, or with another kind of key, is refused in one line."""
    if pem is None:
        pem = _request(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with pytest.raises(InvalidRequest, match=fragment):
        parse_signing_request(pem)


def test_signing_key_must_match(ca, tmp_path_factory):
    """A CA key that is not the certificate's is refused."""
    other = tmp_path_factory.mktemp("other")
    initialize(other, "other")
    with pytest.raises(CertificateFileError, match="does not belong"):
        load_signing_authority(ca / "cluster.crt", other / "cluster.key")
