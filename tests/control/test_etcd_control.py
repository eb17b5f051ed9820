"""
``pyflock-control run --store etcd`` as a real process on a real etcd member: it serves
the REST API from etcd, keeps what it acknowledged across kill -9, skips an endpoint that
refuses connections, and refuses bad etcd options with a clear message; ``pyflock-control
migrate`` copies an SQLite store into etcd.
"""

from __future__ import annotations

from uuid import uuid4

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from pyflock.common._model import Configuration
from pyflock.control._etcd_store import open_etcd_store
from pyflock.control._sqlite_store import open_sqlite_store
from pyflock.control._store import apply_write
from tests.contracts.store import sample_change, sample_token, using
from tests.harness.certificates import make_cluster_certificates
from tests.harness.control import APIClient, ControlProcess, ControlProcessExited, free_address
from tests.harness.etcd import etcd_cluster_fixture
from tests.harness.processes import free_port, run_to_completion, script_path

pytestmark = pytest.mark.integration

DATASETS = "/v1/configuration/datasets"


etcd = etcd_cluster_fixture(1)


@pytest.fixture
def cluster(tmp_path):
    """A cluster's certificates: one node, user alice, the control service on 127.0.0.x."""
    folder = tmp_path / "certs"
    folder.mkdir()
    host, _ = free_address()
    return make_cluster_certificates(folder, nodes=1, users=("alice",), control_host=host)


def control_on(tmp_path, cluster, *arguments) -> ControlProcess:
    """A control service with ``arguments`` added to its command line."""
    return ControlProcess(tmp_path / "data", cluster.path, host=cluster.control_host,
                          log_directory=tmp_path / "logs", extra_arguments=arguments)


@pytest_twisted.ensureDeferred
async def test_run_on_etcd_survives_kill9(tmp_path, cluster, etcd):
    """
    A dataset created through a control service on etcd (whose first endpoint refuses
    connections) is there after kill -9 and a restart; no SQLite store is made.
    """
    from twisted.internet import reactor
    dead = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    control = control_on(tmp_path, cluster, "--store", "etcd", "--etcd-endpoints",
                         ",".join([dead] + etcd.endpoints), "--etcd-prefix",
                         f"/t-{uuid4().hex[:8]}/")
    with control:
        started = control.start()
        assert "etcd" in started["data_path"]
        alice = APIClient(reactor, control.url, cluster.path, "alice")
        try:
            created = await alice.post(DATASETS, {"primary": cluster.node_uuids[0],
                                                  "metadata": {"name": "db"}})
            assert created.code == 201
            control.kill9()
            control.start()
            listed = await alice.get(DATASETS)
        finally:
            await alice.close()
    assert listed.json == [created.json]
    assert not (tmp_path / "data" / "configuration.sqlite3").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--store", "etcd"], "needs --etcd-endpoints"),
    (["--store", "etcd", "--etcd-endpoints", "etcd1:2379"], "is not an etcd endpoint"),
    (["--store", "etcd", "--etcd-endpoints", "http://127.0.0.1:2379", "--etcd-cert",
      "/nonexistent.crt"], "--etcd-cert and --etcd-key go together"),
    (["--store", "etcd", "--etcd-endpoints", "https://127.0.0.1:2379", "--etcd-ca",
      "/nonexistent.crt"], "--etcd-ca /nonexistent.crt: the file does not exist"),
])
def test_bad_etcd_options(tmp_path, cluster, arguments, message):
    """Bad etcd options stop pyflock-control at once with a message saying what is wrong."""
    with control_on(tmp_path, cluster, *arguments) as control:
        with pytest.raises(ControlProcessExited) as raised:
            control.start()
    assert raised.value.returncode == 1 and message in raised.value.stderr
    assert "Traceback" not in raised.value.stderr


@pytest_twisted.ensureDeferred
async def test_migrate_sqlite_into_etcd(tmp_path, etcd):
    """
    ``pyflock-control migrate`` copies an SQLite store (datasets, tombstones, leases, the
    generation, join tokens) into an empty etcd prefix; a second run refuses the prefix,
    now not empty, and a missing SQLite store is refused too.
    """
    from twisted.internet import reactor
    change = sample_change()
    token = sample_token("0000000000000001")

    async def fill(store):
        await store.write(change)
        await store.write_token(token.token_id, token)
    await using(lambda: open_sqlite_store(reactor, tmp_path / "data"), fill)
    prefix = f"/m-{uuid4().hex[:8]}/"
    command = [script_path("pyflock-control"), "migrate", "--from-data-path",
               str(tmp_path / "data"), "--etcd-endpoints", ",".join(etcd.endpoints),
               "--etcd-prefix", prefix]
    done = await deferToThread(run_to_completion, command)
    assert done.returncode == 0, done.stderr
    assert "migrated 5 datasets, 2 leases and 1 join tokens" in done.stdout

    async def read(store):
        return (await store.load()).configuration, await store.load_tokens()
    config, tokens = await using(lambda: Deferred.fromCoroutine(
        open_etcd_store(reactor, etcd.endpoints, prefix)), read)
    assert config == apply_write(Configuration(), change) and tokens == (token,)

    again = await deferToThread(run_to_completion, command)
    assert again.returncode == 1 and "only into an empty prefix" in again.stderr
    missing = await deferToThread(run_to_completion, command[:3] + [
        str(tmp_path / "nothing")] + command[4:])
    assert missing.returncode == 1 and "there is no configuration store" in missing.stderr
