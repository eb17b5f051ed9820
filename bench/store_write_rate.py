"""
Durable writes per second of the SQLite configuration store.

Preloads a store with 10,000 datasets, then for a few seconds per case writes one dataset
per ``StoreWrite``: with one writer waiting for each write, and with 16 writers (16 writes
in flight at a time). Each case runs ``--repeats`` times (at least 3); the table gives the
median of the runs with the smallest and largest. Prints a table and, with ``--json OUT``,
writes the numbers of every run with the machine they were measured on.

    python bench/store_write_rate.py --json /tmp/store_write_rate.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sqlite3
import tempfile
import time

from twisted.internet import defer, task

from _harness import REPEATS, Repeats, repeat
from pyflock.common._model import Dataset
from pyflock.control._sqlite_store import open_sqlite_store
from pyflock.control._store import StoreWrite

NODE = "5c1d4a3e-0000-4000-8000-00000000000a"


def _dataset(n: int) -> Dataset:
    return Dataset(dataset_id=f"{n:08d}-0000-4000-8000-000000000000", primary=NODE,
                   maximum_size=1024 ** 3, metadata={"name": f"volume-{n}"})


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _filesystem(path: str) -> str:
    """The type of the filesystem holding ``path`` (fsync cost depends on it)."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                mount = fields[1]
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) \
                        and len(mount) > len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


async def _case(store, writers: int, seconds: float, first_id: int) -> dict:
    """Run ``writers`` closed-loop writers for ``seconds``; their rate and latencies."""
    latencies: list[float] = []
    next_id = first_id
    transactions = store.transactions
    start = time.perf_counter()
    deadline = start + seconds

    async def writer() -> None:
        nonlocal next_id
        while time.perf_counter() < deadline:
            n, next_id = next_id, next_id + 1
            dataset = _dataset(n)
            began = time.perf_counter()
            await store.write(StoreWrite(datasets=((dataset.dataset_id, dataset),),
                                         generation=n))
            latencies.append(time.perf_counter() - began)

    await defer.gatherResults([defer.Deferred.fromCoroutine(writer())
                               for _ in range(writers)])
    elapsed = time.perf_counter() - start
    transactions = store.transactions - transactions
    return {
        "writers": writers,
        "writes": len(latencies),
        "seconds": round(elapsed, 3),
        "ops_per_second": round(len(latencies) / elapsed, 1),
        "p50_latency_ms": round(_percentile(latencies, 0.50) * 1000, 3),
        "p99_latency_ms": round(_percentile(latencies, 0.99) * 1000, 3),
        "transactions": transactions,
        "writes_per_transaction": round(len(latencies) / max(1, transactions), 2),
    }


#: The cases: this many closed-loop writers.
WRITERS = (1, 16)

#: The numbers of a case that are summarized over its runs (median, min, max).
SUMMARIZED = ("writes", "ops_per_second", "p50_latency_ms", "p99_latency_ms",
              "writes_per_transaction")


def summarize(writers: int, runs: list[dict]) -> dict:
    """A case over its runs: each number's median, min, max and repeats, and every run."""
    return {"writers": writers,
            **{key: Repeats.of(runs, key).to_json() for key in SUMMARIZED},
            "runs": runs}


async def run(reactor, options) -> dict:
    """Preload a store in a fresh folder and measure each case; the results."""
    folder = tempfile.mkdtemp(prefix="pyflock-bench-", dir=options.data_dir)
    try:
        store = await open_sqlite_store(reactor, os.path.join(folder, "control"))
        try:
            preload = [_dataset(n) for n in range(options.preload)]
            await store.write(StoreWrite(datasets=tuple((d.dataset_id, d) for d in preload),
                                         generation=options.preload))
            cases = []
            next_id = options.preload
            for writers in WRITERS:
                async def one_run(i: int) -> dict:
                    nonlocal next_id
                    result = await _case(store, writers, options.seconds, next_id)
                    next_id += result["writes"]
                    return result
                runs = await repeat(one_run, options.repeats)
                cases.append(summarize(writers, runs))
        finally:
            await store.close()
    finally:
        shutil.rmtree(folder)
    return {
        "benchmark": "store_write_rate",
        "description": "durable single-dataset StoreWrites per second, SQLite store "
                       "(WAL, synchronous=FULL, group commit)",
        "preloaded_datasets": options.preload,
        "repeats": options.repeats,
        "cases": cases,
        "machine": {
            "nproc": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "filesystem": _filesystem(os.path.realpath(options.data_dir)),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _table(results: dict) -> str:
    lines = [f"median (min-max) of {results['repeats']} runs per case",
             f"{'writers':>7} {'ops/s':>20} {'p50 ms':>20} {'p99 ms':>20} {'writes/txn':>10}"]

    def cell(summary: dict) -> str:
        return f"{summary['median']:g} ({summary['min']:g}-{summary['max']:g})"

    for case in results["cases"]:
        lines.append(f"{case['writers']:>7} {cell(case['ops_per_second']):>20} "
                     f"{cell(case['p50_latency_ms']):>20} {cell(case['p99_latency_ms']):>20} "
                     f"{case['writes_per_transaction']['median']:>10}")
    machine = results["machine"]
    lines.append(f"{machine['nproc']} x {machine['cpu_model']}, {machine['filesystem']}, "
                 f"{results['preloaded_datasets']} datasets preloaded, {results['date']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    """Parse the options, run the benchmark, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--json", metavar="OUT", help="also write the results here as JSON")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="how long each case runs (default 3)")
    parser.add_argument("--repeats", type=int, default=REPEATS,
                        help=f"runs of each case, at least {REPEATS} (default {REPEATS})")
    parser.add_argument("--preload", type=int, default=10_000,
                        help="datasets in the store before measuring (default 10000)")
    parser.add_argument("--data-dir", default="/var/tmp",
                        help="where the scratch store goes; a disk, not tmpfs, so that "
                             "fsync costs what it does in production (default /var/tmp)")
    options = parser.parse_args(argv)
    if not os.path.isdir(options.data_dir):
        parser.error(f"--data-dir {options.data_dir} is not a folder")
    if options.seconds <= 0 or options.preload < 0:
        parser.error("--seconds must be positive and --preload not negative")
    if options.repeats < REPEATS:
        parser.error(f"--repeats must be at least {REPEATS}")

    async def measure(reactor) -> None:
        results = await run(reactor, options)
        print(_table(results))
        if options.json:
            with open(options.json, "w") as f:
                json.dump(results, f, indent=2)
                f.write("\n")

    # task.react stops the reactor and exits the process once measure() is done.
    task.react(lambda reactor: defer.Deferred.fromCoroutine(measure(reactor)))


if __name__ == "__main__":
    main()
