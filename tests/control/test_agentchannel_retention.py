"""
The agent channel's purge of deleted datasets and the recycle bin: a deleted dataset
whose data is kept is never purged from the configuration, held or not, whatever the
agents report; once its retention ends it is purged like any other.
"""

from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._wire import Heartbeat
from tests.control import test_agentchannel as channel

A, DS = channel.A, channel.DS


class RetainedPurgeTests(SynchronousTestCase):
    """The server with an in-memory configuration service, on a Clock (as ServerTests)."""

    setUp = channel.ServerTests.setUp
    tearDown = channel.ServerTests.tearDown
    start_server = channel.ServerTests.start_server
    change = channel.ServerTests.change
    create = channel.ServerTests.create
    connect = channel.ServerTests.connect
    report = channel.ServerTests.report

    def bin(self, seconds: float = 5.0):
        """Delete ``DS`` keeping its data ``seconds``."""
        now = self.clock.seconds()
        return self.change(DS, lambda c: c.delete(now, DS, retain_until=now + seconds))

    def test_kept_dataset_never_purged(self):
        """No node holds a kept dataset and every node vouched so: it is still kept."""
        self.create()
        a, _ = self.connect()
        self.report(a, A)
        self.bin()
        self.report(a, A)
        a.send(Heartbeat(view=self.server.current))
        self.clock.advance(4)
        a.send(Heartbeat(view=self.server.current))
        self.assertTrue(self.h.configuration.committed.datasets[DS].deleted)
        [entry] = self.server.snapshot().datasets
        self.assertEqual((entry.dataset_id, entry.retained_until),
                         (DS, self.clock.seconds() + 1))

    def test_purged_once_retention_ends(self):
        """Once the retention ends, the dataset is purged when no node holds it, judged on
        reports made after the nodes stored a view in which its data goes."""
        self.create()
        a, _ = self.connect()
        self.report(a, A, DS)
        self.bin()
        self.report(a, A)
        seen_kept = self.server.current
        self.clock.advance(5)
        self.successResultOf(self.h.configuration.release_retained())
        self.h.clock.advance(0)
        # A node that has not stored the view saying the data may go could still hold it
        # without knowing it must destroy it: no purge on its word.
        self.report(a, A, view=seen_kept)
        self.assertIn(DS, self.h.configuration.committed.datasets)
        self.report(a, A)
        self.assertNotIn(DS, self.h.configuration.committed.datasets)
        self.h.clock.advance(0)
        self.assertEqual((), self.server.snapshot().datasets)

    def test_purge_at_once(self):
        """A kept dataset purged by a user goes once no node holds it."""
        self.create()
        a, _ = self.connect()
        self.report(a, A)
        self.bin()
        self.change(DS, lambda c: c.delete(self.clock.seconds(), DS))
        self.report(a, A)
        self.assertNotIn(DS, self.h.configuration.committed.datasets)
