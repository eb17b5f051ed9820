"""
Tests for ``pyflock.common._ca`` and the ``pyflock-ca`` command.
"""

import ipaddress
import os
import shutil
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from uuid import UUID

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pyflock.common._ca import (
    AUTHORITY_LIFETIME, CERTIFICATE_LIFETIME, AuthorityNotFound, CertificateError,
    CertificateFileError, InvalidName, OutputExists, OutputPathError,
    create_api_certificate, create_control_certificate, create_node_certificate,
    initialize, read_cluster_uuid,
)
from pyflock.common._ca_script import main
from tests.harness.certificates import make_cluster_certificates
from tests.harness.files import unwritable
from tests.harness.requirements import required

#: The pyflock-ca script installed next to the Python running the tests.
CONSOLE_SCRIPT = Path(sys.executable).parent / "pyflock-ca"
OPENSSL = shutil.which("openssl")
NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def load(path):
    """The certificate in ``path``."""
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def subject(certificate, oid):
    """The values of attribute ``oid`` in ``certificate``'s subject."""
    return [a.value for a in certificate.subject.get_attributes_for_oid(oid)]


def extension(certificate, kind):
    """The extension of class ``kind`` in ``certificate``."""
    return certificate.extensions.get_extension_for_class(kind)


@pytest.fixture
def ca(tmp_path):
    """A folder holding a new cluster CA; yields (folder, CertificateFiles)."""
    files = initialize(tmp_path, "test cluster")
    return tmp_path, files


# initialize


def test_initialize_writes_a_ca_named_after_the_cluster(tmp_path):
    """``initialize`` writes cluster.crt/.key: CN is the name, OU a new cluster UUID."""
    files = initialize(tmp_path, "my cluster")
    certificate = load(tmp_path / "cluster.crt")
    assert files.certificate_path == tmp_path / "cluster.crt"
    assert files.key_path == tmp_path / "cluster.key"
    assert subject(certificate, NameOID.COMMON_NAME) == ["my cluster"]
    assert subject(certificate, NameOID.ORGANIZATIONAL_UNIT_NAME) == [files.cluster_uuid]
    assert str(UUID(files.cluster_uuid)) == files.cluster_uuid
    assert certificate.issuer == certificate.subject
    assert read_cluster_uuid(tmp_path) == files.cluster_uuid


def test_initialize_makes_a_new_cluster_uuid_each_time(tmp_path):
    """Two CAs get two different cluster UUIDs."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert (initialize(tmp_path / "a", "c").cluster_uuid
            != initialize(tmp_path / "b", "c").cluster_uuid)


def test_initialize_with_a_given_cluster_uuid(tmp_path):
    """A replacement CA can keep the cluster's UUID; a malformed one is refused."""
    files = initialize(tmp_path, "c", cluster_uuid="0B4C2F5E-9A3D-4E1B-8C7D-6A5B4C3D2E1F")
    assert files.cluster_uuid == "0b4c2f5e-9a3d-4e1b-8c7d-6a5b4c3d2e1f"
    assert read_cluster_uuid(tmp_path / "cluster.crt") == files.cluster_uuid
    (tmp_path / "x").mkdir()
    with pytest.raises(InvalidName, match="invalid cluster uuid 'nope'"):
        initialize(tmp_path / "x", "c", cluster_uuid="nope")
    assert list((tmp_path / "x").iterdir()) == []


def test_ca_extensions(ca):
    """The CA is a critical CA:TRUE with keyCertSign, and has key identifiers."""
    folder, _ = ca
    certificate = load(folder / "cluster.crt")
    constraints = extension(certificate, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = extension(certificate, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    ski = extension(certificate, x509.SubjectKeyIdentifier).value
    aki = extension(certificate, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    certificate.verify_directly_issued_by(certificate)


def test_keys_are_ecdsa_p256_and_private(tmp_path):
    """Keys are ECDSA P-256, unencrypted PEM, mode 0600 even with a permissive umask."""
    old = os.umask(0)
    try:
        initialize(tmp_path, "c")
        files = create_api_certificate(tmp_path, tmp_path, "alice")
    finally:
        os.umask(old)
    for key_path in (tmp_path / "cluster.key", files.key_path):
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"
    assert stat.S_IMODE(files.certificate_path.stat().st_mode) == 0o644


def test_validity_periods(tmp_path):
    """The CA lasts AUTHORITY_LIFETIME, a certificate CERTIFICATE_LIFETIME, both backdated."""
    initialize(tmp_path, "c", now=NOW)
    create_api_certificate(tmp_path, tmp_path, "alice", now=NOW)
    authority = load(tmp_path / "cluster.crt")
    leaf = load(tmp_path / "alice.crt")
    assert authority.not_valid_before_utc == NOW - timedelta(hours=1)
    assert authority.not_valid_after_utc == NOW + AUTHORITY_LIFETIME
    assert leaf.not_valid_before_utc == NOW - timedelta(hours=1)
    assert leaf.not_valid_after_utc == NOW + CERTIFICATE_LIFETIME
    assert AUTHORITY_LIFETIME >= timedelta(days=3650)
    assert timedelta(days=730) <= CERTIFICATE_LIFETIME <= timedelta(days=1827)


def test_certificate_never_outlives_the_ca(tmp_path):
    """A certificate issued near the CA's end expires with the CA."""
    initialize(tmp_path, "c", now=NOW)
    create_api_certificate(tmp_path, tmp_path, "alice",
                           now=NOW + AUTHORITY_LIFETIME - timedelta(days=10))
    assert (load(tmp_path / "alice.crt").not_valid_after_utc
            == load(tmp_path / "cluster.crt").not_valid_after_utc)


# issued certificates


def check_issued(folder, certificate, usages):
    """``certificate`` is a leaf of the CA in ``folder`` with extended key ``usages``."""
    authority = load(folder / "cluster.crt")
    certificate.verify_directly_issued_by(authority)
    assert certificate.issuer == authority.subject
    assert (subject(certificate, NameOID.ORGANIZATIONAL_UNIT_NAME)
            == subject(authority, NameOID.ORGANIZATIONAL_UNIT_NAME))
    constraints = extension(certificate, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = extension(certificate, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert list(extension(certificate, x509.ExtendedKeyUsage).value) == usages
    assert (extension(certificate, x509.AuthorityKeyIdentifier).value.key_identifier
            == extension(authority, x509.SubjectKeyIdentifier).value.digest)
    assert (extension(certificate, x509.SubjectKeyIdentifier).value.digest
            == x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest)


def test_control_certificate_for_an_ip_address(ca):
    """A control certificate for an IP address has CN control-service and an IP SAN."""
    folder, authority = ca
    files = create_control_certificate(folder, folder, "127.0.0.1")
    assert files.certificate_path == folder / "control-127.0.0.1.crt"
    assert files.key_path == folder / "control-127.0.0.1.key"
    assert files.cluster_uuid == authority.cluster_uuid
    certificate = load(files.certificate_path)
    assert subject(certificate, NameOID.COMMON_NAME) == ["control-service"]
    check_issued(folder, certificate, [ExtendedKeyUsageOID.SERVER_AUTH])
    names = extension(certificate, x509.SubjectAlternativeName).value
    assert list(names) == [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]


def test_control_certificate_for_an_ipv6_address(ca):
    """An IPv6 address also becomes an IP SAN."""
    folder, _ = ca
    files = create_control_certificate(folder, folder, "::1")
    names = extension(load(files.certificate_path), x509.SubjectAlternativeName).value
    assert list(names) == [x509.IPAddress(ipaddress.ip_address("::1"))]


def test_control_certificate_for_a_host_name(ca):
    """A control certificate for a host name has a DNS SAN."""
    folder, _ = ca
    files = create_control_certificate(folder, folder, "control.example.com")
    assert files.certificate_path.name == "control-control.example.com.crt"
    names = extension(load(files.certificate_path), x509.SubjectAlternativeName).value
    assert list(names) == [x509.DNSName("control.example.com")]


def test_node_certificate(ca):
    """A node certificate is <uuid>.crt with CN node-<uuid>, for server and client use."""
    folder, _ = ca
    node_uuid = create_node_certificate(folder, folder)
    assert str(UUID(node_uuid)) == node_uuid
    certificate = load(folder / f"{node_uuid}.crt")
    assert (folder / f"{node_uuid}.key").exists()
    assert subject(certificate, NameOID.COMMON_NAME) == [f"node-{node_uuid}"]
    check_issued(folder, certificate,
                 [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


def test_node_certificate_for_a_given_uuid(ca):
    """A given node uuid is used, normalised to lower case."""
    folder, _ = ca
    node_uuid = create_node_certificate(folder, folder, "0B4C2F5E-9A3D-4E1B-8C7D-6A5B4C3D2E1F")
    assert node_uuid == "0b4c2f5e-9a3d-4e1b-8c7d-6a5b4c3d2e1f"
    certificate = load(folder / f"{node_uuid}.crt")
    assert subject(certificate, NameOID.COMMON_NAME) == [f"node-{node_uuid}"]


def test_node_certificate_refuses_a_bad_uuid(ca):
    """A node uuid that is no UUID is refused."""
    folder, _ = ca
    with pytest.raises(InvalidName, match="invalid node uuid 'abc'"):
        create_node_certificate(folder, folder, "abc")


def test_api_certificate(ca):
    """An API certificate is <user>.crt with CN user-<user>, for client use only."""
    folder, _ = ca
    files = create_api_certificate(folder, folder, "alice")
    assert files.certificate_path == folder / "alice.crt"
    assert files.common_name == "user-alice"
    certificate = load(files.certificate_path)
    assert subject(certificate, NameOID.COMMON_NAME) == ["user-alice"]
    check_issued(folder, certificate, [ExtendedKeyUsageOID.CLIENT_AUTH])


def test_issue_into_another_folder(ca, tmp_path_factory):
    """Certificates go into the output folder; the CA folder is only read."""
    folder, _ = ca
    out = tmp_path_factory.mktemp("out")
    create_api_certificate(folder, out, "bob")
    assert sorted(p.name for p in out.iterdir()) == ["bob.crt", "bob.key"]
    assert not (folder / "bob.crt").exists()


# errors


@pytest.mark.parametrize("missing", ["cluster.crt", "cluster.key"])
def test_missing_ca_file(ca, missing):
    """Issuing without cluster.crt or cluster.key names the missing file."""
    folder, _ = ca
    (folder / missing).unlink()
    with pytest.raises(AuthorityNotFound, match=f"{missing}: no such file"):
        create_api_certificate(folder, folder, "alice")
    assert not (folder / "alice.crt").exists()


def test_missing_ca_folder(tmp_path):
    """Issuing from a folder that does not exist says so."""
    with pytest.raises(AuthorityNotFound, match="no such folder"):
        create_node_certificate(tmp_path / "nope", tmp_path)


def test_ca_key_of_another_ca(tmp_path):
    """A cluster.key that does not belong to cluster.crt is refused."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    initialize(tmp_path / "a", "a")
    initialize(tmp_path / "b", "b")
    shutil.copyfile(tmp_path / "b" / "cluster.key", tmp_path / "a" / "cluster.key")
    with pytest.raises(AuthorityNotFound, match="does not belong to"):
        create_api_certificate(tmp_path / "a", tmp_path, "alice")


def test_garbage_ca_certificate(ca):
    """A cluster.crt that is not a certificate is refused, naming it."""
    folder, _ = ca
    (folder / "cluster.crt").write_text("hello\n")
    with pytest.raises(AuthorityNotFound, match="cluster.crt: not a PEM certificate"):
        create_api_certificate(folder, folder, "alice")


def test_initialize_never_overwrites(ca):
    """A second ``initialize`` in the same folder is refused and changes nothing."""
    folder, _ = ca
    before = (folder / "cluster.key").read_bytes()
    with pytest.raises(OutputExists, match="cluster.crt already exists"):
        initialize(folder, "again")
    assert (folder / "cluster.key").read_bytes() == before


@pytest.mark.parametrize("existing", ["alice.crt", "alice.key"])
def test_issue_never_overwrites(ca, existing):
    """Issuing over an existing .crt or .key is refused and writes neither file."""
    folder, _ = ca
    (folder / existing).write_text("mine\n")
    with pytest.raises(OutputExists, match=f"{existing} already exists"):
        create_api_certificate(folder, folder, "alice")
    assert (folder / existing).read_text() == "mine\n"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["cluster.crt", "cluster.key", existing])


def test_missing_output_folder(ca):
    """An output folder that does not exist is refused."""
    folder, _ = ca
    with pytest.raises(OutputPathError, match="does not exist"):
        create_api_certificate(folder, folder / "nope", "alice")
    with pytest.raises(OutputPathError, match="does not exist"):
        initialize(folder / "nope", "c")


def test_output_path_is_a_file(ca):
    """An output path that is a file is refused."""
    folder, _ = ca
    with pytest.raises(OutputPathError, match="is not a folder"):
        create_api_certificate(folder, folder / "cluster.crt", "alice")


def test_unwritable_output_folder(ca, tmp_path_factory):
    """An output folder that cannot be written is refused, naming the file."""
    folder, _ = ca
    with unwritable(tmp_path_factory.mktemp("ro")) as out:
        with pytest.raises(OutputPathError, match="cannot write .*alice"):
            create_api_certificate(folder, out, "alice")


@pytest.mark.parametrize("user", [
    "", "../x", "a/b", ".hidden", "-x", "a b", "é", "a\nb", "x" * 60,
    "cluster", "node", "control-service",
])
def test_invalid_user_names(ca, user):
    """User names that are unsafe as files or would shadow other certificates are refused."""
    folder, _ = ca
    with pytest.raises(InvalidName, match="invalid user name"):
        create_api_certificate(folder, folder, user)
    assert sorted(p.name for p in folder.iterdir()) == ["cluster.crt", "cluster.key"]


@pytest.mark.parametrize("user", ["alice", "Bob_2", "a.b-c", "x" * 59, "7"])
def test_valid_user_names(ca, user):
    """Letters, digits, '_', '.' and '-' are accepted."""
    folder, _ = ca
    assert create_api_certificate(folder, folder, user).common_name == f"user-{user}"


@pytest.mark.parametrize("hostname", [
    "", "a_b", "-a.example", "a-.example", "a..b", "host.", "1.2.3", "999.1.1.1",
    "[::1]", "fe80::1%eth0", "a/b", "ex ample", "é.example", "a" * 64 + ".example",
])
def test_invalid_hostnames(ca, hostname):
    """Anything but an IP address or a DNS name is refused as a control host name."""
    folder, _ = ca
    with pytest.raises(InvalidName, match="invalid host name"):
        create_control_certificate(folder, folder, hostname)


def test_invalid_cluster_name(tmp_path):
    """A cluster name that is empty, too long or unprintable is refused."""
    for name in ("", "   ", "x" * 65, "a\nb"):
        with pytest.raises(InvalidName, match="invalid cluster name"):
            initialize(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_errors_are_certificate_errors():
    """Every refusal is a CertificateError, so one handler catches them all."""
    for kind in (AuthorityNotFound, CertificateFileError, InvalidName, OutputExists,
                 OutputPathError):
        assert issubclass(kind, CertificateError)


# the command line


def test_cli_initialize_and_issue_everything(tmp_path, capsys):
    """Each subcommand writes its files into -o, reading the CA from -i."""
    out = tmp_path / "out"
    out.mkdir()
    assert main(["initialize", "-o", str(tmp_path), "cli cluster"]) == 0
    assert main(["create-control-certificate", "-i", str(tmp_path), "-o", str(out),
                 "control.example"]) == 0
    assert main(["create-api-certificate", "--inputpath", str(tmp_path),
                 "--outputpath", str(out), "alice"]) == 0
    capsys.readouterr()
    assert main(["create-node-certificate", "-i", str(tmp_path), "-o", str(out)]) == 0
    node_uuid = capsys.readouterr().out.strip()
    assert str(UUID(node_uuid)) == node_uuid
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "control-control.example.crt", "control-control.example.key",
        "alice.crt", "alice.key", f"{node_uuid}.crt", f"{node_uuid}.key"])
    assert (subject(load(out / f"{node_uuid}.crt"), NameOID.COMMON_NAME)
            == [f"node-{node_uuid}"])


def test_cli_defaults_to_the_current_folder(tmp_path, monkeypatch, capsys):
    """Without -i/-o, pyflock-ca reads and writes the current folder."""
    monkeypatch.chdir(tmp_path)
    assert main(["initialize", "c"]) == 0
    assert main(["create-api-certificate", "alice"]) == 0
    assert main(["create-node-certificate", "--uuid",
                 "0b4c2f5e-9a3d-4e1b-8c7d-6a5b4c3d2e1f"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "0b4c2f5e-9a3d-4e1b-8c7d-6a5b4c3d2e1f"
    assert (tmp_path / "alice.crt").exists()
    assert (tmp_path / "0b4c2f5e-9a3d-4e1b-8c7d-6a5b4c3d2e1f.crt").exists()


@pytest.mark.parametrize("argv, message", [
    (["create-api-certificate", "alice"], "cluster.crt: no such file"),
    (["create-api-certificate", "../evil"], "invalid user name"),
    (["create-control-certificate", "bad_host"], "invalid host name"),
    (["create-api-certificate", "-o", "missing", "alice"], "does not exist"),
    (["create-node-certificate", "--uuid", "nope"], "invalid node uuid"),
    (["initialize", "--cluster-uuid", "nope", "c2"], "invalid cluster uuid"),
])
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, message):
    """A refused command prints one error line (no traceback) and exits with 1."""
    monkeypatch.chdir(tmp_path)
    if "cluster.crt" not in message:
        initialize(tmp_path, "c")
    capsys.readouterr()
    assert main(argv) == 1
    output = capsys.readouterr()
    assert output.out == ""
    lines = output.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("pyflock-ca: error: ")
    assert message in lines[0]


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    """A second initialize in one folder exits with 1 and leaves the CA alone."""
    assert main(["initialize", "-o", str(tmp_path), "c"]) == 0
    before = (tmp_path / "cluster.key").read_bytes()
    assert main(["initialize", "-o", str(tmp_path), "c"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "cluster.key").read_bytes() == before


def test_cli_usage_errors_exit_with_2(capsys):
    """A missing subcommand or argument is a usage error (exit status 2)."""
    for argv in ([], ["create-api-certificate"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2
    assert "usage: pyflock-ca" in capsys.readouterr().err


@pytest.mark.integration
@required(CONSOLE_SCRIPT.exists(), f"{CONSOLE_SCRIPT} is not installed: make install")
def test_console_script(tmp_path):
    """The installed pyflock-ca script issues certificates and reports errors plainly."""
    def run(*argv):
        return subprocess.run([str(CONSOLE_SCRIPT), *argv], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert run("initialize", "scripted").returncode == 0
    node = run("create-node-certificate")
    assert node.returncode == 0, node.stderr
    node_uuid = node.stdout.strip()
    assert (tmp_path / f"{node_uuid}.crt").exists()
    refused = run("create-api-certificate", "a/b")
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr
    assert refused.stderr.startswith("pyflock-ca: error: invalid user name")


# what OpenSSL itself thinks


def openssl_verify(folder, certificate, purpose=None):
    """Run ``openssl verify -x509_strict`` against the folder's CA; return the result."""
    argv = [OPENSSL, "verify", "-x509_strict", "-CAfile", str(folder / "cluster.crt")]
    if purpose:
        argv += ["-purpose", purpose]
    return subprocess.run(argv + [str(certificate)], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.integration
@required(OPENSSL, "needs the openssl command: apt-get install openssl")
def test_openssl_strict_verification(tmp_path):
    """``openssl verify -x509_strict`` accepts every certificate for its purposes."""
    certs = make_cluster_certificates(tmp_path, nodes=1, users=("alice",))
    node = tmp_path / f"{certs.node_uuids[0]}.crt"
    for certificate, purposes in [
        (tmp_path / "cluster.crt", [None]),
        (tmp_path / "control-service.crt", [None, "sslserver"]),
        (node, [None, "sslserver", "sslclient"]),
        (tmp_path / "alice.crt", [None, "sslclient"]),
    ]:
        for purpose in purposes:
            result = openssl_verify(tmp_path, certificate, purpose)
            assert result.returncode == 0, (certificate, purpose, result.stdout,
                                            result.stderr)


@pytest.mark.integration
@required(OPENSSL, "needs the openssl command: apt-get install openssl")
def test_openssl_refuses_wrong_purposes_and_other_cas(tmp_path):
    """OpenSSL refuses a user certificate as a server, and any certificate of another CA."""
    ours = tmp_path / "ours"
    theirs = tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    make_cluster_certificates(ours, nodes=0)
    make_cluster_certificates(theirs, nodes=0)
    assert openssl_verify(ours, ours / "alice.crt", "sslserver").returncode != 0
    assert openssl_verify(ours, ours / "control-service.crt", "sslclient").returncode != 0
    assert openssl_verify(ours, theirs / "alice.crt").returncode != 0
