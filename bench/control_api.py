"""
Benchmark of the control service's REST API: requests per second and p50/p99 latency of
listing, creating and moving datasets, with 1 and 16 concurrent clients, against a real
``pyflock-control`` process holding 10,000 datasets.

The service runs as a subprocess; the clients run in this process (treq over mutual TLS,
one keep-alive connection per client), so the service's CPU is its own. The 10,000
datasets are written straight into a fresh SQLite store with the store API before the
service starts: one transaction, a fraction of a second, and the service then loads them
exactly as it would after a restart.

Run alone: ``python bench/run.py --only control_api --output /tmp/bench.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional
from uuid import uuid4

import attr
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.client import HTTPConnectionPool

from _harness import (
    BENCH_USER, Context, ControlService, Profiler, Section, Target, format_ms, load_average,
    machine_cpu_seconds, make_certificates, own_cpu_seconds, percentile, start_control_service,
)
from pyflock.common._model import Dataset
from pyflock.common._tls import treq_client
from pyflock.control._sqlite_store import open_sqlite_store
from pyflock.control._store import StoreWrite

#: Datasets in the store before the first request.
DATASETS = 10_000

#: The concurrency levels measured.
CLIENTS = (1, 16)

#: Each case runs for this many seconds, or until ``MAX_REQUESTS`` requests, if sooner.
CASE_SECONDS = 5.0
MAX_REQUESTS = 20_000

#: The goals the issue sets for this 2-core machine.
LIST_P50_GOAL = 0.100
WRITES_PER_SECOND_GOAL = 500.0

_JSON = {b"content-type": [b"application/json"]}
_SIZE = 1024 * 1024 * 1024


@attr.s(frozen=True, auto_attribs=True)
class CaseResult:
    """The measurements of one (operation, clients) case."""

    operation: str
    clients: int
    requests: int
    errors: int
    seconds: float
    latencies: tuple[float, ...]
    server_cpu_seconds: float
    client_cpu_seconds: float
    other_cpu_seconds: float
    load_before: tuple[float, ...]
    load_after: tuple[float, ...]
    first_error: str

    @property
    def requests_per_second(self) -> float:
        """Completed requests per second of wall time."""
        return self.requests / self.seconds

    def to_json(self) -> dict:
        """The case as JSON: rates, latency percentiles in ms, CPU used, load."""
        ok = self.latencies
        return {
            "operation": self.operation, "clients": self.clients,
            "requests": self.requests, "errors": self.errors, "seconds": round(self.seconds, 3),
            "requests_per_second": round(self.requests_per_second, 1),
            "p50_ms": round(percentile(ok, 50) * 1000, 2) if ok else None,
            "p90_ms": round(percentile(ok, 90) * 1000, 2) if ok else None,
            "p99_ms": round(percentile(ok, 99) * 1000, 2) if ok else None,
            "max_ms": round(max(ok) * 1000, 2) if ok else None,
            "server_cpu_seconds": round(self.server_cpu_seconds, 3),
            "server_cpu_ms_per_request": round(
                self.server_cpu_seconds / max(1, self.requests) * 1000, 3),
            "client_cpu_seconds": round(self.client_cpu_seconds, 3),
            "other_processes_cpu_seconds": round(self.other_cpu_seconds, 3),
            "load_before": list(self.load_before), "load_after": list(self.load_after),
            "first_error": self.first_error or None,
        }


async def preload(reactor, data_path, primary: str, count: int = DATASETS) -> list[str]:
    """
    Write ``count`` named 1 GiB datasets on ``primary`` into a new store in ``data_path``
    in one transaction; returns their ids.
    """
    ids = [str(uuid4()) for _ in range(count)]
    rows = tuple(
        (dataset_id, Dataset(dataset_id=dataset_id, primary=primary, maximum_size=_SIZE,
                             metadata={"name": f"preloaded-{i:05d}"}))
        for i, dataset_id in enumerate(ids))
    store = await open_sqlite_store(reactor, data_path)
    try:
        await store.write(StoreWrite(datasets=rows, generation=count))
    finally:
        await store.close()
    return ids


class _Operations:
    """The requests each case makes: list, create (named, unique) and move (A <-> B)."""

    def __init__(self, base_url: str, node_a: str, node_b: str, dataset_ids: list[str]):
        self._datasets_url = f"{base_url}/v1/configuration/datasets"
        self._nodes = (node_a, node_b)
        self._ids = dataset_ids
        self._primary = {dataset_id: node_a for dataset_id in dataset_ids}
        self._created = 0
        self._next_move = 0

    def list(self, http):
        """GET every dataset."""
        return http.get(self._datasets_url), 200

    def create(self, http):
        """POST a new named dataset."""
        self._created += 1
        body = {"primary": self._nodes[self._created % 2], "maximum_size": _SIZE,
                "metadata": {"name": f"bench-{self._created:06d}"}}
        return http.post(self._datasets_url, data=json.dumps(body).encode(),
                         headers=_JSON), 201

    def move(self, http):
        """Move the next preloaded dataset to the node it is not on."""
        # Cycling through all of them keeps concurrent clients on different datasets.
        dataset_id = self._ids[self._next_move % len(self._ids)]
        self._next_move += 1
        target = self._nodes[1] if self._primary[dataset_id] == self._nodes[0] \
            else self._nodes[0]
        self._primary[dataset_id] = target
        return http.post(f"{self._datasets_url}/{dataset_id}",
                         data=json.dumps({"primary": target}).encode(), headers=_JSON), 200


async def _one(http, operation: Callable) -> tuple[bool, str, bytes]:
    """Make one request and read its whole body; (as expected?, error text, body)."""
    d, expected = operation(http)
    response = await d
    body = await response.content()
    if response.code != expected:
        return False, f"{response.code}: {body[:300].decode('utf-8', 'replace')}", body
    return True, "", body


async def run_case(reactor, service: ControlService, clients: list, name: str,
                   operation: Callable, seconds: float = CASE_SECONDS,
                   max_requests: int = MAX_REQUESTS,
                   profile: Optional[Path] = None) -> CaseResult:
    """
    Run ``operation`` from every client in ``clients`` at once, each waiting for its answer
    before its next request, for ``seconds`` or ``max_requests`` requests in all; with
    ``profile``, write a flame graph of the service there.
    """
    profiler = None if profile is None else Profiler(service.pid, seconds, profile)
    latencies: list[float] = []
    errors = 0
    first_error = ""
    load_before = tuple(round(x, 2) for x in load_average())
    server_before, client_before = service.cpu_seconds(), own_cpu_seconds()
    machine_before = machine_cpu_seconds()
    began = time.perf_counter()
    deadline = began + seconds
    issued = 0

    async def one_client(http):
        nonlocal errors, first_error, issued
        while issued < max_requests and time.perf_counter() < deadline:
            issued += 1
            start = time.perf_counter()
            try:
                ok, error, _ = await _one(http, operation)
            except Exception as e:
                ok, error = False, repr(e)
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1
                first_error = first_error or error

    await gatherResults([ensure(one_client(http)) for http in clients])
    elapsed = time.perf_counter() - began
    server = service.cpu_seconds() - server_before
    client = own_cpu_seconds() - client_before
    others = max(0.0, machine_cpu_seconds() - machine_before - server - client)
    if profiler is not None:
        profiler.wait()
    return CaseResult(
        operation=name, clients=len(clients), requests=len(latencies) + errors,
        errors=errors, seconds=elapsed, latencies=tuple(latencies),
        server_cpu_seconds=server, client_cpu_seconds=client, other_cpu_seconds=others,
        load_before=load_before, load_after=tuple(round(x, 2) for x in load_average()),
        first_error=first_error)


def ensure(coroutine) -> Deferred:
    """A Deferred running ``coroutine``."""
    return Deferred.fromCoroutine(coroutine)


def _table(cases: list[CaseResult]) -> str:
    lines = ["| operation | clients | requests | req/s | p50 | p99 | max | "
             "server CPU / request | CPU cores used: server, clients, other processes "
             "| errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for case in cases:
        ok = case.latencies
        lines.append(
            f"| {case.operation} | {case.clients} | {case.requests} | "
            f"{case.requests_per_second:.0f} | "
            f"{format_ms(percentile(ok, 50) if ok else None)} | "
            f"{format_ms(percentile(ok, 99) if ok else None)} | "
            f"{format_ms(max(ok) if ok else None)} | "
            f"{format_ms(case.server_cpu_seconds / max(1, case.requests))} | "
            f"{case.server_cpu_seconds / case.seconds:.2f}, "
            f"{case.client_cpu_seconds / case.seconds:.2f}, "
            f"{case.other_cpu_seconds / case.seconds:.2f} | {case.errors} |")
    return "\n".join(lines)


def _targets(cases: list[CaseResult]) -> tuple[Target, ...]:
    by_key = {(c.operation, c.clients): c for c in cases}
    targets = []
    for clients in CLIENTS:
        case = by_key.get(("list", clients))
        if case is not None and case.latencies:
            p50 = percentile(case.latencies, 50)
            targets.append(Target(
                what=f"list {DATASETS:,} datasets, p50, {clients} client"
                     f"{'s' if clients > 1 else ''}",
                goal=f"< {format_ms(LIST_P50_GOAL)}", measured=format_ms(p50),
                met=p50 < LIST_P50_GOAL and case.errors == 0))
    for operation in ("create", "move"):
        case = by_key.get((operation, max(CLIENTS)))
        if case is not None:
            rate = (case.requests - case.errors) / case.seconds
            targets.append(Target(
                what=f"durable {operation}s per second, {max(CLIENTS)} clients",
                goal=f">= {WRITES_PER_SECOND_GOAL:.0f}/s", measured=f"{rate:.0f}/s",
                met=rate >= WRITES_PER_SECOND_GOAL and case.errors == 0))
    return tuple(targets)


async def benchmark(reactor, context: Context) -> Section:
    """Measure list, create and move over mutual TLS against a real control service."""
    certificates = make_certificates(context.workdir)
    node_a, node_b = certificates.node_uuids
    data_path = context.workdir / "control"
    began = time.perf_counter()
    ids = await preload(reactor, data_path, node_a)
    preload_seconds = time.perf_counter() - began
    context.log(f"preloaded {DATASETS} datasets in {preload_seconds:.2f} s")

    service = await start_control_service(reactor, certificates, data_path)
    context.log(f"pyflock-control (pid {service.pid}) listening on port {service.port} "
                f"after {service.startup_seconds:.2f} s")
    pools = [HTTPConnectionPool(reactor, persistent=True) for _ in range(max(CLIENTS))]
    for pool in pools:
        pool.retryAutomatically = False  # a failed request must count as one
    clients = [treq_client(reactor, certificates.path, BENCH_USER, pool=pool)
               for pool in pools]
    operations = _Operations(service.base_url, node_a, node_b, ids)
    cases: list[CaseResult] = []
    list_bytes = 0
    try:
        # Open every client's connection (the TLS handshake is not what is measured) and
        # check the service serves the preloaded datasets.
        warm = await gatherResults([ensure(_one(http, operations.list)) for http in clients])
        for ok, error, body in warm:
            if not ok:
                raise RuntimeError(f"listing datasets failed: {error}")
        list_bytes = len(warm[0][2])
        listed = len(json.loads(warm[0][2]))
        if listed != DATASETS:
            raise RuntimeError(f"the service lists {listed} datasets, not {DATASETS}")
        for name in ("list", "move", "create"):
            for count in CLIENTS:
                profile = None if context.profile_dir is None else \
                    context.profile_dir / f"control_api-{name}-{count}.svg"
                case = await run_case(reactor, service, clients[:count], name,
                                      getattr(operations, name), profile=profile)
                context.log(f"{name} x{count}: {case.requests_per_second:.0f} req/s, "
                            f"p50 {format_ms(percentile(case.latencies, 50)) if case.latencies else 'n/a'}"
                            f", {case.errors} errors")
                cases.append(case)
    finally:
        await gatherResults([pool.closeCachedConnections() for pool in pools])
        await service.stop()

    targets = _targets(cases)
    results = {
        "datasets": DATASETS, "preload": "SQLite store API, one transaction",
        "preload_seconds": round(preload_seconds, 3),
        "startup_seconds": round(service.startup_seconds, 3),
        "list_response_bytes": list_bytes, "case_seconds": CASE_SECONDS,
        "max_requests_per_case": MAX_REQUESTS,
        "cases": [c.to_json() for c in cases],
        "targets": [t.to_json() for t in targets],
    }
    markdown = f"""## Control service REST API

A real `pyflock-control` process with {DATASETS:,} datasets in its SQLite store, and
clients in a separate process (treq, mutual TLS with a `user-{BENCH_USER}` certificate,
one keep-alive connection per client, each client waiting for its answer before its next
request). The datasets are written into the store with its own API before the service
starts ({preload_seconds:.2f} s, one transaction); the service then loaded them in
{service.startup_seconds:.2f} s from spawn to listening. Each case runs for
{CASE_SECONDS:.0f} s (or {MAX_REQUESTS:,} requests). *list* is `GET
/v1/configuration/datasets` ({list_bytes / 1e6:.1f} MB of JSON); *move* is `POST
/v1/configuration/datasets/<id>` with the other node as `primary`, each request a
different dataset; *create* is `POST /v1/configuration/datasets` of a named 1 GiB dataset.
A create or move is answered only after SQLite committed it with `synchronous=FULL`, so
each one counted is durable. Cases run in the order shown, so creates start with
{DATASETS:,} datasets and add to them. Latency is from sending the request to having read
the whole answer. *Server CPU / request* is the service process's CPU time (all threads)
over the case divided by its requests; *client CPU share* is the benchmark process's CPU
time over the case's wall time (near 100% means the clients, not the service, set the
pace).

{_table(cases)}
"""
    return Section(name="control_api", markdown=markdown, results=results,
                   targets=targets)
