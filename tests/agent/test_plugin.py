"""
The Docker volume plugin in memory: the real control service API (``APIHarness``) with node
certificates behind the plugin's client, a ``Clock`` for time, a stand-in for the agent's
convergence loop that reports datasets mounted, and ``StubTreq`` playing dockerd. One test
serves the plugin over a real unix socket, as dockerd 20.10 talks to it.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import tempfile

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, capturedLogs, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._mounts import MountCounts
from pyflock.agent._plugin import (
    ClusterView, DockerPlugin, LocalStates, PluginBackend, PluginSocketError, listen_plugin,
    plugin_site,
)
from pyflock.common._threads import run_now
from pyflock.common._client import ControlClient
from pyflock.common._logging import events_of
from pyflock.common._records import Transfer
from pyflock.control.testing import NODE_A, NODE_B, APIHarness

A = NODE_A.node_uuid
B = NODE_B.node_uuid
HOSTS = {A: "10.0.0.1", B: "10.0.0.2"}
GiB = 1024 ** 3
MOUNT_X = "0e4c01a3" * 8
MOUNT_Y = "7d2f9b11" * 8
MOUNT_Z = "a9c3e5f7" * 8
CONTROL = "https://control.example"


class ControlLink:
    """
    A node's HTTP link to the control service: passes requests through, refuses them
    (``down``), or holds them until ``release`` (``hold``), to order them as a test needs.
    """

    def __init__(self, http):
        self.http = http
        self.down = False
        self.hold = False
        self.held: list = []
        self.tried = 0

    def request(self, method, url, **kwargs):
        """Send, refuse or hold one request."""
        self.tried += 1
        if self.down:
            return fail(ConnectionRefusedError("Connection refused"))
        if self.hold:
            d = Deferred()
            self.held.append((d, method, url, kwargs))
            return d
        return self.http.request(method, url, **kwargs)

    def release(self, newest_first: bool = False):
        """Send the held requests, oldest (or newest) first, and stop holding."""
        self.hold = False
        held, self.held = self.held, []
        for d, method, url, kwargs in (reversed(held) if newest_first else held):
            if not d.called:  # a cancelled request is never sent
                self.http.request(method, url, **kwargs).chainDeferred(d)


class Convergence:
    """
    Plays one node's convergence loop, event-driven: after each committed configuration
    change it reports as mounted here every live dataset whose primary is this node (unless
    that dataset is ``blocked``), and forgets the others.
    """

    def __init__(self, harness: APIHarness, node_uuid: str, states: LocalStates):
        self.harness = harness
        self.node_uuid = node_uuid
        self.states = states
        self.blocked: set = set()
        self.block_all = False
        self.mounted: set = set()
        harness.configuration.subscribe(lambda config, touched: self.converge())
        self.converge()

    def path(self, dataset_id: str) -> str:
        """Where this node mounts ``dataset_id``."""
        return f"/var/lib/pyflock/{self.node_uuid[:8]}/mounts/{dataset_id}"

    def converge(self) -> None:
        """Report every dataset's state here from the committed configuration."""
        for dataset in self.harness.configuration.committed.datasets.values():
            path = self.path(dataset.dataset_id)
            here = dataset.primary == self.node_uuid and not dataset.deleted
            if not here:
                if self.states.get(dataset.dataset_id) is not None:
                    self.states.report_state(dataset.dataset_id, None)
                    self.mounted.discard(path)
                continue
            if self.block_all or dataset.dataset_id in self.blocked:
                continue
            if self.states.mounted_path(dataset.dataset_id) is None:
                self.mounted.add(path)
                self.states.report_state(dataset.dataset_id, "mounted", path)

    def is_mountpoint(self, path: str) -> bool:
        """Whether this node has mounted something at ``path``."""
        return path in self.mounted


class Node:
    """One node: its control client (node certificate), view, convergence and plugin."""

    def __init__(self, testcase: SynchronousTestCase, harness: APIHarness, identity,
                 counts_path: str):
        self.testcase = testcase
        self.harness = harness
        self.uuid = identity.node_uuid
        self.link = ControlLink(StubTreq(harness.api(identity).app.resource()))
        self.client = ControlClient(self.link, CONTROL)
        self.states = LocalStates()
        self.convergence = Convergence(harness, self.uuid, self.states)
        self.frozen_view = None
        self.backend = PluginBackend(self.uuid, self.client, self.view, self.states,
                                     self.convergence.is_mountpoint)
        self.counts_path = counts_path
        self.mounts = MountCounts(counts_path, run_now)
        # Most tests look at the lease right after the last Unmount: no grace here, and
        # ``finish`` runs the release; ``ReleaseGraceTests`` test the grace itself.
        self.plugin = DockerPlugin(self.backend, self.mounts, harness.clock, release_grace=0)
        self.docker = StubTreq(self.plugin.resource())
        # The view follows the configuration: each commit is a push to this node.
        harness.configuration.subscribe(lambda config, ids: self.plugin.view_updated())

    def view(self) -> ClusterView:
        """The agent's view: the committed configuration, unless a test froze it."""
        if self.frozen_view is not None:
            return self.frozen_view
        return ClusterView.from_configuration(self.harness.configuration.committed, HOSTS)

    def freeze_view(self) -> None:
        """Stop the view from following the control service (a push that has not come)."""
        self.frozen_view = self.view()

    def send(self, endpoint: str, body=None, raw: bytes = None, method: str = "POST"):
        """Start one dockerd call; the Deferred fires with ``(code, headers, json)``."""
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        d = self.docker.request(method, "http://plugin.moby.localhost/" + endpoint, data=data,
                                headers={"Accept": ["application/vnd.docker.plugins.v1.2+json"]})

        def read(response):
            return response.content().addCallback(
                lambda content: (response.code, response.headers, json.loads(content)))
        return d.addCallback(read)

    def finish(self, d):
        """The JSON answer of a call started with ``send``, once it has come."""
        self.docker.flush()
        code, _, answer = self.testcase.successResultOf(d)
        self.harness.clock.advance(0)
        self.testcase.assertEqual(code, 200, answer)
        self.testcase.assertIn("Err", answer)
        self.testcase.assertNotIn("Error", answer)
        return answer

    def call(self, endpoint: str, body=None, raw: bytes = None):
        """One dockerd call and its JSON answer (HTTP 200, with an ``Err`` key)."""
        return self.finish(self.send(endpoint, body, raw))

    def ok(self, endpoint: str, body=None):
        """One dockerd call that must succeed; its JSON answer."""
        answer = self.call(endpoint, body)
        self.testcase.assertEqual(answer["Err"], "", answer)
        return answer


class PluginTestCase(SynchronousTestCase):
    """A control service in memory and node A's plugin; node B has a client only."""

    def setUp(self):
        self.harness = APIHarness()
        self.clock = self.harness.clock
        folder = tempfile.mkdtemp(prefix="pyflock-plugin-")
        self.addCleanup(_remove_tree, folder)
        self.folder = folder
        self.a = Node(self, self.harness, NODE_A, os.path.join(folder, "a-mounts.json"))
        self.b = Node(self, self.harness, NODE_B, os.path.join(folder, "b-mounts.json"))
        self.events: list = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.addCleanup(self.a.plugin.stop)

    def dataset(self, name: str):
        """The live dataset called ``name`` in the control service's configuration."""
        return self.harness.configuration.committed.by_name(name)

    def lease_holder(self, name: str):
        """The node holding the lease on volume ``name`` now, if any."""
        config = self.harness.configuration.committed
        return config.leases.holder(self.clock.seconds(), config.by_name(name).dataset_id)

    def create_on_b(self, name: str, **kwargs) -> str:
        """Create a dataset called ``name`` on node B through B's client; its id."""
        config = self.successResultOf(self.b.client.create_dataset(
            B, metadata={"name": name}, **kwargs))
        return config.dataset_id

    def mount(self, name: str, mount_id: str = MOUNT_X):
        """Mount ``name`` on node A as dockerd does (Get, then Mount); the answer."""
        self.a.call("VolumeDriver.Get", {"Name": name})
        return self.a.call("VolumeDriver.Mount", {"Name": name, "ID": mount_id})

    def unmount(self, name: str, mount_id: str = MOUNT_X):
        """Unmount ``name`` on node A as dockerd does (Get, then Unmount)."""
        self.a.call("VolumeDriver.Get", {"Name": name})
        return self.a.ok("VolumeDriver.Unmount", {"Name": name, "ID": mount_id})


def _remove_tree(folder: str) -> None:
    for root, dirs, files in os.walk(folder, topdown=False):
        for f in files:
            os.unlink(os.path.join(root, f))
        for d in dirs:
            os.rmdir(os.path.join(root, d))
    os.rmdir(folder)


class ProtocolTests(PluginTestCase):
    """The wire protocol: handshake, replies always 200 with ``Err``, bad input."""

    def test_activate_empty_body(self):
        """``Plugin.Activate`` with an empty body answers that it implements VolumeDriver."""
        self.assertEqual(self.a.call("Plugin.Activate", raw=b""),
                         {"Implements": ["VolumeDriver"], "Err": ""})

    def test_capabilities_global(self):
        """``Capabilities`` answers scope ``global``: volume names are cluster-wide."""
        self.assertEqual(self.a.call("VolumeDriver.Capabilities", {}),
                         {"Capabilities": {"Scope": "global"}, "Err": ""})

    def test_content_type(self):
        """Replies carry the plugin protocol's JSON media type."""
        code, headers, _ = self.successResultOf(self.a.send("VolumeDriver.List", {}))
        self.assertEqual(headers.getRawHeaders("content-type"),
                         ["application/vnd.docker.plugins.v1.1+json"])

    def test_malformed_requests(self):
        """Bad JSON, a non-object body, a missing or mistyped Name, ID or Opts each get an
        ``Err`` saying what was wrong, with HTTP 200."""
        cases = [
            ("VolumeDriver.Get", b"{not json", "not valid JSON"),
            ("VolumeDriver.Get", b"[1, 2]", "must be a JSON object"),
            ("VolumeDriver.Get", b"{}", '"Name" must be a non-empty string'),
            ("VolumeDriver.Mount", b'{"Name": 7, "ID": "x"}', '"Name" must be'),
            ("VolumeDriver.Mount", b'{"Name": "v1", "ID": 7}', '"ID" must be a string'),
            ("VolumeDriver.Unmount", b'{"Name": "v1", "ID": []}', '"ID" must be a string'),
            ("VolumeDriver.Create", b'{"Name": "v1", "Opts": "size=1G"}',
             '"Opts" must be an object of strings or null'),
            ("VolumeDriver.Create", b'{"Name": "v1", "Opts": {"size": 10}}',
             "option 'size' for volume v1 must be a string"),
            ("VolumeDriver.Remove", b'{"Name": null}', '"Name" must be'),
            ("VolumeDriver.Path", b"\xff\xfe", "not valid JSON"),
        ]
        for endpoint, raw, expected in cases:
            answer = self.a.call(endpoint, raw=raw)
            self.assertTrue(answer["Err"].startswith("pyflock: "), (raw, answer))
            self.assertIn(expected, answer["Err"], raw)
        self.assertEqual(len(events_of(self.events, "pyflock:plugin:bad-request")), len(cases))
        self.assertIsNone(self.dataset("v1"))

    def test_unknown_fields_ignored(self):
        """Fields the plugin does not know are ignored (Docker adds some over time)."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1", "Opts": None, "Future": {"x": 1}})
        answer = self.a.ok("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_X, "New": True})
        self.assertTrue(answer["Mountpoint"])

    def test_unknown_endpoint(self):
        """An unknown endpoint answers 404 (dockerd: not implemented) with a JSON ``Err``."""
        code, _, answer = self.successResultOf(self.a.send("VolumeDriver.Snapshot", {}))
        self.assertEqual(code, 404)
        self.assertIn("unknown endpoint /VolumeDriver.Snapshot", answer["Err"])

    def test_get_method(self):
        """A GET answers 405 with a JSON ``Err``: the protocol is POST only."""
        code, _, answer = self.successResultOf(
            self.a.send("VolumeDriver.List", method="GET"))
        self.assertEqual((code, answer), (405, {"Err": "pyflock: the plugin protocol uses "
                                                       "POST only"}))

    def test_internal_error(self):
        """An unexpected failure answers an ``Err`` naming the log event, not a 500."""
        self.a.backend.view_of = lambda: 1 / 0
        answer = self.a.call("VolumeDriver.Get", {"Name": "v1"})
        self.assertIn("internal error in VolumeDriver.Get of volume v1 (ZeroDivisionError)",
                      answer["Err"])
        [event] = events_of(self.events, "pyflock:plugin:internal-error")
        self.assertIn("ZeroDivisionError", event["traceback"])


class CreateTests(PluginTestCase):
    """``Create``: a dataset on this node, options, names, idempotence."""

    def test_create_null_opts(self):
        """Create with ``Opts: null`` configures a dataset named like the volume, here."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1", "Opts": None})
        dataset = self.dataset("v1")
        self.assertEqual((dataset.primary, dataset.maximum_size, dict(dataset.metadata)),
                         (A, None, {"name": "v1"}))
        [event] = events_of(self.events, "pyflock:plugin:created")
        self.assertEqual((event["name"], event["dataset_id"]), ("v1", dataset.dataset_id))

    def test_create_empty_opts(self):
        """Create with ``Opts: {}`` (the 20.10 CLI) is the same as with null."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1", "Opts": {}})
        self.assertEqual(self.dataset("v1").primary, A)

    def test_size_and_profile(self):
        """``size`` is binary and ``profile`` is kept in the metadata."""
        self.a.ok("VolumeDriver.Create", {"Name": "v3", "Opts": {"size": "10G",
                                                                 "profile": "Gold"}})
        dataset = self.dataset("v3")
        self.assertEqual((dataset.maximum_size, dict(dataset.metadata)),
                         (10 * GiB, {"name": "v3", "profile": "gold"}))

    def test_size_forms(self):
        """500M, 1TiB and a byte count are accepted; sizes round up to whole KiB."""
        for name, size, expected in [("s1", "500M", 500 * 1024 ** 2),
                                     ("s2", "1TiB", 1024 ** 4),
                                     ("s3", "67108865", 67109888)]:
            self.a.ok("VolumeDriver.Create", {"Name": name, "Opts": {"size": size}})
            self.assertEqual(self.dataset(name).maximum_size, expected)

    def test_bad_options(self):
        """Unknown options, bad sizes, small sizes and bad profiles are refused, saying
        what is accepted, and create nothing."""
        cases = [
            ({"type": "ext4"}, "pyflock: unknown option 'type' for volume v1: pyflock "
                               "accepts size (e.g. -o size=10G, at least 64M) and profile "
                               "(-o profile=gold, silver or bronze)"),
            ({"size": "ten"}, "pyflock: invalid size 'ten' for volume v1: use a binary size "
                              "such as 500M, 10G or 1TiB (at least 64M)"),
            ({"size": "10M"}, "pyflock: size 10M for volume v1 is too small: the minimum "
                              "is 64M"),
            ({"profile": "platinum"}, "pyflock: invalid profile 'platinum' for volume v1: "
                                      "use gold, silver or bronze"),
        ]
        for opts, expected in cases:
            answer = self.a.call("VolumeDriver.Create", {"Name": "v1", "Opts": opts})
            self.assertEqual(answer["Err"], expected)
        self.assertIsNone(self.dataset("v1"))

    def test_bad_names(self):
        """Names outside Docker's local-volume rule are refused with the rule."""
        for name in ["a", "-x", "a b", "/abs/path", "é1", ".hidden"]:
            answer = self.a.call("VolumeDriver.Create", {"Name": name})
            self.assertEqual(answer["Err"], f"pyflock: invalid volume name {name!r}: use at "
                                            f"least 2 characters, a letter or digit first, "
                                            f"then letters, digits, '_', '.' or '-'")
        self.assertEqual(len(self.harness.configuration.committed.datasets), 0)

    def test_create_idempotent(self):
        """Create of an existing name succeeds and creates nothing (a timed-out Get makes
        dockerd do that)."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.a.ok("VolumeDriver.Create", {"Name": "v1", "Opts": {"size": "1G"}})
        self.assertEqual(len(self.harness.configuration.committed.datasets), 1)
        self.assertEqual(len(events_of(self.events, "pyflock:plugin:create-existing")), 1)

    def test_create_existing_elsewhere_view_behind(self):
        """Create of a name that exists in the cluster but not yet in this node's view
        succeeds, and Get then answers it."""
        self.a.freeze_view()
        dataset_id = self.create_on_b("v1")
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        answer = self.a.ok("VolumeDriver.Get", {"Name": "v1"})
        self.assertEqual(answer["Volume"]["Status"]["dataset_id"], dataset_id)
        self.assertEqual(self.dataset("v1").primary, B)

    def test_get_after_create_view_behind(self):
        """A volume just created is answered by Get and List before the view catches up."""
        self.a.freeze_view()
        self.a.convergence.block_all = True
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.assertEqual(self.a.ok("VolumeDriver.Get", {"Name": "v1"})["Volume"]["Name"], "v1")
        self.assertEqual(self.a.ok("VolumeDriver.List", {})["Volumes"], [{"Name": "v1"}])

    def test_create_unreachable(self):
        """Create while the control service is unreachable fails saying so."""
        self.a.link.down = True
        answer = self.a.call("VolumeDriver.Create", {"Name": "v1"})
        self.assertEqual(answer["Err"], "pyflock: cannot create volume v1: cannot reach the "
                                        "control service at control.example:443: connection "
                                        "refused (is pyflock-control running and listening "
                                        "there?); retry once the control service is "
                                        "reachable from this node")

    def test_create_no_answer(self):
        """Create gives up before dockerd does when the control service does not answer."""
        self.a.link.hold = True
        d = self.a.send("VolumeDriver.Create", {"Name": "v1"})
        self.clock.advance(50)
        self.assertEqual(self.a.finish(d)["Err"],
                         "pyflock: cannot create volume v1: the control service did not "
                         "answer within 50 s; retry once it is reachable from this node")


class SequenceTests(PluginTestCase):
    """The call sequences dockerd 20.10 was measured to send (notes §5)."""

    def test_volume_create_first_use(self):
        """``volume create``: Activate, Capabilities, Get (no such volume), Create; then
        inspect's Get answers the volume."""
        self.a.call("Plugin.Activate", raw=b"")
        self.a.ok("VolumeDriver.Capabilities", {})
        self.assertEqual(self.a.call("VolumeDriver.Get", {"Name": "v1"}),
                         {"Err": "no such volume v1"})
        self.a.ok("VolumeDriver.Create", {"Name": "v1", "Opts": None})
        volume = self.a.ok("VolumeDriver.Get", {"Name": "v1"})["Volume"]
        self.assertEqual(volume["Name"], "v1")
        self.assertEqual(self.a.ok("VolumeDriver.List", {})["Volumes"],
                         [{"Name": "v1", "Mountpoint": volume["Mountpoint"]}])

    def test_run_with_copy_up(self):
        """``run -v v1:/data`` on an image with /data: the copy-up Mount/Unmount pair, then
        the start Mount; the lease is held throughout and released by the last Unmount."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1", "Opts": None})
        self.a.ok("VolumeDriver.Get", {"Name": "v1"})
        first = self.mount("v1", MOUNT_X)
        self.a.ok("VolumeDriver.Get", {"Name": "v1"})
        self.unmount("v1", MOUNT_X)
        second = self.mount("v1", MOUNT_Y)
        self.assertEqual(first, second)
        self.assertEqual(first["Mountpoint"], self.a.convergence.path(
            self.dataset("v1").dataset_id))
        self.assertEqual(self.lease_holder("v1"), A)
        get = self.a.ok("VolumeDriver.Get", {"Name": "v1"})["Volume"]
        self.assertEqual((get["Mountpoint"], get["Status"]["mounts_here"]),
                         (first["Mountpoint"], 1))
        self.unmount("v1", MOUNT_Y)
        self.assertIsNone(self.lease_holder("v1"))
        self.assertEqual(self.dataset("v1").primary, A)

    def test_run_new_volume(self):
        """``run -v new:/data --volume-driver pyflock``: Get fails, Create, then mounts."""
        self.assertIn("no such volume", self.a.call("VolumeDriver.Get", {"Name": "new"})["Err"])
        self.a.ok("VolumeDriver.Create", {"Name": "new", "Opts": None})
        self.assertTrue(self.mount("new")["Mountpoint"])
        self.assertEqual(self.lease_holder("new"), A)

    def test_anonymous_volume(self):
        """An anonymous volume (64-hex name) is created, mounted, unmounted and removed."""
        name = "a1b2c3d4" * 8
        self.a.ok("VolumeDriver.Create", {"Name": name, "Opts": None})
        self.mount(name)
        self.unmount(name)
        self.a.ok("VolumeDriver.Remove", {"Name": name})
        self.assertIsNone(self.dataset(name))


class MountTests(PluginTestCase):
    """``Mount`` and ``Unmount``: leases, moves, waiting, counting, failures."""

    def test_waits_for_the_agent(self):
        """Mount answers when the agent reports the dataset mounted, not before, and
        without any timer."""
        self.a.convergence.block_all = True
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        d = self.a.send("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_X})
        self.a.docker.flush()
        self.assertNoResult(d)
        self.assertEqual(self.a.states.waiting(), 1)
        self.a.convergence.block_all = False
        self.a.convergence.converge()
        answer = self.a.finish(d)
        self.assertEqual(answer["Mountpoint"],
                         self.a.convergence.path(self.dataset("v1").dataset_id))
        self.assertEqual(self.clock.seconds(), self.harness.clock.seconds())

    def test_moves_here(self):
        """Mount of a volume whose dataset is on another node moves it here."""
        dataset_id = self.create_on_b("v1")
        answer = self.mount("v1")
        self.assertEqual(self.dataset("v1").primary, A)
        self.assertEqual(answer["Mountpoint"], self.a.convergence.path(dataset_id))
        [event] = events_of(self.events, "pyflock:plugin:move-requested")
        self.assertEqual((event["source"], event["target"]), (B, A))

    def test_leased_elsewhere(self):
        """Mount of a volume another node leases fails within about a second (the other
        node's release grace) naming that node and its host, and moves nothing."""
        from pyflock.agent._plugin_model import LEASE_RETRY_MARGIN
        dataset_id = self.create_on_b("v1")
        self.successResultOf(self.b.client.acquire_lease(dataset_id, B, 60))
        self.a.call("VolumeDriver.Get", {"Name": "v1"})
        d = self.a.send("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_X})
        self.clock.advance(LEASE_RETRY_MARGIN)
        answer = self.a.finish(d)
        self.assertEqual(answer["Err"],
                         f"pyflock: volume v1 is in use on node {B} (host 10.0.0.2): stop the "
                         f"containers using it there first; if that node is down, its lease "
                         f"expires within 60 s and the volume can then be used here")
        self.assertEqual((self.dataset("v1").primary, self.lease_holder("v1")), (B, B))
        self.assertEqual(self.a.mounts.count("v1"), 0)

    def test_timed_out_view_wait_forgotten(self):
        """A Mount that stopped waiting for a view push (its lease retry window passed)
        leaves no waiter behind for the next push (issue 7, point 7)."""
        from pyflock.agent._plugin_model import LEASE_RETRY_MARGIN
        dataset_id = self.create_on_b("v1")
        self.successResultOf(self.b.client.acquire_lease(dataset_id, B, 60))
        self.a.call("VolumeDriver.Get", {"Name": "v1"})
        d = self.a.send("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_X})
        self.a.docker.flush()
        self.assertEqual(self.a.plugin.view_waiters(), 1)
        self.clock.advance(LEASE_RETRY_MARGIN)
        self.assertIn(f"in use on node {B}", self.a.finish(d)["Err"])
        self.assertEqual(self.a.plugin.view_waiters(), 0)

    def test_hung_up_view_wait_forgotten(self):
        """A Mount waiting for a view push that dockerd hangs up on leaves no waiter."""
        dataset_id = self.create_on_b("v1")
        self.successResultOf(self.b.client.acquire_lease(dataset_id, B, 60))
        self.a.call("VolumeDriver.Get", {"Name": "v1"})
        d = self.a.send("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_X})
        self.a.docker.flush()
        d.cancel()
        self.a.docker.flush()
        self.failureResultOf(d)
        self.assertEqual(self.a.plugin.view_waiters(), 0)

    def test_lease_let_go_in_time(self):
        """A Mount refused by a lease that the other node releases a moment later (its
        container just stopped) succeeds as soon as the release reaches this node, with no
        clock advance."""
        dataset_id = self.create_on_b("v1")
        self.successResultOf(self.b.client.acquire_lease(dataset_id, B, 60))
        self.a.call("VolumeDriver.Get", {"Name": "v1"})
        d = self.a.send("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_X})
        self.a.docker.flush()
        self.assertNoResult(d)
        self.successResultOf(self.b.client.release_lease(dataset_id))
        answer = self.a.finish(d)
        self.assertEqual(answer["Err"], "")
        self.assertEqual(self.lease_holder("v1"), A)

    def test_pipelined_when_here(self):
        """Mount of a volume whose dataset is here sends the lease and the move at once,
        and answers once both are done and the agent has mounted it."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.a.link.hold = True
        d = self.a.send("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_X})
        self.a.docker.flush()
        held = sorted(url.split("/configuration/")[-1].split("/")[0]
                      for _, _, url, _ in self.a.link.held)
        self.assertEqual(held, ["datasets", "leases"])
        self.assertNoResult(d)
        self.a.link.release(newest_first=True)
        answer = self.a.finish(d)
        self.assertEqual(answer["Mountpoint"],
                         self.a.convergence.path(self.dataset("v1").dataset_id))
        self.assertEqual((self.lease_holder("v1"), self.a.mounts.count("v1")), (A, 1))

    def test_pipelined_lease_let_go_in_time(self):
        """A pipelined Mount refused by another node's lease drops its wait for the agent
        while it waits for the view, then mounts once that lease is released."""
        self.a.convergence.block_all = True
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        dataset_id = self.dataset("v1").dataset_id
        self.successResultOf(self.b.client.acquire_lease(dataset_id, B, 60))
        d = self.a.send("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_X})
        self.a.docker.flush()
        self.assertNoResult(d)
        self.assertEqual((self.a.plugin.view_waiters(), self.a.states.waiting()), (1, 0))
        self.a.convergence.block_all = False
        self.successResultOf(self.b.client.release_lease(dataset_id))
        answer = self.a.finish(d)
        self.assertEqual(answer["Err"], "")
        self.assertEqual((self.lease_holder("v1"), self.a.states.waiting()), (A, 0))

    def test_creates_missing_dataset(self):
        """Mount of a volume dockerd knows but the cluster does not creates it here."""
        answer = self.mount("gone")
        self.assertEqual(self.dataset("gone").primary, A)
        self.assertTrue(answer["Mountpoint"])
        self.assertEqual(len(events_of(self.events, "pyflock:plugin:recreated")), 1)

    def test_stale_view_names_deleted_dataset(self):
        """A view naming a dataset deleted since does not stop the Mount: the plugin asks
        the control service and mounts the volume's current dataset."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.a.freeze_view()
        old = self.dataset("v1").dataset_id
        self.successResultOf(self.a.client.delete_dataset(old))
        new = self.create_on_b("v1")
        answer = self.mount("v1")
        self.assertEqual(answer["Mountpoint"], self.a.convergence.path(new))
        self.assertEqual((self.dataset("v1").primary, self.lease_holder("v1")), (A, A))

    def test_docker_cp_counts(self):
        """``docker cp`` sends Mount(X) for a live X then Unmount(X): the volume stays
        mounted and leased, because mounts are counted per ID."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.mount("v1", MOUNT_X)
        self.mount("v1", MOUNT_X)
        self.unmount("v1", MOUNT_X)
        self.assertEqual(self.a.mounts.count("v1"), 1)
        self.assertEqual(self.lease_holder("v1"), A)
        self.assertIn("Mountpoint", self.a.ok("VolumeDriver.Get", {"Name": "v1"})["Volume"])
        self.unmount("v1", MOUNT_X)
        self.assertIsNone(self.lease_holder("v1"))

    def test_two_containers(self):
        """Two containers on one volume: stopping one keeps the lease, the other's Unmount
        releases it."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.mount("v1", MOUNT_X)
        del self.events[:]  # the Create's own lease went after its grace (0 here)
        self.mount("v1", MOUNT_Y)
        self.unmount("v1", MOUNT_X)
        self.assertEqual(self.lease_holder("v1"), A)
        self.unmount("v1", MOUNT_Y)
        self.assertIsNone(self.lease_holder("v1"))
        self.assertEqual(len(events_of(self.events, "pyflock:plugin:lease-released")), 1)

    def test_unknown_unmount(self):
        """Unmount of an ID never mounted succeeds and changes nothing."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.mount("v1", MOUNT_X)
        self.unmount("v1", MOUNT_Y)
        self.assertEqual((self.a.mounts.count("v1"), self.lease_holder("v1")), (1, A))
        self.assertEqual(len(events_of(self.events, "pyflock:plugin:unmount-unknown")), 1)

    def test_unmount_unreachable(self):
        """Unmount succeeds while the control service is unreachable; the lease it could
        not release is logged and expires on its own."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.mount("v1")
        self.a.link.down = True
        self.unmount("v1")
        self.assertEqual(self.a.mounts.count("v1"), 0)
        [event] = events_of(self.events, "pyflock:plugin:lease-release-failed")
        self.assertIn("cannot reach the control service", event["reason"])
        self.assertEqual(self.lease_holder("v1"), A)
        self.clock.advance(60)
        self.assertIsNone(self.lease_holder("v1"))

    def test_release_never_overtakes_next_mount(self):
        """The copy-up Unmount's lease release and the start Mount's acquire reach the
        control service in that order, even when answers come back in reverse."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.mount("v1", MOUNT_X)
        self.a.link.hold = True
        unmount = self.a.send("VolumeDriver.Unmount", {"Name": "v1", "ID": MOUNT_X})
        mount = self.a.send("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_Y})
        self.a.link.release(newest_first=True)
        self.assertEqual(self.a.finish(unmount)["Err"], "")
        self.a.link.release(newest_first=True)
        self.assertEqual(self.a.finish(mount)["Err"], "")
        self.assertEqual(self.lease_holder("v1"), A)

    def test_timeout_releases(self):
        """A Mount the agent cannot finish fails before dockerd's 120 s, saying where it
        stands, and releases its lease and count; the move it started is not reversed."""
        dataset_id = self.create_on_b("v1")
        self.a.convergence.blocked.add(dataset_id)
        d = self.a.send("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_X})
        self.a.states.report_state(dataset_id, "attaching")
        self.assertEqual(self.lease_holder("v1"), A)
        self.clock.advance(99)
        self.a.docker.flush()
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(self.a.finish(d)["Err"],
                         "pyflock: volume v1 was not ready on this node within 100 s (state "
                         "here: attaching); the agent goes on working on it: retry in a "
                         "moment, and if this persists check `pyflock list` and the agent's "
                         "log")
        self.assertIsNone(self.lease_holder("v1"))
        self.assertEqual(self.dataset("v1").primary, A)
        self.assertEqual((self.a.mounts.count("v1"), self.a.states.waiting()), (0, 0))
        [event] = events_of(self.events, "pyflock:plugin:mount-failed")
        self.assertEqual((event["name"], event["dataset_id"]), ("v1", dataset_id))

    def test_timeout_while_received_here(self):
        """A Mount whose volume is still being received here when its budget ends (a
        peer-to-peer move) says how far the move got, from the agent's receiver, and
        "retry when done"; it releases its lease, and the move goes on."""
        dataset_id = self.create_on_b("v1")
        self.a.convergence.blocked.add(dataset_id)
        asked = []

        def received(about):
            asked.append(about)
            return Transfer(3 * 2 ** 20, 12 * 2 ** 20)
        self.a.backend.transfers = received
        d = self.a.send("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_X})
        self.clock.advance(100)
        self.assertEqual(self.a.finish(d)["Err"],
                         "pyflock: volume v1 is still moving to this node after 100 s: "
                         "3.0 MiB of 12.0 MiB received (25%); the move goes on: retry when "
                         "done (`pyflock list` shows it here once it is)")
        self.assertEqual(asked, [dataset_id])
        self.assertIsNone(self.lease_holder("v1"))
        self.assertEqual(self.dataset("v1").primary, A)

    def test_move_too_slow_fails_early(self):
        """A Mount whose volume is received here too slowly to end before its deadline
        fails within seconds, with the progress, the time left at the rate seen and
        "retry when done"; it releases its lease, the move goes on, and a Mount once the
        volume is here succeeds."""
        dataset_id = self.create_on_b("v1")
        self.a.convergence.blocked.add(dataset_id)
        start = self.clock.seconds()
        self.a.backend.transfers = lambda about: Transfer(
            int((self.clock.seconds() - start) * 2 ** 20), 1000 * 2 ** 20)
        d = self.a.send("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_X})
        for _ in range(5):
            self.clock.advance(1)
            self.a.docker.flush()
            self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(self.a.finish(d)["Err"],
                         "pyflock: volume v1 is still moving to this node after 6 s: "
                         "6.0 MiB of 1000.0 MiB received (0%), about 994 s left at "
                         "1.0 MiB/s; the move goes on: retry when done (`pyflock list` "
                         "shows it here once it is)")
        self.assertIsNone(self.lease_holder("v1"))
        self.assertEqual(self.dataset("v1").primary, A)
        self.a.backend.transfers = lambda about: None
        self.a.convergence.blocked.discard(dataset_id)
        self.a.convergence.converge()
        self.assertEqual(self.a.ok("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_X}),
                         {"Err": "", "Mountpoint": self.a.convergence.path(dataset_id)})

    def test_timeout_keeps_other_mounts_lease(self):
        """A Mount that times out does not release a lease other mounts here still need."""
        self.a.plugin.start()
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.mount("v1", MOUNT_X)
        slow = PluginBackend(A, self.a.client, self.a.view, LocalStates(), lambda path: True)
        self.a.plugin._backend = self.a.plugin._mounting._backend = slow
        d = self.a.send("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_Y})
        self.clock.advance(100)
        self.assertIn("not ready", self.a.finish(d)["Err"])
        self.assertEqual(slow.states.waiting(), 0)
        self.assertEqual((self.a.mounts.count("v1"), self.lease_holder("v1")), (1, A))

    def test_hang_up_releases(self):
        """When dockerd hangs up during a Mount, the Mount stops and releases its lease."""
        self.a.convergence.block_all = True
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        d = self.a.send("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_X})
        self.a.docker.flush()
        self.assertEqual(self.lease_holder("v1"), A)
        d.cancel()
        self.a.docker.flush()
        self.failureResultOf(d)
        self.assertIsNone(self.lease_holder("v1"))
        self.assertEqual((self.a.mounts.count("v1"), self.a.states.waiting()), (0, 0))
        [event] = events_of(self.events, "pyflock:plugin:mount-failed")
        self.assertIn("hung up", event["reason"])
        [event] = events_of(self.events, "pyflock:plugin:caller-gone")
        self.assertEqual((event["endpoint"], event["name"]), ("VolumeDriver.Mount", "v1"))

    def test_not_a_mountpoint(self):
        """A reported path that is not a mounted filesystem fails the Mount and releases."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        path = self.a.convergence.path(self.dataset("v1").dataset_id)
        self.a.convergence.mounted.discard(path)
        answer = self.mount("v1")
        self.assertEqual(answer["Err"], f"pyflock: volume v1: the agent reported it mounted "
                                        f"at {path}, but no filesystem is mounted there; "
                                        f"check the agent's log, then retry")
        self.assertIsNone(self.lease_holder("v1"))

    def test_mount_unreachable(self):
        """Mount while the control service is unreachable fails saying so and takes
        nothing."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.a.link.down = True
        answer = self.mount("v1")
        self.assertTrue(answer["Err"].startswith(
            "pyflock: cannot mount volume v1: cannot reach the control service at "
            "control.example:443"), answer)
        self.assertEqual(self.a.mounts.count("v1"), 0)

    def test_slow_mount_does_not_delay_others(self):
        """While one Mount waits for its volume, calls for other volumes are answered."""
        self.a.ok("VolumeDriver.Create", {"Name": "slow"})
        self.a.ok("VolumeDriver.Create", {"Name": "fast"})
        self.a.convergence.blocked.add(self.dataset("slow").dataset_id)
        self.a.states.report_state(self.dataset("slow").dataset_id, None)
        slow = self.a.send("VolumeDriver.Mount", {"Name": "slow", "ID": MOUNT_X})
        self.assertTrue(self.mount("fast", MOUNT_Y)["Mountpoint"])
        self.a.ok("VolumeDriver.List", {})
        self.a.docker.flush()
        self.assertNoResult(slow)
        self.a.convergence.blocked.clear()
        self.a.convergence.converge()
        self.assertTrue(self.a.finish(slow)["Mountpoint"])


class LeaseRenewalTests(PluginTestCase):
    """Leases last 60 s and are renewed every 20 s while their volume is in use here."""

    def test_renewed_while_mounted(self):
        """A mounted volume keeps its lease for as long as it stays mounted."""
        self.a.plugin.start()
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.mount("v1")
        for _ in range(10):
            self.clock.advance(20)
        self.assertEqual(self.lease_holder("v1"), A)
        self.unmount("v1")
        self.clock.advance(20)
        self.assertIsNone(self.lease_holder("v1"))

    def test_renewed_during_a_slow_mount(self):
        """A Mount that takes longer than a lease keeps its lease until it finishes."""
        self.a.plugin.start()
        dataset_id = self.create_on_b("v1")
        self.a.convergence.blocked.add(dataset_id)
        d = self.a.send("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_X})
        for _ in range(4):
            self.clock.advance(20)
        self.assertEqual(self.lease_holder("v1"), A)
        self.a.convergence.blocked.clear()
        self.a.convergence.converge()
        self.assertEqual(self.a.finish(d)["Err"], "")

    def test_lease_lost(self):
        """When the lease lapsed (control unreachable) and another node took it, renewal
        logs ``lease-lost`` naming the holder."""
        self.a.plugin.start()
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.mount("v1")
        self.a.link.down = True
        for _ in range(4):
            self.clock.advance(20)
        self.assertEqual(len(events_of(self.events, "pyflock:plugin:lease-renew-failed")), 4)
        self.successResultOf(self.b.client.acquire_lease(self.dataset("v1").dataset_id, B, 60))
        self.a.link.down = False
        self.clock.advance(20)
        [event] = events_of(self.events, "pyflock:plugin:lease-lost")
        self.assertEqual(event["holder"], B)
        self.assertEqual(self.lease_holder("v1"), B)

    def test_renewal_without_answer(self):
        """A renewal the control service does not answer is given up before the next one
        is due, so renewals go on."""
        self.a.plugin.start()
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.mount("v1")
        self.a.link.hold = True
        self.clock.advance(20)
        self.assertEqual(len(self.a.link.held), 1)
        self.clock.advance(10)
        self.assertEqual(len(events_of(self.events, "pyflock:plugin:lease-renew-failed")), 1)
        self.clock.advance(10)
        self.assertEqual(len(self.a.link.held), 2)
        self.a.link.release()
        self.assertEqual(self.lease_holder("v1"), A)

    def test_counts_survive_restart(self):
        """A restarted plugin loads the counts, renews the in-use lease at once, and the
        old mount's Unmount releases it."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.mount("v1", MOUNT_X)
        self.a.plugin.stop()
        self.clock.advance(59)
        restarted = DockerPlugin(self.a.backend, MountCounts.load(self.a.counts_path,
                                                                  run_now), self.clock,
                                 release_grace=0)
        self.addCleanup(restarted.stop)
        restarted.start()
        self.clock.advance(59)
        self.assertEqual(self.lease_holder("v1"), A)
        self.a.docker = StubTreq(restarted.resource())
        self.unmount("v1", MOUNT_X)
        self.assertIsNone(self.lease_holder("v1"))

    def test_reconcile(self):
        """Reconciling with the running containers drops counts no container holds and
        records mounts the plugin missed, whose Unmounts then release the lease."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.a.ok("VolumeDriver.Create", {"Name": "v2"})
        self.mount("v1", MOUNT_X)
        self.successResultOf(self.a.plugin.reconcile({"v2": 1}))
        self.assertEqual((self.a.mounts.count("v1"), self.a.mounts.count("v2")), (0, 1))
        self.a.plugin.start()
        self.assertEqual(self.lease_holder("v2"), A)
        self.unmount("v2", MOUNT_Y)
        self.assertIsNone(self.lease_holder("v2"))


class FakeDockerd:
    """
    dockerd's API as the plugin's ``docker_mounts`` reads it: each call answers
    ``in_use`` (None: dockerd's API does not answer yet), fails with ``error``, or, with
    ``hold``, waits until the test answers it.
    """

    def __init__(self):
        self.in_use = None
        self.error = None
        self.hold = False
        self.held: list = []
        self.cancelled: list = []
        self.calls = 0

    def __call__(self) -> Deferred:
        self.calls += 1
        if self.error is not None:
            return fail(self.error)
        if self.hold:
            d = Deferred(lambda d: self.cancelled.append(d))
            self.held.append(d)
            return d
        return succeed(None if self.in_use is None else dict(self.in_use))


class SettleTests(PluginTestCase):
    """
    A dockerd that crashed sent no Unmounts; when a new dockerd activates the plugin, a
    Mount of an ID left counted counts it once, and once dockerd's API answers the counts
    are settled and the leases of volumes left unused released.
    """

    def setUp(self):
        super().setUp()
        self.dockerd = FakeDockerd()
        self.plugin = DockerPlugin(self.a.backend, self.a.mounts, self.clock,
                                   docker_mounts=self.dockerd, release_grace=0)
        self.addCleanup(self.plugin.stop)
        self.a.plugin = self.plugin
        self.a.docker = StubTreq(self.plugin.resource())

    def activate(self):
        """dockerd's handshake, as a new dockerd sends it."""
        self.assertEqual(self.a.call("Plugin.Activate", raw=b""),
                         {"Implements": ["VolumeDriver"], "Err": ""})

    def crash_with_containers(self):
        """A dockerd runs ``died`` (mount ID X) and ``alive`` (mount ID Y), then crashes:
        no Unmount comes, and the new dockerd's API does not answer yet."""
        self.dockerd.in_use = {}
        self.activate()
        for name, mount_id in (("died", MOUNT_X), ("alive", MOUNT_Y)):
            self.a.ok("VolumeDriver.Create", {"Name": name})
            self.mount(name, mount_id)
        self.dockerd.in_use = None
        self.assertEqual((self.lease_holder("died"), self.lease_holder("alive")), (A, A))

    def leases(self) -> dict:
        """Holder by volume name, as the REST API lists the leases now."""
        response = self.harness.request(self, "GET", "/v1/configuration/leases")
        names = {d.dataset_id: d.name
                 for d in self.harness.configuration.committed.datasets.values()}
        return {names[lease["dataset_id"]]: lease["node_uuid"] for lease in response.json}

    def mounts_here(self, name: str) -> int:
        """The mounts here that ``docker volume inspect`` shows for ``name``."""
        return self.a.ok("VolumeDriver.Get", {"Name": name})["Volume"]["Status"]["mounts_here"]

    def test_leftover_id_counts_once(self):
        """After a new dockerd's Activate, the first Mount of an ID counted under the
        previous dockerd (a restarted container keeps its IDs) counts it once, however
        often it was counted; the next Mount of it is another use (``docker cp``)."""
        self.crash_with_containers()
        self.mount("alive", MOUNT_Y)
        self.assertEqual(self.a.mounts.count("alive"), 2)
        self.activate()
        self.mount("alive", MOUNT_Y)
        self.assertEqual(self.a.mounts.table.mount_count("alive", MOUNT_Y), 1)
        self.assertEqual(self.mounts_here("alive"), 1)
        self.mount("alive", MOUNT_Y)
        self.assertEqual(self.mounts_here("alive"), 2)

    def test_new_id_counts_as_ever(self):
        """Before the counts settle, a Mount of a new ID counts as one more mount, beside
        the previous dockerd's."""
        self.crash_with_containers()
        self.activate()
        self.mount("died", MOUNT_Z)
        self.assertEqual(self.mounts_here("died"), 2)

    def test_settle_releases_unused(self):
        """Once the new dockerd answers, a volume no running container uses loses its
        counts and its lease (another node can take it), and a volume in use keeps both,
        also through lease renewals."""
        self.plugin.start()
        self.crash_with_containers()
        self.activate()
        self.mount("alive", MOUNT_Y)
        with capturedLogs() as events:
            self.clock.advance(1)
            self.dockerd.in_use = {"alive": 1}
            self.clock.advance(2)
        self.assertEqual((self.mounts_here("died"), self.mounts_here("alive")), (0, 1))
        self.assertEqual(self.leases(), {"alive": A})
        [settled] = events_of(events, "pyflock:plugin:mounts-settled")
        self.assertEqual((json.loads(settled["before"]), json.loads(settled["after"])),
                         ({"alive": 1, "died": 1}, {"alive": 1}))
        [released] = events_of(events, "pyflock:plugin:lease-released")
        self.assertEqual(released["dataset_id"], self.dataset("died").dataset_id)
        self.assertEqual(events_of(events, "pyflock:plugin:settle-failed"), [])
        self.clock.advance(120)
        self.assertEqual(self.leases(), {"alive": A})
        self.assertEqual(self.b.call("VolumeDriver.Mount", {"Name": "died", "ID": MOUNT_Z}),
                         {"Mountpoint": self.b.convergence.path(self.dataset("died")
                                                                 .dataset_id), "Err": ""})
        self.assertEqual(self.leases(), {"alive": A, "died": B})
        self.assertEqual(read_file_counts(self.a.counts_path), {"alive": 1})

    def test_settle_at_once(self):
        """A dockerd whose API answers at Activate settles the counts during the Activate;
        the volume of a container still running (live-restore) keeps one mount, which its
        Unmount then releases."""
        self.crash_with_containers()
        self.dockerd.in_use = {"alive": 1}
        with capturedLogs() as events:
            self.activate()
        self.assertEqual(len(events_of(events, "pyflock:plugin:mounts-settled")), 1)
        self.assertEqual(self.leases(), {"alive": A})
        self.unmount("alive", MOUNT_Y)
        self.assertEqual((self.mounts_here("alive"), self.leases()), (0, {}))

    def test_docker_cp_after_settling(self):
        """After settling, ``docker cp`` (Mount then Unmount of a live ID) is an extra use:
        the volume stays mounted and leased until its container's own Unmount."""
        self.crash_with_containers()
        self.activate()
        self.mount("alive", MOUNT_Y)
        self.dockerd.in_use = {"alive": 1}
        self.clock.advance(1)
        self.assertEqual(self.mounts_here("alive"), 1)
        self.mount("alive", MOUNT_Y)
        self.assertEqual(self.mounts_here("alive"), 2)
        self.unmount("alive", MOUNT_Y)
        self.assertEqual((self.mounts_here("alive"), self.leases()), (1, {"alive": A}))
        self.unmount("alive", MOUNT_Y)
        self.assertEqual((self.mounts_here("alive"), self.leases()), (0, {}))

    def test_mount_waiting_while_settling(self):
        """A Mount still waiting for its volume when the counts settle keeps the lease it
        took, and counts once it answers."""
        self.crash_with_containers()
        self.activate()
        self.a.convergence.blocked.add(self.dataset("died").dataset_id)
        self.a.states.report_state(self.dataset("died").dataset_id, "attaching")
        d = self.a.send("VolumeDriver.Mount", {"Name": "died", "ID": MOUNT_Z})
        self.dockerd.in_use = {}
        self.clock.advance(1)
        self.assertEqual((self.a.mounts.count("died"), self.leases()), (0, {"died": A}))
        self.a.convergence.blocked.clear()
        self.a.states.report_state(self.dataset("died").dataset_id, None)
        self.a.convergence.converge()
        self.assertEqual(self.a.finish(d)["Err"], "")
        self.assertEqual((self.mounts_here("died"), self.leases()), (1, {"died": A}))

    def test_reconciled_mounts_released(self):
        """Mounts recorded at agent start without their dataset (the counts file was lost)
        are settled too, and their volume's lease released at once, not left to expire."""
        self.a.ok("VolumeDriver.Create", {"Name": "died"})
        self.successResultOf(self.plugin.reconcile({"died": 1}))
        self.assertIsNone(self.a.mounts.table.dataset_id("died"))
        self.plugin.start()
        self.assertEqual(self.leases(), {"died": A})
        self.dockerd.in_use = {}
        self.activate()
        self.assertEqual((self.mounts_here("died"), self.leases()), (0, {}))

    def test_dockerd_never_answers(self):
        """A dockerd whose API answers nothing within the limit (300 s) gets a
        ``settle-failed`` warning; the counts and leases stay as they were, and the plugin
        stops asking."""
        self.plugin.start()
        self.crash_with_containers()
        with capturedLogs() as events:
            self.activate()
            for _ in range(299):
                self.clock.advance(1)
            self.assertEqual(events_of(events, "pyflock:plugin:settle-failed"), [])
            self.clock.advance(1)
        [failed] = events_of(events, "pyflock:plugin:settle-failed")
        self.assertEqual((failed["log_level"], failed["reason"]),
                         (LogLevel.warn, "dockerd's API did not answer within 300 s of the "
                                         "Activate"))
        self.assertEqual(events_of(events, "pyflock:plugin:mounts-settled"), [])
        self.assertGreater(self.dockerd.calls, 100)
        calls = self.dockerd.calls
        self.clock.advance(600)
        self.assertEqual(self.dockerd.calls, calls)
        self.assertEqual((self.mounts_here("died"), self.mounts_here("alive")), (1, 1))
        self.assertEqual(self.leases(), {"alive": A, "died": A})

    def test_dockerd_call_hangs(self):
        """A call to dockerd's API that never returns is given up at the limit, with a
        ``settle-failed`` warning, and the counts stay."""
        self.crash_with_containers()
        self.dockerd.hold = True
        with capturedLogs() as events:
            self.activate()
            self.clock.advance(299)
            [call] = self.dockerd.held
            self.assertNoResult(call)
            self.clock.advance(1)
        self.assertEqual(self.dockerd.cancelled, [call])
        [failed] = events_of(events, "pyflock:plugin:settle-failed")
        self.assertIn("did not answer within 300 s", failed["reason"])
        self.assertEqual((self.a.mounts.count("died"), self.a.mounts.count("alive")), (1, 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_dockerd_fails(self):
        """A failure of the call to dockerd's API is logged (``settle-failed``, error, with
        the reason) and the counts stay."""
        self.crash_with_containers()
        self.dockerd.error = RuntimeError("docker.sock: permission denied")
        with capturedLogs() as events:
            self.activate()
        [failed] = events_of(events, "pyflock:plugin:settle-failed")
        self.assertEqual((failed["log_level"], failed["reason"]),
                         (LogLevel.error, "docker.sock: permission denied"))
        self.assertIn("RuntimeError", failed["traceback"])
        self.assertEqual((self.a.mounts.count("died"), self.a.mounts.count("alive")), (1, 1))

    def test_new_activate_restarts_settling(self):
        """A second Activate (dockerd crashed again) while the first settle waits starts a
        new one; the first is dropped without a warning."""
        self.crash_with_containers()
        self.dockerd.hold = True
        with capturedLogs() as events:
            self.activate()
            self.activate()
            first, second = self.dockerd.held
            self.assertEqual(self.dockerd.cancelled, [first])
            second.callback({"alive": 1})
        self.assertEqual(events_of(events, "pyflock:plugin:settle-failed"), [])
        self.assertEqual(len(events_of(events, "pyflock:plugin:mounts-settled")), 1)
        self.assertEqual(self.leases(), {"alive": A})

    def test_stop_while_settling(self):
        """Stopping the plugin drops a settle under way, quietly and leaving no timer."""
        self.crash_with_containers()
        with capturedLogs() as events:
            self.activate()
            self.clock.advance(5)
            self.plugin.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(events_of(events, "pyflock:plugin:settle-failed"), [])
        self.assertEqual(self.a.mounts.count("died"), 1)


def read_file_counts(path: str) -> dict:
    """The counts per volume in the mount counts file at ``path``."""
    with open(path) as f:
        document = json.load(f)
    return {name: sum(entry["mounts"].values())
            for name, entry in document["volumes"].items()}


class ViewTests(PluginTestCase):
    """Get, List and Path answer from the agent's view, also without the control service."""

    def test_get_unknown(self):
        """Get of a name no dataset has answers Docker's ``no such volume NAME``."""
        self.assertEqual(self.a.call("VolumeDriver.Get", {"Name": "nope"}),
                         {"Err": "no such volume nope"})
        self.assertEqual(self.a.call("VolumeDriver.Path", {"Name": "nope"}),
                         {"Err": "no such volume nope"})

    def test_get_status(self):
        """Get's Status tells where the volume lives, its size, profile, state and lease."""
        dataset_id = self.create_on_b("v1", maximum_size=10 * GiB)
        self.successResultOf(self.b.client.acquire_lease(dataset_id, B, 60))
        volume = self.a.ok("VolumeDriver.Get", {"Name": "v1"})["Volume"]
        self.assertEqual(volume, {"Name": "v1", "Status": {
            "dataset_id": dataset_id, "primary": B, "primary_host": "10.0.0.2",
            "size": "10G", "profile": "", "state": "on another node", "lease": B,
            "mounts_here": 0}})

    def test_mountpoint_when_mounted_here(self):
        """Get, List and Path give the Mountpoint only while the volume is mounted here."""
        dataset_id = self.create_on_b("v1")
        self.assertEqual(self.a.ok("VolumeDriver.Path", {"Name": "v1"}), {"Err": ""})
        self.assertEqual(self.a.ok("VolumeDriver.List", {})["Volumes"], [{"Name": "v1"}])
        path = self.mount("v1")["Mountpoint"]
        self.assertEqual(self.a.ok("VolumeDriver.Path", {"Name": "v1"}),
                         {"Mountpoint": path, "Err": ""})
        self.assertEqual(self.a.ok("VolumeDriver.List", {})["Volumes"],
                         [{"Name": "v1", "Mountpoint": path}])
        status = self.a.ok("VolumeDriver.Get", {"Name": "v1"})["Volume"]["Status"]
        self.assertEqual((status["state"], status["primary"], status["lease"]),
                         ("mounted", A, A))
        self.assertEqual(path, self.a.convergence.path(dataset_id))

    def test_unreachable_control(self):
        """With the control service unreachable, Get, List and Path still answer every
        volume in the view, and no request is even tried."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1", "Opts": {"size": "1G"}})
        path = self.mount("v1")["Mountpoint"]
        self.a.link.down = True
        tried = self.a.link.tried
        volume = self.a.ok("VolumeDriver.Get", {"Name": "v1"})["Volume"]
        self.assertEqual((volume["Mountpoint"], volume["Status"]["size"]), (path, "1G"))
        self.assertEqual(self.a.ok("VolumeDriver.List", {})["Volumes"],
                         [{"Name": "v1", "Mountpoint": path}])
        self.assertEqual(self.a.ok("VolumeDriver.Path", {"Name": "v1"})["Mountpoint"], path)
        self.assertEqual(self.a.call("VolumeDriver.Get", {"Name": "v2"})["Err"],
                         "no such volume v2")
        self.assertEqual(self.a.link.tried, tried)

    def test_list_names(self):
        """List shows named live datasets whose names Docker accepts, sorted."""
        for metadata in [{"name": "b1"}, {"name": "a1"}, {}, {"name": "bad name"}]:
            self.successResultOf(self.b.client.create_dataset(B, metadata=metadata))
        gone = self.create_on_b("gone")
        self.successResultOf(self.b.client.delete_dataset(gone))
        self.assertEqual(self.a.ok("VolumeDriver.List", {})["Volumes"],
                         [{"Name": "a1"}, {"Name": "b1"}])

    def test_get_odd_name(self):
        """Get answers a volume whose name Docker would not create (made with the CLI)."""
        self.create_on_b("bad name")
        self.assertEqual(self.a.ok("VolumeDriver.Get", {"Name": "bad name"})["Volume"]["Name"],
                         "bad name")


class RemoveTests(PluginTestCase):
    """``Remove``: deletes the dataset unless a container uses it, here or elsewhere."""

    def test_remove(self):
        """Remove deletes the volume's dataset, and Get then answers no such volume."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        dataset_id = self.dataset("v1").dataset_id
        self.a.ok("VolumeDriver.Remove", {"Name": "v1"})
        self.assertTrue(self.harness.configuration.committed.datasets[dataset_id].deleted)
        self.assertEqual(self.a.call("VolumeDriver.Get", {"Name": "v1"})["Err"],
                         "no such volume v1")

    def test_remove_in_use_here(self):
        """Remove of a volume mounted here is refused, saying what to do."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.mount("v1")
        answer = self.a.call("VolumeDriver.Remove", {"Name": "v1"})
        self.assertEqual(answer["Err"], "pyflock: volume v1 is in use by 1 mount(s) on this "
                                        "node: stop and remove the containers using it "
                                        "first (docker ps -a --filter volume=v1)")
        self.assertIsNotNone(self.dataset("v1"))

    def test_remove_leased_elsewhere(self):
        """Remove of a volume another node leases is refused naming that node."""
        dataset_id = self.create_on_b("v1")
        self.successResultOf(self.b.client.acquire_lease(dataset_id, B, 60))
        answer = self.a.call("VolumeDriver.Remove", {"Name": "v1"})
        self.assertEqual(answer["Err"], f"pyflock: volume v1 is in use on node {B} (host "
                                        f"10.0.0.2): stop and remove the containers using it "
                                        f"there, then retry")
        self.assertEqual(self.dataset("v1").primary, B)

    def test_remove_primary_elsewhere(self):
        """Remove of an idle volume living on another node claims it and deletes it (a node
        certificate may delete only its own node's datasets)."""
        dataset_id = self.create_on_b("v1")
        self.a.ok("VolumeDriver.Remove", {"Name": "v1"})
        dataset = self.harness.configuration.committed.datasets[dataset_id]
        self.assertEqual((dataset.deleted, dataset.primary), (True, A))
        [event] = events_of(self.events, "pyflock:plugin:removed")
        self.assertEqual(event["moved_from"], B)

    def test_remove_own_idle_lease(self):
        """Remove of a volume this node still leases (a release that failed) succeeds: the
        lease goes with the dataset."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.successResultOf(self.a.client.acquire_lease(self.dataset("v1").dataset_id, A, 60))
        self.a.ok("VolumeDriver.Remove", {"Name": "v1"})
        self.assertIsNone(self.dataset("v1"))
        self.assertEqual(len(self.harness.configuration.committed.leases), 0)

    def test_remove_absent(self):
        """Remove of a name no dataset has succeeds: it is gone, as asked."""
        self.a.ok("VolumeDriver.Remove", {"Name": "nope"})

    def test_remove_view_behind(self):
        """A removed volume is not answered by Get or List while the view lags behind."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.a.freeze_view()
        self.a.ok("VolumeDriver.Remove", {"Name": "v1"})
        self.assertIn("no such volume", self.a.call("VolumeDriver.Get", {"Name": "v1"})["Err"])
        self.assertEqual(self.a.ok("VolumeDriver.List", {})["Volumes"], [])
        self.clock.advance(120)
        self.assertEqual(self.a.ok("VolumeDriver.List", {})["Volumes"], [{"Name": "v1"}])

    def test_remove_unreachable(self):
        """Remove while the control service is unreachable fails saying so."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.a.link.down = True
        answer = self.a.call("VolumeDriver.Remove", {"Name": "v1"})
        self.assertTrue(answer["Err"].startswith(
            "pyflock: cannot remove volume v1: cannot reach the control service"), answer)

    def test_create_again_after_remove(self):
        """A removed name can be created again at once."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        first = self.dataset("v1").dataset_id
        self.a.ok("VolumeDriver.Remove", {"Name": "v1"})
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.assertNotEqual(self.dataset("v1").dataset_id, first)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection over a unix socket, sending dockerd 20.10's empty Host."""

    def __init__(self, path: str):
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self):
        """Connect to the unix socket."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.unix_path)


def _dockerd_call(path: str, endpoint: str, body: bytes, host="") -> tuple:
    """One call as dockerd 20.10 makes it (empty Host, no Content-Type; ``host=None``:
    no Host header at all); blocks."""
    connection = _UnixHTTPConnection(path)
    try:
        connection.putrequest("POST", "/" + endpoint, skip_host=True,
                              skip_accept_encoding=True)
        if host is not None:
            connection.putheader("Host", host)
        connection.putheader("User-Agent", "Go-http-client/1.1")
        connection.putheader("Accept", "application/vnd.docker.plugins.v1.2+json")
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_real_unix_socket():
    """Over a real unix socket (mode 0600, a stale socket replaced, a live one refused,
    removed on stop) the plugin answers dockerd-shaped calls with an empty Host."""
    from twisted.internet import reactor

    class Case(SynchronousTestCase):
        def runTest(self):
            """Unused: lends ``successResultOf`` to the harness."""
    case = Case()
    harness = APIHarness()
    folder = tempfile.mkdtemp(prefix="pf-", dir="/tmp")
    path = os.path.join(folder, "pyflock.sock")
    node = Node(case, harness, NODE_A, os.path.join(folder, "mounts.json"))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    try:
        port = listen_plugin(reactor, path, plugin_site(node.plugin))
    except BaseException:
        _remove_tree(folder)
        raise
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(PluginSocketError, match=f"cannot serve the Docker plugin at "
                                                    f"{path}: another process serves it"):
            listen_plugin(reactor, path, plugin_site(node.plugin))
        assert await deferToThread(_dockerd_call, path, "Plugin.Activate", b"") == \
            (200, {"Implements": ["VolumeDriver"], "Err": ""})
        assert await deferToThread(_dockerd_call, path, "VolumeDriver.Get",
                                   b'{"Name":"v1"}') == (200, {"Err": "no such volume v1"})
        assert await deferToThread(_dockerd_call, path, "VolumeDriver.Capabilities", b"{}",
                                   None) == (200, {"Capabilities": {"Scope": "global"},
                                                   "Err": ""})
        assert await deferToThread(_dockerd_call, path, "VolumeDriver.List", b"{}",
                                   "plugin.moby.localhost") == (200, {"Volumes": [],
                                                                      "Err": ""})
        assert await deferToThread(_dockerd_call, path, "VolumeDriver.Create",
                                   b'{"Name":"v1","Opts":null}') == (200, {"Err": ""})
        status, answer = await deferToThread(_dockerd_call, path, "VolumeDriver.Mount",
                                             b'{"Name":"v1","ID":"' + MOUNT_X.encode() + b'"}')
        assert (status, answer["Err"]) == (200, "")
        assert answer["Mountpoint"] == node.convergence.path(
            harness.configuration.committed.by_name("v1").dataset_id)
        assert await deferToThread(_dockerd_call, path, "VolumeDriver.Get", b"{oops") == \
            (200, {"Err": "pyflock: the request body is not valid JSON (Expecting property "
                          "name enclosed in double quotes: line 1 column 2 (char 1))"})
    finally:
        await port.stopListening()
        node.plugin.stop()
        removed = not os.path.exists(path)
        _remove_tree(folder)
    assert removed


def test_socket_path_not_a_socket(tmp_path):
    """A plain file where the socket should be is left alone and the refusal says so."""
    from twisted.internet import reactor
    path = tmp_path / "pyflock.sock"
    path.write_text("keep me")
    with pytest.raises(PluginSocketError, match="it exists and is not a socket; remove it "
                                                "or set another plugin.socket"):
        listen_plugin(reactor, str(path), None)
    assert path.read_text() == "keep me"


class GracePluginTestCase(PluginTestCase):
    """Node A's plugin with the real release grace (``self.grace``), and volume v1 created."""

    def setUp(self):
        super().setUp()
        from pyflock.agent._plugin import RELEASE_GRACE
        self.grace = RELEASE_GRACE
        self.plugin = DockerPlugin(self.a.backend, self.a.mounts, self.clock)
        self.addCleanup(self.plugin.stop)
        self.a.plugin = self.plugin
        self.a.docker = StubTreq(self.plugin.resource())
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})


class ReleaseGraceTests(GracePluginTestCase):
    """The lease outlives the last Unmount by a grace period, so that the copy-up
    Unmount-then-Mount of a ``docker run`` leaves no gap for another node."""

    def test_no_gap_after_copy_up(self):
        """After the copy-up Unmount the lease is still held: another node cannot take
        it before the start Mount, which keeps it."""
        self.a.call("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_X})
        self.a.ok("VolumeDriver.Unmount", {"Name": "v1", "ID": MOUNT_X})
        dataset_id = self.dataset("v1").dataset_id
        self.failureResultOf(self.b.client.acquire_lease(dataset_id, B, 60))
        self.a.call("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_Y})
        self.clock.advance(self.grace + 1)
        self.assertEqual(self.lease_holder("v1"), A)

    def test_released_after_grace(self):
        """Once the grace has passed with no new Mount, the lease is released."""
        self.a.call("VolumeDriver.Mount", {"Name": "v1", "ID": MOUNT_X})
        self.a.ok("VolumeDriver.Unmount", {"Name": "v1", "ID": MOUNT_X})
        self.clock.advance(self.grace - 0.5)
        self.assertEqual(self.lease_holder("v1"), A)
        self.clock.advance(1)
        self.assertIsNone(self.lease_holder("v1"))


class NewVolumeLeaseTests(GracePluginTestCase):
    """A Create takes the new volume's lease at once, so that dockerd's first Mount, a
    moment later, finds it held; unused, it goes after the release grace."""

    def test_create_takes_lease(self):
        """Right after Create this node holds the new volume's lease; another node
        cannot take it."""
        self.assertEqual(self.lease_holder("v1"), A)
        dataset_id = self.dataset("v1").dataset_id
        self.failureResultOf(self.b.client.acquire_lease(dataset_id, B, 60))

    def test_unused_lease_released_after_grace(self):
        """A created volume that no Mount uses is released once the grace has passed."""
        self.clock.advance(self.grace + 0.01)
        self.assertIsNone(self.lease_holder("v1"))
        self.assertEqual(len(events_of(self.events, "pyflock:plugin:lease-released")), 1)

    def test_first_mount_asks_nothing(self):
        """The first Mount within the grace needs no request to the control service:
        it succeeds with the control service unreachable, and keeps the lease."""
        self.a.link.down = True
        answer = self.mount("v1")
        self.assertEqual(answer["Err"], "", answer)
        self.a.link.down = False
        self.clock.advance(self.grace + 1)
        self.assertEqual((self.a.mounts.count("v1"), self.lease_holder("v1")), (1, A))

    def test_create_is_one_request(self):
        """The dataset and its lease are one request to the control service, and the
        first Mount after it sends none."""
        before = self.a.link.tried
        self.a.ok("VolumeDriver.Create", {"Name": "v2"})
        self.assertEqual((self.a.link.tried - before, self.lease_holder("v2")), (1, A))
        self.a.ok("VolumeDriver.Mount", {"Name": "v2", "ID": MOUNT_X})
        self.assertEqual(self.a.link.tried - before, 1)

    def test_older_control_service(self):
        """A control service that refuses ``lease`` in a create (older than it) gets
        the create without it; the first Mount then takes the lease."""
        import pyflock.control._api as api
        from pyflock.control import _schema
        old = {k: v for k, v in _schema.CREATE_DATASET["properties"].items() if k != "lease"}
        self.patch(api, "_CREATE", _schema.validator(
            dict(_schema.CREATE_DATASET, properties=old)))
        self.a.ok("VolumeDriver.Create", {"Name": "v2"})
        self.assertIsNone(self.lease_holder("v2"))
        self.a.ok("VolumeDriver.Mount", {"Name": "v2", "ID": MOUNT_X})
        self.assertEqual(self.lease_holder("v2"), A)


class PendingCreationTests(PluginTestCase):
    """Issue 7's fast path: Create chooses the new dataset's id and has this node make
    it while the create request is under way (``pyflock.agent._pending``)."""

    def setUp(self):
        super().setUp()
        from pyflock.agent._pending import PendingCreations
        self.pending = PendingCreations()
        self.plugin = DockerPlugin(self.a.backend, self.a.mounts, self.clock,
                                   release_grace=0, pending=self.pending)
        self.addCleanup(self.plugin.stop)
        self.a.plugin = self.plugin
        self.a.docker = StubTreq(self.plugin.resource())

    def desired(self):
        """What the pending creations ask of node A: state by dataset id."""
        from pyflock.agent._convergence import Desired
        desired = self.pending.desire(lambda view, now: Desired(node_uuid=A))(
            None, self.clock.seconds())
        return {i: desired.state_of(i).value for i in desired.datasets}

    def test_create_sends_the_id_it_makes(self):
        """The dataset configured is the one this node was asked to make, here."""
        self.a.ok("VolumeDriver.Create", {"Name": "v1", "Opts": {"size": "64M"}})
        dataset = self.dataset("v1")
        self.assertEqual((dataset.primary, self.desired()),
                         (A, {dataset.dataset_id: "mounted"}))
        self.assertEqual(self.pending.desire(lambda view, now: None)(None, 0), None)

    def test_refused_creation_abandoned(self):
        """A name taken meanwhile (the view behind): what was begun is destroyed here."""
        self.a.freeze_view()
        self.create_on_b("v1")
        self.a.ok("VolumeDriver.Create", {"Name": "v1"})
        self.assertEqual(list(self.desired().values()), ["destroyed"])

    def test_no_answer_kept(self):
        """Without an answer the creation may have been made: it stays desired here."""
        self.a.link.hold = True
        d = self.a.send("VolumeDriver.Create", {"Name": "v1"})
        self.clock.advance(50)
        self.assertIn("did not answer", self.a.finish(d)["Err"])
        self.assertEqual(list(self.desired().values()), ["mounted"])
