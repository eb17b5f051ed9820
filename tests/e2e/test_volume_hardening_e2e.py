"""
Volumes on the host (issue 8, point 8): a container on real dockerd plants a setuid-root
program and a device file in a pyflock volume; on the host, the mount is ``nosuid,nodev``
and the mount root is root's alone, so neither gives a host user anything.

The cluster (``pyflock`` fixture, tests/e2e/conftest.py) is this module's own.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from pathlib import Path

import pytest

from tests.harness.dockerd import BUSYBOX_TAG, wait_for

pytestmark = pytest.mark.e2e

#: Run a command as the unprivileged host user nobody (runuser drops every capability
#: before it executes the command; setpriv would still hold them while it does).
NOBODY = ("runuser", "-u", "nobody", "--")


def test_planted_setuid_program_gains_nothing(pyflock, nodes):
    """A setuid-root program a container wrote runs as the host user who starts it, a
    device file it made cannot be opened, and host users cannot reach the mount at all."""
    n1, _ = nodes
    name = f"setuid-{uuid.uuid4().hex[:8]}"
    n1.docker("run", "-d", "--name", "planter", "--network", "none", "-v",
              f"{name}:/data", "--volume-driver", "pyflock", BUSYBOX_TAG,
              "sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait")
    # The program is the host's own id(1), so it runs on the host as it is.
    n1.docker("cp", shutil.which("id"), "planter:/data/id")
    n1.docker("exec", "planter", "sh", "-c",
              "chown 0:0 /data/id && chmod 4755 /data/id && mknod /data/zero c 1 5")
    dataset_id = pyflock.dataset(name)["dataset_id"]
    wait_for(lambda: pyflock.mounted_on(n1, dataset_id), 30, "the volume mounted on n1")
    mount_point = Path(pyflock.mount_point(n1, dataset_id))
    program = str(mount_point / "id")
    assert stat.S_IMODE(os.stat(n1.namespace_path(program)).st_mode) == 0o4755

    [options] = [line.split()[3] for line in n1.run_in_namespace(
        ["cat", "/proc/self/mounts"]).stdout.splitlines()
        if line.split()[1] == str(mount_point)]
    assert {"nosuid", "nodev"} <= set(options.split(","))

    # The mount root is root's alone: a host user cannot even reach the program.
    root = mount_point.parent
    assert stat.S_IMODE(os.stat(n1.namespace_path(root)).st_mode) == 0o700
    refused = n1.run_in_namespace([*NOBODY, program, "-u"], check=False)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr

    # Even with every folder on the way opened to all, nosuid holds.
    opened = []
    for folder in [*reversed(mount_point.parents)][1:]:
        path = n1.namespace_path(folder)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o001 == 0:
            opened.append((path, mode))
            os.chmod(path, mode | 0o011)
    try:
        ran = n1.run_in_namespace([*NOBODY, program, "-u"])
    finally:
        for path, mode in reversed(opened):
            os.chmod(path, mode)
    assert ran.stdout.strip() == "65534"
    # nodev: not even root on the host opens the planted device file.
    read = n1.run_in_namespace(["head", "-c", "1", str(mount_point / "zero")], check=False)
    assert read.returncode != 0 and "Permission denied" in read.stderr
