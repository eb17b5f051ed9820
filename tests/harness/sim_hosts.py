"""
Simulated EC2 hosts on this machine for running deploy/cloudformation/bootstrap.sh for real
(issue 10, point 7): each host is a ``tests.harness.dockerd.DockerNode`` (a private mount
namespace, optionally its own dockerd) that also has a network namespace of its own, joined
by a veth to a bridge in a hub namespace on the private subnet ``10.77.0.0/24``, and a root
folder of its own whose ``opt/pyflock``, ``opt/pyflock-deploy``, ``etc/pyflock``,
``var/lib/pyflock``, ``run/pyflock``, ``etc/default`` and ``etc/fstab`` are bind-mounted over
the system's inside
the host's namespace, so the scripts run unchanged with their default paths. Nothing is
added to the root network namespace: the hub holds the bridge and the services the hosts
call (the fake EC2 and its metadata service, a metadata service for the control node,
``moto_server`` for SSM, the deploy scripts over https); the test process makes their
listening sockets inside the hub (``network_namespace``).

``SimCluster`` puts it together: a wheel of pyflock built from the checkout
(``build_wheel``), the services, a control host and agent hosts (each a fake EC2 instance
with a device folder of its own), the control node's data volume attached from the fake EC2,
``cfn-signal`` replaced by a recorder (``signals``), and ``bootstrap`` running a host's
UserData from the template (``user_data``) as cloud-init would. ``close`` stops the services the scripts started (install.sh
--stop), every host (processes, dockerd, mounts), the services, the network namespaces,
the loop devices, and removes the empty mount points it made. Needs root.
"""

from __future__ import annotations

import ctypes
import http.server
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

from tests.harness.deploy_hosts import (
    INSTALL, ROOT, MetadataService, serve_in_thread, stop_serving,
)
from tests.harness.dockerd import (
    BUSYBOX_TAG, DockerNode, NodeCleanupFailed, busybox_tar, close_nodes, import_images,
    start_nodes,
)
from tests.harness.fake_ec2 import FakeEC2, FakeSettings

#: The hub's address on the hosts' subnet, where the services listen.
HUB_ADDRESS = "10.77.0.1"
SUBNET = "10.77.0"

#: The ports of the services in the hub (private to it, so fixed).
MOTO_PORT = 5000

#: The stack, region and zone the simulated hosts belong to.
STACK = "flock"
REGION = "us-east-1"

#: Folders (and a file) each host has of its own: bind mounts of its root folder's copies.
HOST_FOLDERS = ("/opt/pyflock", "/opt/pyflock-deploy", "/etc/pyflock", "/var/lib/pyflock",
                "/run/pyflock", "/etc/default")

TEMPLATE = ROOT / "deploy" / "cloudformation" / "pyflock-cluster.yaml"

#: The launch template whose UserData boots each role.
LAUNCH_TEMPLATES = {"control": "ControlLaunchTemplate", "agent": "AgentLaunchTemplate"}

#: Seconds the bootstraps may take (pip installs pyflock into a new virtualenv in each).
BOOTSTRAP_TIMEOUT = 240.0

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def network_namespace(path: str) -> Iterator[None]:
    """Run the block with this thread in the network namespace at ``path`` (sockets made
    in it stay there), then switch the thread back."""
    with open("/proc/thread-self/ns/net") as here, open(path) as there:
        if _libc.setns(there.fileno(), _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {path} failed")
        try:
            yield
        finally:
            if _libc.setns(here.fileno(), _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back failed")


def build_wheel(directory: Path) -> Path:
    """A wheel of pyflock built from a copy of the checkout (so the checkout gets no build
    folder) into ``directory``, with wheels of its dependencies beside it (pip's cache or
    index, as configured here: the simulated hosts have no network)."""
    source = directory / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".state", "build", "dist", "*.egg-info", "__pycache__",
        ".hypothesis", "tests.*", "_trial_temp"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(directory), str(source)], check=True, capture_output=True,
                   timeout=300)
    shutil.rmtree(source)
    [wheel] = directory.glob("pyflock-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(directory),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return wheel


def aws_cli(directory: Path) -> Optional[Path]:
    """None when an ``aws`` command is on PATH; else a folder in ``directory`` holding one:
    AWS CLI v1 (what Debian's awscli package is, which the bootstrap installs on a node)
    pip-installed into a virtualenv of its own."""
    if shutil.which("aws"):
        return None
    venv = directory / "awscli"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "awscli"], check=True,
                   capture_output=True, timeout=600)
    folder = directory / "bin"
    folder.mkdir()
    (folder / "aws").symlink_to(venv / "bin" / "aws")
    return folder


def user_data(role: str, values: dict[str, str]) -> str:
    """The UserData script of ``role``'s launch template in the template, its ``Fn::Sub``
    variables replaced by ``values`` (every one must be given)."""
    from cfnlint.decode import decode_str

    decoded, problems = decode_str(TEMPLATE.read_text())
    if problems:
        raise ValueError(f"the template does not parse: {problems}")
    data = decoded["Resources"][LAUNCH_TEMPLATES[role]]["Properties"]["LaunchTemplateData"]
    sub = data["UserData"]["Fn::Base64"]["Fn::Sub"]
    text = sub[0] if isinstance(sub, list) else sub
    missing = set(re.findall(r"\$\{([^}!]+)\}", text)) - set(values)
    if missing:
        raise KeyError(f"no value for {sorted(missing)} in the {role} UserData")
    return re.sub(r"\$\{([^}!]+)\}", lambda m: values[m.group(1)], str(text))


class ScriptsServer:
    """The checkout's deploy/ folder over https (what ``ScriptsUrl`` names), with a
    certificate for ``host`` made here; ``ca_file`` is what curl must trust."""

    def __init__(self, directory: Path, host: str):
        self.host, self.ca_file = host, directory / "scripts.crt"
        key = directory / "scripts.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj",
                        f"/CN={host}", "-addext", f"subjectAltName=IP:{host}", "-keyout",
                        str(key), "-out", str(self.ca_file)], check=True, capture_output=True)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(str(self.ca_file), str(key))
        self._server: Optional[http.server.ThreadingHTTPServer] = None

    def start(self) -> str:
        """Serve (make the socket inside the network namespace it must be in); the URL."""
        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(ROOT / "deploy"), **kwargs)

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer((self.host, 0), Handler)
        self._server.socket = self._context.wrap_socket(self._server.socket, server_side=True)
        serve_in_thread(self._server)
        return f"https://{self.host}:{self._server.server_address[1]}"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        stop_serving(self._server)


def _ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, text=True)


class SimNetwork:
    """A hub network namespace with a bridge on ``SUBNET``.0/24, and one namespace per host
    joined to it by a veth (the host's ``eth0``)."""

    def __init__(self, tag: str):
        self.tag = tag
        self.hub = f"pfs-{tag}-hub"
        self.namespaces: list[str] = []

    def path(self, namespace: str) -> str:
        """The file naming ``namespace`` (for nsenter --net and setns)."""
        return f"/run/netns/{namespace}"

    def start(self) -> None:
        """Make the hub and its bridge at ``HUB_ADDRESS``."""
        self._add(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "addr", "add", f"{HUB_ADDRESS}/24", "dev", "br0")
        _ip("-n", self.hub, "link", "set", "br0", "up")

    def add_host(self, name: str, address: str) -> str:
        """A namespace for host ``name`` whose ``eth0`` has ``address``; its name."""
        namespace = f"pfs-{self.tag}-{name}"
        self._add(namespace)
        _ip("-n", self.hub, "link", "add", f"v-{name}", "type", "veth", "peer", "name",
            "eth0", "netns", namespace)
        _ip("-n", self.hub, "link", "set", f"v-{name}", "master", "br0", "up")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        return namespace

    def _add(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self.namespaces.append(namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")

    def wait_listening(self, port: int, timeout: float = 60.0) -> None:
        """Wait until something in the hub accepts connections on ``HUB_ADDRESS:port``."""
        deadline = time.monotonic() + timeout
        while True:
            with network_namespace(self.path(self.hub)):
                probe = socket.socket()
            try:
                probe.settimeout(1)
                probe.connect((HUB_ADDRESS, port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing listens on {HUB_ADDRESS}:{port} in the hub")
                time.sleep(0.2)
            finally:
                probe.close()

    def close(self) -> None:
        """Delete every namespace made (the veths and bridge go with them)."""
        for namespace in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        self.namespaces.clear()


class SimHost(DockerNode):
    """
    One simulated host: a ``DockerNode`` whose processes also run in the network namespace
    ``network`` (address ``address``), with dockerd only if ``docker``, and its own copies
    of ``HOST_FOLDERS`` and ``/etc/fstab`` under ``root`` (bind-mounted by ``mount_root``);
    ``/run/systemd`` looks empty inside, so the scripts see no systemd.
    """

    def __init__(self, workdir: Path, name: str, network: str, address: str,
                 docker: bool = True, folders: Sequence[str] = HOST_FOLDERS):
        super().__init__(workdir, name, address)
        self.network, self.docker_enabled, self.folders = network, docker, tuple(folders)
        self.root = self.directory / "root"
        self.home = self.root / "root"
        self.device_folder = self.directory / "dev"
        self.instance_id = ""

    def _nsenter(self, argv: Sequence) -> list[str]:
        return ["nsenter", f"--target={self.holder_pid}", "--mount",
                f"--net=/run/netns/{self.network}", "--wd", "--", *map(str, argv)]

    def _spawn_dockerd(self) -> None:
        if self.docker_enabled:
            super()._spawn_dockerd()

    def _wait_dockerd(self, timeout: Optional[float] = None) -> None:
        if self.docker_enabled:
            super()._wait_dockerd(timeout)

    def mount_root(self) -> None:
        """Bind this host's folders over the system's inside its namespace."""
        binds = []
        for folder in self.folders:
            own = self.root / folder.lstrip("/")
            own.mkdir(parents=True, exist_ok=True)
            binds.append((own, folder))
        fstab = self.root / "etc" / "fstab"
        shutil.copy("/etc/fstab", fstab)
        binds.append((fstab, "/etc/fstab"))
        if os.path.isdir("/run/systemd"):
            (self.root / "run" / "systemd").mkdir(parents=True, exist_ok=True)
            binds.append((self.root / "run" / "systemd", "/run/systemd"))
        self.home.mkdir(parents=True, exist_ok=True)
        for own, folder in binds:
            self.run_in_namespace(["mount", "--bind", own, folder])

    def spawn(self, name: str, argv: Sequence, env: dict) -> subprocess.Popen:
        """Start ``argv`` in the host with exactly ``env`` (output in ``logs/NAME.log``)."""
        with open(self.logs / f"{name}.log", "ab") as log:
            return subprocess.Popen(self._nsenter(argv), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)


def mounted_in_any_namespace(path: str) -> bool:
    """Whether ``path`` is a mount point in the mount namespace of any process."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/mountinfo") as mountinfo:
                if any(line.split()[4] == path for line in mountinfo):
                    return True
        except OSError:
            continue
    return False


@contextmanager
def mount_points(paths: Sequence[str]) -> Iterator[None]:
    """Make the folders in ``paths`` that are missing (bind mounts need them); afterwards
    remove those made here that are still empty and no other run's hosts mount over
    (removing it would unmount theirs)."""
    made = [path for path in paths if not os.path.exists(path)]
    for path in made:
        os.makedirs(path)
    try:
        yield
    finally:
        for path in reversed(made):
            if not mounted_in_any_namespace(path):
                try:
                    os.rmdir(path)
                except OSError:
                    pass


class SimCluster:
    """
    The services, a control host ``ctl`` (no dockerd) and agent hosts ``a1``, ``a2``, ...
    (each with dockerd and the busybox image) in ``workdir``, ready for ``bootstrap``;
    ``wheel`` is what the bootstrap installs.
    """

    def __init__(self, workdir: Path, wheel: Path, agents: int = 2,
                 aws_folder: Optional[Path] = None):
        self.workdir, self.wheel, self.aws_folder = workdir, wheel, aws_folder
        self.tag = uuid.uuid4().hex[:6]
        self.network = SimNetwork(self.tag)
        # The fake's default delays: states and eventual consistency as EC2 has them.
        self.fake = FakeEC2(FakeSettings(), region=REGION)
        self.metadata: Optional[MetadataService] = None
        self.moto: Optional[subprocess.Popen] = None
        self.control: Optional[SimHost] = None
        self.agents: list[SimHost] = []
        self.agent_count = agents
        self.signals = workdir / "signals"
        self.cluster_uuid = str(uuid.uuid4())
        self.data_volume = ""
        self.scripts: Optional[ScriptsServer] = None
        self.scripts_url = ""
        self._mount_points = mount_points(HOST_FOLDERS)
        self._made_mount_points = False

    @property
    def hosts(self) -> list[SimHost]:
        """Every host, the control host first."""
        return ([self.control] if self.control else []) + self.agents

    # -- starting

    def start(self) -> None:
        """Network, services, hosts and the control node's data volume."""
        self._mount_points.__enter__()
        self._made_mount_points = True
        self.network.start()
        hub = self.network.path(self.network.hub)
        with network_namespace(hub):
            self.fake.start(HUB_ADDRESS)
        self._start_moto()
        # The control node's /var/lib/pyflock is its data volume, which bootstrap.sh mounts.
        self.control = self._host("ctl", 11, docker=False, folders=tuple(
            f for f in HOST_FOLDERS if f != "/var/lib/pyflock"))
        self.agents = [self._host(f"a{i + 1}", 12 + i) for i in range(self.agent_count)]
        self.metadata = MetadataService({"instance-id": self.control.instance_id,
                                         "local-ipv4": self.control.address})
        self.scripts = ScriptsServer(self.workdir, HUB_ADDRESS)
        with network_namespace(hub):
            self.metadata_url = self.metadata.start(HUB_ADDRESS)
            self.scripts_url = self.scripts.start()
        start_nodes(self.hosts)
        for host in self.hosts:
            host.mount_root()
        import_images(self.agents, busybox_tar(self.workdir / "image"), BUSYBOX_TAG)
        self.network.wait_listening(MOTO_PORT)
        self.data_volume = self._attach_data_volume(self.control.instance_id)

    def _host(self, name: str, number: int, docker: bool = True,
              folders: Sequence[str] = HOST_FOLDERS) -> SimHost:
        address = f"{SUBNET}.{number}"
        namespace = self.network.add_host(name, address)
        host = SimHost(self.workdir, name, namespace, address, docker=docker, folders=folders)
        host.instance_id = self.fake.add_instance(device_folder=str(host.device_folder))
        return host

    def _start_moto(self) -> None:
        moto = Path(sys.executable).parent / "moto_server"
        with open(self.workdir / "moto.log", "ab") as log:
            self.moto = subprocess.Popen(
                ["nsenter", f"--net={self.network.path(self.network.hub)}", "--", str(moto),
                 "-H", HUB_ADDRESS, "-p", str(MOTO_PORT)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _ec2(self, **parameters: str) -> str:
        status, body = self.fake.answer(parameters)
        if status != 200:
            raise RuntimeError(f"fake EC2 refused {parameters}: {body}")
        return body

    def _attach_data_volume(self, instance_id: str) -> str:
        """A 1 GiB volume attached to the control instance as /dev/sdf; its id."""
        before = set(self.fake.volumes)
        self._ec2(Action="CreateVolume", Size="1", AvailabilityZone=REGION + "a")
        [volume_id] = set(self.fake.volumes) - before
        deadline = time.monotonic() + 30
        while self.fake.volumes[volume_id].state != "available":
            self._ec2(Action="DescribeVolumes")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{volume_id} did not become available")
            time.sleep(0.05)
        self._ec2(Action="AttachVolume", VolumeId=volume_id, InstanceId=instance_id,
                  Device="/dev/sdf")
        while self.fake.volumes[volume_id].attachment.state != "attached":
            self._ec2(Action="DescribeVolumes")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{volume_id} was not attached")
            time.sleep(0.05)
        return volume_id

    # -- running the bootstrap

    def environment(self, host: SimHost) -> dict:
        """The environment bootstrap.sh runs in on ``host``: AWS calls to moto_server with
        test keys, the metadata service of its instance, the signal recorder, and
        install.sh's options for the fakes."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "DOCKER_", "PYFLOCK_", "VIRTUAL_ENV"))}
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = ":".join([*([str(self.aws_folder)] if self.aws_folder else []),
                                *(p for p in env.get("PATH", "/usr/bin:/bin").split(":")
                                  if p != venv_bin)])
        recorder = self.workdir / f"signal-{host.name}"
        recorder.write_text(f'#!/bin/sh\necho "{host.name} $*" >>{self.signals}\n')
        recorder.chmod(0o755)
        options = ["--no-apt"]
        if host is self.control:
            metadata = self.metadata_url
            env["PYFLOCK_DEVICE_FOLDER"] = str(host.device_folder)
        else:
            metadata = self.fake.metadata_url(host.instance_id)
            options += ["--docker-socket", str(host.socket), "--ec2-endpoint-url",
                        self.fake.url, "--metadata-url", metadata, "--device-folder",
                        str(host.device_folder)]
        env.update({
            "HOME": str(host.home), "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "PYFLOCK_AWS_ENDPOINT_URL": f"http://{HUB_ADDRESS}:{MOTO_PORT}",
            "PYFLOCK_METADATA_URL": metadata, "PYFLOCK_CFN_SIGNAL": str(recorder),
            "PYFLOCK_INSTALL_OPTIONS": " ".join(options),
            "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(self.wheel.parent),
            "CURL_CA_BUNDLE": str(self.scripts.ca_file)})
        return env

    def user_data(self, host: SimHost) -> str:
        """The UserData the template gives ``host``: the stack's values filled in, the
        scripts from ``ScriptsServer`` and pyflock from the wheel."""
        role = "control" if host is self.control else "agent"
        return user_data(role, {
            "AWS::StackName": STACK, "AWS::Region": REGION, "ScriptsUrl": self.scripts_url,
            "PyflockSource": str(self.wheel), "ClusterUuid": self.cluster_uuid,
            "ControlDataVolume": self.data_volume})

    def bootstrap(self, hosts: Sequence[SimHost]) -> dict[str, int]:
        """Run the template's UserData on ``hosts`` at once, as cloud-init would (it
        fetches the scripts and runs bootstrap.sh); each host's exit status (its output in
        the host's ``logs/bootstrap.log``)."""
        running = {}
        for host in hosts:
            script = host.directory / "user-data"
            script.write_text(self.user_data(host))
            running[host.name] = host.spawn("bootstrap", ["bash", script],
                                            self.environment(host))
        deadline = time.monotonic() + BOOTSTRAP_TIMEOUT
        statuses = {}
        for name, process in running.items():
            try:
                statuses[name] = process.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                statuses[name] = process.wait()
        return statuses

    def recorded_signals(self) -> list[str]:
        """The signals recorded, one ``HOST STATUS REASON`` line each."""
        return self.signals.read_text().splitlines() if self.signals.exists() else []

    def ssm_parameters(self) -> dict[str, tuple[str, str]]:
        """Every SSM parameter in moto_server: its name's (type, decrypted value)."""
        import boto3

        with network_namespace(self.network.path(self.network.hub)):
            ssm = boto3.client("ssm", region_name=REGION,
                               endpoint_url=f"http://{HUB_ADDRESS}:{MOTO_PORT}",
                               aws_access_key_id="testing", aws_secret_access_key="testing")
            pages = ssm.get_paginator("get_parameters_by_path").paginate(
                Path="/", Recursive=True, WithDecryption=True)
            return {p["Name"]: (p["Type"], p["Value"])
                    for page in pages for p in page["Parameters"]}

    def cli(self, *arguments: str) -> subprocess.CompletedProcess:
        """``pyflock`` on the control host as admin (the settings install.sh wrote)."""
        return self.control.run_in_namespace(
            ["/opt/pyflock/bin/pyflock", *arguments], check=False,
            env={"HOME": str(self.control.home)})

    # -- stopping

    def close(self) -> None:
        """Stop and remove everything started; raise ``NodeCleanupFailed`` listing what
        could not be."""
        problems = []
        for host in self.hosts:
            result = self._stop_services(host)
            if result is not None and result.returncode:
                problems.append(f"{host.name}: install.sh --stop: {result.stderr}")
        try:
            close_nodes(self.hosts)
        except NodeCleanupFailed as e:
            problems.append(str(e))
        for what, step in (("moto_server", self._stop_moto),
                           ("metadata service", self.metadata and self.metadata.stop),
                           ("scripts server", self.scripts and self.scripts.stop),
                           ("fake EC2", self.fake.close), ("network", self.network.close)):
            try:
                if step:
                    step()
            except Exception as e:
                problems.append(f"stopping the {what}: {e!r}")
        if self._made_mount_points:
            self._mount_points.__exit__(None, None, None)
        # A killed namespace's mounts, and so its loop devices, go a moment later.
        deadline = time.monotonic() + 15
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        problems += self.leftovers()
        if problems:
            raise NodeCleanupFailed("\n".join(problems))

    def _stop_moto(self) -> None:
        if self.moto is not None and self.moto.poll() is None:
            self.moto.terminate()
            try:
                self.moto.wait(30)
            except subprocess.TimeoutExpired:
                self.moto.kill()
                self.moto.wait()

    def leftovers(self) -> list[str]:
        """What of the cluster outside its hosts is still there: network namespaces, loop
        devices of the fake EC2's volumes, moto_server. Empty after ``close``."""
        found = [f"network namespace {name} exists" for name in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
            if name.startswith(f"pfs-{self.tag}-")]
        loops = subprocess.run(["losetup", "--list", "--noheadings", "--output",
                                "NAME,BACK-FILE"], capture_output=True, text=True).stdout
        found += [f"loop device {line.split()[0]} is attached" for line in loops.splitlines()
                  if len(line.split()) > 1 and line.split()[1].startswith(self.fake.root)]
        if self.moto is not None and self.moto.poll() is None:
            found.append(f"moto_server (pid {self.moto.pid}) is running")
        return found

    def _stop_services(self, host: SimHost) -> Optional[subprocess.CompletedProcess]:
        if host.holder_pid is None:
            return None
        try:
            return host.run_in_namespace(["bash", INSTALL, "--stop"], check=False,
                                         timeout=120, env={"HOME": str(host.home)})
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return subprocess.CompletedProcess([], 1, "", str(e))


@contextmanager
def sim_cluster(wheel: Path, agents: int = 2,
                aws_folder: Optional[Path] = None) -> Iterator[SimCluster]:
    """A started ``SimCluster`` in a fresh short ``/tmp`` folder, closed and removed
    afterwards (kept, with its logs, when ``$PYFLOCK_E2E_KEEP`` is set)."""
    workdir = Path(tempfile.mkdtemp(prefix="pfs-", dir="/tmp"))
    cluster = SimCluster(workdir, wheel, agents, aws_folder)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.close()
        finally:
            if not os.environ.get("PYFLOCK_E2E_KEEP"):
                shutil.rmtree(workdir, ignore_errors=True)
