"""
Run pyflock's benchmarks and write the report: ``python bench/run.py --output
docs/benchmarks.md`` (what ``make bench`` runs).

Each name in ``BENCHMARKS`` is a module in ``bench/`` with
``async def benchmark(reactor, context: _harness.Context) -> _harness.Section``, or one
that ``ADAPTERS`` turns into a section (a module with an interface of its own, such as
store_write_rate.py, which also runs alone). They run one after another, each in its own
scratch folder; their sections go into the markdown report in this order, their JSON into
``bench/results/latest.json``. To add a benchmark, write such a module and append its name
to ``BENCHMARKS``. Every timed case runs at least ``_harness.REPEATS`` (3) times: run it
with ``_harness.repeat`` (``repeat_blocking`` in a thread), summarize each number with
``_harness.Repeats`` (median, min, max; ``Repeats.target`` judges a goal on the median),
and put every run in the section's ``results``. A benchmark that fails is reported as failed (and the run exits 1)
without stopping the others.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

BENCH = Path(__file__).resolve().parent
# bench/ for its own modules, the repository root for the tests' harnesses (tests.harness).
for folder in (BENCH, BENCH.parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from _harness import (  # noqa: E402
    REPEATS, Context, Repeats, Section, describe_machine, format_ms, load_average,
)

#: The benchmark modules, in the order they run and appear in the report.
BENCHMARKS = ("cli_startup", "control_api", "control_lists", "store_write_rate",
              "agent_convergence", "agent_renewals", "docker_run", "etcd_replicas",
              "etcd_failover", "agent_fleet", "peer_move")

#: Seconds each case of store_write_rate.py runs here (it runs 2 cases).
STORE_CASE_SECONDS = 3.0


async def _store_write_rate(reactor, context: Context) -> Section:
    """bench/store_write_rate.py's measurement of the store alone, as a report section."""
    import store_write_rate
    options = argparse.Namespace(data_dir=str(context.workdir), preload=10_000,
                                 seconds=STORE_CASE_SECONDS, repeats=REPEATS)
    results = await store_write_rate.run(reactor, options)

    def ms(summary: dict) -> str:
        return Repeats(summary["repeats"]).describe(lambda v: format_ms(v / 1000))

    rows = [f"| {c['writers']} | "
            f"{Repeats(c['ops_per_second']['repeats']).describe(lambda v: f'{v:.0f}')} | "
            f"{ms(c['p50_latency_ms'])} | {ms(c['p99_latency_ms'])} | "
            f"{c['writes_per_transaction']['median']} |"
            for c in results["cases"]]
    for case in results["cases"]:
        context.log(f"store, {case['writers']} writers: "
                    f"{case['ops_per_second']['median']:.0f} writes/s (median)")
    markdown = "\n".join([
        "## Configuration store: durable write rate",
        "",
        "The SQLite store alone (`bench/store_write_rate.py`), in this process, no HTTP: "
        f"a store holding {results['preloaded_datasets']:,} datasets takes one-dataset "
        "`StoreWrite`s from closed-loop writers, each waiting until its write is durable "
        "(WAL, `synchronous=FULL`) before the next; concurrent writes share a transaction "
        f"(group commit). SQLite {results['machine']['sqlite']}, each case "
        f"{STORE_CASE_SECONDS:.0f} s, run {REPEATS} times: each cell is the median of the "
        "runs (smallest–largest). This bounds the REST API's durable "
        "create/move rate from above: the difference is the cost of HTTP, TLS and the "
        "service's Python code.",
        "",
        "| writers | writes/s | p50 | p99 | writes per transaction (median) |",
        "|---:|---:|---:|---:|---:|",
        *rows,
    ])
    return Section(name="store_write_rate", markdown=markdown, results=results)


#: Benchmarks whose module has an interface of its own, and what runs them here.
ADAPTERS = {"store_write_rate": _store_write_rate}

DEFAULT_JSON = BENCH / "results" / "latest.json"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description="Run pyflock's benchmarks and write the report.")
    parser.add_argument("--output", required=True,
                        help="the markdown report to write (make bench: docs/benchmarks.md)")
    parser.add_argument("--json", default=str(DEFAULT_JSON),
                        help=f"the JSON results to write (default {DEFAULT_JSON})")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                        help="run only this benchmark (repeatable); the report then holds "
                             f"only these. Known: {', '.join(BENCHMARKS)}")
    parser.add_argument("--scratch", default=None,
                        help="folder for the benchmarks' stores and certificates (default: "
                             "a new temporary folder, removed afterwards). Its filesystem "
                             "decides what a durable write costs.")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="also write py-spy flame graphs of the services under test "
                             "into DIR (needs py-spy; the numbers then include its cost)")
    return parser


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _failed_section(name: str, error: str) -> Section:
    return Section(name=name, results={"error": error},
                   markdown=f"## {name}\n\nThis benchmark failed in this run:\n\n"
                            f"```\n{error}\n```\n")


async def _run_one(reactor, name: str, workdir: Path,
                   profile_dir: Optional[Path]) -> tuple[Section, bool]:
    """Run benchmark module ``name``; (its section, whether it succeeded)."""
    try:
        benchmark = ADAPTERS.get(name)
        if benchmark is None:
            benchmark = getattr(importlib.import_module(name), "benchmark", None)
        if benchmark is None:
            raise TypeError(f"bench/{name}.py has no benchmark(reactor, context) function")
        section = await benchmark(reactor, Context(workdir=workdir, log=_log,
                                                   profile_dir=profile_dir))
        if not isinstance(section, Section):
            raise TypeError(f"bench/{name}.py's benchmark() returned {section!r}, "
                            f"not a _harness.Section")
        return section, True
    except Exception:
        _log(f"{name} failed:\n{traceback.format_exc()}")
        return _failed_section(name, traceback.format_exc(limit=3).strip()), False


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def render(date: datetime, machine: dict, sections: list[Section],
           durations: dict[str, float]) -> str:
    """The markdown report: intro, machine, targets, then each benchmark's section."""
    load_start = ", ".join(f"{x:.2f}" for x in machine["load_average_at_start"])
    load_end = ", ".join(f"{x:.2f}" for x in machine["load_average_at_end"])
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `make bench` (bench/run.py); edit bench/, not this file. -->",
        "",
        "How fast pyflock is, measured on one machine with real processes: the control "
        "service's REST API over mutual TLS and its SQLite store's durable write rate; "
        "agents converging datasets on real loop devices (create and move, end to end); "
        "and `docker run` with a pyflock volume against Docker's own local driver, on "
        "real dockerd. `make bench` runs every "
        "benchmark in `bench/` and rewrites this page and `bench/results/latest.json`. "
        f"Every timed case runs at least {REPEATS} times: tables and targets give the "
        "median of the runs with the smallest and the largest (median (min–max)), a target is met or not "
        "by the median, and `bench/results/latest.json` keeps every run. The numbers "
        "come from the machine below, which other work may have shared: the load "
        "average at the start and end of the run is recorded to show that.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| date | {date.strftime('%Y-%m-%d %H:%M UTC')} |",
        f"| CPUs (nproc) | {machine['nproc']} |",
        f"| CPU model | {_cell(machine['cpu_model'])} |",
        f"| memory | {machine['memory_gib']} GiB |",
        f"| kernel | {_cell(machine['kernel'])} |",
        f"| Python, Twisted, OpenSSL | {machine['python']}, {machine['twisted']}, "
        f"{_cell(machine['openssl'])} |",
        f"| scratch filesystem | {_cell(machine['scratch_filesystem'])} |",
        f"| load average (1, 5, 15 min) at start | {load_start} |",
        f"| load average (1, 5, 15 min) at end | {load_end} |",
        f"| duration | {sum(durations.values()):.0f} s |",
        "",
        "## Targets",
        "",
    ]
    targets = [(s.name, t) for s in sections for t in s.targets]
    if targets:
        lines += ["| benchmark | what | goal | measured: median (min–max) | met (median) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {_cell(t.what)} | {_cell(t.goal)} | {_cell(t.measured)} | "
                  f"{'yes' if t.met else '**no**'} |" for name, t in targets]
    else:
        lines.append("No benchmark in this run set a target.")
    lines.append("")
    for section in sections:
        lines += [section.markdown.strip(), ""]
    return "\n".join(lines)


async def main(reactor, options: argparse.Namespace) -> None:
    """Run the selected benchmarks and write the markdown report and the JSON results."""
    names = tuple(n for n in BENCHMARKS if not options.only or n in options.only)
    owned = options.scratch is None
    scratch = Path(tempfile.mkdtemp(prefix="pyflock-bench-") if owned else options.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    date = datetime.now(timezone.utc)
    machine = describe_machine(scratch)
    _log(f"machine: {machine}")
    sections: list[Section] = []
    durations: dict[str, float] = {}
    failures = []
    try:
        for name in names:
            workdir = scratch / name
            if workdir.exists():
                shutil.rmtree(workdir)
            workdir.mkdir()
            _log(f"== {name}")
            began = time.perf_counter()
            section, ok = await _run_one(
                reactor, name, workdir,
                None if options.profile is None else Path(options.profile).resolve())
            durations[name] = time.perf_counter() - began
            _log(f"== {name}: {'done' if ok else 'FAILED'} in {durations[name]:.1f} s")
            sections.append(section)
            if not ok:
                failures.append(name)
    finally:
        if owned:
            shutil.rmtree(scratch, ignore_errors=True)
    machine["load_average_at_end"] = [round(x, 2) for x in load_average()]

    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(date, machine, sections, durations))
    results = {
        "date": date.isoformat(timespec="seconds"), "machine": machine,
        "durations_seconds": {k: round(v, 1) for k, v in durations.items()},
        "benchmarks": {s.name: s.results for s in sections},
        "targets": {s.name: [t.to_json() for t in s.targets] for s in sections},
    }
    json_path = Path(options.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    _log(f"wrote {output} and {json_path}")
    for section in sections:
        for target in section.targets:
            _log(f"target {'met' if target.met else 'MISSED'}: {section.name}: "
                 f"{target.what}: {target.measured} (goal {target.goal})")
    if failures:
        raise SystemExit(f"bench/run.py: failed: {', '.join(failures)}")


if __name__ == "__main__":
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react
    arguments = _parser().parse_args()
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, arguments)))
