"""
``pyflock-control backup --out FILE`` and ``pyflock-control restore FILE`` (issue 9, point
6): one JSON format for both stores; a backup of an SQLite store restored into etcd and
one of etcd restored into SQLite give the same configuration and join tokens; a store
that is not empty, and a file that is not a backup, are refused with a clear message.
"""

from __future__ import annotations

import json
from uuid import uuid4

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from pyflock.common._model import Configuration
from pyflock.control._backup import (
    BACKUP_FORMAT, Backup, backup_from_json, backup_to_json, fill_writes,
)
from pyflock.control._etcd_store import open_etcd_store
from pyflock.control._sqlite_store import open_sqlite_store
from pyflock.control._store import apply_write
from tests.contracts.store import sample_change, sample_token, using
from tests.harness.etcd import etcd_cluster_fixture
from tests.harness.processes import run_to_completion, script_path

CRL = b"-----BEGIN X509 CRL-----\nMIIB\n-----END X509 CRL-----\n"


def sample_backup() -> Backup:
    """A backup holding every kind of row: live, deleted and retained datasets, leases
    (one unlimited), two join tokens and a revocation list."""
    return Backup(configuration=apply_write(Configuration(), sample_change()),
                  tokens=(sample_token("0000000000000001"), sample_token("00000000000002", 2)),
                  crl=CRL, source="sqlite /somewhere", schema=4)


def as_file_text(backup: Backup) -> str:
    """``backup`` as the text of its file."""
    return json.dumps(backup_to_json(backup, "2026-12-05T09:00:00+00:00"))


# -- the format, in memory -----------------------------------------------------------------

def test_json_round_trip():
    """A backup read back from its JSON is the backup written."""
    backup = sample_backup()
    assert backup_from_json(json.loads(as_file_text(backup))) == backup


def test_json_says_what_it_is():
    """The file names its format and version, and holds deleted datasets too."""
    document = backup_to_json(sample_backup(), "2026-12-05T09:00:00+00:00")
    assert (document["format"], document["version"]) == (BACKUP_FORMAT, 1)
    assert len(document["datasets"]) == 5
    assert sum(d["deleted"] for d in document["datasets"]) == 2


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="something"), "not a pyflock-control backup"),
    (lambda d: d.update(version=99), "format version 99"),
    (lambda d: d["leases"].append(dict(d["leases"][0], dataset_id=str(uuid4()))),
     "not a live dataset"),
    (lambda d: d["datasets"].append(d["datasets"][0]), "one dataset twice"),
    (lambda d: d["datasets"].append(dict(d["datasets"][0], dataset_id=str(uuid4()))),
     "one name to two live datasets"),
    (lambda d: d.update(generation=-1), "generation"),
    (lambda d: d.update(crl="not base64!"), "not valid base64"),
    (lambda d: d["tokens"][0].pop("secret_hash"), "secret_hash"),
])
def test_bad_backups_refused(change, message):
    """A document that is not a whole, consistent backup is refused, saying why."""
    document = json.loads(as_file_text(sample_backup()))
    change(document)
    with pytest.raises(ValueError) as raised:
        backup_from_json(document)
    assert message in str(raised.value)


def test_fill_writes_fit_transactions():
    """Filling a store takes writes of at most 63 datasets, the generation in each."""
    config = apply_write(Configuration(), sample_change())
    writes = fill_writes(config)
    assert len(writes) == 1 and writes[0].generation == config.generation
    assert fill_writes(Configuration())[0].generation == 0


# -- the commands, on real stores ----------------------------------------------------------

etcd = etcd_cluster_fixture(1)


async def control(*arguments: str):
    """Run ``pyflock-control ARGUMENTS`` to completion in a thread."""
    return await deferToThread(run_to_completion, [script_path("pyflock-control"),
                                                   *arguments])


async def fill(store) -> None:
    """Write the sample change and a join token."""
    await store.write(sample_change())
    await store.write_token("0000000000000001", sample_token("0000000000000001"))


async def contents(store) -> tuple:
    """The configuration and join tokens ``store`` holds."""
    return (await store.load()).configuration, await store.load_tokens()


def etcd_store(reactor, etcd, prefix):
    """An opener of the etcd store under ``prefix``."""
    return lambda: Deferred.fromCoroutine(open_etcd_store(reactor, etcd.endpoints, prefix))


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_sqlite_to_etcd_to_sqlite(tmp_path, etcd):
    """
    A backup of an SQLite store restored into an empty etcd prefix, backed up from there
    and restored into a new SQLite store, holds what the first store held; a second
    restore into either is refused, nothing written.
    """
    from twisted.internet import reactor
    await using(lambda: open_sqlite_store(reactor, tmp_path / "one"), fill)
    expected = await using(lambda: open_sqlite_store(reactor, tmp_path / "one"), contents)
    prefix = f"/b-{uuid4().hex[:8]}/"
    on_etcd = ["--store", "etcd", "--etcd-endpoints", ",".join(etcd.endpoints),
               "--etcd-prefix", prefix]

    taken = await control("backup", "--data-path", str(tmp_path / "one"), "--out",
                          str(tmp_path / "one.json"))
    assert taken.returncode == 0, taken.stderr
    assert "backed up 5 datasets, 2 leases and 1 join tokens" in taken.stdout
    restored = await control("restore", str(tmp_path / "one.json"), *on_etcd)
    assert restored.returncode == 0, restored.stderr
    assert await using(etcd_store(reactor, etcd, prefix), contents) == expected

    taken = await control("backup", "--out", str(tmp_path / "two.json"), *on_etcd)
    assert taken.returncode == 0, taken.stderr
    restored = await control("restore", str(tmp_path / "two.json"), "--data-path",
                             str(tmp_path / "two"))
    assert restored.returncode == 0, restored.stderr
    assert await using(lambda: open_sqlite_store(reactor, tmp_path / "two"),
                       contents) == expected

    for target in (on_etcd, ["--data-path", str(tmp_path / "two")]):
        again = await control("restore", str(tmp_path / "one.json"), *target)
        assert again.returncode == 1 and "restore only into an empty store" in again.stderr
        assert "Traceback" not in again.stderr


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_etcd_backup_keeps_the_shared_crl(tmp_path, etcd):
    """The revocation list kept in etcd goes into the backup and back into etcd."""
    from twisted.internet import reactor
    from pyflock.control._crl_sync import read_shared_crl, write_shared_crl
    prefix, other = f"/c-{uuid4().hex[:8]}/", f"/d-{uuid4().hex[:8]}/"

    async def put_crl(store):
        await fill(store)
        assert await write_shared_crl(store.gateway, store.keys, CRL)
    await using(etcd_store(reactor, etcd, prefix), put_crl)
    endpoints = ["--store", "etcd", "--etcd-endpoints", ",".join(etcd.endpoints)]
    taken = await control("backup", "--out", str(tmp_path / "b.json"), *endpoints,
                          "--etcd-prefix", prefix)
    assert taken.returncode == 0, taken.stderr
    restored = await control("restore", str(tmp_path / "b.json"), *endpoints,
                             "--etcd-prefix", other)
    assert restored.returncode == 0, restored.stderr

    async def crl_of(store):
        return await read_shared_crl(store.gateway, store.keys)
    assert await using(etcd_store(reactor, etcd, other), crl_of) == CRL
    into_sqlite = await control("restore", str(tmp_path / "b.json"), "--data-path",
                                str(tmp_path / "s"))
    assert into_sqlite.returncode == 0 and "pyflock-ca crl" in into_sqlite.stdout


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_bad_files_and_paths(tmp_path, etcd):
    """Not a backup, not JSON, a missing file, an existing --out or an etcd prefix without
    a store: a message, exit 1, nothing made."""
    (tmp_path / "notjson").write_text("{")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    (tmp_path / "exists.json").write_text("")
    cases = [
        (["restore", str(tmp_path / "notjson"), "--data-path", str(tmp_path / "a")],
         "it is not JSON"),
        (["restore", str(tmp_path / "other.json"), "--data-path", str(tmp_path / "a")],
         "not a pyflock-control backup"),
        (["restore", str(tmp_path / "missing"), "--data-path", str(tmp_path / "a")],
         "cannot read it"),
        (["backup", "--data-path", str(tmp_path / "nothing"), "--out",
          str(tmp_path / "x.json")], "there is no configuration store here"),
        (["backup", "--data-path", str(tmp_path), "--out", str(tmp_path / "exists.json")],
         "never overwrites"),
        (["backup", "--out", str(tmp_path / "y.json"), "--store", "etcd", "--etcd-endpoints",
          ",".join(etcd.endpoints), "--etcd-prefix", "/typo/"], "no pyflock store under"),
    ]
    for arguments, message in cases:
        done = await control(*arguments)
        assert done.returncode == 1 and message in done.stderr, (arguments, done.stderr)
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "a" / "configuration.sqlite3").exists()
