"""
The plugin's backend: ``LocalStates`` (what the convergence loop reports of this node's
datasets), ``PluginBackend`` over it, the agent's view as the plugin reads it
(``agent_view_source``, ``ClusterView.from_records``), and the real mount check.
"""

from __future__ import annotations

import pytest_twisted
from pyrsistent import pmap
from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pyflock.common._threads import in_reactor_pool
from pyflock.agent._plugin import (
    ClusterView, IPluginBackend, LocalState, LocalStates, PluginBackend, agent_view_source,
    is_mountpoint_in,
)
from pyflock.agent._view import AgentView
from pyflock.common._client import ControlClient
from pyflock.common._records import Dataset, DatasetEntry, DatasetReport, Lease, Node
from pyflock.common._wire import Snapshot
from tests.agent.test_plugin import A, B, CONTROL


class BackendTests(SynchronousTestCase):
    """``PluginBackend`` and ``LocalStates``: the contract the plugin relies on."""

    def setUp(self):
        self.states = LocalStates()
        self.view = ClusterView()
        self.backend = PluginBackend(A, ControlClient(StubTreq(None), CONTROL),
                                     lambda: self.view, self.states, lambda path: path == "/m")

    def test_provides_interface(self):
        """``PluginBackend`` provides ``IPluginBackend``."""
        verifyObject(IPluginBackend, self.backend)

    def test_wait_fires_on_report(self):
        """``wait_mounted`` fires with the path when the loop reports the dataset mounted."""
        d = self.backend.wait_mounted("d1")
        self.states.report_state("d1", "attaching")
        self.assertNoResult(d)
        self.states.report_state("d1", "mounted", "/m")
        self.assertEqual(self.successResultOf(d), "/m")
        self.assertEqual(self.backend.local_state("d1").state, "mounted")

    def test_wait_fires_on_mounted_now(self):
        """``mounted_now`` (the agent has just mounted it) wakes the waits with the path
        and leaves the reported state as the loop reported it."""
        self.states.report_state("d1", "attaching")
        d = self.backend.wait_mounted("d1")
        self.states.mounted_now("d1", "/m")
        self.assertEqual(self.successResultOf(d), "/m")
        self.assertEqual(self.states.waiting(), 0)
        self.assertEqual(self.backend.local_state("d1").state, "attaching")

    def test_wait_when_already_mounted(self):
        """``wait_mounted`` fires at once for a dataset already mounted."""
        self.states.report_state("d1", "mounted", "/m")
        self.assertEqual(self.successResultOf(self.backend.wait_mounted("d1")), "/m")

    def test_wait_cancel(self):
        """A cancelled wait is forgotten."""
        d = self.backend.wait_mounted("d1")
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.states.waiting(), 0)
        self.states.report_state("d1", "mounted", "/m")

    def test_forget(self):
        """A dataset reported gone has no state and no mount path."""
        self.states.report_state("d1", "mounted", "/m")
        self.states.report_state("d1", None)
        self.assertIsNone(self.backend.local_state("d1"))
        self.assertNoResult(self.backend.wait_mounted("d1"))

    def test_is_mountpoint(self):
        """``is_mountpoint`` answers through a Deferred."""
        self.assertEqual((self.successResultOf(self.backend.is_mountpoint("/m")),
                          self.successResultOf(self.backend.is_mountpoint("/x"))),
                         (True, False))

    def test_report_all(self):
        """A whole report from the convergence loop sets each dataset's state, forgets
        those left out, and wakes the waits for those now mounted."""
        self.states.report_state("gone", "mounted", "/g")
        d = self.backend.wait_mounted("d1")
        self.states.report_all(pmap({
            "d1": DatasetReport("d1", "mounted", "/m"),
            "d2": DatasetReport("d2", "moving")}))
        self.assertEqual(self.successResultOf(d), "/m")
        self.assertEqual(self.backend.local_state("d2"), LocalState("moving"))
        self.assertIsNone(self.backend.local_state("gone"))

    def test_agent_view_source(self):
        """The agent's ``AgentView`` becomes a ``ClusterView`` of its own entries (a lease
        counts until its expiration), converted once per new view."""
        agent_view = AgentView.from_snapshot(Snapshot(epoch="e1", version=1, datasets=(
            DatasetEntry("d1", A, metadata={"name": "v1"}, lease=Lease("d1", B, 150.0)),
            DatasetEntry("d2", B, metadata={"name": "v2"}, lease=Lease("d2", B, 50.0)),
            DatasetEntry("d3", B, metadata={"name": "v1"}, deleted=True)),
            nodes=(Node(A, "10.0.0.1"),)))
        source = agent_view_source(lambda: agent_view)
        view = source()
        self.assertIs(source(), view)
        self.assertIs(view.datasets, agent_view.datasets)
        self.assertEqual((view.by_name("v1").lease_holder(100.0),
                          view.by_name("v2").lease_holder(100.0),
                          view.by_name("v1").lease_holder(150.0)), (B, None, None))
        self.assertEqual((view.by_name("v1").dataset_id, dict(view.nodes)),
                         ("d1", {A: "10.0.0.1"}))
        self.assertIsNone(view.by_name("v3"))

    def test_view_from_records(self):
        """A view built from REST records indexes live datasets by name with their lease."""
        view = ClusterView.from_records(
            [Dataset("d1", A, metadata={"name": "v1"}),
             Dataset("d2", B, metadata={"name": "v1"}, deleted=True)],
            [Lease("d1", B, 10.0)], [Node(A, "10.0.0.1")])
        self.assertEqual(view.by_name("v1"), DatasetEntry("d1", A, metadata={"name": "v1"},
                                                          lease=Lease("d1", B, 10.0)))
        self.assertEqual(dict(view.nodes), {A: "10.0.0.1"})


@pytest_twisted.ensureDeferred
async def test_is_mountpoint_in_thread(tmp_path):
    """The real mount check, in a thread: ``/`` is a mount point, a fresh folder is not."""
    from twisted.internet import reactor
    check = is_mountpoint_in(in_reactor_pool(reactor))
    assert await check("/") is True
    assert await check(str(tmp_path)) is False
