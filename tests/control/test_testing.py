"""
``pyflock.control.testing.APIHarness`` behaves like the real control service: the same
assertions, made through ``ControlClient``, run once against the harness in memory and
once against a real ``pyflock-control`` over mutual TLS.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._client import (
    AccessDenied, ConfigurationChanged, Conflict, ControlClient, InvalidRequest,
    NotAllowed, NotFound,
)
from pyflock.common._model import MINIMUM_SIZE
from pyflock.common._tls import Identity
from pyflock.control.testing import APIHarness

UNKNOWN = "99999999-0000-4000-8000-000000000009"


async def _raises(error_type, deferred: Deferred, *fragments: str):
    """Await ``deferred``, which must fail with ``error_type`` whose text has ``fragments``."""
    try:
        await deferred
    except error_type as e:
        for fragment in fragments:
            assert fragment in str(e), (fragment, str(e))
        return e
    raise AssertionError(f"{error_type.__name__} was not raised")


async def behaves_like_the_control_service(user, node, node_uuid: str, other_uuid: str):
    """
    The contract: ``user`` (a user certificate) and ``node`` (node ``node_uuid``'s
    certificate) are ``IControlClient``s of a fresh control service without agents.
    """
    version = await user.version()
    assert version.flocker and version.pyflock
    assert (await user.list_nodes(), await user.state_datasets()) == ((), ())

    created = await user.create_dataset(node_uuid, maximum_size=MINIMUM_SIZE,
                                        metadata={"name": "db"})
    assert (created.primary, created.maximum_size, dict(created.metadata),
            created.deleted) == (node_uuid, MINIMUM_SIZE, {"name": "db"}, False)
    listing = await user.list_datasets()
    assert listing.datasets == (created,) and listing.tag
    await _raises(Conflict, user.create_dataset(other_uuid, metadata={"name": "db"}),
                  "The name 'db' is already used by dataset")
    await _raises(ConfigurationChanged, user.create_dataset(other_uuid,
                                                            if_matches="stale-tag"))
    await _raises(AccessDenied, node.create_dataset(other_uuid),
                  "a node certificate acts only for its own node")

    lease = await node.acquire_lease(created.dataset_id, node_uuid, 60)
    assert lease.node_uuid == node_uuid and 0 < lease.remaining(node.seconds()) <= 60
    assert [x.dataset_id for x in await user.list_leases()] == [created.dataset_id]
    await _raises(Conflict, user.move_dataset(created.dataset_id, other_uuid),
                  f"Lease already held by node {node_uuid}")
    released = await user.release_lease(created.dataset_id)
    assert released.node_uuid == node_uuid
    assert await user.list_leases() == ()
    await _raises(NotFound, user.release_lease(created.dataset_id), "Lease not found.")

    moved = await user.move_dataset(created.dataset_id, other_uuid)
    assert moved.primary == other_uuid
    deleted = await user.delete_dataset(created.dataset_id)
    assert deleted.deleted
    assert (await user.delete_dataset(created.dataset_id)).deleted
    await _raises(NotAllowed, user.move_dataset(created.dataset_id, node_uuid),
                  "The dataset has been deleted.")
    await _raises(NotFound, user.move_dataset(UNKNOWN, node_uuid), "Dataset not found.")
    await _raises(NotFound, user.node_by_era("no-such-era"))

    await _raises(NotFound, user.forget_node(UNKNOWN), f"No node {UNKNOWN} is known")
    await _raises(InvalidRequest, user.forget_node("not-a-uuid"), "is not a node uuid")
    await _raises(AccessDenied, node.forget_node(UNKNOWN),
                  "Only a user certificate may forget a node")


class HarnessTests(SynchronousTestCase):
    """The harness keeps the contract, without sockets, synchronously."""

    def test_contract(self):
        """Every assertion of the contract holds against ``APIHarness.client()``."""
        harness = APIHarness()
        node_uuid = "aaaaaaaa-0000-4000-8000-000000000001"
        other_uuid = "bbbbbbbb-0000-4000-8000-000000000002"
        d = Deferred.fromCoroutine(behaves_like_the_control_service(
            harness.client(), harness.client(Identity.node(node_uuid)), node_uuid,
            other_uuid))
        self.successResultOf(d)

    def test_answers_are_checked(self):
        """An answer the OpenAPI document does not describe fails the client's call."""
        harness = APIHarness()
        harness.openapi["paths"]["/v1/version"]["get"]["responses"]["200"]["content"][
            "application/json"]["schema"] = {"type": "string"}
        failure = self.failureResultOf(harness.client().version())
        self.assertIn("/v1/version -> 200", str(failure.value))


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_real_service_keeps_the_contract(tmp_path):
    """Every assertion of the contract holds against a real pyflock-control over TLS."""
    from twisted.internet import reactor

    from tests.harness.certificates import make_cluster_certificates
    from tests.harness.control import APIClient, ControlProcess, free_address

    folder = tmp_path / "certs"
    folder.mkdir()
    host, _ = free_address()
    cluster = make_cluster_certificates(folder, nodes=2, users=("alice",),
                                        control_host=host)
    node_uuid, other_uuid = cluster.node_uuids
    control = ControlProcess(tmp_path / "data", cluster.path, host=host,
                             log_directory=tmp_path / "logs",
                             extra_arguments=["--forget-dead-nodes", "3600"])
    connections = []
    try:
        control.start()
        alice = APIClient(reactor, control.url, cluster.path, "alice")
        node = APIClient(reactor, control.url, cluster.node_directory(node_uuid), "node")
        connections += [alice, node]
        await behaves_like_the_control_service(
            ControlClient(alice.http, control.url), ControlClient(node.http, control.url),
            node_uuid, other_uuid)
    finally:
        for connection in connections:
            await connection.close()
        control.close()
