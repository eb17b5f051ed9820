"""
The agent's view of the cluster: lookups, snapshots and diffs, and its file on disk
(atomic replacement, reloading, coalesced saves, unreadable files).
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
    VIEW_FILE, AgentView, ViewFile, ViewFileError, ViewOutOfStep, read_view,
    view_from_bytes, view_to_bytes, write_view,
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
        self.assertEqual(json.loads(self.path.read_bytes())["format"], 1)
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
        runs = []

        def run(f, *args):
            d = Deferred()
            runs.append((d, f, args))
            return d

        def finish():
            d, f, args = runs.pop(0)
            d.callback(f(*args))

        view_file = ViewFile(self.path, Clock(), run_in_thread=run)
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
