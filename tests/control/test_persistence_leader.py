"""
The configuration service's timed work under a leader (issue 9, point 4): only a leader
expires leases and retention, a new leader waits the lease grace, leader-only writes
carry the fence, and a write the store refuses for its fence expires nothing and makes
the service step down and reload.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._model import Configuration, Dataset, Lease
from pyflock.control._election import Fence
from pyflock.control._persistence import ConfigurationService
from pyflock.control._store import Fenced, MemoryConfigurationStore, StoreWrite

NODE = "aaaaaaaa-0000-4000-8000-000000000001"
DS = "00000000-0000-4000-8000-000000000001"
FENCE = Fence(b"/p/election/1", 7)
GRACE = 30.0


class FencingStore(MemoryConfigurationStore):
    """A memory store shared like etcd's (``catch_up``) that refuses a write whose fence
    is not ``holds``; ``fences`` lists the fence of every write."""

    def __init__(self, config: Configuration):
        super().__init__(config)
        self.holds: Optional[Fence] = FENCE
        self.fences: list = []
        self.loads = 0

    def load(self):
        """Load, counting loads."""
        self.loads += 1
        return super().load()

    def catch_up(self, revision: int):
        """The changes since ``revision``."""
        return self.changes_since(revision)

    def write(self, change: StoreWrite):
        """Write, unless its fence no longer holds (``Fenced``)."""
        self.fences.append(change.fence)
        if change.fence is not None and change.fence != self.holds:
            return fail(Fenced("another replica leads"))
        return super().write(change)


class Leadership:
    """A leader as ``EtcdLeadership`` answers, set by hand; counts ``fenced`` calls."""

    def __init__(self, leading: bool = True, since: float = 0.0):
        self.leading = leading
        self.since = since
        self.fence = FENCE if leading else None
        self.fenced_calls = 0

    def settled(self, now: float, grace: float) -> bool:
        """Leading for ``grace`` seconds."""
        return self.leading and now - self.since >= grace

    def fenced(self, fence) -> None:
        """Count, and step down."""
        self.fenced_calls += 1
        self.leading, self.fence = False, None


class LeaderTimedWorkTests(SynchronousTestCase):
    """Lease and retention expiry run on the leader alone, with its fence."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        config = Configuration.from_records(
            [Dataset(dataset_id=DS, primary=NODE)],
            [Lease(dataset_id=DS, node_uuid=NODE, expiration=1010.0)], 1)
        self.store = FencingStore(config)
        self.service = self.successResultOf(ConfigurationService.load(
            self.store, self.clock, lease_grace=GRACE))

    def test_follower_expires_nothing(self):
        """A replica that does not lead leaves a lease that ran out alone."""
        self.service.lead_with(Leadership(leading=False))
        self.clock.advance(100)
        self.successResultOf(self.service.expire_leases())
        self.assertIn(DS, self.service.committed.leases)
        self.assertEqual(self.store.fences, [])

    def test_new_leader_waits_the_grace(self):
        """A leader since 1050 expires a lease that ran out only at 1050 + grace."""
        self.service.lead_with(Leadership(since=1050.0))
        self.clock.advance(1050 + GRACE - 0.5 - 1000)
        self.successResultOf(self.service.expire_leases())
        self.assertIn(DS, self.service.committed.leases)
        self.clock.advance(0.5)
        self.successResultOf(self.service.expire_leases())
        self.assertNotIn(DS, self.service.committed.leases)
        self.assertEqual(self.store.fences, [FENCE])

    def test_fenced_expiry_expires_nothing(self):
        """An expiry refused by the fence: the lease stays, the service steps down and
        reads the whole configuration again."""
        leader = Leadership(since=0.0)
        self.service.lead_with(leader)
        self.store.holds = Fence(b"/p/election/2", 9)
        self.clock.advance(100)
        loads = self.store.loads
        self.failureResultOf(self.service.expire_leases(), Fenced)
        self.assertEqual(leader.fenced_calls, 1)
        self.assertIn(DS, self.service.pending.leases)
        self.assertIn(DS, self.service.committed.leases)
        self.assertEqual(self.store.loads, loads + 1)
        self.assertIn(DS, self.store.config.leases)

    def test_retention_on_the_leader_alone(self):
        """The end of a deleted dataset's retention is written by the leader, fenced."""
        self.service.lead_with(Leadership(leading=False))
        self.successResultOf(self.service.change(
            [DS], lambda c: c.release_lease(DS).delete(self.clock.seconds(), DS,
                                                       retain_until=1001.0)))
        self.clock.advance(5)
        self.successResultOf(self.service.release_retained())
        self.assertIsNotNone(self.service.committed.datasets[DS].retained_until)
        self.service.lead_with(Leadership())
        self.successResultOf(self.service.release_retained())
        self.assertIsNone(self.service.committed.datasets[DS].retained_until)
        self.assertEqual(self.store.fences[-1], FENCE)

    def test_alone_the_service_leads(self):
        """Without a leadership (SQLite), leases expire as before, without a fence."""
        self.clock.advance(100)
        self.successResultOf(self.service.expire_leases())
        self.assertNotIn(DS, self.service.committed.leases)
        self.assertEqual(self.store.fences, [None])
