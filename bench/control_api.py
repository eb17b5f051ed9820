"""
Benchmark of the control service's REST API: requests per second and p50/p99 latency of
listing, creating and moving datasets, with 1 and 16 concurrent clients, against a real
``pyflock-control`` process holding 10,000 datasets; and listing while other clients move
datasets, so that every list sees a changed configuration.

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
from typing import Callable, Optional, Sequence
from uuid import uuid4

import attr
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.client import HTTPConnectionPool

from _harness import (
    BENCH_USER, REPEATS, Context, ControlService, Profiler, Repeats, Section, Target,
    format_ms, load_average, machine_cpu_seconds, make_certificates, own_cpu_seconds,
    percentile, repeat, start_control_service,
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


@attr.s(auto_attribs=True)
class Tally:
    """What the clients making one kind of request measured during a case."""

    operation: str
    clients: int
    latencies: list[float] = attr.ib(factory=list)
    errors: int = 0
    first_error: str = ""

    @property
    def requests(self) -> int:
        """Requests answered, as expected or not."""
        return len(self.latencies) + self.errors

    def percentile(self, p: float) -> Optional[float]:
        """The ``p``-th percentile latency of the successful requests (None if none)."""
        return percentile(self.latencies, p) if self.latencies else None

    def to_json(self, seconds: float) -> dict:
        """The tally as JSON: rate and latency percentiles in ms."""
        def ms(value):
            return None if value is None else round(value * 1000, 2)
        return {
            "operation": self.operation, "clients": self.clients,
            "requests": self.requests, "errors": self.errors,
            "requests_per_second": round(len(self.latencies) / seconds, 1),
            "p50_ms": ms(self.percentile(50)), "p90_ms": ms(self.percentile(90)),
            "p99_ms": ms(self.percentile(99)),
            "max_ms": ms(max(self.latencies) if self.latencies else None),
            "first_error": self.first_error or None,
        }


@attr.s(frozen=True, auto_attribs=True)
class CaseResult:
    """
    One case: the measured requests (``main``), any made alongside them
    (``alongside``), the wall time, and the CPU time the service, the clients and the
    rest of the machine used meanwhile.
    """

    main: Tally
    alongside: Optional[Tally]
    seconds: float
    server_cpu_seconds: float
    client_cpu_seconds: float
    other_cpu_seconds: float
    load_before: tuple[float, ...]
    load_after: tuple[float, ...]

    @property
    def requests(self) -> int:
        """All requests answered in the case."""
        return self.main.requests + (self.alongside.requests if self.alongside else 0)

    def rate(self, tally: Tally) -> float:
        """Successful requests per second of ``tally``."""
        return len(tally.latencies) / self.seconds

    def cores(self) -> str:
        """CPU cores used by the service, the clients and everything else, for a table."""
        return (f"{self.server_cpu_seconds / self.seconds:.2f}, "
                f"{self.client_cpu_seconds / self.seconds:.2f}, "
                f"{self.other_cpu_seconds / self.seconds:.2f}")

    def to_json(self) -> dict:
        """The case as JSON: rates, latency percentiles in ms, CPU used, load."""
        result = self.main.to_json(self.seconds)
        result.update({
            "seconds": round(self.seconds, 3),
            "server_cpu_seconds": round(self.server_cpu_seconds, 3),
            "server_cpu_ms_per_request": round(
                self.server_cpu_seconds / max(1, self.requests) * 1000, 3),
            "client_cpu_seconds": round(self.client_cpu_seconds, 3),
            "other_cpu_seconds": round(self.other_cpu_seconds, 3),
            "load_before": list(self.load_before), "load_after": list(self.load_after),
        })
        if self.alongside is not None:
            result["alongside"] = self.alongside.to_json(self.seconds)
        return result


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


class Operations:
    """The requests the cases make: list, create (named, unique) and move (A <-> B)."""

    def __init__(self, base_url: str, node_a: str, node_b: str, dataset_ids: list[str]):
        self._datasets_url = f"{base_url}/v1/configuration/datasets"
        self._nodes = (node_a, node_b)
        self._ids = dataset_ids
        self._primary = {dataset_id: node_a for dataset_id in dataset_ids}
        self._created = 0
        self._next_move = 0

    def list(self, http):
        """GET every dataset; (Deferred response, expected code)."""
        return http.get(self._datasets_url), 200

    def create(self, http):
        """POST a new named dataset; (Deferred response, expected code)."""
        self._created += 1
        body = {"primary": self._nodes[self._created % 2], "maximum_size": _SIZE,
                "metadata": {"name": f"bench-{self._created:06d}"}}
        return http.post(self._datasets_url, data=json.dumps(body).encode(),
                         headers=_JSON), 201

    def move(self, http):
        """Move the next preloaded dataset to the other node; (Deferred, expected code)."""
        # Cycling through all of them keeps concurrent clients on different datasets.
        dataset_id = self._ids[self._next_move % len(self._ids)]
        self._next_move += 1
        target = self._nodes[1] if self._primary[dataset_id] == self._nodes[0] \
            else self._nodes[0]
        self._primary[dataset_id] = target
        return http.post(f"{self._datasets_url}/{dataset_id}",
                         data=json.dumps({"primary": target}).encode(), headers=_JSON), 200


def ensure(coroutine) -> Deferred:
    """A Deferred running ``coroutine``."""
    return Deferred.fromCoroutine(coroutine)


async def request(http, operation: Callable) -> tuple[bool, str, bytes]:
    """Make one request and read its whole body; (as expected?, error text, body)."""
    d, expected = operation(http)
    response = await d
    body = await response.content()
    if response.code != expected:
        return False, f"{response.code}: {body[:300].decode('utf-8', 'replace')}", body
    return True, "", body


async def run_case(service: ControlService, clients: Sequence, name: str,
                   operation: Callable, alongside: Sequence = (), alongside_name: str = "",
                   alongside_operation: Optional[Callable] = None,
                   seconds: float = CASE_SECONDS, max_requests: int = MAX_REQUESTS,
                   profile: Optional[Path] = None) -> CaseResult:
    """
    Run ``operation`` from every client in ``clients`` at once, each waiting for its answer
    before its next request, for ``seconds`` or ``max_requests`` requests in all, while
    the ``alongside`` clients make ``alongside_operation`` requests; with ``profile``,
    write a flame graph of the service there.
    """
    main = Tally(operation=name, clients=len(clients))
    side = Tally(operation=alongside_name, clients=len(alongside)) if alongside else None
    profiler = None if profile is None else Profiler(service.pid, seconds, profile)
    load_before = tuple(round(x, 2) for x in load_average())
    server_before, client_before = service.cpu_seconds(), own_cpu_seconds()
    machine_before = machine_cpu_seconds()
    began = time.perf_counter()
    deadline = began + seconds
    issued = 0
    finished = False

    async def one_client(http, kind: Callable, tally: Tally, counted: bool):
        nonlocal issued
        while not finished and time.perf_counter() < deadline and (
                not counted or issued < max_requests):
            if counted:
                issued += 1
            start = time.perf_counter()
            try:
                ok, error, _ = await request(http, kind)
            except Exception as e:
                ok, error = False, repr(e)
            if ok:
                tally.latencies.append(time.perf_counter() - start)
            else:
                tally.errors += 1
                tally.first_error = tally.first_error or error

    background = [ensure(one_client(http, alongside_operation, side, False))
                  for http in alongside]
    await gatherResults([ensure(one_client(http, operation, main, True))
                         for http in clients])
    elapsed = time.perf_counter() - began
    finished = True
    await gatherResults(background)
    server = service.cpu_seconds() - server_before
    client = own_cpu_seconds() - client_before
    others = max(0.0, machine_cpu_seconds() - machine_before - server - client)
    if profiler is not None:
        profiler.wait()
    return CaseResult(
        main=main, alongside=side, seconds=elapsed, server_cpu_seconds=server,
        client_cpu_seconds=client, other_cpu_seconds=others, load_before=load_before,
        load_after=tuple(round(x, 2) for x in load_average()))


def _tally(runs: list[CaseResult], alongside: bool) -> list[Tally]:
    return [run.alongside if alongside else run.main for run in runs]


def _rates(runs: list[CaseResult], alongside: bool = False) -> Repeats:
    """Successful requests per second in each run."""
    return Repeats(run.rate(t) for run, t in zip(runs, _tally(runs, alongside)))


def _latencies(runs: list[CaseResult], p: float, alongside: bool = False) -> Repeats:
    """The ``p``-th percentile latency of each run (runs without a success left out)."""
    return Repeats(t.percentile(p) for t in _tally(runs, alongside) if t.latencies)


def _cell(repeats: Repeats) -> str:
    return repeats.describe(format_ms)


def _rate_cell(repeats: Repeats) -> str:
    return repeats.describe(lambda v: f"{v:.0f}")


def _cores(runs: list[CaseResult]) -> str:
    """The median CPU cores used by the service, the clients and the rest of the machine."""
    return ", ".join(f"{Repeats(getattr(r, kind) / r.seconds for r in runs).median:.2f}"
                     for kind in ("server_cpu_seconds", "client_cpu_seconds",
                                  "other_cpu_seconds"))


def _cases_table(cases: list[list[CaseResult]]) -> str:
    lines = ["| operation | clients | requests (median) | req/s | p50 | p99 | max | "
             "server CPU / request | CPU cores used: service, clients, rest of machine "
             "| errors (all runs) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for runs in cases:
        t = runs[0].main
        lines.append(
            f"| {t.operation} | {t.clients} | "
            f"{Repeats(r.main.requests for r in runs).median:.0f} | "
            f"{_rate_cell(_rates(runs))} | {_cell(_latencies(runs, 50))} | "
            f"{_cell(_latencies(runs, 99))} | {_cell(_latencies(runs, 100))} | "
            f"{_cell(Repeats(r.server_cpu_seconds / max(1, r.requests) for r in runs))} | "
            f"{_cores(runs)} | {sum(r.main.errors for r in runs)} |")
    return "\n".join(lines)


def _mixed_table(runs: list[CaseResult]) -> str:
    lines = ["| requests | clients | req/s | p50 | p99 | max | errors (all runs) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for alongside in (False, True):
        t = _tally(runs, alongside)
        lines.append(
            f"| {t[0].operation} | {t[0].clients} | {_rate_cell(_rates(runs, alongside))} | "
            f"{_cell(_latencies(runs, 50, alongside))} | "
            f"{_cell(_latencies(runs, 99, alongside))} | "
            f"{_cell(_latencies(runs, 100, alongside))} | {sum(x.errors for x in t)} |")
    return "\n".join(lines) + (f"\n\nCPU cores used (median): service, clients, rest of "
                               f"machine: {_cores(runs)}.")


def _targets(cases: list[list[CaseResult]]) -> tuple[Target, ...]:
    """The goals, each judged on the median of the case's runs."""
    by_key = {(runs[0].main.operation, runs[0].main.clients): runs for runs in cases}
    targets = []
    for clients in CLIENTS:
        runs = by_key.get(("list", clients))
        if runs is not None and all(r.main.latencies for r in runs):
            errors = sum(r.main.errors for r in runs)
            targets.append(_latencies(runs, 50).target(
                what=f"list {DATASETS:,} datasets, p50, {clients} client"
                     f"{'s' if clients > 1 else ''}",
                goal=f"< {format_ms(LIST_P50_GOAL)}", render=format_ms,
                met=lambda p50: p50 < LIST_P50_GOAL and errors == 0))
    for operation in ("create", "move"):
        runs = by_key.get((operation, max(CLIENTS)))
        if runs is not None:
            errors = sum(r.main.errors for r in runs)
            targets.append(_rates(runs).target(
                what=f"durable {operation}s per second, {max(CLIENTS)} clients",
                goal=f">= {WRITES_PER_SECOND_GOAL:.0f}/s", render=lambda v: f"{v:.0f}/s",
                met=lambda rate: rate >= WRITES_PER_SECOND_GOAL and errors == 0))
    return tuple(targets)


def _runs_json(runs: list[CaseResult]) -> dict:
    """A case over its runs: the medians (min, max, repeats) and every run."""
    t = runs[0].main
    return {"operation": t.operation, "clients": t.clients,
            "requests_per_second": _rates(runs).to_json(1),
            "p50_ms": Repeats(v * 1000 for v in _latencies(runs, 50).values).to_json(2),
            "p99_ms": Repeats(v * 1000 for v in _latencies(runs, 99).values).to_json(2),
            "runs": [r.to_json() for r in runs]}


def _summary(case: CaseResult) -> str:
    t = case.main
    text = (f"{t.operation} x{t.clients}: {case.rate(t):.0f} req/s, "
            f"p50 {format_ms(t.percentile(50))}, {t.errors} errors")
    if case.alongside is not None:
        a = case.alongside
        text += (f"; alongside {a.operation} x{a.clients}: {case.rate(a):.0f} req/s, "
                 f"p50 {format_ms(a.percentile(50))}, {a.errors} errors")
    return text


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
    operations = Operations(service.base_url, node_a, node_b, ids)
    cases: list[list[CaseResult]] = []

    def profile_path(name: str) -> Optional[Path]:
        if context.profile_dir is None:
            return None
        return context.profile_dir / f"control_api-{name}.txt"

    try:
        # Open every client's connection (the TLS handshake is not what is measured) and
        # check the service serves the preloaded datasets.
        warm = await gatherResults([ensure(request(http, operations.list))
                                    for http in clients])
        for ok, error, body in warm:
            if not ok:
                raise RuntimeError(f"listing datasets failed: {error}")
        list_bytes = len(warm[0][2])
        listed = len(json.loads(warm[0][2]))
        if listed != DATASETS:
            raise RuntimeError(f"the service lists {listed} datasets, not {DATASETS}")
        for name in ("list", "move", "create"):
            for count in CLIENTS:
                async def one_run(i: int, name=name, count=count) -> CaseResult:
                    # Only the first run is profiled (a profile costs CPU of its own).
                    case = await run_case(
                        service, clients[:count], name, getattr(operations, name),
                        profile=profile_path(f"{name}-{count}") if i == 0 else None)
                    context.log(_summary(case))
                    return case
                cases.append(await repeat(one_run))
        movers = max(CLIENTS) - 1

        async def one_mixed_run(i: int) -> CaseResult:
            case = await run_case(
                service, clients[:1], "list", operations.list,
                alongside=clients[1:1 + movers], alongside_name="move",
                alongside_operation=operations.move,
                profile=profile_path(f"list-1-with-{movers}-moving") if i == 0 else None)
            context.log(_summary(case))
            return case
        mixed = await repeat(one_mixed_run)
    finally:
        await gatherResults([pool.closeCachedConnections() for pool in pools])
        await service.stop()

    targets = _targets(cases)
    results = {
        "datasets": DATASETS, "preload": "SQLite store API, one transaction",
        "preload_seconds": round(preload_seconds, 3),
        "startup_seconds": round(service.startup_seconds, 3),
        "list_response_bytes": list_bytes, "case_seconds": CASE_SECONDS,
        "max_requests_per_case": MAX_REQUESTS, "repeats": REPEATS,
        "cases": [_runs_json(runs) for runs in cases],
        "list_while_moving": {"runs": [run.to_json() for run in mixed]},
        "targets": [t.to_json() for t in targets],
    }
    markdown = f"""## Control service REST API

A real `pyflock-control` process with {DATASETS:,} datasets in its SQLite store, and
clients in a separate process: treq, mutual TLS with a `user-{BENCH_USER}` certificate,
one keep-alive connection per client (opened before measuring), each client waiting for
its answer before its next request. The datasets were written into the store with its
own API before the service started ({preload_seconds:.2f} s, one transaction); the
service then loaded them in {service.startup_seconds:.2f} s from spawn to listening.

- *list*: `GET /v1/configuration/datasets`, {list_bytes / 1e6:.1f} MB of JSON;
- *move*: `POST /v1/configuration/datasets/<id>` with the other node as `primary`, each
  request a different dataset;
- *create*: `POST /v1/configuration/datasets` of a new named 1 GiB dataset.

A create or move is answered only once SQLite has committed it with `synchronous=FULL`,
so every one counted is durable. Each case runs for {CASE_SECONDS:.0f} s (or
{MAX_REQUESTS:,} requests), {REPEATS} times in a row, in the order shown, so the creates
add to the {DATASETS:,} datasets. Each cell is the median of the {REPEATS} runs with the
smallest and the largest: median (min–max). Latency runs from sending the request to having read the whole
answer. *Server CPU / request* is the service process's CPU time (all its threads) in
the case divided by the requests answered. *CPU cores used* are CPU seconds per second of
wall time of the service, of the clients' process, and of everything else on the machine
(other work, and kernel time no process is charged for): with 2 cores, a sum near 2
means the machine, not the service, set the pace.

{_cases_table(cases)}

### Listing while datasets move

One client lists while {movers} others move datasets, for {CASE_SECONDS:.0f} s, {REPEATS} times: each
move changes the configuration, so lists cannot be answered from the cached answer of an
unchanged configuration.

{_mixed_table(mixed)}
"""
    return Section(name="control_api", markdown=markdown, results=results,
                   targets=targets)
