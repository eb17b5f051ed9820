"""
Test helpers for certificates and TLS, shared by the tests of every package.

``make_cluster_certificates(path)`` makes a whole cluster's certificates with the same
Python API as ``pyflock-ca`` (ECDSA keys take milliseconds, so each test can make its own).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

import attr

from pyflock.common._ca import (
    PathLike, create_api_certificate, create_control_certificate, create_node_certificate,
    initialize,
)


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


__all__ = ["ClusterCertificates", "make_cluster_certificates"]
