"""
Tests for the convergence loop with a ``Clock``: it wakes on updates and periodically,
repeats until nothing is left to do, runs one iteration at a time, backs off on errors and
never dies, reports states when they change; and, with the memory fake, takes a new
dataset through all its steps and moves one between nodes without waiting for a timer.
"""

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase
from pyrsistent import pmap

from pyflock.agent._backends import MemoryBlockStore, MiB
from pyflock.agent._convergence import (
    NOTHING, CreateVolume, calculate_changes, in_parallel, view_desire,
)
from pyflock.agent._discovery import discover
from pyflock.agent._loop import ConvergenceLoop, ConvergenceStalled
from pyflock.agent._runner import Runner, run_now
from tests.harness.memory import MemoryDisks, MemoryFilesystems
from pyflock.agent._view import AgentView
from pyflock.common._logging import events_of
from pyflock.common._records import DatasetEntry, DatasetReport, Node

CHANGE = in_parallel([CreateVolume("ds")])


class Boom(Exception):
    """An unexpected error."""


class Script:
    """
    Stand-ins for discover, calculate, run and report: ``changes`` is how many changes
    must still run (``calculate`` returns one while some must, each successful run makes
    one fewer); ``hold`` makes ``discover`` return Deferreds the test fires; ``errors``
    lists exceptions for the named step to raise, in turn.
    """

    def __init__(self, changes=0):
        self.changes = changes
        self.hold = False
        self.pending = []
        self.discoveries = 0
        self.calculated = []
        self.ran = []
        self.reports = []
        self.errors = {"discover": [], "calculate": [], "run": [], "report": []}
        self.states = "initial"

    def _maybe_fail(self, step):
        if self.errors[step]:
            raise self.errors[step].pop(0)

    def discover(self):
        self.discoveries += 1
        try:
            self._maybe_fail("discover")
        except Exception as e:
            return fail(e)
        if self.hold:
            d = Deferred()
            self.pending.append(d)
            return d
        return succeed(f"world-{self.discoveries}")

    def calculate(self, desired, discovered):
        self.calculated.append((desired, discovered))
        self._maybe_fail("calculate")
        return CHANGE if self.changes > 0 else NOTHING

    def run(self, change):
        self.ran.append(change)
        try:
            self._maybe_fail("run")
        except Exception as e:
            return fail(e)
        self.changes -= 1
        return succeed(None)

    def report(self, states):
        self._maybe_fail("report")
        self.reports.append(states)

    def describe(self, desired, discovered):
        return self.states


class ConvergenceLoopTests(SynchronousTestCase):
    """The loop's scheduling, error handling and reporting."""

    def setUp(self):
        self.clock = Clock()
        self.script = Script()
        self.events = []
        self.loop = self.make_loop()

    def make_loop(self, **kwargs):
        """A loop over the script, logging into ``self.events``."""
        s = self.script
        options = dict(describe=s.describe, waiting=lambda desired, discovered: False,
                       interval=10.0, backoff=1.0, max_backoff=8.0, max_steps=20,
                       logger=Logger(observer=self.events.append), node_uuid="node-a")
        options.update(kwargs)
        return ConvergenceLoop(self.clock, s.discover, s.calculate, s.run, s.report,
                               **options)

    def failed_events(self):
        """The ``converge-failed`` events so far."""
        return events_of(self.events, "pyflock:agent:converge-failed")

    def test_nothing_before_start_and_view(self):
        """The loop discovers nothing until it is started and has a desired state."""
        self.loop.update("v1")
        self.assertEqual(0, self.script.discoveries)
        loop = self.make_loop()
        loop.start()
        self.clock.advance(100)
        self.assertEqual(0, self.script.discoveries)
        loop.update("v1")
        self.assertEqual(1, self.script.discoveries)

    def test_no_desire_no_action(self):
        """While ``desire`` gives None (no view yet), nothing is discovered or reported."""
        loop = self.make_loop(desire=lambda view, now: None)
        loop.start()
        loop.update("empty view")
        self.clock.advance(100)
        self.assertEqual((0, []), (self.script.discoveries, self.script.reports))

    def test_update_converges_at_once(self):
        """An update runs discover -> calculate -> run until nothing is left, with no timer."""
        self.script.changes = 3
        self.loop.start()
        self.loop.update("v1")
        self.assertEqual((4, [CHANGE] * 3), (self.script.discoveries, self.script.ran))
        self.assertEqual([("v1", f"world-{i}") for i in range(1, 5)], self.script.calculated)
        converge = events_of(self.events, "pyflock:agent:converge")
        self.assertEqual([1, 2, 3], [e["step"] for e in converge])
        self.assertEqual("ds", converge[0]["dataset_ids"])
        [done] = events_of(self.events, "pyflock:agent:converged")
        self.assertEqual(3, done["steps"])

    def test_desire_gets_now(self):
        """``desire`` turns the latest view into the desired state at the reactor's time."""
        self.clock.advance(42)
        loop = self.make_loop(desire=lambda view, now: (view, now))
        loop.start()
        loop.update("v1")
        self.assertEqual([(("v1", 42.0), "world-1")], self.script.calculated)

    def test_one_iteration_at_a_time(self):
        """Updates during an iteration make exactly one more iteration follow it."""
        self.script.hold = True
        self.loop.start()
        self.loop.update("v1")
        self.loop.update("v2")
        self.loop.update("v3")
        self.loop.wake()
        self.assertEqual(1, self.script.discoveries)
        self.assertTrue(self.loop.busy)
        self.script.pending.pop(0).callback("w")
        self.assertEqual(2, self.script.discoveries)
        self.script.pending.pop(0).callback("w")
        self.assertEqual(2, self.script.discoveries)
        self.assertFalse(self.loop.busy)
        self.assertEqual(["v1", "v3"], [desired for desired, _ in self.script.calculated])

    def test_periodic(self):
        """Once converged the loop looks again after ``interval`` seconds, and again."""
        self.loop.start()
        self.loop.update("v1")
        self.clock.advance(9.9)
        self.assertEqual(1, self.script.discoveries)
        self.clock.advance(0.1)
        self.assertEqual(2, self.script.discoveries)
        self.clock.advance(10)
        self.assertEqual(3, self.script.discoveries)

    def test_update_resets_periodic_timer(self):
        """An update starts the periodic wait afresh, so there is one timer at a time."""
        self.loop.start()
        self.loop.update("v1")
        self.clock.advance(5)
        self.script.changes = 1
        self.loop.update("v2")
        self.assertEqual(1, len(self.clock.getDelayedCalls()))
        self.assertEqual(15.0, self.loop.next_wake)

    def test_update_asking_nothing_new_wakes_nothing(self):
        """
        After a clean iteration, an update with nothing to do and the same states to
        report (judged on the last discovery) neither discovers nor moves the timer.
        """
        self.loop.start()
        self.loop.update("v1")
        self.loop.update("v2")
        self.assertEqual((1, 10.0), (self.script.discoveries, self.loop.next_wake))
        self.assertEqual(("v2", "world-1"), self.script.calculated[-1])
        self.clock.advance(10)
        self.assertEqual([("v2", "world-2")], self.script.calculated[-1:])

    def test_update_asking_something_wakes(self):
        """An update with a change to make, or a new state to report, wakes the loop."""
        self.loop.start()
        self.loop.update("v1")
        self.script.changes = 1
        self.loop.update("v2")
        self.assertEqual((3, 1), (self.script.discoveries, len(self.script.ran)))
        self.script.states = "moving"
        self.loop.update("v3")
        self.assertEqual((4, ["initial", "moving"]),
                         (self.script.discoveries, self.script.reports))

    def test_waiting_woken_by_any_change_of_desire(self):
        """
        While waiting for another node, an update leaving the desired state as it was
        wakes nothing, and any other (another node letting go) wakes the loop at once.
        """
        loop = self.make_loop(waiting=lambda desired, discovered: True,
                              desire=lambda view, now: view[0])
        loop.start()
        loop.update(("held by a", 1))
        loop.update(("held by a", 2))
        self.assertEqual(1, self.script.discoveries)
        loop.update(("let go", 3))
        self.assertEqual(2, self.script.discoveries)
        self.assertEqual(1.0, loop.next_wake)

    def test_update_during_iteration_asking_nothing_new(self):
        """An update during an iteration that asks nothing new makes no iteration follow."""
        self.script.hold = True
        self.loop.start()
        self.loop.update("v1")
        self.loop.update("v2")
        self.script.pending.pop(0).callback("w")
        self.assertEqual((1, False), (self.script.discoveries, self.loop.busy))

    def test_update_after_failure_wakes(self):
        """After a failed iteration every update wakes the loop, whatever it asks."""
        self.script.errors["discover"] = [Boom()]
        self.loop.start()
        self.loop.update("v1")
        self.loop.update("v2")
        self.assertEqual((2, 0), (self.script.discoveries, self.loop.failures))

    def test_waiting_polls_sooner(self):
        """While waiting for another node, the loop looks again after ``poll_interval``."""
        loop = self.make_loop(waiting=lambda desired, discovered: True, poll_interval=1.0)
        loop.start()
        loop.update("v1")
        self.assertEqual(1.0, loop.next_wake)
        self.clock.advance(1)
        self.assertEqual(2, self.script.discoveries)

    def test_backoff(self):
        """Failures are logged and retried after 1, 2, 4, 8, 8 ... seconds."""
        self.script.changes = 1
        self.script.errors["run"] = [Boom("run failed")] * 6
        self.loop.start()
        self.loop.update("v1")
        delays = []
        for _ in range(6):
            delays.append(self.loop.next_wake - self.clock.seconds())
            self.clock.advance(delays[-1])
        self.assertEqual([1.0, 2.0, 4.0, 8.0, 8.0, 8.0], delays)
        failed = self.failed_events()
        self.assertEqual([1.0, 2.0, 4.0, 8.0, 8.0, 8.0], [e["retry_in"] for e in failed])
        self.assertEqual((0, 10.0), (self.loop.failures,
                                     self.loop.next_wake - self.clock.seconds()))
        self.assertEqual(("run failed", "Boom", LogLevel.error),
                         (failed[0]["error"], failed[0]["error_type"], failed[0]["log_level"]))
        self.assertIn("Boom", failed[0]["log_failure"].getTraceback())

    def test_backoff_resets_after_success(self):
        """After a successful iteration the next failure waits the shortest delay again."""
        self.script.errors["discover"] = [Boom(), Boom(), Boom()]
        self.loop.start()
        self.loop.update("v1")
        self.clock.advance(1)
        self.clock.advance(2)
        self.assertEqual(3, self.loop.failures)
        self.clock.advance(4)
        self.assertEqual((0, 10.0), (self.loop.failures, self.loop.next_wake - 7.0))
        self.script.errors["discover"] = [Boom()]
        self.clock.advance(10)
        self.assertEqual(1.0, self.loop.next_wake - self.clock.seconds())

    def test_never_dies(self):
        """Errors in any step (and in reporting) are logged and the loop carries on."""
        for step in ["discover", "calculate", "run"]:
            self.script.changes = 1
            self.script.errors[step] = [Boom(step)]
            self.loop.start()
            self.loop.update(step)
            self.assertFalse(self.loop.busy)
            self.assertEqual(step, self.failed_events()[-1]["error"])
        self.script.errors["report"] = [Boom("report")]
        self.script.states = "changed"
        self.loop.update("again")
        [report_failed] = events_of(self.events, "pyflock:agent:report-failed")
        self.assertIn("Boom", report_failed["log_failure"].getTraceback())
        ran = len(self.script.ran)
        self.script.changes = 1
        self.loop.update("last")
        self.assertEqual((ran + 1, 0), (len(self.script.ran), self.loop.failures))

    def test_failed_change_skipped_until_retry(self):
        """
        After a change fails, the iteration rediscovers at once but leaves that change
        out; it is retried after the backoff.
        """
        self.script.changes = 1
        self.script.errors["run"] = [Boom()]
        self.loop.start()
        self.loop.update("v1")
        self.assertEqual((2, 1), (self.script.discoveries, len(self.script.ran)))
        self.assertEqual(1.0, self.loop.next_wake)
        self.clock.advance(1)
        self.assertEqual((4, 2, 0), (self.script.discoveries, len(self.script.ran),
                                     self.loop.failures))

    def test_update_during_failing_iteration_retries_at_once(self):
        """An update that arrived while an iteration failed is acted on at once."""
        self.script.hold = True
        self.script.changes = 1
        self.script.errors["run"] = [Boom()]
        self.loop.start()
        self.loop.update("v1")
        self.loop.update("v2")
        for _ in range(4):
            self.script.pending.pop(0).callback("w")
        self.assertEqual(([], 0), (self.script.pending, self.script.changes))
        self.assertEqual((1, 10.0), (len(self.failed_events()), self.loop.next_wake))

    def test_expected_errors_without_traceback(self):
        """A backend refusal is logged as a warning with its message, no traceback."""
        from pyflock.agent._backends import VolumeBusy
        self.script.changes = 1
        self.script.errors["run"] = [VolumeBusy("ds", ("/dev/loop3",))]
        self.loop.start()
        self.loop.update("v1")
        [failed] = self.failed_events()
        self.assertEqual((LogLevel.warn, "VolumeBusy"), (failed["log_level"],
                                                          failed["error_type"]))
        self.assertNotIn("log_failure", failed)
        self.assertIn("/dev/loop3", failed["error"])

    def test_stalled(self):
        """An iteration that never runs out of changes stops after ``max_steps``, backs off."""
        self.script.changes = 1000
        self.loop.start()
        self.loop.update("v1")
        self.assertEqual(20, len(self.script.ran))
        [failed] = self.failed_events()
        self.assertEqual("ConvergenceStalled", failed["error_type"])
        self.assertEqual(1.0, self.loop.next_wake)
        self.assertIsInstance(ConvergenceStalled(20, CHANGE), Exception)

    def test_reports_when_changed(self):
        """States are reported at the first discovery and then only when they change."""
        self.script.changes = 2
        self.loop.start()
        self.loop.update("v1")
        self.assertEqual(["initial"], self.script.reports)
        self.script.states = "later"
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(["initial", "later"], self.script.reports)

    def test_report_deferred_failure_retried(self):
        """A report whose Deferred fails is logged and sent again at the next discovery."""
        results = [fail(Boom("channel down")), succeed(None)]
        reports = []

        def report(states):
            reports.append(states)
            return results.pop(0)
        s = self.script
        loop = ConvergenceLoop(self.clock, s.discover, s.calculate, s.run, report,
                               describe=s.describe, waiting=lambda d, e: False,
                               logger=Logger(observer=self.events.append))
        loop.start()
        loop.update("v1")
        self.assertEqual(1, len(events_of(self.events, "pyflock:agent:report-failed")))
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(["initial", "initial"], reports)

    def test_stop_waits_for_iteration(self):
        """``stop`` fires once the iteration under way ends, and nothing wakes it after."""
        self.script.hold = True
        self.loop.start()
        self.loop.update("v1")
        stopped = self.loop.stop()
        self.assertNoResult(stopped)
        self.script.pending.pop(0).callback("w")
        self.successResultOf(stopped)
        self.assertEqual([], self.clock.getDelayedCalls())
        self.loop.update("v2")
        self.clock.advance(100)
        self.assertEqual(1, self.script.discoveries)

    def test_stop_when_idle(self):
        """``stop`` of an idle loop fires at once and cancels its timer."""
        self.loop.start()
        self.loop.update("v1")
        self.successResultOf(self.loop.stop())
        self.assertEqual([], self.clock.getDelayedCalls())


NODE_A = "node-a"
NODE_B = "node-b"


class MemoryNodesTests(SynchronousTestCase):
    """
    Loops of simulated nodes over one memory store, fed ``AgentView``s, with the real
    calculator and discovery.
    """

    def setUp(self):
        self.clock = Clock()
        self.store = MemoryBlockStore()
        self.disks = MemoryDisks(self.store)
        self.events = []
        self.nodes = {}
        self.discoveries = {NODE_A: 0, NODE_B: 0}
        for node in [NODE_A, NODE_B]:
            backend = self.store.backend(node)
            fs = MemoryFilesystems(self.disks, backend)
            log = Logger(observer=self.events.append)
            runner = Runner(backend, fs, run_now, logger=log)
            reports = []

            def discover_now(backend=backend, fs=fs, node=node):
                self.discoveries[node] += 1
                return run_now(discover, backend, fs, f"/mnt/{node}")
            loop = ConvergenceLoop(
                self.clock, discover_now,
                calculate_changes, runner.run, reports.append, desire=view_desire(node),
                logger=log, node_uuid=node)
            loop.start()
            self.nodes[node] = (loop, fs, reports)

    def configure(self, primary, deleted=False, order=(NODE_A, NODE_B), extra=None):
        """
        Push a view with dataset ``ds`` on ``primary`` (and ``extra`` datasets, id to
        primary) to both nodes, in ``order``.
        """
        self.version = getattr(self, "version", 0) + 1
        datasets = {"ds": DatasetEntry("ds", primary, 64 * MiB, deleted=deleted)}
        for dataset_id, node in (extra or {}).items():
            datasets[dataset_id] = DatasetEntry(dataset_id, node, 64 * MiB)
        view = AgentView(epoch="e", version=self.version, datasets=datasets,
                         nodes={n: Node(n, "127.0.0.1") for n in [NODE_A, NODE_B]})
        for node in order:
            self.nodes[node][0].update(view)

    def test_new_dataset_mounted_without_timer(self):
        """A new dataset is created, attached, formatted and mounted on one update."""
        self.configure(NODE_A)
        loop, fs, reports = self.nodes[NODE_A]
        self.assertEqual({"/mnt/node-a/ds"}, set(fs.table))
        self.assertEqual(
            ["creating", "attaching", "mounted"],
            [r["ds"].state for r in reports])
        self.assertEqual(DatasetReport("ds", "mounted", "/mnt/node-a/ds", 64 * MiB),
                         reports[-1]["ds"])
        self.assertEqual(["CreateVolume", "AttachVolume", "CreateFilesystem",
                          "MountFilesystem"],
                         [e["change"] for e in
                          events_of(self.events, "pyflock:agent:change-done")])

    def test_move(self):
        """
        A moved dataset leaves its old node at once; the new node, which saw it still
        held and is told nothing more (no channel here), looks again after a second, the
        safety net, and mounts it.
        """
        self.configure(NODE_A)
        self.configure(NODE_B, order=(NODE_B, NODE_A))
        a, b = self.nodes[NODE_A], self.nodes[NODE_B]
        self.assertEqual(({}, {}), (a[1].table, b[1].table))
        self.assertEqual(pmap(), a[2][-1])
        self.assertEqual("moving", b[2][-1]["ds"].state)
        self.clock.advance(1)
        self.assertEqual({"/mnt/node-b/ds"}, set(b[1].table))
        self.assertEqual("mounted", b[2][-1]["ds"].state)

    def test_other_nodes_dataset_wakes_nothing(self):
        """A push about a dataset on another node makes this node discover nothing."""
        self.configure(NODE_A)
        before = dict(self.discoveries)
        self.configure(NODE_A, extra={"new": NODE_A})
        self.assertEqual((before[NODE_A] + 3, before[NODE_B]),
                         (self.discoveries[NODE_A], self.discoveries[NODE_B]))
        self.assertEqual({"/mnt/node-a/ds", "/mnt/node-a/new"},
                         set(self.nodes[NODE_A][1].table))

    def test_busy_detach_retried(self):
        """
        A detach refused because a container still holds the device is logged and
        retried with backoff; once the container lets go, the move completes.
        """
        self.configure(NODE_A)
        release = self.store.hold("ds")
        self.configure(NODE_B)
        a, b = self.nodes[NODE_A], self.nodes[NODE_B]
        [failed] = events_of(self.events, "pyflock:agent:change-failed")
        self.assertEqual(("DetachVolume", "VolumeBusy", NODE_A),
                         (failed["change"], failed["error_type"], failed["node_uuid"]))
        self.assertEqual(1.0, a[0].next_wake - self.clock.seconds())
        self.clock.advance(1)
        self.assertEqual({}, b[1].table)
        release()
        self.clock.advance(2)
        self.assertEqual({"/mnt/node-b/ds"}, set(b[1].table))

    def test_stuck_dataset_does_not_slow_others(self):
        """
        While one dataset's detach keeps failing (a container holds it), a new dataset
        still goes through all its steps at once.
        """
        self.configure(NODE_A)
        release = self.store.hold("ds")
        self.addCleanup(release)
        self.configure(NODE_B, extra={"new": NODE_A})
        a = self.nodes[NODE_A]
        self.assertEqual({"/mnt/node-a/new"}, set(a[1].table))
        self.assertEqual("mounted", a[2][-1]["new"].state)
        self.assertEqual(1.0, a[0].next_wake - self.clock.seconds())

    def test_delete(self):
        """A deleted dataset is unmounted, detached and destroyed by its primary."""
        self.configure(NODE_A)
        self.configure(NODE_A, deleted=True)
        self.assertEqual([], self.store.backend(NODE_A).list_volumes())
        self.assertEqual((set(), {}), (self.nodes[NODE_A][1].directories,
                                       self.nodes[NODE_A][1].table))
        self.assertEqual(pmap(), self.nodes[NODE_A][2][-1])
