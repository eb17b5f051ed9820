"""
The control service as a real process: its REST API over real mutual TLS (treq and curl),
who may do what, restarts, a damaged store and online backups, all on real SQLite files.
"""

import json
import random
import shutil
import sqlite3
import subprocess
import time
from uuid import uuid4

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from pyflock.common._model import MINIMUM_SIZE
from tests.harness.certificates import (
    issue_certificate, make_cluster_certificates, unchecked_client_policy,
)
from tests.harness.control import (
    APIClient, ControlProcess, ControlProcessExited, free_address,
)
from pyflock.control.testing import validate_response

pytestmark = pytest.mark.integration

DATASETS = "/v1/configuration/datasets"
LEASES = "/v1/configuration/leases"


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs."""
    from twisted.internet import reactor
    return reactor


@pytest.fixture
def cluster(tmp_path):
    """A cluster's certificates: two nodes, user alice, the control service on 127.0.0.x."""
    folder = tmp_path / "certs"
    folder.mkdir()
    host, _ = free_address()
    return make_cluster_certificates(folder, nodes=2, users=("alice",), control_host=host)


@pytest.fixture
def controls(tmp_path, cluster):
    """Make control services on ``tmp_path/<data>``; every one is killed at teardown."""
    made = []

    def make(data="data", **kwargs):
        control = ControlProcess(tmp_path / data, cluster.path, host=cluster.control_host,
                                 log_directory=tmp_path / "logs", **kwargs)
        made.append(control)
        return control
    yield make
    for control in made:
        control.close()


@pytest_twisted.async_yield_fixture
async def clients(reactor, cluster):
    """Make API clients (``who``: "alice", a node uuid, or an HTTPS policy); closed after."""
    made = []

    def make(control, who="alice", openapi=None):
        if who == "alice":
            client = APIClient(reactor, control.url, cluster.path, "alice", openapi=openapi)
        elif who in cluster.node_uuids:
            client = APIClient(reactor, control.url, cluster.node_directory(who), "node",
                               openapi=openapi)
        else:
            client = APIClient(reactor, control.url, policy=who, openapi=openapi)
        made.append(client)
        return client
    yield make
    for client in made:
        await client.close()


async def create(client, primary, expected=201, **body):
    """Create a dataset on ``primary``; assert the status; the response."""
    r = await client.post(DATASETS, dict(body, primary=primary))
    assert r.code == expected, r
    return r


def by_id(listing):
    """A listing of datasets as a dict by dataset id."""
    return {d["dataset_id"]: d for d in listing}


# the REST API over real TLS


@pytest_twisted.ensureDeferred
async def test_every_endpoint_over_tls(controls, clients, cluster):
    """Every endpoint answers as specified over real TLS, each response as documented."""
    control = controls()
    control.start()
    alice = clients(control)
    openapi = await alice.fetch_openapi()
    assert openapi["openapi"].startswith("3.")
    a, b = cluster.node_uuids

    r = await alice.get("/v1/version")
    assert r.code == 200 and r.json["flocker"] == r.json["pyflock"]
    empty = await alice.get(DATASETS)
    assert (empty.code, empty.json) == (200, [])
    tag0 = empty.headers["x-configuration-tag"]

    ds = str(uuid4())
    created = await create(alice, a, dataset_id=ds, maximum_size=MINIMUM_SIZE,
                           metadata={"name": "db"})
    assert created.json == {"dataset_id": ds, "primary": a, "maximum_size": MINIMUM_SIZE,
                            "metadata": {"name": "db"}, "deleted": False}
    tag1 = created.headers["x-configuration-tag"]
    assert tag1 != tag0
    assert (await create(alice, a, 409, metadata={"name": "db"})).json["description"]
    assert (await create(alice, b, 409, dataset_id=ds)).json["description"]
    bad = await create(alice, a, 400, maximum_size="big")
    assert bad.json["errors"]
    for raw, code in ((b"{not json", 400), (b"[" * (1024 * 1024 + 1), 413)):
        r = await alice.request("POST", DATASETS, raw=raw)
        assert r.code == code and r.json["description"]
    listed = await alice.get(DATASETS)
    assert (listed.json, listed.headers["x-configuration-tag"]) == ([created.json], tag1)

    stale = await alice.post(f"{DATASETS}/{ds}", {"primary": b},
                             headers={"X-If-Configuration-Matches": tag0})
    assert stale.code == 412
    moved = await alice.post(f"{DATASETS}/{ds}", {"primary": b},
                             headers={"X-If-Configuration-Matches": tag1})
    assert (moved.code, moved.json["primary"]) == (200, b)
    unknown = str(uuid4())
    assert (await alice.post(f"{DATASETS}/{unknown}", {"primary": a})).code == 404

    lease = {"dataset_id": ds, "node_uuid": b, "expires": 60}
    taken = await alice.post(LEASES, lease)
    assert (taken.code, taken.json["node_uuid"]) == (201, b)
    assert (await alice.post(LEASES, lease)).code == 200
    held = await alice.post(LEASES, dict(lease, node_uuid=a))
    assert held.code == 409 and b in held.json["description"]
    assert (await alice.post(LEASES, dict(lease, dataset_id=unknown))).code == 404
    leases = await alice.get(LEASES)
    assert [(x["dataset_id"], x["node_uuid"]) for x in leases.json] == [(ds, b)]
    assert 0 < leases.json[0]["expires"] <= 60
    refused = await alice.delete(f"{DATASETS}/{ds}")
    assert refused.code == 409 and b in refused.json["description"]
    assert (await alice.post(f"{DATASETS}/{ds}", {"primary": a})).code == 409
    assert (await alice.delete(f"{LEASES}/{ds}")).code == 200
    assert (await alice.delete(f"{LEASES}/{ds}")).code == 404
    assert (await alice.get(LEASES)).json == []
    # Leases are no part of the configuration tag.
    assert (await alice.get(DATASETS)).headers["x-configuration-tag"] == \
        moved.headers["x-configuration-tag"]
    assert (await alice.delete(f"{DATASETS}/{ds}", headers={
        "X-If-Configuration-Matches": tag1})).code == 412

    deleted = await alice.delete(f"{DATASETS}/{ds}")
    assert (deleted.code, deleted.json["deleted"]) == (200, True)
    assert (await alice.post(f"{DATASETS}/{ds}", {"primary": a})).code == 405
    # Kept for the retention period, listed as deleted, until purged.
    assert [(d["dataset_id"], d["deleted"], d["retained_until"])
            for d in (await alice.get(DATASETS)).json] == [
        (ds, True, deleted.json["retained_until"])]
    assert (await alice.delete(f"{DATASETS}/{ds}?purge=true")).code == 200
    assert (await alice.get(DATASETS)).json == []
    assert (await create(alice, a, metadata={"name": "db"})).code == 201

    assert (await alice.get("/v1/state/datasets")).json == []
    assert (await alice.get("/v1/state/nodes")).json == []
    no_era = await alice.get("/v1/state/nodes/by_era/" + str(uuid4()))
    assert no_era.code == 404 and no_era.json["description"]

    for path in ("/", "/v1/nothing", "/v2/configuration/datasets"):
        missing = await alice.get(path)
        assert missing.code == 404 and "description" in missing.json
    wrong = await alice.request("PUT", DATASETS, {})
    assert wrong.code == 405 and "description" in wrong.json
    assert "POST" in wrong.headers["allow"]


def curl(cluster, url, *arguments, certificate="alice"):
    """Run curl against ``url`` with ``certificate`` (None: none); (exit code, status, body)."""
    command = ["curl", "--silent", "--show-error", "--max-time", "20",
               "--cacert", str(cluster.path / "cluster.crt"),
               "--write-out", "\n%{http_code}"]
    if certificate is not None:
        command += ["--cert", str(cluster.path / f"{certificate}.crt"),
                    "--key", str(cluster.path / f"{certificate}.key")]
    done = subprocess.run(command + list(arguments) + [url], capture_output=True,
                          text=True, timeout=30)
    body, _, status = done.stdout.rpartition("\n")
    return done.returncode, int(status or 0), body


def test_curl_with_user_certificate(controls, cluster):
    """curl with a user certificate creates and lists datasets as the API specifies."""
    control = controls()
    control.start()
    rc, status, body = curl(cluster, control.url + "/v1/openapi.json")
    assert (rc, status) == (0, 200)
    openapi = json.loads(body)
    node = cluster.node_uuids[0]
    rc, status, body = curl(
        cluster, control.url + DATASETS, "-X", "POST",
        "-H", "Content-Type: application/json",
        "--data", json.dumps({"primary": node, "metadata": {"name": "curl"}}))
    assert (rc, status) == (0, 201), body
    created = json.loads(body)
    validate_response(openapi, "POST", DATASETS, status, created)
    assert (created["primary"], created["metadata"]) == (node, {"name": "curl"})
    rc, status, body = curl(cluster, control.url + DATASETS)
    assert (rc, status, json.loads(body)) == (0, 200, [created])
    validate_response(openapi, "GET", DATASETS, status, json.loads(body))
    rc, status, body = curl(cluster, control.url + "/nowhere")
    assert (rc, status, list(json.loads(body))) == (0, 404, ["description"])
    rc, status, body = curl(cluster, control.url + DATASETS, certificate=None)
    assert rc != 0 and status == 0


@pytest_twisted.ensureDeferred
async def test_numbers_out_of_range_are_bad_input(controls, clients, cluster):
    """Sizes and expiries no store or JSON can hold are refused with 400, not kept."""
    control = controls()
    control.start()
    alice = clients(control)
    await alice.fetch_openapi()
    a = cluster.node_uuids[0]
    ds = (await create(alice, a)).json["dataset_id"]
    lease = '{"dataset_id": "%s", "node_uuid": "%s", "expires": %s}'
    unchecked = clients(control)  # to see every answer, even one that is not JSON
    answers = {}
    for what, path, raw in [
            ("size 1e300", DATASETS, '{"primary": "%s", "maximum_size": 1e300}' % a),
            ("expires NaN", LEASES, lease % (ds, a, "NaN")),
            ("expires Infinity", LEASES, lease % (ds, a, "Infinity")),
            ("expires 1e309", LEASES, lease % (ds, a, "1e309")),
            # Last: it fails the store's write, and the store refuses changes for a while.
            ("size 2**63", DATASETS, '{"primary": "%s", "maximum_size": %d}' % (a, 2 ** 63))]:
        response = await unchecked.http.post(control.url + path, data=raw.encode())
        await response.content()
        answers[what] = response.code
    assert answers == dict.fromkeys(answers, 400)
    # What was refused left no trace: every answer is still JSON, the store never failed.
    assert [d["dataset_id"] for d in (await alice.get(DATASETS)).json] == [ds]
    assert (await alice.get(LEASES)).json == []
    assert control.log_events("pyflock:control:store-write-failed") == []
    assert control.log_events("pyflock:control:request-failed") == []


@pytest_twisted.ensureDeferred
async def test_bad_write_fails_no_other_client(controls, clients, cluster):
    """One client's unstorable change never fails the changes of clients writing with it."""
    control = controls()
    control.start()
    a = cluster.node_uuids[0]
    writers = [clients(control) for _ in range(3)]
    bad = clients(control)

    async def good(client):
        return [(await client.post(DATASETS, {"primary": a})).code for _ in range(10)]

    async def unstorable():
        codes = []
        for _ in range(10):
            r = await bad.post(DATASETS, {"primary": a, "maximum_size": 2 ** 63})
            codes.append(r.code)
        return codes
    results = await gatherResults(
        [Deferred.fromCoroutine(good(client)) for client in writers]
        + [Deferred.fromCoroutine(unstorable())])
    assert results[:-1] == [[201] * 10] * 3
    assert set(results[-1]) == {400}


# who may do what


async def assert_refused(client, marker):
    """The TLS handshake refuses ``client``: its request never reaches the service."""
    with pytest.raises((ResponseNeverReceived, ResponseFailed)):
        await client.get(f"/v1/no-such-route-{marker}")


def requests_seen(control, marker):
    """The failed requests the service logged whose path mentions ``marker``."""
    return [e for e in control.log_events("pyflock:control:request-error")
            if marker in e.get("path", "")]


@pytest_twisted.ensureDeferred
async def test_authorization_matrix(controls, clients, cluster, tmp_path):
    """Only certificates of our CA get in; nodes act for themselves, users for anyone."""
    control = controls()
    control.start()
    alice = clients(control)
    openapi = await alice.fetch_openapi()
    a, b = cluster.node_uuids
    node_a, node_b = clients(control, a, openapi), clients(control, b, openapi)
    cluster_crt = cluster.path / "cluster.crt"
    assert (await alice.get("/v1/no-such-route-accepted")).code == 404
    assert requests_seen(control, "accepted")  # so an empty list below means something

    other_folder = tmp_path / "other"
    other_folder.mkdir()
    other = make_cluster_certificates(other_folder, nodes=1, users=("alice",),
                                      control_host=cluster.control_host)
    for marker, policy in [
            ("no-certificate", unchecked_client_policy(cluster_crt)),
            ("other-cluster-user", unchecked_client_policy(
                cluster_crt, other.path / "alice.crt", other.path / "alice.key")),
            ("other-cluster-node", unchecked_client_policy(
                cluster_crt, other.path / f"{other.node_uuids[0]}.crt",
                other.path / f"{other.node_uuids[0]}.key")),
            # serverAuth only: TLS itself refuses it as a client certificate.
            ("control-certificate", unchecked_client_policy(
                cluster_crt, cluster.path / "control-service.crt",
                cluster.path / "control-service.key"))]:
        await assert_refused(clients(control, policy), marker)
        assert requests_seen(control, marker) == []

    # Certificates of our CA whose name is no user or node may not use the API.
    issue_certificate(cluster.path, cluster.path, "as-control", "control-service")
    issue_certificate(cluster.path, cluster.path, "plugin", "plugin")
    for name in ("as-control", "plugin"):
        stranger = clients(control, unchecked_client_policy(
            cluster_crt, cluster.path / f"{name}.crt", cluster.path / f"{name}.key"),
            openapi)
        for method, path, body in [("GET", "/v1/version", None), ("GET", DATASETS, None),
                                   ("POST", DATASETS, {"primary": a}),
                                   ("POST", LEASES, {"dataset_id": str(uuid4()),
                                                     "node_uuid": a, "expires": 10})]:
            r = await stranger.request(method, path, body)
            assert r.code == 403 and r.json["description"], (name, method, path)

    # A node reads everything and acts for itself only.
    on_b = (await create(alice, b)).json["dataset_id"]
    for path in ("/v1/version", DATASETS, LEASES, "/v1/state/datasets", "/v1/state/nodes"):
        assert (await node_a.get(path)).code == 200, path
    own = (await create(node_a, a)).json["dataset_id"]
    await create(node_a, b, 403)
    assert (await node_a.post(LEASES, {"dataset_id": own, "node_uuid": a,
                                       "expires": 60})).code == 201
    assert (await node_a.post(LEASES, {"dataset_id": on_b, "node_uuid": b,
                                       "expires": 60})).code == 403
    assert (await node_a.post(f"{DATASETS}/{own}", {"primary": b})).code == 403
    assert (await node_a.delete(f"{DATASETS}/{on_b}")).code == 403
    assert (await node_b.post(LEASES, {"dataset_id": on_b, "node_uuid": b,
                                       "expires": 60})).code == 201
    assert (await node_a.delete(f"{LEASES}/{on_b}")).code == 403
    assert (await node_b.delete(f"{LEASES}/{own}")).code == 403
    assert (await node_b.post(f"{DATASETS}/{own}", {"primary": b})).code == 409
    assert (await node_a.delete(f"{LEASES}/{own}")).code == 200
    moved = await node_b.post(f"{DATASETS}/{own}", {"primary": b})
    assert (moved.code, moved.json["primary"]) == (200, b)
    assert (await node_a.delete(f"{DATASETS}/{own}")).code == 403
    assert (await node_b.delete(f"{LEASES}/{on_b}")).code == 200
    assert (await alice.post(LEASES, {"dataset_id": own, "node_uuid": a,
                                      "expires": 60})).code == 201
    assert (await node_b.delete(f"{DATASETS}/{own}")).code == 409
    assert (await node_a.delete(f"{LEASES}/{own}")).code == 200
    assert (await node_b.delete(f"{DATASETS}/{own}")).code == 200

    # A user may do everything, for any node.
    assert (await alice.post(f"{DATASETS}/{on_b}", {"primary": a})).code == 200
    assert (await alice.post(LEASES, {"dataset_id": on_b, "node_uuid": a,
                                      "expires": None})).code == 201
    assert (await alice.delete(f"{LEASES}/{on_b}")).code == 200
    assert (await alice.delete(f"{DATASETS}/{on_b}")).code == 200
    refusals = control.log_events("pyflock:control:request-refused")
    assert {e["node_uuid"] for e in refusals} == {a, b}


# restarts


@pytest_twisted.ensureDeferred
async def test_configuration_survives_restart(controls, clients, cluster):
    """After SIGTERM and a new start on the data path, datasets and leases are the same."""
    control = controls()
    control.start()
    alice = clients(control)
    await alice.fetch_openapi()
    a, b = cluster.node_uuids
    kept = (await create(alice, a, maximum_size=2 * MINIMUM_SIZE,
                         metadata={"name": "kept", "profile": "gold"})).json["dataset_id"]
    moved = (await create(alice, a)).json["dataset_id"]
    gone = (await create(alice, b, metadata={"name": "gone"})).json["dataset_id"]
    await alice.post(f"{DATASETS}/{moved}", {"primary": b})
    await alice.delete(f"{DATASETS}/{gone}")
    await alice.post(LEASES, {"dataset_id": kept, "node_uuid": a, "expires": None})
    before = await alice.get(DATASETS)
    leases_before = (await alice.get(LEASES)).json

    assert control.stop() == 0
    assert control.log_events("pyflock:control:stopped")
    control.start()
    after = await alice.get(DATASETS)
    assert by_id(after.json) == by_id(before.json)
    assert set(by_id(after.json)) == {kept, moved, gone}
    assert by_id(after.json)[gone]["deleted"] and by_id(after.json)[gone]["retained_until"]
    assert by_id(after.json)[moved]["primary"] == b
    # A tag read before the restart never matches after it.
    stale_tag = before.headers["x-configuration-tag"]
    assert after.headers["x-configuration-tag"] != stale_tag
    assert (await alice.post(f"{DATASETS}/{moved}", {"primary": a}, headers={
        "X-If-Configuration-Matches": stale_tag})).code == 412
    assert (await alice.get(LEASES)).json == leases_before == [
        {"dataset_id": kept, "node_uuid": a, "expires": None}]
    # The name of the deleted dataset is free, and writes still work.
    assert (await create(alice, a, metadata={"name": "gone"})).code == 201


@pytest_twisted.ensureDeferred
async def test_leases_get_a_grace_after_restart(reactor, controls, clients, cluster):
    """A lease that ran out while the service was down is kept until the grace ends."""
    grace = 5.0
    control = controls(lease_grace=grace)
    control.start()
    alice = clients(control)
    await alice.fetch_openapi()
    a, b = cluster.node_uuids
    short, long, forever = [(await create(alice, a)).json["dataset_id"] for _ in range(3)]
    await alice.post(LEASES, {"dataset_id": long, "node_uuid": b, "expires": 1000})
    await alice.post(LEASES, {"dataset_id": forever, "node_uuid": b, "expires": None})
    r = await alice.post(LEASES, {"dataset_id": short, "node_uuid": a, "expires": 2})
    assert r.code == 201
    # The service set the expiry from its clock before it answered.
    ran_out = time.time() + r.json["expires"]
    assert control.stop() == 0
    assert control.log_events("pyflock:control:lease-expired") == []
    await alice.close()

    # Restart only once the short lease has certainly run out.
    await deferLater(reactor, max(0.0, ran_out - time.time()) + 0.2, lambda: None)
    assert time.time() > ran_out
    control.start()
    leases = {x["dataset_id"]: x for x in (await alice.get(LEASES)).json}
    assert set(leases) == {short, long, forever}
    assert leases[short]["node_uuid"] == a and leases[short]["expires"] > 0
    assert leases[long]["expires"] > grace  # the grace never shortens a lease
    assert leases[forever]["expires"] is None
    assert control.log_events("pyflock:control:lease-expired", every_run=True) == []

    # Once the grace is over the short lease expires, and only it.
    await control.wait_for_event(reactor, "pyflock:control:lease-expired",
                                 lambda e: e.get("dataset_id") == short)
    leases = {x["dataset_id"]: x for x in (await alice.get(LEASES)).json}
    assert set(leases) == {long, forever}
    assert (await alice.post(LEASES, {"dataset_id": short, "node_uuid": b,
                                      "expires": 60})).code == 201


# a damaged store


def _garbage(path):
    path.write_bytes(random.Random(7).randbytes(8192))


def _empty(path):
    path.write_bytes(b"")


def _someone_elses_database(path):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    db.execute("INSERT INTO invoices (total) VALUES (12.5)")
    db.commit()
    db.close()


def _truncated_store(path):
    # A real store cut in half: the header survives, the pages it points to do not.
    with ControlProcess(path.parent / "whole", path.parent.parent / "certs",
                        log_directory=path.parent.parent / "logs") as control:
        control.start()
        assert control.stop() == 0
    whole = (path.parent / "whole" / path.name).read_bytes()
    path.write_bytes(whole[:len(whole) // 2])


@pytest.mark.parametrize("damage", [_garbage, _empty, _someone_elses_database,
                                    _truncated_store])
def test_damaged_store_stops_the_service(controls, tmp_path, damage):
    """A store that is no pyflock store stops the service with one clear line on stderr."""
    data = tmp_path / "data"
    data.mkdir()
    store = data / "configuration.sqlite3"
    damage(store)
    content = store.read_bytes()
    control = controls()
    with pytest.raises(ControlProcessExited) as exited:
        control.start()
    assert exited.value.returncode != 0
    lines = exited.value.stderr.splitlines()
    assert len(lines) == 1, exited.value.stderr
    assert str(store) in lines[0] and "Traceback" not in lines[0]
    assert control.log_events("pyflock:control:started") == []
    assert store.read_bytes() == content  # never replaced by an empty store


def test_one_store_one_service(controls):
    """A second service on a data path in use exits with one clear line; the first runs on."""
    first = controls()
    first.start()
    second = controls()
    with pytest.raises(ControlProcessExited) as exited:
        second.start()
    lines = exited.value.stderr.splitlines()
    assert exited.value.returncode != 0 and len(lines) == 1, exited.value.stderr
    assert "another process" in lines[0] and str(first.data_path) in lines[0]
    assert first.running


# backup


@pytest_twisted.ensureDeferred
async def test_backup_while_writing(reactor, controls, clients, cluster, tmp_path):
    """A backup taken while a client writes is a store holding a prefix of the writes."""
    control = controls()
    control.start()
    alice = clients(control)
    await alice.fetch_openapi()
    rng = random.Random(1)
    operations = []  # (dataset_id, primary) in the order they were sent
    acknowledged = 0
    backup_file = tmp_path / "backup.sqlite3"
    backing_up = None
    before_backup = after_backup = None
    while after_backup is None or len(operations) < after_backup + 5:
        if len(operations) % 3 == 2:
            dataset_id = rng.choice(operations)[0]
            operations.append((dataset_id, str(uuid4())))
            r = await alice.post(f"{DATASETS}/{dataset_id}", {"primary": operations[-1][1]})
            assert r.code == 200, r
        else:
            operations.append((str(uuid4()), str(uuid4())))
            await create(alice, operations[-1][1], dataset_id=operations[-1][0])
        acknowledged += 1
        if acknowledged == 10:
            before_backup = acknowledged
            backing_up = deferToThread(control.backup, backup_file)
        if backing_up is not None and backing_up.called and after_backup is None:
            after_backup = len(operations)
        assert len(operations) < 5000, "the backup did not finish"
    done = await backing_up
    assert done.returncode == 0, done.stderr
    assert before_backup < after_backup  # some writes ran while the backup did

    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copyfile(backup_file, restored / "configuration.sqlite3")
    copy = controls("restored")
    copy.start()
    copy_client = clients(copy, "alice", alice.openapi)
    in_backup = {d["dataset_id"]: d["primary"]
                 for d in (await copy_client.get(DATASETS)).json}
    state, prefixes = {}, []
    for count, (dataset_id, primary) in enumerate(operations, 1):
        state[dataset_id] = primary
        if state == in_backup:
            prefixes.append(count)
    assert prefixes, "the backup holds no prefix of the writes"
    assert before_backup <= prefixes[-1] <= after_backup
    # The copy is a working store of its own.
    assert (await create(copy_client, cluster.node_uuids[0])).code == 201
    assert (await alice.get(DATASETS)).json != (await copy_client.get(DATASETS)).json
