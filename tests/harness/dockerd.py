"""
Simulated Docker hosts for end-to-end tests: several dockerd on one machine, each in a
private mount namespace (notes/test-hosts.md §3, §4A, §7).

Each ``DockerNode`` keeps a long-lived *namespace holder* (``unshare --mount --propagation
private sleep infinity``) in which its own ``/run/docker``, ``/etc/docker`` and
``/run/containerd`` are bind mounts of folders under the node's directory; the copies of
other work's loop-device filesystems that the new namespace inherited are lazily unmounted
at once (``release_inherited_loop_mounts``). dockerd and any other process (an agent
serving ``/run/docker/plugins/pyflock.sock``) are started inside that namespace with
``nsenter``, so each can be stopped and started again on its own while mounts made inside
the namespace stay where the next dockerd sees them. Every process is
recorded (``pids/NAME.pid``), and ``close`` stops them all, then sweeps whatever is still
inside the node's namespace or cgroups, unmounts, and removes stale plugin sockets and the
node's cgroup folders: it never kills anything by name.

``DockerCluster`` starts several nodes in parallel in one short ``/tmp/pfe-XXXX`` folder and
loads the tiny ``busybox:local`` image (built once per process from ``/bin/busybox``) into
each. ``docker_available`` says why end-to-end tests cannot run here; ``require_e2e`` makes a
test fail (``$CI`` set) or skip with that explanation.
"""

from __future__ import annotations

import atexit
import hashlib
import http.client
import io
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import attr

__all__ = [
    "BUSYBOX_TAG", "DEFAULT_STORAGE_DRIVER", "KEEP_ENVIRONMENT_VARIABLE", "LOOP_MAJOR", "SHUTDOWN_TIMEOUT",
    "START_TIMEOUT", "STOP_TIMEOUT", "Availability", "DockerCluster", "DockerCommandFailed", "DockerNode",
    "DockerUnavailable", "NodeCleanupFailed", "NodeCommand", "NodeStartFailed",
    "busybox_image", "busybox_tar", "close_nodes", "docker_available", "import_images",
    "release_inherited_loop_mounts", "require_docker", "require_e2e", "short_workdir",
    "start_nodes", "wait_for",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The tag of the image ``busybox_image`` loads into a node.
BUSYBOX_TAG = "busybox:local"

#: Seconds dockerd gives running containers at shutdown before it kills them.
SHUTDOWN_TIMEOUT = 1

#: How long to wait for dockerd to answer after it starts.
START_TIMEOUT = 60.0

#: How long a graceful stop may take before SIGKILL (dockerd, recorded processes).
STOP_TIMEOUT = 15.0

#: Set this environment variable to keep ``DockerCluster``'s folder (logs) after ``close``.
KEEP_ENVIRONMENT_VARIABLE = "PYFLOCK_E2E_KEEP"

#: Programs the harness runs; ``docker_available`` checks them all.
REQUIRED_PROGRAMS = ("dockerd", "docker", "containerd", "runc", "unshare", "nsenter",
                     "mount", "umount", "sleep")

BUSYBOX = "/bin/busybox"

#: dockerd's storage driver in a simulated host: vfs works on any filesystem and needs no
#: kernel module, which suits tests; benchmarks ask for overlay2, as ``make up``'s dockerd
#: uses, since vfs copies the whole image into every container and slows each one down.
DEFAULT_STORAGE_DRIVER = "vfs"

#: The major device number of loop devices.
LOOP_MAJOR = 7

#: Where a node's namespace has folders of its own (bind mounts of the node's folders).
_NODE_MOUNT_POINTS = ("/run/docker", "/etc/docker", "/run/containerd")

#: Seconds a killed dockerd's containerd gets to die before the harness kills it.
CONTAINERD_EXIT_TIMEOUT = 5.0

_POLL = 0.05
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
_SOCKET_PATH_LIMIT = 107
_NAMESPACE_PROCESS = "namespace"
_DOCKERD = "dockerd"
_PLUGIN_FILES = ("*.sock", "*.spec", "*.json", "*/*.sock")
_HIDDEN_DOCKER_VARIABLES = ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY",
                            "DOCKER_CERT_PATH")


class DockerUnavailable(Exception):
    """End-to-end tests cannot run on this machine; the message says why and what to do."""


class NodeStartFailed(Exception):
    """A node's namespace, dockerd or one of its processes did not start."""


class NodeCleanupFailed(Exception):
    """``close`` could not remove everything a node left behind; the message lists it."""


class DockerCommandFailed(subprocess.CalledProcessError):
    """A ``docker`` (or namespace) command exited non-zero; ``str()`` includes its output."""

    def __str__(self) -> str:
        parts = [f"{' '.join(map(str, self.cmd))} exited with status {self.returncode}"]
        for label, text in (("stderr", self.stderr), ("stdout", self.output)):
            if text and text.strip():
                parts.append(f"{label}: {text.strip()[-2000:]}")
        return "\n".join(parts)


@attr.s(frozen=True, auto_attribs=True)
class NodeCommand:
    """
    A process to run inside a node's mount namespace: ``argv`` (absolute paths, or paths
    relative to the node's directory), extra ``env`` on top of this process's environment,
    and optionally ``ready_path``, a path as seen inside the namespace (such as
    ``/run/docker/plugins/pyflock.sock``) that exists once the process is ready.
    """

    name: str
    argv: tuple[str, ...] = attr.ib(converter=lambda argv: tuple(str(a) for a in argv))
    env: Optional[Mapping[str, str]] = None
    ready_path: Optional[str] = None


@attr.s(frozen=True, auto_attribs=True)
class Availability:
    """Whether end-to-end tests can run here; ``problems`` says what is missing if not."""

    problems: tuple[str, ...]

    def __bool__(self) -> bool:
        return not self.problems

    def explain(self) -> str:
        """A paragraph for a test report saying why end-to-end tests cannot run."""
        if not self.problems:
            return "End-to-end tests can run: root, dockerd and its tools are present."
        lines = ["End-to-end tests (pytest -m e2e) cannot run on this machine:"]
        lines += [f"  - {problem}" for problem in self.problems]
        lines.append("They need root and Debian's docker.io and busybox-static packages "
                     "(apt-get install -y docker.io busybox-static); no system dockerd is "
                     "needed. Run only the other tests with: pytest -m 'not e2e'.")
        return "\n".join(lines)


def docker_available() -> Availability:
    """Check for root, dockerd and its tools, a static busybox and mount namespaces."""
    problems = []
    if os.geteuid() != 0:
        problems.append(f"not running as root (euid {os.geteuid()}): each simulated node "
                        "needs a mount namespace and its own dockerd")
    missing = [program for program in REQUIRED_PROGRAMS if shutil.which(program) is None]
    if missing:
        problems.append(f"programs not found on PATH: {', '.join(missing)}")
    if not os.path.exists(BUSYBOX):
        problems.append(f"{BUSYBOX} is missing: install busybox-static for the test image")
    elif _is_dynamic(BUSYBOX):
        problems.append(f"{BUSYBOX} is dynamically linked: install busybox-static")
    if not _cgroup_mounts():
        problems.append("no cgroup file system is mounted under /sys/fs/cgroup")
    if not problems:
        try:
            subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           check=True, capture_output=True, timeout=10)
        except (subprocess.SubprocessError, OSError) as e:
            problems.append(f"cannot make a mount namespace (unshare --mount): {e}")
    return Availability(tuple(problems))


def require_docker() -> None:
    """Raise ``DockerUnavailable`` with the full explanation unless e2e tests can run."""
    availability = docker_available()
    if not availability:
        raise DockerUnavailable(availability.explain())


def require_e2e() -> None:
    """
    In a pytest test or fixture: return if end-to-end tests can run here; otherwise fail
    with the full explanation when the environment variable ``CI`` is set (a machine
    meant to run them must not pass silently), and skip with it when it is not.
    """
    from tests.harness.requirements import require

    availability = docker_available()
    require(availability, "" if availability else availability.explain())


def wait_for(predicate: Callable[[], object], timeout: float = 30.0,
             what: str = "a condition") -> object:
    """Poll ``predicate`` until it returns something true and return that, or raise
    ``TimeoutError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(_POLL)


@contextmanager
def short_workdir(prefix: str = "pfe-", keep: Optional[bool] = None) -> Iterator[Path]:
    """A fresh ``/tmp/<prefix>XXXXXXXX`` folder, short enough for unix sockets below it,
    removed afterwards (kept if ``keep``, or by default when ``$PYFLOCK_E2E_KEEP`` is set)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        if keep is None:
            keep = bool(os.environ.get(KEEP_ENVIRONMENT_VARIABLE))
        if not keep:
            _remove_tree(path)


# --- the busybox image -------------------------------------------------------------------

_session_image_directory: Optional[Path] = None


def busybox_tar(directory: PathLike) -> Path:
    """Build (once: it is reused while ``/bin/busybox`` is unchanged) a 2 MB root file
    system tar of the static busybox with every applet in ``/bin``, ``/etc/passwd`` and an
    empty ``/data`` (so a volume mounted there gets the copy-up Mount), in ``directory``."""
    content = Path(BUSYBOX).read_bytes()
    digest = hashlib.sha256(content).hexdigest()[:16]
    path = Path(directory) / f"busybox-{digest}.tar"
    if path.exists():
        return path
    applets = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True,
                             text=True).stdout.split()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, mode in ((".", 0o755), ("bin", 0o755), ("etc", 0o755), ("root", 0o700),
                           ("tmp", 0o1777), ("data", 0o755)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        _add_file(tar, "bin/busybox", content, 0o755)
        for applet in sorted(set(applets) - {"busybox"}):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        _add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
        _add_file(tar, "etc/group", b"root:x:0:\n", 0o644)
    # Another test process may build the same file at the same time: rename atomically.
    Path(directory).mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(temporary, path)
    return path


def busybox_image(node: "DockerNode", directory: Optional[PathLike] = None,
                  tag: str = BUSYBOX_TAG) -> str:
    """Load the busybox image into ``node``'s dockerd as ``tag`` (0.2 s) and return the
    tag; the tar is built once into ``directory`` or a folder kept for this process."""
    node.import_image(busybox_tar(directory or _image_directory()), tag)
    return tag


def _image_directory() -> Path:
    global _session_image_directory
    if _session_image_directory is None:
        _session_image_directory = Path(tempfile.mkdtemp(prefix="pfe-img-", dir="/tmp"))
        atexit.register(shutil.rmtree, _session_image_directory, True)
    return _session_image_directory


def _add_file(tar: tarfile.TarFile, name: str, content: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(content), mode
    tar.addfile(info, io.BytesIO(content))


def _is_dynamic(path: str) -> bool:
    # An ELF file with a PT_INTERP program header needs a dynamic loader.
    try:
        with open(path, "rb") as f:
            return b"ld-linux" in f.read(4096)
    except OSError:
        return True


# --- one node ----------------------------------------------------------------------------

class _StartedInside:
    """A context manager: ``start`` on entry (``close`` if that fails), ``close`` on exit."""

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class DockerNode(_StartedInside):
    """
    One simulated Docker host: a private mount namespace, its own dockerd (storage driver
    ``storage_driver``, by default vfs; no bridge, no iptables) on ``<workdir>/<name>/docker.sock``, and the processes recorded in it.

    Layout of ``directory`` (= ``workdir/name``): ``run-docker`` (the node's
    ``/run/docker``, so ``run-docker/plugins`` holds its plugin sockets), ``etc-docker``
    (its ``/etc/docker``), ``run-containerd``, ``data`` (dockerd's data root), ``logs``
    (``dockerd.log`` and ``NAME.log`` per process), ``pids`` (``NAME.pid``).

    ``before_dockerd`` processes (``NodeCommand``, or a plain argv named ``before-N``) are
    started, and their ``ready_path`` awaited, before dockerd; they are stopped after it.
    Use as a context manager, or ``start()`` and ``close()``.
    """

    def __init__(self, workdir: PathLike, name: str, address: Optional[str] = None,
                 before_dockerd: Iterable[Union[NodeCommand, Sequence[PathLike]]] = (),
                 dockerd_args: Sequence[str] = (), start_timeout: float = START_TIMEOUT,
                 storage_driver: str = DEFAULT_STORAGE_DRIVER):
        self.name = name
        self.address = address
        self.directory = Path(workdir).absolute() / name
        self.socket = self.directory / "docker.sock"
        if len(str(self.socket)) > _SOCKET_PATH_LIMIT - 20:
            raise ValueError(f"{self.socket} is too long for unix sockets below it: use a "
                             "short work directory such as short_workdir()'s /tmp/pfe-XXXX")
        self.host = f"unix://{self.socket}"
        self.run_docker = self.directory / "run-docker"
        self.plugins = self.run_docker / "plugins"
        self.etc_docker = self.directory / "etc-docker"
        self.run_containerd = self.directory / "run-containerd"
        self.data_root = self.directory / "data"
        self.logs = self.directory / "logs"
        self.pids = self.directory / "pids"
        self.docker_config = self.directory / "docker-config"
        # Unique per work directory, so concurrent test runs never share a cgroup.
        tag = hashlib.sha256(str(self.directory).encode()).hexdigest()[:8]
        self.cgroup_parent = f"pf-{name}-{tag}"
        self.before_dockerd = _commands(before_dockerd)
        self.dockerd_args = tuple(dockerd_args)
        self.storage_driver = storage_driver
        self.start_timeout = start_timeout
        self._holder: Optional[subprocess.Popen] = None
        self._namespace: Optional[tuple[int, int]] = None
        self._dockerd: Optional[subprocess.Popen] = None
        self._processes: dict[str, subprocess.Popen] = {}
        self._commands: dict[str, NodeCommand] = {}
        self._cgroups: list[Path] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"<DockerNode {self.name} {self.directory}>"

    # -- starting

    def start(self) -> None:
        """Make the namespace, start the ``before_dockerd`` processes, then dockerd, and
        wait until it answers."""
        start_nodes([self])

    def _start_namespace(self) -> None:
        if self._holder is not None:
            raise RuntimeError(f"{self.name}: the node was started before; make a new one")
        for folder in (self.plugins, self.etc_docker / "plugins", self.run_containerd,
                       self.data_root, self.logs, self.pids, self.docker_config):
            folder.mkdir(parents=True, exist_ok=True)
        for mount_point in _NODE_MOUNT_POINTS:
            os.makedirs(mount_point, exist_ok=True)
        binds = zip((self.run_docker, self.etc_docker, self.run_containerd),
                    _NODE_MOUNT_POINTS)
        script = " && ".join([*(f"mount --bind {shlex.quote(str(source))} {target}"
                                for source, target in binds),
                              "echo ready", "exec sleep infinity"])
        with open(self.logs / "namespace.log", "ab") as log:
            self._holder = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                cwd=self.directory, start_new_session=True)
        self._write_pid(_NAMESPACE_PROCESS, self._holder.pid)
        self._cgroups = _cgroup_candidates(self.cgroup_parent)

    def _wait_namespace(self) -> None:
        assert self._holder is not None and self._holder.stdout is not None
        readable, _, _ = select.select([self._holder.stdout], [], [], self.start_timeout)
        line = self._holder.stdout.readline() if readable else b""
        self._holder.stdout.close()
        if line.strip() != b"ready":
            _terminate(self._holder, signal.SIGKILL, STOP_TIMEOUT)
            raise NodeStartFailed(f"{self.name}: the mount namespace was not made: "
                                  f"{self.log('namespace')[-2000:]}")
        stat = os.stat(f"/proc/{self._holder.pid}/ns/mnt")
        self._namespace = (stat.st_dev, stat.st_ino)
        # Nothing of this node's work directory is a loop device's yet: keep only the
        # filesystems the node's folders live on.
        release_inherited_loop_mounts(self._holder.pid,
                                      keep=(self.directory.parent, *_NODE_MOUNT_POINTS))

    def _spawn_dockerd(self) -> None:
        self._require_namespace()
        # A pid file left by a killed dockerd would make the next one refuse to start.
        (self.directory / "docker.pid").unlink(missing_ok=True)
        self._forget_old_containerd()
        argv = ["dockerd", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
                "--bridge=none", f"--storage-driver={self.storage_driver}", f"--data-root={self.data_root}",
                "--exec-root=/run/docker", f"--host={self.host}",
                f"--pidfile={self.directory / 'docker.pid'}",
                f"--cgroup-parent={self.cgroup_parent}",
                f"--shutdown-timeout={SHUTDOWN_TIMEOUT}", *self.dockerd_args]
        self._dockerd = self._spawn(_DOCKERD, argv, None)

    def _forget_old_containerd(self) -> None:
        """
        Make sure no containerd of an earlier dockerd is left for the next one to wait for.
        A killed dockerd's containerd gets SIGKILL with it (its parent-death signal), but it
        may still be dying when the next dockerd starts, or linger as a zombie this
        machine's init has not reaped: dockerd counts either as running, waits for its
        socket, and gives up ("timeout waiting for containerd to start"). So wait until it
        is gone (kill it if it outlives the wait), then drop its pid file.
        """
        containerd_pid = self.run_docker / "containerd" / "containerd.pid"
        try:
            pid = int(containerd_pid.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        deadline = time.monotonic() + CONTAINERD_EXIT_TIMEOUT
        while _is_live_containerd(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _is_live_containerd(pid):
            _kill_and_wait([pid])
        containerd_pid.unlink(missing_ok=True)

    def _wait_dockerd(self, timeout: Optional[float] = None) -> None:
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        while not self._ping():
            assert self._dockerd is not None
            if self._dockerd.poll() is not None:
                raise NodeStartFailed(
                    f"{self.name}: dockerd exited with status {self._dockerd.returncode}; "
                    f"end of {self.logs / 'dockerd.log'}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise NodeStartFailed(f"{self.name}: dockerd did not answer on {self.socket} "
                                      f"in time; end of its log:\n{self.log_tail()}")
            time.sleep(_POLL)

    def _ping(self) -> bool:
        try:
            status, body = self.docker_api("GET", "/_ping", timeout=2)
        except (OSError, http.client.HTTPException):
            return False
        return status == 200 and body == b"OK"

    # -- dockerd

    @property
    def holder_pid(self) -> Optional[int]:
        """The pid of the process holding the node's mount namespace open."""
        return self._holder.pid if self._holder else None

    @property
    def dockerd_pid(self) -> Optional[int]:
        """The pid of the node's current (or last) dockerd."""
        return self._dockerd.pid if self._dockerd else None

    def dockerd_running(self) -> bool:
        """Whether the node's dockerd process is alive."""
        return self._dockerd is not None and self._dockerd.poll() is None

    def start_dockerd(self, timeout: Optional[float] = None) -> None:
        """Start dockerd again in the same namespace and data root, and wait for it."""
        if self.dockerd_running():
            raise RuntimeError(f"{self.name}: dockerd is already running")
        self._spawn_dockerd()
        self._wait_dockerd(timeout)

    def stop_dockerd(self, timeout: float = STOP_TIMEOUT) -> Optional[int]:
        """Stop dockerd with SIGTERM (containers get ``SHUTDOWN_TIMEOUT`` s), SIGKILL after
        ``timeout``; return its exit status."""
        if self._dockerd is None:
            return None
        return _terminate(self._dockerd, signal.SIGTERM, timeout)

    def kill_dockerd(self) -> Optional[int]:
        """Kill dockerd with SIGKILL (a crash: its containers keep running)."""
        if self._dockerd is None:
            return None
        return _terminate(self._dockerd, signal.SIGKILL, STOP_TIMEOUT)

    def restart_dockerd(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop dockerd gracefully and start it again in the same mount namespace."""
        self.stop_dockerd(timeout)
        self.start_dockerd()

    # -- commands

    def docker(self, *args: PathLike, check: bool = True, timeout: float = 180.0,
               input: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run the docker CLI against this node's dockerd; output is text. Raises
        ``DockerCommandFailed`` (with stderr in its message) on failure if ``check``.
        (dockerd gives a plugin's Mount or Create up to 120 s, hence the long timeout.)"""
        argv = ["docker", "--host", self.host, *map(str, args)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                input=input, env=self._docker_environment(),
                                stdin=None if input else subprocess.DEVNULL)
        if check and result.returncode:
            raise DockerCommandFailed(result.returncode, argv, result.stdout, result.stderr)
        return result

    def _docker_environment(self) -> dict[str, str]:
        # The CLI must not pick up the caller's DOCKER_HOST or contexts, nor write to ~.
        return _environment({"DOCKER_CONFIG": str(self.docker_config),
                             "DOCKER_CLI_HINTS": "false"})

    def docker_api(self, method: str, path: str, body: Optional[object] = None,
                   timeout: float = 30.0) -> tuple[int, bytes]:
        """One request to dockerd's API over its unix socket: (status, body bytes)."""
        connection = _UnixHTTPConnection(str(self.socket), timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def run_in_namespace(self, argv: Sequence[PathLike], check: bool = True,
                         timeout: float = 60.0, input: Optional[str] = None,
                         env: Optional[Mapping[str, str]] = None
                         ) -> subprocess.CompletedProcess:
        """Run ``argv`` to completion inside the node's mount namespace (cwd: the node's
        directory); output is text."""
        self._require_namespace()
        full = self._nsenter(argv)
        result = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                                input=input, env=_environment(env), stdin=None if input
                                else subprocess.DEVNULL)
        if check and result.returncode:
            raise DockerCommandFailed(result.returncode, full, result.stdout, result.stderr)
        return result

    def namespace_path(self, path: PathLike) -> Path:
        """Where the root namespace reaches ``path`` as the node's namespace sees it."""
        return Path(f"/proc/{self.holder_pid}/root") / str(path).lstrip("/")

    def namespace_mounts(self) -> list[str]:
        """The mount points in the node's mount namespace."""
        self._require_namespace()
        return [m.mount_point for m in _mounts(self.holder_pid)]

    # -- processes inside the namespace

    def start_process(self, name: str, argv: Sequence[PathLike],
                      env: Optional[Mapping[str, str]] = None,
                      ready_path: Optional[str] = None, timeout: float = 30.0) -> int:
        """Start ``argv`` in the background inside the node's namespace (cwd: the node's
        directory; output appended to ``logs/NAME.log``), record it as ``name``, wait for
        ``ready_path`` (as seen inside the namespace) if given, and return its pid."""
        command = NodeCommand(name, tuple(argv), env, ready_path)
        self._start_command(command)
        self._wait_command(command, timeout)
        return self._processes[name].pid

    def restart_process(self, name: str, timeout: float = STOP_TIMEOUT) -> int:
        """Stop the process recorded as ``name`` (if running) and start its command
        again; return the new pid."""
        command = self._commands[name]
        self.stop_process(name, timeout=timeout)
        self._start_command(command)
        self._wait_command(command, 30.0)
        return self._processes[name].pid

    def process_pid(self, name: str) -> int:
        """The pid of the process recorded as ``name``."""
        return self._processes[name].pid

    def process_running(self, name: str) -> bool:
        """Whether the process recorded as ``name`` is alive."""
        process = self._processes.get(name)
        return process is not None and process.poll() is None

    def signal_process(self, name: str, sig: int) -> None:
        """Send ``sig`` to the process recorded as ``name`` without waiting."""
        process = self._processes[name]
        if process.poll() is None:
            process.send_signal(sig)

    def stop_process(self, name: str, sig: int = signal.SIGTERM,
                     timeout: float = STOP_TIMEOUT) -> Optional[int]:
        """Send ``sig`` to the process recorded as ``name``, SIGKILL it after ``timeout``,
        and return its exit status (negative: the signal that ended it)."""
        return _terminate(self._processes[name], sig, timeout)

    def kill9(self, name: str) -> Optional[int]:
        """Kill the process recorded as ``name`` with SIGKILL and reap it."""
        return _terminate(self._processes[name], signal.SIGKILL, STOP_TIMEOUT)

    def log(self, name: str = _DOCKERD) -> str:
        """The whole of ``logs/NAME.log`` (``dockerd`` by default)."""
        try:
            return (self.logs / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, name: str = _DOCKERD, lines: int = 30) -> str:
        """The last ``lines`` lines of ``logs/NAME.log``."""
        return "\n".join(self.log(name).splitlines()[-lines:])

    def _start_command(self, command: NodeCommand) -> None:
        if command.name in (_DOCKERD, _NAMESPACE_PROCESS):
            raise ValueError(f"{command.name!r} is reserved: name the process otherwise")
        if self.process_running(command.name):
            raise RuntimeError(f"{self.name}: process {command.name!r} is already running")
        self._require_namespace()
        self._commands[command.name] = command
        self._processes[command.name] = self._spawn(command.name, command.argv, command.env)

    def _wait_command(self, command: NodeCommand, timeout: float) -> None:
        if command.ready_path is None:
            return
        process = self._processes[command.name]
        path = self.namespace_path(command.ready_path)
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if process.poll() is not None:
                raise NodeStartFailed(
                    f"{self.name}: {command.name} exited with status {process.returncode} "
                    f"before {command.ready_path} appeared; end of its log:\n"
                    f"{self.log_tail(command.name)}")
            if time.monotonic() > deadline:
                raise NodeStartFailed(f"{self.name}: {command.ready_path} did not appear in "
                                      f"{timeout} s; end of {command.name}'s log:\n"
                                      f"{self.log_tail(command.name)}")
            time.sleep(_POLL)

    def _spawn(self, name: str, argv: Sequence[PathLike],
               env: Optional[Mapping[str, str]]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log:
            # nsenter execs argv in place, so the pid recorded is the process's own.
            process = subprocess.Popen(self._nsenter(argv), stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT,
                                       env=_environment(env), start_new_session=True)
        self._write_pid(name, process.pid)
        return process

    def _nsenter(self, argv: Sequence[PathLike]) -> list[str]:
        # --wd: the holder's cwd (the node's directory); nsenter would otherwise chdir to /.
        return ["nsenter", f"--target={self.holder_pid}", "--mount", "--wd", "--",
                *map(str, argv)]

    def _write_pid(self, name: str, pid: int) -> None:
        (self.pids / f"{name}.pid").write_text(f"{pid}\n")

    def _require_namespace(self) -> None:
        if self._holder is None or self._holder.poll() is not None or self._closed:
            raise RuntimeError(f"{self.name}: the node's namespace is not running")

    # -- images

    def import_image(self, tar: PathLike, tag: str) -> None:
        """Import a root file system tar as image ``tag`` (with ``sh`` as its command)."""
        self.docker("import", "--change", 'CMD ["sh"]', str(tar), tag)

    # -- cleanup

    def remove_all_containers(self) -> list[str]:
        """Force-remove every container of this node (running or not); return their ids."""
        status, body = self.docker_api("GET", "/containers/json?all=1")
        if status != 200:
            raise DockerCommandFailed(status, ["GET /containers/json"], "", body.decode())
        ids = [container["Id"] for container in json.loads(body)]
        for container_id in ids:
            status, body = self.docker_api("DELETE", f"/containers/{container_id}?force=1",
                                           timeout=60)
            if status not in (204, 404):
                raise DockerCommandFailed(status, ["DELETE", container_id], "", body.decode())
        return ids

    def close(self) -> None:
        """Stop and remove everything the node started, whatever state it is in; raise
        ``NodeCleanupFailed`` listing anything that could not be removed."""
        close_nodes([self])

    def _close_containers(self, problems: list[str]) -> None:
        if self.dockerd_running() and self._ping():
            try:
                self.remove_all_containers()
            except (OSError, http.client.HTTPException, DockerCommandFailed) as e:
                problems.append(f"{self.name}: removing containers: {e}")

    def _signal_dockerd(self) -> None:
        if self.dockerd_running():
            self._dockerd.send_signal(signal.SIGTERM)

    def _close_rest(self, problems: list[str]) -> None:
        if self._closed:
            return
        self._closed = True

        def attempt(what: str, step: Callable[[], object]) -> None:
            # One failed step must not stop the others from cleaning up.
            try:
                step()
            except Exception as e:
                problems.append(f"{self.name}: {what}: {e!r}")

        if self._dockerd is not None:
            attempt("stopping dockerd",
                    lambda: _terminate(self._dockerd, signal.SIGTERM, STOP_TIMEOUT))
        for name in reversed(list(self._processes)):
            attempt(f"stopping {name}", lambda name=name: _terminate(
                self._processes[name], signal.SIGTERM, STOP_TIMEOUT))
        attempt("killing what is left in the namespace and cgroups", self._kill_strays)
        if self._holder is not None and self._holder.poll() is None:
            attempt("unmounting in the namespace", lambda: self._unmount_in_namespace(problems))
        if self._holder is not None:
            attempt("ending the namespace",
                    lambda: _terminate(self._holder, signal.SIGKILL, STOP_TIMEOUT))
        for folder in (self.plugins, self.etc_docker / "plugins"):
            for pattern in _PLUGIN_FILES:
                for stale in folder.glob(pattern):
                    attempt(f"removing {stale}", lambda stale=stale: stale.unlink(True))
        attempt("unmounting", lambda: _unmount_below(self.directory, problems))
        for cgroup in _cgroup_folders(self._cgroups):
            try:
                cgroup.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                problems.append(f"cannot remove cgroup {cgroup}: {e}")

    def _kill_strays(self) -> None:
        # Whatever else is still in the node's cgroups (containers of a killed dockerd) or
        # its namespace (containerd, shims, children of recorded processes) was started by
        # this node: those are the only processes killed here that were not recorded.
        strays = set(_cgroup_processes(self._cgroups))
        if self._namespace is not None:
            strays |= set(_namespace_processes(self._namespace))
        strays -= {self.holder_pid, os.getpid()}
        if strays:
            _kill_and_wait(strays)

    def _unmount_in_namespace(self, problems: list[str]) -> None:
        root = {m.mount_point for m in _mounts("self")}
        inside = [m.mount_point for m in _mounts(self.holder_pid)]
        below = str(self.directory) + "/"
        # Mounts made by the node: anything under its directory, or wherever the root
        # namespace has no mount (e.g. a dataset mounted elsewhere by an agent).
        targets = [p for p in inside if p.startswith(below) or p not in root]
        for target in sorted(set(targets), key=lambda p: p.count("/"), reverse=True):
            result = subprocess.run(self._nsenter(["umount", target]), capture_output=True,
                                    text=True)
            if result.returncode:
                lazy = subprocess.run(self._nsenter(["umount", "--lazy", target]),
                                      capture_output=True, text=True)
                if lazy.returncode:
                    problems.append(f"cannot unmount {target} in {self.name}'s namespace: "
                                    f"{result.stderr.strip()}")

    def leftovers(self) -> list[str]:
        """Anything of this node still present: live processes started by it, processes
        in its namespace or cgroups, mounts below its directory, cgroup folders, plugin
        sockets and spec files. Empty after a clean ``close``."""
        found = []
        processes = {_NAMESPACE_PROCESS: self._holder, _DOCKERD: self._dockerd,
                     **self._processes}
        for name, process in processes.items():
            if process is not None and process.poll() is None:
                found.append(f"process {name} (pid {process.pid}) is running")
        if self._namespace is not None:
            for pid in _namespace_processes(self._namespace):
                found.append(f"pid {pid} is in {self.name}'s mount namespace")
        for pid in _cgroup_processes(self._cgroups):
            found.append(f"pid {pid} is in {self.name}'s cgroups")
        below = str(self.directory) + "/"
        for mount in _mounts("self"):
            if mount.mount_point.startswith(below) or mount.mount_point == str(self.directory):
                found.append(f"{mount.mount_point} is mounted")
        found += [f"cgroup {cgroup} exists" for cgroup in _cgroup_folders(self._cgroups)]
        for folder in (self.plugins, self.etc_docker / "plugins"):
            for pattern in _PLUGIN_FILES:
                found += [f"{stale} exists" for stale in folder.glob(pattern)]
        return found


def start_nodes(nodes: Sequence[DockerNode]) -> None:
    """Start ``nodes`` in parallel: namespaces, then ``before_dockerd`` processes, then
    dockerd; return when every dockerd answers. If it raises, ``close_nodes(nodes)``."""
    for node in nodes:
        node._start_namespace()
    for node in nodes:
        node._wait_namespace()
    for node in nodes:
        for command in node.before_dockerd:
            node._start_command(command)
    for node in nodes:
        for command in node.before_dockerd:
            node._wait_command(command, node.start_timeout)
    for node in nodes:
        node._spawn_dockerd()
    for node in nodes:
        node._wait_dockerd()


def close_nodes(nodes: Sequence[DockerNode]) -> None:
    """Close ``nodes`` together (their dockerd stop in parallel): remove containers, stop
    dockerd, then recorded processes, sweep, unmount, and delete sockets and cgroups;
    raise ``NodeCleanupFailed`` if anything is left."""
    problems: list[str] = []
    for node in nodes:
        node._close_containers(problems)
    for node in nodes:
        node._signal_dockerd()
    for node in nodes:
        node._close_rest(problems)
    for node in nodes:
        problems += node.leftovers()
    if problems:
        raise NodeCleanupFailed("could not clean up after the test nodes:\n  "
                                + "\n  ".join(problems))


# --- several nodes -----------------------------------------------------------------------

class DockerCluster(_StartedInside):
    """
    Simulated Docker hosts named ``names`` in one work directory (by default a fresh
    ``/tmp/pfe-XXXXXXXX``, removed at ``close`` unless ``$PYFLOCK_E2E_KEEP`` is set), started
    and stopped in parallel; node i gets loopback address ``127.0.0.<11+i>``.
    ``before_dockerd(node)`` returns the commands to start in a node before its dockerd.
    With ``image``, the busybox image is loaded into every node as ``busybox:local``.
    ``storage_driver`` is every node's dockerd's (``DockerNode``).
    """

    def __init__(self, names: Sequence[str] = ("n1", "n2"), workdir: Optional[PathLike] = None,
                 before_dockerd: Optional[Callable[[DockerNode], Iterable[
                     Union[NodeCommand, Sequence[PathLike]]]]] = None,
                 image: bool = True, dockerd_args: Sequence[str] = (),
                 first_address: int = 11, storage_driver: str = DEFAULT_STORAGE_DRIVER):
        self._names = tuple(names)
        self._given_workdir = workdir
        self._before_dockerd = before_dockerd
        self._image = image
        self._dockerd_args = tuple(dockerd_args)
        self._first_address = first_address
        self._storage_driver = storage_driver
        self._workdir_context = None
        self.workdir: Optional[Path] = None
        self.nodes: list[DockerNode] = []

    def __getitem__(self, name: str) -> DockerNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def __iter__(self) -> Iterator[DockerNode]:
        return iter(self.nodes)

    def start(self) -> None:
        """Start every node in parallel and load the image into each."""
        if self._given_workdir is None:
            self._workdir_context = short_workdir()
            self.workdir = self._workdir_context.__enter__()
        else:
            self.workdir = Path(self._given_workdir)
        for i, name in enumerate(self._names):
            node = DockerNode(self.workdir, name, f"127.0.0.{self._first_address + i}",
                              dockerd_args=self._dockerd_args,
                              storage_driver=self._storage_driver)
            if self._before_dockerd is not None:
                node.before_dockerd = _commands(self._before_dockerd(node))
            self.nodes.append(node)
        start_nodes(self.nodes)
        if self._image:
            import_images(self.nodes, busybox_tar(_image_directory()), BUSYBOX_TAG)

    def close(self) -> None:
        """Close every node (see ``close_nodes``) and remove the work directory we made."""
        try:
            close_nodes(self.nodes)
        finally:
            if self._workdir_context is not None:
                context, self._workdir_context = self._workdir_context, None
                context.__exit__(None, None, None)


def import_images(nodes: Sequence[DockerNode], tar: PathLike, tag: str) -> None:
    """Import ``tar`` as ``tag`` into every node's dockerd at the same time."""
    running = []
    for node in nodes:
        argv = ["docker", "--host", node.host, "import", "--change", 'CMD ["sh"]', str(tar), tag]
        running.append((argv, subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=node._docker_environment())))
    failures = []
    for argv, process in running:
        out, err = process.communicate(timeout=120)
        if process.returncode:
            failures.append(DockerCommandFailed(process.returncode, argv, out, err))
    if failures:
        raise failures[0]


# --- processes, mounts, cgroups ----------------------------------------------------------

class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _commands(commands: Iterable[Union[NodeCommand, Sequence[PathLike]]]
              ) -> tuple[NodeCommand, ...]:
    return tuple(command if isinstance(command, NodeCommand)
                 else NodeCommand(f"before-{i}", command)
                 for i, command in enumerate(commands, 1))


def _environment(extra: Optional[Mapping[str, str]]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _HIDDEN_DOCKER_VARIABLES}
    env.update(extra or {})
    return env


def _terminate(process: subprocess.Popen, sig: int, timeout: float) -> Optional[int]:
    """Send ``sig``, wait ``timeout`` s, then SIGKILL; return the exit status."""
    if process.poll() is None:
        try:
            process.send_signal(sig)
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
        except ProcessLookupError:
            pass
    return process.wait(STOP_TIMEOUT)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The state follows the parenthesised command name, which may contain spaces.
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _is_live_containerd(pid: int) -> bool:
    """Whether ``pid`` is a containerd still running (not a zombie, not a reused pid)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() != "containerd":
                return False
    except (FileNotFoundError, ProcessLookupError):
        return False
    return _alive(pid)


def _kill_and_wait(pids: Iterable[int], timeout: float = STOP_TIMEOUT) -> None:
    pids = set(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(_POLL / 5)


def _namespace_processes(namespace: tuple[int, int]) -> list[int]:
    """Pids whose mount namespace is ``namespace`` (st_dev, st_ino of ns/mnt)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = os.stat(f"/proc/{entry}/ns/mnt")
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) == namespace and _alive(int(entry)):
            found.append(int(entry))
    return found


@attr.s(frozen=True, auto_attribs=True)
class _Mount:
    major: int
    root: str
    mount_point: str
    file_system: str
    options: frozenset


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal escapes.
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def _mounts(pid: Union[int, str, None]) -> list[_Mount]:
    """The mounts seen by process ``pid`` ("self" for this one), from its mountinfo."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return []
    mounts = []
    for line in lines:
        fields = line.split()
        separator = fields.index("-")
        options = frozenset(fields[separator + 3].split(",")) if len(fields) > separator + 3 \
            else frozenset()
        mounts.append(_Mount(int(fields[2].split(":")[0]), _unescape(fields[3]),
                             _unescape(fields[4]),
                             fields[separator + 1], options))
    return mounts


def _unmount_below(directory: Path, problems: list[str]) -> None:
    """Unmount, deepest first, whatever the root namespace has mounted in ``directory``."""
    below = str(directory) + "/"
    targets = [m.mount_point for m in _mounts("self")
               if m.mount_point.startswith(below) or m.mount_point == str(directory)]
    for target in sorted(set(targets), key=lambda p: p.count("/"), reverse=True):
        result = subprocess.run(["umount", target], capture_output=True, text=True)
        if result.returncode:
            problems.append(f"cannot unmount {target}: {result.stderr.strip()}")


def release_inherited_loop_mounts(pid: int, keep: Iterable[PathLike] = (),
                                  outside: Optional[str] = None) -> int:
    """
    Lazily unmount, in the mount namespace of process ``pid``, the filesystems of loop
    devices that it inherited when it was made as a copy of another one; how many. Those
    copies would keep other work's loop devices busy (their owners could not detach them)
    for as long as the namespace lives. Mounts at, below or above a path in ``keep`` stay.
    Refuses to touch the namespace ``outside`` (as ``/proc/PID/ns/mnt`` names it; by
    default this process's own), which is not the copy.
    """
    namespace = os.readlink(f"/proc/{pid}/ns/mnt")
    if namespace == (outside or os.readlink("/proc/self/ns/mnt")):
        raise RuntimeError(f"refusing to unmount loop-device filesystems in {namespace}, "
                           "which is no private copy: run this in a new mount namespace "
                           "(unshare --mount --propagation private)")
    kept = [os.path.realpath(path).rstrip("/") + "/" for path in keep]
    released = 0
    for mount in reversed(_mounts(pid)):
        point = mount.mount_point.rstrip("/") + "/"
        if mount.major != LOOP_MAJOR or point == "/" or any(
                point.startswith(k) or k.startswith(point) for k in kept):
            continue
        result = subprocess.run(["nsenter", f"--target={pid}", "--mount", "--", "umount",
                                 "--lazy", mount.mount_point], capture_output=True)
        released += result.returncode == 0
    return released


def _cgroup_mounts() -> list[_Mount]:
    return [m for m in _mounts("self") if m.file_system in ("cgroup", "cgroup2")]


def _cgroup_candidates(name: str) -> list[Path]:
    """Where runc's cgroupfs driver may create the cgroup parent ``name``: below this
    process's own cgroup in each hierarchy (a relative --cgroup-parent), and at the root."""
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        own = []
    candidates = []
    for mount in _cgroup_mounts():
        candidates.append(Path(mount.mount_point) / name)
        for line in own:
            hierarchy, controllers, path = line.split(":", 2)
            if mount.file_system == "cgroup2":
                matches = hierarchy == "0"
            else:
                wanted = set(filter(None, controllers.split(",")))
                matches = hierarchy != "0" and bool(wanted) and wanted <= mount.options
            root = mount.root.rstrip("/") + "/"
            if matches and (path + "/").startswith(root):
                relative = os.path.relpath(path, mount.root)
                candidates.append(Path(os.path.normpath(
                    os.path.join(mount.mount_point, relative, name))))
    return sorted(set(candidates))


def _cgroup_folders(candidates: Sequence[Path]) -> list[Path]:
    """Existing folders at and below ``candidates``, deepest first."""
    folders = []
    for candidate in candidates:
        if candidate.is_dir():
            for top, subfolders, _ in os.walk(candidate, topdown=False):
                folders += [Path(top) / sub for sub in subfolders]
            folders.append(candidate)
    return sorted(set(folders), key=lambda p: len(p.parts), reverse=True)


def _cgroup_processes(candidates: Sequence[Path]) -> list[int]:
    pids = set()
    for folder in _cgroup_folders(candidates):
        try:
            pids |= {int(p) for p in (folder / "cgroup.procs").read_text().split()}
        except OSError:
            continue
    return sorted(pid for pid in pids if _alive(pid))


def _remove_tree(path: Path) -> None:
    """Remove ``path``, but never through a mount point (that would delete its contents)."""
    below = str(path) + "/"
    mounted = [m.mount_point for m in _mounts("self")
               if m.mount_point == str(path) or m.mount_point.startswith(below)]
    if mounted:
        raise NodeCleanupFailed(f"not removing {path}: still mounted: {', '.join(mounted)}")
    shutil.rmtree(path)
