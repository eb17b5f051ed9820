"""
Benchmark of ``docker run`` with a pyflock volume against real dockerd: what a user waits
for. Two simulated Docker hosts (``tests.harness.dockerd``), each with its own
dockerd and a real ``pyflock-agent`` serving the plugin, and a real ``pyflock-control`` on
127.0.0.1, set up as the end-to-end tests do (``PyflockDockerCluster`` of
``tests.harness.docker_cluster``). Every number is the wall time of one ``docker`` CLI command, the
CLI's own start included.

- *new volume*: ``docker run --rm -v NEWNAME:/data busybox:local true`` on n1, with a new
  pyflock volume (``--volume-driver pyflock``: Get, Create, the agent creating, attaching,
  formatting and mounting a dataset, then the copy-up Mount pair, since the image has
  /data) side by side with the same command on Docker's built-in ``local`` driver; the
  two alternate, run after run, so that both see the same machine load;
- *existing volume*: the same with a volume that already exists on n1 (no create);
- *move*: ``docker run`` on one host of a volume last used on the other, so each run
  includes the move (unmount, detach, attach, mount).

The agent's log then says where a new-volume run's time goes (Create, the first Mount
waiting for the dataset, the second Mount, the rest being dockerd and the container).

Needs root, dockerd and busybox-static. Everything it starts it stops.
Run alone: ``python bench/run.py --only docker_run --output /tmp/d.md --json /tmp/d.json``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import time

from twisted.internet.threads import deferToThread

from _harness import (
    Context, Repeats, Section, Target, format_ms, latency_stats, load_average, percentile,
)
from tests.harness.docker_cluster import PyflockDockerCluster
from tests.harness.dockerd import require_docker, short_workdir

#: Runs of each new-volume case (pyflock and local, alternating).
NEW_VOLUME_RUNS = 20

#: Runs of each existing-volume case.
EXISTING_VOLUME_RUNS = 10

#: Runs that move the volume to the other host.
MOVE_RUNS = 10

#: ``VolumeDriver.Get`` requests timed straight on the plugin's socket.
GET_REQUESTS = 50

#: The goal: pyflock's new-volume ``docker run`` within this factor of the local driver's.
RATIO_GOAL = 1.5

IMAGE = "busybox:local"
RUN = ("run", "--rm", "--network", "none")


def _timed(node, *args: str) -> tuple[float, float]:
    """Run ``docker ARGS`` on ``node`` (it must succeed); (start time, seconds taken)."""
    began, clock = time.time(), time.perf_counter()
    node.docker(*args)
    return began, time.perf_counter() - clock


def _measure(context: Context) -> dict:
    """The whole benchmark, blocking: set up, run every case, tear down."""
    require_docker()
    with short_workdir(prefix="pfb-") as workdir:
        cluster = PyflockDockerCluster(workdir)
        try:
            began = time.perf_counter()
            cluster.start()
            context.log(f"control service and 2 Docker hosts with agents up in "
                        f"{time.perf_counter() - began:.1f} s")
            return _cases(cluster, context)
        finally:
            cluster.close()


def _cases(cluster, context: Context) -> dict:
    n1, n2 = cluster["n1"], cluster["n2"]
    load_before = [round(x, 2) for x in load_average()]
    # Warm up: the plugin's activation and the first container of each dockerd.
    for node in (n1, n2):
        node.docker(*RUN, IMAGE, "true")
        node.docker(*RUN, "-v", "warm:/data", "--volume-driver", "pyflock", IMAGE, "true")
        node.docker("volume", "rm", "warm")
        node.docker(*RUN, "-v", "warm-local:/data", IMAGE, "true")
        node.docker("volume", "rm", "warm-local")

    pyflock_new, local_new, runs = [], [], []
    for i in range(NEW_VOLUME_RUNS):
        order = ("pyflock", "local") if i % 2 == 0 else ("local", "pyflock")
        for driver in order:
            name = f"new-{driver}-{i:02d}"
            extra = ("--volume-driver", "pyflock") if driver == "pyflock" else ()
            began, seconds = _timed(n1, *RUN, "-v", f"{name}:/data", *extra, IMAGE, "true")
            (pyflock_new if driver == "pyflock" else local_new).append(seconds)
            if driver == "pyflock":
                runs.append((name, began, seconds))
            # Removed untimed, so that every run meets the same number of volumes.
            n1.docker("volume", "rm", name)
    context.log(f"new volume: pyflock p50 {format_ms(percentile(pyflock_new, 50))}, "
                f"local p50 {format_ms(percentile(local_new, 50))}")

    n1.docker("volume", "create", "-d", "pyflock", "kept")
    n1.docker("volume", "create", "kept-local")
    pyflock_existing, local_existing = [], []
    for i in range(EXISTING_VOLUME_RUNS):
        pyflock_existing.append(_timed(n1, *RUN, "-v", "kept:/data", "--volume-driver",
                                       "pyflock", IMAGE, "true")[1])
        local_existing.append(_timed(n1, *RUN, "-v", "kept-local:/data", IMAGE, "true")[1])
    context.log(f"existing volume: pyflock p50 {format_ms(percentile(pyflock_existing, 50))}"
                f", local p50 {format_ms(percentile(local_existing, 50))}")

    moves, move_mounts = [], []
    node = n1
    for i in range(MOVE_RUNS):
        node = n2 if node is n1 else n1
        began, seconds = _timed(node, *RUN, "-v", "kept:/data", "--volume-driver",
                                "pyflock", IMAGE, "true")
        moves.append(seconds)
        mounts = [e for e in cluster.agent_events(node, "pyflock:plugin:mount")
                  if e["name"] == "kept" and began <= e["time"] <= began + seconds]
        if len(mounts) == 2:
            move_mounts.append((mounts[0]["seconds"], mounts[1]["seconds"]))
    context.log(f"move: p50 {format_ms(percentile(moves, 50))}")

    gets = _plugin_gets(n1, "kept")
    phases = _phases(cluster.agent_events(n1), runs)
    if move_mounts:
        phases += [("move: first Mount (waits for the move)",
                    statistics.median(m[0] for m in move_mounts)),
                   ("move: second Mount", statistics.median(m[1] for m in move_mounts))]
    load_after = [round(x, 2) for x in load_average()]
    return {
        "runs": {"new_volume": NEW_VOLUME_RUNS, "existing_volume": EXISTING_VOLUME_RUNS,
                 "moves": MOVE_RUNS},
        "pyflock_new_volume": latency_stats(pyflock_new),
        "local_new_volume": latency_stats(local_new),
        "pyflock_existing_volume": latency_stats(pyflock_existing),
        "local_existing_volume": latency_stats(local_existing),
        "move": latency_stats(moves),
        "plugin_get": latency_stats(gets),
        "phases_ms": {k: round(v * 1000, 1) for k, v in phases},
        "load_before": load_before, "load_after": load_after,
        # Every run, in the order they ran (the tables summarize them).
        "repeats_seconds": {
            "pyflock_new_volume": pyflock_new, "local_new_volume": local_new,
            "pyflock_existing_volume": pyflock_existing,
            "local_existing_volume": local_existing, "move": moves,
            "plugin_get": gets},
    }


def _plugin_gets(node, name: str) -> list[float]:
    """Seconds of ``GET_REQUESTS`` ``VolumeDriver.Get`` calls of ``name`` sent straight to
    ``node``'s plugin socket, each on a new connection without a Host header, as dockerd
    20.10 sends them."""
    body = json.dumps({"Name": name}).encode()
    request = (b"POST /VolumeDriver.Get HTTP/1.1\r\nContent-Length: %d\r\n"
               b"Accept: application/vnd.docker.plugins.v1.2+json\r\n\r\n" % len(body)
               + body)
    seconds = []
    for _ in range(GET_REQUESTS):
        began = time.perf_counter()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(node.plugins / "pyflock.sock"))
            sock.sendall(request)
            response = http.client.HTTPResponse(sock)
            response.begin()
            reply = json.loads(response.read())
        seconds.append(time.perf_counter() - began)
        if reply.get("Err"):
            raise RuntimeError(f"VolumeDriver.Get of {name} failed: {reply['Err']}")
    return seconds


def _phases(events: list[dict], runs: list[tuple[str, float, float]]
            ) -> list[tuple[str, float]]:
    """
    Medians of where a new-volume ``docker run`` spends its time, from the agent's log:
    until the plugin's Create is done (CLI, dockerd, Get, Create: the REST call), the
    first (copy-up) Mount (which waits until the agent has created, attached, formatted
    and mounted the dataset), then the second Mount, and the rest of the run (dockerd
    and the container itself, between and after the plugin's calls).
    """
    by_name: dict[str, list[dict]] = {}
    for event in events:
        if event.get("event_type", "").startswith("pyflock:plugin:") and "name" in event:
            by_name.setdefault(event["name"], []).append(event)
    phases: dict[str, list[float]] = {}
    order = ["new volume: start -> Create answered (CLI, dockerd, Get, Create)",
             "new volume: Create answered -> first Mount called",
             "new volume: first Mount (waits for the new dataset)",
             "new volume: second Mount",
             "new volume: the rest (dockerd, container, Gets, Unmounts)"]
    for name, began, seconds in runs:
        mine = by_name.get(name, [])
        created = [e for e in mine if e["event_type"] == "pyflock:plugin:created"]
        mounts = [e for e in mine if e["event_type"] == "pyflock:plugin:mount"]
        if not created or len(mounts) < 2:
            continue
        first_called = mounts[0]["time"] - mounts[0]["seconds"]
        values = [created[0]["time"] - began, first_called - created[0]["time"],
                  mounts[0]["seconds"], mounts[1]["seconds"]]
        values.append(seconds - sum(values))
        for phase, value in zip(order, values):
            phases.setdefault(phase, []).append(value)
    return [(phase, statistics.median(phases[phase])) for phase in order if phase in phases]


def _row(what: str, stats: dict) -> str:
    cells = [format_ms(stats[k] / 1000)
             for k in ("p50_ms", "min_ms", "p90_ms", "p99_ms", "max_ms")]
    return f"| {what} | {stats['count']} | {' | '.join(cells)} |"


async def benchmark(reactor, context: Context) -> Section:
    """Measure ``docker run`` with pyflock volumes against the local driver."""
    if os.geteuid() != 0:
        raise PermissionError("docker_run needs root (dockerd, loop devices, mounts): run "
                              "bench/run.py as root")
    results = await deferToThread(_measure, context)
    return _section(results)


def _section(results: dict) -> Section:
    new, local = results["pyflock_new_volume"], results["local_new_volume"]
    runs = results["repeats_seconds"]
    pyflock_runs = Repeats(runs["pyflock_new_volume"])
    local_runs = Repeats(runs["local_new_volume"])
    ratio = pyflock_runs.median / local_runs.median
    ratio_p99 = new["p99_ms"] / local["p99_ms"]
    targets = (
        Target(what=f"`docker run` with a new volume, median of {new['count']}: pyflock / "
                    f"local driver",
               goal=f"<= {RATIO_GOAL:g}x", measured=f"{ratio:.2f}x "
                    f"({pyflock_runs.describe(format_ms)} / "
                    f"{local_runs.describe(format_ms)})",
               met=ratio <= RATIO_GOAL),
    )
    phases = results["phases_ms"]
    get = results["plugin_get"]
    get_p50, get_p99 = format_ms(get["p50_ms"] / 1000), format_ms(get["p99_ms"] / 1000)
    get_count = get["count"]
    phase_rows = "\n".join(f"| {name} | {format_ms(ms / 1000)} |" for name, ms in phases.items())
    results = dict(results, ratio_p50=round(ratio, 3), ratio_p99=round(ratio_p99, 3),
                   targets=[t.to_json() for t in targets])
    markdown = f"""## Docker: `docker run` with a pyflock volume

Two simulated Docker hosts on this machine, each a dockerd 20.10 (vfs storage, no network)
in its own mount namespace with a real `pyflock-agent` serving the plugin (loopback
backend: sparse files, loop devices, ext4, 64 MiB volumes), and a real
`pyflock-control`; set up as the end-to-end tests do. Each number is the wall time of one
`docker` command, the CLI's start included. The image is a 2 MB busybox with an empty
`/data`, so every run makes dockerd copy the image's `/data` into the volume first: two
Mounts per run. Load average (1, 5, 15 min) before: {', '.join(map(str, results['load_before']))};
after: {', '.join(map(str, results['load_after']))}.

- *new volume*: `docker run --rm -v NEWNAME:/data [--volume-driver pyflock] busybox:local
  true`, a volume name never used before each time (removed afterwards, untimed), pyflock
  and Docker's `local` driver alternating run after run;
- *existing volume*: the same with a volume that already exists on this host;
- *move*: `docker run` of a pyflock volume last used on the other host, alternating
  between the hosts: each run includes the move.

| `docker run` | runs | p50 | min | p90 | p99 | max |
|---|---:|---:|---:|---:|---:|---:|
{_row("new volume, pyflock", new)}
{_row("new volume, local driver", local)}
{_row("existing volume, pyflock", results["pyflock_existing_volume"])}
{_row("existing volume, local driver", results["local_existing_volume"])}
{_row("pyflock volume last used on the other host (move)", results["move"])}

pyflock / local, new volume: {ratio:.2f}x at the median, {ratio_p99:.2f}x at p99.

### Where a run's time goes

dockerd makes 11 plugin calls per new-volume run: six Gets, Create, and Mount and Unmount
twice. A `VolumeDriver.Get` sent straight to the plugin's socket, on a new connection as
dockerd sends it, takes {get_p50} at p50 and {get_p99} at p99 ({get_count} requests).

Medians over the pyflock new-volume runs and the moves, from the agent's log
(`pyflock:plugin:created`, and the `seconds` of each `pyflock:plugin:mount`). The first
Mount is the copy-up one: it waits until the agent has made the dataset (sparse file, loop
device, mkfs.ext4, mount), or until the volume has moved here.

| phase | median |
|---|---:|
{phase_rows}
"""
    return Section(name="docker_run", markdown=markdown, results=results, targets=targets)
