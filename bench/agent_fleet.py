"""
Benchmark of the agent channel at cluster scale (issues 12 and 9), with bench/simulator.py:
simulated agents in one process, each the real agent's channel over its own TLS
connection, against a real ``pyflock-control``.

Cases (each run ``_harness.REPEATS`` times, every run in a fresh child process and store):

- *today's sizes*: 500 agents, 1,000 datasets, SQLite;
- *a thousand hosts*: 1,000 agents, 10,000 datasets, SQLite: issue 12's budgets (every
  snapshot within 30 s, then change p99 under 1 s, RSS under 1 GiB). A run gives the
  agents ``SYNC_TIMEOUT`` seconds for their snapshots, then reports how many had one, so a
  control service that does not cope shows as a number, not a hang;
- *replicas*: 500 agents spread over two control replicas on a three-member etcd cluster
  (data on disk), changes made through both: issue 9's goal, change p99 under 1 s;
- *a restart* (the thousand hosts, then the control service restarted with
  ``RESTART_CREATED`` datasets created in its store while down): time until every agent
  has them, bytes per agent, snapshots sent (issue 12: agents resume from their version);
- *100,000 datasets*: 100 agents, all synced within 60 s.

Run alone: ``python bench/run.py --only agent_fleet --output /tmp/bench.md``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import attr
from twisted.internet.threads import deferToThread

from _harness import (
    REPEATS, Context, Repeats, Section, Target, format_ms, make_certificates,
    repeat,
)

SIMULATOR = Path(__file__).resolve().parent / "simulator.py"

#: Changes timed per run.
CHANGES = 20

#: Seconds the agents of a run may take to have their first snapshot.
SYNC_TIMEOUT = 90.0

#: Seconds one run may take in all before it is killed.
RUN_TIMEOUT = 600.0

#: Issue 12's budgets for 1,000 agents and 10,000 datasets; issue 9's change goal.
SYNC_GOAL = 30.0
CHANGE_P99_GOAL = 1.0
RSS_GOAL_MIB = 1024.0

#: Datasets created in the store while the control service is down, in the restart case.
RESTART_CREATED = 10


@attr.s(frozen=True, auto_attribs=True)
class Case:
    """One simulated cluster: its name, agents, datasets and control replicas (0: one
    control service on SQLite; n: n replicas on etcd)."""

    name: str
    agents: int
    datasets: int
    replicas: int = 0
    goals: bool = False
    #: Seconds within which every agent must have its snapshot (with ``goals``).
    sync_goal: float = SYNC_GOAL
    #: Restart the control service after the changes (``RESTART_CREATED``).
    restart: bool = False


CASES = (
    Case("500 agents, 1,000 datasets, SQLite", 500, 1_000),
    Case("1,000 agents, 10,000 datasets, SQLite", 1_000, 10_000, goals=True, restart=True),
    Case("500 agents, 1,000 datasets, 2 replicas on etcd", 500, 1_000, replicas=2,
         goals=True),
    Case("100 agents, 100,000 datasets, SQLite", 100, 100_000, goals=True, sync_goal=60.0),
)


def run_simulator(workdir: Path, case: Case, control: Optional[str] = None,
                  certificates: Optional[Path] = None) -> dict:
    """One run of bench/simulator.py for ``case`` in a child process (blocking); its JSON."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(SIMULATOR), "--agents", str(case.agents),
               "--datasets", str(case.datasets), "--changes", str(CHANGES),
               "--sync-timeout", str(SYNC_TIMEOUT), "--workdir", str(workdir)]
    if control is not None:
        command += ["--control", control, "--certificates", str(certificates)]
    if case.restart:
        command += ["--restart", str(RESTART_CREATED)]
    done = subprocess.run(command, capture_output=True, timeout=RUN_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"bench/simulator.py failed ({done.returncode}): "
                           + done.stderr.decode("utf-8", "replace")[-3000:])
    return json.loads(done.stdout)


def _run_on_etcd(workdir: Path, case: Case) -> dict:
    """``run_simulator`` against ``case.replicas`` control replicas on a new three-member
    etcd cluster whose data is on ``workdir``'s disk (blocking)."""
    import tests.harness.etcd as etcd_harness
    from tests.harness.control import ControlProcess
    # Issue 9 measures etcd with its data on disk, as in production, not on tmpfs.
    etcd_harness.TMPFS = str(workdir)
    certificates = make_certificates(workdir).path
    etcd = etcd_harness.EtcdCluster(3, workdir / "logs").start()
    replicas = [ControlProcess(workdir / f"data{n}", certificates, host="127.0.0.1",
                               log_directory=workdir / "logs", extra_arguments=[
                                   "--store", "etcd", "--etcd-endpoints",
                                   etcd.endpoints[n % len(etcd.endpoints)],
                                   "--etcd-prefix", f"/fleet-{workdir.name}/"])
                for n in range(case.replicas)]
    try:
        for replica in replicas:
            replica.start()
        control = ",".join(f"{r.host}:{r.port}:{r.agent_port}" for r in replicas)
        result = run_simulator(workdir / "sim", case, control, certificates)
        result["replica_memory"] = [_memory_of(r.pid) for r in replicas]
        return result
    finally:
        for replica in replicas:
            replica.close()
        etcd.close()


def _memory_of(pid: Optional[int]) -> Optional[dict]:
    from simulator import control_memory
    try:
        return control_memory(pid) if pid else None
    except OSError:
        return None


def _value(run: dict, *path, default=None):
    for key in path:
        if not isinstance(run, dict) or run.get(key) is None:
            return default
        run = run[key]
    return run


def _row(case: Case, runs: list[dict]) -> tuple[str, list[Target]]:
    synced = Repeats(_value(r, "sync", "synced_agents", default=0) for r in runs)
    all_synced = [r for r in runs if _value(r, "sync", "all_synced")]
    sync = Repeats(_value(r, "sync", "all_seconds", default=float("inf")) for r in runs)
    changed = [r for r in runs if _value(r, "change", "per_agent")]
    p50 = p99 = worst = None
    if changed:
        p50 = Repeats(r["change"]["per_agent"]["p50_ms"] / 1000 for r in changed)
        p99 = Repeats(r["change"]["per_agent"]["p99_ms"] / 1000 for r in changed)
        worst = Repeats(r["change"]["per_agent"]["max_ms"] / 1000 for r in changed)
    rss = Repeats(max(_value(r, "sync", "control", "peak_rss_mib", default=0),
                      _value(r, "change", "control", "peak_rss_mib", default=0),
                      *[m["peak_rss_mib"] for m in r.get("replica_memory") or () if m])
                  for r in runs)
    bytes_per_change = [r["change"]["bytes_received_per_change"] for r in changed]
    cpu = [r["change"]["control"]["cpu_seconds_per_change"] for r in changed
           if _value(r, "change", "control")]
    simulator_cpu = Repeats(r["simulator_cpu_seconds"] for r in runs)
    reconnects = Repeats(_value(r, "sync", "reconnects", default=0) for r in runs)

    def seconds(v: float) -> str:
        return f"not in {SYNC_TIMEOUT:.0f} s" if v == float("inf") else f"{v:.1f} s"

    def ms(r: Optional[Repeats]) -> str:
        return "n/a" if r is None else r.describe(format_ms)
    row = (f"| {case.name} | {synced.describe(lambda v: f'{v:.0f}')} of {case.agents} "
           f"({len(all_synced)} of {len(runs)} runs all) | {sync.describe(seconds)} | "
           f"{reconnects.describe(lambda v: f'{v:.0f}')} | "
           f"{ms(p50)} | {ms(p99)} | {ms(worst)} | "
           f"{rss.describe(lambda v: f'{v:.0f} MiB')} | "
           f"{Repeats(cpu).describe(lambda v: f'{v * 1000:.0f} ms') if cpu else 'n/a'} | "
           f"{Repeats(bytes_per_change).describe(lambda v: f'{v / 1024:.0f} KiB') if bytes_per_change else 'n/a'} | "
           f"{simulator_cpu.describe(lambda v: f'{v:.0f} s')} |")
    targets = []
    if case.goals:
        if case.replicas == 0:
            goal = case.sync_goal
            targets.append(sync.target(f"{case.name}: every agent has its first snapshot",
                                       f"under {goal:.0f} s", lambda v: v < goal, seconds))
            what = f"{case.name}: control service peak RSS"
            if all_synced:
                targets.append(rss.target(what, "under 1 GiB", lambda v: v < RSS_GOAL_MIB,
                                          lambda v: f"{v:.0f} MiB"))
            else:
                # Memory of a service that never served every agent proves nothing.
                targets.append(Target(
                    what=what, goal="under 1 GiB", met=False,
                    measured=f"{rss.describe(lambda v: f'{v:.0f} MiB')}, with only "
                             f"{synced.describe(lambda v: f'{v:.0f}')} of {case.agents} "
                             f"agents served"))
        if p99 is None:
            targets.append(Target(what=f"{case.name}: change reaches every agent, p99",
                                  goal="under 1 s", measured="not measured: the agents "
                                  "never all had their snapshot", met=False))
        else:
            targets.append(p99.target(f"{case.name}: change reaches every agent, p99",
                                      "under 1 s", lambda v: v < CHANGE_P99_GOAL, format_ms))
    if case.restart:
        targets.extend(_restart_targets(case, runs))
    return row, targets


def _restart_targets(case: Case, runs: list[dict]) -> list[Target]:
    """Issue 12's restart budget: every agent resumed, with bytes per agent a small
    fraction of its first sync (diffs, not snapshots)."""
    restarts = [r["restart"] for r in runs if r.get("restart")]
    if not restarts:
        return [Target(what=f"{case.name}: after a restart, every agent resumed",
                       goal=f"under {case.sync_goal:.0f} s", met=False,
                       measured="not measured: the agents never all had their snapshot")]
    took = Repeats(r["all_seconds"] if r["all_resumed"] else float("inf") for r in restarts)
    share = Repeats(r["bytes_received_per_agent"]
                    / max(1, _value(run, "sync", "bytes_received_per_agent", default=1))
                    for r, run in zip(restarts, runs))
    snapshots = Repeats(r["snapshots"] for r in restarts)
    return [
        took.target(f"{case.name}: after a restart ({RESTART_CREATED} datasets created "
                    f"while down), every agent has them", f"under {case.sync_goal:.0f} s",
                    lambda v: v < case.sync_goal,
                    lambda v: "not all" if v == float("inf") else f"{v:.1f} s"),
        share.target(f"{case.name}: bytes per agent after a restart, as a share of its "
                     f"first sync (snapshots sent: "
                     f"{snapshots.describe(lambda v: f'{v:.0f}')})", "under 10 %",
                     lambda v: v < 0.1, lambda v: f"{v * 100:.1f} %"),
    ]


def render(results: dict) -> Section:
    """The report section of ``results`` (case name: its runs, or an error)."""
    rows, targets = [], []
    for case in CASES:
        runs = results.get(case.name)
        if runs is None:
            continue
        if isinstance(runs, dict):
            rows.append(f"| {case.name} | failed: {runs['error'][-200:]!r} |" + " |" * 9)
            continue
        row, case_targets = _row(case, runs)
        rows.append(row)
        targets.extend(case_targets)
    markdown = "\n".join([
        "## Agent channel at scale: simulated agents",
        "",
        "`bench/simulator.py` plays every agent in one process: each is the real agent's "
        "`AgentChannel` and codec over its own mutual-TLS connection with its own node "
        "certificate, reporting the datasets it is primary of as mounted. All agents "
        "connect at once to a freshly started control service whose store already holds "
        "the datasets (as after a restart); then "
        f"{CHANGES} datasets are created through the REST API one after another, each "
        "once the agents agree on the view. *Snapshots* is how many agents had their first "
        f"snapshot within {SYNC_TIMEOUT:.0f} s, *all by* when the last one did, "
        "*reconnects* how many times agents connected again meanwhile (the real agent "
        "gives up on a control service silent for 10 s, and retries with backoff); change "
        "latency is per agent, from the POST to the agent's view holding the dataset, over "
        "all agents and changes; control CPU is per change; bytes are what all agents "
        "received on the wire per change (TLS included, with the diff of the new holders "
        "that follows the primary's report). The simulator shares decoding and views "
        "between agents that received the same bytes; its own CPU time is shown so that a "
        f"run it limited shows. Each cell: the median of {REPEATS} runs (smallest–largest). "
        f"In the restart case the control service is then stopped (SIGTERM), "
        f"{RESTART_CREATED} datasets are created in its store, and it is started again; "
        "the targets below show how long until every agent had them, and what each agent "
        "received meanwhile as a share of its first sync.",
        "",
        "| case | snapshots | all by | reconnects | change p50 | change p99 | change max | "
        "control peak RSS | control CPU per change | bytes per change | simulator CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])
    return Section(name="agent_fleet", markdown=markdown, results=results,
                   targets=tuple(targets))


async def benchmark(reactor, context: Context) -> Section:
    """Every case of ``CASES``, ``REPEATS`` times each, as a report section."""
    results = {}
    for number, case in enumerate(CASES):
        def one(i: int, case=case, number=number):
            workdir = context.workdir / f"case{number}-run{i}"
            if case.replicas:
                return deferToThread(_run_on_etcd, workdir, case)
            return deferToThread(run_simulator, workdir, case)
        try:
            results[case.name] = await repeat(one, REPEATS, context.log, case.name)
        except Exception as e:
            context.log(f"{case.name}: failed: {e}")
            results[case.name] = {"error": str(e)[-2000:]}
    return render(results)


__all__ = ["CASES", "benchmark", "render", "run_simulator"]
