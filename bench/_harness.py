"""
What the benchmarks share: the record a benchmark module returns (``Section``, with its
``Target``s), the repeats of a timed case (``repeat``, ``repeat_blocking``: every timed case
runs at least ``REPEATS`` times, and ``Repeats`` reports the median with the smallest and
largest and judges a target on the median), a real ``pyflock-control`` process on
127.0.0.1 with fresh certificates (``start_control_service``), a child process awaited with
a deadline (``spawn_and_wait``), percentiles and latency summaries, and a description of
the machine.

A benchmark module is any module in ``bench/`` with
``async def benchmark(reactor, context: Context) -> Section``; ``bench/run.py`` lists them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional, Sequence, TypeVar

import attr
import twisted
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol

if TYPE_CHECKING:
    # Imported when used, so that a module run alone (store_write_rate.py) needs only bench/.
    from tests.harness.certificates import ClusterCertificates

#: The API user whose certificate the benchmark clients present.
BENCH_USER = "bench"

#: Seconds a control service may take to start (it loads the whole store first).
START_TIMEOUT = 60.0

#: Seconds a control service may take to stop after SIGTERM before it is killed.
STOP_TIMEOUT = 15.0

#: The least number of times every timed case runs: its report is the median of them.
REPEATS = 3

_T = TypeVar("_T")


@attr.s(frozen=True, auto_attribs=True)
class Target:
    """One goal a benchmark checks: what, the goal, what was measured, and whether it was met."""

    what: str
    goal: str
    measured: str
    met: bool

    def to_json(self) -> dict:
        """This target as JSON."""
        return attr.asdict(self)


@attr.s(frozen=True)
class Repeats:
    """
    One number measured in every repeat of a timed case (seconds, a rate, a ratio):
    reported as the median with the smallest and the largest, and judged on the median.
    """

    values: tuple = attr.ib(converter=tuple)

    @values.validator
    def _some(self, attribute, values) -> None:
        if not values:
            raise ValueError("a case that ran no times has no median")

    @classmethod
    def of(cls, runs: Sequence[dict], key: str) -> "Repeats":
        """The values of ``key`` in each run's results."""
        return cls(run[key] for run in runs)

    @property
    def median(self) -> float:
        """The median of the repeats (what tables show and targets judge)."""
        return statistics.median(self.values)

    @property
    def minimum(self) -> float:
        """The smallest repeat."""
        return min(self.values)

    @property
    def maximum(self) -> float:
        """The largest repeat."""
        return max(self.values)

    def describe(self, render: Callable[[float], str] = str) -> str:
        """``median (min–max)`` for a table, each value written by ``render``."""
        return f"{render(self.median)} ({render(self.minimum)}–{render(self.maximum)})"

    def to_json(self, digits: int = 4) -> dict:
        """The median, min and max, and every repeat in the order they ran."""
        return {"median": round(self.median, digits), "min": round(self.minimum, digits),
                "max": round(self.maximum, digits),
                "repeats": [round(v, digits) for v in self.values]}

    def target(self, what: str, goal: str, met: Callable[[float], bool],
               render: Callable[[float], str] = str) -> "Target":
        """A target met when ``met(median)`` holds; it shows the median, min and max."""
        return Target(what=what, goal=goal, measured=self.describe(render),
                      met=bool(met(self.median)))


def _check_times(times: int) -> None:
    if times < REPEATS:
        raise ValueError(f"a timed case runs at least {REPEATS} times, not {times}")


async def repeat(case: Callable[[int], Awaitable[_T]], times: int = REPEATS,
                 log: Optional[Callable[[str], None]] = None, what: str = "") -> list[_T]:
    """Run the timed ``case(i)`` for i = 0 .. ``times`` - 1 (at least ``REPEATS``), one
    after another; its results in order."""
    _check_times(times)
    results = []
    for i in range(times):
        results.append(await case(i))
        if log is not None:
            log(f"{what or 'case'}: run {i + 1} of {times} done")
    return results


def repeat_blocking(case: Callable[[int], _T], times: int = REPEATS,
                    log: Optional[Callable[[str], None]] = None, what: str = "") -> list[_T]:
    """``repeat`` for a blocking ``case`` (one run in a thread, as docker_run.py's)."""
    _check_times(times)
    results = []
    for i in range(times):
        results.append(case(i))
        if log is not None:
            log(f"{what or 'case'}: run {i + 1} of {times} done")
    return results


@attr.s(frozen=True, auto_attribs=True)
class Section:
    """
    What one benchmark module reports: a markdown section for docs/benchmarks.md (starting
    with a ``##`` heading), JSON-able ``results`` for bench/results/latest.json, and the
    targets it checked.
    """

    name: str
    markdown: str
    results: Any
    targets: tuple[Target, ...] = ()


@attr.s(frozen=True, auto_attribs=True)
class Context:
    """
    What ``bench/run.py`` hands each benchmark: a fresh scratch folder, a progress log, and
    where to put profiles of the processes under test (None: do not profile).
    """

    workdir: Path
    log: Callable[[str], None]
    profile_dir: Optional[Path] = None


class Profiler:
    """
    ``py-spy record`` sampling process ``pid`` for ``seconds`` into ``output`` (an SVG
    flame graph). py-spy samples without stopping the process (``--nonblocking``), so
    profiling costs the measured process little; it still takes CPU of its own.
    """

    def __init__(self, pid: int, seconds: float, output: Path):
        executable = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(executable).exists():
            raise RuntimeError("profiling needs py-spy: pip install py-spy")
        output.parent.mkdir(parents=True, exist_ok=True)
        self.output = output
        self._process = subprocess.Popen(
            [executable, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
             "--rate", "200", "--nonblocking", "--format", "raw" if str(output).endswith(".txt") else "flamegraph", "-o", str(output)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait(self) -> None:
        """Wait for the profile to be written (call once the measured work is over)."""
        _, errors = self._process.communicate(timeout=60)
        if self._process.returncode != 0:
            raise RuntimeError(f"py-spy failed: {errors.decode('utf-8', 'replace').strip()}")


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0 < p <= 100) of ``values`` by the nearest-rank method."""
    if not values:
        raise ValueError("the percentile of no values is undefined")
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p} is not in (0, 100]")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def latency_stats(seconds: Sequence[float]) -> dict:
    """The count, p50, p90, p99, min and max of ``seconds``, in milliseconds, for JSON."""
    ms = [v * 1000 for v in seconds]
    return {"count": len(ms), "p50_ms": round(percentile(ms, 50), 1),
            "p90_ms": round(percentile(ms, 90), 1), "p99_ms": round(percentile(ms, 99), 1),
            "min_ms": round(min(ms), 1), "max_ms": round(max(ms), 1)}


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds used so far by process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """User plus system CPU seconds used so far by this process."""
    times = os.times()
    return times.user + times.system


def machine_cpu_seconds() -> float:
    """CPU seconds all processes on this machine have used since boot (all CPUs, not idle)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    # user nice system idle iowait irq softirq steal: all but idle, iowait and the time
    # the hypervisor gave to other machines (guest time is already counted in user).
    busy = sum(int(x) for i, x in enumerate(fields[:8]) if i not in (3, 4, 7))
    return busy / os.sysconf("SC_CLK_TCK")


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (what ``uptime`` shows)."""
    return os.getloadavg()


def _filesystem_of(path: Path) -> str:
    """The type and device of the filesystem holding ``path``, from /proc/self/mounts."""
    path = path.resolve()
    best = ("", "unknown", "unknown")
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            device, mount_point, fstype = line.split()[:3]
            mount_point = mount_point.replace("\\040", " ")
            if (path == Path(mount_point) or Path(mount_point) in path.parents) \
                    and len(mount_point) >= len(best[0]):
                best = (mount_point, fstype, device)
    except OSError:
        pass
    return f"{best[1]} on {best[2]}"


def describe_machine(workdir: Path) -> dict:
    """The machine the numbers come from: CPUs, memory, kernel, Python, disk, load."""
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace"),
        "scratch_filesystem": _filesystem_of(workdir),
        "load_average_at_start": [round(x, 2) for x in load_average()],
    }


class _ControlProtocol(ProcessProtocol):
    """Watches a control service's JSON-lines log for its start and its exit."""

    def __init__(self):
        self.started: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self.stderr_tail = b""
        self._buffer = b""
        self._seen_start = False

    def outReceived(self, data: bytes) -> None:
        if self._seen_start:
            return  # Request logs are not needed; reading them keeps the pipe flowing.
        self._buffer += data
        while b"\n" in self._buffer and not self._seen_start:
            line, self._buffer = self._buffer.split(b"\n", 1)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event_type") == "pyflock:control:started":
                self._seen_start = True
                self._buffer = b""
                self.started.callback(event)

    def errReceived(self, data: bytes) -> None:
        self.stderr_tail = (self.stderr_tail + data)[-4000:]

    def processEnded(self, reason) -> None:
        if not self._seen_start:
            self._seen_start = True
            self.started.errback(RuntimeError(
                "pyflock-control exited before it started: "
                + self.stderr_tail.decode("utf-8", "replace").strip()))
        self.ended.callback(reason.value)


def _control_command() -> list[str]:
    """The ``pyflock-control`` of this Python's environment, or the module run directly."""
    script = Path(sys.executable).parent / "pyflock-control"
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c",
            "import sys; from pyflock.control._script import main; main(sys.argv[1:])"]


@attr.s(auto_attribs=True)
class ControlService:
    """
    A running ``pyflock-control`` process: its pid, REST API port, certificates and data
    path; ``stop()`` ends it. ``startup_seconds`` is the time from spawn to listening.
    """

    reactor: Any
    pid: int
    port: int
    certificates: ClusterCertificates
    data_path: Path
    startup_seconds: float
    _transport: Any
    _protocol: _ControlProtocol

    @property
    def base_url(self) -> str:
        """The API's root URL, without ``/v1``."""
        return f"https://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """CPU seconds the service process has used so far."""
        return process_cpu_seconds(self.pid)

    async def stop(self) -> None:
        """Stop the service with SIGTERM (SIGKILL if it does not exit in time) and wait."""
        if self._protocol.ended.called:
            return
        self._signal("TERM")
        timer = self.reactor.callLater(STOP_TIMEOUT, self._signal, "KILL")
        try:
            reason = await self._protocol.ended
        finally:
            if timer.active():
                timer.cancel()
        stopped_by_us = getattr(reason, "signal", None) == signal.SIGTERM
        if not (isinstance(reason, ProcessDone) or stopped_by_us):
            raise RuntimeError(f"pyflock-control did not stop cleanly ({reason}): "
                               + self._protocol.stderr_tail.decode("utf-8", "replace"))

    def _signal(self, name: str) -> None:
        try:
            self._transport.signalProcess(name)
        except ProcessExitedAlready:
            pass


def make_certificates(workdir: Path) -> ClusterCertificates:
    """A fresh cluster CA in ``workdir/certificates`` with two nodes and user ``bench``."""
    from tests.harness.certificates import make_cluster_certificates
    folder = workdir / "certificates"
    folder.mkdir(parents=True)
    return make_cluster_certificates(folder, nodes=2, users=(BENCH_USER,),
                                     control_host="127.0.0.1", name="bench-cluster")


async def spawn_and_wait(reactor, protocol: ProcessProtocol, command: Sequence[str],
                         awaited: Deferred, timeout: float, signal_name: str
                         ) -> tuple[Any, Any]:
    """
    Spawn ``command`` (in this process's environment) with ``protocol``, and wait for
    ``awaited`` (one of the protocol's Deferreds), sending the process ``signal_name`` if
    it has not fired within ``timeout`` seconds; the process's transport and the result.
    """
    transport = reactor.spawnProcess(protocol, command[0], list(command),
                                     env=dict(os.environ))
    timer = reactor.callLater(timeout, transport.signalProcess, signal_name)
    try:
        return transport, await awaited
    finally:
        if timer.active():
            timer.cancel()


async def start_control_service(reactor, certificates: ClusterCertificates,
                                data_path: Path,
                                extra_arguments: Sequence[str] = ()) -> ControlService:
    """
    Start ``pyflock-control run`` on a free port of 127.0.0.1 over ``data_path`` with
    ``certificates``; fires once it is listening (after it has loaded its store).
    """
    protocol = _ControlProtocol()
    command = _control_command() + [
        "run", "--data-path", str(data_path),
        "--port", "tcp:0:interface=127.0.0.1",
        "--agent-port", "tcp:0:interface=127.0.0.1",
        "--join-port", "tcp:0:interface=127.0.0.1",
        "--certificates-directory", str(certificates.path), *extra_arguments]
    began = time.perf_counter()
    transport, event = await spawn_and_wait(reactor, protocol, command,
                                            protocol.started, START_TIMEOUT, "KILL")
    startup = time.perf_counter() - began
    port = int(event["address"].rsplit(":", 1)[1])
    return ControlService(reactor=reactor, pid=transport.pid, port=port,
                          certificates=certificates, data_path=data_path,
                          startup_seconds=startup, transport=transport, protocol=protocol)


def format_ms(seconds: Optional[float]) -> str:
    """Seconds as milliseconds for a table: ``12.3 ms``, or ``n/a``."""
    if seconds is None:
        return "n/a"
    milliseconds = seconds * 1000
    return f"{milliseconds:.1f} ms" if milliseconds < 100 else f"{milliseconds:.0f} ms"


__all__ = [
    "BENCH_USER", "REPEATS", "Context", "ControlService", "Profiler", "Repeats", "Section",
    "Target", "describe_machine", "format_ms", "latency_stats", "load_average",
    "machine_cpu_seconds", "make_certificates", "own_cpu_seconds", "percentile",
    "process_cpu_seconds", "repeat", "repeat_blocking", "spawn_and_wait",
    "start_control_service",
]
