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
    NOTHING, AttachVolume, CreateVolume, calculate_changes, in_parallel, view_desire,
)
from pyflock.agent._discovery import discover
from pyflock.agent._loop import (
    SPARE_DELAY, ConvergenceLoop, ConvergenceStalled, diff_affects, node_convergence_loop,
)
from pyflock.agent._runner import Runner, run_now
from tests.harness.memory import MemoryDisks, MemoryFilesystems
from pyflock.agent._view import AgentView
from pyflock.common._logging import events_of
from pyflock.common._records import DatasetEntry, DatasetReport, Lease, Node
from pyflock.common._wire import Diff, Snapshot

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

    def make_loop(self, run=None, discover=None, calculate=None, **kwargs):
        """A loop over the script (with ``run``, ``discover`` or ``calculate`` instead of
        its own), logging into ``self.events``."""
        s = self.script
        options = dict(describe=s.describe, waiting=lambda desired, discovered: False,
                       interval=10.0, backoff=1.0, max_backoff=8.0, max_steps=20,
                       logger=Logger(observer=self.events.append), node_uuid="node-a")
        options.update(kwargs)
        return ConvergenceLoop(self.clock, discover or s.discover, calculate or s.calculate,
                               run or s.run, s.report, **options)

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

    def test_background_failure_backs_off(self):
        """A change run in the background that fails makes the iteration fail and back
        off, the change left out until the retry."""
        loop = self.make_loop(background=lambda leaf: True)
        self.script.changes = 1
        self.script.errors["run"] = [Boom()]
        loop.start()
        loop.update("v1")
        self.assertEqual((2, 1, 1), (self.script.discoveries, len(self.script.ran),
                                     loop.failures))
        self.assertEqual(1.0, loop.next_wake)
        self.clock.advance(1)
        self.assertEqual((2, 0), (len(self.script.ran), loop.failures))

    def test_iteration_ends_after_background(self):
        """``stop`` waits for the changes still running in the background."""
        held = []

        def run(change):
            held.append(Deferred())
            return held[-1]
        loop = self.make_loop(run=run, background=lambda leaf: True)
        self.script.changes = 1
        loop.start()
        loop.update("v1")
        stopped = loop.stop()
        self.assertNoResult(stopped)
        held.pop().callback(None)
        self.successResultOf(stopped)

    def test_background_end_during_discovery(self):
        """A dataset whose background change ended while a discovery ran is left out of
        that step (it may have been seen half changed) and taken up at the next one."""
        create_a, attach_b = CreateVolume("a"), AttachVolume("b", "node-a")
        plans = [in_parallel([create_a, attach_b]), in_parallel([create_a, attach_b]),
                 in_parallel([create_a]), NOTHING]
        discoveries, held, ran = [], [], []

        def discover():
            discoveries.append(Deferred())
            return discoveries[-1]

        def run(change):
            ran.append(change)
            if change == create_a and len(held) == 0:
                held.append(Deferred())
                return held[0]
            return succeed(None)
        loop = self.make_loop(run=run, discover=discover,
                              calculate=lambda desired, discovered: plans.pop(0),
                              background=lambda leaf: leaf == create_a)
        loop.start()
        loop.update("v1")
        discoveries.pop(0).callback("first")
        self.assertEqual([create_a, in_parallel([attach_b])], ran)
        held[0].callback(None)  # ends while the second discovery runs
        discoveries.pop(0).callback("second")
        self.assertEqual([create_a, in_parallel([attach_b]), in_parallel([attach_b])], ran)
        discoveries.pop(0).callback("third")
        self.assertEqual(create_a, ran[3])
        discoveries.pop(0).callback("fourth")
        self.assertEqual(([], 0, False), (plans, loop.failures, loop.busy))

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

    def configure(self, primary, deleted=False, order=(NODE_A, NODE_B), extra=None,
                  retained_until=None):
        """
        Push a view with dataset ``ds`` on ``primary`` (and ``extra`` datasets, id to
        primary) to both nodes, in ``order``.
        """
        self.version = getattr(self, "version", 0) + 1
        datasets = {"ds": DatasetEntry("ds", primary, 64 * MiB, deleted=deleted,
                                       retained_until=retained_until)}
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


    def test_retained_delete_keeps_volume(self):
        """A deleted dataset whose data is retained is unmounted and detached but kept,
        mounts again, never recreated, when restored, and goes once no longer retained."""
        self.configure(NODE_A)
        self.configure(NODE_A, deleted=True, retained_until=5000.0)
        fs, backend = self.nodes[NODE_A][1], self.store.backend(NODE_A)
        self.assertEqual(({}, [("ds", None)]), (fs.table, [
            (v.dataset_id, v.attached_to) for v in backend.list_volumes()]))
        self.configure(NODE_A)
        self.assertEqual({"/mnt/node-a/ds"}, set(fs.table))
        self.assertEqual(["CreateVolume", "CreateFilesystem"], [
            e["change"] for e in events_of(self.events, "pyflock:agent:change-done")
            if e["change"] in ("CreateVolume", "CreateFilesystem", "DestroyVolume")])
        self.configure(NODE_A, deleted=True)
        self.assertEqual([], backend.list_volumes())


def lease_view(version, expiration, holder=NODE_A, primary=NODE_A, extra=()):
    """A view of dataset ``ds`` on ``primary`` leased to ``holder`` until ``expiration``."""
    datasets = {"ds": DatasetEntry("ds", primary, 64 * MiB,
                                   lease=Lease("ds", holder, expiration))}
    for dataset_id in extra:
        datasets[dataset_id] = DatasetEntry(dataset_id, NODE_B, 64 * MiB)
    return AgentView(epoch="e", version=version, datasets=datasets,
                     nodes={n: Node(n, "127.0.0.1") for n in [NODE_A, NODE_B]})


def lease_diff(version, expiration, holder=NODE_A, primary=NODE_A):
    """The diff that sets ``ds``'s lease (and primary) at ``version``."""
    return Diff(epoch="e", version=version, datasets=(
        DatasetEntry("ds", primary, 64 * MiB, lease=Lease("ds", holder, expiration)),))


class DiffAffectsTests(SynchronousTestCase):
    """``diff_affects`` judges a diff on its own entries, as the whole view would be."""

    def setUp(self):
        self.affects = diff_affects(NODE_A)
        self.desired = view_desire(NODE_A)(lease_view(1, 100.0), 10.0)

    def test_renewal(self):
        """Renewing a live lease of the same holder changes nothing."""
        self.assertFalse(self.affects(self.desired, lease_diff(2, 200.0), 10.0))

    def test_new_holder(self):
        """A lease taken by another node changes the desired state."""
        self.assertTrue(self.affects(self.desired, lease_diff(2, 200.0, holder=NODE_B), 10.0))

    def test_expired_lease_renewed(self):
        """A lease renewed after it expired makes a holder appear again."""
        expired = view_desire(NODE_A)(lease_view(1, 100.0), 150.0)
        self.assertTrue(self.affects(expired, lease_diff(2, 300.0), 150.0))

    def test_moved(self):
        """A new primary changes the desired state."""
        self.assertTrue(self.affects(self.desired, lease_diff(2, 200.0, primary=NODE_B),
                                     10.0))

    def test_removed_and_nodes(self):
        """A purge of a known dataset, or a node's death, changes it; a snapshot may."""
        self.assertTrue(self.affects(self.desired, Diff(epoch="e", version=2,
                                                        removed=("ds",)), 10.0))
        self.assertFalse(self.affects(self.desired, Diff(epoch="e", version=2,
                                                         removed=("other",)), 10.0))
        self.assertTrue(self.affects(self.desired, Diff(epoch="e", version=2, nodes=(
            Node(NODE_B, "127.0.0.1", alive=False),)), 10.0))
        self.assertTrue(self.affects(self.desired, Snapshot(epoch="e", version=2), 10.0))


class RenewalTests(SynchronousTestCase):
    """A lease renewal pushed to a settled node costs its diff, not the whole view."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(10)
        store = MemoryBlockStore()
        backend = store.backend(NODE_A)
        fs = MemoryFilesystems(MemoryDisks(store), backend)
        self.discoveries = 0
        self.desires = 0
        desire = view_desire(NODE_A)

        def discover_now():
            self.discoveries += 1
            return run_now(discover, backend, fs, "/mnt/a")

        def counting_desire(view, now):
            self.desires += 1
            return desire(view, now)
        self.loop = ConvergenceLoop(
            self.clock, discover_now, calculate_changes, Runner(backend, fs, run_now).run,
            lambda states: None, desire=counting_desire, affects=diff_affects(NODE_A),
            node_uuid=NODE_A)
        self.loop.start()
        self.loop.update(lease_view(1, 100.0, extra=[f"other-{n}" for n in range(50)]))
        self.assertEqual(0, self.loop.failures)

    def test_renewal_wakes_nothing(self):
        """A renewal neither wakes the loop nor computes the desired state."""
        discoveries, desires = self.discoveries, self.desires
        view = lease_view(1, 100.0, extra=[f"other-{n}" for n in range(50)])
        for version in range(2, 12):
            diff = lease_diff(version, 100.0 + version)
            view = view.apply(diff)
            self.loop.update(view, diff)
        self.assertEqual((discoveries, desires), (self.discoveries, self.desires))

    def test_move_wakes(self):
        """A diff that moves the dataset away wakes the loop, which lets it go."""
        discoveries = self.discoveries
        view = lease_view(1, 100.0, extra=[f"other-{n}" for n in range(50)])
        diff = lease_diff(2, 100.0, holder=NODE_B, primary=NODE_B)
        self.loop.update(view.apply(diff), diff)
        self.assertGreater(self.discoveries, discoveries)

    def test_without_diff_judged_on_view(self):
        """An update without its diff is judged on the whole view, as before."""
        desires = self.desires
        self.loop.update(lease_view(2, 150.0, extra=[f"other-{n}" for n in range(50)]))
        self.assertGreater(self.desires, desires)


def test_node_loop_judges_diffs():
    """The agent's loop judges updates on their diffs with ``diff_affects``."""
    loop = node_convergence_loop(Clock(), MemoryBlockStore().backend(NODE_A), None, "/mnt",
                                 lambda states: None, run_blocking=run_now)
    assert loop._affects is not None


class HeldLane(list):
    """A ``run_blocking`` lane whose calls wait until the test lets them run."""

    def __call__(self, f, *args):
        d = Deferred()
        self.append((d, f, args))
        return d

    def release_all(self):
        """Run every held call (and those they lead to) until none is left."""
        while self:
            d, f, args = self.pop(0)
            try:
                result = f(*args)
            except Exception:
                d.errback()  # as a thread pool hands on an error
            else:
                d.callback(result)


class BackgroundTests(SynchronousTestCase):
    """A move's steps never wait behind a burst of volume creations."""

    def test_move_while_creations_run(self):
        """A dataset moving here is attached and mounted while new volumes are still
        being created, and those are made ready afterwards."""
        clock = Clock()
        store = MemoryBlockStore()
        disks = MemoryDisks(store)
        nodes = {}
        for node in (NODE_A, NODE_B):
            backend = store.backend(node)
            fs = MemoryFilesystems(disks, backend)
            lane = HeldLane()
            loop = node_convergence_loop(clock, backend, fs, f"/mnt/{node}",
                                         lambda states: None, run_blocking=run_now,
                                         slow=lane)
            loop.start()
            nodes[node] = (loop, fs, lane)

        def push(version, datasets):
            view = AgentView(epoch="e", version=version, datasets={
                i: DatasetEntry(i, primary, 64 * MiB) for i, primary in datasets.items()},
                nodes={n: Node(n, "127.0.0.1") for n in (NODE_A, NODE_B)})
            for node in (NODE_B, NODE_A):
                nodes[node][0].update(view)
        push(1, {"moved": NODE_B})
        nodes[NODE_B][2].release_all()
        self.assertEqual({"/mnt/node-b/moved"}, set(nodes[NODE_B][1].table))
        push(2, {"moved": NODE_A, "new-1": NODE_A, "new-2": NODE_A})
        a_loop, a_fs, a_lane = nodes[NODE_A]
        self.assertEqual({"/mnt/node-a/moved"}, set(a_fs.table))
        self.assertEqual(["CreateVolume", "CreateVolume"],
                         [type(args[0]).__name__ for _, _, args in a_lane])
        a_lane.release_all()
        self.assertEqual({"/mnt/node-a/moved", "/mnt/node-a/new-1", "/mnt/node-a/new-2"},
                         set(a_fs.table))
        self.assertEqual((False, 0), (a_loop.busy, a_loop.failures))


class AfterIterationTests(SynchronousTestCase):
    """The ``after_iteration`` hook follows every iteration, never during one."""

    def test_called_after_each_iteration(self):
        """The hook runs once per iteration (the one ``start`` makes without a view too),
        once it has ended (the loop is idle)."""
        script = Script(changes=2)
        seen = []
        clock = Clock()
        loop = ConvergenceLoop(clock, script.discover, script.calculate, script.run,
                               script.report, describe=script.describe,
                               waiting=lambda desired, discovered: False,
                               after_iteration=lambda: seen.append((loop.busy,
                                                                    len(script.ran))))
        loop.start()
        loop.update("v1")
        self.assertEqual([(False, 0), (False, 2)], seen)
        clock.advance(loop.interval)
        self.assertEqual([(False, 0), (False, 2), (False, 2)], seen)

    def test_hook_error_logged_loop_goes_on(self):
        """An error in the hook is logged and the loop keeps converging."""
        events, script = [], Script()
        clock = Clock()
        loop = ConvergenceLoop(clock, script.discover, script.calculate, script.run,
                               script.report, describe=script.describe,
                               waiting=lambda desired, discovered: False,
                               logger=Logger(observer=events.append),
                               after_iteration=lambda: 1 / 0)
        loop.start()
        loop.update("v1")
        self.assertEqual(2, len(events_of(events, "pyflock:agent:after-iteration-failed")))
        clock.advance(loop.interval)
        self.assertEqual(2, script.discoveries)


class SpareBackend:
    """A memory backend that counts its ``make_spares`` calls (and may fail them)."""

    def __init__(self):
        self.backend = MemoryBlockStore().backend(NODE_A)
        self.node_uuid = self.backend.node_uuid
        self.made = 0
        self.errors = []

    def make_spares(self):
        """Count a call, or raise the next of ``errors``."""
        if self.errors:
            raise self.errors.pop(0)
        self.made += 1
        return 1

    def __getattr__(self, name):
        return getattr(self.backend, name)


class SpareKeeperTests(SynchronousTestCase):
    """Spares are topped up off the loop's path: at start, then after creations only."""

    def setUp(self):
        self.clock = Clock()
        self.spares = SpareBackend()
        self.disks = MemoryDisks(self.spares.backend.store)
        self.lane = HeldLane()
        self.events = []
        self.fs = MemoryFilesystems(self.disks, self.spares.backend)
        self.loop = node_convergence_loop(
            self.clock, self.spares, self.fs,
            "/mnt/a", lambda states: None, run_blocking=run_now, slow=self.lane,
            logger=Logger(observer=self.events.append))
        self.loop.start()

    def push(self, version, *datasets):
        """Push a view asking for ``datasets`` on this node."""
        self.loop.update(AgentView(epoch="e", version=version, datasets={
            i: DatasetEntry(i, NODE_A, 64 * MiB) for i in datasets},
            nodes={NODE_A: Node(NODE_A, "127.0.0.1")}))

    def slow_calls(self):
        """The names of what waits in the slow lane."""
        return [getattr(f, "__name__", type(args[0]).__name__ if args else "?")
                for _, f, args in self.lane]

    def test_made_at_start_in_the_slow_lane_after_a_delay(self):
        """The first iteration's end asks for spares ``SPARE_DELAY`` later, in the slow
        lane, not before."""
        self.push(1)
        self.assertEqual([], self.slow_calls())
        self.clock.advance(SPARE_DELAY)
        self.assertEqual(["make_spares"], self.slow_calls())
        self.lane.release_all()
        self.assertEqual(1, self.spares.made)
        self.assertEqual([1], [e["count"] for e in
                               events_of(self.events, "pyflock:agent:spares-made")])

    def test_again_only_after_a_creation(self):
        """Iterations that create no volume make no spares; one that creates does, once
        the volume is mounted and ``SPARE_DELAY`` has passed."""
        self.push(1)
        self.clock.advance(SPARE_DELAY)
        self.lane.release_all()
        self.clock.advance(self.loop.interval)
        self.assertEqual([], self.slow_calls())
        self.push(2, "ds")
        self.assertEqual(["_create_volume"], [f.__name__ for _, f, _ in self.lane])
        self.lane.release_all()
        self.assertEqual(({"/mnt/a/ds"}, 1), (set(self.fs.table), self.spares.made))
        self.clock.advance(SPARE_DELAY)
        self.lane.release_all()
        self.assertEqual(2, self.spares.made)

    def test_never_two_at_once(self):
        """While spares are being made, another iteration's end starts no second run."""
        self.push(1)
        self.clock.advance(SPARE_DELAY)
        self.push(2, "ds")
        self.lane.release_all()
        self.clock.advance(SPARE_DELAY)
        self.assertEqual(1, self.spares.made)
        self.lane.release_all()
        self.assertEqual(2, self.spares.made)

    def test_stop_cancels_what_is_not_started(self):
        """Stopping the loop cancels spares asked for but not started yet."""
        self.push(1)
        self.loop.stop()
        self.clock.advance(SPARE_DELAY)
        self.assertEqual(([], 0), (self.slow_calls(), self.spares.made))

    def test_failure_logged_and_retried(self):
        """A failure to make spares is logged; the next iteration's end tries again."""
        self.spares.errors.append(OSError("disk full"))
        self.push(1)
        self.clock.advance(SPARE_DELAY)
        self.lane.release_all()
        [failed] = events_of(self.events, "pyflock:agent:spares-failed")
        self.assertEqual("disk full", failed["error"])
        self.clock.advance(self.loop.interval)
        self.clock.advance(SPARE_DELAY)
        self.lane.release_all()
        self.assertEqual(1, self.spares.made)
