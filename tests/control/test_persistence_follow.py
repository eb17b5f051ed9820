"""
The configuration service on a store that other replicas write (as on etcd), with an
in-memory store that refuses a write based on an outdated read, as etcd's compare does:
beaten changes are applied again on what the other writer left, noticed writes are caught
up with, and an unhealthy store refuses changes.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._model import Dataset, NameTaken
from pyflock.control._persistence import (
    REBASE_TIMEOUT, ConfigurationService, StoreUnavailable, TagMismatch,
)
from pyflock.control._store import MemoryConfigurationStore, StoreConflict, StoreWrite

NODE = "aaaaaaaa-0000-4000-8000-000000000001"


def dataset(n: int, name: Optional[str] = None) -> Dataset:
    """Dataset number ``n``, named ``name`` (by default ``d<n>``)."""
    return Dataset(dataset_id=f"00000000-0000-4000-8000-{n:012d}", primary=NODE,
                   metadata={"name": name or f"d{n}"})


class SharedStore(MemoryConfigurationStore):
    """
    A memory store one service writes and ``other_writes`` stands for another replica:
    a write fails with ``StoreConflict`` unless the service read the latest revision.
    """

    def __init__(self):
        super().__init__()
        self.known = 0
        self.tag_revision = 0
        self.catch_ups = 0

    def load(self):
        """Load, and compare later writes with what was loaded."""
        self.known = self.revision
        return super().load()

    def catch_up(self, revision: int):
        """The changes since ``revision``; later writes compare with now."""
        self.known = self.revision
        self.catch_ups += 1
        return self.changes_since(revision)

    def write(self, change: StoreWrite):
        """Write if nobody wrote since the service read; else ``StoreConflict``."""
        if self.known != self.revision:
            return fail(StoreConflict("another writer wrote first"))
        return self.other_writes(change, mine=True)

    def other_writes(self, change: StoreWrite, mine: bool = False):
        """Commit ``change`` (another replica's unless ``mine``)."""
        before = self.config.generation
        d = super().write(change)
        if change.datasets or change.generation != before:
            self.tag_revision = self.revision
        if mine:
            self.known = self.revision
        return d


class FollowTests(SynchronousTestCase):
    """A configuration service following a shared store."""

    def setUp(self):
        self.store = SharedStore()
        self.clock = Clock()
        self.service = self.successResultOf(ConfigurationService.load(self.store, self.clock))
        self.heard: list = []
        self.service.subscribe(lambda config, ids: self.heard.append(ids))

    def other_creates(self, n: int, name: Optional[str] = None) -> None:
        """Another replica creates dataset ``n``, unknown to the service yet."""
        config = self.store.config.create(dataset(n, name))
        self.store.other_writes(StoreWrite.of(config, [dataset(n).dataset_id]))

    def create(self, n: int, name: Optional[str] = None, **kwargs):
        """The service creates dataset ``n``; its Deferred."""
        return self.service.change([dataset(n).dataset_id],
                                   lambda c: c.create(dataset(n, name)), **kwargs)

    def test_beaten_change_is_applied_again(self):
        """A change beaten by another writer is applied on its configuration: both kept."""
        self.other_creates(1)
        config = self.successResultOf(self.create(2))
        self.assertEqual(set(config.names), {"d1", "d2"})
        self.assertEqual(set(self.store.config.names), {"d1", "d2"})
        self.assertEqual(self.service.committed, config)

    def test_beaten_change_on_a_tag_is_refused(self):
        """A change on a tag that another writer's dataset change made old: TagMismatch."""
        tag = self.service.tag
        self.other_creates(1)
        self.failureResultOf(self.create(2, expected_tag=tag), TagMismatch)
        self.assertEqual(set(self.store.config.names), {"d1"})

    def test_beaten_create_of_a_taken_name_is_refused(self):
        """Another writer took the name first: the change fails with NameTaken."""
        self.other_creates(1, "db")
        self.failureResultOf(self.create(2, "db"), NameTaken)
        self.assertEqual(list(self.store.config.names), ["db"])

    def test_noticed_write_is_caught_up_with(self):
        """A noticed revision makes the service read and announce the rows that changed."""
        before = self.service.tag
        self.other_creates(1)
        self.service.notice(self.store.revision)
        self.assertIn("d1", self.service.committed.names)
        self.assertEqual(self.heard, [(dataset(1).dataset_id,)])
        self.assertNotEqual(self.service.tag, before)
        self.service.notice(self.store.revision)
        self.assertEqual(self.store.catch_ups, 1)

    def test_newer_tag_catches_up_first(self):
        """A change on a tag this service has not seen yet is checked after catching up."""
        self.other_creates(1)
        newer = f"{self.service.store_id}-{self.store.tag_revision}"
        self.assertTrue(self.service.tag_may_match(newer))
        self.successResultOf(self.create(2, expected_tag=newer))
        self.assertEqual(set(self.store.config.names), {"d1", "d2"})
        self.assertFalse(self.service.tag_may_match(newer))

    def test_unhealthy_store_refuses_changes(self):
        """While unhealthy changes fail with the reason; once healthy it reloads, takes them."""
        self.service.unhealthy("member m2 did not answer")
        self.failureResultOf(self.create(1), StoreUnavailable)
        self.other_creates(2)
        self.service.healthy()
        self.assertIn("d2", self.service.committed.names)
        self.successResultOf(self.create(1))

    def test_repeated_conflicts_answer_unavailable(self):
        """
        A change beaten again and again, a second apart, is applied again for
        REBASE_TIMEOUT, then fails with StoreUnavailable, nothing written.
        """
        real = self.store.catch_up

        def catch_up_then_beaten(revision):
            d = real(revision)
            self.store.known = -1
            self.clock.advance(1)
            return d
        self.store.catch_up = catch_up_then_beaten
        self.store.known = -1
        self.failureResultOf(self.create(1), StoreUnavailable)
        self.assertEqual(dict(self.store.config.datasets), {})
        # One catch-up a second until the timeout, and one after the last refusal.
        self.assertEqual(self.store.catch_ups, REBASE_TIMEOUT + 1)
