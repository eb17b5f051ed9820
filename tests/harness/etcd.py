"""
Real etcd clusters for tests: ``EtcdCluster(size, log_directory)`` starts ``size`` etcd 3.4
members (``/usr/bin/etcd`` from the distribution) on 127.0.0.1 with free client and peer
ports and their data on tmpfs (``/dev/shm``), with etcd's stock flags except the ones a
cluster needs (names, URLs, the initial cluster); the v3 JSON gateway is on by default
when etcd is started with flags. ``close`` kills every member and removes its data.

``EtcdCluster(..., tls=EtcdServerTLS(...))`` serves clients over TLS only, asking for
client certificates signed by the given CA (``--client-cert-auth``); peers stay on http.

``require_etcd()`` makes a test fail under ``$CI`` and skip loudly otherwise when etcd is
not installed (``deploy/local/install.sh`` installs ``etcd-server``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

import attr
import pytest

from tests.harness.processes import ServiceProcess, free_port
from tests.harness.requirements import require_commands

#: How long a cluster may take to have a leader.
START_TIMEOUT = 30.0

#: Where member data goes: tmpfs when the machine has it.
TMPFS = "/dev/shm"


def require_etcd() -> None:
    """``require`` that the etcd server is installed."""
    require_commands("etcd")


@attr.s(frozen=True, auto_attribs=True)
class EtcdServerTLS:
    """PEM files for TLS on etcd's client port: its certificate and key, the CA of client
    certificates, and a client certificate and key for the harness's own checks."""

    certificate: Path
    key: Path
    ca: Path
    client_certificate: Path
    client_key: Path

    def client_context(self) -> ssl.SSLContext:
        """An SSL context trusting ``ca`` and presenting the client certificate."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_certificate), str(self.client_key))
        return context


class EtcdMember(ServiceProcess):
    """One etcd member ``name`` of a cluster whose members are ``initial_cluster``."""

    program = "etcd"
    what = "etcd member"

    def __init__(self, name: str, data_dir: Path, log_directory: Path, token: str,
                 tls: Optional[EtcdServerTLS] = None):
        super().__init__(name, log_directory)
        self.tls = tls
        self.data_dir = data_dir
        self.client_port = free_port("127.0.0.1")
        self.peer_port = free_port("127.0.0.1")
        self.token = token
        self.initial_cluster = ""

    @property
    def url(self) -> str:
        """The member's client URL (the gateway is under ``/v3``)."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        """The member's peer URL."""
        return f"http://127.0.0.1:{self.peer_port}"

    def arguments(self) -> list[str]:
        """etcd's command line: stock flags but for names, URLs and the initial cluster."""
        return [shutil.which("etcd") or "etcd", "--name", self.name,
                "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", self.initial_cluster,
                "--initial-cluster-token", self.token,
                "--initial-cluster-state", "new"] + ([] if self.tls is None else [
                    "--cert-file", str(self.tls.certificate), "--key-file", str(self.tls.key),
                    "--client-cert-auth", "--trusted-ca-file", str(self.tls.ca)])

    def pause(self) -> None:
        """Stop the member with SIGSTOP, as a long GC pause or a hung host would."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused member run again (SIGCONT)."""
        os.kill(self.pid, signal.SIGCONT)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Start a member that was killed again, on its data, and wait until it has a leader."""
        self.spawn()
        deadline = time.monotonic() + timeout
        while not (self.status() or {}).get("leader"):
            if not self.running:
                raise self.exited(self.returncode, self.stderr)
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd member {self.name} not back within {timeout} s")
            time.sleep(0.05)

    def status(self, timeout: float = 1.0) -> Optional[dict]:
        """``/v3/maintenance/status`` of this member, or None if it does not answer."""
        try:
            request = urllib.request.Request(f"{self.url}/v3/maintenance/status", data=b"{}")
            context = None if self.tls is None else self.tls.client_context()
            with urllib.request.urlopen(request, timeout=timeout,
                                        context=context) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        """Kill the member if it runs (resuming it first if paused)."""
        if self.running:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        super().close()


class EtcdCluster:
    """``size`` etcd members started together; ``endpoints`` are their client URLs."""

    def __init__(self, size: int, log_directory: os.PathLike,
                 tls: Optional[EtcdServerTLS] = None,
                 data_parent: Optional[os.PathLike] = None):
        require_etcd()
        # data_parent: where member data goes instead of tmpfs (benchmarks: on disk).
        root = data_parent or (TMPFS if os.path.isdir(TMPFS) else None)
        self.data_root = Path(tempfile.mkdtemp(prefix="pyflock-etcd-", dir=root))
        token = self.data_root.name
        self.members = [EtcdMember(f"m{i}", self.data_root / f"m{i}",
                                   Path(log_directory), token, tls) for i in range(size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.initial_cluster = initial

    @property
    def endpoints(self) -> list[str]:
        """The client URLs of every member."""
        return [m.url for m in self.members]

    def start(self, timeout: float = START_TIMEOUT) -> "EtcdCluster":
        """Start every member and wait until each answers and the cluster has a leader."""
        for member in self.members:
            member.spawn()
        deadline = time.monotonic() + timeout
        while not all(self._ready(m) for m in self.members):
            for member in self.members:
                if not member.running:
                    self.close()
                    raise member.exited(member.returncode, member.stderr)
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"etcd cluster not ready within {timeout} s")
            time.sleep(0.05)
        return self

    @staticmethod
    def _ready(member: EtcdMember) -> bool:
        status = member.status()
        return bool(status and int(status.get("leader", 0)))

    def leader(self) -> Optional[EtcdMember]:
        """The member that leads now, as one that answers says."""
        for member in self.members:
            status = member.status()
            if status and int(status.get("leader", 0)):
                leader_id = status["leader"]
                for candidate in self.members:
                    found = candidate.status()
                    if found and found["header"]["member_id"] == leader_id:
                        return candidate
        return None

    def close(self) -> None:
        """Kill every member and remove the data (safe to call at any time)."""
        for member in self.members:
            member.close()
        shutil.rmtree(self.data_root, ignore_errors=True)

    def __enter__(self) -> "EtcdCluster":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def etcd_cluster_fixture(size: int, scope: str = "module"):
    """A pytest fixture: a started ``EtcdCluster`` of ``size`` members, closed after."""
    @pytest.fixture(scope=scope)
    def cluster(tmp_path_factory):
        """A started etcd cluster, killed and removed at teardown."""
        started = EtcdCluster(size, tmp_path_factory.mktemp(f"etcd{size}-logs")).start()
        yield started
        started.close()
    return cluster


__all__ = ["EtcdCluster", "EtcdMember", "EtcdServerTLS", "etcd_cluster_fixture", "require_etcd"]
