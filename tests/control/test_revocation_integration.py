"""
Certificate revocation against a real control service: ``pyflock-ca revoke`` writes
``cluster.crl`` into its certificates folder, and the revoked node's open agent-channel
connection is closed within 5 s, its new connections are refused, and a revoked user's
REST requests are refused (issue 8, point 5).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from uuid import uuid4

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater

from pyflock.common._tls import ClusterTLS, Identity
from pyflock.common._wire import Hello, MessageProtocol, Welcome
from pyflock.common._ca import create_api_certificate
from tests.control.test_integration import cluster, reactor  # the same fixtures
from tests.harness.control import APIClient, ControlProcess, read_events, script_path

pytestmark = pytest.mark.integration

__all__ = ["cluster", "reactor"]


@pytest.fixture
def control(tmp_path, cluster):
    """A running control service on the cluster's certificates folder (with user bob
    beside alice); killed after."""
    create_api_certificate(cluster.path, cluster.path, "bob")
    process = ControlProcess(tmp_path / "data", cluster.path, host=cluster.control_host,
                             log_directory=tmp_path / "logs")
    process.start()
    yield process
    process.close()


class _Agent(MessageProtocol):
    """A bare agent-channel client: says hello, records what it hears and when it ends."""

    side = "agent"

    def __init__(self, node_uuid: str):
        super().__init__()
        self.node_uuid = node_uuid
        self.messages: list = []
        self.welcomed: Deferred = Deferred()
        self.lost_at = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.send(Hello(node_uuid=self.node_uuid, era=uuid4().hex, address="127.0.0.1"))

    def message_received(self, message) -> None:
        self.messages.append(message)
        if isinstance(message, Welcome) and not self.welcomed.called:
            self.welcomed.callback(message)

    def connectionLost(self, reason) -> None:
        self.lost_at = time.monotonic()
        super().connectionLost(reason)
        if not self.welcomed.called:
            self.welcomed.errback(reason)


async def _channel(reactor, cluster, control, node_uuid: str) -> _Agent:
    """A connection of ``node_uuid`` to the agent channel, welcomed (or failed)."""
    tls = ClusterTLS.load(cluster.node_directory(node_uuid), "node")
    endpoint = tls.client_endpoint(reactor, control.host, control.agent_port,
                                   Identity.control())
    agent = await endpoint.connect(Factory.forProtocol(lambda: _Agent(node_uuid)))
    await agent.welcomed
    return agent


def _pyflock_ca(*arguments: str) -> subprocess.CompletedProcess:
    """Run ``pyflock-ca`` with ``arguments``; it must succeed."""
    done = subprocess.run([script_path("pyflock-ca"), *arguments], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done


async def _wait(reactor, predicate, timeout: float) -> bool:
    """Whether ``predicate()`` became true within ``timeout`` seconds (polling)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await deferLater(reactor, 0.05, lambda: None)
    return True


@pytest_twisted.ensureDeferred
async def test_revoked_node_is_cut_off(reactor, cluster, control):
    """
    ``pyflock-ca revoke --node``: the node's open agent-channel connection is closed
    within 5 s, a new one fails, and another node keeps its connection.
    """
    revoked, kept = cluster.node_uuids
    victim = await _channel(reactor, cluster, control, revoked)
    other = await _channel(reactor, cluster, control, kept)
    folder = str(cluster.path)
    _pyflock_ca("revoke", "-i", folder, "-o", folder, "--node", revoked)
    started = time.monotonic()
    assert await _wait(reactor, lambda: victim.lost_at is not None, 10.0)
    assert victim.lost_at - started <= 5.0
    with pytest.raises(Exception):
        await _channel(reactor, cluster, control, revoked)
    refused = read_events(control.log_path, "pyflock:tls:revoked-refused")
    assert len(refused) == 1 and f"node-{revoked}" in refused[0]["reason"]
    assert other.lost_at is None and other.connected
    closed = read_events(control.log_path, "pyflock:crl:connection-closed")
    assert [e["listener"] for e in closed] == ["agent channel"]
    assert f"node-{revoked}" in closed[0]["reason"]
    other.transport.loseConnection()
    await other.when_lost()


@pytest_twisted.ensureDeferred
async def test_revoked_user_is_refused(reactor, cluster, control):
    """
    ``pyflock-ca revoke --user``: the user's kept-alive REST connection is closed and
    new requests fail in the handshake (curl too); other users go on.
    """
    bob = APIClient(reactor, control.url, cluster.path, "bob")
    alice = APIClient(reactor, control.url, cluster.path, "alice")
    try:
        assert (await bob.get("/v1/version")).code == 200
        folder = str(cluster.path)
        _pyflock_ca("revoke", "-i", folder, "-o", folder, "--user", "bob")
        assert await _wait(reactor, lambda: read_events(
            control.log_path, "pyflock:crl:connection-closed"), 5.0)
        with pytest.raises(Exception):
            await bob.get("/v1/version")
        assert (await alice.get("/v1/version")).code == 200
    finally:
        await bob.close()
        await alice.close()
    curled = subprocess.run(
        ["curl", "--silent", "--max-time", "20", "--cacert", f"{folder}/cluster.crt",
         "--cert", f"{folder}/bob.crt", "--key", f"{folder}/bob.key",
         "--write-out", "%{http_code}", control.url + "/v1/version"],
        capture_output=True, text=True, timeout=30)
    assert curled.returncode != 0 and curled.stdout.endswith("000")
    refused = read_events(control.log_path, "pyflock:tls:revoked-refused")
    assert refused and all("user-bob" in e["reason"] for e in refused)


@pytest_twisted.ensureDeferred
async def test_sighup_and_removal(reactor, cluster, control, tmp_path):
    """A CRL put in place is applied on SIGHUP at once (before the next look at the
    file); removing it revokes nothing any more."""
    revoked = cluster.node_uuids[0]
    elsewhere = tmp_path / "crl"
    elsewhere.mkdir()
    _pyflock_ca("revoke", "-i", str(cluster.path), "-o", str(elsewhere), "--node", revoked)
    (elsewhere / "cluster.crl").rename(cluster.path / "cluster.crl")
    os.kill(control.pid, signal.SIGHUP)
    await control.wait_for_event(reactor, "pyflock:crl:loaded",
                                 lambda e: e["revoked"] == 1, timeout=0.9)
    with pytest.raises(Exception):
        await _channel(reactor, cluster, control, revoked)
    (cluster.path / "cluster.crl").unlink()
    await control.wait_for_event(reactor, "pyflock:crl:loaded",
                                 lambda e: e["revoked"] == 0, after=1)
    agent = await _channel(reactor, cluster, control, revoked)
    agent.transport.loseConnection()
    await agent.when_lost()
