"""
The end-to-end test harness itself: simulated Docker hosts, each a dockerd in a private mount
namespace, that run containers, find plugins in their own ``/run/docker/plugins``, keep
namespace mounts across a dockerd restart and leave nothing behind.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from tests.harness.dockerd import (
    BUSYBOX_TAG, Availability, DockerCluster, NodeCommand, docker_available, require_e2e,
    short_workdir, wait_for,
)

pytestmark = pytest.mark.e2e

RUN = ("run", "--rm", "--network", "none")

# A volume plugin in 40 lines: enough for dockerd to activate it and keep volumes in memory.
PROBE_PLUGIN = textwrap.dedent("""
    import json, os, socketserver, sys
    from http.server import BaseHTTPRequestHandler

    volumes = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            request = json.loads(self.rfile.read(length) or b"{}")
            name = request.get("Name")
            endpoint = self.path.rsplit(".", 1)[-1]
            if endpoint == "Activate":
                reply = {"Implements": ["VolumeDriver"]}
            elif endpoint == "Capabilities":
                reply = {"Capabilities": {"Scope": "local"}}
            elif endpoint == "Create":
                volumes[name] = request.get("Opts") or {}
                reply = {"Err": ""}
            elif endpoint == "Get" and name in volumes:
                reply = {"Volume": {"Name": name, "Status": volumes[name]}, "Err": ""}
            elif endpoint == "List":
                reply = {"Volumes": [{"Name": n} for n in volumes], "Err": ""}
            elif endpoint == "Remove":
                volumes.pop(name, None)
                reply = {"Err": ""}
            else:
                reply = {"Err": f"probe: {endpoint} of {name} is not supported"}
            body = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            print(self.path, file=sys.stderr, flush=True)

    server = socketserver.UnixStreamServer(sys.argv[1], Handler)
    server.serve_forever()
""")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two nodes started in parallel; n1 runs the probe plugin before its dockerd."""
    require_e2e()
    script = tmp_path_factory.mktemp("probe") / "probe.py"
    script.write_text(PROBE_PLUGIN)

    def before_dockerd(node):
        if node.name != "n1":
            return []
        socket_path = "/run/docker/plugins/probe.sock"
        return [NodeCommand("probe", [sys.executable, script, socket_path],
                            ready_path=socket_path)]

    with DockerCluster(("n1", "n2"), before_dockerd=before_dockerd) as cluster:
        yield cluster


def mount_namespace(pid):
    """The identity of process ``pid``'s mount namespace."""
    stat = os.stat(f"/proc/{pid}/ns/mnt")
    return stat.st_dev, stat.st_ino


@pytest.fixture
def bind_mount(cluster):
    """A function that bind-mounts a folder with file ``f`` in a node's namespace at
    ``<node>/mnt``; each such mount is unmounted after the test."""
    made = []

    def mount(node, content):
        source, target = node.directory / "source", node.directory / "mnt"
        source.mkdir(exist_ok=True)
        target.mkdir(exist_ok=True)
        (source / "f").write_text(content)
        node.run_in_namespace(["mount", "--bind", source, target])
        made.append((node, target))
        return target

    yield mount
    for node, target in made:
        node.run_in_namespace(["umount", target])


def test_this_machine_runs_end_to_end_tests():
    """In CI the machine has all that end-to-end tests need (elsewhere an unfit machine
    skips them, saying why)."""
    require_e2e()
    assert docker_available()


def test_unavailability_is_explained():
    """An unusable machine is explained problem by problem, with what to install or run."""
    explanation = Availability(("not running as root", "programs not found: dockerd")).explain()
    assert "  - not running as root\n  - programs not found: dockerd\n" in explanation
    assert "apt-get install -y docker.io busybox-static" in explanation
    assert "pytest -m 'not e2e'" in explanation


def test_each_node_runs_containers_with_its_own_local_volumes(cluster):
    """Every node's dockerd runs a busybox container on a local volume, and keeps its own
    volumes apart from the other node's."""
    for node in cluster:
        result = node.docker(*RUN, "-v", f"data-{node.name}:/data", BUSYBOX_TAG,
                             "sh", "-c", "echo hi > /data/f && cat /data/f")
        assert result.stdout == "hi\n"
    for node, other in ((cluster["n1"], "n2"), (cluster["n2"], "n1")):
        volumes = node.docker("volume", "ls", "-q").stdout.split()
        assert f"data-{node.name}" in volumes and f"data-{other}" not in volumes
        node.docker("volume", "rm", f"data-{node.name}")


def test_nodes_have_distinct_addresses_and_sockets(cluster):
    """Nodes get their own loopback address, dockerd socket and cgroup parent."""
    n1, n2 = cluster["n1"], cluster["n2"]
    assert (n1.address, n2.address) == ("127.0.0.11", "127.0.0.12")
    assert n1.socket != n2.socket and n1.cgroup_parent != n2.cgroup_parent
    info = n1.docker("info", "--format", "{{.DockerRootDir}} {{.Driver}}").stdout.split()
    assert info == [str(n1.data_root), "vfs"]


def test_processes_run_inside_the_node_namespace(cluster):
    """A process started in a node runs in its mount namespace with the node's /run/docker
    and directory as cwd, is recorded in a pid file, and can be stopped, restarted and
    killed on its own."""
    node = cluster["n1"]
    (node.plugins / "marker").write_text("")
    try:
        pid = node.start_process("lister", ["sh", "-c", "ls /run/docker/plugins > listing.tmp"
                                            " && mv listing.tmp listing && exec sleep 600"],
                                 ready_path=str(node.directory / "listing"))
        assert mount_namespace(pid) == mount_namespace(node.holder_pid)
        assert mount_namespace(pid) != mount_namespace("self")
        assert (node.pids / "lister.pid").read_text() == f"{pid}\n"
        assert (node.directory / "listing").read_text().split() == ["marker", "probe.sock"]
        assert node.stop_process("lister") == -signal.SIGTERM
        assert not node.process_running("lister")
        (node.directory / "listing").unlink()
        new_pid = node.restart_process("lister")
        assert new_pid != pid and node.process_running("lister")
        assert node.kill9("lister") == -signal.SIGKILL
    finally:
        (node.plugins / "marker").unlink()
        (node.directory / "listing").unlink(missing_ok=True)


def test_plugin_socket_is_found_by_its_own_node_only(cluster):
    """A plugin socket that a process makes at /run/docker/plugins in n1's namespace lands in
    n1's folder, where n1's dockerd finds it; n2 and the root namespace do not see it."""
    n1, n2 = cluster["n1"], cluster["n2"]
    assert (n1.plugins / "probe.sock").exists()
    assert not n2.namespace_path("/run/docker/plugins/probe.sock").exists()
    assert not os.path.exists("/run/docker/plugins/probe.sock")
    n1.docker("volume", "create", "-d", "probe", "-o", "colour=blue", "probed")
    status = n1.docker("volume", "inspect", "-f", "{{.Driver}} {{.Status.colour}}", "probed")
    assert status.stdout.split() == ["probe", "blue"]
    n1.docker("volume", "rm", "probed")
    assert "/VolumeDriver.Create" in n1.log("probe")


def test_namespace_mounts_are_private_to_their_node(cluster, bind_mount):
    """A bind mount made in n1's namespace is seen by n1's processes and dockerd, but not by
    n2's namespace nor the root namespace."""
    n1, n2 = cluster["n1"], cluster["n2"]
    target = bind_mount(n1, "n1 only\n")
    assert n1.run_in_namespace(["cat", target / "f"]).stdout == "n1 only\n"
    assert n1.docker(*RUN, "-v", f"{target}:/x", BUSYBOX_TAG, "cat", "/x/f").stdout == \
        "n1 only\n"
    assert not (target / "f").exists()
    assert n2.run_in_namespace(["cat", target / "f"], check=False).returncode != 0
    assert str(target) in n1.namespace_mounts()
    assert str(target) not in n2.namespace_mounts()


def test_dockerd_restart_keeps_the_namespace(cluster, bind_mount):
    """After a graceful dockerd restart in the same namespace a --restart=always container
    runs again, and a mount made in the namespace before still reaches the new dockerd."""
    node = cluster["n2"]
    target = bind_mount(node, "kept\n")
    # busybox sleep as PID 1 ignores SIGTERM: a trap lets dockerd stop it at once.
    container = node.docker("run", "-d", "--restart=always", "--network", "none", BUSYBOX_TAG,
                            "sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait").stdout.strip()
    holder, dockerd = node.holder_pid, node.dockerd_pid
    first = node.docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip()
    try:
        node.restart_dockerd()
        assert node.holder_pid == holder and node.dockerd_pid != dockerd

        def running_again():
            state = node.docker("inspect", "-f", "{{.State.Running}} {{.State.Pid}}",
                                container).stdout.split()
            return state[0] == "true" and state[1] != first
        wait_for(running_again, what="the --restart=always container to run again")
        assert node.docker(*RUN, "-v", f"{target}:/x", BUSYBOX_TAG, "cat", "/x/f").stdout \
            == "kept\n"
    finally:
        node.docker("rm", "-f", container)


def test_close_leaves_nothing_behind():
    """Closing nodes removes everything even when a dockerd was killed with containers
    running: processes in the namespace, cgroups, mounts in either namespace, stale plugin
    sockets and spec files."""
    require_e2e()
    with short_workdir() as workdir:
        cluster = DockerCluster(("c1", "c2"), workdir=workdir)
        try:
            cluster.start()
            c1, c2 = cluster["c1"], cluster["c2"]
            pids = [c1.holder_pid, c2.holder_pid, c1.dockerd_pid, c2.dockerd_pid]
            for node in cluster:
                container = node.docker("run", "-d", "--network", "none", BUSYBOX_TAG,
                                        "sleep", "600").stdout.strip()
                pids.append(int(node.docker("inspect", "-f", "{{.State.Pid}}",
                                            container).stdout))
            # A recorded process whose child is not recorded: found through the namespace.
            pids.append(c1.start_process("parent", ["sh", "-c", "sleep 600 & echo $! > child;"
                                                     " exec sleep 600"], ready_path=str(
                                                         c1.directory / "child")))
            pids.append(int(wait_for(lambda: (c1.directory / "child").read_text().strip())))
            for node in cluster:
                stale = socket.socket(socket.AF_UNIX)
                stale.bind(str(node.plugins / "dead.sock"))
                stale.close()
                (node.etc_docker / "plugins" / "dead.spec").write_text("unix:///nowhere.sock\n")
                (node.directory / "in-ns").mkdir()
                node.run_in_namespace(["mount", "-t", "tmpfs", "tmpfs", node.directory / "in-ns"])
            (c1.directory / "in-root").mkdir()
            c1.run_in_namespace(["mount", "-t", "tmpfs", "tmpfs", "/mnt"])
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", c1.directory / "in-root"],
                           check=True)
            c2.kill_dockerd()
        finally:
            cluster.close()
        assert [node.leftovers() for node in cluster] == [[], []]
        assert not any(os.path.exists(f"/proc/{pid}") and _not_zombie(pid) for pid in pids)
        with open("/proc/self/mountinfo") as f:
            assert str(workdir) not in f.read()
        for node in cluster:
            assert list(node.plugins.iterdir()) == []
            assert list((node.etc_docker / "plugins").iterdir()) == []
            assert _cgroups_named(node.cgroup_parent) == []


def _not_zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _cgroups_named(name):
    found = []
    for top, folders, _ in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(top, folder) for folder in folders if folder == name]
        # The node's cgroups sit at most a few levels down; the rest of the tree is large.
        if top.count("/") > 6:
            folders[:] = []
    return found
