"""The configuration service: durable acknowledgement, store failures, lease grace."""

import json

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._logging import events_of
from pyflock.common._model import Configuration, Dataset, Lease
from pyflock.control._persistence import (
    RECOVERY_RETRY, ConfigurationService, StoreUnavailable,
)
from pyflock.control._store import (
    MemoryConfigurationStore, StoreError, StoreWrite,
)
from pyflock.control.testing import ALICE, APIHarness

A = "aaaaaaaa-0000-4000-8000-000000000001"
DS = "11111111-2222-4333-8444-555555555555"


def dataset(i: int = 0) -> Dataset:
    """A dataset on node A numbered ``i``."""
    return Dataset(dataset_id=f"11111111-2222-4333-8444-{i:012d}", primary=A)


class HeldStore(MemoryConfigurationStore):
    """
    A memory store that holds its writes: each is applied, and its Deferred fires, only
    when the test calls ``complete`` (in submission order). ``failing_loads`` makes the
    next loads fail.
    """

    def __init__(self, config: Configuration = Configuration()):
        super().__init__(config)
        self.held: list[tuple[StoreWrite, Deferred]] = []
        self.loads = 0
        self.failing_loads = 0

    def write(self, change):
        """Hold ``change`` until ``complete``."""
        d: Deferred = Deferred()
        self.held.append((change, d))
        return d

    def complete(self, error=None):
        """Apply the oldest held write and fire its Deferred, or fail it with ``error``."""
        change, d = self.held.pop(0)
        if error is None:
            super().write(change).chainDeferred(d)
        else:
            d.errback(error)

    def load(self):
        """Load, or fail while ``failing_loads`` is positive."""
        self.loads += 1
        if self.failing_loads:
            self.failing_loads -= 1
            return fail(StoreError("still unreadable"))
        return super().load()


class ChangeTests(SynchronousTestCase):
    """Changes become visible to readers only once durable."""

    def setUp(self):
        self.clock = Clock()
        self.store = MemoryConfigurationStore(revision=7)
        self.service = self.successResultOf(ConfigurationService.load(self.store, self.clock))

    def test_committed_after_write(self):
        """A change writes exactly its dataset's rows and then is committed."""
        d = dataset()
        self.successResultOf(self.service.change([d.dataset_id], lambda c: c.create(d)))
        self.assertEqual(self.service.committed.datasets[d.dataset_id], d)
        [write] = self.store.writes
        self.assertEqual(write.datasets, ((d.dataset_id, d),))

    def test_revision_of_committed(self):
        """The service loads at the store's revision and id and follows the revision with
        every commit."""
        self.assertEqual((self.service.revision, self.service.store_id),
                         (7, self.store.store_id))
        d = dataset()
        self.successResultOf(self.service.change([d.dataset_id], lambda c: c.create(d)))
        self.assertEqual(self.service.revision, 8)

    def test_changes_since(self):
        """The service hands on the store's change feed since a revision it committed."""
        revision = self.service.revision
        d = dataset()
        self.successResultOf(self.service.change([d.dataset_id], lambda c: c.create(d)))
        changes = self.successResultOf(self.service.changes_since(revision))
        self.assertEqual((changes.revision, changes.change.datasets),
                         (self.service.revision, ((d.dataset_id, d),)))

    def test_listener_gets_touched_ids(self):
        """Listeners see each committed configuration with the ids it touched, and the
        service's revision is already the new one."""
        seen = []
        self.service.subscribe(lambda config, ids: seen.append(
            (config.generation, ids, self.service.revision)))
        d = dataset()
        self.successResultOf(self.service.change([d.dataset_id], lambda c: c.create(d)))
        self.assertEqual(seen, [(1, (d.dataset_id,), 8)])

    def test_listener_exception_logged(self):
        """A listener that raises is logged; the durable change still succeeds and the
        other listeners are still told."""
        def broken(config, ids):
            raise RuntimeError("listener bug")
        seen = []
        self.service.subscribe(broken)
        self.service.subscribe(lambda config, ids: seen.append(ids))
        d = dataset()
        with capturedLogs() as events:
            result = self.successResultOf(
                self.service.change([d.dataset_id], lambda c: c.create(d)))
        self.assertIn(d.dataset_id, result.datasets)
        self.assertEqual(seen, [(d.dataset_id,)])
        [event] = events_of(events, "pyflock:control:listener-failed")
        self.assertIn("listener bug", event["reason"])
        self.assertIn("RuntimeError", event["traceback"])

    def test_listener_exception_answers_success(self):
        """Over the API, a change whose listener raises still answers 201."""
        h = APIHarness()
        h.configuration.subscribe(lambda config, ids: 1 / 0)
        with capturedLogs():
            r = h.request(self, "POST", "/v1/configuration/datasets", {"primary": A})
        self.assertEqual(r.code, 201)

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
        self.assertEqual(self.service.revision, self.store.revision)
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


class RecoveryTests(SynchronousTestCase):
    """After a failed write the service reloads the store until it can, then stops trying."""

    def setUp(self):
        self.clock = Clock()
        self.store = HeldStore()
        self.service = self.successResultOf(ConfigurationService.load(self.store, self.clock))
        self.store.loads = 0

    def fail_a_write(self):
        """Make a change whose write fails while the store cannot be read either."""
        self.store.failing_loads = 2
        d = dataset()
        answer = self.service.change([d.dataset_id], lambda c: c.create(d))
        with capturedLogs():
            self.store.complete(StoreError("disk gone"))
        self.failureResultOf(answer, StoreUnavailable)

    def test_retries_until_readable(self):
        """An unreadable store is read again every ``RECOVERY_RETRY`` seconds until it is."""
        self.fail_a_write()
        self.assertEqual(self.store.loads, 1)
        with capturedLogs():
            self.clock.advance(RECOVERY_RETRY)
            self.assertEqual(self.store.loads, 2)
            self.clock.advance(RECOVERY_RETRY)
        self.assertEqual(self.store.loads, 3)
        self.store.complete()  # the generation bump
        self.assertEqual(self.clock.getDelayedCalls(), [])
        d = dataset(1)
        answer = self.service.change([d.dataset_id], lambda c: c.create(d))
        self.store.complete()
        self.successResultOf(answer)

    def test_stop_cancels_retry(self):
        """Stopping the service cancels the pending retry: the store is not read again."""
        self.fail_a_write()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.successResultOf(self.service.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10 * RECOVERY_RETRY)
        self.assertEqual(self.store.loads, 1)

    def test_stop_during_reload_schedules_nothing(self):
        """A reload that fails after the service stopped schedules no retry."""
        self.store.failing_loads = 1
        gate: Deferred = Deferred()
        original = self.store.load
        self.store.load = lambda: gate.addCallback(lambda _: original())
        d = dataset()
        answer = self.service.change([d.dataset_id], lambda c: c.create(d))
        self.store.complete(StoreError("disk gone"))
        self.failureResultOf(answer, StoreUnavailable)
        self.successResultOf(self.service.stop())
        with capturedLogs():
            gate.callback(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


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


class InFlightFailureTests(SynchronousTestCase):
    """A failed write also fails the writes accepted after it, which were built on it."""

    def test_later_writes_answered_failed_and_state_reloaded(self):
        """When write 1 fails and write 2 (accepted after it) then commits, write 2 is
        answered StoreUnavailable too, readers never see write 1, and the reloaded state is
        what the store holds."""
        store = HeldStore()
        service = self.successResultOf(ConfigurationService.load(store, Clock()))
        first, second = dataset(1), dataset(2)
        d1 = service.change([first.dataset_id], lambda c: c.create(first))
        d2 = service.change([second.dataset_id], lambda c: c.create(second))
        with capturedLogs():
            store.complete(StoreError("disk full"))
        self.failureResultOf(d1, StoreUnavailable)
        self.assertNotIn(first.dataset_id, service.committed.datasets)
        store.complete()  # the store did commit write 2 ...
        self.failureResultOf(d2, StoreUnavailable)  # ... but its outcome is unknown
        self.assertNotIn(first.dataset_id, service.committed.datasets)
        store.complete()  # recovery's generation bump
        self.assertEqual(set(service.committed.datasets), {second.dataset_id})
        self.assertEqual(service.committed.datasets, store.config.datasets)
        self.assertEqual(service.revision, store.revision)


class HeldWriteTests(SynchronousTestCase):
    """Nothing is acknowledged before the store made it durable, held writes included."""

    def setUp(self):
        self.store = HeldStore()
        self.h = APIHarness(store=self.store)

    def start(self, method, path, body=None):
        """Start a request as alice; its client and the Deferred of its response."""
        treq = StubTreq(self.h.api(ALICE).resource())
        data = None if body is None else json.dumps(body).encode()
        return treq, treq.request(method, "https://control.example" + path, data=data)

    def answer(self, treq, d):
        """The status and JSON body of a finished request."""
        treq.flush()
        response = self.successResultOf(d)
        return response.code, json.loads(self.successResultOf(response.content()))

    def test_create_is_durable_before_answer(self):
        """A create answers only once the store has committed the dataset's row."""
        treq, d = self.start("POST", "/v1/configuration/datasets",
                             {"primary": A, "dataset_id": DS})
        treq.flush()
        self.assertNoResult(d)
        self.assertNotIn(DS, self.store.config.datasets)
        self.store.complete()
        self.assertEqual(self.answer(treq, d)[0], 201)
        self.assertIn(DS, self.store.config.datasets)

    def create_committed(self):
        """Create dataset DS and let the store commit it."""
        treq, d = self.start("POST", "/v1/configuration/datasets",
                             {"primary": A, "dataset_id": DS})
        self.store.complete()
        self.assertEqual(self.answer(treq, d)[0], 201)

    def test_repeated_delete_waits_for_first(self):
        """A DELETE repeated while the first one's write is in flight answers only once
        that write is durable."""
        self.create_committed()
        first = self.start("DELETE", f"/v1/configuration/datasets/{DS}")
        second = self.start("DELETE", f"/v1/configuration/datasets/{DS}")
        second[0].flush()
        self.assertNoResult(second[1])
        self.store.complete()
        self.assertEqual(self.answer(*first)[0], 200)
        code, body = self.answer(*second)
        self.assertEqual((code, body["deleted"]), (200, True))
        self.assertTrue(self.store.config.datasets[DS].deleted)

    def test_repeated_delete_fails_with_first(self):
        """When the first DELETE's write fails, the repeated one fails too (503)."""
        self.create_committed()
        first = self.start("DELETE", f"/v1/configuration/datasets/{DS}")
        second = self.start("DELETE", f"/v1/configuration/datasets/{DS}")
        with capturedLogs():
            self.store.complete(StoreError("disk full"))
            self.assertEqual(self.answer(*first)[0], 503)
            self.assertEqual(self.answer(*second)[0], 503)
        self.assertFalse(self.store.config.datasets[DS].deleted)
