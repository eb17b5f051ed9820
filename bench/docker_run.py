"""
Benchmark of ``docker run`` with a pyflock volume against real dockerd: what a user waits
for. Two simulated Docker hosts (``tests.harness.dockerd``), each with its own
dockerd and a real ``pyflock-agent`` serving the plugin, and a real ``pyflock-control`` on
127.0.0.1, set up as the end-to-end tests do (``PyflockDockerCluster`` of
``tests.harness.docker_cluster``). Every number is the wall time of one ``docker`` CLI command, the
CLI's own start included.

- *new volume*: the pair ``docker run --rm -v NEWNAME:PATH busybox:local true`` then
  ``docker volume rm NEWNAME`` on n1, with a new pyflock volume (``--volume-driver
  pyflock``: Get, Create, the agent creating, attaching, formatting and mounting a
  dataset, the Mount(s), then Remove) side by side with the same pair on Docker's
  built-in ``local`` driver; the two alternate, pair after pair, so that both see the
  same machine load; judged on the median of the paired ratios. PATH is ``/data``, which
  the image has (copy-up: two Mounts), or ``/vol``, which it has not (one Mount). The
  dockerds use overlay2 and the volumes are 10 GiB, as ``make up``'s;
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
    Context, Repeats, Section, format_ms, latency_stats, load_average, percentile,
)
from tests.harness.docker_cluster import PyflockDockerCluster
from tests.harness.dockerd import require_docker, short_workdir

#: Pairs (``docker run`` then ``docker volume rm``) of each new-volume case and driver,
#: pyflock and local alternating.
NEW_VOLUME_PAIRS = 30

#: Runs of each existing-volume case.
EXISTING_VOLUME_RUNS = 10

#: Runs that move the volume to the other host.
MOVE_RUNS = 10

#: ``VolumeDriver.Get`` requests timed straight on the plugin's socket.
GET_REQUESTS = 50

#: The goal (issue 7, point 9): a new pyflock volume's pair (``docker run`` plus ``docker
#: volume rm``) within this factor of the local driver's, median of the paired ratios.
RATIO_GOAL = 1.15

#: dockerd's storage driver: ``make up``'s (its host dockerd's default on ext4).
STORAGE_DRIVER = "overlay2"

#: Size of a new volume: ``make up``'s agent's ``default_size``.
VOLUME_SIZE = "10G"

IMAGE = "busybox:local"

#: The new-volume cases, by where the volume is mounted: the image's ``/data`` (dockerd
#: copies what the image holds there into the new volume: two Mounts), and a path the
#: image does not have (nothing to copy: one Mount).
COPY_UP, NO_COPY_UP = "copy-up", "no copy-up"
MOUNT_PATHS = {COPY_UP: "/data", NO_COPY_UP: "/vol"}
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
        cluster = PyflockDockerCluster(workdir, storage_driver=STORAGE_DRIVER,
                                       default_size=VOLUME_SIZE)
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
        for path in MOUNT_PATHS.values():
            node.docker(*RUN, "-v", f"warm:{path}", "--volume-driver", "pyflock", IMAGE,
                        "true")
            node.docker("volume", "rm", "warm")
            node.docker(*RUN, "-v", f"warm-local:{path}", IMAGE, "true")
            node.docker("volume", "rm", "warm-local")

    new_volume, runs = {}, []
    for case, path in MOUNT_PATHS.items():
        pairs = {"pyflock": [], "local": []}
        for i in range(NEW_VOLUME_PAIRS):
            order = ("pyflock", "local") if i % 2 == 0 else ("local", "pyflock")
            for driver in order:
                name = f"new-{case.replace(' ', '-')}-{driver}-{i:02d}"
                extra = ("--volume-driver", "pyflock") if driver == "pyflock" else ()
                began, run = _timed(n1, *RUN, "-v", f"{name}:{path}", *extra, IMAGE, "true")
                removed = _timed(n1, "volume", "rm", name)[1]
                pairs[driver].append((run, removed))
                if driver == "pyflock" and case == COPY_UP:
                    runs.append((name, began, run))
        new_volume[case] = pairs
        pyflock_pairs = Repeats(sum(p) for p in pairs["pyflock"])
        local_pairs = Repeats(sum(p) for p in pairs["local"])
        context.log(f"new volume, {case}: pyflock pair {pyflock_pairs.describe(format_ms)}, "
                    f"local pair {local_pairs.describe(format_ms)}")

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
        "runs": {"new_volume_pairs": NEW_VOLUME_PAIRS,
                 "existing_volume": EXISTING_VOLUME_RUNS, "moves": MOVE_RUNS},
        "storage_driver": cluster.storage_driver, "volume_size": cluster.default_size,
        # Per case and driver, every (docker run, docker volume rm) pair in the order ran.
        "new_volume_seconds": new_volume,
        "pyflock_existing_volume": latency_stats(pyflock_existing),
        "local_existing_volume": latency_stats(local_existing),
        "move": latency_stats(moves),
        "plugin_get": latency_stats(gets),
        "phases_ms": {k: round(v * 1000, 1) for k, v in phases},
        "load_before": load_before, "load_after": load_after,
        # Every run, in the order they ran (the tables summarize them).
        "repeats_seconds": {
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


def _paired_ratios(pairs: dict) -> Repeats:
    """Each pyflock pair's seconds over the local pair's that ran beside it (pure)."""
    return Repeats(sum(mine) / sum(theirs)
                   for mine, theirs in zip(pairs["pyflock"], pairs["local"]))


def _pair_rows(new_volume: dict) -> str:
    rows = []
    for case, pairs in new_volume.items():
        for driver in ("pyflock", "local"):
            run = Repeats(p[0] for p in pairs[driver])
            removed = Repeats(p[1] for p in pairs[driver])
            pair = Repeats(sum(p) for p in pairs[driver])
            rows.append(f"| {case}, {driver} | {len(pairs[driver])} | "
                        f"{pair.describe(format_ms)} | {run.describe(format_ms)} | "
                        f"{removed.describe(format_ms)} |")
    return "\n".join(rows)


def _section(results: dict) -> Section:
    new_volume = results["new_volume_seconds"]
    ratios = {case: _paired_ratios(pairs) for case, pairs in new_volume.items()}
    targets = tuple(
        ratio.target(what=f"new volume, {case}: `docker run` + `docker volume rm`, pyflock "
                          f"/ local driver, median of {len(ratio.values)} paired ratios",
                     goal=f"<= {RATIO_GOAL:g}x", met=lambda r: r <= RATIO_GOAL,
                     render=lambda r: f"{r:.2f}x")
        for case, ratio in ratios.items())
    phases = results["phases_ms"]
    get = results["plugin_get"]
    get_p50, get_p99 = format_ms(get["p50_ms"] / 1000), format_ms(get["p99_ms"] / 1000)
    get_count = get["count"]
    phase_rows = "\n".join(f"| {name} | {format_ms(ms / 1000)} |" for name, ms in phases.items())
    results = dict(results, paired_ratios={c: r.to_json() for c, r in ratios.items()},
                   targets=[t.to_json() for t in targets])
    ratio_lines = "\n".join(f"- {case}: {ratio.describe(lambda r: f'{r:.2f}x')}"
                             for case, ratio in ratios.items())
    markdown = f"""## Docker: `docker run` with a pyflock volume

Two simulated Docker hosts on this machine, each a dockerd 20.10
({results['storage_driver']} storage, as `make up`'s dockerd; no network) in its own
mount namespace with a real `pyflock-agent` serving the plugin (loopback backend: sparse
files, loop devices, ext4, {results['volume_size']} volumes as `make up`'s agent makes),
and a real `pyflock-control`; set up as the end-to-end tests do. Each number is the wall
time of one `docker` command, the CLI's start included. Load average (1, 5, 15 min)
before: {', '.join(map(str, results['load_before']))}; after:
{', '.join(map(str, results['load_after']))}.

- *new volume*: a pair of commands, `docker run --rm -v NEWNAME:PATH [--volume-driver
  pyflock] busybox:local true` then `docker volume rm NEWNAME`, with a volume name never
  used before, pyflock and Docker's `local` driver alternating pair after pair so that
  both see the same machine load. Two cases: *copy-up*, PATH = `/data`, which the 2 MB
  busybox image holds (empty), so dockerd first copies it into the new volume (two
  Mounts); and *no copy-up*, PATH = `/vol`, which the image lacks (one Mount);
- *existing volume*: `docker run` of a volume that already exists on this host;
- *move*: `docker run` of a pyflock volume last used on the other host, alternating
  between the hosts: each run includes the move.

A new pyflock volume is a spare file that the agent formatted beforehand (a finished,
empty ext4 of the default size; see *Spare volumes* in docs/backends.md), made a second
after the run that took the last one, so that making spares falls on later runs of
either driver, as it would between a user's commands.

Each pyflock pair's time divided by that of the local pair beside it, median (min–max)
of the {results['runs']['new_volume_pairs']} paired ratios per case (the goal is at most
{RATIO_GOAL:g}x):

{ratio_lines}

| new volume, driver | pairs | pair: median (min–max) | `docker run` | `docker volume rm` |
|---|---:|---:|---:|---:|
{_pair_rows(new_volume)}

| `docker run` | runs | p50 | min | p90 | p99 | max |
|---|---:|---:|---:|---:|---:|---:|
{_row("existing volume, pyflock", results["pyflock_existing_volume"])}
{_row("existing volume, local driver", results["local_existing_volume"])}
{_row("pyflock volume last used on the other host (move)", results["move"])}

### Where a run's time goes

dockerd makes 11 plugin calls per new-volume run: six Gets, Create, and Mount and Unmount
twice. A `VolumeDriver.Get` sent straight to the plugin's socket, on a new connection as
dockerd sends it, takes {get_p50} at p50 and {get_p99} at p99 ({get_count} requests).

Medians over the pyflock new-volume copy-up runs and the moves, from the agent's log
(`pyflock:plugin:created`, and the `seconds` of each `pyflock:plugin:mount`). The first
Mount is the copy-up one (the only one without copy-up): it waits until the agent has made
the dataset (a spare file renamed into place, or a blank one formatted after attaching;
then the loop device and the mount), or until the volume has moved here.

| phase | median |
|---|---:|
{phase_rows}
"""
    return Section(name="docker_run", markdown=markdown, results=results, targets=targets)
