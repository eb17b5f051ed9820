"""
The agent's view of the cluster: lookups, snapshots and diffs, and its file on disk
(a base and appended diffs, compaction, torn tails, atomic replacement, reloading,
batched saves, unreadable files).
"""

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._view import (
    VIEW_FILE, AgentView, ViewFile, ViewFileError, ViewOutOfStep, diff_to_bytes,
    parse_view_log, read_view, view_from_bytes, view_to_bytes, write_view,
)
from pyflock.common._records import DatasetEntry, Lease
from pyflock.common._wire import Diff, Node, Snapshot

A = "aaaaaaaa-0000-4000-8000-000000000001"
B = "bbbbbbbb-0000-4000-8000-000000000002"
DS1 = "11111111-0000-4000-8000-000000000001"
DS2 = "22222222-0000-4000-8000-000000000002"
DS3 = "33333333-0000-4000-8000-000000000003"


def entry(dataset_id, name=None, primary=A, **kwargs):
    """A view dataset called ``name``."""
    metadata = {} if name is None else {"name": name}
    return DatasetEntry(dataset_id=dataset_id, primary=primary, metadata=metadata, **kwargs)


SNAPSHOT = Snapshot(epoch="run-1", version=4, datasets=(
    entry(DS1, "db", maximum_size=64 * 1024 * 1024,
          lease=Lease(DS1, node_uuid=A, expiration=1000.5), holders=(B, A)),
    entry(DS2, "logs", primary=B),
    entry(DS3, "old", deleted=True),
), nodes=(Node(uuid=A, host="10.0.0.1", peer_port=4525),
          Node(uuid=B, host="10.0.0.2", peer_port=4525, alive=False)))


class AgentViewTests(SynchronousTestCase):
    """Lookups and updates of the immutable view."""

    def setUp(self):
        self.view = AgentView.from_snapshot(SNAPSHOT)

    def test_lookups(self):
        """Datasets are found by id (deleted too) and live ones by name; nodes by uuid."""
        self.assertEqual(self.view.dataset(DS1).lease.node_uuid, A)
        self.assertEqual(self.view.by_name("logs").dataset_id, DS2)
        self.assertTrue(self.view.dataset(DS3).deleted)
        self.assertIsNone(self.view.by_name("old"))
        self.assertIsNone(self.view.by_name("nothing"))
        self.assertEqual(self.view.node(B).alive, False)
        self.assertEqual(sorted(d.dataset_id for d in self.view.live_datasets()), [DS1, DS2])
        self.assertEqual((self.view.current.epoch, self.view.current.version), ("run-1", 4))

    def test_empty_view(self):
        """A new agent's view is empty and has no version."""
        self.assertIsNone(AgentView().current)
        self.assertIsNone(AgentView().by_name("db"))

    def test_diff(self):
        """A diff changes, adds and removes datasets and nodes, keeping names indexed."""
        diff = Diff(epoch="run-1", version=5,
                    datasets=(entry(DS1, "db", deleted=True), entry(DS2, "db", primary=A)),
                    removed=(DS3,), nodes=(Node(uuid=B, host="10.0.0.9"),))
        view = self.view.apply(diff)
        self.assertEqual(view.version, 5)
        self.assertEqual(view.by_name("db").dataset_id, DS2)
        self.assertIsNone(view.by_name("logs"))
        self.assertIsNone(view.dataset(DS3))
        self.assertEqual(view.node(B), Node(uuid=B, host="10.0.0.9"))
        self.assertEqual(self.view.by_name("db").dataset_id, DS1, "the old view is unchanged")

    def test_names_swapped(self):
        """Two datasets swapping names in one diff are both indexed under their new names."""
        view = self.view.apply(Diff(epoch="run-1", version=5, datasets=(
            entry(DS1, "logs"), entry(DS2, "db", primary=B))))
        self.assertEqual((view.by_name("logs").dataset_id, view.by_name("db").dataset_id),
                         (DS1, DS2))

    def test_diff_out_of_step(self):
        """A diff of another epoch, or not from this version, is ``ViewOutOfStep``."""
        for diff in (Diff(epoch="run-2", version=5), Diff(epoch="run-1", version=6),
                     Diff(epoch="run-1", version=4)):
            with self.assertRaises(ViewOutOfStep):
                self.view.apply(diff)
        with self.assertRaises(ViewOutOfStep):
            AgentView().apply(Diff(epoch="run-1", version=1))

    def test_snapshot_replaces(self):
        """A snapshot replaces the whole view, whatever it was."""
        snapshot = Snapshot(epoch="run-2", version=1, datasets=(entry(DS2, "x"),))
        view = self.view.apply(snapshot)
        self.assertEqual(view, AgentView.from_snapshot(snapshot))
        self.assertEqual(view.to_snapshot(), snapshot)


class HeldRuns(list):
    """A ``run_in_thread`` whose calls wait, in order, until the test runs them."""

    def run(self, f, *args):
        """Hold the call of ``f``; its Deferred fires when it is run."""
        d = Deferred()
        self.append((d, f, args))
        return d

    def finish(self):
        """Run the oldest held call and fire its Deferred with the result."""
        d, f, args = self.pop(0)
        d.callback(f(*args))


class ViewFileTests(SynchronousTestCase):
    """The view file: format, atomic replacement and reading back."""

    def setUp(self):
        self.folder = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.folder)
        self.path = self.folder / VIEW_FILE

    def test_round_trip(self):
        """A written view reads back equal, in a file only its owner can read."""
        view = AgentView.from_snapshot(SNAPSHOT)
        write_view(self.path, view)
        self.assertEqual(read_view(self.path), view)
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        self.assertEqual(json.loads(self.path.read_bytes())["format"], 2)
        self.assertEqual(os.listdir(self.folder), [VIEW_FILE])

    def test_file_without_holders(self):
        """A view file written before holders were pushed loads, with no holders known."""
        document = json.loads(view_to_bytes(AgentView.from_snapshot(SNAPSHOT)))
        for dataset in document["view"]["datasets"]:
            del dataset["holders"]
        view = view_from_bytes(json.dumps(document).encode())
        self.assertEqual([d.holders for d in view.datasets.values()], [(), (), ()])
        self.assertEqual(view.by_name("db").lease.node_uuid, A)

    def test_empty_view_round_trip(self):
        """The empty view survives a round trip."""
        write_view(self.path, AgentView())
        self.assertEqual(read_view(self.path), AgentView())

    def test_missing_file(self):
        """No file yet: the empty view."""
        self.assertEqual(read_view(self.path), AgentView())

    def test_replaced_atomically(self):
        """A write that fails leaves the previous file as it was."""
        old = AgentView.from_snapshot(SNAPSHOT)
        write_view(self.path, old)
        # A folder where the temporary file goes makes the write fail before the rename.
        (self.folder / (VIEW_FILE + ".tmp")).mkdir()
        with self.assertRaises(OSError):
            write_view(self.path, AgentView())
        self.assertEqual(read_view(self.path), old)

    def test_unreadable_file(self):
        """A damaged file is a ``ViewFileError`` naming the file and the problem."""
        for content, expected in [(b"{", "is not JSON"),
                                  (b'{"format": 9}', "not a pyflock view file"),
                                  (b'{"format": 1, "view": {"type": "heartbeat", '
                                   b'"view": null}}', "holds no view snapshot"),
                                  (b'{"format": 1, "view": {"type": "snapshot"}}',
                                   "malformed view")]:
            self.path.write_bytes(content)
            with self.assertRaises(ViewFileError) as caught:
                read_view(self.path)
            self.assertIn(str(self.path), str(caught.exception))
            self.assertIn(expected, str(caught.exception))

    def test_load_unreadable_starts_empty(self):
        """Loading a damaged file logs it and starts from the empty view."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.path.write_bytes(b"garbage")
        view_file = ViewFile(self.path, Clock(), run_in_thread=lambda f, *a: f(*a))
        self.assertEqual(self.successResultOf(view_file.load()), AgentView())
        [event] = [e for e in events
                   if e.get("event_type") == "pyflock:agent:view-file-unreadable"]
        self.assertEqual(event["path"], str(self.path))

    def test_saves_coalesced(self):
        """While a write runs, only the newest waiting view is written next."""
        runs = HeldRuns()
        finish = runs.finish
        view_file = ViewFile(self.path, Clock(), run_in_thread=runs.run)
        views = [AgentView.from_snapshot(Snapshot(epoch="e", version=v)) for v in (1, 2, 3)]
        saved = [view_file.save(v) for v in views]
        self.assertEqual(len(runs), 1)
        finish()
        self.successResultOf(saved[0])
        self.assertNoResult(saved[1])
        self.assertEqual(len(runs), 1)
        finish()
        self.successResultOf(saved[1])
        self.successResultOf(saved[2])
        self.assertEqual(runs, [])
        self.assertEqual(read_view(self.path).version, 3)

    def test_save_failure_reported(self):
        """A failed write fails the saves waiting on it; the next save writes again."""
        (self.folder / (VIEW_FILE + ".tmp")).mkdir()
        view_file = ViewFile(self.path, Clock(), run_in_thread=lambda f, *a: f(*a))
        self.failureResultOf(view_file.save(AgentView()), OSError)
        (self.folder / (VIEW_FILE + ".tmp")).rmdir()
        self.successResultOf(view_file.save(AgentView.from_snapshot(SNAPSHOT)))
        self.assertEqual(read_view(self.path).version, 4)

    def test_bytes_round_trip(self):
        """The file's content decodes to the view it encodes."""
        view = AgentView.from_snapshot(SNAPSHOT)
        self.assertEqual(view_from_bytes(view_to_bytes(view)), view)


def renewal(view, dataset_id=DS1, expiration=2000.0):
    """The diff that renews ``dataset_id``'s lease in ``view``, and the view after it."""
    old = view.dataset(dataset_id)
    diff = Diff(epoch=view.epoch, version=view.version + 1, datasets=(
        DatasetEntry(dataset_id=old.dataset_id, primary=old.primary,
                     maximum_size=old.maximum_size, metadata=old.metadata,
                     lease=Lease(old.dataset_id, A, expiration),
                     holders=old.holders),))
    return diff, view.apply(diff)


class ViewLogTests(SynchronousTestCase):
    """A push costs the bytes of its diff; the file stays readable after any crash."""

    def setUp(self):
        self.folder = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.folder)
        self.path = self.folder / VIEW_FILE
        self.view = AgentView.from_snapshot(SNAPSHOT)

    def view_file(self, **kwargs):
        """A ``ViewFile`` writing at once, loaded from the file."""
        view_file = ViewFile(self.path, Clock(), run_in_thread=lambda f, *a: f(*a), **kwargs)
        self.successResultOf(view_file.load())
        return view_file

    def test_diff_appended(self):
        """A diff following the saved view adds its line to the file and nothing else."""
        view_file = self.view_file()
        self.successResultOf(view_file.save(self.view, SNAPSHOT))
        before = self.path.read_bytes()
        diff, after = renewal(self.view)
        self.successResultOf(view_file.save(after, diff))
        self.assertEqual(self.path.read_bytes(), before + diff_to_bytes(diff))
        self.assertEqual(read_view(self.path), after)

    def test_appends_after_load(self):
        """An agent that loaded a file with diffs appends to it after a restart."""
        diff, after = renewal(self.view)
        write_view(self.path, self.view)
        self.successResultOf(self.view_file().save(after, diff))
        diff2, after2 = renewal(after, expiration=3000.0)
        view_file = self.view_file()
        before = self.path.read_bytes()
        self.successResultOf(view_file.save(after2, diff2))
        self.assertEqual(self.path.read_bytes(), before + diff_to_bytes(diff2))
        self.assertEqual(read_view(self.path), after2)

    def test_gap_writes_base(self):
        """A view that no diff links to the saved one (a snapshot, a gap) is a new base."""
        view_file = self.view_file()
        self.successResultOf(view_file.save(self.view, SNAPSHOT))
        _, after = renewal(self.view)
        diff2, after2 = renewal(after, expiration=3000.0)
        self.successResultOf(view_file.save(after2, diff2))
        self.assertEqual(self.path.read_bytes(), view_to_bytes(after2))

    def test_compaction(self):
        """Once the diffs outweigh the base, the next save writes a base alone."""
        view_file = self.view_file(compact_after=0)
        self.successResultOf(view_file.save(self.view, SNAPSHOT))
        base = len(self.path.read_bytes())
        view = self.view
        sizes = []
        for n in range(40):
            diff, view = renewal(view, expiration=2000.0 + n)
            self.successResultOf(view_file.save(view, diff))
            sizes.append(len(self.path.read_bytes()))
        self.assertLessEqual(max(sizes), 2 * base + len(diff_to_bytes(diff)))
        self.assertIn(len(view_to_bytes(view)), sizes)  # compacted at least once
        self.assertEqual(read_view(self.path), view)

    def test_torn_tail(self):
        """A line torn by a crash is ignored, and the next append replaces it."""
        write_view(self.path, self.view)
        diff, after = renewal(self.view)
        with open(self.path, "ab") as f:
            f.write(diff_to_bytes(diff)[:20])
        self.assertEqual(read_view(self.path), self.view)
        self.successResultOf(self.view_file().save(after, diff))
        self.assertEqual(self.path.read_bytes(), view_to_bytes(self.view) + diff_to_bytes(diff))

    def test_out_of_step_line_ends_the_log(self):
        """A diff line that does not follow ends the readable part, which is returned."""
        _, after = renewal(self.view)
        diff2, _ = renewal(after, expiration=3000.0)
        content = view_to_bytes(self.view) + diff_to_bytes(diff2)
        log = parse_view_log(content)
        self.assertEqual((log.view, log.length), (self.view, len(view_to_bytes(self.view))))

    def test_format_1_file(self):
        """A file of format 1 (a base alone, no newline) is read."""
        content = json.dumps({"format": 1, "view": json.loads(
            view_to_bytes(self.view))["view"]}).encode()
        self.path.write_bytes(content)
        self.assertEqual(read_view(self.path), self.view)

    def test_saves_batched(self):
        """Diffs saved while a write runs go out together in one append."""
        runs = HeldRuns()
        finish = runs.finish
        write_view(self.path, self.view)
        view_file = ViewFile(self.path, Clock(), run_in_thread=runs.run)
        view_file.load()
        finish()
        view, saves, diffs = self.view, [], []
        for n in range(3):
            diff, view = renewal(view, expiration=2000.0 + n)
            diffs.append(diff)
            saves.append(view_file.save(view, diff))
        finish()
        self.successResultOf(saves[0])
        self.assertEqual(len(runs), 1)
        finish()
        for d in saves[1:]:
            self.successResultOf(d)
        self.assertEqual(self.path.read_bytes(),
                         view_to_bytes(self.view) + b"".join(map(diff_to_bytes, diffs)))

    def test_failed_append_then_base(self):
        """After a failed append, saves waiting behind it are written as a new base."""
        runs = HeldRuns()
        write_view(self.path, self.view)
        view_file = ViewFile(self.path, Clock(), run_in_thread=runs.run)
        view_file.load()
        runs.finish()
        diff, view = renewal(self.view)
        first = view_file.save(view, diff)
        diff2, view2 = renewal(view, expiration=3000.0)
        second = view_file.save(view2, diff2)
        d, f, args = runs.pop(0)
        d.errback(OSError(5, "Input/output error"))
        self.failureResultOf(first, OSError)
        d, f, args = runs.pop(0)
        self.assertEqual((f, args), (write_view, (self.path, view2)))
        d.callback(f(*args))
        self.successResultOf(second)
        self.assertEqual(read_view(self.path), view2)


@pytest_twisted.ensureDeferred
async def test_view_file_in_threads(tmp_path):
    """With the reactor's thread pool, a saved view loads back equal."""
    from twisted.internet import reactor
    view_file = ViewFile(tmp_path / VIEW_FILE, reactor)
    view = AgentView.from_snapshot(SNAPSHOT)
    await view_file.save(view)
    assert await view_file.load() == view


def test_presuming_alive():
    """A stored view acted on before the control service answers presumes every node
    alive, so that no dataset is taken over from a node that may be back."""
    from pyflock.common._wire import Node
    from pyflock.agent._view import AgentView
    view = AgentView(nodes={"n1": Node(uuid="n1", host="h", alive=False),
                            "n2": Node(uuid="n2", host="g", alive=True)})
    assert [n.alive for n in view.presuming_alive().nodes.values()] == [True, True]
    assert view.nodes["n1"].alive is False
