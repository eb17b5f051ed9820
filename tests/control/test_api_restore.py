"""
The REST API's recycle bin: DELETE keeps a dataset's data for the retention period,
``POST .../restore`` brings it back, ``?purge=true`` (user certificates only) lets it go.
"""

import contextlib
import io

from twisted.trial.unittest import SynchronousTestCase

from pyflock.control._script import _parser
from pyflock.control._store import StoreError
from pyflock.control.testing import NODE_A, APIHarness

A = NODE_A.node_uuid
DS = "11111111-2222-4333-8444-555555555555"
OTHER = "11111111-2222-4333-8444-666666666666"
DATASETS = "/v1/configuration/datasets"
RESTORE = f"{DATASETS}/{DS}/restore"


class RestoreTests(SynchronousTestCase):
    """Deleting keeps the data for an hour; restoring brings the dataset back."""

    def setUp(self):
        self.h = APIHarness()
        self.req("POST", DATASETS, {"primary": A, "dataset_id": DS, "metadata": {"name": "db"}})

    def req(self, *args, **kwargs):
        return self.h.request(self, *args, **kwargs)

    def test_delete_keeps_and_lists(self):
        """A deleted dataset stays listed with ``deleted`` and the time its data goes."""
        now = self.h.clock.seconds()
        deleted = self.req("DELETE", f"{DATASETS}/{DS}")
        self.assertEqual((deleted.code, deleted.json["retained_until"]), (200, now + 3600))
        listed = self.req("GET", DATASETS).json
        self.assertEqual([(d["deleted"], d["retained_until"]) for d in listed],
                         [(True, now + 3600)])

    def test_restore(self):
        """A restore makes the dataset live again under its old name."""
        self.req("DELETE", f"{DATASETS}/{DS}")
        restored = self.req("POST", RESTORE)
        self.assertEqual((restored.code, restored.json["deleted"], restored.json["metadata"]),
                         (200, False, {"name": "db"}))
        self.assertNotIn("retained_until", restored.json)
        self.assertEqual(self.h.configuration.committed.by_name("db").dataset_id, DS)

    def test_name_taken_meanwhile(self):
        """Once a new dataset took the name, a restore answers 409 unless given another."""
        self.req("DELETE", f"{DATASETS}/{DS}")
        created = self.req("POST", DATASETS, {"primary": A, "dataset_id": OTHER,
                                              "metadata": {"name": "db"}})
        self.assertEqual(created.code, 201)
        refused = self.req("POST", RESTORE)
        self.assertEqual(refused.code, 409)
        self.assertIn("'db' is already used", refused.json["description"])
        renamed = self.req("POST", RESTORE, {"metadata": {"name": "db-old"}})
        self.assertEqual((renamed.code, renamed.json["metadata"]["name"]), (200, "db-old"))

    def test_retention_over(self):
        """Once the retention is over the data goes: a restore then answers 410."""
        self.req("DELETE", f"{DATASETS}/{DS}")
        self.h.clock.advance(3599)
        self.h.configuration.release_retained()
        self.assertEqual(self.req("GET", DATASETS).json[0]["retained_until"],
                         self.h.clock.seconds() + 1)
        self.h.clock.advance(1)
        self.h.configuration.release_retained()
        self.assertTrue(self.h.configuration.committed.datasets[DS].purging)
        self.assertEqual(self.req("POST", RESTORE).code, 410)
        # No node holds it and its data goes: no longer listed.
        self.assertEqual(self.req("GET", DATASETS).json, [])

    def test_purge(self):
        """``purge=true`` from a user lets the data go at once, even after a delete."""
        self.req("DELETE", f"{DATASETS}/{DS}")
        purged = self.req("DELETE", f"{DATASETS}/{DS}?purge=true")
        self.assertEqual(purged.code, 200)
        self.assertNotIn("retained_until", purged.json)
        self.assertEqual(self.req("POST", RESTORE).code, 410)

    def test_node_may_delete_but_never_purge(self):
        """A node deletes its dataset into the bin, but may neither purge nor restore."""
        refused = self.req("DELETE", f"{DATASETS}/{DS}?purge=true", identity=NODE_A)
        self.assertEqual(refused.code, 403)
        self.assertFalse(self.h.configuration.committed.datasets[DS].deleted)
        self.assertEqual(self.req("DELETE", f"{DATASETS}/{DS}", identity=NODE_A).code, 200)
        self.assertEqual(self.req("DELETE", f"{DATASETS}/{DS}?purge=true",
                                  identity=NODE_A).code, 403)
        self.assertEqual(self.req("POST", RESTORE, identity=NODE_A).code, 403)
        self.assertFalse(self.h.configuration.committed.datasets[DS].purging)

    def test_retention_off(self):
        """With retention 0 a delete lets the data go at once."""
        self.h = APIHarness(retention=0)
        self.req("POST", DATASETS, {"primary": A, "dataset_id": DS})
        self.assertNotIn("retained_until", self.req("DELETE", f"{DATASETS}/{DS}").json)
        self.assertEqual(self.req("POST", RESTORE).code, 410)

    def test_bad_input(self):
        """A bad purge value, dataset id or body answers 400; an unknown dataset 404."""
        self.assertEqual(self.req("DELETE", f"{DATASETS}/{DS}?purge=yes").code, 400)
        self.assertEqual(self.req("POST", f"{DATASETS}/nope/restore").code, 400)
        self.assertEqual(self.req("POST", RESTORE, {"metadata": {"size": "1"}}).code, 400)
        self.assertEqual(self.req("POST", RESTORE, raw=b"{").code, 400)
        self.assertEqual(self.req("POST", f"{DATASETS}/{OTHER}/restore").code, 404)

    def test_live_dataset(self):
        """Restoring a live dataset changes nothing; renaming it so answers 409."""
        self.assertEqual(self.req("POST", RESTORE).code, 200)
        self.assertEqual(self.req("POST", RESTORE, {"metadata": {"name": "x"}}).code, 409)

    def test_tag_and_store_failure(self):
        """A stale configuration tag answers 412, a failed store write 503."""
        self.req("DELETE", f"{DATASETS}/{DS}")
        stale = self.req("POST", RESTORE, headers={"X-If-Configuration-Matches": "old"})
        self.assertEqual(stale.code, 412)
        self.h.store.fail_next = StoreError("disk full")
        self.assertEqual(self.req("POST", RESTORE).code, 503)

    def test_kept_across_restart(self):
        """A restarted service (a reopened store) still keeps, and can restore, the data."""
        self.req("DELETE", f"{DATASETS}/{DS}")
        until = self.h.configuration.committed.datasets[DS].retained_until
        restarted = APIHarness(store=self.h.store.reopen(), clock=self.h.clock)
        self.assertEqual(restarted.configuration.committed.datasets[DS].retained_until, until)
        self.assertEqual(restarted.request(self, "POST", RESTORE).code, 200)

    def test_retention_kept_across_store_recovery(self):
        """A restore the store failed to keep leaves the dataset deleted after the reload
        that follows, and its retention still ends on time."""
        self.req("DELETE", f"{DATASETS}/{DS}")
        self.h.store.fail_next = StoreError("disk full")
        self.assertEqual(self.req("POST", RESTORE).code, 503)
        self.assertTrue(self.h.configuration.committed.datasets[DS].deleted)
        self.h.clock.advance(3600)
        self.successResultOf(self.h.configuration.release_retained())
        self.assertTrue(self.h.configuration.committed.datasets[DS].purging)

    def test_expiry_clock_lets_data_go(self):
        """The service's expiry clock, the one that expires leases, ends retentions too."""
        self.req("DELETE", f"{DATASETS}/{DS}")
        self.h.configuration.start_lease_expiry(1.0)
        self.addCleanup(self.h.configuration.stop)
        self.h.clock.advance(3599)
        self.assertFalse(self.h.configuration.committed.datasets[DS].purging)
        self.h.clock.advance(2)
        self.assertTrue(self.h.configuration.committed.datasets[DS].purging)


class RetentionFlagTests(SynchronousTestCase):
    """``pyflock-control --deleted-retention SECONDS``."""

    def test_default_and_zero(self):
        """Without the flag deleted data is kept an hour; 0 (off) and other values parse."""
        self.assertEqual(3600.0, _parser().parse_args(["run"]).deleted_retention)
        for text, value in (("0", 0.0), ("90.5", 90.5)):
            self.assertEqual(value, _parser().parse_args(
                ["run", "--deleted-retention", text]).deleted_retention)

    def test_refuses_bad_values(self):
        """A negative, infinite or non-numeric retention is refused with a clear error."""
        for text in ("-1", "inf", "an hour"):
            with contextlib.redirect_stderr(io.StringIO()) as err:
                self.assertRaises(SystemExit, _parser().parse_args,
                                  ["run", "--deleted-retention", text])
            self.assertIn(f"{text!r} is not a number of seconds, 0 or more", err.getvalue())
