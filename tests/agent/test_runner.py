"""
Tests for running changes: the ``IFilesystems`` contract (memory fake and real), the
runner's leaves, guards and combinators over the memory fake, and, as root on real loop
devices with the real reactor and its threads, whole lifecycles: create -> mounted and
writable, a move between two nodes keeping the data, a delete leaving nothing, a reboot,
a busy detach, takeover from a dead node, and repairs of half-made filesystems and stray
mounts. No blocking call ever runs on the reactor thread.
"""

import os
import shutil
import tempfile
import uuid

import pytest
import pytest_twisted
from pyrsistent import pmap
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel
from twisted.python import threadable
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pyflock.agent._backends import (
    AlreadyAttached, LoopbackBackend, MemoryBlockStore, UnattachedVolume, VolumeBusy,
)
from tests.contracts.backends import (
    detach_loop_devices_under, hold_in_namespace, loopback_root,
)
from pyflock.agent._convergence import (
    NOTHING, AttachVolume, CreateFilesystem, CreateVolume, Desired, DesiredDataset,
    DestroyVolume, DetachVolume, FinishFilesystem, MountFilesystem, RemoveMountPoint,
    UnmountFilesystem, calculate_changes, in_parallel, is_nothing, sequentially, summarize,
)
from pyflock.agent._discovery import (
    FilesystemCondition, classify, discover, discover_raw, filesystem_condition,
)
from pyflock.agent._fs import (
    CommandTimedOut, FilesystemError, is_mounted, mounted_device, read_mountinfo, run_command,
)
from pyflock.agent._loop import node_convergence_loop
from pyflock.agent._runner import (
    ChangesFailed, IFilesystems, LocalFilesystems, Runner, StaleChange, run_now,
)
from pyflock.agent._view import AgentView
from pyflock.common._logging import events_of
from pyflock.common._threads import in_reactor_pool
from pyflock.common._records import DatasetEntry, DatasetReport, Node as NodeValue
from tests.harness.memory import MemoryDisks, MemoryFilesystems
from tests.harness.requirements import ROOT

NODE_A = "0b0c7e62-9a4f-4d36-9d54-2a1f7d3c0a01"
NODE_B = "5d3f2c8e-1b6a-4f7e-8c2d-9e0a4b6c0b02"
SIZE = 64 * 1024 * 1024


def unmount_all_under(path):
    """Unmount every mount at or below ``path`` in this namespace, deepest first."""
    prefix = os.path.realpath(path)
    points = {m.mount_point for m in read_mountinfo()
              if m.mount_point == prefix or m.mount_point.startswith(prefix + "/")}
    for point in sorted(points, key=len, reverse=True):
        while is_mounted(point):
            run_command(["umount", point])


# ---------------------------------------------------------------------------------------
# The IFilesystems contract

def make_ifilesystems_tests(harness):
    """
    A test case class checking an ``IFilesystems`` implementation; ``harness(test)``
    sets ``test.backend``, ``test.fs``, ``test.root`` and ``test.make_half_made(dataset_id)``.
    """

    class IFilesystemsTests(SynchronousTestCase):
        """Contract tests for one ``IFilesystems`` implementation."""

        def setUp(self):
            harness(self)

        def device(self):
            """A fresh volume attached to this node; (dataset id, device)."""
            dataset_id = str(uuid.uuid4())
            self.backend.create_volume(dataset_id, SIZE)
            return dataset_id, self.backend.attach_volume(
                dataset_id, self.backend.node_uuid).device_path

        def condition(self, device):
            """The condition of the filesystem on ``device``."""
            return filesystem_condition(self.fs.probe(device))

        def test_interface(self):
            """The implementation provides ``IFilesystems``."""
            self.assertTrue(verifyObject(IFilesystems, self.fs))

        def test_blank(self):
            """A fresh device holds no filesystem."""
            _, device = self.device()
            self.assertEqual(FilesystemCondition.NONE, self.condition(device))

        def test_make_filesystem(self):
            """A made filesystem is ready; making one again is refused."""
            _, device = self.device()
            self.fs.make_filesystem(device)
            self.assertEqual(FilesystemCondition.READY, self.condition(device))
            self.assertRaises(FilesystemError, self.fs.make_filesystem, device)

        def test_half_made(self):
            """A half-made filesystem is recognised and finished; not twice."""
            dataset_id, device = self.device()
            self.make_half_made(dataset_id, device)
            self.assertEqual(FilesystemCondition.UNFINISHED, self.condition(device))
            self.fs.finish_filesystem(device)
            self.assertEqual(FilesystemCondition.READY, self.condition(device))
            self.assertRaises(FilesystemError, self.fs.finish_filesystem, device)

        def test_mount(self):
            """A mounted device is listed at its path, which discovery sees as mounted."""
            dataset_id, device = self.device()
            self.fs.make_filesystem(device)
            path = os.path.join(self.root, dataset_id)
            self.fs.mount(device, path)
            [mount] = self.fs.mounts(self.root)
            self.assertEqual(path, mount.mount_point)
            raw = discover_raw(self.backend, self.fs, self.root)
            self.assertEqual("mounted", classify(raw).get(dataset_id).state.value)

        def test_mount_again(self):
            """Mounting the same device again does nothing; another device is refused."""
            dataset_id, device = self.device()
            _, other = self.device()
            self.fs.make_filesystem(device)
            self.fs.make_filesystem(other)
            path = os.path.join(self.root, dataset_id)
            self.fs.mount(device, path)
            self.fs.mount(device, path)
            self.assertRaises(FilesystemError, self.fs.mount, other, path)
            self.assertEqual([path], [m.mount_point for m in self.fs.mounts(self.root)])

        def test_only_direct_children(self):
            """Mounts deeper under the root are not listed."""
            _, device = self.device()
            self.fs.make_filesystem(device)
            self.fs.mount(device, os.path.join(self.root, "x", "y"))
            self.assertEqual([], self.fs.mounts(self.root))
            self.fs.unmount(os.path.join(self.root, "x", "y"))

        def test_unmount_and_remove(self):
            """After an unmount the empty directory is listed, and removed on request."""
            dataset_id, device = self.device()
            self.fs.make_filesystem(device)
            path = os.path.join(self.root, dataset_id)
            self.fs.mount(device, path)
            self.assertRaises(FilesystemError, self.fs.remove_mount_point, path)
            self.fs.unmount(path)
            self.fs.unmount(path)
            self.assertEqual([], self.fs.mounts(self.root))
            self.assertIn(dataset_id, self.fs.empty_directories(self.root))
            self.fs.remove_mount_point(path)
            self.fs.remove_mount_point(path)
            self.assertNotIn(dataset_id, self.fs.empty_directories(self.root))

        def test_missing_root(self):
            """A missing root has no mounts and no directories."""
            missing = os.path.join(self.root, "missing")
            self.assertEqual((frozenset(), []), (self.fs.empty_directories(missing),
                                                 self.fs.mounts(missing)))

        def test_mount_holds_device(self):
            """
            A mounted volume cannot be detached (``VolumeBusy``); once unmounted its
            device goes away, and a retried detach returns normally.
            """
            dataset_id, device = self.device()
            self.fs.make_filesystem(device)
            path = os.path.join(self.root, dataset_id)
            self.fs.mount(device, path)
            self.assertRaises(VolumeBusy, self.backend.detach_volume, dataset_id)
            self.fs.unmount(path)
            [volume] = [v for v in self.backend.list_volumes() if v.dataset_id == dataset_id]
            self.assertIsNone(volume.device_path)
            self.backend.detach_volume(dataset_id)
            self.assertRaises(UnattachedVolume, self.backend.detach_volume, dataset_id)

    return IFilesystemsTests


def memory_filesystems(test):
    """The memory fake over a fresh store."""
    store = MemoryBlockStore()
    disks = MemoryDisks(store)
    test.backend = store.backend(NODE_A)
    test.fs = MemoryFilesystems(disks, test.backend)
    test.root = "/mnt/pyflock"
    test.make_half_made = lambda dataset_id, device: disks.set_condition(
        dataset_id, FilesystemCondition.UNFINISHED)


def local_filesystems(test):
    """The real filesystems over a loopback root, with a mount root (needs root)."""
    root = loopback_root(test)
    test.backend = LoopbackBackend(root, NODE_A)
    test.fs = LocalFilesystems()
    test.root = os.path.join(root, "mounts")
    test.addCleanup(unmount_all_under, test.root)
    # mkfs without the root preparation: what an agent stopped in the middle leaves.
    test.make_half_made = lambda dataset_id, device: run_command(
        ["mkfs.ext4", "-q", "-F", device])


class MemoryFilesystemsTests(make_ifilesystems_tests(memory_filesystems)):
    """The memory fake honours ``IFilesystems``."""


@pytest.mark.integration
class LocalFilesystemsTests(make_ifilesystems_tests(local_filesystems)):
    """The real filesystems honour ``IFilesystems`` (as root, on loop devices)."""


# ---------------------------------------------------------------------------------------
# The runner over the memory fake

class RunnerTests(SynchronousTestCase):
    """Each leaf, its guards against a changed world, the combinators and the logs."""

    def setUp(self):
        self.store = MemoryBlockStore()
        self.disks = MemoryDisks(self.store)
        self.a = self.store.backend(NODE_A)
        self.b = self.store.backend(NODE_B)
        self.fs = MemoryFilesystems(self.disks, self.a)
        self.events = []
        self.runner = Runner(self.a, self.fs, run_now,
                             logger=Logger(observer=self.events.append))

    def run_change(self, change):
        """Run ``change`` and return its (synchronous) result."""
        return self.successResultOf(self.runner.run(change))

    def fail_change(self, change):
        """Run ``change``, which must fail, and return the ``Failure``."""
        return self.failureResultOf(self.runner.run(change))

    def test_lifecycle(self):
        """Create, attach, mkfs, mount, unmount, remove, detach, destroy, one by one."""
        self.run_change(CreateVolume("ds", SIZE))
        self.run_change(AttachVolume("ds", NODE_A))
        device = self.a.get_device_path("ds")
        self.run_change(CreateFilesystem("ds", device))
        self.run_change(MountFilesystem("ds", device, "/m/ds"))
        self.assertEqual(["/m/ds"], [m.mount_point for m in self.fs.mounts("/m")])
        self.run_change(UnmountFilesystem("ds", "/m/ds"))
        self.run_change(RemoveMountPoint("ds", "/m/ds"))
        self.run_change(DetachVolume("ds", NODE_A))
        self.run_change(DestroyVolume("ds"))
        self.assertEqual(([], set()), (self.a.list_volumes(), self.fs.directories))
        done = events_of(self.events, "pyflock:agent:change-done")
        self.assertEqual(8, len(done))
        self.assertEqual(("AttachVolume", NODE_A, "ds", NODE_A),
                         (done[1]["change"], done[1]["node_uuid"], done[1]["dataset_id"],
                          done[1]["volume_node"]))

    def test_on_mounted(self):
        """``on_mounted`` hears of each mount done, with its dataset and mount point, and
        of nothing else."""
        heard = []
        runner = Runner(self.a, self.fs, run_now, logger=Logger(observer=self.events.append),
                        on_mounted=lambda *args: heard.append(args))
        self.successResultOf(runner.run(CreateVolume("ds", SIZE)))
        self.successResultOf(runner.run(AttachVolume("ds", NODE_A)))
        device = self.a.get_device_path("ds")
        self.successResultOf(runner.run(CreateFilesystem("ds", device)))
        self.assertEqual(heard, [])
        self.successResultOf(runner.run(MountFilesystem("ds", device, "/m/ds")))
        self.assertEqual(heard, [("ds", "/m/ds")])
        self.successResultOf(runner.run(UnmountFilesystem("ds", "/m/ds")))
        self.assertEqual(heard, [("ds", "/m/ds")])

    def _attach_and_mount(self):
        """A runner hearing mounts, and what it heard."""
        heard = []
        runner = Runner(self.a, self.fs, run_now, logger=Logger(observer=self.events.append),
                        on_mounted=lambda *args: heard.append(args))
        return runner, heard

    def test_attach_mounts_a_ready_filesystem(self):
        """An attach given a mount point mounts a volume whose filesystem is ready (a
        spare's, a moved volume's) at once, and ``on_mounted`` hears of it: no pass of
        its own for the mount."""
        runner, heard = self._attach_and_mount()
        self.successResultOf(runner.run(CreateVolume("ds", SIZE)))
        self.successResultOf(runner.run(AttachVolume("ds", NODE_A)))
        device = self.a.get_device_path("ds")
        self.successResultOf(runner.run(CreateFilesystem("ds", device)))
        self.successResultOf(runner.run(DetachVolume("ds", NODE_A)))
        self.successResultOf(runner.run(AttachVolume("ds", NODE_A, "/m/ds")))
        self.assertEqual(["/m/ds"], [m.mount_point for m in self.fs.mounts("/m")])
        self.assertEqual([("ds", "/m/ds")], heard)

    def test_attach_leaves_a_blank_volume_to_the_next_pass(self):
        """An attach given a mount point of a volume with no filesystem only attaches:
        making the filesystem is the next pass's."""
        runner, heard = self._attach_and_mount()
        self.successResultOf(runner.run(CreateVolume("ds", SIZE)))
        self.successResultOf(runner.run(AttachVolume("ds", NODE_A, "/m/ds")))
        self.assertIsNotNone(self.a.get_device_path("ds"))
        self.assertEqual(([], []), (self.fs.mounts("/m"), heard))

    def test_attach_done_when_its_mount_fails(self):
        """A mount after an attach that fails (the mount point taken) leaves the volume
        attached, the attach done, and the mount to the next pass, which sees why."""
        runner, heard = self._attach_and_mount()
        self.a.create_volume("ds", SIZE)
        device = self.a.attach_volume("ds", NODE_A).device_path
        self.fs.make_filesystem(device)
        self.a.detach_volume("ds")
        self.a.create_volume("other", SIZE)
        other = self.a.attach_volume("other", NODE_A).device_path
        self.fs.make_filesystem(other)
        self.fs.mount(other, "/m/ds")
        self.successResultOf(runner.run(AttachVolume("ds", NODE_A, "/m/ds")))
        self.assertIsNotNone(self.a.get_device_path("ds"))
        self.assertEqual([], heard)
        [skipped] = events_of(self.events, "pyflock:agent:mount-after-attach-skipped")
        self.assertEqual("ds", skipped["dataset_id"])
        self.assertEqual(["AttachVolume"], [e["change"] for e in events_of(
            self.events, "pyflock:agent:change-done")])

    def test_repeats_are_harmless(self):
        """Creating an existing volume and destroying a missing one succeed quietly."""
        self.run_change(CreateVolume("ds", SIZE))
        self.run_change(CreateVolume("ds", SIZE))
        self.run_change(DestroyVolume("ds"))
        self.run_change(DestroyVolume("ds"))
        self.assertEqual([], self.a.list_volumes())

    def test_attach_refused_when_attached_elsewhere(self):
        """The backend refuses an attach of a volume attached elsewhere; the runner says so."""
        self.a.create_volume("ds", SIZE)
        self.b.attach_volume("ds", NODE_B)
        failure = self.fail_change(AttachVolume("ds", NODE_A))
        failure.trap(AlreadyAttached)
        [failed] = events_of(self.events, "pyflock:agent:change-failed")
        self.assertEqual(("AttachVolume", "AlreadyAttached", LogLevel.warn),
                         (failed["change"], failed["error_type"], failed["log_level"]))
        self.assertIn(NODE_B, failed["error"])

    def test_device_changed(self):
        """A filesystem change for a device the volume no longer has does nothing."""
        self.a.create_volume("ds", SIZE)
        device = self.a.attach_volume("ds", NODE_A).device_path
        self.a.detach_volume("ds")
        self.b.attach_volume("ds", NODE_B)
        for change in [CreateFilesystem("ds", device), FinishFilesystem("ds", device),
                       MountFilesystem("ds", device, "/m/ds")]:
            self.fail_change(change).trap(StaleChange)
        self.assertEqual((FilesystemCondition.NONE, {}),
                         (self.disks.condition("ds"), self.fs.table))

    def test_detach_only_from_named_node(self):
        """A detach from a node that no longer holds the volume does nothing."""
        self.a.create_volume("ds", SIZE)
        self.b.attach_volume("ds", NODE_B)
        self.fail_change(DetachVolume("ds", NODE_A)).trap(StaleChange)
        self.assertEqual(NODE_B, self.a.list_volumes()[0].attached_to)

    def test_detach_already_gone(self):
        """Detaching a volume whose device is gone (or which is gone) succeeds."""
        self.run_change(DetachVolume("missing", NODE_A))
        self.a.create_volume("ds", SIZE)
        self.a.attach_volume("ds", NODE_A)
        self.store.lose_devices()
        self.run_change(DetachVolume("ds", NODE_A))
        self.assertEqual(AttachVolume("ds", NODE_B).node_uuid,
                         self.b.attach_volume("ds", NODE_B).attached_to)

    def test_take_over(self):
        """A detach names the (dead) holder, and any node's runner can make it."""
        self.a.create_volume("ds", SIZE)
        self.b.attach_volume("ds", NODE_B)
        self.run_change(DetachVolume("ds", NODE_B))
        self.run_change(AttachVolume("ds", NODE_A))
        self.assertEqual(NODE_A, self.a.list_volumes()[0].attached_to)

    def test_parallel_failures(self):
        """A parallel group runs every change, then fails with all the failures."""
        self.a.create_volume("x", SIZE)
        self.b.attach_volume("x", NODE_B)
        change = in_parallel([AttachVolume("x", NODE_A), CreateVolume("ok", SIZE),
                              DestroyVolume("x")])
        failure = self.fail_change(change)
        failure.trap(ChangesFailed)
        self.assertEqual([AlreadyAttached, AlreadyAttached],
                         [f.type for f in failure.value.failures])
        self.assertEqual(["ok", "x"], [v.dataset_id for v in self.a.list_volumes()])
        self.assertIn("attached to node", str(failure.value))

    def test_parallel_single_failure(self):
        """A parallel group with one failure fails with that very error."""
        self.fail_change(in_parallel([AttachVolume("missing", NODE_A),
                                      CreateVolume("ok", SIZE)])).trap(Exception)
        failure = self.fail_change(in_parallel([AttachVolume("missing", NODE_A)]))
        self.assertEqual("UnknownVolume", failure.type.__name__)

    def test_sequence_stops_at_failure(self):
        """A sequence stops at its first failure."""
        change = sequentially([CreateVolume("a", SIZE), AttachVolume("missing", NODE_A),
                               CreateVolume("b", SIZE)])
        self.fail_change(change)
        self.assertEqual(["a"], [v.dataset_id for v in self.a.list_volumes()])

    def test_nothing(self):
        """Running ``NOTHING`` does nothing and succeeds."""
        self.assertIsNone(self.run_change(NOTHING))
        self.assertEqual([], self.events)

    def test_unknown_change(self):
        """A value that is no change fails with a ``TypeError`` naming it."""
        failure = self.fail_change("not a change")
        failure.trap(TypeError)
        self.assertIn("not a change", str(failure.value))

    def test_create_passes_profile(self):
        """``CreateVolume`` hands the dataset's size and storage profile to the backend."""
        calls = []

        class Recording:
            node_uuid = NODE_A

            def create_volume(self, dataset_id, size, profile=None):
                calls.append((dataset_id, size, profile))
        runner = Runner(Recording(), self.fs, run_now)
        self.successResultOf(runner.run(CreateVolume("ds", SIZE, "silver")))
        self.assertEqual([("ds", SIZE, "silver")], calls)

    def test_unexpected_error_logged_with_traceback(self):
        """An unexpected error is logged at error level with its traceback."""
        class Broken:
            node_uuid = NODE_A

            def create_volume(self, dataset_id, size, profile=None):
                raise ZeroDivisionError("oops")
        runner = Runner(Broken(), self.fs, run_now,
                        logger=Logger(observer=self.events.append))
        self.failureResultOf(runner.run(CreateVolume("ds", SIZE))).trap(ZeroDivisionError)
        [failed] = events_of(self.events, "pyflock:agent:change-failed")
        self.assertEqual(LogLevel.error, failed["log_level"])
        self.assertIn("ZeroDivisionError", failed["log_failure"].getTraceback())


    def test_slow_changes_have_their_own_lane(self):
        """Creations, mkfs and destructions go to ``slow``; the steps of a move do not."""
        lanes = []

        def lane(name):
            def run(f, *args):
                lanes.append((name, type(args[0]).__name__))
                return run_now(f, *args)
            return run
        runner = Runner(self.a, self.fs, lane("quick"), slow=lane("slow"))
        self.successResultOf(runner.run(sequentially([
            CreateVolume("ds", SIZE), AttachVolume("ds", NODE_A)])))
        device = self.a.get_device_path("ds")
        self.successResultOf(runner.run(sequentially([
            CreateFilesystem("ds", device), MountFilesystem("ds", device, "/m/ds"),
            UnmountFilesystem("ds", "/m/ds"), DetachVolume("ds", NODE_A),
            DestroyVolume("ds")])))
        self.assertEqual([("slow", "CreateVolume"), ("quick", "AttachVolume"),
                          ("slow", "CreateFilesystem"), ("quick", "MountFilesystem"),
                          ("quick", "UnmountFilesystem"), ("quick", "DetachVolume"),
                          ("slow", "DestroyVolume")], lanes)

    def test_timed_out_command_is_expected(self):
        """A command killed at its deadline fails the change with a warning, no traceback."""
        class Hung(MemoryFilesystems):
            def unmount(self, path):
                raise CommandTimedOut(["umount", path], 120.0)
        runner = Runner(self.a, Hung(self.disks, self.a), run_now,
                        logger=Logger(observer=self.events.append))
        failure = self.failureResultOf(runner.run(UnmountFilesystem("ds", "/m/ds")))
        failure.trap(CommandTimedOut)
        [failed] = events_of(self.events, "pyflock:agent:change-failed")
        self.assertEqual((LogLevel.warn, "CommandTimedOut"),
                         (failed["log_level"], failed["error_type"]))
        self.assertNotIn("log_failure", failed)


@pytest.mark.integration
class LoopbackRunnerTests(SynchronousTestCase):
    """
    The leaves' guards over the real loopback backend, which reads only the volume a
    change is about (``get_volume``) rather than listing them all (as root).
    """

    def setUp(self):
        self.root = loopback_root(self)
        self.a = LoopbackBackend(self.root, NODE_A)
        self.b = LoopbackBackend(self.root, NODE_B)
        self.runner = Runner(self.a, LocalFilesystems(), run_now)
        self.dataset_id = str(uuid.uuid4())
        self.a.create_volume(self.dataset_id, SIZE)

    def test_detach(self):
        """A detach from the node holding the volume detaches it."""
        self.a.attach_volume(self.dataset_id, NODE_A)
        self.successResultOf(self.runner.run(DetachVolume(self.dataset_id, NODE_A)))
        self.assertIsNone(self.b.get_volume(self.dataset_id).attached_to)

    def test_detach_only_from_named_node(self):
        """A detach from a node that no longer holds the volume does nothing."""
        self.b.attach_volume(self.dataset_id, NODE_B)
        self.failureResultOf(self.runner.run(DetachVolume(self.dataset_id, NODE_A))
                             ).trap(StaleChange)
        self.assertEqual(NODE_B, self.a.get_volume(self.dataset_id).attached_to)

    def test_detach_already_gone(self):
        """Detaching a volume whose device is gone, or which is gone, succeeds."""
        self.successResultOf(self.runner.run(DetachVolume(str(uuid.uuid4()), NODE_A)))
        self.a.attach_volume(self.dataset_id, NODE_A)
        detach_loop_devices_under(self.root)
        self.successResultOf(self.runner.run(DetachVolume(self.dataset_id, NODE_A)))
        self.assertEqual(NODE_B, self.b.attach_volume(self.dataset_id, NODE_B).attached_to)

    def test_device_changed(self):
        """A filesystem change for a device the volume no longer has here does nothing."""
        device = self.a.attach_volume(self.dataset_id, NODE_A).device_path
        self.a.detach_volume(self.dataset_id)
        self.b.attach_volume(self.dataset_id, NODE_B)
        for change in [CreateFilesystem(self.dataset_id, device),
                       FinishFilesystem(self.dataset_id, device),
                       MountFilesystem(self.dataset_id, device,
                                       os.path.join(self.root, "m", self.dataset_id))]:
            self.failureResultOf(self.runner.run(change)).trap(StaleChange)
        self.assertFalse(os.path.exists(os.path.join(self.root, "m")))


# ---------------------------------------------------------------------------------------
# Real loop devices, real mounts, the real reactor and its threads

needs_root = ROOT


class OffReactor:
    """Wraps an object and records the names of methods called on the reactor thread."""

    def __init__(self, wrapped, on_reactor):
        self._wrapped = wrapped
        self._on_reactor = on_reactor

    def __getattr__(self, name):
        value = getattr(self._wrapped, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            if threadable.isInIOThread():
                self._on_reactor.append(name)
            return value(*args, **kwargs)
        return call


class Node:
    """One simulated node on a shared loopback root, with its own mount root."""

    def __init__(self, reactor, world, node_uuid):
        self.node_uuid = node_uuid
        #: For the test's own checks; the agent's parts get ``agent_backend``/``agent_fs``,
        #: which record any call made on the reactor thread.
        self.backend = LoopbackBackend(world.root, node_uuid)
        self.agent_backend = OffReactor(self.backend, world.on_reactor)
        self.agent_fs = OffReactor(LocalFilesystems(), world.on_reactor)
        self.mount_root = os.path.join(world.mounts, node_uuid[:8])
        self.run_blocking = in_reactor_pool(reactor)
        self.events = world.events
        self.runner = Runner(self.agent_backend, self.agent_fs, self.run_blocking,
                             logger=Logger(observer=world.events.append))

    def path(self, dataset_id):
        """Where ``dataset_id`` is mounted on this node."""
        return os.path.join(self.mount_root, dataset_id)

    async def step(self, desired):
        """One discover -> calculate -> run; (change, failure or None)."""
        discovered = await self.run_blocking(discover, self.agent_backend, self.agent_fs,
                                             self.mount_root)
        change = calculate_changes(desired, discovered)
        try:
            await self.runner.run(change)
        except Exception as e:
            return change, e
        return change, None

    async def converge(self, desired, steps=12):
        """Steps until nothing is left to do; every change must succeed."""
        for _ in range(steps):
            change, error = await self.step(desired)
            assert error is None, (summarize(change), error)
            if is_nothing(change):
                return
        raise AssertionError(f"{self.node_uuid} not converged after {steps} steps")


class World:
    """A loopback root and a folder of mount roots, cleaned up entirely afterwards."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="pf-conv-")
        self.mounts = os.path.join(self.root, "mnt")
        self.on_reactor = []
        self.events = []
        self.releases = []

    def cleanup(self):
        """Let go of holders, unmount, detach the loop devices by name, remove files."""
        for release in self.releases:
            release()
        unmount_all_under(self.mounts)
        detach_loop_devices_under(self.root)
        shutil.rmtree(self.root)

    def addCleanup(self, f, *args):
        """Register ``f`` to run at cleanup (the interface ``hold_in_namespace`` wants)."""
        self.releases.append(lambda: f(*args))


def desired_of(node_uuid, *datasets, nodes=None):
    """The desired state of ``node_uuid`` with ``datasets``; both nodes alive unless told."""
    return Desired(node_uuid=node_uuid,
                   datasets=pmap({d.dataset_id: d for d in datasets}),
                   nodes=pmap(nodes or {NODE_A: True, NODE_B: True}))


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs."""
    from twisted.internet import reactor
    return reactor


@pytest.fixture
def world():
    """A fresh loopback world; checks at the end that nothing blocked the reactor."""
    world = World()
    try:
        yield world
        assert [] == world.on_reactor, "blocking calls ran on the reactor thread"
    finally:
        world.cleanup()


def read(path):
    """The text in file ``path``."""
    with open(path) as f:
        return f.read()


def write(path, text):
    """Write ``text`` to file ``path`` and make it durable."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def nothing_left(world):
    """Assert that no volume file, record, loop device, mount or mount point remains."""
    assert [] == os.listdir(os.path.join(world.root, "volumes"))
    assert [] == os.listdir(os.path.join(world.root, "attachments"))
    detach_loop_devices_under(world.root)  # raises if a device was left
    for node_root in os.listdir(world.mounts):
        assert [] == os.listdir(os.path.join(world.mounts, node_root))
    prefix = os.path.realpath(world.mounts) + "/"
    assert [] == [m for m in read_mountinfo() if m.mount_point.startswith(prefix)]


@needs_root
@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_create_mounted_and_writable(reactor, world):
    """
    The agent's loop takes a new dataset through create, attach, mkfs and mount on one
    update, with no timer; the filesystem is empty, open to all and writable.
    """
    node = Node(reactor, world, NODE_A)
    reports = []
    mounted = Deferred()

    def report(states):
        reports.append(states)
        if "ds" in states and states["ds"].state == "mounted" and not mounted.called:
            mounted.callback(states["ds"])
    loop = node_convergence_loop(reactor, node.agent_backend, node.agent_fs, node.mount_root,
                                 report, interval=3600,
                                 logger=Logger(observer=world.events.append))
    loop.start()
    loop.update(AgentView(epoch="e", version=1,
                          datasets={"ds": DatasetEntry("ds", NODE_A, SIZE)},
                          nodes={NODE_A: NodeValue(NODE_A, "127.0.0.1")}))
    status = await mounted.addTimeout(60, reactor)
    await loop.stop()
    path = node.path("ds")
    assert DatasetReport("ds", "mounted", path, SIZE) == status
    assert ["creating", "attaching", "mounted"] == [r["ds"].state for r in reports]
    assert mounted_device(path) == node.backend.get_device_path("ds")
    assert [] == os.listdir(path)
    assert 0o777 == os.stat(path).st_mode & 0o777
    write(os.path.join(path, "file"), "hello")
    assert "hello" == read(os.path.join(path, "file"))
    assert () == node.backend.leftovers().stale_records


@needs_root
@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_move_keeps_data(reactor, world):
    """A dataset moved from node A to node B arrives there with its data, and leaves A."""
    a, b = Node(reactor, world, NODE_A), Node(reactor, world, NODE_B)
    on_a, on_b = DesiredDataset("ds", NODE_A, SIZE), DesiredDataset("ds", NODE_B, SIZE)
    await a.converge(desired_of(NODE_A, on_a))
    write(os.path.join(a.path("ds"), "data"), "moved")
    # B hears of the move first: it must wait for A to let go.
    assert (NOTHING, None) == await b.step(desired_of(NODE_B, on_b))
    await a.converge(desired_of(NODE_A, on_b))
    await b.converge(desired_of(NODE_B, on_b))
    assert "moved" == read(os.path.join(b.path("ds"), "data"))
    assert not os.path.exists(a.path("ds"))
    [volume] = b.backend.list_volumes()
    assert NODE_B == volume.attached_to


@needs_root
@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_delete_leaves_nothing(reactor, world):
    """A deleted dataset is unmounted, detached and destroyed: nothing is left behind."""
    a, b = Node(reactor, world, NODE_A), Node(reactor, world, NODE_B)
    await a.converge(desired_of(NODE_A, DesiredDataset("ds", NODE_A, SIZE)))
    deleted = DesiredDataset("ds", NODE_A, SIZE, deleted=True)
    await b.converge(desired_of(NODE_B, deleted))
    await a.converge(desired_of(NODE_A, deleted))
    nothing_left(world)


@needs_root
@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_reboot_remounts(reactor, world):
    """
    After a reboot (mounts and loop devices gone, attachment records stale) the node
    reattaches and remounts its dataset, data intact.
    """
    a = Node(reactor, world, NODE_A)
    desired = desired_of(NODE_A, DesiredDataset("ds", NODE_A, SIZE))
    await a.converge(desired)
    write(os.path.join(a.path("ds"), "data"), "survives")
    unmount_all_under(world.mounts)
    detach_loop_devices_under(world.root)
    assert ["ds"] == list(a.backend.leftovers().stale_records)
    await a.converge(desired)
    assert "survives" == read(os.path.join(a.path("ds"), "data"))
    assert () == a.backend.leftovers().stale_records


@needs_root
@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_busy_move_waits(reactor, world):
    """
    While a container's mount namespace still holds the filesystem, the old node's detach
    fails (and is retried) and the new node never attaches; once the container is gone,
    the move completes with the data.
    """
    a, b = Node(reactor, world, NODE_A), Node(reactor, world, NODE_B)
    await a.converge(desired_of(NODE_A, DesiredDataset("ds", NODE_A, SIZE)))
    write(os.path.join(a.path("ds"), "data"), "held")
    release = hold_in_namespace(world, a.backend.get_device_path("ds"),
                                os.path.join(world.root, "container"))
    moved = DesiredDataset("ds", NODE_B, SIZE)
    change, error = await a.step(desired_of(NODE_A, moved))  # unmount, then detach: busy
    assert (in_parallel([sequentially([
        UnmountFilesystem("ds", a.path("ds")), DetachVolume("ds", NODE_A),
        RemoveMountPoint("ds", a.path("ds"))])]), VolumeBusy) == (change, type(error))
    [failed] = events_of(world.events, "pyflock:agent:change-failed")
    assert "VolumeBusy" == failed["error_type"]
    for _ in range(2):
        assert (NOTHING, None) == await b.step(desired_of(NODE_B, moved))
        assert NODE_A == b.backend.list_volumes()[0].attached_to
    release()
    await a.converge(desired_of(NODE_A, moved))
    await b.converge(desired_of(NODE_B, moved))
    assert "held" == read(os.path.join(b.path("ds"), "data"))


@needs_root
@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_take_over_from_dead_node(reactor, world):
    """
    A dataset whose primary is now B but which a dead node A still holds is taken over
    by B once A's filesystem is no longer mounted anywhere; until then B's takeover
    fails with ``VolumeBusy`` and the volume stays on A.
    """
    a, b = Node(reactor, world, NODE_A), Node(reactor, world, NODE_B)
    await a.converge(desired_of(NODE_A, DesiredDataset("ds", NODE_A, SIZE)))
    write(os.path.join(a.path("ds"), "data"), "rescued")
    # A's agent is dead; its mount is still there.
    b_wants = desired_of(NODE_B, DesiredDataset("ds", NODE_B, SIZE),
                         nodes={NODE_A: False, NODE_B: True})
    change, error = await b.step(b_wants)
    assert (in_parallel([DetachVolume("ds", NODE_A)]), VolumeBusy) == (change, type(error))
    assert NODE_A == b.backend.list_volumes()[0].attached_to
    assert "rescued" == read(os.path.join(a.path("ds"), "data"))
    # A's mount goes (its host namespace is gone): the device goes with it.
    unmount_all_under(a.mount_root)
    await b.converge(b_wants)
    assert "rescued" == read(os.path.join(b.path("ds"), "data"))
    assert NODE_B == b.backend.list_volumes()[0].attached_to


@needs_root
@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_repairs(reactor, world):
    """A half-made filesystem is finished, and a stray mount at the mount point replaced."""
    a = Node(reactor, world, NODE_A)
    a.backend.create_volume("ds", SIZE)
    device = a.backend.attach_volume("ds", NODE_A).device_path
    run_command(["mkfs.ext4", "-q", "-F", device])
    os.makedirs(a.path("ds"))
    run_command(["mount", "-t", "tmpfs", "tmpfs", a.path("ds")])
    change, error = await a.step(desired_of(NODE_A, DesiredDataset("ds", NODE_A, SIZE)))
    assert (in_parallel([UnmountFilesystem("ds", a.path("ds"))]), None) == (change, error)
    change, error = await a.step(desired_of(NODE_A, DesiredDataset("ds", NODE_A, SIZE)))
    assert (in_parallel([sequentially([
        FinishFilesystem("ds", device), MountFilesystem("ds", device, a.path("ds"))])]),
        None) == (change, error)
    await a.converge(desired_of(NODE_A, DesiredDataset("ds", NODE_A, SIZE)))
    assert device == mounted_device(a.path("ds"))
    assert ([], 0o777) == (os.listdir(a.path("ds")), os.stat(a.path("ds")).st_mode & 0o777)
