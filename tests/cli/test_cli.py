"""
Tests for the ``pyflock`` command line: its command core run against the control
service's real REST API in memory (``pyflock.control.testing.APIHarness``, so it cannot
drift from the server), its configuration precedence, its errors, and once as a real
process.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent

from pyflock.common._client import ControlClient, IControlClient
from pyflock.common._model import Configuration, Dataset
from pyflock.common._records import DatasetReport, Transfer
from pyflock.control.testing import APIHarness
from pyflock.cli._cli import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, run
from pyflock.cli._output import format_table, short_ids
from pyflock.cli._settings import Settings, default_client_factory

GiB = 1024 ** 3

NODE_1 = "11111111-aaaa-4aaa-8aaa-000000000001"
NODE_2 = "22222222-bbbb-4bbb-8bbb-000000000002"
NODE_3 = "22223333-cccc-4ccc-8ccc-000000000003"
UNKNOWN_NODE = "99999999-dddd-4ddd-8ddd-000000000009"
PGDATA = "aaaa1111-0000-4000-8000-000000000001"
WEB = "aaaa2222-0000-4000-8000-000000000002"
UNNAMED = "bbbb0000-0000-4000-8000-000000000003"
GONE = "cccc0000-0000-4000-8000-000000000004"


def _cluster(testcase) -> APIHarness:
    """
    The control service in memory with three nodes (one dead), four datasets (one deleted,
    held by the dead node), one mounted and one leased for 42 s.
    """
    harness = APIHarness()

    def call(method, path, body=None):
        response = harness.request(testcase, method, path, body)
        testcase.assertIn(response.code, (200, 201), response)

    for dataset_id, primary, name, size in ((PGDATA, NODE_1, "pgdata", 10 * GiB),
                                            (WEB, NODE_2, "web", None),
                                            (UNNAMED, NODE_1, None, 3 * GiB // 2),
                                            (GONE, NODE_2, "old", None)):
        body = {"dataset_id": dataset_id, "primary": primary}
        if name is not None:
            body["metadata"] = {"name": name}
        if size is not None:
            body["maximum_size"] = size
        call("POST", "/v1/configuration/datasets", body)
    call("DELETE", f"/v1/configuration/datasets/{GONE}")
    call("POST", "/v1/configuration/leases",
         {"dataset_id": UNNAMED, "node_uuid": NODE_1, "expires": 42})
    harness.report_node(NODE_1, "10.0.0.1", [
        DatasetReport(dataset_id=PGDATA, maximum_size=10 * GiB,
                     path=f"/var/lib/pyflock/mounts/{PGDATA}", state="mounted"),
        DatasetReport(dataset_id=UNNAMED, maximum_size=3 * GiB // 2, state="attaching"),
    ], silent=1.25)
    harness.report_node(NODE_2, "10.0.0.2", silent=3)
    harness.report_node(NODE_3, "10.0.0.2", [DatasetReport(dataset_id=GONE)], silent=125)
    return harness


def _temporary_folder(testcase) -> Path:
    """A new empty folder, removed when ``testcase`` ends."""
    folder = Path(tempfile.mkdtemp(prefix="pyflock-cli-"))
    testcase.addCleanup(shutil.rmtree, folder, True)
    return folder


class CLITestCase(SynchronousTestCase):
    """
    Runs the CLI's core against ``self.harness`` (the real REST API in memory) and
    records the settings it used.
    """

    def setUp(self):
        self.harness = _cluster(self)
        self.home = _temporary_folder(self)
        self.settings: list[Settings] = []

    def client_factory(self, settings: Settings) -> IControlClient:
        """A client of ``self.harness`` as the API user alice."""
        self.settings.append(settings)
        return self.harness.client()

    @property
    def configuration(self) -> Configuration:
        """The control service's committed configuration."""
        return self.harness.configuration.committed

    def only_new_dataset(self, before: Configuration) -> Dataset:
        """The one dataset configured since ``before``."""
        [dataset_id] = set(self.configuration.datasets) - set(before.datasets)
        return self.configuration.datasets[dataset_id]

    def cli(self, *argv, env=None, factory=None):
        """Run ``pyflock argv``; (exit status, stdout, stderr)."""
        if env is None:
            env = {"PYFLOCK_CONTROL_SERVICE": "control.example", "PYFLOCK_USER": "alice",
                   "HOME": str(self.home)}
        stdout, stderr = io.StringIO(), io.StringIO()
        code = self.successResultOf(run(list(argv), factory or self.client_factory,
                                        stdout, stderr, env))
        return code, stdout.getvalue(), stderr.getvalue()

    def assertOneLineError(self, result, code, *fragments):
        """``result`` failed with ``code`` and one line on stderr holding ``fragments``."""
        status, out, err = result
        self.assertEqual((code, ""), (status, out), err)
        self.assertEqual(1, err.count("\n"), err)
        self.assertTrue(err.endswith("\n"))
        self.assertNotIn("Traceback", err)
        for fragment in fragments:
            self.assertIn(fragment, err)
        return err


class ReadTests(CLITestCase):
    """Listing commands print aligned tables, or JSON with the API's fields."""

    def test_version(self):
        """``version`` shows the client's and the service's versions."""
        code, out, err = self.cli("version")
        self.assertEqual((EXIT_OK, ""), (code, err))
        self.assertIn("control service: pyflock 0.1.0 (API version 0.1.0)", out)
        self.assertTrue(out.startswith("client:          pyflock "))

    def test_version_option(self):
        """``--version`` prints this CLI's installed version and asks the service nothing."""
        from importlib.metadata import version
        code, out, err = self.cli("--version")
        self.assertEqual((EXIT_OK, f"pyflock {version('pyflock')}\n", ""), (code, out, err))
        self.assertEqual([], self.settings)

    def test_version_json(self):
        """``version --json`` prints the API's object plus the client's version."""
        code, out, _ = self.cli("version", "--json")
        value = json.loads(out)
        self.assertEqual(("0.1.0", "0.1.0"), (value["flocker"], value["pyflock"]))
        self.assertIn("client", value)

    def test_list(self):
        """``list`` shows live datasets by name with size, node, state, lease and path."""
        code, out, err = self.cli("list")
        self.assertEqual((EXIT_OK, ""), (code, err))
        self.assertEqual(
            "DATASET   NAME    SIZE  PRIMARY              STATE      LEASE                    "
            "PATH\n"
            "aaaa1111  pgdata  10G   11111111 (10.0.0.1)  mounted    -                        "
            f"/var/lib/pyflock/mounts/{PGDATA}\n"
            "aaaa2222  web     -     22222222 (10.0.0.2)  pending    -                        "
            "-\n"
            "bbbb0000  -       1.5G  11111111 (10.0.0.1)  attaching  11111111 (10.0.0.1) 42s  "
            "-\n",
            out)

    def test_list_all(self):
        """``list --all`` also shows deleted datasets, marked deleted."""
        _, out, _ = self.cli("list", "--all")
        self.assertIn("cccc0000  old", out)
        self.assertIn("deleted", out.splitlines()[-1])
        _, out, _ = self.cli("list")
        self.assertNotIn("cccc0000", out)

    def test_list_json(self):
        """``list --json`` gives the API's dataset fields plus state, path and lease."""
        _, out, _ = self.cli("list", "--json")
        value = json.loads(out)
        self.assertEqual([PGDATA, WEB, UNNAMED], [d["dataset_id"] for d in value])
        self.assertEqual({"dataset_id": PGDATA, "primary": NODE_1, "maximum_size": 10 * GiB,
                          "metadata": {"name": "pgdata"}, "deleted": False,
                          "state": "mounted", "path": f"/var/lib/pyflock/mounts/{PGDATA}",
                          "lease": None}, value[0])
        self.assertEqual({"node_uuid": NODE_1, "expires": 42.0}, value[2]["lease"])

    def test_list_empty(self):
        """With no datasets, ``list`` prints only the header."""
        self.harness = APIHarness()
        _, out, _ = self.cli("list")
        self.assertEqual("DATASET  NAME  SIZE  PRIMARY  STATE  LEASE  PATH\n", out)

    def test_list_moving(self):
        """A dataset reported only on a node other than its primary shows as moving."""
        self.harness.report_node(NODE_1, "10.0.0.1", [
            DatasetReport(dataset_id=WEB, state="mounted", path="/x")])
        _, out, _ = self.cli("list")
        web = [line for line in out.splitlines() if " web " in line][0]
        self.assertEqual(["aaaa2222", "web", "-", "22222222", "(10.0.0.2)", "moving", "-",
                          "-"], web.split())

    def test_list_nodes(self):
        """``list-nodes`` shows each node's short id, address, liveness and datasets."""
        code, out, err = self.cli("list-nodes")
        self.assertEqual((EXIT_OK, ""), (code, err))
        self.assertEqual(
            "NODE      ADDRESS   ALIVE  LAST SEEN  DATASETS\n"
            "11111111  10.0.0.1  yes    1s ago     2\n"
            "22222222  10.0.0.2  yes    3s ago     1\n"
            "22223333  10.0.0.2  no     2m05s ago  0\n", out)

    def test_list_nodes_json(self):
        """``list-nodes --json`` gives the API's node objects."""
        _, out, _ = self.cli("list-nodes", "--json")
        self.assertEqual([
            {"uuid": NODE_1, "host": "10.0.0.1", "alive": True, "last_seen": 1.25,
             "zone": None},
            {"uuid": NODE_2, "host": "10.0.0.2", "alive": True, "last_seen": 3, "zone": None},
            {"uuid": NODE_3, "host": "10.0.0.2", "alive": False, "last_seen": 125,
             "zone": None},
        ], sorted(json.loads(out), key=lambda n: n["uuid"]))

    def test_leases_list(self):
        """``leases list`` shows each lease's dataset, name, node and time left."""
        code, out, err = self.cli("leases", "list")
        self.assertEqual((EXIT_OK, ""), (code, err))
        self.assertEqual("DATASET   NAME  NODE                 EXPIRES\n"
                         "bbbb0000  -     11111111 (10.0.0.1)  in 42s\n", out)

    def test_leases_list_json(self):
        """``leases list --json`` gives the API's lease objects."""
        _, out, _ = self.cli("leases", "list", "--json")
        self.assertEqual([{"dataset_id": UNNAMED, "node_uuid": NODE_1, "expires": 42.0}],
                         json.loads(out))


class ChangeTests(CLITestCase):
    """Commands that change the configuration make the change asked for and say what
    happened."""

    def test_create(self):
        """``create`` configures the node, size in bytes and metadata, and names the new
        dataset."""
        before = self.configuration
        code, out, err = self.cli("create", "--node", "10.0.0.1", "--size", "10G",
                                  "--metadata", "profile=gold,team=db", "--name", "pg2")
        self.assertEqual((EXIT_OK, ""), (code, err))
        dataset = self.only_new_dataset(before)
        self.assertEqual((NODE_1, 10 * GiB, {"profile": "gold", "team": "db", "name": "pg2"}),
                         (dataset.primary, dataset.maximum_size, dict(dataset.metadata)))
        self.assertEqual(f"Created dataset {dataset.dataset_id} (pg2), 10G, "
                         "on node 11111111 (10.0.0.1).\n", out)

    def test_create_minimal_json(self):
        """``create --json`` without size or metadata prints the API's dataset object."""
        before = self.configuration
        code, out, _ = self.cli("create", "--node", "1111", "--json")
        self.assertEqual(EXIT_OK, code)
        dataset = self.only_new_dataset(before)
        self.assertEqual({"dataset_id": dataset.dataset_id,
                          "primary": NODE_1, "maximum_size": None, "metadata": {},
                          "deleted": False}, json.loads(out))

    def test_create_size_rounded(self):
        """A size that is not whole KiB is rounded up to whole KiB before it is sent."""
        before = self.configuration
        self.cli("create", "--node", NODE_1, "--size", "100000001")
        self.assertEqual(100000768, self.only_new_dataset(before).maximum_size)

    def test_create_on_unknown_uuid(self):
        """A full node uuid is accepted even before that node has reported."""
        before = self.configuration
        code, _, _ = self.cli("create", "--node", UNKNOWN_NODE)
        self.assertEqual(EXIT_OK, code)
        self.assertEqual(UNKNOWN_NODE, self.only_new_dataset(before).primary)

    def test_create_name_taken(self):
        """A taken name is refused by the service; its reason is shown on one line."""
        self.assertOneLineError(self.cli("create", "--node", NODE_1, "--name", "pgdata"),
                                EXIT_FAILED, "pyflock: error: The name 'pgdata' is "
                                             f"already used by dataset {PGDATA};")

    def test_create_bad_size(self):
        """An unreadable size is a usage error showing sizes that work."""
        self.assertOneLineError(self.cli("create", "--node", NODE_1, "--size", "10X"),
                                EXIT_USAGE, "pyflock create: error: argument --size: not a "
                                            "size: '10X'", "10G", "500M")

    def test_create_small_size(self):
        """A size below the 64 MiB minimum is refused before asking the service."""
        self.assertOneLineError(self.cli("create", "--node", NODE_1, "--size", "10M"),
                                EXIT_USAGE, "10M is below the smallest dataset size, 64M")
        self.assertEqual([], self.settings)

    def test_create_bad_metadata(self):
        """Metadata that is not KEY=VALUE is a usage error saying how to write it."""
        self.assertOneLineError(self.cli("create", "--node", NODE_1, "--metadata", "x"),
                                EXIT_USAGE, "'x' is not KEY=VALUE")

    def test_create_name_disagrees(self):
        """``--name`` and a different ``--metadata name=`` are refused; nothing changes."""
        before = self.configuration
        self.assertOneLineError(
            self.cli("create", "--node", NODE_1, "--name", "a", "--metadata", "name=b"),
            EXIT_USAGE, "--name 'a' and --metadata name='b' disagree")
        self.assertIs(before, self.configuration)

    def test_create_unknown_node(self):
        """A node nothing matches is refused naming what was given."""
        self.assertOneLineError(self.cli("create", "--node", "10.9.9.9"), EXIT_FAILED,
                                "no node has the uuid, uuid prefix or address '10.9.9.9'")

    def test_create_ambiguous_address(self):
        """An address shared by two nodes is refused, listing both."""
        self.assertOneLineError(self.cli("create", "--node", "10.0.0.2"), EXIT_FAILED,
                                "'10.0.0.2' is the address of 2 nodes", NODE_2, NODE_3)

    def test_create_ambiguous_prefix(self):
        """A uuid prefix shared by two nodes is refused, listing both."""
        self.assertOneLineError(self.cli("create", "--node", "2222"), EXIT_FAILED,
                                "'2222' is the uuid prefix of 2 nodes", NODE_2, NODE_3)

    def test_move_by_name(self):
        """``move NAME --to NODE`` moves the named dataset and says from where to where."""
        code, out, err = self.cli("move", "pgdata", "--to", "22222")
        self.assertEqual((EXIT_OK, ""), (code, err))
        self.assertEqual(NODE_2, self.configuration.datasets[PGDATA].primary)
        self.assertEqual(f"Moving dataset {PGDATA} (pgdata) from node 11111111 (10.0.0.1) "
                         "to node 22222222 (10.0.0.2).\n", out)

    def test_move_by_prefix_json(self):
        """A unique id prefix names a dataset; ``--json`` prints the moved dataset."""
        code, out, _ = self.cli("move", "bbbb", "--to", NODE_1, "--json")
        self.assertEqual(EXIT_OK, code)
        self.assertEqual((UNNAMED, NODE_1), (json.loads(out)["dataset_id"],
                                             json.loads(out)["primary"]))

    def test_move_wait_shows_progress(self):
        """``move --wait`` reports each change of the dataset's states until it is
        mounted on the target alone, paced by the clock."""
        clock = Clock()
        self.harness.report_node(NODE_1, "10.0.0.1",
                                 [DatasetReport(dataset_id=PGDATA, state="moving")])
        stdout, stderr = io.StringIO(), io.StringIO()
        env = {"PYFLOCK_CONTROL_SERVICE": "control.example", "PYFLOCK_USER": "alice",
               "HOME": str(self.home)}
        d = run(["move", "pgdata", "--to", NODE_2, "--wait"], self.client_factory, stdout,
                stderr, env, clock)
        self.assertNoResult(d)
        clock.advance(0.1)
        # A peer-to-peer move: the sending node reports its progress.
        self.harness.report_node(NODE_1, "10.0.0.1", [DatasetReport(
            dataset_id=PGDATA, state="moving", transfer=Transfer(3 * 2 ** 19, 2 ** 22))])
        clock.advance(0.1)
        self.harness.report_node(NODE_1, "10.0.0.1")
        self.harness.report_node(NODE_2, "10.0.0.2",
                                 [DatasetReport(dataset_id=PGDATA, state="attaching")])
        clock.advance(0.1)
        self.harness.report_node(NODE_2, "10.0.0.2", [
            DatasetReport(dataset_id=PGDATA, state="mounted", path="/m/x")])
        self.assertNoResult(d)
        clock.advance(0.1)
        self.assertEqual(EXIT_OK, self.successResultOf(d), stderr.getvalue())
        lines = stdout.getvalue().splitlines()
        self.assertEqual(["moving on 11111111 (10.0.0.1)",
                          "moving on 11111111 (10.0.0.1) (1.5 of 4.0 MiB sent, 37%)",
                          "attaching on 22222222 (10.0.0.2)",
                          "mounted on 22222222 (10.0.0.2)"],
                         [line.split("s  ", 1)[1] for line in lines[1:5]])
        self.assertEqual("Mounted on node 22222222 (10.0.0.2) at /m/x after 0.4s.", lines[5])

    def test_move_wait_timeout(self):
        """``move --wait --timeout`` gives up with one line saying where the dataset is."""
        clock = Clock()
        stdout, stderr = io.StringIO(), io.StringIO()
        env = {"PYFLOCK_CONTROL_SERVICE": "control.example", "PYFLOCK_USER": "alice",
               "HOME": str(self.home)}
        d = run(["move", "pgdata", "--to", NODE_2, "--wait", "--timeout", "1"],
                self.client_factory, stdout, stderr, env, clock)
        clock.pump([0.1] * 12)
        self.assertEqual(EXIT_FAILED, self.successResultOf(d))
        self.assertIn("did not finish within 1s (now: mounted on 11111111 (10.0.0.1))",
                      stderr.getvalue())

    def test_move_already_there(self):
        """Moving a dataset to the node it is on says so."""
        _, out, _ = self.cli("move", PGDATA, "--to", NODE_1)
        self.assertEqual(f"Dataset {PGDATA} (pgdata) is already on node 11111111 "
                         "(10.0.0.1).\n", out)

    def test_move_ambiguous(self):
        """A prefix of two datasets' ids is refused, listing both with their names."""
        before = self.configuration
        err = self.assertOneLineError(self.cli("move", "aaaa", "--to", NODE_2), EXIT_FAILED,
                                      "'aaaa' matches 2 datasets:", f"{PGDATA} (pgdata)",
                                      f"{WEB} (web)")
        self.assertIn("give more of the id", err)
        self.assertIs(before, self.configuration)

    def test_move_leased_elsewhere(self):
        """A move refused because another node holds the lease names that node."""
        self.assertOneLineError(self.cli("move", "bbbb", "--to", NODE_2), EXIT_FAILED,
                                f"Lease already held by node {NODE_1}:")

    def test_move_unknown_dataset(self):
        """A dataset nothing matches is refused, pointing at ``pyflock list``."""
        self.assertOneLineError(self.cli("move", "nope", "--to", NODE_2), EXIT_FAILED,
                                "no dataset has the id, id prefix or name 'nope'",
                                "'pyflock list'")

    def test_move_unknown_uuid(self):
        """A full uuid is passed to the service as is, which answers it is not found."""
        self.assertOneLineError(self.cli("move", UNKNOWN_NODE, "--to", NODE_2), EXIT_FAILED,
                                "pyflock: error: Dataset not found.")

    def test_deleted_name_not_matched(self):
        """A deleted dataset's name no longer names it."""
        self.assertOneLineError(self.cli("destroy", "old"), EXIT_FAILED,
                                "no dataset has the id, id prefix or name 'old'")

    def test_destroy(self):
        """``destroy --now NAME`` deletes that dataset, its data at once, and says so."""
        code, out, err = self.cli("destroy", "--now", "web")
        self.assertEqual((EXIT_OK, ""), (code, err))
        self.assertEqual(f"Deleted dataset {WEB} (web); its node removes the data.\n", out)
        self.assertTrue(self.configuration.datasets[WEB].purging)

    def test_destroy_json(self):
        """``destroy --json`` prints the deleted dataset's object."""
        _, out, _ = self.cli("destroy", "web", "--json")
        self.assertTrue(json.loads(out)["deleted"])

    def test_destroy_leased(self):
        """Destroying a leased dataset is refused with the service's reason."""
        self.assertOneLineError(self.cli("destroy", UNNAMED), EXIT_FAILED,
                                f"Lease already held by node {NODE_1}:")

    def test_lease_acquire(self):
        """``leases acquire`` takes a lease for the node with the expiry given."""
        code, out, err = self.cli("leases", "acquire", "pgdata", "--node", "10.0.0.1",
                                  "--expires", "90")
        self.assertEqual((EXIT_OK, ""), (code, err))
        lease = self.configuration.leases[PGDATA]
        self.assertEqual((NODE_1, 90.0), (lease.node_uuid,
                                          lease.remaining(self.harness.clock.seconds())))
        self.assertEqual(f"Node 11111111 (10.0.0.1) holds the lease on dataset {PGDATA} "
                         "(pgdata) for 1m30s.\n", out)

    def test_lease_acquire_forever_json(self):
        """Without ``--expires`` the lease never expires; ``--json`` prints the lease."""
        _, out, _ = self.cli("leases", "acquire", "web", "--node", NODE_2, "--json")
        self.assertEqual({"dataset_id": WEB, "node_uuid": NODE_2, "expires": None},
                         json.loads(out))

    def test_lease_acquire_held(self):
        """A lease another node holds is refused naming the holder."""
        self.assertOneLineError(
            self.cli("leases", "acquire", UNNAMED, "--node", NODE_2), EXIT_FAILED,
            f"Lease already held by node {NODE_1}:")

    def test_lease_bad_expiry(self):
        """A non-positive expiry is a usage error."""
        self.assertOneLineError(
            self.cli("leases", "acquire", "web", "--node", NODE_2, "--expires", "0"),
            EXIT_USAGE, "'0' is not a number of seconds greater than 0")

    def test_lease_release(self):
        """``leases release`` drops the lease and names the node that held it."""
        code, out, err = self.cli("leases", "release", "bbbb")
        self.assertEqual((EXIT_OK, ""), (code, err))
        self.assertEqual(f"Released node 11111111 (10.0.0.1)'s lease on dataset "
                         f"{UNNAMED}.\n", out)
        self.assertNotIn(UNNAMED, self.configuration.leases)

    def test_lease_release_none(self):
        """Releasing a lease nobody holds reports the service's answer."""
        self.assertOneLineError(self.cli("leases", "release", "web"), EXIT_FAILED,
                                "pyflock: error: Lease not found.")


class NodeForgetTests(CLITestCase):
    """``node forget`` drops a dead node that holds nothing, and says why it will not."""

    def test_forget_dead_node(self):
        """A dead node named by uuid prefix is forgotten and no longer listed."""
        code, out, err = self.cli("node", "forget", "22223")
        self.assertEqual((EXIT_OK, ""), (code, err))
        self.assertEqual("Forgot dead node 22223333 (10.0.0.2), last seen 2m05s ago.\n", out)
        self.assertNotIn(NODE_3, self.harness.cluster.state.nodes)
        _, out, _ = self.cli("list-nodes")
        self.assertNotIn("22223333", out)

    def test_forget_json(self):
        """``--json`` prints the forgotten node's API object."""
        _, out, _ = self.cli("node", "forget", NODE_3, "--json")
        self.assertEqual({"uuid": NODE_3, "host": "10.0.0.2", "alive": False,
                          "last_seen": 125, "zone": None}, json.loads(out))

    def test_forget_ambiguous_address(self):
        """An address shared by a live and a dead node is refused, listing both."""
        self.assertOneLineError(self.cli("node", "forget", "10.0.0.2"), EXIT_FAILED,
                                "'10.0.0.2' is the address of 2 nodes", NODE_2, NODE_3)
        self.assertIn(NODE_3, self.harness.cluster.state.nodes)

    def test_forget_live_node(self):
        """A live node is refused, saying to stop its agent and wait until it is dead."""
        self.assertOneLineError(self.cli("node", "forget", "22222222"), EXIT_FAILED,
                                f"Node {NODE_2} is alive", "Stop its agent, wait 30 s")
        self.assertIn(NODE_2, self.harness.cluster.state.nodes)

    def test_forget_primary(self):
        """A dead node that is a dataset's primary is refused, naming the dataset."""
        self.harness.report_node(NODE_2, "10.0.0.2", silent=100)
        self.assertOneLineError(self.cli("node", "forget", "22222222"), EXIT_FAILED,
                                f"Node {NODE_2} is the primary of 1 dataset(s) ({WEB})",
                                "move them to another node or delete them")

    def test_forget_lease_holder(self):
        """A dead node holding a lease is refused, naming the leased dataset."""
        self.harness.report_node(UNKNOWN_NODE, "10.0.0.9", silent=100)
        self.harness.request(self, "POST", "/v1/configuration/leases",
                             {"dataset_id": WEB, "node_uuid": UNKNOWN_NODE, "expires": None})
        self.assertOneLineError(self.cli("node", "forget", "10.0.0.9"), EXIT_FAILED,
                                f"holds the lease on 1 dataset(s) ({WEB})",
                                "release those leases")

    def test_forget_unknown_uuid(self):
        """A full uuid of no known node is passed on; the service says it is unknown."""
        self.assertOneLineError(self.cli("node", "forget", UNKNOWN_NODE), EXIT_FAILED,
                                f"No node {UNKNOWN_NODE} is known")


class SettingsTests(CLITestCase):
    """Settings come from flags, else the environment, else cli.yml, else defaults."""

    def write_config(self, text, folder=None):
        """Write cli.yml under ``folder`` (default $HOME/.config/pyflock)."""
        folder = folder or self.home / ".config" / "pyflock"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cli.yml").write_text(text)

    def only(self):
        """The one Settings the CLI used."""
        self.assertEqual(1, len(self.settings))
        return self.settings[0]

    def test_precedence(self):
        """A flag beats the environment, which beats cli.yml, which beats the default."""
        self.write_config("control-service: from-file\ncontrol-port: 1111\n"
                          "certs-path: /file/certs\nuser: file-user\n")
        env = {"HOME": str(self.home), "PYFLOCK_CONTROL_SERVICE": "from-env",
               "PYFLOCK_CONTROL_PORT": "2222", "PYFLOCK_USER": "env-user"}
        code, _, err = self.cli("--control-service", "from-flag", "--certs-path", "/flag",
                                "version", env=env)
        self.assertEqual((EXIT_OK, ""), (code, err))
        self.assertEqual(Settings(control_service="from-flag", control_port=2222,
                                  certs_path="/flag", user="env-user"), self.only())
        self.assertEqual({"control-service": "--control-service",
                          "control-port": "PYFLOCK_CONTROL_PORT", "certs-path": "--certs-path",
                          "user": "PYFLOCK_USER"}, dict(self.only().origins))

    def test_file(self):
        """cli.yml alone is enough; a relative certs-path there is relative to the file."""
        self.write_config("control-service: 10.0.0.9\ncontrol-port: 4600\n"
                          "certs-path: certs\nuser: bob\n")
        code, _, _ = self.cli("version", env={"HOME": str(self.home)})
        self.assertEqual(EXIT_OK, code)
        self.assertEqual(Settings(control_service="10.0.0.9", control_port=4600,
                                  certs_path=str(self.home / ".config/pyflock/certs"),
                                  user="bob"), self.only())
        self.assertEqual("https://10.0.0.9:4600", self.only().base_url)

    def test_xdg_config_home(self):
        """cli.yml is read from $XDG_CONFIG_HOME/pyflock when that is set."""
        xdg = self.home / "xdg"
        self.write_config("control-service: xdg-host\nuser: carol\n", xdg / "pyflock")
        self.write_config("control-service: home-host\nuser: dave\n")
        self.cli("version", env={"HOME": str(self.home), "XDG_CONFIG_HOME": str(xdg)})
        self.assertEqual(("xdg-host", "carol"), (self.only().control_service,
                                                 self.only().user))

    def test_defaults(self):
        """Port 4523 and the current folder are the defaults."""
        self.cli("version")
        self.assertEqual(Settings(control_service="control.example", control_port=4523,
                                  certs_path=os.path.abspath("."), user="alice"),
                         self.only())

    def test_ipv6(self):
        """An IPv6 address is bracketed in the URL."""
        self.cli("--control-service", "::1", "version")
        self.assertEqual("https://[::1]:4523", self.only().base_url)

    def test_no_control_service(self):
        """Without a control service anywhere, the error says the three ways to give one."""
        self.assertOneLineError(
            self.cli("list", env={"HOME": str(self.home), "PYFLOCK_USER": "a"}),
            EXIT_UNREACHABLE, "no control service given: use --control-service HOST, set "
                              "PYFLOCK_CONTROL_SERVICE, or put 'control-service: HOST' in "
                              f"{self.home}/.config/pyflock/cli.yml")

    def test_no_user(self):
        """Without a user anywhere, the error says how to give one."""
        self.assertOneLineError(
            self.cli("list", env={"HOME": str(self.home), "PYFLOCK_CONTROL_SERVICE": "h"}),
            EXIT_UNREACHABLE, "no API user given: use --user NAME")

    def test_bad_port(self):
        """A port that is not a number is refused naming where it came from."""
        self.assertOneLineError(self.cli("--control-port", "http", "list"), EXIT_USAGE,
                                "--control-port: 'http' is not a port number")

    def test_bad_yaml(self):
        """A cli.yml that is not YAML is refused naming the file."""
        self.write_config("control-service: [unclosed\n")
        self.assertOneLineError(self.cli("list", env={"HOME": str(self.home)}),
                                EXIT_UNREACHABLE, "cli.yml is not valid YAML")

    def test_unknown_key(self):
        """A misspelt key in cli.yml is refused, listing the keys."""
        self.write_config("contol-service: x\n")
        self.assertOneLineError(self.cli("list", env={"HOME": str(self.home)}),
                                EXIT_UNREACHABLE, "unknown key 'contol-service'",
                                "control-service, control-port, certs-path, user")

    def test_file_not_read_when_unneeded(self):
        """A broken cli.yml does not matter when flags and environment give everything."""
        self.write_config("{{{")
        code, _, _ = self.cli("--control-port", "1", "--certs-path", "/c", "version")
        self.assertEqual(EXIT_OK, code)


class ErrorTests(CLITestCase):
    """Whatever goes wrong is one line on stderr and a non-zero exit, never a traceback."""

    def test_no_command(self):
        """No subcommand is a usage error."""
        self.assertOneLineError(self.cli(), EXIT_USAGE, "pyflock: error: the following "
                                                        "arguments are required: COMMAND")

    def test_unknown_option(self):
        """An unknown option is a usage error pointing at the help."""
        self.assertOneLineError(self.cli("list", "--colour"), EXIT_USAGE,
                                "unrecognized arguments: --colour", "see 'pyflock --help'")

    def test_global_option_after_command(self):
        """A global option after the subcommand is refused with a hint where it goes."""
        self.assertOneLineError(self.cli("list", "--user", "bob"), EXIT_USAGE,
                                "go before the subcommand")

    def test_help(self):
        """``--help`` prints every subcommand on stdout and succeeds."""
        code, out, err = self.cli("--help")
        self.assertEqual((EXIT_OK, ""), (code, err))
        for command in ("version", "list-nodes", "list", "create", "move", "destroy",
                        "restore", "leases", "node"):
            self.assertIn(command, out)
        code, out, _ = self.cli("leases", "acquire", "--help")
        self.assertEqual(EXIT_OK, code)
        self.assertIn("--expires SECONDS", out)

    def test_unreachable(self):
        """A refused connection says where the CLI tried and where that came from."""
        reactor = MemoryReactorClock()

        class Endpoints:
            def endpointForURI(self, uri):
                return TCP4ClientEndpoint(reactor, uri.host.decode(), uri.port)

        def factory(settings):
            agent = Agent.usingEndpointFactory(reactor, Endpoints())
            return ControlClient(HTTPClient(agent), settings.base_url)

        err = io.StringIO()
        d = run(["list-nodes"], factory, io.StringIO(), err,
                {"HOME": str(self.home), "PYFLOCK_CONTROL_SERVICE": "127.0.0.1",
                 "PYFLOCK_CONTROL_PORT": "4999", "PYFLOCK_USER": "alice"})
        host, port, client_factory, _, _ = reactor.tcpClients[0]
        self.assertEqual(("127.0.0.1", 4999), (host, port))
        client_factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(EXIT_UNREACHABLE, self.successResultOf(d))
        self.assertEqual("pyflock: error: cannot reach the control service at "
                         "127.0.0.1:4999: connection refused (is pyflock-control running "
                         "and listening there?) (control service from "
                         "PYFLOCK_CONTROL_SERVICE)\n", err.getvalue())

    def test_unexpected(self):
        """A bug becomes one line asking for a report, not a traceback."""
        def factory(settings):
            raise ZeroDivisionError("division by zero")
        self.assertOneLineError(self.cli("list", factory=factory), EXIT_FAILED,
                                "unexpected ZeroDivisionError: division by zero",
                                "PYFLOCK_DEBUG=1")

    def test_server_error(self):
        """A 500 answer shows the service's description and the status."""
        def factory(settings):
            from treq.testing import StringStubbingResource
            return ControlClient(StubTreq(StringStubbingResource(
                lambda *a: (500, {}, b'{"description": "Internal error."}'))),
                settings.base_url)
        self.assertOneLineError(self.cli("list", factory=factory), EXIT_FAILED,
                                "pyflock: error: Internal error. (HTTP 500)")


class CertificateTests(SynchronousTestCase):
    """The real client factory checks the certificates before connecting."""

    def setUp(self):
        from tests.harness.certificates import make_cluster_certificates
        self.folder = _temporary_folder(self)
        make_cluster_certificates(self.folder, nodes=0, users=("alice",))

    def run_with(self, user="alice", folder=None):
        """Run ``list`` with the real client factory on a memory reactor."""
        err = io.StringIO()
        env = {"PYFLOCK_CONTROL_SERVICE": "127.0.0.1", "PYFLOCK_USER": user,
               "PYFLOCK_CERTS_PATH": str(folder or self.folder)}
        code = self.successResultOf(run(["list"], default_client_factory(
            MemoryReactorClock()), io.StringIO(), err, env))
        return code, err.getvalue()

    def test_makes_client(self):
        """With every file present, the factory makes a client of the settings' URL."""
        client = default_client_factory(MemoryReactorClock())(Settings(
            control_service="127.0.0.1", control_port=4523, certs_path=str(self.folder),
            user="alice"))
        self.assertEqual("<ControlClient https://127.0.0.1:4523>", repr(client))

    def test_missing_user_certificate(self):
        """A missing user certificate names the file and the pyflock-ca command."""
        code, err = self.run_with(user="bob")
        self.assertEqual(EXIT_UNREACHABLE, code)
        self.assertEqual(1, err.count("\n"))
        self.assertIn(f"{self.folder}/bob.crt is missing: create the certificate of API "
                      "user 'bob' with 'pyflock-ca create-api-certificate bob'", err)

    def test_missing_cluster_certificate(self):
        """A missing cluster.crt names the file and where it comes from."""
        (self.folder / "cluster.crt").unlink()
        code, err = self.run_with()
        self.assertEqual(EXIT_UNREACHABLE, code)
        self.assertIn(f"{self.folder}/cluster.crt is missing", err)
        self.assertIn("pyflock-ca initialize", err)

    def test_broken_certificate(self):
        """An unreadable certificate is refused naming it."""
        (self.folder / "alice.crt").write_text("garbage")
        code, err = self.run_with()
        self.assertEqual(EXIT_UNREACHABLE, code)
        self.assertIn("cannot use the certificates:", err)
        self.assertIn("alice.crt", err)


class HelperTests(SynchronousTestCase):
    """The table and short-id helpers."""

    def test_short_ids(self):
        """Short ids are 8 characters unless two ids share more."""
        self.assertEqual({"aaaaaaaaa1": "aaaaaaaaa1", "aaaaaaaaa2": "aaaaaaaaa2",
                          "bbbbbbbbbb": "bbbbbbbb"},
                         short_ids(["aaaaaaaaa1", "aaaaaaaaa2", "bbbbbbbbbb"]))

    def test_table(self):
        """Columns are as wide as their widest cell, two spaces apart, no trailing space."""
        self.assertEqual("A    BB\nccc  d\n", format_table(["A", "BB"], [["ccc", "d"]]))


@pytest.mark.integration
def test_console_script(tmp_path):
    """The installed ``pyflock`` reports a refused connection in one line, exit status 3."""
    from tests.harness.certificates import make_cluster_certificates

    make_cluster_certificates(tmp_path, nodes=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(sys.executable).parent / "pyflock"
    result = subprocess.run(
        [str(script), "--control-service", "127.0.0.1", "--control-port", str(port),
         "--certs-path", str(tmp_path), "--user", "alice", "list"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)})
    assert (result.returncode, result.stdout) == (EXIT_UNREACHABLE, "")
    assert result.stderr == (f"pyflock: error: cannot reach the control service at "
                             f"127.0.0.1:{port}: connection refused (is pyflock-control "
                             "running and listening there?) (control service from "
                             "--control-service)\n")


@pytest.mark.integration
def test_help_imports_nothing_of_the_server():
    """``pyflock --help`` loads neither the server nor Twisted, treq, sqlite3 or klein."""
    program = ("import json, sys\n"
               "from pyflock.cli._cli import main\n"
               "try:\n"
               "    main(['--help'])\n"
               "except SystemExit as e:\n"
               "    code = e.code\n"
               "print(json.dumps([code, sorted(sys.modules)]))\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    code, modules = json.loads(last)
    assert code == 0
    assert "usage: pyflock" in result.stdout
    forbidden = ("pyflock.control", "pyflock.common", "klein", "sqlite3", "_sqlite3",
                 "twisted", "treq", "OpenSSL", "yaml")
    loaded = [m for m in modules if m.split(".")[0] in forbidden or m.startswith(forbidden)]
    assert loaded == []
