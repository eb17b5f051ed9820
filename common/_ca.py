"""
The cluster's certificate authority: creating the CA and issuing certificates signed by it.

A pyflock cluster trusts exactly one CA, ``cluster.crt``. Its subject carries the cluster's
name (CN) and a cluster UUID (OU); every certificate it issues copies that OU, and its CN says
who holds it: ``control-service``, ``node-<uuid>`` or ``user-<name>``. Keys are ECDSA P-256.
Nothing here overwrites a file: issuing into an existing name is refused.

Every refusal is a ``CertificateError`` whose message is one line a person can act on.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional, Sequence, Union
from uuid import UUID, uuid4

import attr
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pyflock.common._files import append_durably, fsync_path

PathLike = Union[str, "os.PathLike[str]"]

#: File names of the cluster CA, in the CA folder and in every certificates folder.
AUTHORITY_CERTIFICATE = "cluster.crt"
AUTHORITY_KEY = "cluster.key"

#: The common name of the control service's certificate.
CONTROL_COMMON_NAME = "control-service"

#: How long the CA is valid; a cluster outliving it needs a new CA (docs/security.md).
AUTHORITY_LIFETIME = timedelta(days=3652)

#: How long an issued certificate is valid, cut short where the CA expires sooner.
CERTIFICATE_LIFETIME = timedelta(days=1826)

# Certificates start an hour in the past so that a host whose clock is a little behind the
# CA's does not reject a certificate issued a moment ago.
_CLOCK_SKEW = timedelta(hours=1)

#: User names: safe as a file name and inside ``user-<name>``.
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")

# X.509 limits a common name to 64 characters; ``user-`` takes 5 of them.
_MAX_USER_NAME = 64 - len("user-")

# A user certificate named like one of these would be mistaken for it once installed in a
# certificates folder (/etc/pyflock/cluster.crt, node.crt, control-service.crt).
_RESERVED_USER_NAMES = frozenset({"cluster", "node", "control-service"})

_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


class CertificateError(Exception):
    """A certificate could not be issued or loaded; ``str()`` says why, in one line."""


class CertificateFileError(CertificateError):
    """A certificate or key file is missing, unreadable or not what it should be."""

    def __init__(self, path: PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class AuthorityNotFound(CertificateFileError):
    """The CA folder lacks ``cluster.crt`` or ``cluster.key`` (or cannot be read)."""


class OutputExists(CertificateError):
    """A file to be written already exists; pyflock-ca never overwrites one."""

    def __init__(self, path: PathLike):
        super().__init__(f"{path} already exists; remove it or choose another output folder "
                         "(-o): pyflock-ca never overwrites a certificate or key")
        self.path = Path(path)


class OutputPathError(CertificateError):
    """The output folder is missing, not a folder, or cannot be written."""


class InvalidName(CertificateError):
    """A user name, host name or cluster name is not acceptable."""


@attr.s(frozen=True, auto_attribs=True)
class CertificateFiles:
    """A certificate and its key as written, with the identity they carry."""

    certificate_path: Path
    key_path: Path
    common_name: str
    cluster_uuid: str


def validate_user_name(user: str) -> str:
    """Return ``user`` if it can name an API user, else raise ``InvalidName``."""
    if not isinstance(user, str) or not USER_NAME.match(user):
        raise InvalidName(
            f"invalid user name {user!r}: use letters, digits, '_', '.' and '-', "
            "starting with a letter or digit")
    if len(user) > _MAX_USER_NAME:
        raise InvalidName(
            f"invalid user name {user!r}: at most {_MAX_USER_NAME} characters")
    if user in _RESERVED_USER_NAMES:
        raise InvalidName(
            f"invalid user name {user!r}: {user}.crt is the name of another certificate "
            "in a certificates folder; choose another name")
    return user


def parse_hostname(hostname: str) -> x509.GeneralName:
    """
    The subjectAltName entry for ``hostname``: an IP address entry for an IPv4 or IPv6
    address, a DNS entry for a host name; ``InvalidName`` for anything else.
    """
    if not isinstance(hostname, str) or not hostname:
        raise InvalidName("invalid host name: it is empty")
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        pass
    else:
        if getattr(address, "scope_id", None):
            raise InvalidName(
                f"invalid host name {hostname!r}: give the address without a %scope")
        return x509.IPAddress(address)
    labels = hostname.split(".")
    if (len(hostname) > 253
            or not all(_DNS_LABEL.match(label) for label in labels)
            or labels[-1].isdigit()):
        raise InvalidName(
            f"invalid host name {hostname!r}: give an IP address or a DNS name made of "
            "letters, digits and '-' (an internationalised name in its xn-- form), "
            "without a trailing dot")
    return x509.DNSName(hostname)


def _validate_cluster_name(name: str) -> str:
    """Return ``name`` if it can be the CA's common name, else raise ``InvalidName``."""
    if (not isinstance(name, str) or not name.strip() or len(name) > 64
            or not name.isprintable()):
        raise InvalidName(
            f"invalid cluster name {name!r}: give 1 to 64 printable characters")
    return name


def _now(now: Optional[datetime]) -> datetime:
    """``now`` as an aware UTC datetime, the current time if it is None."""
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None:
        return now.replace(tzinfo=timezone.utc)
    return now


def _folder(path: PathLike, what: str) -> Path:
    """``path`` as a Path after checking that it is an existing folder."""
    folder = Path(path)
    if not folder.exists():
        raise OutputPathError(f"{what} folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise OutputPathError(f"{what} {folder} is not a folder")
    return folder


def _read(path: Path, error: type[CertificateFileError], what: str) -> bytes:
    """The bytes of ``path``, or ``error`` naming the file and the reason."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(path, f"no such {what} file") from None
    except OSError as e:
        raise error(path, f"cannot read {what} file: {e.strerror or e}") from None


def load_certificate(path: PathLike,
                     error: type[CertificateFileError] = CertificateFileError
                     ) -> x509.Certificate:
    """The PEM certificate in ``path``, or a ``CertificateFileError`` naming it."""
    path = Path(path)
    data = _read(path, error, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise error(path, "not a PEM certificate") from None


def load_private_key(path: PathLike,
                     error: type[CertificateFileError] = CertificateFileError):
    """The unencrypted PEM private key in ``path``, or a ``CertificateFileError`` naming it."""
    path = Path(path)
    data = _read(path, error, "key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise error(path, "the key is encrypted; pyflock needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise error(path, "not a PEM private key") from None


def check_key_matches(certificate: x509.Certificate, key, key_path: PathLike,
                      certificate_path: PathLike,
                      error: type[CertificateFileError] = CertificateFileError) -> None:
    """Raise ``error`` unless ``key`` is the private key of ``certificate``."""
    def public_bytes(public_key):
        return public_key.public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    if public_bytes(key.public_key()) != public_bytes(certificate.public_key()):
        raise error(key_path, f"this key does not belong to {certificate_path}")


def cluster_uuid_of(certificate: x509.Certificate) -> Optional[str]:
    """The cluster UUID in ``certificate``'s subject (its single OU), or None."""
    units = certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(units) != 1:
        return None
    try:
        return str(UUID(units[0].value))
    except (ValueError, TypeError):
        return None


def common_name_of(certificate: x509.Certificate) -> Optional[str]:
    """The single common name in ``certificate``'s subject, or None."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        return None
    return names[0].value


def read_cluster_uuid(path: PathLike) -> str:
    """
    The cluster UUID of the CA certificate ``path/cluster.crt`` (``path`` may also name the
    certificate file itself); ``CertificateFileError`` if it is missing or has none.
    """
    path = Path(path)
    if path.is_dir():
        path = path / AUTHORITY_CERTIFICATE
    certificate = load_certificate(path)
    cluster_uuid = cluster_uuid_of(certificate)
    if cluster_uuid is None:
        raise CertificateFileError(
            path, "no cluster UUID (organizational unit) in the certificate; "
                  "it was not made by pyflock-ca")
    return cluster_uuid


def _load_authority(ca_path: PathLike) -> "SigningAuthority":
    """The CA in ``ca_path``, or ``AuthorityNotFound`` naming what is wrong."""
    folder = Path(ca_path)
    if not folder.is_dir():
        raise AuthorityNotFound(
            folder, "no such folder; give the folder holding cluster.crt and cluster.key "
                    "with -i/--inputpath")
    certificate_path = folder / AUTHORITY_CERTIFICATE
    key_path = folder / AUTHORITY_KEY
    for path in (certificate_path, key_path):
        if not path.exists():
            raise AuthorityNotFound(
                path, "no such file; run `pyflock-ca initialize NAME` first, or give the "
                      "folder holding cluster.crt and cluster.key with -i/--inputpath")
    certificate = load_certificate(certificate_path, AuthorityNotFound)
    key = load_private_key(key_path, AuthorityNotFound)
    check_key_matches(certificate, key, key_path, certificate_path, AuthorityNotFound)
    cluster_uuid = cluster_uuid_of(certificate)
    if cluster_uuid is None:
        raise AuthorityNotFound(
            certificate_path, "no cluster UUID (organizational unit) in the CA "
                              "certificate; it was not made by pyflock-ca")
    return SigningAuthority(certificate=certificate, key=key, cluster_uuid=cluster_uuid,
                            index=CertificateIndex.beside(key_path))


def _subject(common_name: str, cluster_uuid: str) -> x509.Name:
    """A subject with ``common_name`` and the cluster UUID as organizational unit."""
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cluster_uuid),
    ])


def _new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _write_pair(folder: Path, base_name: str, certificate: x509.Certificate,
                key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    """
    Write ``base_name.crt`` (mode 0644) and ``base_name.key`` (mode 0600) into ``folder``,
    refusing if either exists; on failure neither is left behind.
    """
    certificate_path = folder / f"{base_name}.crt"
    key_path = folder / f"{base_name}.key"
    for path in (certificate_path, key_path):
        if os.path.lexists(path):
            raise OutputExists(path)
    key_bytes = key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    certificate_bytes = certificate.public_bytes(serialization.Encoding.PEM)
    written = []
    try:
        # The key is created 0600 by open(2) itself, so it is never readable by others,
        # not even for a moment; O_EXCL refuses a file that appeared since the check above.
        for path, data, mode in ((key_path, key_bytes, 0o600),
                                 (certificate_path, certificate_bytes, 0o644)):
            _write_new(path, data, mode)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink()
        raise
    return certificate_path, key_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` and write ``data``; never touch an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise OutputExists(path) from None
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputPathError(
                f"cannot write {path}: {e.strerror}; choose a writable output folder "
                "(-o/--outputpath)") from None
        raise OutputPathError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        path.unlink()
        raise OutputPathError(f"cannot write {path}: {e.strerror or e}") from None


def _parse_uuid(value: Union[str, UUID], what: str) -> str:
    """``value`` as a lower-case UUID string, or ``InvalidName`` naming ``what``."""
    if isinstance(value, UUID):
        return str(value)
    try:
        return str(UUID(value))
    except (ValueError, TypeError, AttributeError):
        raise InvalidName(
            f"invalid {what} {value!r}: give a UUID such as {uuid4()}") from None


def initialize(path: PathLike, name: str, *,
               cluster_uuid: Union[str, UUID, None] = None,
               now: Optional[datetime] = None) -> CertificateFiles:
    """
    Create a new cluster CA, ``path/cluster.crt`` and ``path/cluster.key``, with common
    name ``name`` and as organizational unit ``cluster_uuid`` (a new one if None; give the
    old one when replacing a cluster's CA).
    """
    _validate_cluster_name(name)
    cluster_uuid = (str(uuid4()) if cluster_uuid is None
                    else _parse_uuid(cluster_uuid, "cluster uuid"))
    folder = _folder(path, "output")
    now = _now(now)
    key = _new_key()
    subject = _subject(name, cluster_uuid)
    key_identifier = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + AUTHORITY_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(key_identifier, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(key_identifier),
            critical=False)
        .sign(key, hashes.SHA256())
    )
    certificate_path, key_path = _write_pair(folder, "cluster", certificate, key)
    return CertificateFiles(certificate_path=certificate_path, key_path=key_path,
                            common_name=name, cluster_uuid=cluster_uuid)


def _authority_identifier(authority: "SigningAuthority") -> x509.AuthorityKeyIdentifier:
    """The authority key identifier of certificates ``authority`` issues."""
    try:
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            authority.certificate.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier).value)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key())


def _build_leaf(authority: "SigningAuthority", public_key, common_name: str, usages: list,
                alt_names: list, now: datetime) -> x509.Certificate:
    """A leaf certificate for ``common_name`` and ``public_key``, signed by ``authority``."""
    not_after = min(now + CERTIFICATE_LIFETIME, authority.certificate.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(common_name, authority.cluster_uuid))
        .issuer_name(authority.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                       critical=False)
        .add_extension(_authority_identifier(authority), critical=False)
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names),
                                        critical=False)
    return builder.sign(authority.key, hashes.SHA256())


def _issue(ca_path: PathLike, out_path: PathLike, base_name: str, common_name: str,
           usages: list, alt_names: list, now: Optional[datetime]) -> CertificateFiles:
    """
    Issue a leaf certificate for ``common_name``, record it in the CA's index and write
    it as ``base_name.crt/.key``.
    """
    authority = _load_authority(ca_path)
    folder = _folder(out_path, "output")
    for suffix in (".crt", ".key"):
        if os.path.lexists(folder / f"{base_name}{suffix}"):
            raise OutputExists(folder / f"{base_name}{suffix}")
    now = _now(now)
    key = _new_key()
    certificate = _build_leaf(authority, key.public_key(), common_name, usages, alt_names,
                              now)
    # Recorded before it is written: the index may name a certificate never installed,
    # never miss one that was.
    authority.index.record(certificate, now, ISSUED_BY_CA)
    certificate_path, key_path = _write_pair(folder, base_name, certificate, key)
    return CertificateFiles(certificate_path=certificate_path, key_path=key_path,
                            common_name=common_name, cluster_uuid=authority.cluster_uuid)


def create_control_certificate(ca_path: PathLike, out_path: PathLike,
                               hostname: Union[str, Sequence[str]], *,
                               now: Optional[datetime] = None) -> CertificateFiles:
    """
    Issue the control service's certificate (CN ``control-service``, serverAuth) with
    ``hostname`` as subjectAltName, or each of several (the replicas' names and a DNS name
    listing them all: issue 9), as ``out_path/control-<first hostname>.crt/.key``.
    """
    hostnames = [hostname] if isinstance(hostname, str) else list(hostname)
    if not hostnames:
        raise InvalidName("give the control service's host name or address")
    repeated = sorted({name for name in hostnames if hostnames.count(name) > 1})
    if repeated:
        raise InvalidName(f"{', '.join(repeated)} given more than once")
    alt_names = [parse_hostname(name) for name in hostnames]
    return _issue(ca_path, out_path, f"control-{hostnames[0]}", CONTROL_COMMON_NAME,
                  [ExtendedKeyUsageOID.SERVER_AUTH], alt_names, now)


def create_node_certificate(ca_path: PathLike, out_path: PathLike,
                            node_uuid: Union[str, UUID, None] = None, *,
                            now: Optional[datetime] = None) -> str:
    """
    Issue a node's certificate (CN ``node-<uuid>``, serverAuth and clientAuth) as
    ``out_path/<uuid>.crt/.key`` for ``node_uuid`` (a new one if None); return the uuid.
    """
    node_uuid = (str(uuid4()) if node_uuid is None
                 else _parse_uuid(node_uuid, "node uuid"))
    _issue(ca_path, out_path, node_uuid, f"node-{node_uuid}",
           [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], [], now)
    return node_uuid


def create_api_certificate(ca_path: PathLike, out_path: PathLike, user: str, *,
                           now: Optional[datetime] = None) -> CertificateFiles:
    """
    Issue an API user's certificate (CN ``user-<user>``, clientAuth) as
    ``out_path/<user>.crt/.key``.
    """
    validate_user_name(user)
    return _issue(ca_path, out_path, user, f"user-{user}",
                  [ExtendedKeyUsageOID.CLIENT_AUTH], [], now)


# -- the CA's index of issued certificates ------------------------------------------------

#: The index's file name, in the folder of the CA key (``cluster.key``).
INDEX_FILE = "issued.jsonl"

#: Who issued a certificate: ``pyflock-ca``, or the control service's join service.
ISSUED_BY_CA = "pyflock-ca"
ISSUED_BY_JOIN = "join"


def _timestamp(moment: datetime) -> str:
    """``moment`` as ISO 8601 UTC with seconds, ``2026-12-04T16:00:00Z``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@attr.s(frozen=True, auto_attribs=True)
class IssuedCertificate:
    """
    One certificate the CA issued, as its index keeps it: ``serial`` (an integer; hex in
    the file), ``subject`` (RFC 4514), ``common_name``, ``not_after`` and ``issued_at``
    (aware UTC datetimes) and ``issued_by`` (``pyflock-ca`` or ``join``).
    """

    serial: int
    subject: str
    common_name: Optional[str]
    not_after: datetime
    issued_at: datetime
    issued_by: str

    @classmethod
    def of(cls, certificate: x509.Certificate, issued_at: datetime,
           issued_by: str) -> "IssuedCertificate":
        """The index entry of ``certificate``, issued at ``issued_at`` by ``issued_by``."""
        return cls(serial=certificate.serial_number,
                   subject=certificate.subject.rfc4514_string(),
                   common_name=common_name_of(certificate),
                   not_after=certificate.not_valid_after_utc,
                   issued_at=_now(issued_at).replace(microsecond=0),
                   issued_by=issued_by)

    def to_json(self) -> dict:
        """The entry as one line of the index holds it."""
        return {"kind": "issued", "serial": format(self.serial, "x"),
                "subject": self.subject, "common_name": self.common_name,
                "not_after": _timestamp(self.not_after),
                "issued_at": _timestamp(self.issued_at), "issued_by": self.issued_by}

    @classmethod
    def from_json(cls, value: dict) -> "IssuedCertificate":
        """The entry of one ``issued`` line; ValueError or KeyError if it is malformed."""
        return cls(serial=int(value["serial"], 16), subject=value["subject"],
                   common_name=value["common_name"], not_after=_moment(value["not_after"]),
                   issued_at=_moment(value["issued_at"]), issued_by=value["issued_by"])


class CertificateIndex:
    """
    The CA's index of every certificate it issued (``pyflock-ca`` and the join service):
    ``issued.jsonl`` beside ``cluster.key``, one JSON object per line with a ``kind``.
    Lines are only ever appended (under an exclusive lock, fsynced), so that ``pyflock-ca``
    and a running control service may both issue. A line is ``issued`` (a certificate
    issued) or ``revoked`` (``pyflock-ca revoke``: a serial revoked); readers skip kinds
    they do not know. A torn last line, left by a crash, is ignored and cut off by the
    next append. Blocking: call it in a thread from a reactor.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)

    @classmethod
    def beside(cls, key_path: PathLike) -> "CertificateIndex":
        """The index of the CA whose key is ``key_path``."""
        return cls(Path(key_path).parent / INDEX_FILE)

    def _lines(self, data: bytes) -> list[dict]:
        """The complete lines of ``data``, parsed; ``CertificateFileError`` if garbled."""
        objects = []
        for number, line in enumerate(data.split(b"\n")[:-1], 1):
            try:
                value = json.loads(line)
                if not isinstance(value, dict):
                    raise ValueError("not an object")
            except ValueError:
                raise CertificateFileError(
                    self.path, f"line {number} is not a JSON object: the index is "
                               f"damaged") from None
            objects.append(value)
        return objects

    def _of_kind(self, kind: str, parse, what: str) -> list:
        """Every line of ``kind``, parsed by ``parse``, in order (none without an index)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise CertificateFileError(self.path, f"cannot read the index: "
                                                  f"{e.strerror or e}") from None
        entries = []
        for number, value in enumerate(self._lines(data), 1):
            if value.get("kind") != kind:
                continue
            try:
                entries.append(parse(value))
            except (KeyError, ValueError, TypeError, AttributeError):
                raise CertificateFileError(
                    self.path, f"line {number} is not a {what} entry: the index is "
                               f"damaged") from None
        return entries

    def entries(self) -> list[IssuedCertificate]:
        """Every certificate recorded, in the order issued (none if there is no index)."""
        return self._of_kind("issued", IssuedCertificate.from_json, "certificate")

    def revocations(self) -> list["RevokedCertificate"]:
        """Every revocation recorded, in the order revoked (none if there is no index)."""
        return self._of_kind("revoked", RevokedCertificate.from_json, "revocation")

    def record(self, certificate: x509.Certificate, issued_at: datetime,
               issued_by: str) -> IssuedCertificate:
        """Append ``certificate`` durably; its entry. ``OutputPathError`` if it cannot."""
        entry = IssuedCertificate.of(certificate, issued_at, issued_by)
        self._append(entry.to_json())
        return entry

    def record_revocation(self, entry: "RevokedCertificate") -> None:
        """Append the revocation ``entry`` durably; ``OutputPathError`` if it cannot."""
        self._append(entry.to_json())

    def _append(self, value: dict) -> None:
        """Append ``value`` as one line, locked and fsynced, after the last whole line."""
        line = json.dumps(value, sort_keys=True).encode("utf-8") + b"\n"
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise OutputPathError(f"cannot write the CA's index {self.path}: "
                                  f"{e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0) if size else b""
            complete = data.rfind(b"\n") + 1
            append_durably(self.path, line, at=complete if complete != size else None)
            if size == 0:
                fsync_path(self.path.parent, directory=True)
        except OSError as e:
            raise OutputPathError(f"cannot write the CA's index {self.path}: "
                                  f"{e.strerror or e}") from None
        finally:
            os.close(fd)


def _moment(text: str) -> datetime:
    """The aware UTC datetime of an index timestamp (``_timestamp``'s form)."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


@attr.s(frozen=True, auto_attribs=True)
class RevokedCertificate:
    """
    One revocation, as the index keeps it: the certificate's ``serial``, ``common_name``
    and ``not_after`` (after which the CRL may leave it out), and ``revoked_at``.
    """

    serial: int
    common_name: Optional[str]
    not_after: datetime
    revoked_at: datetime

    @classmethod
    def of(cls, certificate: x509.Certificate, revoked_at: datetime) -> "RevokedCertificate":
        """The revocation of ``certificate`` at ``revoked_at``."""
        return cls(serial=certificate.serial_number,
                   common_name=common_name_of(certificate),
                   not_after=certificate.not_valid_after_utc,
                   revoked_at=_now(revoked_at).replace(microsecond=0))

    @classmethod
    def of_entry(cls, entry: IssuedCertificate,
                 revoked_at: datetime) -> "RevokedCertificate":
        """The revocation of the issued certificate ``entry`` at ``revoked_at``."""
        return cls(serial=entry.serial, common_name=entry.common_name,
                   not_after=entry.not_after,
                   revoked_at=_now(revoked_at).replace(microsecond=0))

    def to_json(self) -> dict:
        """The revocation as one line of the index holds it."""
        return {"kind": "revoked", "serial": format(self.serial, "x"),
                "common_name": self.common_name, "not_after": _timestamp(self.not_after),
                "revoked_at": _timestamp(self.revoked_at)}

    @classmethod
    def from_json(cls, value: dict) -> "RevokedCertificate":
        """The revocation of one ``revoked`` line; ValueError or KeyError if malformed."""
        return cls(serial=int(value["serial"], 16), common_name=value["common_name"],
                   not_after=_moment(value["not_after"]),
                   revoked_at=_moment(value["revoked_at"]))


# -- signing a node's request (the join service) -------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class SigningAuthority:
    """A loaded CA that signs: its certificate, key, cluster uuid and the index of what it
    issued (``pyflock-ca`` and the join service both sign through one)."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cluster_uuid: str
    index: CertificateIndex


def load_signing_authority(certificate_path: PathLike,
                           key_path: PathLike) -> SigningAuthority:
    """
    The CA ``certificate_path`` (``cluster.crt``) with its key ``key_path`` and the index
    beside the key; ``CertificateFileError`` if they are missing or do not match.
    """
    certificate = load_certificate(certificate_path)
    key = load_private_key(key_path)
    check_key_matches(certificate, key, key_path, certificate_path)
    cluster_uuid = read_cluster_uuid(certificate_path)
    return SigningAuthority(certificate=certificate, key=key, cluster_uuid=cluster_uuid,
                            index=CertificateIndex.beside(key_path))


class InvalidRequest(CertificateError):
    """A certificate signing request is malformed, badly signed or has an unusable key."""


def parse_signing_request(pem: Union[str, bytes]) -> x509.CertificateSigningRequest:
    """The PEM request ``pem`` if it is well signed with a P-256 key, else ``InvalidRequest``."""
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    try:
        request = x509.load_pem_x509_csr(data)
        valid = request.is_signature_valid
        public_key = request.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidRequest("the certificate signing request is not a PEM "
                             "request") from None
    if not valid:
        raise InvalidRequest("the certificate signing request's signature is not valid")
    if not (isinstance(public_key, ec.EllipticCurvePublicKey)
            and isinstance(public_key.curve, ec.SECP256R1)):
        raise InvalidRequest("the certificate signing request's key is not an ECDSA "
                             "P-256 key")
    return request


def sign_node_request(authority: SigningAuthority, request: x509.CertificateSigningRequest,
                      node_uuid: Union[str, UUID], *, now: Optional[datetime] = None,
                      issued_by: str = ISSUED_BY_JOIN) -> x509.Certificate:
    """
    A node certificate for ``node_uuid`` with the key of ``request`` (whose subject is
    ignored), recorded in the CA's index before it is returned. Blocking.
    """
    node_uuid = _parse_uuid(node_uuid, "node uuid")
    now = _now(now)
    certificate = _build_leaf(
        authority, request.public_key(), f"node-{node_uuid}",
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], [], now)
    authority.index.record(certificate, now, issued_by)
    return certificate


#: Write a certificate and its key as ``<base>.crt`` (0644) and ``<base>.key`` (0600),
#: never over an existing file (``OutputExists``); on failure neither is left behind.
write_pair = _write_pair

#: Create a new file with a mode and its data, fsynced; never over an existing one.
write_new_file = _write_new
