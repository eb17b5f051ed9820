"""
Test helpers for certificates and TLS, shared by the tests of every package.

``make_cluster_certificates(path)`` makes a whole cluster's certificates with the same
Python API as ``pyflock-ca`` (ECDSA keys take milliseconds, so each test can make its own).
``issue_certificate`` and ``unchecked_client_policy`` make the clients a server must refuse
or treat as nobody: odd common names, no certificate, another cluster's certificate.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

import attr
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import optionsForClientTLS, trustRootFromCertificates
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from pyflock.common._ca import (
    CertificateFiles, PathLike, _issue, create_api_certificate, create_control_certificate,
    create_node_certificate, initialize, load_certificate, load_private_key,
)
from pyflock.common._tls import MINIMUM_TLS_VERSION, _load_twisted_certificate


@attr.s(frozen=True, auto_attribs=True)
class ClusterCertificates:
    """
    One test cluster's certificates, all in ``path``:

    - ``cluster.crt``, ``cluster.key``: the CA;
    - ``control-service.crt/.key``: the control service (subjectAltName ``control_host``),
      also kept as issued, ``control-<control_host>.crt/.key``;
    - ``<uuid>.crt/.key`` for each of ``node_uuids``;
    - ``<user>.crt/.key`` for each of ``users``;

    and, for each node, a folder laid out as on a real node, ``node_directory(uuid)`` =
    ``path/nodes/<uuid>/`` holding ``cluster.crt``, ``node.crt`` and ``node.key``.
    """

    path: Path
    cluster_uuid: str
    node_uuids: tuple[str, ...]
    users: tuple[str, ...]
    control_host: str

    def node_directory(self, node_uuid: str) -> Path:
        """The certificates folder of node ``node_uuid`` (cluster.crt, node.crt, node.key)."""
        return self.path / "nodes" / node_uuid

    @property
    def node_directories(self) -> tuple[Path, ...]:
        """The certificates folders of all nodes, in the order of ``node_uuids``."""
        return tuple(self.node_directory(node_uuid) for node_uuid in self.node_uuids)


def make_cluster_certificates(path: PathLike, nodes: int = 2,
                              users: Iterable[str] = ("alice",),
                              control_host: str = "127.0.0.1",
                              name: str = "test-cluster") -> ClusterCertificates:
    """Make a new test cluster's CA and certificates in the existing folder ``path``."""
    folder = Path(path)
    cluster_uuid = initialize(folder, name).cluster_uuid
    control = create_control_certificate(folder, folder, control_host)
    shutil.copyfile(control.certificate_path, folder / "control-service.crt")
    _copy_key(control.key_path, folder / "control-service.key")
    node_uuids = []
    for _ in range(nodes):
        node_uuid = create_node_certificate(folder, folder)
        node_folder = folder / "nodes" / node_uuid
        node_folder.mkdir(parents=True)
        shutil.copyfile(folder / "cluster.crt", node_folder / "cluster.crt")
        shutil.copyfile(folder / f"{node_uuid}.crt", node_folder / "node.crt")
        _copy_key(folder / f"{node_uuid}.key", node_folder / "node.key")
        node_uuids.append(node_uuid)
    users = tuple(users)
    for user in users:
        create_api_certificate(folder, folder, user)
    return ClusterCertificates(path=folder, cluster_uuid=cluster_uuid,
                               node_uuids=tuple(node_uuids), users=users,
                               control_host=control_host)


def _copy_key(source: Path, destination: Path) -> None:
    """Copy a private key to a new file that is created with mode 0600."""
    fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(source.read_bytes())


def issue_certificate(ca_path: PathLike, out_path: PathLike, base_name: str,
                      common_name: str) -> CertificateFiles:
    """
    Issue ``base_name.crt/.key`` with any ``common_name`` (e.g. ``plugin`` or
    ``user-x`` with odd characters), for both client and server use: pyflock-ca never
    makes such certificates, but a server must cope with them.
    """
    return _issue(ca_path, out_path, base_name, common_name,
                  [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], [],
                  None)


@implementer(IPolicyForHTTPS)
class _FixedPolicy:
    """An HTTPS policy that checks host names with fixed trust and client certificate."""

    def __init__(self, trust, certificate_options: dict):
        self._trust = trust
        self._certificate_options = certificate_options

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """Client TLS options for ``hostname``."""
        return optionsForClientTLS(
            hostname.decode("ascii").strip("[]"), trustRoot=self._trust,
            extraCertificateOptions=dict(self._certificate_options,
                                         raiseMinimumTo=MINIMUM_TLS_VERSION))


def unchecked_client_policy(trusted_ca: PathLike, certificate: PathLike | None = None,
                            key: PathLike | None = None) -> IPolicyForHTTPS:
    """
    An HTTPS policy trusting the CA certificate file ``trusted_ca`` and presenting the
    ``certificate``/``key`` files as they are (none if None), whoever issued them: a
    client without a certificate, or with another cluster's.
    """
    options = {}
    if certificate is not None:
        options = {"certificate": load_certificate(certificate),
                   "privateKey": load_private_key(key)}
    return _FixedPolicy(trustRootFromCertificates([_load_twisted_certificate(trusted_ca)]),
                        options)


__all__ = ["ClusterCertificates", "issue_certificate", "make_cluster_certificates",
           "unchecked_client_policy"]
