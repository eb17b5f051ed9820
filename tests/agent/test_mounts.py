"""
The plugin's mount counts: counters per (volume, Mount ID), reconciliation with running
containers, settling after a dockerd crash, the JSON file and its atomic, coalesced writes.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile

import pytest_twisted
from hypothesis import given, strategies as st
from pyrsistent import pmap
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._mounts import (
    RECONCILED_PREFIX, MountCounts, MountsWriteError, MountTable, VolumeMounts,
    append_mount_lines, docker_volume_mounts, read_mount_table, write_mount_table,
)
from pyflock.common._logging import events_of
from pyflock.common._threads import in_reactor_pool, run_now

X = "0e4c01a3" * 8
Y = "7d2f9b11" * 8
Z = "a9c3e5f7" * 8
D1 = "11111111-2222-4333-8444-555555555555"
D2 = "66666666-7777-4888-9999-aaaaaaaaaaaa"
MADE_UP = RECONCILED_PREFIX + "1"


class MountTableTests(SynchronousTestCase):
    """The pure table: counters per Mount ID, and reconciliation."""

    def test_counter_per_id(self):
        """Mounting one ID twice needs two Unmounts of it (``docker cp`` reuses live IDs)."""
        table = MountTable().mount("v1", X, D1).mount("v1", X, D1)
        self.assertEqual((table.count("v1"), table.mount_count("v1", X)), (2, 2))
        table = table.unmount("v1", X)
        self.assertEqual(table.count("v1"), 1)
        self.assertEqual(table.unmount("v1", X), MountTable())

    def test_two_ids(self):
        """Two containers' IDs count separately; unmounting one leaves the other."""
        table = MountTable().mount("v1", X, D1).mount("v1", Y, D1).unmount("v1", X)
        self.assertEqual((table.mount_count("v1", X), table.mount_count("v1", Y)), (0, 1))
        self.assertEqual(table.dataset_id("v1"), D1)

    def test_unknown_unmount(self):
        """Unmounting an unknown ID or volume changes nothing."""
        table = MountTable().mount("v1", X, D1)
        self.assertEqual(table.unmount("v1", Y), table)
        self.assertEqual(table.unmount("v2", X), table)

    def test_dataset_kept(self):
        """A mount without a dataset id keeps the one already recorded."""
        table = MountTable().mount("v1", X, D1).mount("v1", Y, None)
        self.assertEqual(table.dataset_id("v1"), D1)
        self.assertEqual(dict(table.in_use()), {"v1": D1})

    def test_forget(self):
        """``forget`` drops every mount of a volume."""
        table = MountTable().mount("v1", X, D1).mount("v1", Y, D1).mount("v2", X, None)
        self.assertEqual(dict(table.forget("v1").in_use()), {"v2": None})

    def test_reconcile_drops_unused(self):
        """Volumes no running container uses lose their counts."""
        table = MountTable().mount("v1", X, D1).mount("v2", Y, None)
        self.assertEqual(table.reconcile({"v2": 1, "v3": 0}),
                         MountTable({"v2": VolumeMounts(None, {Y: 1})}))

    def test_reconcile_adds_missing(self):
        """A volume used by more mount points than IDs known gets made-up IDs, which
        Unmounts of unknown IDs consume."""
        table = MountTable().mount("v1", X, D1).reconcile({"v1": 3, "v2": 1})
        self.assertEqual((table.count("v1"), table.count("v2")), (3, 1))
        self.assertEqual(table.dataset_id("v1"), D1)
        table = table.unmount("v1", Y).unmount("v1", "f" * 64)
        self.assertEqual(dict(table.volumes["v1"].mounts), {X: 1})
        self.assertEqual(dict(table.unmount("v2", Y).in_use()), {"v1": D1})

    def test_reconcile_extra_ids_become_made_up(self):
        """More known IDs than the containers' mount points (an Unmount lost while the
        agent was down): one made-up mount per mount point stands for them, so that the
        live container's Unmount, whichever ID it has, brings the count to zero."""
        table = MountTable().mount("v1", X, D1).mount("v1", Y, D1).reconcile({"v1": 1})
        self.assertEqual(table.count("v1"), 1)
        self.assertEqual(table.volumes["v1"].dataset_id, D1)
        for live in (X, Y):
            self.assertEqual(table.unmount("v1", live).count("v1"), 0)

    def test_made_up_ids_never_collide(self):
        """Made-up IDs cannot be mistaken for dockerd's 64-hex IDs."""
        table = MountTable().reconcile({"v1": 1})
        [mount_id] = table.volumes["v1"].mounts
        self.assertTrue(mount_id.startswith(RECONCILED_PREFIX))

    def test_reconcile_made_up_ids_added_to_made_up(self):
        """Made-up IDs already in the table are kept, and new ones are added beside them,
        never over them."""
        table = MountTable().reconcile({"v1": 1}).reconcile({"v1": 3})
        self.assertEqual(table.count("v1"), 3)
        self.assertEqual(len(table.volumes["v1"].mounts), 3)


class RemountTests(SynchronousTestCase):
    """``remount``: a new dockerd's Mount of an ID the previous dockerd left counted."""

    def test_counts_once(self):
        """An ID counted any number of times is counted once, and other IDs are left."""
        table = MountTable().mount("v1", X, D1).mount("v1", X, D1).mount("v1", X, D1)
        table = table.mount("v1", Y, D1).remount("v1", X, D1)
        self.assertEqual(dict(table.volumes["v1"].mounts), {X: 1, Y: 1})

    def test_new_id_or_volume(self):
        """Remounting an ID or a volume the table does not have counts it once."""
        table = MountTable().mount("v1", X, D1).remount("v1", Y, D1).remount("v2", X, D2)
        self.assertEqual((table.mount_count("v1", Y), table.count("v1"), table.count("v2")),
                         (1, 2, 1))
        self.assertEqual(dict(table.in_use()), {"v1": D1, "v2": D2})

    def test_dataset_id(self):
        """A remount without a dataset id keeps the recorded one; with one, sets it."""
        table = MountTable().mount("v1", X, D1)
        self.assertEqual(table.remount("v1", X, None).dataset_id("v1"), D1)
        self.assertEqual(MountTable().reconcile({"v1": 1}).remount("v1", X, D1)
                         .dataset_id("v1"), D1)

    def test_idempotent(self):
        """Remounting twice is remounting once."""
        table = MountTable().mount("v1", X, D1).mount("v1", X, D1)
        self.assertEqual(table.remount("v1", X, D1).remount("v1", X, D1),
                         table.remount("v1", X, D1))


class SettleTests(SynchronousTestCase):
    """``settle``: the counts after a new dockerd, from its confirmed mounts and the mount
    points of the running containers."""

    def test_confirmed_kept(self):
        """A confirmed ID keeps its whole count (a ``docker cp`` under way), even when the
        containers read a moment earlier do not show it yet."""
        table = MountTable().mount("v1", X, D1).mount("v1", X, D1)
        self.assertEqual(table.settle({}, [("v1", X)]), table)

    def test_unused_dropped(self):
        """Unconfirmed mounts of a volume no running container uses are dropped, whatever
        their counts; a volume left without mounts is gone from the table."""
        table = MountTable().mount("v1", X, D1).mount("v1", X, D1).mount("v2", Y, D2)
        self.assertEqual(table.settle({"v2": 0}, []), MountTable())

    def test_unconfirmed_up_to_mount_points(self):
        """A volume keeps as many unconfirmed mounts, one each, as its running containers'
        mount points exceed its confirmed IDs."""
        table = MountTable().mount("v1", X, D1).mount("v1", Y, D1).mount("v1", Y, D1) \
            .mount("v1", Z, D1)
        settled = table.settle({"v1": 2}, [("v1", X)])
        self.assertEqual(settled.count("v1"), 2)
        self.assertEqual(dict(settled.volumes["v1"].mounts), {X: 1, MADE_UP: 1})
        self.assertEqual(settled.dataset_id("v1"), D1)

    def test_mount_points_not_counts(self):
        """A confirmed ID counted twice (``docker cp``) is one mount point: another running
        mount point of the volume keeps one unconfirmed mount."""
        table = MountTable().mount("v1", X, D1).mount("v1", X, D1).mount("v1", Y, D1)
        settled = table.settle({"v1": 2}, [("v1", X)])
        self.assertEqual((settled.mount_count("v1", X), settled.count("v1")), (2, 3))

    def test_running_ids_consume_kept_mounts(self):
        """Whichever unconfirmed IDs are really still mounted, their Unmounts bring the
        volume to zero: which ones are stale cannot be told."""
        table = MountTable().mount("v1", X, D1).mount("v1", Y, D1)
        for running in (X, Y):
            settled = table.settle({"v1": 1}, [])
            self.assertEqual(settled.count("v1"), 1)
            self.assertEqual(settled.unmount("v1", running), MountTable())

    def test_more_mount_points_than_mounts(self):
        """Mount points beyond every mount the table has get made-up IDs, also for volumes
        the table does not have (their dataset unknown)."""
        table = MountTable().mount("v1", X, D1)
        settled = table.settle({"v1": 3, "v2": 1}, [("v1", X)])
        self.assertEqual((settled.count("v1"), settled.count("v2")), (3, 1))
        self.assertEqual(settled.mount_count("v1", X), 1)
        self.assertEqual(dict(settled.in_use()), {"v1": D1, "v2": None})

    def test_confirmed_of_nothing_ignored(self):
        """Confirmed pairs the table does not have (unmounted since) add nothing."""
        table = MountTable().mount("v1", X, D1)
        self.assertEqual(table.settle({"v1": 1}, [("v1", Y), ("v2", X)]),
                         MountTable({"v1": VolumeMounts(D1, {MADE_UP: 1})}))

    def test_confirmed_per_volume(self):
        """An ID confirmed for one volume is not confirmed for another."""
        table = MountTable().mount("v1", X, D1).mount("v2", X, D2)
        self.assertEqual(dict(table.settle({}, [("v1", X)]).in_use()), {"v1": D1})

    def test_negative_in_use(self):
        """A negative number of mount points counts as none."""
        table = MountTable().mount("v1", X, D1)
        self.assertEqual(table.settle({"v1": -2}, []), MountTable())

    def test_made_up_ids_replaced(self):
        """Made-up IDs of an earlier reconciliation are unconfirmed mounts like any other."""
        table = MountTable().reconcile({"v1": 3})
        self.assertEqual(table.settle({"v1": 1}, []).count("v1"), 1)

    @given(st.data())
    def test_settle_property(self, data):
        """For any table, containers and confirmed IDs: no volume keeps more mounts than
        its confirmed counts plus its running mount points, no confirmed count changes,
        and the Unmounts of the mount points that really run bring every count to zero."""
        names = ["v1", "v2", "v3"]
        ids = [X, Y, Z, MADE_UP]
        raw = data.draw(st.dictionaries(
            st.sampled_from(names),
            st.tuples(st.sampled_from([None, D1, D2]),
                      st.dictionaries(st.sampled_from(ids), st.integers(1, 4), min_size=1))))
        table = MountTable({name: VolumeMounts(dataset_id, mounts)
                            for name, (dataset_id, mounts) in raw.items()})
        in_use = data.draw(st.dictionaries(st.sampled_from(names), st.integers(-1, 5)))
        confirmed = data.draw(st.sets(st.tuples(st.sampled_from(names),
                                                st.sampled_from([X, Y, Z, "w"]))))
        settled = table.settle(in_use, confirmed)
        # The table is still a valid file's content.
        self.assertEqual(MountTable.from_json(json.loads(json.dumps(settled.to_json()))),
                         settled)
        for name in names:
            kept = {k: n for k, n in (table.volumes[name].mounts.items()
                                      if name in table.volumes else ())
                    if (name, k) in confirmed}
            wanted = max(0, in_use.get(name, 0))
            self.assertLessEqual(settled.count(name), sum(kept.values()) + wanted)
            for mount_id, count in kept.items():
                self.assertEqual(settled.mount_count(name, mount_id), count)
            if name in settled.volumes:
                self.assertEqual(settled.dataset_id(name), table.dataset_id(name))
            # The mount points running now: the confirmed IDs, and others of old or
            # unknown IDs, as many as ``in_use`` says beyond the confirmed ones.
            others = data.draw(st.lists(
                st.sampled_from([k for k in ids + ["u1", "u2", "u3", "u4", "u5"]
                                 if k not in kept]),
                min_size=max(0, wanted - len(kept)), max_size=max(0, wanted - len(kept)),
                unique=True))
            after = settled
            for mount_id, count in kept.items():
                for _ in range(count):
                    after = after.unmount(name, mount_id)
            for mount_id in others:
                after = after.unmount(name, mount_id)
            self.assertEqual(after.count(name), 0, (name, others))

    @given(st.lists(st.tuples(st.booleans(), st.sampled_from(["v1", "v2"]),
                              st.sampled_from([X, Y, "z"])), max_size=30))
    def test_json_round_trip(self, operations):
        """Any table reached by Mounts and Unmounts survives its JSON file, and its counts
        are the Mounts not yet matched by an Unmount."""
        table = MountTable()
        expected: dict = {}
        for is_mount, name, mount_id in operations:
            key = (name, mount_id)
            if is_mount:
                table = table.mount(name, mount_id, D1)
                expected[key] = expected.get(key, 0) + 1
            else:
                table = table.unmount(name, mount_id)
                if expected.get(key):
                    expected[key] -= 1
        for (name, mount_id), count in expected.items():
            self.assertEqual(table.mount_count(name, mount_id), count)
        self.assertEqual(MountTable.from_json(json.loads(json.dumps(table.to_json()))), table)

    def test_from_json_refuses_malformed(self):
        """Malformed documents are refused saying what is wrong."""
        cases = [
            ([], "not a mount counts document of version 1 or 2"),
            ({"version": 3, "volumes": {}}, "not a mount counts document"),
            ({"version": 1}, "'volumes' is not an object"),
            ({"version": 1, "volumes": {"v1": {}}}, "volume 'v1' has no 'mounts' object"),
            ({"version": 1, "volumes": {"v1": {"mounts": {X: 0}}}},
             "counts that are not positive integers"),
            ({"version": 1, "volumes": {"v1": {"mounts": {X: True}}}},
             "counts that are not positive integers"),
            ({"version": 1, "volumes": {"v1": {"mounts": {}, "dataset_id": 3}}},
             "dataset_id that is not a string"),
        ]
        for document, message in cases:
            with self.assertRaises(ValueError) as caught:
                MountTable.from_json(document)
            self.assertIn(message, str(caught.exception))


class DockerMountsTests(SynchronousTestCase):
    """Reading the running containers' volume mounts from Docker's container list."""

    def test_counts_mount_points(self):
        """Each mount point of a pyflock volume counts; binds, other drivers and junk do
        not."""
        containers = [
            {"Id": "c1", "Mounts": [
                {"Type": "volume", "Name": "v1", "Driver": "pyflock", "Destination": "/a"},
                {"Type": "volume", "Name": "v1", "Driver": "pyflock", "Destination": "/b"},
                {"Type": "bind", "Source": "/etc", "Destination": "/etc"},
                {"Type": "volume", "Name": "v1", "Driver": "local", "Destination": "/c"}]},
            {"Id": "c2", "Mounts": [
                {"Type": "volume", "Name": "v1", "Driver": "pyflock:latest"},
                {"Type": "volume", "Name": "v2", "Driver": "pyflock"},
                {"Type": "volume", "Driver": "pyflock"}, "junk"]},
            {"Id": "c3", "Mounts": None},
            "junk",
        ]
        self.assertEqual(docker_volume_mounts(containers), {"v1": 3, "v2": 1})


class FileTests(SynchronousTestCase):
    """The JSON file: atomic replacement, private mode, corrupt files set aside."""

    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="pyflock-mounts-")
        self.addCleanup(shutil.rmtree, self.folder)
        self.path = os.path.join(self.folder, "mounts.json")
        self.events: list = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_write_mount_table(self):
        """The file holds the new content, mode 0600, and no temporary file is left."""
        write_mount_table(self.path, b"one")
        write_mount_table(self.path, b"two")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"two")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(os.listdir(self.folder), ["mounts.json"])

    def test_write_error(self):
        """A file that cannot be written raises ``MountsWriteError`` naming it."""
        blocker = os.path.join(self.folder, "file")
        open(blocker, "w").close()
        path = os.path.join(blocker, "mounts.json")
        with self.assertRaises(MountsWriteError) as caught:
            write_mount_table(path, b"x")
        self.assertIn(f"cannot write the mount counts to {path}", str(caught.exception))

    def test_missing_file(self):
        """No file means no mounts."""
        self.assertEqual(read_mount_table(self.path), MountTable())

    def test_corrupt_file(self):
        """A corrupt file is moved aside and logged, and the table starts empty."""
        with open(self.path, "w") as f:
            f.write('{"version": 1, "volu')
        self.assertEqual(read_mount_table(self.path), MountTable())
        self.assertTrue(os.path.exists(self.path + ".corrupt"))
        [event] = events_of(self.events, "pyflock:plugin:mounts-corrupt")
        self.assertEqual(event["path"], self.path)

    def test_load_saved(self):
        """Counts saved by one ``MountCounts`` are loaded by the next."""
        counts = MountCounts(self.path, run_now)
        self.successResultOf(counts.mount("v1", X, D1))
        self.successResultOf(counts.mount("v1", X, D1))
        loaded = MountCounts.load(self.path, run_now)
        self.assertEqual((loaded.table, loaded.count("v1")), (counts.table, 2))


class ManualRunner:
    """A ``run_blocking`` whose calls wait until the test runs them."""

    def __init__(self):
        self.calls: list = []

    def __call__(self, f, *args):
        d = Deferred()
        self.calls.append((d, f, args))
        return d

    def run_next(self, error: Exception = None):
        """Run (or fail) the oldest waiting call."""
        d, f, args = self.calls.pop(0)
        if error is not None:
            d.errback(Failure(error))
        else:
            d.callback(f(*args))


class MountCountsTests(SynchronousTestCase):
    """Writes are serial and coalesced; each change fires once it is on disk."""

    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="pyflock-mounts-")
        self.addCleanup(shutil.rmtree, self.folder)
        self.path = os.path.join(self.folder, "mounts.json")
        self.runner = ManualRunner()
        self.counts = MountCounts(self.path, self.runner)

    def on_disk(self) -> MountTable:
        """The table in the file now."""
        return read_mount_table(self.path)

    def test_coalesced(self):
        """Changes made during a write go out together in one more write."""
        first = self.counts.mount("v1", X, D1)
        second = self.counts.mount("v1", Y, D1)
        third = self.counts.unmount("v1", X)
        self.assertEqual(len(self.runner.calls), 1)
        self.runner.run_next()
        self.successResultOf(first)
        self.assertNoResult(second)
        self.assertEqual(self.on_disk().count("v1"), 1)
        self.assertEqual(len(self.runner.calls), 1)
        self.runner.run_next()
        self.successResultOf(second)
        self.successResultOf(third)
        self.assertEqual(self.on_disk(), self.counts.table)
        self.assertEqual(self.runner.calls, [])

    def test_no_change_no_write(self):
        """A change that changes nothing fires at once and writes nothing."""
        self.successResultOf(self.counts.unmount("v1", X))
        self.assertEqual(self.runner.calls, [])

    def test_failure_then_retry(self):
        """A failed write fails its changes' Deferreds; ``flush`` writes again."""
        d = self.counts.mount("v1", X, D1)
        self.runner.run_next(MountsWriteError("disk full"))
        self.failureResultOf(d, MountsWriteError)
        self.assertEqual(self.counts.count("v1"), 1)
        flushed = self.counts.flush()
        self.runner.run_next()
        self.successResultOf(flushed)
        self.assertEqual(self.on_disk().count("v1"), 1)

    def test_change_during_failed_write(self):
        """A change made during a write that fails goes out in the next write."""
        first = self.counts.mount("v1", X, D1)
        second = self.counts.mount("v2", X, D1)
        self.runner.run_next(MountsWriteError("disk full"))
        self.failureResultOf(first, MountsWriteError)
        self.runner.run_next()
        self.successResultOf(second)
        self.assertEqual(self.on_disk(), self.counts.table)

    def test_reconcile_saved(self):
        """Reconciliation is saved like any change."""
        self.counts.mount("v1", X, D1)
        self.runner.run_next()
        d = self.counts.reconcile(pmap({"v2": 1}))
        self.runner.run_next()
        self.successResultOf(d)
        self.assertEqual(self.on_disk().count("v2"), 1)
        self.assertEqual(self.on_disk().count("v1"), 0)

    def test_remount_saved(self):
        """A remount is saved like any change, and the file then counts the ID once."""
        self.counts.mount("v1", X, D1)
        self.counts.mount("v1", X, D1)
        self.runner.run_next()
        self.runner.run_next()
        d = self.counts.remount("v1", X, D1)
        self.runner.run_next()
        self.successResultOf(d)
        self.assertEqual(self.on_disk().mount_count("v1", X), 1)
        self.assertEqual(self.on_disk(), self.counts.table)

    def test_settle_saved_and_logged(self):
        """Settling is saved like any change and logs the counts before and after."""
        for name, mount_id in (("v1", X), ("v1", X), ("v2", Y), ("v3", Z)):
            self.counts.mount(name, mount_id, D1)
        self.runner.run_next()
        self.runner.run_next()
        with capturedLogs() as events:
            d = self.counts.settle(pmap({"v2": 1}), [("v3", Z)])
        self.runner.run_next()
        self.successResultOf(d)
        self.assertEqual(self.on_disk(), self.counts.table)
        self.assertEqual((self.on_disk().count("v1"), self.on_disk().count("v2"),
                          self.on_disk().count("v3")), (0, 1, 1))
        [event] = events_of(events, "pyflock:plugin:mounts-settled")
        self.assertEqual((json.loads(event["before"]), json.loads(event["after"])),
                         ({"v1": 2, "v2": 1, "v3": 1}, {"v2": 1, "v3": 1}))

    def test_settled_counts_survive_restart(self):
        """Counts saved after settling and remounting are loaded by the next agent."""
        counts = MountCounts(self.path, run_now)
        self.successResultOf(counts.mount("v1", X, D1))
        self.successResultOf(counts.mount("v2", Y, D2))
        self.successResultOf(counts.remount("v1", X, D1))
        self.successResultOf(counts.settle({"v2": 1}, [("v1", X)]))
        loaded = MountCounts.load(self.path, run_now)
        self.assertEqual(loaded.table, counts.table)
        self.assertEqual((loaded.count("v1"), loaded.count("v2"), loaded.table.dataset_id("v2")),
                         (1, 1, D2))


@pytest_twisted.ensureDeferred
async def test_in_reactor_pool(tmp_path):
    """With ``in_reactor_pool``, the file is written by the reactor's thread pool."""
    from twisted.internet import reactor
    path = str(tmp_path / "mounts.json")
    counts = MountCounts(path, in_reactor_pool(reactor))
    await counts.mount("v1", X, D1)
    await counts.mount("v2", Y, None)
    assert read_mount_table(path) == counts.table


class LogTests(SynchronousTestCase):
    """The file as a log: one synced append per change, a base now and then, old files
    read, torn tails ignored and cut off."""

    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="pyflock-mounts-")
        self.addCleanup(shutil.rmtree, self.folder)
        self.path = os.path.join(self.folder, "mounts.json")
        self.calls: list = []

    def run_logged(self, f, *args):
        """``run_now``, noting which file function each write used."""
        self.calls.append(f.__name__)
        return run_now(f, *args)

    def content(self) -> bytes:
        """The file's bytes now."""
        with open(self.path, "rb") as f:
            return f.read()

    def test_change_appends_one_line(self):
        """After the first base, a Mount or Unmount appends its volume's line, in place
        (same inode: no rename), and the file reads back as the table."""
        counts = MountCounts(self.path, self.run_logged)
        self.successResultOf(counts.mount("v1", X, D1))
        inode, before = os.stat(self.path).st_ino, self.content()
        self.successResultOf(counts.mount("v2", Y, D2))
        self.successResultOf(counts.unmount("v1", X))
        self.assertEqual(self.calls, ["write_mount_table", "append_mount_lines",
                                      "append_mount_lines"])
        self.assertEqual(os.stat(self.path).st_ino, inode)
        added = self.content()[len(before):].splitlines()
        self.assertEqual([json.loads(line) for line in added], [
            {"volume": "v2", "dataset_id": D2, "mounts": {Y: 1}},
            {"volume": "v1", "dataset_id": None, "mounts": {}}])
        self.assertEqual(read_mount_table(self.path), counts.table)

    def test_loaded_log_appends(self):
        """An agent that loads a log appends to it at once, no new base."""
        counts = MountCounts(self.path, run_now)
        self.successResultOf(counts.mount("v1", X, D1))
        self.successResultOf(counts.mount("v1", Y, D1))
        loaded = MountCounts.load(self.path, self.run_logged)
        self.successResultOf(loaded.unmount("v1", Y))
        self.assertEqual(self.calls, ["append_mount_lines"])
        self.assertEqual(read_mount_table(self.path), MountTable().mount("v1", X, D1))

    def test_loaded_base_appends(self):
        """A file that is a base alone (as reconciling leaves it) is appended to at once."""
        counts = MountCounts(self.path, run_now)
        self.successResultOf(counts.reconcile({"v1": 1}))
        loaded = MountCounts.load(self.path, self.run_logged)
        self.successResultOf(loaded.mount("v2", Y, D2))
        self.assertEqual(self.calls, ["append_mount_lines"])
        self.assertEqual(read_mount_table(self.path), counts.table.mount("v2", Y, D2))

    def test_version_1_file_loads(self):
        """An older agent's file (version 1, one indented document) loads, and its first
        change writes a version 2 base in its place."""
        old = {"version": 1, "volumes": {"v1": {"dataset_id": D1, "mounts": {X: 2}}}}
        with open(self.path, "w") as f:
            f.write(json.dumps(old, indent=1) + "\n")
        loaded = MountCounts.load(self.path, self.run_logged)
        self.assertEqual(loaded.table.mount_count("v1", X), 2)
        self.successResultOf(loaded.unmount("v1", X))
        self.assertEqual(self.calls, ["write_mount_table"])
        self.assertEqual(json.loads(self.content().splitlines()[0])["version"], 2)
        self.assertEqual(read_mount_table(self.path).mount_count("v1", X), 1)

    def test_torn_tail_ignored_then_cut_off(self):
        """A line torn by a crash mid-append is not read (that change was never
        acknowledged), and the next append overwrites it."""
        counts = MountCounts(self.path, run_now)
        self.successResultOf(counts.mount("v1", X, D1))
        self.successResultOf(counts.mount("v1", Y, D1))
        whole = self.content()
        with open(self.path, "ab") as f:
            f.write(b'{"volume":"v1","dataset_id":null,"mou')
        loaded = MountCounts.load(self.path, run_now)
        self.assertEqual(loaded.table, counts.table)
        self.successResultOf(loaded.mount("v2", Z, D2))
        self.assertEqual(self.content()[:len(whole)], whole)
        self.assertEqual(read_mount_table(self.path), counts.table.mount("v2", Z, D2))

    def test_malformed_line_ends_the_log(self):
        """A line that is not a volume's entry ends what is read, like a torn one."""
        counts = MountCounts(self.path, run_now)
        self.successResultOf(counts.mount("v1", X, D1))
        with open(self.path, "ab") as f:
            f.write(b'{"volume":"v2","mounts":{"x":0}}\n'
                    b'{"volume":"v3","dataset_id":null,"mounts":{"y":1}}\n')
        self.assertEqual(read_mount_table(self.path), counts.table)

    def test_acknowledged_count_survives_a_crash(self):
        """A count whose Deferred fired is on disk: a new agent (after ``kill -9``: no
        flush, no close) reads it."""
        counts = MountCounts(self.path, run_now)
        for name, mount_id in (("v1", X), ("v1", X), ("v2", Y)):
            self.successResultOf(counts.mount(name, mount_id, D1))
        self.successResultOf(counts.unmount("v1", X))
        self.assertEqual(MountCounts.load(self.path, run_now).table, counts.table)

    def test_whole_table_changes_write_a_base(self):
        """Reconciling and settling rewrite the base."""
        counts = MountCounts(self.path, self.run_logged)
        self.successResultOf(counts.mount("v1", X, D1))
        self.successResultOf(counts.reconcile({"v1": 1, "v2": 1}))
        self.successResultOf(counts.settle({"v2": 1}, []))
        self.assertEqual(self.calls, ["write_mount_table"] * 3)
        self.assertEqual(len(self.content().splitlines()), 1)
        self.assertEqual(read_mount_table(self.path), counts.table)

    def test_compacted_once_lines_outweigh_the_base(self):
        """Once the appended lines outweigh the base (and the threshold), the next save
        writes a new base in their place, so the file stays small."""
        counts = MountCounts(self.path, self.run_logged, compact_after=0)
        self.successResultOf(counts.mount("v1", X, D1))
        for _ in range(3):
            self.successResultOf(counts.mount("v1", X, D1))
            self.successResultOf(counts.unmount("v1", X))
        self.assertIn("append_mount_lines", self.calls)
        self.assertEqual(self.calls.count("write_mount_table"), 4)
        self.assertLess(len(self.content()), 3 * len(counts.table.base_line()))
        self.assertEqual(read_mount_table(self.path), counts.table)

    def test_failed_append_then_base(self):
        """After a failed write what the file holds is unknown: the next write is a base
        with every change."""
        runner = ManualRunner()
        counts = MountCounts(self.path, runner)
        counts.mount("v1", X, D1)
        runner.run_next()
        failed = counts.mount("v2", Y, D2)
        self.assertEqual(runner.calls[0][1].__name__, "append_mount_lines")
        runner.run_next(MountsWriteError("disk full"))
        self.failureResultOf(failed, MountsWriteError)
        d = counts.mount("v3", Z, D1)
        self.assertEqual(runner.calls[0][1].__name__, "write_mount_table")
        runner.run_next()
        self.successResultOf(d)
        self.assertEqual(read_mount_table(self.path), counts.table)

    def test_coalesced_lines(self):
        """Changes made during a write are appended together by the next one."""
        runner = ManualRunner()
        counts = MountCounts(self.path, runner)
        first = counts.mount("v1", X, D1)
        second, third = counts.mount("v2", Y, D2), counts.mount("v1", Y, D1)
        runner.run_next()
        self.successResultOf(first)
        [(_, f, args)] = runner.calls
        self.assertEqual((f.__name__, args[1].count(b"\n")), ("append_mount_lines", 2))
        runner.run_next()
        self.successResultOf(second)
        self.successResultOf(third)
        self.assertEqual(read_mount_table(self.path), counts.table)

    def test_append_error_names_the_file(self):
        """An append that fails raises ``MountsWriteError`` naming the file."""
        with self.assertRaises(MountsWriteError) as caught:
            append_mount_lines(self.path, b"x\n", 0)
        self.assertIn(f"cannot write the mount counts to {self.path}", str(caught.exception))
