"""
Benchmark of listing a large cluster (issue 12): ``GET /v1/configuration/datasets`` of
100,000 datasets from a real ``pyflock-control``, with 1 and 16 keep-alive clients over
mutual TLS, accepting gzip and not; and one client listing while others move datasets,
so that every list waits for the body of a new generation (a client reads its writes).

Each client is one keep-alive HTTP/1.1 connection over mutual TLS made with Python's
``ssl`` module, in a thread of its own, reading each body whole with large ``recv_into``
calls into one buffer and decoding nothing, so that each says exactly which encoding it
accepts; a request's latency runs from sending it to having read the whole body as sent
(gzip bodies are checked to decode to every dataset once, before the timed runs, not in
them: decoding is the client's own cost). Real clients run on other machines; on this
2-core one the clients share the cores with the service, so they are kept cheap
(Twisted's ``Agent`` took more CPU per 18 MB list than the service).

With the environment variable ``BENCH_BASELINE_CONTROL`` naming another installation's
``pyflock-control`` (e.g. ``/work/main/.venv/bin/pyflock-control``), the same cases run
against it too, in the same run, for a side-by-side "before" column.

Run alone: ``python bench/run.py --only control_lists --output /tmp/bench.md``.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import ssl
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from twisted.internet.defer import gatherResults, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

import _harness
from _harness import (
    BENCH_USER, REPEATS, Context, Repeats, Section, format_ms, load_average,
    make_certificates, repeat, start_control_service,
)
from control_api import (
    CaseResult, Operations, _cell, _cores, _latencies, _rates, ensure, preload, request,
    run_case,
)
from pyflock.common._tls import treq_client

#: Datasets in the store.
DATASETS = 100_000

#: The goals of issue 12 for 16 clients: p50 with gzip accepted, and without.
GZIP_P50_GOAL = 0.100
PLAIN_P50_GOAL = 0.300

CLIENTS = (1, 16)
MOVERS = 4


#: Bytes a client asks for per ``recv_into``.
READ_SIZE = 1024 * 1024


class _Answer:
    """A response with its whole body read, shaped as ``control_api.request`` reads it."""

    def __init__(self, code: int, headers: Headers, body):
        self.code = code
        self.headers = headers
        self._body = body

    def content(self):
        """The body, as sent."""
        return succeed(self._body)


class RawHTTP:
    """
    GETs on one keep-alive TLS connection (``context``), in a thread of its own, that
    accept exactly ``accept_encoding`` and decode nothing; an answer's body is a view of
    this client's buffer, valid until its next request.
    """

    def __init__(self, reactor, context: ssl.SSLContext, accept_encoding: bytes):
        self._reactor = reactor
        self._context = context
        self._accept = accept_encoding
        self._socket: Optional[ssl.SSLSocket] = None
        self._buffer = bytearray(READ_SIZE)
        self._pool = ThreadPool(1, 1, name="list-client")
        self._pool.start()

    def get(self, url: str):
        """GET ``url``; a Deferred of an ``_Answer``."""
        return deferToThreadPool(self._reactor, self._pool, self._get, url)

    def close(self) -> None:
        """Close the connection and stop the thread."""
        self._pool.stop()
        if self._socket is not None:
            self._socket.close()

    def _get(self, url: str) -> _Answer:
        parts = urlsplit(url)
        if self._socket is None:
            self._socket = self._context.wrap_socket(
                socket.create_connection((parts.hostname, parts.port)),
                server_hostname=parts.hostname)
        self._socket.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nAccept-Encoding: %s\r\n\r\n"
                             % (parts.path.encode(), parts.netloc.encode(), self._accept))
        head = b""
        while b"\r\n\r\n" not in head:
            received = self._socket.recv(65536)
            if not received:
                raise ConnectionError("connection closed")
            head += received
        head, _, rest = head.partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        headers = Headers()
        for line in lines:
            name, _, value = line.partition(b":")
            headers.addRawHeader(name.strip(), value.strip())
        length = int(headers.getRawHeaders(b"content-length")[0])
        if len(self._buffer) < length:
            self._buffer = bytearray(length)
        view = memoryview(self._buffer)
        view[:len(rest)] = rest
        got = len(rest)
        while got < length:
            received = self._socket.recv_into(view[got:], min(READ_SIZE, length - got))
            if not received:
                raise ConnectionError("connection closed")
            got += received
        return _Answer(int(status.split()[1]), headers, view[:length])


def _decoded(answer: _Answer) -> list:
    """The JSON of an answer, decoding gzip if it says it is gzip."""
    encoding = answer.headers.getRawHeaders(b"content-encoding") or []
    body = bytes(answer._body)
    return json.loads(gzip.decompress(body) if b"gzip" in encoding else body)


async def _measure(reactor, context: Context, certificates, data_path: Path, ids: list,
                   label: str) -> dict:
    """Every case against one service (``label``: which build); its runs by case."""
    node_a, node_b = certificates.node_uuids
    service = await start_control_service(reactor, certificates, data_path)
    context.log(f"{label}: pyflock-control started in {service.startup_seconds:.1f} s")
    tls = ssl.create_default_context(cafile=str(certificates.path / "cluster.crt"))
    tls.load_cert_chain(str(certificates.path / f"{BENCH_USER}.crt"),
                            str(certificates.path / f"{BENCH_USER}.key"))
    mover_pools = [HTTPConnectionPool(reactor, persistent=True) for _ in range(MOVERS)]
    movers = [treq_client(reactor, certificates.path, BENCH_USER, pool=pool)
              for pool in mover_pools]
    by_encoding = {encoding: [RawHTTP(reactor, tls, encoding.encode())
                              for _ in range(max(CLIENTS))]
                   for encoding in ("gzip", "identity")}
    operations = Operations(service.base_url, node_a, node_b, ids)
    cases: dict[str, list[CaseResult]] = {}
    sizes = {}
    try:
        for encoding, clients in by_encoding.items():
            warm = await gatherResults([ensure(request(http, operations.list))
                                        for http in clients])
            ok, error, _ = warm[0]
            if not ok:
                raise RuntimeError(f"listing failed: {error}")
            answer = await clients[0].get(f"{service.base_url}/v1/configuration/datasets")
            sizes[encoding] = len(answer._body)
            listed = len(_decoded(answer))
            if listed != DATASETS:
                raise RuntimeError(f"{label} lists {listed} datasets, not {DATASETS}")
            for count in CLIENTS:
                name = f"list, {encoding}, {count} client{'s' if count > 1 else ''}"

                async def one_run(i, clients=clients, count=count, name=name):
                    case = await run_case(service, clients[:count], "list",
                                          operations.list)
                    context.log(f"{label}: {name}: p50 "
                                f"{format_ms(case.main.percentile(50))}, "
                                f"{case.main.errors} errors")
                    return case
                cases[name] = await repeat(one_run)
        name = f"list, gzip, 1 client, {MOVERS} moving"

        async def mixed_run(i):
            case = await run_case(service, by_encoding["gzip"][:1], "list",
                                  operations.list, alongside=movers,
                                  alongside_name="move",
                                  alongside_operation=operations.move)
            context.log(f"{label}: {name}: list p50 {format_ms(case.main.percentile(50))}"
                        f", move p50 {format_ms(case.alongside.percentile(50))}")
            return case
        cases[name] = await repeat(mixed_run)
    finally:
        for client in by_encoding["gzip"] + by_encoding["identity"]:
            client.close()
        await gatherResults([pool.closeCachedConnections() for pool in mover_pools])
        await service.stop()
    return {"cases": cases, "sizes": sizes, "startup_seconds": service.startup_seconds}


def _cpu_per_request(runs: list[CaseResult]) -> Repeats:
    """The service's CPU time per request answered, in each run: what a list costs it,
    whatever else the machine was doing."""
    return Repeats(r.server_cpu_seconds / max(1, r.requests) for r in runs)


def _use_control(script: Optional[str]):
    """Make ``start_control_service`` run ``script`` (None: this installation's)."""
    if script is None:
        _harness._control_command = _ORIGINAL_COMMAND
    else:
        python = Path(script).parent / "python"
        _harness._control_command = lambda: [str(python), script]


_ORIGINAL_COMMAND = _harness._control_command


async def benchmark(reactor, context: Context) -> Section:
    """Measure listing 100,000 datasets with and without gzip, before and after."""
    certificates = make_certificates(context.workdir)
    node_a = certificates.node_uuids[0]
    data_path = context.workdir / "control"
    began = time.perf_counter()
    ids = await preload(reactor, data_path, node_a, DATASETS)
    preload_seconds = time.perf_counter() - began
    context.log(f"preloaded {DATASETS} datasets in {preload_seconds:.2f} s")
    load_before = load_average()
    measured = {"this build": await _measure(reactor, context, certificates, data_path,
                                             ids, "this build")}
    baseline = os.environ.get("BENCH_BASELINE_CONTROL")
    if baseline:
        _use_control(baseline)
        try:
            measured["baseline"] = await _measure(reactor, context, certificates, data_path,
                                                  ids, "baseline")
        finally:
            _use_control(None)
    load_after = load_average()

    targets = []
    mine = measured["this build"]["cases"]
    for encoding, goal in (("gzip", GZIP_P50_GOAL), ("identity", PLAIN_P50_GOAL)):
        runs = mine[f"list, {encoding}, {max(CLIENTS)} clients"]
        errors = sum(r.main.errors for r in runs)
        targets.append(_latencies(runs, 50).target(
            what=f"list {DATASETS:,} datasets, p50, {max(CLIENTS)} clients, "
                 f"Accept-Encoding: {encoding}",
            goal=f"< {format_ms(goal)}", render=format_ms,
            met=lambda p50, goal=goal, errors=errors: p50 < goal and errors == 0))

    rows = ["| service | case | req/s | p50 | p99 | service CPU / request | CPU cores: service, "
            "clients, rest | errors |", "|---|---|---:|---:|---:|---:|---|---:|"]
    for label, result in measured.items():
        for name, runs in result["cases"].items():
            rows.append(f"| {label} | {name} | "
                        f"{_rates(runs).describe(lambda v: f'{v:.0f}')} | "
                        f"{_cell(_latencies(runs, 50))} | {_cell(_latencies(runs, 99))} | "
                        f"{_cell(_cpu_per_request(runs))} | {_cores(runs)} | "
                        f"{sum(r.main.errors for r in runs)} |")
            if runs[0].alongside is not None:
                rows.append(f"| {label} | (moves meanwhile, {MOVERS} clients) | "
                            f"{_rates(runs, True).describe(lambda v: f'{v:.0f}')} | "
                            f"{_cell(_latencies(runs, 50, True))} | "
                            f"{_cell(_latencies(runs, 99, True))} | | | "
                            f"{sum(r.alongside.errors for r in runs)} |")
    sizes = measured["this build"]["sizes"]
    results = {
        "datasets": DATASETS, "preload_seconds": round(preload_seconds, 3),
        "load_before": list(load_before), "load_after": list(load_after),
        "services": {label: {
            "startup_seconds": round(result["startup_seconds"], 3),
            "body_bytes": result["sizes"],
            "cases": {name: {"p50_ms": Repeats(v * 1000 for v in _latencies(runs, 50)
                                               .values).to_json(2),
                             "runs": [r.to_json() for r in runs]}
                      for name, runs in result["cases"].items()}}
            for label, result in measured.items()},
        "targets": [t.to_json() for t in targets],
    }
    markdown = f"""## Listing a large cluster

A real `pyflock-control` with {DATASETS:,} datasets in its SQLite store (written with
the store API in {preload_seconds:.1f} s before it started), listed with
`GET /v1/configuration/datasets` by clients in this process over mutual TLS, each a
thread with one keep-alive connection (Python's `ssl` module, the body read whole with
1 MiB `recv_into` calls), each sending `Accept-Encoding: gzip` or `identity` and
decoding nothing: the list is {sizes.get('identity', 0) / 1e6:.1f} MB of JSON, or
{sizes.get('gzip', 0) / 1e6:.1f} MB gzipped. Latency runs from sending the request to
having read the whole body. The last case lists while {MOVERS} other clients move
datasets, so nearly every list waits for the body (and its gzip) of a new generation.
Each case runs {REPEATS} times; each cell is the median (smallest–largest). *Service CPU
/ request* is the service's CPU time over the requests answered (in the last case, lists
and moves): unlike latency, it hardly depends on what else the machine is doing.
{"The baseline is another installation of pyflock, in the same run." if baseline else ""}
Load average (1, 5, 15 min) before: {", ".join(f"{x:.2f}" for x in load_before)};
after: {", ".join(f"{x:.2f}" for x in load_after)}.

{chr(10).join(rows)}
"""
    return Section(name="control_lists", markdown=markdown, results=results,
                   targets=tuple(targets))
