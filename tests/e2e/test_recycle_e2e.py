"""
The recycle bin on real dockerd: ``docker volume rm`` takes a pyflock volume out of every
host's ``docker volume ls`` and frees its name, but its data is kept; restored through the
REST API (under a new name, since a new volume took the old one), a container reads back
what it wrote before the rm.
"""

from __future__ import annotations

import pytest

from tests.e2e.test_plugin_e2e import listed, run, volume_name
from tests.harness.dockerd import wait_for

pytestmark = pytest.mark.e2e

DATASETS = "/v1/configuration/datasets"


def test_volume_rm_then_restore(pyflock, nodes):
    """A removed volume's data survives ``docker volume rm``; restored under a new name,
    it is a volume again on every host, with its data."""
    n1, n2 = nodes
    name = volume_name("binned")
    n1.docker("volume", "create", "-d", "pyflock", name)
    run(n1, name, "sh", "-c", "echo precious > /data/file && sync")
    dataset_id = pyflock.dataset(name)["dataset_id"]

    n1.docker("volume", "rm", name)
    assert pyflock.dataset(name) is None
    assert ("pyflock", name) not in listed(n1)
    wait_for(lambda: ("pyflock", name) not in listed(n2), 30, "the volume gone from n2")
    wait_for(lambda: not pyflock.mounted_on(n1, dataset_id), 30, "the volume unmounted")
    [kept] = [d for d in pyflock.rest.get(DATASETS) if d["dataset_id"] == dataset_id]
    assert kept["deleted"] and kept["retained_until"]

    # The name is free at once: a new, empty volume takes it.
    n1.docker("volume", "create", "-d", "pyflock", name)
    taker = pyflock.dataset(name)["dataset_id"]
    assert taker != dataset_id
    status, _ = pyflock.rest.request("POST", f"{DATASETS}/{dataset_id}/restore")
    assert status == 409
    old = f"{name}-old"
    status, restored = pyflock.rest.request("POST", f"{DATASETS}/{dataset_id}/restore",
                                            {"metadata": {"name": old}})
    assert (status, restored["deleted"]) == (200, False), restored
    wait_for(lambda: ("pyflock", old) in listed(n2), 30, "the restored volume on n2")
    assert run(n1, old, "cat", "/data/file").stdout.strip() == "precious"
    assert run(n1, name, "ls", "/data").stdout.strip() == ""

    # Emptied from the bin by a user, both go for good.
    for volume, gone in ((name, taker), (old, dataset_id)):
        n1.docker("volume", "rm", volume)
        assert pyflock.rest.request("DELETE", f"{DATASETS}/{gone}?purge=true")[0] == 200


def test_volume_prune_leaves_pyflock_volumes(pyflock, nodes):
    """``docker volume prune --all`` removes only dockerd's own ``local`` volumes: an
    unused pyflock volume stays a live dataset, listed, its data untouched."""
    n1, _ = nodes
    name = volume_name("unpruned")
    n1.docker("volume", "create", "-d", "pyflock", name)
    run(n1, name, "sh", "-c", "echo kept > /data/file && sync")
    prune = n1.docker("volume", "prune", "--all", "--force", check=False)
    if prune.returncode != 0:        # a dockerd older than 23 has no --all
        n1.docker("volume", "prune", "--force")
    assert ("pyflock", name) in listed(n1)
    dataset_id = pyflock.dataset(name)["dataset_id"]
    assert run(n1, name, "cat", "/data/file").stdout.strip() == "kept"
    n1.docker("volume", "rm", name)
    assert pyflock.rest.request("DELETE", f"{DATASETS}/{dataset_id}?purge=true")[0] == 200
