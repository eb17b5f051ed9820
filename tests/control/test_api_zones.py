"""
Availability zones in the REST API: ``GET /v1/state/nodes`` shows each node's zone, and a
move of a dataset to a node in another zone than the node holding it is refused with 409
naming both zones (an EBS volume stays in its zone); a move with either zone unknown goes
ahead as before.
"""

from twisted.trial.unittest import SynchronousTestCase

from pyflock.control._clusterstate import ClusterState, NodeState, ZoneMismatch, check_same_zone
from pyflock.control.testing import NODE_A, NODE_B, APIHarness

A, B = NODE_A.node_uuid, NODE_B.node_uuid
C = "cccccccc-0000-4000-8000-000000000003"
DS = "11111111-2222-4333-8444-555555555555"
DATASETS = "/v1/configuration/datasets"


def state(**zones) -> ClusterState:
    """A cluster state whose nodes (``a``, ``b``, ``c``) are in the zones given."""
    uuids = {"a": A, "b": B, "c": C}
    result = ClusterState()
    for name, zone in zones.items():
        result = result.update_node(NodeState(uuid=uuids[name], host=name, last_seen=0.0,
                                              zone=zone))
    return result


def test_same_zone_or_unknown_zone_allowed():
    """A move within a zone, to the same node, or with either zone unknown is allowed."""
    check_same_zone(state(a="z-1a", b="z-1a"), DS, A, B)
    check_same_zone(state(a="z-1a"), DS, A, A)
    check_same_zone(state(a="z-1a", b=None), DS, A, B)
    check_same_zone(state(a=None, b="z-1b"), DS, A, B)
    check_same_zone(state(a="z-1a"), DS, A, C)


def test_other_zone_refused_naming_both():
    """A move between two known, different zones raises ``ZoneMismatch`` naming both."""
    try:
        check_same_zone(state(a="z-1a", b="z-1b"), DS, A, B)
    except ZoneMismatch as e:
        assert (e.source, e.source_zone, e.target, e.target_zone) == (A, "z-1a", B, "z-1b")
        assert e.description.startswith(
            f"Dataset {DS} is on node {A} in zone z-1a; node {B} is in zone z-1b, and an "
            f"EBS volume cannot move between zones")
    else:
        raise AssertionError("not refused")


class ZoneAPITests(SynchronousTestCase):
    """The REST API with node A in zone z-1a, B in z-1b and C (no zone)."""

    def setUp(self):
        self.h = APIHarness()
        self.h.report_node(A, "10.0.0.1", zone="z-1a")
        self.h.report_node(B, "10.0.0.2", zone="z-1b")
        self.h.report_node(C, "10.0.0.3")
        self.assertEqual(self.req("POST", DATASETS, {"dataset_id": DS, "primary": A}).code,
                         201)

    def req(self, *args, **kwargs):
        """One request through the harness (its answer checked against the document)."""
        return self.h.request(self, *args, **kwargs)

    def move(self, target, **body):
        """Ask to move the dataset to ``target``; the response."""
        return self.req("POST", f"{DATASETS}/{DS}", dict(body, primary=target))

    def test_nodes_show_their_zones(self):
        """``GET /v1/state/nodes`` gives each node's zone, null when it has none."""
        nodes = {n["uuid"]: n["zone"] for n in self.req("GET", "/v1/state/nodes").json}
        self.assertEqual({A: "z-1a", B: "z-1b", C: None}, nodes)

    def test_move_to_another_zone_refused(self):
        """A move to a node in another zone answers 409 naming both nodes and zones, with
        the zones in ``zones``; the dataset stays."""
        r = self.move(B)
        self.assertEqual(409, r.code)
        self.assertEqual({"source": "z-1a", "target": "z-1b"}, r.json["zones"])
        for fragment in (f"is on node {A} in zone z-1a", f"node {B} is in zone z-1b",
                         "cannot move between zones"):
            self.assertIn(fragment, r.json["description"])
        self.assertEqual(A, self.h.configuration.committed.datasets[DS].primary)

    def test_move_of_a_dead_nodes_dataset_refused(self):
        """A dead node's zone still counts: its volume is still in that zone."""
        self.h.report_node(A, "10.0.0.1", zone="z-1a", silent=3600)
        self.assertEqual(409, self.move(B).code)

    def test_move_within_the_zone_allowed(self):
        """A move to another node of the same zone is made."""
        self.h.report_node(B, "10.0.0.2", zone="z-1a")
        r = self.move(B)
        self.assertEqual((200, B), (r.code, r.json["primary"]))

    def test_move_with_a_zone_unknown_allowed(self):
        """A move to a node without a zone, or from one, is made as before."""
        r = self.move(C)
        self.assertEqual((200, C), (r.code, r.json["primary"]))
        self.assertEqual(200, self.move(B).code)

    def test_metadata_change_in_place_allowed(self):
        """Changing only the metadata (or naming the current primary) is no move."""
        r = self.req("POST", f"{DATASETS}/{DS}", {"metadata": {"name": "db"}})
        self.assertEqual(200, r.code)
        self.assertEqual(200, self.move(A, metadata={"name": "db2"}).code)

    def test_refused_move_changes_no_metadata(self):
        """A refused move with new metadata changes nothing."""
        self.assertEqual(409, self.move(B, metadata={"name": "db"}).code)
        self.assertIsNone(self.h.configuration.committed.datasets[DS].name)

    def test_create_in_any_zone_allowed(self):
        """A create has no volume yet to keep in a zone: made on any node."""
        r = self.req("POST", DATASETS, {"primary": B})
        self.assertEqual((201, B), (r.code, r.json["primary"]))

    def test_lease_refusal_comes_first(self):
        """A move refused by another node's lease names the holder, as before."""
        self.req("POST", "/v1/configuration/leases",
                 {"dataset_id": DS, "node_uuid": A, "expires": None})
        r = self.move(B)
        self.assertEqual((409, A), (r.code, r.json.get("holder")))
