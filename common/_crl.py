"""
The cluster's certificate revocation list, ``cluster.crl``: revoking certificates with the
CA (``pyflock-ca revoke``, ``crl``, ``list-revoked``) and reading the list where
certificates are checked.

A revocation is first recorded in the CA's index (``issued.jsonl``, a ``revoked`` line);
the CRL is then signed anew from the index (X.509 v2, signed by ``cluster.key``, valid
``CRL_LIFETIME``) and replaces ``cluster.crl`` in one rename, so a reader sees the old
list or the new one, never half of one. No CRL file means nothing is revoked; a CRL past
its next update still counts (the reader warns), because an old list of revoked
certificates is better than none. Blocking file IO: call it in a thread from a reactor.
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterable, Optional, Union
from uuid import UUID

import attr
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from pyflock.common._ca import (
    CertificateError, CertificateFileError, InvalidName, OutputPathError, PathLike,
    RevokedCertificate, SigningAuthority, _authority_identifier, _folder, _load_authority,
    _now, _parse_uuid, _read, load_certificate, validate_user_name,
)
from pyflock.common._files import fsync_path

#: The revocation list's file name, beside ``cluster.crt`` in a certificates folder.
CRL_FILE = "cluster.crl"

#: How long a CRL is valid: re-sign it (``pyflock-ca crl``) before then.
CRL_LIFETIME = timedelta(days=30)


class NothingToRevoke(CertificateError):
    """The CA's index names no certificate of the node or user to revoke."""


@attr.s(frozen=True, auto_attribs=True)
class RevocationList:
    """
    A CRL as read: the revoked ``serials``, and when it was signed (``last_update``) and
    should be replaced (``next_update``); both None for the empty list of a missing file.
    ``pem`` is the list itself, as PEM text (None for a missing file), to pass on to agents.
    """

    serials: frozenset = frozenset()
    last_update: Optional[datetime] = None
    next_update: Optional[datetime] = None
    pem: Optional[str] = None

    def is_revoked(self, certificate: x509.Certificate) -> bool:
        """Whether ``certificate`` (issued by this cluster's CA) is revoked."""
        return certificate.serial_number in self.serials

    def expired(self, now: datetime) -> bool:
        """Whether the list is past its next update at ``now``."""
        return self.next_update is not None and _now(now) > self.next_update


#: The list of a cluster without ``cluster.crl``: nothing is revoked.
NOTHING_REVOKED = RevocationList()


# -- reading -------------------------------------------------------------------------------


def parse_crl(data: bytes, authority: x509.Certificate,
              path: PathLike = CRL_FILE) -> RevocationList:
    """
    The revocation list in the PEM ``data`` if ``authority`` (``cluster.crt``) signed it;
    ``CertificateFileError`` naming ``path`` otherwise.
    """
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError:
        raise CertificateFileError(path, "not a PEM certificate revocation list") from None
    if crl.issuer != authority.subject:
        raise CertificateFileError(path, "the revocation list is not this cluster CA's "
                                         f"(issuer {crl.issuer.rfc4514_string()})")
    try:
        valid = crl.is_signature_valid(authority.public_key())
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise CertificateFileError(path, "the revocation list's signature is not the "
                                         "cluster CA's")
    return RevocationList(serials=frozenset(r.serial_number for r in crl),
                          last_update=crl.last_update_utc, next_update=crl.next_update_utc,
                          pem=crl.public_bytes(serialization.Encoding.PEM).decode("ascii"))


def read_crl(path: PathLike, authority: x509.Certificate) -> RevocationList:
    """
    The revocation list in ``path``, ``NOTHING_REVOKED`` if there is no such file;
    ``CertificateFileError`` if it cannot be read or is not the CA's.
    """
    path = Path(path)
    if not path.exists():
        return NOTHING_REVOKED
    return parse_crl(_read(path, CertificateFileError, "revocation list"), authority, path)


# -- signing (the CA) ----------------------------------------------------------------------


def sign_crl(authority: SigningAuthority, revoked: Iterable[RevokedCertificate],
             now: datetime) -> x509.CertificateRevocationList:
    """
    The CRL listing ``revoked`` (each serial once; those expired at ``now`` left out),
    signed by ``authority`` at ``now``, valid ``CRL_LIFETIME``.
    """
    now = _now(now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(authority.certificate.subject)
        .last_update(now)
        .next_update(now + CRL_LIFETIME)
        .add_extension(_authority_identifier(authority), critical=False)
        # Increasing with each signing, as RFC 5280 asks.
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1_000_000)), critical=False)
    )
    seen = set()
    for entry in revoked:
        if entry.serial in seen or entry.not_after < now:
            continue
        seen.add(entry.serial)
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(entry.serial)
            .revocation_date(entry.revoked_at).build())
    return builder.sign(authority.key, hashes.SHA256())


def write_crl(folder: PathLike, crl: x509.CertificateRevocationList) -> Path:
    """Replace ``folder/cluster.crl`` with ``crl`` (mode 0644) in one rename; its path."""
    folder = _folder(folder, "output")
    path = folder / CRL_FILE
    temporary = folder / f".{CRL_FILE}.{secrets.token_hex(8)}.tmp"
    data = crl.public_bytes(serialization.Encoding.PEM)
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        fsync_path(folder, directory=True)
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {e.strerror or e}") from None
    return path


@attr.s(frozen=True, auto_attribs=True)
class Revoked:
    """What ``revoke`` did: the revocations it recorded (``new``), those it found made
    before (``already``), and the CRL it wrote (``crl_path``, ``listed`` serials)."""

    new: tuple
    already: tuple
    crl_path: Path
    listed: int


def _targets(authority: SigningAuthority, node: Optional[str], user: Optional[str],
             certificate_path: Optional[PathLike], now: datetime) -> list[RevokedCertificate]:
    """The revocations asked for: every certificate of ``node`` or ``user`` in the index,
    or the certificate in ``certificate_path`` (which this CA must have issued)."""
    if certificate_path is not None:
        certificate = load_certificate(certificate_path)
        try:
            certificate.verify_directly_issued_by(authority.certificate)
        except (ValueError, TypeError, InvalidSignature):
            raise CertificateFileError(certificate_path,
                                       "not issued by this cluster's CA") from None
        if certificate.serial_number == authority.certificate.serial_number:
            raise CertificateFileError(certificate_path,
                                       "this is the CA itself: replace the CA instead "
                                       "(docs/security.md)")
        return [RevokedCertificate.of(certificate, now)]
    common_name = f"node-{node}" if node is not None else f"user-{user}"
    entries = [e for e in authority.index.entries() if e.common_name == common_name]
    if not entries:
        raise NothingToRevoke(
            f"the CA's index {authority.index.path} names no certificate of {common_name}; "
            "give the certificate file to revoke instead")
    return [RevokedCertificate.of_entry(e, now) for e in entries]


def revoke(ca_path: PathLike, out_path: PathLike, *, node: Union[str, UUID, None] = None,
           user: Optional[str] = None, certificate_path: Optional[PathLike] = None,
           now: Optional[datetime] = None) -> Revoked:
    """
    Revoke every certificate of ``node`` or ``user``, or the one in ``certificate_path``
    (exactly one of them): record it in the CA's index, then sign ``out_path/cluster.crl``
    anew. Revoking what is already revoked only re-signs the list.
    """
    if sum(x is not None for x in (node, user, certificate_path)) != 1:
        raise InvalidName("give exactly one of a node uuid, a user name or a certificate")
    if node is not None:
        node = _parse_uuid(node, "node uuid")
    if user is not None:
        validate_user_name(user)
    authority = _load_authority(ca_path)
    _folder(out_path, "output")
    now = _now(now).replace(microsecond=0)
    done = {r.serial: r for r in authority.index.revocations()}
    targets = _targets(authority, node, user, certificate_path, now)
    new = tuple(t for t in targets if t.serial not in done)
    for entry in new:
        authority.index.record_revocation(entry)
    already = tuple(done[t.serial] for t in targets if t.serial in done)
    path, listed = _resign(authority, out_path, now)
    return Revoked(new=new, already=already, crl_path=path, listed=listed)


def _resign(authority: SigningAuthority, out_path: PathLike,
            now: datetime) -> tuple[Path, int]:
    """Sign the CRL of every revocation in the index into ``out_path``; path and size."""
    crl = sign_crl(authority, authority.index.revocations(), now)
    return write_crl(out_path, crl), len(crl)


def resign_crl(ca_path: PathLike, out_path: PathLike, *,
               now: Optional[datetime] = None) -> tuple[Path, int]:
    """Sign ``out_path/cluster.crl`` anew from the CA's index (``pyflock-ca crl``): its
    path and how many certificates it lists."""
    authority = _load_authority(ca_path)
    return _resign(authority, out_path, _now(now).replace(microsecond=0))


def list_revoked(ca_path: PathLike) -> list[RevokedCertificate]:
    """Every revocation in the CA's index (``pyflock-ca list-revoked``), in order."""
    return _load_authority(ca_path).index.revocations()


__all__ = [
    "CRL_FILE", "CRL_LIFETIME", "NOTHING_REVOKED", "NothingToRevoke", "RevocationList",
    "Revoked", "list_revoked", "parse_crl", "read_crl", "resign_crl",
    "revoke", "sign_crl", "write_crl",
]
