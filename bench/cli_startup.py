"""
How long ``pyflock --help`` takes: a person types it first, and scripts call the CLI
often. It is answered by the standard library alone (the CLI imports a command's needs only
when it runs). Each case is the wall time of one whole process, interpreter start
included, side by side with ``python -c pass`` (the floor) and ``pyflock --version``; the
three alternate, run after run, so that all see the same machine load. Every case runs
``RUNS`` times per repeat, and the repeat's median is its number; the table gives the
median of the repeats with the smallest and largest.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet.threads import deferToThread

from _harness import Context, Repeats, Section, format_ms, repeat_blocking

#: Runs of each command per repeat.
RUNS = 20

#: The goal for ``pyflock --help`` (issue 7).
HELP_GOAL = 0.150


def _commands() -> dict[str, list[str]]:
    """The commands timed, by name: the CLI from this interpreter's environment."""
    cli = str(Path(sys.executable).with_name("pyflock"))
    return {"python -c pass": [sys.executable, "-c", "pass"],
            "pyflock --help": [cli, "--help"],
            "pyflock --version": [cli, "--version"]}


def _timed(argv: list[str]) -> float:
    """Seconds one run of ``argv`` takes (it must succeed)."""
    began = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    return time.perf_counter() - began


def _one_repeat(_: int) -> dict[str, float]:
    """One repeat: every command ``RUNS`` times, alternating; each one's median."""
    commands = _commands()
    for argv in commands.values():
        _timed(argv)  # warm the page cache, as a person's second call would be
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(RUNS):
        for name, argv in commands.items():
            times[name].append(_timed(argv))
    return {name: statistics.median(values) for name, values in times.items()}


async def benchmark(reactor, context: Context) -> Section:
    """Time the CLI's start; the section of docs/benchmarks.md."""
    runs = await deferToThread(repeat_blocking, _one_repeat)
    summary = {name: Repeats.of(runs, name) for name in runs[0]}
    rows = "\n".join(f"| `{name}` | {summary[name].describe(format_ms)} |"
                     for name in summary)
    markdown = f"""## Command line: `pyflock --help`

The wall time of one whole `pyflock` process, interpreter start included, from this
environment's console script; {RUNS} runs of each command per repeat, the three commands
alternating so that all see the same load, and the median of each repeat. `python -c pass`
is the floor no Python command can beat. `--help` loads only the standard library;
`--version` also reads the installed package's metadata.

| command | median (min–max) of the repeats |
|---|---:|
{rows}
"""
    target = summary["pyflock --help"].target(
        "`pyflock --help`, median of 20 runs", "< 150 ms", lambda s: s < HELP_GOAL,
        format_ms)
    return Section(name="cli_startup", markdown=markdown,
                   results={name: r.to_json() for name, r in summary.items()},
                   targets=(target,))
