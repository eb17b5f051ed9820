"""
A lease renewal through the agent's parts as ``pyflock-agent`` wires them: the channel
hands the diff it applied (``channel.change``) to the view file, which appends it, and to
the convergence loop, which judges it alone and sleeps on.
"""

import os
import shutil
import tempfile

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._backends import MemoryBlockStore, MiB
from pyflock.agent._channel import AgentChannel
from pyflock.agent._loop import node_convergence_loop
from pyflock.agent._view import ViewFile, diff_to_bytes, read_view
from pyflock.common._threads import run_now
from pyflock.common._records import Lease, Node
from pyflock.common._wire import (
    DatasetEntry, Diff, Snapshot, Welcome, encode,
)
from tests.harness.endpoints import StringEndpoint
from tests.harness.memory import MemoryDisks, MemoryFilesystems

NODE = "aaaaaaaa-0000-4000-8000-000000000001"
DS = "11111111-0000-4000-8000-000000000001"


def entry(expiration):
    """Dataset ``DS`` on ``NODE``, leased by it until ``expiration``."""
    return DatasetEntry(DS, NODE, 64 * MiB, lease=Lease(DS, NODE, expiration))


class RenewalTests(SynchronousTestCase):
    """A renewal costs its diff on disk and wakes no convergence."""

    def test_renewal(self):
        """The diff is appended to the view file and the loop does not rediscover."""
        clock = Clock()
        store = MemoryBlockStore()
        backend = store.backend(NODE)
        discoveries = []
        fs = MemoryFilesystems(MemoryDisks(store), backend)
        fs_mounts = fs.mounts
        fs.mounts = lambda root: discoveries.append(root) or fs_mounts(root)
        loop = node_convergence_loop(clock, backend, fs, "/mnt", lambda states: None,
                                     interval=3600.0, run_blocking=run_now)
        folder = tempfile.mkdtemp(prefix="pyflock-renewals-")
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "view.json")
        view_file = ViewFile(path, clock, run_in_thread=run_now)
        endpoint = StringEndpoint()
        channel = AgentChannel(
            clock, endpoint, NODE, "era",
            lambda view: loop.update(view, channel.change),
            save_view=lambda view: view_file.save(view, channel.change))
        loop.start()
        channel.start()
        endpoint.protocol.stringReceived(encode(Welcome(epoch="e", version=1)))
        endpoint.protocol.stringReceived(encode(Snapshot(
            epoch="e", version=1, datasets=(entry(60.0),),
            nodes=(Node(NODE, "127.0.0.1"),))))
        self.assertEqual({"/mnt/" + DS}, set(fs.table))
        before, rediscovered = open(path, "rb").read(), len(discoveries)
        renewal = Diff(epoch="e", version=2, datasets=(entry(80.0),))
        clock.advance(5)  # within the channel's silence timeout (two heartbeats, 10 s)
        endpoint.protocol.stringReceived(encode(renewal))
        self.assertEqual(channel.change, renewal)
        self.assertEqual(open(path, "rb").read(), before + diff_to_bytes(renewal))
        self.assertEqual(read_view(path), channel.view)
        self.assertEqual(rediscovered, len(discoveries))
