"""
The revocation list reaches the agents (issue 8, point 5), black box: a real
``pyflock-control`` and a real ``pyflock-agent``; ``pyflock-ca revoke --node`` revokes
another node's certificate; within seconds the agent has stored the list the control
service passed it, a TLS listener built as the agent builds its own (its ``ClusterTLS``
with the stored list) refuses the revoked node in the handshake and accepts a good one,
and the agent restarted while the control service is down still has the list in force.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol

from pyflock.agent._revocations import NodeRevocations
from pyflock.common._ca import load_certificate
from pyflock.common._crl import CRL_FILE
from pyflock.common._tls import PEER_TRANSFER, ClusterTLS, Identity
from tests.harness.agents import LocalCluster
from tests.harness.processes import script_path
from tests.harness.requirements import ROOT

pytestmark = [pytest.mark.integration, ROOT]

#: The list must reach the agent within this many seconds of ``pyflock-ca revoke``
#: (the control service looks at the file every second).
DELIVERY = 5.0


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs."""
    from twisted.internet import reactor
    return reactor


@pytest.fixture
def cluster(tmp_path):
    """Two nodes' certificates, a running control service and the agent of the second
    node (the first node is the one to revoke); everything stopped after."""
    local = LocalCluster(tmp_path / "cluster", nodes=2)
    try:
        local.control.start()
        local.agent(1).start()
        yield local
    finally:
        local.close()


class _Echo(Protocol):
    """Sends back what it receives."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class _Probe(Protocol):
    """Says ``ping`` once connected; ``answer`` fires with the echo, or None if the
    connection ends first."""

    def __init__(self):
        self.answer: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"ping")

    def dataReceived(self, data: bytes) -> None:
        if not self.answer.called:
            self.answer.callback(data)
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.answer.called:
            self.answer.callback(None)


async def _echoed(reactor, certificates, port: int, server_uuid: str):
    """What the listener on ``port`` echoes to a node presenting the certificate in
    ``certificates`` (None: the connection was refused or closed first)."""
    endpoint = ClusterTLS.load(certificates, "node").client_endpoint(
        reactor, "127.0.0.1", port, Identity.node(server_uuid))
    try:
        probe = await endpoint.connect(Factory.forProtocol(_Probe))
    except Exception:
        return None
    return await probe.answer


@pytest_twisted.ensureDeferred
async def test_agent_gets_the_list_and_refuses_the_revoked_node(reactor, cluster):
    """
    ``pyflock-ca revoke --node``: the agent stores the list within 5 s; a listener with
    the agent's TLS check and stored list refuses the revoked node's certificate and
    accepts another node's; after a restart with the control service down the agent
    loads the list again.
    """
    revoked, kept = cluster.node_uuids
    agent = cluster.agent(kept)
    folder = str(cluster.certificates.path)
    done = subprocess.run([script_path("pyflock-ca"), "revoke", "-i", folder, "-o", folder,
                           "--node", revoked], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    started = time.monotonic()
    stored = await agent.wait_for_event(reactor, "pyflock:agent:crl-stored",
                                        timeout=DELIVERY + 5)
    assert time.monotonic() - started <= DELIVERY
    assert stored["revoked"] == 1
    state = agent.config.state_path
    path = f"{state}/{CRL_FILE}"
    assert Path(path).read_text() == (cluster.certificates.path / CRL_FILE).read_text()

    # A listener as the agent makes its peer port: its ClusterTLS, the stored list.
    node = NodeRevocations(state, load_certificate(cluster.certificates.path /
                                                   "cluster.crt"))
    await node.load()
    tls = ClusterTLS.load(cluster.certificates.node_directory(kept), "node",
                          is_revoked=node.revocations.is_revoked)
    listener = tls.listener(reactor, "tcp:0:interface=127.0.0.1", PEER_TRANSFER)
    port = await listener.endpoint.listen(Factory.forProtocol(_Echo))
    try:
        number = port.getHost().port
        assert await _echoed(reactor, cluster.certificates.node_directory(revoked),
                             number, kept) is None
        assert await _echoed(reactor, cluster.certificates.node_directory(kept),
                             number, kept) == b"ping"
    finally:
        await port.stopListening()

    # Restarted with the control service down, the agent has the list from its state.
    cluster.control.stop()
    agent.stop()
    agent.start(connected=False)
    loaded = await agent.wait_for_event(reactor, "pyflock:agent:crl-loaded", timeout=10)
    assert loaded["revoked"] == 1 and loaded["path"] == path
