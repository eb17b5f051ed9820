"""
The REST API in memory: Flocker's shapes and status codes, pyflock's safety rules, the
authorization of node certificates, and clear errors for bad input.
"""


from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._model import MINIMUM_SIZE
from pyflock.common._records import DatasetReport
from pyflock.control._clusterstate import ClusterState, NodeState
from pyflock.control.testing import ALICE, NODE_A, NODE_B, APIHarness

A = NODE_A.node_uuid
B = NODE_B.node_uuid
DS = "11111111-2222-4333-8444-555555555555"


class DatasetTests(SynchronousTestCase):
    """Creating, listing, moving and deleting datasets."""

    def setUp(self):
        self.h = APIHarness()

    def req(self, *args, **kwargs):
        return self.h.request(self, *args, **kwargs)

    def create(self, **body):
        body.setdefault("primary", A)
        return self.req("POST", "/v1/configuration/datasets", body)

    def test_version(self):
        """``/v1/version`` names the Flocker-compatible version."""
        r = self.req("GET", "/v1/version")
        self.assertEqual((r.code, r.json["flocker"]), (200, r.json["pyflock"]))

    def test_create_and_list(self):
        """A created dataset answers 201 with Flocker's fields and is then listed."""
        r = self.create(dataset_id=DS, maximum_size=MINIMUM_SIZE, metadata={"name": "db"})
        self.assertEqual((r.code, r.json), (201, {
            "dataset_id": DS, "primary": A, "maximum_size": MINIMUM_SIZE,
            "metadata": {"name": "db"}, "deleted": False}))
        listed = self.req("GET", "/v1/configuration/datasets")
        self.assertEqual(listed.json, [r.json])

    def test_create_generates_id(self):
        """Without ``dataset_id`` the service picks a fresh UUID."""
        first, second = self.create(), self.create()
        self.assertNotEqual(first.json["dataset_id"], second.json["dataset_id"])
        self.assertIsNone(first.json["maximum_size"])

    def test_create_is_durable_before_answer(self):
        """The answer comes after the store has the row."""
        self.create(dataset_id=DS)
        self.assertIn(DS, self.h.store.config.datasets)

    def test_uuid_case_normalised(self):
        """Upper-case UUIDs are accepted and stored lower-case."""
        r = self.create(dataset_id=DS.upper(), primary=A.upper())
        self.assertEqual((r.json["dataset_id"], r.json["primary"]), (DS, A))

    def test_duplicate_id(self):
        """Reusing a dataset id answers 409, as in Flocker."""
        self.create(dataset_id=DS)
        r = self.create(dataset_id=DS)
        self.assertEqual((r.code, r.json["description"]),
                         (409, "The provided dataset_id is already in use."))

    def test_duplicate_name(self):
        """A name taken by a live dataset answers 409 naming that dataset."""
        self.create(dataset_id=DS, metadata={"name": "db"})
        r = self.create(metadata={"name": "db"})
        self.assertEqual(r.code, 409)
        self.assertIn(DS, r.json["description"])
        self.assertNotIn("holder", r.json)

    def test_deleted_name_reusable(self):
        """The name of a deleted dataset can be used again at once."""
        self.create(dataset_id=DS, metadata={"name": "db"})
        self.req("DELETE", f"/v1/configuration/datasets/{DS}")
        self.assertEqual(self.create(metadata={"name": "db"}).code, 201)

    def test_move(self):
        """POST with a new primary moves the dataset."""
        self.create(dataset_id=DS)
        r = self.req("POST", f"/v1/configuration/datasets/{DS}", {"primary": B})
        self.assertEqual((r.code, r.json["primary"]), (200, B))
        self.assertEqual(self.h.store.config.datasets[DS].primary, B)

    def test_update_metadata(self):
        """POST with metadata replaces it; the name index follows."""
        self.create(dataset_id=DS, metadata={"name": "old"})
        r = self.req("POST", f"/v1/configuration/datasets/{DS}", {"metadata": {"name": "new"}})
        self.assertEqual(r.json["metadata"], {"name": "new"})
        self.assertEqual(self.create(metadata={"name": "old"}).code, 201)
        self.assertEqual(self.create(metadata={"name": "new"}).code, 409)

    def test_metadata_byte_limits(self):
        """Metadata over 8 KiB of UTF-8 (within Flocker's character limits) answers 400
        naming the limit, on create and update; 8 KiB exactly is taken (issue 8)."""
        full = {f"{i:03d}" + "k" * 253: "v" * 256 for i in range(16)}
        self.assertEqual(self.create(dataset_id=DS, metadata=full).code, 201)
        accented = {f"{i:03d}" + "é" * 253: "é" * 256 for i in range(16)}
        for r in [self.create(metadata=accented),
                  self.req("POST", f"/v1/configuration/datasets/{DS}",
                           {"metadata": accented})]:
            self.assertEqual(r.code, 400)
            self.assertIn("metadata must be at most 8192 bytes in UTF-8", r.json["errors"][0])
        self.assertEqual(dict(self.h.store.config.datasets[DS].metadata), full)

    def test_move_unknown(self):
        """Moving an unknown dataset answers 404."""
        r = self.req("POST", f"/v1/configuration/datasets/{DS}", {"primary": B})
        self.assertEqual((r.code, r.json), (404, {"description": "Dataset not found."}))

    def test_move_deleted(self):
        """Moving a deleted dataset answers 405, as in Flocker."""
        self.create(dataset_id=DS)
        self.req("DELETE", f"/v1/configuration/datasets/{DS}")
        r = self.req("POST", f"/v1/configuration/datasets/{DS}", {"primary": B})
        self.assertEqual((r.code, r.json), (405, {"description": "The dataset has been deleted."}))

    def test_delete_idempotent(self):
        """DELETE answers the dataset with ``deleted: true``, also the second time."""
        self.create(dataset_id=DS)
        first = self.req("DELETE", f"/v1/configuration/datasets/{DS}")
        second = self.req("DELETE", f"/v1/configuration/datasets/{DS}")
        self.assertEqual((first.code, first.json["deleted"]), (200, True))
        self.assertEqual(second.json, first.json)

    def test_delete_unknown(self):
        """DELETE of an unknown dataset answers 404."""
        self.assertEqual(self.req("DELETE", f"/v1/configuration/datasets/{DS}").code, 404)

    def test_deleted_unheld_not_listed(self):
        """With retention off, a deleted dataset that no node holds disappears from the
        list at once."""
        self.h = APIHarness(retention=0)
        self.create(dataset_id=DS)
        self.req("DELETE", f"/v1/configuration/datasets/{DS}")
        self.assertEqual(self.req("GET", "/v1/configuration/datasets").json, [])

    def test_deleted_held_listed(self):
        """A deleted dataset stays listed with ``deleted: true`` while a node holds it."""
        self.create(dataset_id=DS)
        self.h.cluster.update(ClusterState().update_node(NodeState(
            uuid=A, host="127.0.0.11", last_seen=self.h.clock.seconds(),
            datasets={DS: DatasetReport(DS, "mounted", "/mnt/x", node_uuid=A)})))
        self.req("DELETE", f"/v1/configuration/datasets/{DS}")
        listed = self.req("GET", "/v1/configuration/datasets").json
        self.assertEqual([(d["dataset_id"], d["deleted"]) for d in listed], [(DS, True)])


class TagTests(SynchronousTestCase):
    """The configuration tag and compare-and-swap."""

    def setUp(self):
        self.h = APIHarness()

    def req(self, *args, **kwargs):
        return self.h.request(self, *args, **kwargs)

    def tag(self):
        return self.req("GET", "/v1/configuration/datasets").headers["x-configuration-tag"]

    def test_tag_changes_with_datasets(self):
        """Create, move and delete each change the tag."""
        tags = [self.tag()]
        self.req("POST", "/v1/configuration/datasets", {"primary": A, "dataset_id": DS})
        tags.append(self.tag())
        self.req("POST", f"/v1/configuration/datasets/{DS}", {"primary": B})
        tags.append(self.tag())
        self.req("DELETE", f"/v1/configuration/datasets/{DS}")
        tags.append(self.tag())
        self.assertEqual(len(set(tags)), 4)

    def test_tag_unchanged_by_leases(self):
        """Taking and renewing a lease leaves the tag alone."""
        self.req("POST", "/v1/configuration/datasets", {"primary": A, "dataset_id": DS})
        before = self.tag()
        for _ in range(2):
            self.req("POST", "/v1/configuration/leases",
                     {"dataset_id": DS, "node_uuid": A, "expires": 60})
        self.assertEqual(self.tag(), before)

    def test_stale_tag(self):
        """A stale ``X-If-Configuration-Matches`` answers 412 and changes nothing."""
        self.req("POST", "/v1/configuration/datasets", {"primary": A, "dataset_id": DS})
        stale = self.tag()
        self.req("POST", "/v1/configuration/datasets", {"primary": A})
        before = self.h.store.config
        for method, path, body in [
                ("POST", "/v1/configuration/datasets", {"primary": A}),
                ("POST", f"/v1/configuration/datasets/{DS}", {"primary": B}),
                ("DELETE", f"/v1/configuration/datasets/{DS}", None)]:
            r = self.req(method, path, body, headers={"X-If-Configuration-Matches": stale})
            self.assertEqual(r.code, 412, (method, path))
        self.assertEqual(self.h.store.config, before)

    def test_current_tag(self):
        """A current tag lets the change through."""
        r = self.req("POST", "/v1/configuration/datasets", {"primary": A},
                     headers={"X-If-Configuration-Matches": self.tag()})
        self.assertEqual(r.code, 201)


class LeaseTests(SynchronousTestCase):
    """Leases: acquire, renew, release, expiry, and what they forbid."""

    def setUp(self):
        self.h = APIHarness()
        self.h.request(self, "POST", "/v1/configuration/datasets", {"primary": A, "dataset_id": DS})

    def req(self, *args, **kwargs):
        return self.h.request(self, *args, **kwargs)

    def acquire(self, node, expires=60, identity=ALICE):
        return self.req("POST", "/v1/configuration/leases",
                        {"dataset_id": DS, "node_uuid": node, "expires": expires},
                        identity=identity)

    def test_acquire_renew(self):
        """A new lease answers 201, a renewal 200, with seconds left."""
        first = self.acquire(A)
        self.h.clock.advance(10)
        second = self.acquire(A, expires=30)
        self.assertEqual((first.code, second.code), (201, 200))
        self.assertEqual(second.json, {"dataset_id": DS, "node_uuid": A, "expires": 30.0})

    def test_held_by_other(self):
        """Another node's lease answers 409 naming the holder."""
        self.acquire(A)
        r = self.acquire(B)
        self.assertEqual(r.code, 409)
        self.assertIn(A, r.json["description"])
        self.assertEqual(r.json["holder"], A)

    def test_expiry(self):
        """An expired lease is gone from the list and no longer blocks others."""
        self.acquire(A, expires=5)
        self.h.clock.advance(6)
        self.assertEqual(self.req("GET", "/v1/configuration/leases").json, [])
        self.assertEqual(self.acquire(B).code, 201)

    def test_never_expires(self):
        """``expires: null`` makes a lease that does not run out."""
        self.acquire(A, expires=None)
        self.h.clock.advance(10**6)
        self.assertEqual(self.req("GET", "/v1/configuration/leases").json,
                         [{"dataset_id": DS, "node_uuid": A, "expires": None}])

    def test_release(self):
        """DELETE releases the lease; a second DELETE answers 404."""
        self.acquire(A)
        self.assertEqual(self.req("DELETE", f"/v1/configuration/leases/{DS}").code, 200)
        r = self.req("DELETE", f"/v1/configuration/leases/{DS}")
        self.assertEqual((r.code, r.json), (404, {"description": "Lease not found."}))

    def test_lease_unknown_dataset(self):
        """A lease on an unknown dataset answers 404."""
        r = self.req("POST", "/v1/configuration/leases",
                     {"dataset_id": B, "node_uuid": A, "expires": 1})
        self.assertEqual(r.code, 404)

    def test_delete_leased(self):
        """Deleting a leased dataset answers 409 naming the holder and keeps it."""
        self.acquire(B)
        r = self.req("DELETE", f"/v1/configuration/datasets/{DS}")
        self.assertEqual(r.code, 409)
        self.assertIn(B, r.json["description"])
        self.assertEqual(r.json["holder"], B)
        self.assertFalse(self.h.store.config.datasets[DS].deleted)

    def test_move_leased(self):
        """A leased dataset moves only to the lease holder."""
        self.acquire(A)
        other = "cccccccc-0000-4000-8000-000000000003"
        refused = self.req("POST", f"/v1/configuration/datasets/{DS}", {"primary": other})
        self.assertEqual((refused.code, refused.json["holder"]), (409, A))
        self.acquire(A, expires=None)
        self.req("DELETE", f"/v1/configuration/leases/{DS}")
        self.acquire(B)
        self.assertEqual(self.req("POST", f"/v1/configuration/datasets/{DS}",
                                  {"primary": B}).code, 200)

    def test_lease_expiry_service(self):
        """The expiry loop removes run-out leases from the store."""
        self.acquire(A, expires=2)
        self.h.configuration.start_lease_expiry(1.0)
        self.h.clock.advance(3)
        self.h.configuration.stop()
        self.assertEqual(dict(self.h.store.config.leases), {})


class NodeAuthorizationTests(SynchronousTestCase):
    """Node certificates read everything and act only for their own node."""

    def setUp(self):
        self.h = APIHarness()
        self.h.request(self, "POST", "/v1/configuration/datasets", {"primary": A, "dataset_id": DS})

    def req(self, *args, identity=NODE_B, **kwargs):
        return self.h.request(self, *args, identity=identity, **kwargs)

    def test_reads(self):
        """A node may read configuration, state and leases."""
        for path in ["/v1/version", "/v1/configuration/datasets", "/v1/state/datasets",
                     "/v1/state/nodes", "/v1/configuration/leases"]:
            self.assertEqual(self.req("GET", path).code, 200, path)

    def test_create_for_itself_only(self):
        """A node may create datasets with itself as primary, not for another node."""
        self.assertEqual(self.req("POST", "/v1/configuration/datasets", {"primary": B}).code, 201)
        r = self.req("POST", "/v1/configuration/datasets", {"primary": A})
        self.assertEqual(r.code, 403)
        self.assertIn(B, r.json["description"])

    def test_move_to_itself_only(self):
        """A node may move a dataset to itself but not away from itself to another."""
        other = "cccccccc-0000-4000-8000-000000000003"
        self.assertEqual(self.req("POST", f"/v1/configuration/datasets/{DS}",
                                  {"primary": other}).code, 403)
        self.assertEqual(self.req("POST", f"/v1/configuration/datasets/{DS}",
                                  {"primary": B}).code, 200)
        self.assertEqual(self.req("POST", f"/v1/configuration/datasets/{DS}",
                                  {"primary": other}).code, 403)

    def test_metadata_only_of_own(self):
        """A node may not change the metadata of a dataset another node holds."""
        self.assertEqual(self.req("POST", f"/v1/configuration/datasets/{DS}",
                                  {"metadata": {"x": "y"}}).code, 403)

    def test_leases_only_own(self):
        """A node takes and releases only its own leases."""
        body = {"dataset_id": DS, "node_uuid": A, "expires": 10}
        self.assertEqual(self.req("POST", "/v1/configuration/leases", body).code, 403)
        self.assertEqual(self.req("POST", "/v1/configuration/leases", body, identity=NODE_A).code, 201)
        self.assertEqual(self.req("DELETE", f"/v1/configuration/leases/{DS}").code, 403)
        self.assertEqual(self.req("DELETE", f"/v1/configuration/leases/{DS}", identity=NODE_A).code, 200)

    def test_delete_only_held_unleased(self):
        """A node deletes only datasets it is primary of and no other node leases."""
        self.assertEqual(self.req("DELETE", f"/v1/configuration/datasets/{DS}").code, 403)
        self.req("POST", "/v1/configuration/leases",
                 {"dataset_id": DS, "node_uuid": B, "expires": 10}, identity=NODE_B)
        self.assertEqual(self.req("DELETE", f"/v1/configuration/datasets/{DS}",
                                  identity=NODE_A).code, 409)
        self.req("DELETE", f"/v1/configuration/leases/{DS}", identity=NODE_B)
        self.req("POST", "/v1/configuration/leases",
                 {"dataset_id": DS, "node_uuid": A, "expires": 10}, identity=NODE_A)
        r = self.req("DELETE", f"/v1/configuration/datasets/{DS}", identity=NODE_A)
        self.assertEqual((r.code, r.json["deleted"]), (200, True))
        self.assertEqual(dict(self.h.store.config.leases), {})

    def test_no_identity(self):
        """A caller without a user or node identity is refused with 403."""
        r = self.req("GET", "/v1/configuration/datasets", identity=None)
        self.assertEqual(r.code, 403)


class BadInputTests(SynchronousTestCase):
    """Malformed requests answer 400 (or JSON 404/405) and change nothing."""

    def setUp(self):
        self.h = APIHarness()

    def req(self, *args, **kwargs):
        return self.h.request(self, *args, **kwargs)

    def assertRefused(self, response, code=400):
        self.assertEqual(response.code, code, response.json)
        self.assertIsInstance(response.json["description"], str)
        self.assertEqual(dict(self.h.store.config.datasets), {})

    def test_bad_json(self):
        """A body that is not JSON answers 400 saying so."""
        r = self.req("POST", "/v1/configuration/datasets", raw=b"{nope")
        self.assertRefused(r)
        self.assertIn("not valid JSON", r.json["description"])

    def test_schema_errors(self):
        """Each schema violation answers 400 with the list of errors."""
        for body in [{}, [], "x", {"primary": "not-a-uuid"}, {"primary": A, "extra": 1},
                     {"primary": A, "maximum_size": 1024},
                     {"primary": A, "maximum_size": MINIMUM_SIZE + 1},
                     {"primary": A, "maximum_size": "10G"},
                     {"primary": A, "metadata": {"k": 1}},
                     {"primary": A, "metadata": {"k": "v" * 257}},
                     {"primary": A, "metadata": {"k" * 257: "v"}},
                     {"primary": A, "metadata": {str(i): "v" for i in range(17)}},
                     {"primary": A, "dataset_id": "x" * 36}]:
            r = self.req("POST", "/v1/configuration/datasets", body)
            self.assertRefused(r)
            self.assertTrue(r.json["errors"], body)

    def test_bad_path_id(self):
        """A malformed dataset id in the path answers 400."""
        for method in ["POST", "DELETE"]:
            self.assertRefused(self.req(method, "/v1/configuration/datasets/nope", {"primary": A}))
        self.assertRefused(self.req("DELETE", "/v1/configuration/leases/nope"))

    def test_bad_lease(self):
        """A lease with a negative or textual expiry answers 400."""
        for expires in [-1, "soon"]:
            self.assertRefused(self.req("POST", "/v1/configuration/leases",
                                        {"dataset_id": DS, "node_uuid": A, "expires": expires}))

    def test_unknown_route_and_method(self):
        """Unknown routes answer JSON 404, wrong methods JSON 405."""
        self.assertRefused(self.req("GET", "/v1/nope"), 404)
        self.assertRefused(self.req("PUT", "/v1/configuration/datasets", {}), 405)

    @settings(max_examples=150, deadline=None)
    @given(body=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=40),
                             lambda c: st.lists(c, max_size=4) |
                             st.dictionaries(st.sampled_from(["primary", "dataset_id", "metadata",
                                                              "maximum_size", "x"]), c, max_size=4)))
    def test_fuzz_never_500(self, body):
        """Arbitrary JSON bodies never make a 500, and never a change unless valid."""
        r = self.req("POST", "/v1/configuration/datasets", body)
        self.assertIn(r.code, (201, 400))


class StateTests(SynchronousTestCase):
    """The state API shows what live nodes report."""

    def setUp(self):
        self.h = APIHarness()
        now = self.h.clock.seconds()
        self.h.cluster.update(ClusterState()
            .update_node(NodeState(uuid=A, host="127.0.0.11", era="era-a", last_seen=now,
                                   datasets={DS: DatasetReport(DS, "mounted", "/m/x",
                                                               node_uuid=A)}))
            .update_node(NodeState(uuid=B, host="127.0.0.12", era="era-b", last_seen=now - 60)))

    def req(self, *args, **kwargs):
        return self.h.request(self, *args, **kwargs)

    def test_nodes(self):
        """Nodes are listed with whether they are alive and when they were last heard."""
        nodes = {n["uuid"]: n for n in self.req("GET", "/v1/state/nodes").json}
        self.assertEqual((nodes[A]["alive"], nodes[B]["alive"]), (True, False))
        self.assertEqual(nodes[B]["last_seen"], 60.0)

    def test_datasets(self):
        """Mounted datasets of live nodes carry their path."""
        self.assertEqual(self.req("GET", "/v1/state/datasets").json, [
            {"dataset_id": DS, "primary": A, "maximum_size": None, "path": "/m/x",
             "state": "mounted"}])

    def test_by_era(self):
        """A node is found by its era; an unknown era answers 404."""
        self.assertEqual(self.req("GET", "/v1/state/nodes/by_era/era-a").json, {"uuid": A})
        self.assertEqual(self.req("GET", "/v1/state/nodes/by_era/zzz").code, 404)


class LogEventTests(SynchronousTestCase):
    """Each change to the configuration logs one structured event with its ids."""

    def test_events(self):
        """Create, move, lease, release, delete and a refusal each log their event type."""
        from twisted.logger import capturedLogs
        h = APIHarness()
        with capturedLogs() as events:
            h.request(self, "POST", "/v1/configuration/datasets", {"primary": A, "dataset_id": DS})
            h.request(self, "POST", f"/v1/configuration/datasets/{DS}", {"primary": B})
            h.request(self, "POST", "/v1/configuration/leases",
                      {"dataset_id": DS, "node_uuid": B, "expires": 10})
            h.request(self, "POST", "/v1/configuration/leases",
                      {"dataset_id": DS, "node_uuid": B, "expires": 10})
            h.request(self, "DELETE", f"/v1/configuration/leases/{DS}")
            h.request(self, "POST", "/v1/configuration/datasets", {"primary": A}, identity=NODE_B)
            h.request(self, "DELETE", f"/v1/configuration/datasets/{DS}")
        logged = [(e["event_type"], e.get("dataset_id")) for e in events if "event_type" in e]
        self.assertEqual([
            ("pyflock:control:dataset-created", DS), ("pyflock:control:dataset-moved", DS),
            ("pyflock:control:lease-acquired", DS), ("pyflock:control:lease-renewed", DS),
            ("pyflock:control:lease-released", DS), ("pyflock:control:request-refused", None),
            ("pyflock:control:dataset-deleted", DS)], logged)
        moved = [e for e in events if e.get("event_type") == "pyflock:control:dataset-moved"][0]
        self.assertEqual((moved["source"], moved["target"]), (A, B))


class BadURLTests(SynchronousTestCase):
    """A URL that is not UTF-8 gets a JSON 400, not the framework's plain text."""

    def test_non_utf8_path(self):
        """Percent-encoded bytes that are not UTF-8 answer 400 with a description."""
        h = APIHarness()
        for method, path in [("GET", "/v1/state/nodes/by_era/%FF"),
                             ("DELETE", "/v1/configuration/datasets/%FF")]:
            r = h.request(self, method, path)
            self.assertEqual(r.code, 400)
            self.assertIn("not valid UTF-8", r.json["description"])
