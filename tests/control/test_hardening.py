"""
Attacks on a real ``pyflock-control`` process (issue 8), each made for real with curl,
openssl s_client or treq and a stolen node certificate, and each shown to fail harmlessly:
unbounded leases, oversized and hostile bodies, idle connections, weak TLS suites, one
node flooding the cluster with datasets and writes.
"""

import json

import pytest
import pytest_twisted

from tests.control import test_integration as integration

# The fixtures of the control service's integration tests: a cluster's certificates, real
# control processes and API clients.
reactor, cluster = integration.reactor, integration.cluster
controls, clients = integration.controls, integration.clients
create, curl = integration.create, integration.curl

pytestmark = pytest.mark.integration

DATASETS = "/v1/configuration/datasets"
LEASES = "/v1/configuration/leases"


def lease_body(dataset_id, node_uuid, expires):
    """The JSON text of a lease request."""
    return json.dumps({"dataset_id": dataset_id, "node_uuid": node_uuid, "expires": expires})


# point 4: a node cannot pin a dataset forever


@pytest_twisted.ensureDeferred
async def test_node_cannot_pin_a_dataset(controls, clients, cluster):
    """curl with a node certificate asking for a lease that never expires, or lasts a
    day, or for another node, gets 403 with the reason; the plugin's 60 s lease works;
    a user still takes any lease."""
    control = controls()
    control.start()
    a, b = cluster.node_uuids
    alice = clients(control)
    await alice.fetch_openapi()
    ds = (await create(alice, a)).json["dataset_id"]
    url = control.url + LEASES
    post = ["-X", "POST", "-H", "Content-Type: application/json", "--data"]
    for body, reason in [(lease_body(ds, a, None), "null"),
                         (lease_body(ds, a, 86400), "86400"),
                         (lease_body(ds, b, 60), "another node")]:
        rc, status, answer = curl(cluster, url, *post, body, certificate=a)
        assert (rc, status) == (0, 403), answer
        assert reason in json.loads(answer)["description"]
    assert (await alice.get(LEASES)).json == []
    rc, status, answer = curl(cluster, url, *post, lease_body(ds, a, 60), certificate=a)
    assert (rc, status) == (0, 201), answer
    node = clients(control, a)
    await node.fetch_openapi()
    assert (await node.post(DATASETS + "/" + ds, {"primary": a})).code == 200
    assert (await node.delete(LEASES + "/" + ds)).code == 200
    r = await alice.post(LEASES, {"dataset_id": ds, "node_uuid": b, "expires": None})
    assert r.code == 201 and r.json["expires"] is None
