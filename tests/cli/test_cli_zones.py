"""
Availability zones in the CLI: ``list-nodes`` shows them once nodes report any, and a
``move`` the control service refuses for crossing zones says how to copy the data instead.
"""

import json

from pyflock.cli._parser import EXIT_FAILED, EXIT_OK
from tests.cli.test_cli import NODE_1, NODE_2, NODE_3, PGDATA, CLITestCase


class ZoneTests(CLITestCase):
    """The CLI against nodes in two zones (node 3, dead, reported none)."""

    def setUp(self):
        super().setUp()
        self.harness.report_node(NODE_1, "10.0.0.1", silent=1.25, zone="eu-west-1a")
        self.harness.report_node(NODE_2, "10.0.0.2", silent=3, zone="eu-west-1b")

    def test_list_nodes_shows_zones(self):
        """``list-nodes`` has a ZONE column, ``-`` for a node without one."""
        code, out, err = self.cli("list-nodes")
        self.assertEqual((EXIT_OK, ""), (code, err))
        self.assertEqual(
            "NODE      ADDRESS   ALIVE  LAST SEEN  DATASETS  ZONE\n"
            "11111111  10.0.0.1  yes    1s ago     2         eu-west-1a\n"
            "22222222  10.0.0.2  yes    3s ago     1         eu-west-1b\n"
            "22223333  10.0.0.2  no     2m05s ago  0         -\n", out)

    def test_list_nodes_json_has_zones(self):
        """``list-nodes --json`` gives each node's zone (null when unknown)."""
        _, out, _ = self.cli("list-nodes", "--json")
        self.assertEqual({NODE_1: "eu-west-1a", NODE_2: "eu-west-1b", NODE_3: None},
                         {n["uuid"]: n["zone"] for n in json.loads(out)})

    def test_move_across_zones_refused_with_copy_hint(self):
        """A move to another zone fails naming both zones, then says how to copy instead;
        the dataset stays where it was."""
        code, out, err = self.cli("move", "pgdata", "--to", NODE_2)
        self.assertEqual((EXIT_FAILED, ""), (code, out))
        first, *hint = err.splitlines()
        self.assertTrue(first.startswith("pyflock: error: Dataset " + PGDATA), first)
        for fragment in (f"node {NODE_1} in zone eu-west-1a", f"node {NODE_2} is in zone "
                         "eu-west-1b", "cannot move between zones"):
            self.assertIn(fragment, first)
        self.assertEqual([
            "To copy it: make a dataset in the target's zone and stream the files across "
            "(stop the containers using pgdata first):",
            f"  pyflock create --node {NODE_2} --size 10G --name pgdata-copy",
            "  ssh 10.0.0.1 docker run --rm -v pgdata:/from --volume-driver=pyflock "
            "busybox tar -C /from -cf - . |",
            "    ssh 10.0.0.2 docker run -i --rm -v pgdata-copy:/to --volume-driver=pyflock "
            "busybox tar -C /to -xf -"], hint)
        self.assertEqual(NODE_1, self.configuration.datasets[PGDATA].primary)

    def test_move_to_a_node_of_unknown_zone_allowed(self):
        """A move to a node whose zone is not known goes ahead as before."""
        self.harness.report_node(NODE_2, "10.0.0.2", silent=3)
        code, out, err = self.cli("move", "pgdata", "--to", NODE_2)
        self.assertEqual((EXIT_OK, ""), (code, err))
        self.assertEqual(NODE_2, self.configuration.datasets[PGDATA].primary)

    def test_other_conflicts_have_no_hint(self):
        """A 409 for another reason (a lease held elsewhere) stays one line, no hint."""
        self.harness.report_node(NODE_2, "10.0.0.2", silent=3, zone="eu-west-1a")
        self.assertOneLineError(self.cli("move", "bbbb0000", "--to", NODE_2), EXIT_FAILED,
                                "Lease already held by node " + NODE_1)
