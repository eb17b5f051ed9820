"""
Revoking certificates with the CA (``pyflock-ca revoke``, ``crl``, ``list-revoked``) and
reading ``cluster.crl`` (issue 8, point 5).
"""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509

from pyflock.common._ca import (
    INDEX_FILE, CertificateFileError, CertificateIndex, create_api_certificate,
    create_node_certificate, initialize, load_certificate,
)
from pyflock.common._ca_script import main as ca_main
from pyflock.common._crl import (
    CRL_FILE, CRL_LIFETIME, NOTHING_REVOKED, NothingToRevoke, RevocationList, list_revoked,
    parse_crl, read_crl, resign_crl, revoke,
)

NOW = datetime(2026, 12, 4, 16, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def ca(tmp_path):
    """A CA in ``tmp_path/ca`` that issued node certificates twice to one node and one
    user certificate; the output folder ``tmp_path/out``."""
    folder = tmp_path / "ca"
    folder.mkdir()
    (tmp_path / "out").mkdir()
    initialize(folder, "test")
    node_uuid = create_node_certificate(folder, folder, now=NOW)
    (folder / "again").mkdir()
    create_node_certificate(folder, folder / "again", node_uuid, now=NOW)
    create_api_certificate(folder, folder, "alice", now=NOW)
    return folder, node_uuid


def _serials(path) -> set[int]:
    """The serials ``path`` (a CRL file) lists."""
    return {r.serial_number for r in x509.load_pem_x509_crl(path.read_bytes())}


def test_revoke_node_lists_every_certificate_of_the_node(ca, tmp_path):
    """``revoke --node`` records each certificate of the node and signs a CRL of them."""
    folder, node_uuid = ca
    done = revoke(folder, tmp_path / "out", node=node_uuid, now=NOW)
    issued = {load_certificate(folder / f"{node_uuid}.crt").serial_number,
              load_certificate(folder / "again" / f"{node_uuid}.crt").serial_number}
    assert {e.serial for e in done.new} == issued and done.already == ()
    assert done.crl_path == tmp_path / "out" / CRL_FILE and done.listed == 2
    assert _serials(done.crl_path) == issued
    crl = x509.load_pem_x509_crl(done.crl_path.read_bytes())
    authority = load_certificate(folder / "cluster.crt")
    assert crl.is_signature_valid(authority.public_key())
    assert (crl.last_update_utc, crl.next_update_utc) == (NOW, NOW + CRL_LIFETIME)
    assert [e.common_name for e in list_revoked(folder)] == [f"node-{node_uuid}"] * 2
    assert read_crl(done.crl_path, authority).serials == frozenset(issued)


@pytest.mark.integration
def test_openssl_refuses_a_revoked_certificate(ca, tmp_path):
    """``openssl verify -crl_check`` with our CRL refuses the revoked certificate only."""
    folder, node_uuid = ca
    revoke(folder, folder, user="alice")

    def verify(name):
        return subprocess.run(
            ["openssl", "verify", "-x509_strict", "-crl_check", "-CAfile",
             str(folder / "cluster.crt"), "-CRLfile", str(folder / CRL_FILE),
             str(folder / name)], capture_output=True, text=True)
    refused = verify("alice.crt")
    assert refused.returncode != 0 and "revoked" in refused.stdout + refused.stderr
    assert verify(f"{node_uuid}.crt").returncode == 0


def test_revoke_again_and_resign(ca, tmp_path):
    """Revoking twice records once; ``crl`` signs the same list with new dates."""
    folder, _ = ca
    out = tmp_path / "out"
    first = revoke(folder, out, certificate_path=folder / "alice.crt", now=NOW)
    second = revoke(folder, out, user="alice", now=NOW + timedelta(days=1))
    assert second.new == () and second.already == first.new
    assert len(CertificateIndex(folder / INDEX_FILE).revocations()) == 1
    later = NOW + timedelta(days=20)
    path, listed = resign_crl(folder, out, now=later)
    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert (listed, crl.last_update_utc) == (1, later)
    assert _serials(path) == {first.new[0].serial}


def test_expired_certificates_leave_the_list(ca, tmp_path):
    """A revoked certificate past its expiry is left out of later lists."""
    folder, _ = ca
    revoke(folder, tmp_path / "out", user="alice", now=NOW)
    path, listed = resign_crl(folder, tmp_path / "out", now=NOW + timedelta(days=3650))
    assert listed == 0 and _serials(path) == set()


def test_refusals_write_nothing(ca, tmp_path):
    """An unknown user, another CA's certificate or the CA itself: refused, nothing written."""
    folder, _ = ca
    out = tmp_path / "out"
    other = tmp_path / "other"
    other.mkdir()
    initialize(other, "other")
    create_api_certificate(other, other, "bob")
    with pytest.raises(NothingToRevoke, match="names no certificate of user-bob"):
        revoke(folder, out, user="bob")
    with pytest.raises(CertificateFileError, match="not issued by this cluster's CA"):
        revoke(folder, out, certificate_path=other / "bob.crt")
    with pytest.raises(CertificateFileError, match="the CA itself"):
        revoke(folder, out, certificate_path=folder / "cluster.crt")
    assert list(out.iterdir()) == [] and list_revoked(folder) == []


def test_cli(ca, tmp_path, capsys):
    """``pyflock-ca revoke``, ``list-revoked`` and ``crl`` say what they did."""
    folder, node_uuid = ca
    paths = ["-i", str(folder), "-o", str(tmp_path / "out")]
    assert ca_main(["list-revoked", *paths]) == 0
    assert capsys.readouterr().out == "No certificate is revoked.\n"
    assert ca_main(["revoke", "--user", "alice", *paths]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Revoked user-alice (serial ")
    assert f"{tmp_path / 'out' / CRL_FILE}: 1 certificate(s) revoked" in out
    assert ca_main(["list-revoked", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["REVOKED", "AT", "SERIAL", "COMMON", "NAME"]
    assert lines[1].endswith(" user-alice") and len(lines) == 2
    assert ca_main(["crl", *paths]) == 0
    assert "1 certificate(s) revoked, valid for 30 days" in capsys.readouterr().out
    assert ca_main(["revoke", "--node", "nonsense", *paths]) == 1
    assert "invalid node uuid 'nonsense'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ca_main(["revoke", "--node", node_uuid, "alice.crt", *paths])


def test_reading_refuses_what_the_ca_did_not_sign(ca, tmp_path):
    """A missing CRL revokes nothing; garbage or another CA's CRL is refused, named."""
    folder, _ = ca
    authority = load_certificate(folder / "cluster.crt")
    assert read_crl(tmp_path / "none.crl", authority) is NOTHING_REVOKED
    with pytest.raises(CertificateFileError, match="not a PEM certificate revocation list"):
        parse_crl(b"garbage", authority)
    other = tmp_path / "other"
    other.mkdir()
    initialize(other, "test")  # the same name: only the signature tells them apart
    path, _ = resign_crl(other, other)
    with pytest.raises(CertificateFileError):
        read_crl(path, authority)


def test_expired_list():
    """A list is expired only past its next update."""
    listing = RevocationList(frozenset({1}), NOW, NOW + CRL_LIFETIME)
    assert not listing.expired(NOW + CRL_LIFETIME)
    assert listing.expired(NOW + CRL_LIFETIME + timedelta(seconds=1))
    assert not NOTHING_REVOKED.expired(NOW)
