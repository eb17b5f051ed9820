"""
The plugin's ``LeaseKeeper`` against a scripted control client: one operation per dataset
at a time, releases only when idle, and the holder of a lost lease from the 409's field.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._lease_keeper import LeaseKeeper
from pyflock.common._client import Conflict, NotFound
from pyflock.common._records import Lease
from pyflock.common._logging import events_of

NODE = "0b41c2b0-5fd6-4e2c-9a8f-42a5b0f3c1d2"
OTHER = "7c5e1f00-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
DS = "11111111-2222-4333-8444-555555555555"


class ScriptedClient:
    """Answers ``acquire_lease``/``release_lease`` with the next scripted Deferred."""

    def __init__(self):
        self.answers: list = []
        self.calls: list = []

    def acquire_lease(self, dataset_id, node_uuid, expires):
        """The next answer; records the call."""
        self.calls.append(("acquire", dataset_id))
        return self.answers.pop(0)

    def release_lease(self, dataset_id):
        """The next answer; records the call."""
        self.calls.append(("release", dataset_id))
        return self.answers.pop(0)


class LeaseKeeperTests(SynchronousTestCase):
    """``LeaseKeeper``'s IO rules."""

    def setUp(self):
        self.client = ScriptedClient()
        self.in_use: set = set()
        self.keeper = LeaseKeeper(self.client, NODE, 60.0, lambda d: d in self.in_use)

    def test_release_waits_for_acquire(self):
        """A release asked for while an acquire is under way runs after it, in order."""
        pending: Deferred = Deferred()
        self.client.answers = [pending, succeed(None)]
        self.keeper.acquire(DS)
        released = self.keeper.release_if_idle(DS)
        self.assertEqual(self.client.calls, [("acquire", DS)])
        pending.callback(Lease(DS, NODE, 60.0))
        self.successResultOf(released)
        self.assertEqual(self.client.calls, [("acquire", DS), ("release", DS)])

    def test_no_release_while_in_use(self):
        """A dataset in use again keeps its lease."""
        self.client.answers = [succeed(Lease(DS, NODE, 60.0))]
        self.keeper.acquire(DS)
        self.in_use.add(DS)
        self.successResultOf(self.keeper.release_if_idle(DS))
        self.assertEqual(self.client.calls, [("acquire", DS)])

    def test_release_of_gone_lease_is_quiet(self):
        """A lease already gone (404) is released without a warning."""
        self.client.answers = [succeed(Lease(DS, NODE, 60.0)),
                               fail(NotFound(404, "Lease not found."))]
        self.keeper.acquire(DS)
        with capturedLogs() as events:
            self.successResultOf(self.keeper.release_if_idle(DS))
        self.assertEqual(events_of(events, "pyflock:plugin:lease-release-failed"), [])

    def test_lost_lease_names_the_holder_from_the_field(self):
        """A renewal refused with 409 logs ``lease-lost`` with the answer's ``holder``,
        even when the description does not name it."""
        self.client.answers = [fail(Conflict(409, "Lease already held.", holder=OTHER))]
        self.in_use.add(DS)
        with capturedLogs() as events:
            self.successResultOf(self.keeper.renew([DS]))
        [event] = events_of(events, "pyflock:plugin:lease-lost")
        self.assertEqual(event["holder"], OTHER)
        self.assertNotIn(DS, self.keeper.held)


class SharedAcquireTests(SynchronousTestCase):
    """An acquire asked while another is under way, with nothing queued after it, shares
    that one's answer (issue 7: the first Mount waits for the lease Create asked for)."""

    def setUp(self):
        self.client = ScriptedClient()
        self.keeper = LeaseKeeper(self.client, NODE, 60.0, lambda d: False)

    def test_second_acquire_shares_the_first(self):
        """Two acquires, one request; both get its lease."""
        pending: Deferred = Deferred()
        self.client.answers = [pending]
        first = self.keeper.acquire(DS)
        second = self.keeper.acquire(DS)
        self.assertEqual(self.client.calls, [("acquire", DS)])
        lease = Lease(DS, NODE, 60.0)
        pending.callback(lease)
        self.assertIs(self.successResultOf(first), lease)
        self.assertIs(self.successResultOf(second), lease)
        self.assertIn(DS, self.keeper.held)

    def test_shared_refusal(self):
        """A refused acquire fails every caller sharing it, with the holder."""
        pending: Deferred = Deferred()
        self.client.answers = [pending]
        first = self.keeper.acquire(DS)
        second = self.keeper.acquire(DS)
        pending.errback(Conflict(409, "leased", holder=OTHER))
        self.assertEqual(self.failureResultOf(first, Conflict).value.holder, OTHER)
        self.assertEqual(self.failureResultOf(second, Conflict).value.holder, OTHER)
        self.assertNotIn(DS, self.keeper.held)

    def test_no_sharing_across_a_release(self):
        """An acquire asked after a queued release is a request of its own, after it."""
        pending: Deferred = Deferred()
        self.client.answers = [pending, succeed(None), succeed(Lease(DS, NODE, 60.0))]
        self.keeper.acquire(DS)
        self.keeper.release_if_idle(DS)
        again = self.keeper.acquire(DS)
        pending.callback(Lease(DS, NODE, 60.0))
        self.successResultOf(again)
        self.assertEqual(self.client.calls,
                         [("acquire", DS), ("release", DS), ("acquire", DS)])
        self.assertIn(DS, self.keeper.held)

    def test_no_sharing_once_answered(self):
        """An acquire after the last one was answered asks again (a renewal)."""
        self.client.answers = [succeed(Lease(DS, NODE, 60.0)), succeed(Lease(DS, NODE, 60.0))]
        self.successResultOf(self.keeper.acquire(DS))
        self.successResultOf(self.keeper.acquire(DS))
        self.assertEqual(self.client.calls, [("acquire", DS), ("acquire", DS)])
