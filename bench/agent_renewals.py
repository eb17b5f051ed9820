"""
Benchmark of what a lease renewal costs an agent: 10,000 datasets in the cluster, one
agent holding 100 of them (mounted here), and one lease renewal per second from it, each
pushed back to the agent as a one-dataset diff.

The agent's side runs in this process as in ``pyflock-agent``: the real ``AgentChannel``
takes each diff as a frame (decoding, applying it to the view), hands it to the real
convergence loop (``node_convergence_loop`` over the memory backend, converged first) and
to the real ``ViewFile`` on this machine's disk, written in a thread of a ``Pools`` pool
as the agent does. Time for the channel and the loop is a ``Clock`` advanced one second
per renewal; the file writes are real and awaited, so renewals never pile up. Each
renewal's frame is encoded before the measurement (that is the control service's work).

Per renewal it measures this process's CPU time (every thread: ``time.process_time``
around the whole series, divided by the renewals), the bytes
it writes (``wchar`` of ``/proc/self/io``: every write call), and the wall time until the
view is durable. Two cases, each repeated: *O(change)*, as the agent runs now (the diff is
appended to the view file, the loop judges the diff alone), and *whole view*, as it ran
before (the agent hands the loop and the view file the new view alone: the loop computes
the whole desired state, the file is rewritten whole). A compaction of the view file (a
new base, once the appended diffs outweigh it) is timed on its own and spread over the
renewals that lead to one, to give the amortized cost. The Docker plugin's share (it
reads the view too) is not included.

Run alone: ``python bench/run.py --only agent_renewals --output /tmp/bench.md``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable
from uuid import uuid4

import attr
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from _harness import Context, Section, Target
from pyflock.agent._backends import MemoryBlockStore, MiB
from pyflock.agent._channel import AgentChannel
from pyflock.agent._loop import node_convergence_loop
from pyflock.agent._view import (
    VIEW_FILE, AgentView, ViewFile, diff_to_bytes, view_to_bytes, write_view,
)
from pyflock.common._threads import Pools, run_now
from pyflock.common._records import Lease, Node
from pyflock.common._wire import (
    DatasetEntry, Diff, Snapshot, Welcome, encode,
)
from tests.harness.endpoints import StringEndpoint
from tests.harness.memory import MemoryDisks, MemoryFilesystems

#: Datasets in the cluster, and how many of them the measured agent holds.
DATASETS = 10_000
HELD = 100

#: Other nodes holding the rest.
OTHER_NODES = 9

#: Renewals measured per repeat of each case; the whole-view case costs about a second
#: each at 10,000 datasets, hence fewer.
RENEWALS = {"change": 300, "whole": 20}

#: Times each case is repeated (the report gives the median, min and max).
REPEATS = 3

#: Seconds a lease lasts from its renewal (the plugin's ``LEASE_DURATION``).
LEASE_SECONDS = 60.0

#: The goals: a renewal costs the agent at most a couple of milliseconds of CPU and about
#: the bytes of its diff, whatever the number of datasets.
CPU_GOAL = 0.002
BYTES_GOAL = 4096


def _written_bytes() -> int:
    """Bytes this process has passed to write calls so far (``wchar``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line")


@attr.s(auto_attribs=True)
class _Agent:
    """The measured agent's channel, loop and view file, and the view it holds."""

    clock: Clock
    node: str
    channel: AgentChannel
    endpoint: StringEndpoint
    saves: list
    view_file: ViewFile


def _cluster(node: str) -> Snapshot:
    """10,000 datasets, the first ``HELD`` on ``node`` and leased by it."""
    others = [str(uuid4()) for _ in range(OTHER_NODES)]
    datasets = []
    for n in range(DATASETS):
        primary = node if n < HELD else others[n % OTHER_NODES]
        dataset_id = str(uuid4())
        datasets.append(DatasetEntry(
            dataset_id=dataset_id, primary=primary, maximum_size=64 * MiB,
            metadata={"name": f"volume-{n}"},
            lease=Lease(dataset_id, primary, LEASE_SECONDS) if n < HELD else None,
            holders=(primary,)))
    nodes = [Node(uuid=u, host="127.0.0.1") for u in [node, *others]]
    return Snapshot(epoch="bench", version=1, datasets=tuple(datasets), nodes=tuple(nodes))


async def _start_agent(reactor, workdir: Path, pools: Pools, by_change: bool) -> _Agent:
    """An agent that converged on a fresh 10,000-dataset snapshot, its view stored."""
    clock = Clock()
    node = str(uuid4())
    store = MemoryBlockStore()
    backend = store.backend(node)
    # The loop's periodic safety-net rediscovery is not a renewal's cost: out of the way.
    loop = node_convergence_loop(clock, backend, MemoryFilesystems(MemoryDisks(store), backend),
                                 "/mnt/bench", lambda states: None, interval=3600.0,
                                 run_blocking=run_now)
    view_file = ViewFile(workdir / VIEW_FILE, reactor,
                         run_in_thread=pools.run_blocking("plugin"))
    saves: list = []
    endpoint = StringEndpoint()
    channel: AgentChannel

    def on_view(view):
        loop.update(view, channel.change if by_change else None)

    def save(view) -> Deferred:
        d = view_file.save(view, channel.change if by_change else None)
        saves.append(d)
        return d
    channel = AgentChannel(clock, endpoint, node, "era", on_view, save_view=save)
    loop.start()
    channel.start()
    endpoint.protocol.stringReceived(encode(Welcome(epoch="bench", version=1)))
    endpoint.protocol.stringReceived(encode(_cluster(node)))
    await saves[-1]
    if loop.failures or loop.busy:
        raise RuntimeError("the agent did not converge on the benchmark's cluster")
    return _Agent(clock=clock, node=node, channel=channel, endpoint=endpoint, saves=saves,
                  view_file=view_file)


def _renewals(view: AgentView, held: list, count: int, now: float) -> list[bytes]:
    """The frame payloads of ``count`` renewals, one a second after ``now``, each
    extending one held dataset's lease (encoded ahead: the control service's work)."""
    payloads = []
    for n in range(count):
        dataset = view.dataset(held[n % len(held)])
        renewed = now + n + 1 + LEASE_SECONDS
        payloads.append(encode(Diff(epoch=view.epoch, version=view.version + n + 1, datasets=(
            attr.evolve(dataset, lease=Lease(dataset.dataset_id, dataset.primary, renewed)),))))
    return payloads


async def _measure(reactor, workdir: Path, pools: Pools, by_change: bool,
                   renewals: int) -> dict:
    """One repeat of a case: per-renewal CPU, bytes and wall time, as means."""
    agent = await _start_agent(reactor, workdir, pools, by_change)
    try:
        view = agent.channel.view
        held = sorted(d.dataset_id for d in view.live_datasets() if d.primary == agent.node)
        payloads = _renewals(view, held, renewals, agent.clock.seconds())
        walls = []
        # CPU of every thread of this process (the file writes run in the pool), read
        # around the whole series: a renewal costs less than the clock's resolution.
        cpu0, bytes0 = time.process_time(), _written_bytes()
        for payload in payloads:
            agent.clock.advance(1)
            wall0 = time.perf_counter()
            agent.endpoint.protocol.stringReceived(payload)
            await agent.saves[-1]
            walls.append(time.perf_counter() - wall0)
        cpu, written = time.process_time() - cpu0, _written_bytes() - bytes0
        if agent.channel.view.version != view.version + renewals \
                or len(agent.saves) != 1 + renewals:
            raise RuntimeError("the agent's view or its file missed renewals")
        return {"renewals": renewals, "cpu_seconds": cpu / renewals,
                "bytes": written / renewals, "wall_seconds": statistics.mean(walls),
                "file_bytes": (workdir / VIEW_FILE).stat().st_size}
    finally:
        stopped = agent.channel.stop()
        agent.endpoint.protocol.connectionLost(Failure(ConnectionDone()))
        await stopped


def _compaction(workdir: Path, view: AgentView, diff: bytes) -> dict:
    """What one compaction (a new base) costs, and how many renewals lead to one."""
    path = workdir / "compaction.json"
    costs = []
    for _ in range(REPEATS):
        cpu0, bytes0 = time.process_time(), _written_bytes()
        write_view(path, view)
        costs.append((time.process_time() - cpu0, _written_bytes() - bytes0))
    base = len(view_to_bytes(view))
    return {"cpu_seconds": statistics.median(c for c, _ in costs),
            "bytes": statistics.median(b for _, b in costs), "base_bytes": base,
            "renewals_between": max(1, base // len(diff))}


def _spread(values: list, key: str) -> dict:
    numbers = [v[key] for v in values]
    return {"median": statistics.median(numbers), "min": min(numbers), "max": max(numbers)}


def _format_cpu(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs" if seconds < 0.001 else f"{seconds * 1000:.1f} ms"


def _format_bytes(count: float) -> str:
    return f"{count / 1e6:.2f} MB" if count >= 1e6 else f"{count:,.0f} B"


def _row(name: str, spread: Callable[[str], dict], renewals: int, fmt: dict) -> str:
    cells = [f"{fmt[k](spread(k)['median'])} ({fmt[k](spread(k)['min'])}–"
             f"{fmt[k](spread(k)['max'])})" for k in ("cpu_seconds", "bytes", "wall_seconds")]
    return f"| {name} | {renewals} × {REPEATS} | " + " | ".join(cells) + " |"


async def benchmark(reactor, context: Context) -> Section:
    """Measure a lease renewal's cost to an agent of a 10,000-dataset cluster."""
    pools = Pools(reactor, {"plugin": 4})
    pools.start()
    try:
        cases = {}
        for case in ("change", "whole"):
            repeats = []
            for repeat in range(REPEATS):
                folder = context.workdir / f"{case}-{repeat}"
                folder.mkdir()
                result = await _measure(reactor, folder, pools, case == "change",
                                        RENEWALS[case])
                context.log(f"agent renewals, {case}, repeat {repeat + 1}: "
                            f"{_format_cpu(result['cpu_seconds'])} CPU, "
                            f"{_format_bytes(result['bytes'])} written per renewal")
                repeats.append(result)
            cases[case] = repeats
        sample = AgentView.from_snapshot(_cluster(str(uuid4())))
        some = next(iter(sample.datasets.values()))
        diff = diff_to_bytes(Diff(epoch="bench", version=2, datasets=(
            attr.evolve(some, lease=Lease(some.dataset_id, some.primary, 100.0)),)))
        compaction = _compaction(context.workdir, sample, diff)
    finally:
        pools.stop()

    def spread(case):
        return lambda key: _spread(cases[case], key)
    change_cpu = spread("change")("cpu_seconds")["median"]
    change_bytes = spread("change")("bytes")["median"]
    amortized_cpu = change_cpu + compaction["cpu_seconds"] / compaction["renewals_between"]
    amortized_bytes = change_bytes + compaction["bytes"] / compaction["renewals_between"]
    fmt = {"cpu_seconds": _format_cpu, "bytes": _format_bytes,
           "wall_seconds": lambda s: f"{s * 1000:.2f} ms"}
    markdown = "\n".join([
        "## Agent: cost of a lease renewal",
        "",
        f"{DATASETS:,} datasets, one agent holding {HELD} of them, one lease renewal per "
        "second, each pushed to the agent as a one-dataset diff (`bench/agent_renewals.py`:"
        " the real channel, convergence loop and view file in one process, the file on "
        "this machine's disk). Per renewal: the agent's CPU (all threads), the bytes it "
        "writes, and the wall time until the view is durable; median (min–max) of "
        f"{REPEATS} repeats, each the mean over its renewals. *O(change)* is the agent "
        "now (the diff appended to the view file; the loop judges the diff alone); "
        "*whole view* is how it worked before (the whole desired state computed, the "
        "whole file rewritten and fsync'd at each push).",
        "",
        "| case | renewals | CPU per renewal | bytes written per renewal | wall per renewal |",
        "|---|---:|---:|---:|---:|",
        _row("O(change)", spread("change"), RENEWALS["change"], fmt),
        _row("whole view (before)", spread("whole"), RENEWALS["whole"], fmt),
        "",
        f"A compaction (the view file rewritten as one base of "
        f"{_format_bytes(compaction['base_bytes'])}) costs "
        f"{_format_cpu(compaction['cpu_seconds'])} of CPU and comes once every "
        f"{compaction['renewals_between']:,} renewals or so; spread over them, a renewal "
        f"costs {_format_cpu(amortized_cpu)} of CPU and {_format_bytes(amortized_bytes)} "
        f"written.",
    ])
    targets = (
        Target(what=f"agent CPU per lease renewal, {DATASETS:,} datasets (amortized)",
               goal=f"< {_format_cpu(CPU_GOAL)}", measured=_format_cpu(amortized_cpu),
               met=amortized_cpu < CPU_GOAL),
        Target(what=f"bytes written per lease renewal, {DATASETS:,} datasets (amortized)",
               goal=f"< {_format_bytes(BYTES_GOAL)}", measured=_format_bytes(amortized_bytes),
               met=amortized_bytes < BYTES_GOAL),
    )
    results = {"datasets": DATASETS, "held": HELD, "repeats": REPEATS, "cases": cases,
               "compaction": compaction, "amortized": {
                   "cpu_seconds": amortized_cpu, "bytes": amortized_bytes}}
    return Section(name="agent_renewals", markdown=markdown, results=results,
                   targets=targets)
