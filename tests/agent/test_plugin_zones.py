"""
The Docker plugin and availability zones: a Mount on a node in another zone than the
volume's node is refused saying so (not that the volume is in use elsewhere), and moves
nothing.
"""

from tests.agent.test_plugin import A, B, PluginTestCase


class ZoneMountTests(PluginTestCase):
    """Node A in zone z-1a; the volume made on node B, in z-1b."""

    def test_mount_across_zones_refused_naming_both(self):
        """A Mount here of a volume whose node is in another zone fails with the control
        service's reason, naming both zones; the volume stays on its node."""
        self.harness.report_node(A, "10.0.0.1", zone="z-1a")
        self.harness.report_node(B, "10.0.0.2", zone="z-1b")
        dataset_id = self.create_on_b("v1")
        answer = self.mount("v1")
        self.assertTrue(answer["Err"].startswith(
            "pyflock: cannot mount volume v1 on this node: Dataset "), answer)
        for fragment in (f"on node {B} in zone z-1b", f"node {A} is in zone z-1a",
                         "cannot move between zones"):
            self.assertIn(fragment, answer["Err"])
        self.assertNotIn("in use", answer["Err"])
        self.assertEqual(B, self.harness.configuration.committed.datasets[dataset_id].primary)
        self.assertIsNone(self.lease_holder("v1"))
