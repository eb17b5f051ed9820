"""
The Docker plugin on the btrfs backend, end to end: ``docker run`` on n2 of a volume
whose primary is n1 moves it peer to peer (two-phase move) and the container sees n1's
data. A move that outlasts the plugin's time budget makes the Mount fail in time with the
bytes received and "retry when done" while the move goes on, and the next ``docker run``
succeeds once it is done; meanwhile n1 reports the transfer's progress at a steady rate.

The agents' transfers are throttled (``node.peer-bandwidth``) and the plugin's budget is
cut from 100 s to ``MOUNT_TIMEOUT`` (``plugin.mount-timeout``), so that the slow path
takes seconds, not minutes.
"""

from __future__ import annotations

import re
import threading
import time
import uuid

import pytest

from tests.harness.docker_cluster import PyflockDockerCluster
from tests.harness.dockerd import BUSYBOX_TAG, require_e2e, short_workdir, wait_for
from tests.harness.requirements import require_commands

pytestmark = pytest.mark.e2e

#: The plugin's time budget for a Mount here (dockerd's is 120 s).
MOUNT_TIMEOUT = 8

#: Bytes per second per transfer: 32 MiB take about 16 s, twice the budget (a move of a
#: few bytes took 2 s here, so the budget leaves room for a loaded machine).
THROTTLE = "2M"
BIG_MIB = 32


@pytest.fixture(scope="module")
def pyflock():
    """A control service and nodes n1 and n2, each agent on a btrfs pool of its own."""
    require_e2e()
    require_commands("btrfs", "mkfs.btrfs")
    with short_workdir() as workdir:
        cluster = PyflockDockerCluster(
            workdir, btrfs_pool_size="1G",
            agent_options={"peer_bandwidth": THROTTLE, "mount_timeout": MOUNT_TIMEOUT})
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.close()


@pytest.fixture
def nodes(pyflock):
    """n1 and n2; their containers are removed after the test."""
    yield pyflock["n1"], pyflock["n2"]
    for node in pyflock.nodes:
        if node.dockerd_running():
            node.remove_all_containers()


def run(node, volume: str, script: str, check: bool = True):
    """``docker run --rm`` of busybox with ``volume`` at /data, running ``sh -c script``."""
    return node.docker("run", "--rm", "--network", "none", "-v", f"{volume}:/data",
                       "--volume-driver", "pyflock", BUSYBOX_TAG, "sh", "-c", script,
                       check=check)


class ProgressWatch:
    """Polls ``/v1/state/datasets`` in a thread, keeping each new ``transfer`` of the
    dataset that node ``sender`` reports (``bytes_done``, ``bytes_total``)."""

    def __init__(self, cluster, dataset_id: str, sender: str):
        self.seen: list[tuple[int, int]] = []
        self._stop = threading.Event()

        def watch():
            while not self._stop.wait(0.1):
                for entry in cluster.rest.get("/v1/state/datasets"):
                    transfer = entry.get("transfer")
                    if (entry["dataset_id"], entry["primary"]) == (dataset_id, sender) \
                            and transfer is not None:
                        value = (transfer["bytes_done"], transfer["bytes_total"])
                        if not self.seen or self.seen[-1] != value:
                            self.seen.append(value)
        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()

    def stop(self) -> list:
        """Stop polling; the values seen."""
        self._stop.set()
        self._thread.join()
        return self.seen


def test_docker_run_moves_volume_from_other_host(pyflock, nodes):
    """A volume written on n1 is read by ``docker run`` on n2: moved peer to peer."""
    n1, n2 = nodes
    name = f"bmove-{uuid.uuid4().hex[:8]}"
    run(n1, name, "echo written-on-n1 > /data/f")
    dataset_id = pyflock.dataset(name)["dataset_id"]
    started = time.monotonic()
    assert run(n2, name, "cat /data/f").stdout == "written-on-n1\n"
    print(f"\n[btrfs docker] docker run on n2 with the move: {time.monotonic() - started:.2f} s")
    assert pyflock.dataset(name)["primary"] == pyflock.node_uuid(n2)
    wait_for(lambda: pyflock.state(dataset_id) == {pyflock.node_uuid(n2): "mounted"}, 30,
             "the volume mounted on n2 only")
    assert [e for e in pyflock.agent_events(n1, "pyflock:peer:move-sent")
            if e["dataset_id"] == dataset_id]


def test_slow_move_fails_mount_in_time_then_succeeds(pyflock, nodes):
    """A move longer than the Mount's budget: ``docker run`` on n2 fails when the budget
    ends or as soon as the rate seen shows the move will not end within it, with the bytes
    received so far and "retry when done"; the move goes on (n1
    reports its progress several times a second meanwhile), and once it is done the next
    ``docker run`` on n2 sees n1's data."""
    n1, n2 = nodes
    name = f"bslow-{uuid.uuid4().hex[:8]}"
    written = run(n1, name, f"dd if=/dev/urandom of=/data/big bs=1M count={BIG_MIB} "
                            f"2>/dev/null && sha256sum /data/big").stdout.split()[0]
    dataset_id = pyflock.dataset(name)["dataset_id"]
    sender, receiver = pyflock.node_uuid(n1), pyflock.node_uuid(n2)
    watch = ProgressWatch(pyflock, dataset_id, sender)
    try:
        started = time.monotonic()
        failed = run(n2, name, "sha256sum /data/big", check=False)
        took = time.monotonic() - started
        assert failed.returncode != 0, failed.stdout
        # At the budget's end, or earlier once the rate seen shows the move cannot end
        # within it (with the time left at that rate).
        after = re.search(rf"volume {name} is still moving to this node after (\d+) s",
                          failed.stderr)
        assert after and int(after.group(1)) <= MOUNT_TIMEOUT, failed.stderr
        assert "retry when done" in failed.stderr, failed.stderr
        done, total = map(float, re.search(r"([\d.]+) MiB of ([\d.]+) MiB received",
                                           failed.stderr).groups())
        assert 0 < done < total, failed.stderr
        print(f"\n[btrfs docker] Mount refused after {took:.1f} s: {failed.stderr.strip()}")
        # The move goes on without any Mount waiting for it.
        wait_for(lambda: pyflock.state(dataset_id) == {receiver: "mounted"}, 90,
                 "the move to n2 finished")
    finally:
        seen = watch.stop()
    assert run(n2, name, "sha256sum /data/big").stdout.split()[0] == written
    # Progress came at a steady rate, not only when n1's loop iterated: the ~16 s
    # transfer showed many values, each further than the one before.
    print(f"[btrfs docker] {len(seen)} progress values: {seen[:3]} ... {seen[-2:]}")
    assert len(seen) >= 6, seen
    assert [d for d, _ in seen] == sorted(d for d, _ in seen), seen
