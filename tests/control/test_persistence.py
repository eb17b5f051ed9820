"""The configuration service: durable acknowledgement, store failures, lease grace."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._model import Configuration, Dataset, Lease
from pyflock.control._persistence import ConfigurationService, StoreUnavailable
from pyflock.control._store import MemoryConfigurationStore, StoreError
from pyflock.control.testing import APIHarness

A = "aaaaaaaa-0000-4000-8000-000000000001"
DS = "11111111-2222-4333-8444-555555555555"


def dataset(i: int = 0) -> Dataset:
    return Dataset(dataset_id=f"11111111-2222-4333-8444-{i:012d}", primary=A)


class ChangeTests(SynchronousTestCase):
    """Changes become visible to readers only once durable."""

    def setUp(self):
        self.clock = Clock()
        self.store = MemoryConfigurationStore()
        self.service = self.successResultOf(ConfigurationService.load(self.store, self.clock))

    def test_committed_after_write(self):
        """A change writes exactly its dataset's rows and then is committed."""
        d = dataset()
        self.successResultOf(self.service.change([d.dataset_id], lambda c: c.create(d)))
        self.assertEqual(self.service.committed.datasets[d.dataset_id], d)
        [write] = self.store.writes
        self.assertEqual(write.datasets, ((d.dataset_id, d),))

    def test_listener_gets_touched_ids(self):
        """Listeners see each committed configuration with the ids it touched."""
        seen = []
        self.service.subscribe(lambda config, ids: seen.append((config.generation, ids)))
        d = dataset()
        self.successResultOf(self.service.change([d.dataset_id], lambda c: c.create(d)))
        self.assertEqual(seen, [(1, (d.dataset_id,))])

    def test_failed_write_refuses_then_recovers(self):
        """A failed write answers StoreUnavailable, reloads from the store, and the
        generation skips ahead so that no tag is reused for other content."""
        first = dataset(1)
        self.successResultOf(self.service.change([first.dataset_id], lambda c: c.create(first)))
        tag = self.service.tag
        self.store.fail_next = StoreError("disk full")
        second = dataset(2)
        failure = self.failureResultOf(
            self.service.change([second.dataset_id], lambda c: c.create(second)),
            StoreUnavailable)
        self.assertIn("disk full", str(failure.value))
        self.assertNotIn(second.dataset_id, self.service.pending.datasets)
        self.assertNotEqual(self.service.tag, tag)
        third = dataset(3)
        self.successResultOf(self.service.change([third.dataset_id], lambda c: c.create(third)))
        self.assertEqual(set(self.store.config.datasets), {first.dataset_id, third.dataset_id})

    def test_failure_answers_503(self):
        """Over the API a failing store answers 503 with a description."""
        h = APIHarness()
        h.store.fail_next = StoreError("disk full")
        r = h.request(self, "POST", "/v1/configuration/datasets", {"primary": A})
        self.assertEqual(r.code, 503)
        self.assertIn("disk full", r.json["description"])


class LeaseGraceTests(SynchronousTestCase):
    """After a restart no lease expires before its holder could renew it."""

    def test_expired_during_downtime_extended(self):
        """A lease that ran out while the service was down gets the grace period."""
        clock = Clock()
        clock.advance(1000)
        d = Dataset(dataset_id=DS, primary=A)
        config = Configuration.from_records(
            [d], [Lease(dataset_id=DS, node_uuid=A, expiration=990.0)], 3)
        service = self.successResultOf(ConfigurationService.load(
            MemoryConfigurationStore(config), clock, lease_grace=30))
        self.assertEqual(service.committed.leases[DS].expiration, 1030.0)
        clock.advance(29)
        self.successResultOf(service.expire_leases())
        self.assertIn(DS, service.committed.leases)
        clock.advance(2)
        self.successResultOf(service.expire_leases())
        self.assertNotIn(DS, service.committed.leases)

    def test_long_lease_kept(self):
        """A lease with longer left than the grace keeps its expiration; null stays null."""
        clock = Clock()
        d2 = Dataset(dataset_id=A, primary=A)
        config = Configuration.from_records(
            [Dataset(dataset_id=DS, primary=A), d2],
            [Lease(dataset_id=DS, node_uuid=A, expiration=500.0),
             Lease(dataset_id=A, node_uuid=A, expiration=None)], 1)
        service = self.successResultOf(ConfigurationService.load(
            MemoryConfigurationStore(config), clock, lease_grace=30))
        self.assertEqual((service.committed.leases[DS].expiration,
                          service.committed.leases[A].expiration), (500.0, None))


class _HeldStore(MemoryConfigurationStore):
    """A memory store whose writes complete when the test says, in order."""

    def __init__(self):
        super().__init__()
        self.held = []

    def write(self, change):
        from twisted.internet.defer import Deferred
        d = Deferred()
        self.held.append((change, d))
        return d

    def complete(self, error=None):
        change, d = self.held.pop(0)
        if error is None:
            self.writes.append(change)
            from pyflock.control._store import apply_write
            self.config = apply_write(self.config, change)
            d.callback(None)
        else:
            d.errback(error)


class InFlightFailureTests(SynchronousTestCase):
    """A failed write also fails the writes accepted after it, which were built on it."""

    def test_later_writes_answered_failed_and_state_reloaded(self):
        """When write 1 fails and write 2 (accepted after it) then commits, write 2 is
        answered StoreUnavailable too, readers never see write 1, and the reloaded state is
        what the store holds."""
        store = _HeldStore()
        service = self.successResultOf(ConfigurationService.load(store, Clock()))
        first, second = dataset(1), dataset(2)
        d1 = service.change([first.dataset_id], lambda c: c.create(first))
        d2 = service.change([second.dataset_id], lambda c: c.create(second))
        store.complete(StoreError("disk full"))
        self.failureResultOf(d1, StoreUnavailable)
        self.assertNotIn(first.dataset_id, service.committed.datasets)
        store.complete()  # the store did commit write 2 ...
        self.failureResultOf(d2, StoreUnavailable)  # ... but its outcome is unknown
        self.assertNotIn(first.dataset_id, service.committed.datasets)
        store.complete()  # recovery's generation bump
        self.assertEqual(set(service.committed.datasets), {second.dataset_id})
        self.assertEqual(service.committed.datasets, store.config.datasets)
