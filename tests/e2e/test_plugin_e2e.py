"""
The Docker volume plugin end to end: the docker CLI against real dockerd on two simulated
hosts (n1, n2), each with a real ``pyflock-agent`` serving the plugin, and a real control
service. Covers the volume commands, volumes following containers between hosts, leases
(a volume in use on one host cannot be taken by the other), shared volumes, ``docker cp``
and ``docker restart``, dockerd and agent restarts, the control service being down, and
malformed requests sent straight to the plugin's socket.

The cluster (``pyflock`` fixture, tests/e2e/conftest.py) is shared by the module; each test
uses volume names of its own, and its containers are removed after it.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import uuid

import pytest

from tests.harness.dockerd import BUSYBOX_TAG, DockerNode, wait_for

pytestmark = pytest.mark.e2e

#: A container that keeps running, and stops at once on SIGTERM (busybox sleep as PID 1
#: would ignore it).
LONG_RUNNING = ("sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait")

GiB = 1024 ** 3

#: Seconds within which ``docker run`` must be refused when another node holds the
#: volume's lease. The design promises the Mount "fails at once, naming the holder": one
#: lease request to the control service, then Docker's own error path, about a second in
#: all (a ``docker run`` of busybox alone takes 0.3-0.8 s here). 15 s leaves room for a
#: loaded two-core machine, yet a Mount that waited for a move instead (up to the
#: plugin's 100 s ``MOUNT_TIMEOUT``, near Docker's 120 s limit) fails it clearly.
FAIL_FAST_SECONDS = 15.0

#: ``docker run`` of busybox with an anonymous pyflock volume at /data.
RUN_ANONYMOUS = ("run", "--rm", "--network", "none", "-v", "/data", "--volume-driver",
                 "pyflock", BUSYBOX_TAG)


def volume_name(what: str) -> str:
    """A volume name no other test (or earlier run on the same cluster) uses."""
    return f"{what}-{uuid.uuid4().hex[:8]}"


def run(node: DockerNode, volume: str, *command: str, check: bool = True, detach: str = "",
        extra: tuple[str, ...] = ()):
    """``docker run`` of busybox with ``volume`` at /data (the image has /data, so the
    copy-up Mount happens); detached as container ``detach`` if given, else ``--rm``."""
    how = ("-d", "--name", detach) if detach else ("--rm",)
    return node.docker("run", *how, "--network", "none", "-v", f"{volume}:/data",
                       "--volume-driver", "pyflock", *extra, BUSYBOX_TAG, *command,
                       check=check)


def inspect(node: DockerNode, name: str) -> dict:
    """``docker volume inspect`` of ``name`` on ``node``."""
    [volume] = json.loads(node.docker("volume", "inspect", name).stdout)
    return volume


def listed(node: DockerNode) -> set[tuple[str, str]]:
    """``(driver, name)`` of every volume ``docker volume ls`` shows on ``node``."""
    output = node.docker("volume", "ls", "--format", "{{.Driver}} {{.Name}}").stdout
    return {tuple(line.split(" ", 1)) for line in output.splitlines() if line}


def exec_(node: DockerNode, container: str, script: str) -> str:
    """The output of ``sh -c script`` in ``container`` on ``node``."""
    return node.docker("exec", container, "sh", "-c", script).stdout


def wait_mounts_here(node: DockerNode, name: str, count: int) -> None:
    """Wait until ``docker volume inspect`` on ``node`` counts ``count`` mounts of ``name``
    (dockerd unmounts a stopped container's volumes as it cleans up after it)."""
    wait_for(lambda: inspect(node, name)["Status"]["mounts_here"] == count, 30,
             f"{count} mount(s) of {name} on {node.name}")


def running(node: DockerNode, container: str) -> bool:
    """Whether ``container`` runs on ``node``."""
    result = node.docker("inspect", "-f", "{{.State.Running}}", container, check=False)
    return result.stdout.strip() == "true"


# -- volume commands ---------------------------------------------------------------------


def test_create_list_inspect_remove(pyflock, nodes):
    """``docker volume create/ls/inspect/rm`` make, show and delete a cluster dataset,
    listed on both hosts with driver pyflock and scope global."""
    n1, n2 = nodes
    name = volume_name("cmd")
    assert n1.docker("volume", "create", "-d", "pyflock", "-o", "size=1G",
                     name).stdout.strip() == name
    dataset = pyflock.dataset(name)
    assert dataset["primary"] == pyflock.node_uuid(n1)
    assert dataset["maximum_size"] == GiB
    assert ("pyflock", name) in listed(n1)
    # n2 answers from its own view of the cluster, which the control service updates.
    wait_for(lambda: ("pyflock", name) in listed(n2), 30, "the new volume listed on n2")

    mount_point = pyflock.mount_point(n1, dataset["dataset_id"])
    def mounted():
        volume = inspect(n1, name)
        return volume if volume["Mountpoint"] else None
    # The agent creates and mounts it on its primary on its own; inspect then shows where.
    volume = wait_for(mounted, 30, "the new volume mounted on n1")
    assert volume["Driver"] == "pyflock"
    assert volume["Scope"] == "global"
    assert volume["Mountpoint"] == mount_point
    assert volume["Status"]["dataset_id"] == dataset["dataset_id"]
    assert volume["Status"]["size"] == "1G"
    assert volume["Status"]["state"] == "mounted"
    assert volume["Status"]["primary_host"] == n1.address
    assert pyflock.mounted_on(n1, dataset["dataset_id"])
    elsewhere = inspect(n2, name)
    assert elsewhere["Scope"] == "global"
    assert elsewhere["Mountpoint"] == ""
    assert elsewhere["Status"]["state"] == "on another node"

    n1.docker("volume", "rm", name)
    assert pyflock.dataset(name) is None
    assert ("pyflock", name) not in listed(n1)
    wait_for(lambda: not pyflock.mounted_on(n1, dataset["dataset_id"]), 30,
             "the deleted volume unmounted from n1")


@pytest.mark.parametrize("option, error", [
    ("size=lots", "pyflock: invalid size 'lots' for volume {name}: use a binary size"),
    ("colour=red", "pyflock: unknown option 'colour' for volume {name}: pyflock accepts"),
], ids=["size=lots", "colour=red"])
def test_bad_create_option(pyflock, nodes, option, error):
    """A bad ``-o`` option makes ``docker volume create`` fail with pyflock's Err, and
    creates nothing."""
    n1, _ = nodes
    name = volume_name("bad")
    result = n1.docker("volume", "create", "-d", "pyflock", "-o", option, name, check=False)
    assert result.returncode != 0
    assert error.format(name=name) in result.stderr
    assert pyflock.dataset(name) is None
    assert ("pyflock", name) not in listed(n1)


# -- volumes follow containers -----------------------------------------------------------


def test_volume_moves_with_container(pyflock, nodes):
    """Data written by a container on n1 is read by a container on n2 using the same
    volume name: the volume moved to n2."""
    n1, n2 = nodes
    name = volume_name("move")
    run(n1, name, "sh", "-c", "echo written-on-n1 > /data/f")
    dataset_id = pyflock.dataset(name)["dataset_id"]

    assert run(n2, name, "cat", "/data/f").stdout == "written-on-n1\n"
    assert pyflock.dataset(name)["primary"] == pyflock.node_uuid(n2)
    wait_for(lambda: pyflock.state(dataset_id) == {pyflock.node_uuid(n2): "mounted"}, 30,
             "both agents' reports showing the volume mounted on n2 only")
    assert pyflock.mounted_on(n2, dataset_id)
    assert not pyflock.mounted_on(n1, dataset_id)


def test_in_use_elsewhere_fails_fast(pyflock, nodes):
    """While a container on n1 uses a volume, ``docker run`` on n2 fails at once naming
    n1 and nothing moves; once that container stops, n2 gets the volume and its data."""
    n1, n2 = nodes
    name = volume_name("busy")
    run(n1, name, *LONG_RUNNING, detach="holder")
    exec_(n1, "holder", "echo data > /data/f")
    dataset_id = pyflock.dataset(name)["dataset_id"]
    assert pyflock.lease_holder(dataset_id) == pyflock.node_uuid(n1)

    began = time.monotonic()
    refused = run(n2, name, "cat", "/data/f", check=False)
    elapsed = time.monotonic() - began
    assert refused.returncode != 0
    assert (f"pyflock: volume {name} is in use on node {pyflock.node_uuid(n1)} "
            f"(host {n1.address})") in refused.stderr
    # Refused by the lease at once, not by waiting for a move until the Mount gave up.
    assert elapsed < FAIL_FAST_SECONDS, (elapsed, refused.stderr)
    assert pyflock.dataset(name)["primary"] == pyflock.node_uuid(n1)
    assert pyflock.mounted_on(n1, dataset_id)
    assert exec_(n1, "holder", "cat /data/f") == "data\n"
    removal = n2.docker("volume", "rm", name, check=False)
    assert removal.returncode != 0
    assert (f"pyflock: volume {name} is in use on node {pyflock.node_uuid(n1)} "
            f"(host {n1.address}): stop and remove the containers") in removal.stderr
    assert pyflock.dataset(name) is not None

    n1.docker("stop", "holder")
    wait_for(lambda: pyflock.lease_holder(dataset_id) is None, 30,
             "n1's lease released after its container stopped")
    assert run(n2, name, "cat", "/data/f").stdout == "data\n"
    assert pyflock.dataset(name)["primary"] == pyflock.node_uuid(n2)


def test_anonymous_volume(pyflock, nodes):
    """An anonymous pyflock volume of a ``--rm`` container is created for it and deleted
    from the cluster when it exits."""
    n1, _ = nodes
    created = len(pyflock.agent_events(n1, "pyflock:plugin:created"))
    assert n1.docker(*RUN_ANONYMOUS, "sh", "-c", "echo x > /data/f; cat /data/f"
                     ).stdout == "x\n"
    [event] = pyflock.agent_events(n1, "pyflock:plugin:created")[created:]
    name = event["name"]
    assert len(name) == 64
    # dockerd removes a --rm container's volumes just after the CLI saw it removed.
    removed = pyflock.wait_agent_event(n1, "pyflock:plugin:removed",
                                       where=lambda e: e["name"] == name)
    assert removed["dataset_id"] == event["dataset_id"]
    assert pyflock.dataset(name) is None


# -- several users of one volume on one host -----------------------------------------------


def test_shared_volume_cp_and_restart(pyflock, nodes, tmp_path):
    """Two containers share a volume; ``docker cp`` into one and ``docker restart`` of
    one keep it mounted and leased; only when the last user goes is the lease released,
    and the volume stays mounted where it is."""
    n1, _ = nodes
    name = volume_name("shared")
    run(n1, name, *LONG_RUNNING, detach="first")
    run(n1, name, *LONG_RUNNING, detach="second")
    dataset_id = pyflock.dataset(name)["dataset_id"]
    me = pyflock.node_uuid(n1)

    def check_in_use(users: int) -> None:
        wait_mounts_here(n1, name, users)
        assert pyflock.lease_holder(dataset_id) == me
        assert pyflock.state(dataset_id) == {me: "mounted"}
        assert pyflock.mounted_on(n1, dataset_id)

    check_in_use(2)
    (tmp_path / "copied").write_text("copied in\n")
    # cp sends Mount(X) and Unmount(X) for a mount ID already in use by "first".
    n1.docker("cp", tmp_path / "copied", "first:/data/copied")
    assert exec_(n1, "second", "cat /data/copied") == "copied in\n"
    check_in_use(2)

    n1.docker("restart", "-t", "1", "first")
    assert running(n1, "first")
    check_in_use(2)
    exec_(n1, "first", "echo after restart >> /data/copied")
    assert exec_(n1, "second", "cat /data/copied") == "copied in\nafter restart\n"

    n1.docker("rm", "-f", "first")
    check_in_use(1)
    n1.docker("rm", "-f", "second")
    wait_mounts_here(n1, name, 0)
    wait_for(lambda: pyflock.lease_holder(dataset_id) is None, 30,
             "the lease released after the last user left")
    assert pyflock.state(dataset_id) == {me: "mounted"}
    assert pyflock.mounted_on(n1, dataset_id)


# -- restarts and outages ------------------------------------------------------------------


def test_dockerd_restart_brings_volume_back(pyflock, nodes):
    """After dockerd restarts, a ``--restart=always`` container runs again with its
    pyflock volume mounted, leased and its data intact."""
    n1, _ = nodes
    name = volume_name("always")
    run(n1, name, *LONG_RUNNING, detach="keeper", extra=("--restart=always",))
    exec_(n1, "keeper", "echo before restart > /data/f")
    dataset_id = pyflock.dataset(name)["dataset_id"]

    n1.restart_dockerd()
    wait_for(lambda: running(n1, "keeper"), 60, "the container running again")
    assert exec_(n1, "keeper", "cat /data/f") == "before restart\n"
    assert inspect(n1, name)["Status"]["mounts_here"] == 1
    assert pyflock.lease_holder(dataset_id) == pyflock.node_uuid(n1)
    assert pyflock.mounted_on(n1, dataset_id)


def test_dockerd_crash_frees_volumes(pyflock, nodes):
    """After dockerd crashes (no Unmounts) and starts again, the volume of a container
    that died with it is free for another host, and a ``--restart=always`` container's
    volume counts its one mount, and is released when that container stops."""
    n1, n2 = nodes
    died, revived = volume_name("died"), volume_name("revived")
    run(n1, died, *LONG_RUNNING, detach="victim")
    run(n1, revived, *LONG_RUNNING, detach="phoenix", extra=("--restart=always",))
    exec_(n1, "phoenix", "echo survived > /data/f")
    died_id = pyflock.dataset(died)["dataset_id"]
    revived_id = pyflock.dataset(revived)["dataset_id"]

    n1.kill_dockerd()
    n1.start_dockerd()
    wait_for(lambda: running(n1, "phoenix"), 60, "the container running again")
    wait_for(lambda: not running(n1, "victim"), 30, "the crashed container stopped")
    # The agent corrects its counts once the new dockerd answers.
    wait_mounts_here(n1, died, 0)
    assert inspect(n1, revived)["Status"]["mounts_here"] == 1
    assert exec_(n1, "phoenix", "cat /data/f") == "survived\n"
    wait_for(lambda: pyflock.lease_holder(died_id) is None, 30,
             "the lease of the dead container's volume released")
    assert run(n2, died, "true").returncode == 0
    assert pyflock.lease_holder(revived_id) == pyflock.node_uuid(n1)

    n1.docker("rm", "-f", "phoenix")
    wait_mounts_here(n1, revived, 0)
    wait_for(lambda: pyflock.lease_holder(revived_id) is None, 30,
             "the lease released once the revived container is gone")


def test_agent_restart_and_control_down(pyflock, nodes):
    """A running container keeps its data across a restart of the agent and while the
    control service is down; ``docker volume ls`` and ``inspect`` keep answering from the
    agents' own view."""
    n1, n2 = nodes
    name = volume_name("outage")
    run(n1, name, *LONG_RUNNING, detach="worker")
    exec_(n1, "worker", "echo one > /data/f")
    dataset_id = pyflock.dataset(name)["dataset_id"]
    me = pyflock.node_uuid(n1)

    pyflock.restart_agent(n1)
    # The count is known again (kept on disk, checked against dockerd's containers).
    reconciled = pyflock.agent_events(n1, "pyflock:plugin:mounts-reconciled")[-1]
    assert json.loads(reconciled["after"]).get(name) == 1
    assert exec_(n1, "worker", "echo two >> /data/f; cat /data/f") == "one\ntwo\n"
    assert ("pyflock", name) in listed(n1)
    volume = inspect(n1, name)
    assert volume["Status"]["mounts_here"] == 1
    assert volume["Status"]["state"] == "mounted"
    assert pyflock.lease_holder(dataset_id) == me

    connected = {node.name: len(pyflock.agent_events(node, "pyflock:agent:channel-connected"))
                 for node in (n1, n2)}
    pyflock.control.stop()
    try:
        assert exec_(n1, "worker", "echo three >> /data/f; cat /data/f") == \
            "one\ntwo\nthree\n"
        assert ("pyflock", name) in listed(n1)
        assert ("pyflock", name) in listed(n2)
        volume = inspect(n1, name)
        assert volume["Mountpoint"] == pyflock.mount_point(n1, dataset_id)
        assert volume["Status"]["state"] == "mounted"
        assert volume["Status"]["mounts_here"] == 1
        assert inspect(n2, name)["Status"]["state"] == "on another node"
    finally:
        pyflock.control.start()
        for node in (n1, n2):
            pyflock.wait_agent_event(node, "pyflock:agent:channel-connected",
                                     after=connected[node.name])
    assert exec_(n1, "worker", "cat /data/f") == "one\ntwo\nthree\n"
    assert pyflock.lease_holder(dataset_id) == me
    # The restarted agent's counts are right: the container's stop releases the lease.
    n1.docker("stop", "worker")
    wait_for(lambda: pyflock.lease_holder(dataset_id) is None, 30,
             "the lease released once the container stopped")


# -- malformed requests straight to the socket -----------------------------------------------


def plugin_request(node: DockerNode, method: str, path: str, body: bytes = b"",
                   host: bool = True) -> tuple[int, dict]:
    """One raw HTTP/1.1 request to ``node``'s plugin socket: ``(status, JSON reply)``;
    without ``host``, no Host header at all."""
    headers = [f"{method} {path} HTTP/1.1", f"Content-Length: {len(body)}",
               "Accept: application/vnd.docker.plugins.v1.2+json", "Connection: close"]
    if host:
        headers.insert(1, "Host: plugin")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(node.plugins / "pyflock.sock"))
        sock.sendall("\r\n".join(headers).encode() + b"\r\n\r\n" + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


MALFORMED = [
    ("POST", "/VolumeDriver.Create", b'{"Name": "x1", ', "the request body is not valid JSON"),
    ("POST", "/VolumeDriver.Get", b"\xff\xfe{}", "the request body is not valid JSON"),
    ("POST", "/VolumeDriver.Get", b"[1, 2]", "the request body must be a JSON object"),
    ("POST", "/VolumeDriver.Get", b"{}", 'the request has no volume name'),
    ("POST", "/VolumeDriver.Mount", b'{"ID": "a"}', 'the request has no volume name'),
    ("POST", "/VolumeDriver.Remove", b'{"Name": 5}', 'the request has no volume name'),
    ("POST", "/VolumeDriver.Mount", b'{"Name": "x1", "ID": 7}',
     '"ID" must be a string (the mount ID), not 7'),
    ("POST", "/VolumeDriver.Unmount", b'{"Name": "x1", "ID": ["a"]}',
     '"ID" must be a string (the mount ID)'),
    ("POST", "/VolumeDriver.Create", b'{"Name": "x1", "Opts": "big"}',
     '"Opts" must be an object of strings or null'),
    ("POST", "/VolumeDriver.Create", b'{"Name": "x1", "Opts": {"size": 5}}',
     "option 'size' for volume x1 must be a string"),
    ("POST", "/VolumeDriver.Create", b'{"Name": "../etc"}', "invalid volume name '../etc'"),
]


@pytest.mark.parametrize("method, path, body, error", MALFORMED,
                         ids=[f"{p[14:] or p}-{i}" for i, (_, p, _, _) in enumerate(MALFORMED)])
def test_malformed_request(pyflock, nodes, method, path, body, error):
    """A malformed request gets HTTP 200 with an Err saying what is wrong, and the agent
    goes on serving dockerd."""
    n1, _ = nodes
    status, reply = plugin_request(n1, method, path, body)
    assert status == 200
    assert reply["Err"].startswith("pyflock: ")
    assert error in reply["Err"]
    assert n1.process_running("agent")
    assert not pyflock.agent_events(n1, "pyflock:plugin:internal-error")
    assert n1.docker("volume", "ls").returncode == 0


def test_unknown_endpoint_method_and_no_host(pyflock, nodes):
    """An unknown endpoint answers 404 and a GET 405, both with an Err; a request without
    a Host header is served; then docker commands still work."""
    n1, _ = nodes
    status, reply = plugin_request(n1, "POST", "/VolumeDriver.Frobnicate", b"{}")
    assert status == 404
    assert "pyflock: unknown endpoint /VolumeDriver.Frobnicate" in reply["Err"]
    status, reply = plugin_request(n1, "GET", "/VolumeDriver.List")
    assert status == 405
    assert reply["Err"] == "pyflock: the plugin protocol uses POST only"
    status, reply = plugin_request(n1, "POST", "/VolumeDriver.Capabilities", host=False)
    assert (status, reply) == (200, {"Capabilities": {"Scope": "global"}, "Err": ""})
    status, reply = plugin_request(n1, "POST", "/VolumeDriver.Get", b'{"Name": "nosuch-1"}',
                                   host=False)
    assert (status, reply) == (200, {"Err": "no such volume nosuch-1"})

    assert n1.process_running("agent")
    assert not pyflock.agent_events(n1, "pyflock:plugin:internal-error")
    name = volume_name("after")
    n1.docker("volume", "create", "-d", "pyflock", name)
    assert inspect(n1, name)["Name"] == name
    n1.docker("volume", "rm", name)
