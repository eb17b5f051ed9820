"""
The Docker plugin's creations under way (issue 7's fast path): the convergence loop makes
a new volume's dataset here before the view brings it, destroys it when the control
service refused it, and keeps it while the outcome is unknown.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._backends import MemoryBlockStore, MiB
from pyflock.agent._convergence import DesiredState, desired_from_view
from pyflock.agent._loop import node_convergence_loop
from pyflock.agent._pending import ABANDONED_FOR, PendingCreations
from pyflock.agent._runner import run_now
from pyflock.agent._view import AgentView
from pyflock.common._records import DatasetEntry, Node
from tests.harness.memory import MemoryDisks, MemoryFilesystems

NODE = "node-a"
OTHER = "node-b"
NEW = "11111111-2222-4333-8444-555555555555"


def view(version: int, datasets=()) -> AgentView:
    """A view holding ``datasets`` (``DatasetEntry``s) and both nodes, alive."""
    return AgentView(epoch="e", version=version,
                     datasets={d.dataset_id: d for d in datasets},
                     nodes={n: Node(n, "127.0.0.1") for n in (NODE, OTHER)})


def base(v, now):
    return desired_from_view(NODE, v, now)


class DesireTests(SynchronousTestCase):
    """``PendingCreations.desire`` (pure but for forgetting what is done)."""

    def setUp(self):
        self.pending = PendingCreations()
        self.desire = self.pending.desire(base)

    def test_pending_is_mounted_here(self):
        """A creation under way is desired mounted on this node, of its size."""
        self.pending.begin(NEW, 64 * MiB, "gold")
        desired = self.desire(view(1), 0.0)
        self.assertEqual(desired.state_of(NEW), DesiredState.MOUNTED)
        self.assertEqual((desired.datasets[NEW].maximum_size,
                          desired.datasets[NEW].profile), (64 * MiB, "gold"))

    def test_view_wins_and_creation_forgotten(self):
        """Once the view holds the dataset its record counts, and the creation goes:
        a later move elsewhere is not undone by it."""
        self.pending.begin(NEW)
        self.desire(view(1, [DatasetEntry(NEW, NODE)]), 0.0)
        self.assertEqual(len(self.pending), 0)
        desired = self.desire(view(2, [DatasetEntry(NEW, OTHER)]), 1.0)
        self.assertEqual(desired.state_of(NEW), DesiredState.NOT_HERE)

    def test_abandoned_is_destroyed_then_forgotten(self):
        """A refused creation is desired destroyed here, for ``ABANDONED_FOR`` seconds."""
        self.pending.begin(NEW)
        self.pending.abandon(NEW, 10.0)
        self.assertEqual(self.desire(view(1), 11.0).state_of(NEW), DesiredState.DESTROYED)
        self.assertEqual(self.desire(view(1), 10.0 + ABANDONED_FOR).state_of(NEW),
                         DesiredState.IGNORED)
        self.assertEqual(len(self.pending), 0)

    def test_no_view_no_desire(self):
        """Without a view nothing is decided, creations or not."""
        self.pending.begin(NEW)
        self.assertIsNone(self.desire(AgentView(), 0.0))

    def test_begin_and_abandon_wake(self):
        """Each change calls ``changed`` (the agent wakes its loop with it)."""
        woken = []
        self.pending.changed = lambda: woken.append(len(self.pending))
        self.pending.begin(NEW)
        self.pending.abandon(NEW, 0.0)
        self.pending.abandon("unknown", 0.0)
        self.assertEqual(woken, [1, 1])


class LoopTests(SynchronousTestCase):
    """A real node loop on the in-memory block store, with pending creations."""

    def setUp(self):
        self.clock = Clock()
        self.store = MemoryBlockStore()
        backend = self.store.backend(NODE)
        self.fs = MemoryFilesystems(MemoryDisks(self.store), backend)
        self.pending = PendingCreations()
        self.loop = node_convergence_loop(self.clock, backend, self.fs, "/mnt",
                                          lambda states: None, run_blocking=run_now,
                                          pending=self.pending)
        self.loop.start()
        self.loop.update(view(1))
        self.addCleanup(self.loop.stop)

    def volumes(self) -> set:
        return {v.dataset_id for v in self.store.backend(NODE).list_volumes()}

    def test_made_before_the_view_has_it(self):
        """``begin`` alone makes and mounts the dataset here; the view that brings it
        later changes nothing."""
        self.pending.begin(NEW, 64 * MiB)
        self.assertEqual(set(self.fs.table), {f"/mnt/{NEW}"})
        self.loop.update(view(2, [DatasetEntry(NEW, NODE, 64 * MiB)]))
        self.assertEqual((set(self.fs.table), self.volumes()), ({f"/mnt/{NEW}"}, {NEW}))
        self.assertEqual(self.loop.failures, 0)

    def test_refused_creation_destroyed(self):
        """A creation the control service refused leaves nothing behind."""
        self.pending.begin(NEW, 64 * MiB)
        self.pending.abandon(NEW, self.clock.seconds())
        self.assertEqual((set(self.fs.table), self.volumes()), (set(), set()))

    def test_unknown_outcome_kept(self):
        """With no answer the creation may have happened: the dataset stays mounted."""
        self.pending.begin(NEW, 64 * MiB)
        self.clock.advance(ABANDONED_FOR * 2)
        self.assertEqual((set(self.fs.table), self.volumes()), ({f"/mnt/{NEW}"}, {NEW}))
