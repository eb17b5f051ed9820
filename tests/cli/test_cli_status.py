"""
``pyflock status`` against the real REST API in memory (APIHarness): the control
service's replicas, the one leading and the etcd members (issue 9).
"""

from __future__ import annotations

import json

from twisted.internet.defer import fail, succeed

from pyflock.cli._cli import EXIT_FAILED, EXIT_OK
from pyflock.control._etcd_state_model import ReplicaInfo, control_status, member_json
from tests.cli.test_cli import CLITestCase

#: What two replicas on one etcd member answer.
ETCD_STATUS = control_status(
    "c1", "etcd", [ReplicaInfo("c1", "h1:4523", 0.0), ReplicaInfo("c2", "h2:4523", 60.0)],
    "c2", [member_json({"ID": "99", "name": "m0", "clientURLs": ["http://e0:2379"],
                        "peerURLs": ["http://e0:2380"]})])


class StatusCommandTests(CLITestCase):
    """``pyflock status`` on SQLite and on etcd."""

    def test_single_replica(self):
        """On SQLite one replica answers, leads, and no etcd member is listed."""
        code, out, err = self.cli("status")
        self.assertEqual((EXIT_OK, ""), (code, err))
        self.assertIn("store:   sqlite", out)
        self.assertIn("leader:  control", out)
        self.assertNotIn("ETCD MEMBER", out)

    def test_replicas_and_members(self):
        """On etcd every replica is listed with the leader marked, and every member."""
        self.harness.status = lambda: succeed(ETCD_STATUS)
        code, out, _ = self.cli("status")
        self.assertEqual(EXIT_OK, code)
        lines = out.splitlines()
        self.assertIn(["c1", "h1:4523", "1970-01-01", "00:00:00Z"], [l.split() for l in lines])
        self.assertIn(["c2", "h2:4523", "1970-01-01", "00:01:00Z", "yes"],
                      [l.split() for l in lines])
        self.assertIn(["m0", "99", "http://e0:2379"], [l.split() for l in lines])

    def test_json(self):
        """``status --json`` prints the API's object."""
        self.harness.status = lambda: succeed(ETCD_STATUS)
        code, out, _ = self.cli("status", "--json")
        self.assertEqual((EXIT_OK, ETCD_STATUS), (code, json.loads(out)))

    def test_etcd_down(self):
        """When etcd does not answer, ``status`` fails on one line saying so."""
        self.harness.status = lambda: fail(RuntimeError("no member answered"))
        self.assertOneLineError(self.cli("status"), EXIT_FAILED, "no member answered")
