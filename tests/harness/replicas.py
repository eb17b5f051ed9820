"""
Control service replicas on etcd for tests (issue 9): ``replicas_on_etcd(root, endpoints)``
makes a cluster's certificates in ``root`` and one ``ControlProcess`` per entry of
``endpoints`` (the etcd client URLs that replica is given), all on one fresh etcd prefix
and one 127.0.0.x address, each named ``replica<n>`` (``--replica-name``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence
from uuid import uuid4

from tests.harness.certificates import make_cluster_certificates
from tests.harness.control import ControlProcess, free_address


def replicas_on_etcd(root: Path, endpoints: Sequence[str], extra_arguments: Sequence[str] = (),
                     **options) -> tuple:
    """
    (the cluster's certificates, the prefix, the replicas, not started): replica ``n``
    talks to the etcd members ``endpoints[n]`` (``URL[,URL...]``); ``extra_arguments``
    and ``options`` (``ControlProcess``'s) go to every replica.
    """
    folder = root / "certs"
    folder.mkdir()
    host, _ = free_address()
    cluster = make_cluster_certificates(folder, nodes=1, users=("alice",), control_host=host)
    prefix = f"/replicas-{uuid4().hex[:8]}/"
    processes = [ControlProcess(root / f"data{n}", folder, host=host,
                                log_directory=root / "logs", extra_arguments=[
                                    "--store", "etcd", "--etcd-endpoints", members,
                                    "--etcd-prefix", prefix, "--replica-name", f"replica{n}",
                                    *extra_arguments], **options)
                 for n, members in enumerate(endpoints)]
    return cluster, prefix, processes


__all__ = ["replicas_on_etcd"]
