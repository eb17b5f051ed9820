"""
A fleet of simulated agents in one process, against a real ``pyflock-control`` (issue 12).

Each simulated agent is the real agent's ``AgentChannel`` (pyflock.agent._channel) over its
own real mutual-TLS connection with its own node certificate from the cluster's CA: hello,
welcome, snapshot (in pages), diffs, heartbeats, state reports, resyncs and reconnects with
jittered backoff are the real agent's code and codec (pyflock.common._wire); only the
convergence behind it is left out. A simulated agent reports that it holds, mounted, every
live dataset whose primary it is, as a real agent does once it converged, so a change
costs the control service what it costs with real agents: the diff, then the report, then
the diff of the new holders.

Node certificates are made in memory, fast: every simulated node shares one ECDSA key
(the control service judges a certificate by its chain and common name only), so minting
one is a signature, not a key generation.

So that one process can play a thousand agents without being the bottleneck itself, the
agents share what they would each compute alike (``Sharing``): a frame of the same bytes
is decoded once by the real ``decode`` (a broadcast diff, a snapshot page encoded once per
version), and a view built from the same message on the same view is built once
(``SharedView``, the real ``AgentView``). Every agent still reads every byte over its own
TLS connection, frames it, handles each message and keeps its own view, version,
heartbeats and reconnects.

What it measures (printed as JSON by ``python bench/simulator.py``):

- the time from starting every agent at once (a control service restart, as agents see it)
  until each has its first snapshot, and how many had one within ``--sync-timeout``;
- for each of ``--changes`` dataset creates through the REST API, the time until each agent
  had the dataset in its view (p50, p99, max over agents and changes; and per change the time
  until every agent had it);
- the control service's RSS (now and peak, /proc/PID/status) and CPU seconds (/proc/PID/stat);
- the bytes the agents received (on the wire: TLS included) per change.

Without ``--control`` it starts a ``pyflock-control`` on SQLite whose store it preloads with
``--datasets`` datasets; with ``--control HOST:API_PORT:AGENT_PORT,...`` (and
``--certificates DIR``, holding the cluster's CA key and ``bench.crt/.key``) it uses running
replicas, spreading agents over them round-robin, and creates the datasets through the
REST API first.

Run: ``.venv/bin/python bench/simulator.py --agents 500 --datasets 1000 --changes 20``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional
from uuid import uuid4

import attr
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

BENCH = Path(__file__).resolve().parent
for _folder in (BENCH, BENCH.parent):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from _harness import (  # noqa: E402
    BENCH_USER, latency_stats, own_cpu_seconds, process_cpu_seconds,
)
# The real agent's channel and codec: the simulator has no wire format of its own.
from pyflock.agent._channel import AgentChannel  # noqa: E402
from pyflock.agent._view import AgentView  # noqa: E402
from pyflock.common import _wire  # noqa: E402
from pyflock.common._ca import _build_leaf, _load_authority, _new_key  # noqa: E402
from pyflock.common._records import DatasetReport  # noqa: E402
from pyflock.common._tls import ClusterTLS, Identity, PeerCheck  # noqa: E402
from pyflock.common._tls import _Credentials, _twisted_certificate  # noqa: E402
from pyflock.common._wire import Diff  # noqa: E402
from tests.harness.control import ControlProcess  # noqa: E402

#: The size of every simulated dataset (never allocated: nothing converges).
DATASET_SIZE = 1024 ** 3

#: How long a change may take to reach every agent before it counts as lost.
CHANGE_TIMEOUT = 30.0

#: The agents' views count as settled when they agree for this long.
SETTLE = 0.3

#: Views kept for sharing (the latest versions), and bytes of frames kept decoded.
VIEWS_KEPT = 2048
DECODED_BUDGET = 64 * 1024 ** 2
OBJECTS_KEPT = 500_000

# How ``_wire.snapshot_pages`` lays out a page: a head naming epoch and version, then the
# datasets and nodes (the body).
_SNAPSHOT_HEAD = b'{"type":"snapshot","epoch":'
_DATASETS = b',"datasets":['
_EMPTY_BODY = b',"datasets":[],"nodes":[]}'


class SharedView(AgentView):
    """The real ``AgentView``, whose ``apply`` returns the view already built from the same
    view version and message (by epoch, version and kind) by another agent, if any."""

    _built: "OrderedDict[tuple, AgentView]" = OrderedDict()

    def apply(self, message):
        """``AgentView.apply``, once per (view version, message) for the whole fleet."""
        key = (type(message).__name__, message.epoch, message.version,
               self.current if isinstance(message, Diff) else None)
        view = SharedView._built.get(key)
        if view is not None:
            SharedView._built.move_to_end(key)
        else:
            view = super().apply(message)
            SharedView._built[key] = view
            while len(SharedView._built) > VIEWS_KEPT:
                SharedView._built.popitem(last=False)
        return view


class Sharing:
    """
    While in force (``with Sharing():``), the real codec's decoding is memoized, so that
    agents receiving the same bytes share the (immutable) result: a whole frame by its
    bytes (a broadcast diff); a snapshot page whose datasets and nodes are bytes already
    decoded, by decoding its head alone (it differs in epoch and version only: each agent
    connecting bumps the version); and each dataset entry and node object by its JSON.
    ``SharedView`` starts empty. Everything is restored on leaving.
    """

    def __init__(self, budget: int = DECODED_BUDGET):
        self._budget = budget
        self._frames: OrderedDict = OrderedDict()
        self._bytes = 0
        self._objects: dict = {}
        self._real = {name: getattr(_wire, name)
                      for name in ("decode", "dataset_entry_from_json", "node_from_json")}

    def decode(self, payload: bytes, protocol=None):
        """The real ``decode``, once per frame, or per page body (see the class)."""
        head, body = payload, b""
        if payload.startswith(_SNAPSHOT_HEAD):
            cut = payload.find(_DATASETS, len(_SNAPSHOT_HEAD))
            if cut > 0:
                head, body = payload[:cut], payload[cut:]
        key = (body or payload, protocol)
        message = self._frames.get(key)
        if message is None:
            message = self._real["decode"](payload, protocol)
            self._keep(key, message)
        elif body:
            # The real decoder reads the head; the body is the one decoded before.
            header = self._real["decode"](head + _EMPTY_BODY, protocol)
            message = attr.evolve(message, epoch=header.epoch, version=header.version)
        return message

    def _keep(self, key: tuple, message) -> None:
        self._frames[key] = message
        self._bytes += len(key[0])
        while self._bytes > self._budget:
            (old, _), _ = self._frames.popitem(last=False)
            self._bytes -= len(old)

    def _object(self, name: str):
        real = self._real[name]

        def decode_object(obj, where=None):
            key = (name, repr(obj))
            value = self._objects.get(key)
            if value is None:
                value = real(obj) if where is None else real(obj, where)
                if len(self._objects) >= OBJECTS_KEPT:
                    self._objects.clear()
                self._objects[key] = value
            return value
        return decode_object

    def __enter__(self) -> "Sharing":
        SharedView._built.clear()
        _wire.decode = self.decode
        _wire.dataset_entry_from_json = self._object("dataset_entry_from_json")
        _wire.node_from_json = self._object("node_from_json")
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self._real.items():
            setattr(_wire, name, real)
        SharedView._built.clear()


def mint_node_credentials(ca_path: Path, count: int) -> list[tuple[str, ClusterTLS]]:
    """``count`` new node uuids, each with a ``ClusterTLS`` presenting a node certificate
    issued by the CA in ``ca_path`` (cluster.crt/.key); one key shared by all of them."""
    authority = _load_authority(ca_path)
    key = _new_key()
    trust = _twisted_certificate(authority.certificate)
    now = datetime.now(timezone.utc)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    nodes = []
    for _ in range(count):
        uuid = str(uuid4())
        certificate = _build_leaf(authority, key.public_key(), f"node-{uuid}", usages, [], now)
        credentials = _Credentials(authority=trust, certificate=certificate, key=key,
                                   cluster_uuid=authority.cluster_uuid)
        nodes.append((uuid, ClusterTLS(credentials, PeerCheck(authority.cluster_uuid))))
    return nodes


@attr.s(auto_attribs=True)
class ByteCounter:
    """Bytes a simulated agent's connections carried on the wire, and how many it made."""

    received: int = 0
    sent: int = 0
    connections: int = 0


class _CountingProtocol(ProtocolWrapper):
    def dataReceived(self, data: bytes) -> None:
        self.factory.counter.received += len(data)
        super().dataReceived(data)

    def write(self, data: bytes) -> None:
        self.factory.counter.sent += len(data)
        super().write(data)

    def writeSequence(self, data) -> None:
        self.factory.counter.sent += sum(len(d) for d in data)
        super().writeSequence(data)


class _CountingFactory(WrappingFactory):
    protocol = _CountingProtocol

    def __init__(self, wrapped, counter: ByteCounter):
        super().__init__(wrapped)
        self.counter = counter


@implementer(IStreamClientEndpoint)
@attr.s(frozen=True, auto_attribs=True)
class CountingEndpoint:
    """A client endpoint counting the bytes of its connections into ``counter``."""

    wrapped: IStreamClientEndpoint
    counter: ByteCounter

    def connect(self, factory):
        """Connect ``factory``'s protocol through a counting wrapper."""
        self.counter.connections += 1
        return self.wrapped.connect(_CountingFactory(factory, self.counter)).addCallback(
            lambda wrapper: wrapper.wrappedProtocol)


@attr.s(auto_attribs=True)
class Watch:
    """One change being waited for: a dataset id, when it was made, and who has seen it."""

    dataset_id: str
    began: float
    seen: dict = attr.Factory(dict)
    done: Deferred = attr.Factory(Deferred)


class SimulatedAgent:
    """One simulated node: the real ``AgentChannel``, reporting the datasets it is primary of."""

    def __init__(self, fleet: "Fleet", reactor, uuid: str, endpoint: IStreamClientEndpoint,
                 counter: ByteCounter, heartbeat: float):
        self.fleet = fleet
        self.uuid = uuid
        self.counter = counter
        self.first_view: Optional[float] = None
        #: Which of the fleet's control services it connects to.
        self.replica = 0
        self.held: frozenset = frozenset()
        #: How many whole views (snapshots) it was sent, as opposed to diffs.
        self.snapshots = 0
        self.channel = AgentChannel(reactor, endpoint, uuid, "sim-" + uuid[:8], self._on_view,
                                    address="127.0.0.1", heartbeat=heartbeat,
                                    view=SharedView(),
                                    timeout=3 * heartbeat)

    def start(self, held) -> None:
        """Connect (and keep reconnecting), reporting the datasets ``held`` at once, as an
        agent whose node holds them does after a restart of the control service."""
        self._report(frozenset(held))
        self.channel.start()

    def _report(self, held: frozenset) -> None:
        self.held = held
        self.channel.report_state(DatasetReport(dataset_id=i, state="mounted",
                                                maximum_size=DATASET_SIZE) for i in held)

    def _on_view(self, view) -> None:
        fleet = self.fleet
        if self.first_view is None:
            self.first_view = time.perf_counter()
            fleet.synced += 1
            if fleet.synced == len(fleet.agents) and not fleet.all_synced.called:
                fleet.all_synced.callback(None)
        change = self.channel.change
        if isinstance(change, Diff):
            held = set(self.held)
            for entry in change.datasets:
                if entry.primary == self.uuid and not entry.deleted:
                    held.add(entry.dataset_id)
                else:
                    held.discard(entry.dataset_id)
            held.difference_update(change.removed)
        else:
            self.snapshots += 1
            # A snapshot: what this node holds and the view still has (O(held), not
            # O(view): a thousand agents each read a snapshot of ten thousand datasets).
            held = [i for i in self.held if view.datasets.get(i) is not None
                    and view.datasets[i].primary == self.uuid and not view.datasets[i].deleted]
        held = frozenset(held)
        if held != self.held:
            self._report(held)
        watch = fleet.watch
        if watch is not None and self.uuid not in watch.seen \
                and watch.dataset_id in view.datasets:
            watch.seen[self.uuid] = time.perf_counter() - watch.began
            if len(watch.seen) == len(fleet.agents) and not watch.done.called:
                watch.done.callback(None)


class Fleet:
    """Every simulated agent of a run, and what they saw."""

    def __init__(self, reactor, nodes: list[tuple[str, ClusterTLS]],
                 agent_addresses: list[tuple[str, int]], heartbeat: float):
        self.reactor = reactor
        self.synced = 0
        self.all_synced: Deferred = Deferred()
        self.watch: Optional[Watch] = None
        self.agents = []
        for n, (uuid, tls) in enumerate(nodes):
            host, port = agent_addresses[n % len(agent_addresses)]
            counter = ByteCounter()
            endpoint = wrapClientTLS(tls.client_options(Identity.control(), host),
                                     CountingEndpoint(TCP4ClientEndpoint(reactor, host, port),
                                                      counter))
            agent = SimulatedAgent(self, reactor, uuid, endpoint, counter, heartbeat)
            agent.replica = n % len(agent_addresses)
            self.agents.append(agent)

    def start(self, held: dict) -> None:
        """Start every agent at once (as after a restart of the control service), each
        holding ``held[uuid]``."""
        for agent in self.agents:
            agent.start(held.get(agent.uuid, ()))

    def stop(self) -> Deferred:
        """Stop every agent; fires once their connections are closed."""
        return gatherResults([a.channel.stop() for a in self.agents])

    def bytes_received(self) -> int:
        """Bytes every agent has received so far."""
        return sum(a.counter.received for a in self.agents)

    def views(self) -> set:
        """The distinct views the agents hold, by replica (each replica has an epoch and
        versions of its own): one per replica once they agree."""
        return {(a.replica, a.channel.view.current) for a in self.agents}

    async def settled(self, timeout: float) -> bool:
        """Wait until the agents of each replica agree on one view version for ``SETTLE``
        seconds; whether they got there within ``timeout``."""
        deadline = time.perf_counter() + timeout
        agreed_since = None
        while time.perf_counter() < deadline:
            views = self.views()
            if len(views) == len({replica for replica, _ in views}):
                agreed_since = agreed_since or time.perf_counter()
                if time.perf_counter() - agreed_since >= SETTLE:
                    return True
            else:
                agreed_since = None
            await deferLater(self.reactor, 0.05, lambda: None)
        return False


class EventCounts:
    """Counts the agents' channel events by type (and refusal code, loss reason): why
    connections were lost, refused or retried, for the summary."""

    def __init__(self):
        self.counts: Counter = Counter()

    def __call__(self, event: dict) -> None:
        kind = event.get("event_type")
        if not kind or not kind.startswith("pyflock:agent:"):
            return
        detail = event.get("code") or event.get("reason")
        if detail and kind != "pyflock:agent:channel-connected":
            kind += f" ({str(detail)[:80]})"
        self.counts[kind] += 1


def control_memory(pid: int) -> dict:
    """The RSS and peak RSS of process ``pid``, in MiB (from /proc/PID/status)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mib": values.get("VmRSS"), "peak_rss_mib": values.get("VmHWM")}


async def _with_timeout(reactor, waited: Deferred, timeout: float) -> bool:
    """Wait for ``waited`` at most ``timeout`` seconds; whether it fired."""
    timer = deferLater(reactor, timeout, lambda: None)
    await DeferredList([waited, timer], fireOnOneCallback=True, consumeErrors=True)
    if timer.called:
        return waited.called
    timer.cancel()
    return True


@attr.s(frozen=True, auto_attribs=True)
class Replica:
    """One control service the fleet uses: its REST API and agent channel addresses."""

    host: str
    api_port: int
    agent_port: int

    @classmethod
    def parse(cls, text: str) -> "Replica":
        """``HOST:API_PORT:AGENT_PORT``; ValueError saying what is wrong otherwise."""
        parts = text.strip().split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"{text!r}: give each control service as "
                             f"HOST:API_PORT:AGENT_PORT, e.g. 127.0.0.1:4523:4524")
        return cls(parts[0], int(parts[1]), int(parts[2]))

    @property
    def url(self) -> str:
        """The REST API's root URL."""
        return f"https://{self.host}:{self.api_port}"


def _dataset_body(primary: str, n: int, dataset_id: Optional[str] = None) -> dict:
    body = {"primary": primary, "maximum_size": DATASET_SIZE,
            "metadata": {"name": f"sim-{n}"}}
    if dataset_id is not None:
        body["dataset_id"] = dataset_id
    return body


async def create_dataset(http, replica: Replica, body: dict) -> None:
    """Create one dataset through the REST API; RuntimeError with the answer if refused."""
    response = await http.post(f"{replica.url}/v1/configuration/datasets",
                               data=json.dumps(body).encode(),
                               headers={b"content-type": [b"application/json"]})
    text = await response.text()
    if response.code != 201:
        raise RuntimeError(f"creating a dataset answered {response.code}: {text[:300]}")


def plan_datasets(primaries: list[str], count: int) -> dict[str, list[str]]:
    """``count`` new dataset ids by primary node, spread round-robin over ``primaries``."""
    held: dict[str, list[str]] = {}
    for n in range(count):
        held.setdefault(primaries[n % len(primaries)], []).append(str(uuid4()))
    return held


def _numbered(held: dict[str, list[str]]):
    """(n, dataset id, primary) for every planned dataset."""
    pairs = ((i, p) for p, ids in held.items() for i in ids)
    return ((n, i, p) for n, (i, p) in enumerate(pairs))


async def preload_store(reactor, data_path: Path, held: dict[str, list[str]]) -> None:
    """Write the datasets ``held`` (ids by primary) into a new SQLite store at
    ``data_path`` in one transaction, before the control service opens it."""
    from pyflock.common._model import Dataset
    from pyflock.control._sqlite_store import open_sqlite_store
    from pyflock.control._store import StoreWrite
    store = await open_sqlite_store(reactor, data_path)
    try:
        datasets = [Dataset(dataset_id=i, primary=p, maximum_size=DATASET_SIZE,
                            metadata={"name": f"sim-{n}"}) for n, i, p in _numbered(held)]
        await store.write(StoreWrite(datasets=tuple((d.dataset_id, d) for d in datasets),
                                     generation=len(datasets)))
    finally:
        await store.close()


async def create_in_store(reactor, data_path: Path, primaries: list[str]) -> list[str]:
    """Create a dataset for each of ``primaries`` straight in the SQLite store at
    ``data_path`` (its control service stopped: changes made while it was down); their ids."""
    from pyflock.common._model import Dataset
    from pyflock.control._sqlite_store import open_sqlite_store
    from pyflock.control._store import StoreWrite
    store = await open_sqlite_store(reactor, data_path)
    try:
        config = (await store.load()).configuration
        new = [Dataset(dataset_id=str(uuid4()), primary=p, maximum_size=DATASET_SIZE)
               for p in primaries]
        await store.write(StoreWrite(datasets=tuple((d.dataset_id, d) for d in new),
                                     generation=config.generation + 1))
    finally:
        await store.close()
    return [d.dataset_id for d in new]


async def restart_control(reactor, fleet: Fleet, control, data_path: Path,
                          created: int, timeout: float) -> dict:
    """
    Stop ``control`` (SIGTERM), create ``created`` datasets in its store meanwhile, start
    it again, and wait until every agent's view has them and the fleet agrees on one
    view: how long that took from the restart, what each agent received meanwhile, and
    how many snapshots (as opposed to diffs) the agents were sent.
    """
    snapshots = sum(a.snapshots for a in fleet.agents)
    connections = sum(a.counter.connections for a in fleet.agents)
    control.stop()
    wanted = set(await create_in_store(reactor, data_path,
                                       [a.uuid for a in fleet.agents[:created]]))
    received = fleet.bytes_received()
    began = time.perf_counter()
    control.start()
    resumed = False
    while time.perf_counter() - began < timeout:
        if all(wanted <= set(a.channel.view.datasets) for a in fleet.agents):
            resumed = await fleet.settled(max(1.0, timeout - (time.perf_counter() - began)))
            break
        await deferLater(reactor, 0.1, lambda: None)
    return {"all_resumed": resumed,
            "all_seconds": round(time.perf_counter() - began, 3) if resumed else None,
            "created_while_down": created,
            "bytes_received_per_agent": round((fleet.bytes_received() - received)
                                              / len(fleet.agents)),
            "snapshots": sum(a.snapshots for a in fleet.agents) - snapshots,
            "reconnects": sum(a.counter.connections for a in fleet.agents) - connections,
            "control": control_memory(control.pid)}


async def preload_api(http, replicas: list[Replica], held: dict[str, list[str]],
                      clients: int = 16) -> None:
    """Create the datasets ``held`` (ids by primary) through the REST API with
    ``clients`` concurrent writers spread over ``replicas`` (a store that is not this
    process's to write)."""
    planned = _numbered(held)

    async def writer(w: int) -> None:
        for n, dataset_id, primary in planned:
            await create_dataset(http, replicas[(w + n) % len(replicas)],
                                 _dataset_body(primary, n, dataset_id))
    await gatherResults([Deferred.fromCoroutine(writer(w)) for w in range(clients)])


async def measure_changes(reactor, fleet: Fleet, http, replicas: list[Replica],
                          changes: int) -> dict:
    """Create ``changes`` datasets one after another, each once the agents settled, and
    time how long each took to reach every agent."""
    latencies, everyone, missed = [], [], 0
    received = fleet.bytes_received()
    for n in range(changes):
        agent = fleet.agents[n % len(fleet.agents)]
        watch = Watch(dataset_id=str(uuid4()), began=time.perf_counter())
        fleet.watch = watch
        await create_dataset(http, replicas[n % len(replicas)],
                             _dataset_body(agent.uuid, 1_000_000 + n, watch.dataset_id))
        if await _with_timeout(reactor, watch.done, CHANGE_TIMEOUT):
            everyone.append(max(watch.seen.values()))
        else:
            missed += 1
        latencies.extend(watch.seen.values())
        fleet.watch = None
        await fleet.settled(CHANGE_TIMEOUT)
    result = {"changes": changes, "changes_missed_by_some_agent": missed,
              "bytes_received_per_change": round((fleet.bytes_received() - received)
                                                 / max(1, changes))}
    if latencies:
        result["per_agent"] = latency_stats(latencies)
    if everyone:
        result["every_agent"] = latency_stats(everyone)
    return result


async def simulate(reactor, options: argparse.Namespace) -> dict:
    """One run of the simulator with ``options`` (see ``parser``); its JSON summary."""
    workdir = Path(options.workdir)
    control = None
    if options.control:
        replicas = [Replica.parse(r) for r in options.control.split(",")]
        certificates = Path(options.certificates)
    else:
        from _harness import make_certificates
        certificates = make_certificates(workdir).path
    began = time.perf_counter()
    nodes = mint_node_credentials(certificates, options.agents)
    certificates_seconds = time.perf_counter() - began
    held = plan_datasets([uuid for uuid, _ in nodes], options.datasets)
    http = ClusterTLS.load(certificates, BENCH_USER).treq_client(reactor)
    if not options.control:
        data_path = workdir / "control"
        await preload_store(reactor, data_path, held)
        # Its log goes to a file: a pipe this busy process drains late would stall it.
        control = ControlProcess(data_path, certificates, host="127.0.0.1",
                                 log_directory=workdir,
                                 extra_arguments=list(options.control_argument or ()))
        control.start()
        replicas = [Replica(control.host, control.port, control.agent_port)]
    else:
        await preload_api(http, replicas, held)
    result = {"agents": options.agents, "datasets": options.datasets,
              "replicas": len(replicas), "store": "external" if options.control else "sqlite",
              "certificates_seconds": round(certificates_seconds, 2)}
    fleet = Fleet(reactor, nodes, [(r.host, r.agent_port) for r in replicas],
                  options.heartbeat)
    cpu_before = None if control is None else process_cpu_seconds(control.pid)
    sharing = Sharing()
    sharing.__enter__()
    events = EventCounts()
    globalLogPublisher.addObserver(events)
    try:
        began = time.perf_counter()
        fleet.start(held)
        synced = await _with_timeout(reactor, fleet.all_synced, options.sync_timeout)
        firsts = [a.first_view - began for a in fleet.agents if a.first_view is not None]
        result["sync"] = {
            "all_synced": synced, "synced_agents": len(firsts),
            "timeout_seconds": options.sync_timeout,
            "all_seconds": round(max(firsts), 3) if synced else None,
            "per_agent": latency_stats(firsts) if firsts else None,
            "reconnects": sum(a.counter.connections for a in fleet.agents) - options.agents,
            "bytes_received_per_agent": round(fleet.bytes_received() / options.agents)}
        if control is not None:
            result["sync"]["control"] = dict(
                control_memory(control.pid),
                cpu_seconds=round(process_cpu_seconds(control.pid) - cpu_before, 2))
        if synced and await fleet.settled(CHANGE_TIMEOUT):
            cpu_before = None if control is None else process_cpu_seconds(control.pid)
            result["change"] = await measure_changes(reactor, fleet, http, replicas,
                                                     options.changes)
            if control is not None:
                result["change"]["control"] = dict(
                    control_memory(control.pid),
                    cpu_seconds_per_change=round((process_cpu_seconds(control.pid)
                                                  - cpu_before)
                                                 / max(1, options.changes), 3))
            result["views_per_replica"] = len(fleet.views()) / len(replicas)
        else:
            result["change"] = None
        if synced and control is not None and options.restart:
            result["restart"] = await restart_control(
                reactor, fleet, control, workdir / "control", options.restart,
                options.sync_timeout)
    finally:
        result["agent_events"] = dict(events.counts.most_common(12))
        globalLogPublisher.removeObserver(events)
        await fleet.stop()
        sharing.__exit__(None, None, None)
        if control is not None:
            control.stop()
    result["simulator_cpu_seconds"] = round(own_cpu_seconds(), 1)
    return result


def parser() -> argparse.ArgumentParser:
    """The command line of ``bench/simulator.py``."""
    p = argparse.ArgumentParser(
        prog="bench/simulator.py",
        description="Simulate N agents in one process (the real agent channel over real "
                    "TLS) against pyflock-control; print a JSON summary.")
    p.add_argument("--agents", type=_positive, default=500, help="simulated agents (500)")
    p.add_argument("--datasets", type=_count, default=1000,
                   help="datasets in the configuration before the agents connect (1000)")
    p.add_argument("--changes", type=_count, default=20,
                   help="dataset creates to time, one after another (20)")
    p.add_argument("--sync-timeout", type=float, default=120.0,
                   help="seconds every agent may take to have its first snapshot (120); "
                        "past it the run reports how many had one and times no changes")
    p.add_argument("--heartbeat", type=float, default=5.0,
                   help="seconds between an agent's heartbeats (5, as real agents)")
    p.add_argument("--control", default=None, metavar="HOST:API_PORT:AGENT_PORT,...",
                   help="running control services to use (agents spread round-robin); "
                        "default: start one on SQLite")
    p.add_argument("--certificates", default=None, metavar="DIR",
                   help="with --control: the folder with the cluster's cluster.crt/.key "
                        f"and the API user's {BENCH_USER}.crt/.key")
    p.add_argument("--control-argument", action="append", metavar="ARG",
                   help="an argument for the pyflock-control started here (repeat for "
                        "more), e.g. --control-argument=--agent-admission-rate=0")
    p.add_argument("--restart", type=_count, default=0, metavar="CREATED",
                   help="then restart the control service (started here), creating this "
                        "many datasets in its store while it is down, and time the agents "
                        "resuming (0: no restart)")
    p.add_argument("--workdir", default=None,
                   help="scratch folder (default: a new temporary one, removed after)")
    return p


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number such as 500")
    return int(text)


def main(argv=None) -> None:
    """Run the simulator from the command line and print its JSON summary."""
    import shutil
    import tempfile
    from twisted.internet.task import react
    options = parser().parse_args(argv)
    if options.control:
        if not options.certificates:
            parser().error("--control needs --certificates DIR (the cluster CA and "
                           f"{BENCH_USER}.crt/.key)")
        try:
            for replica in options.control.split(","):
                Replica.parse(replica)
        except ValueError as e:
            parser().error(f"--control: {e}")
        missing = [name for name in ("cluster.crt", "cluster.key", f"{BENCH_USER}.crt",
                                     f"{BENCH_USER}.key")
                   if not (Path(options.certificates) / name).is_file()]
        if missing:
            parser().error(f"--certificates {options.certificates}: no {', '.join(missing)}"
                           f" there; give the folder of the cluster's CA (pyflock-ca "
                           f"initialize) holding an API certificate for user {BENCH_USER}")
    owned = options.workdir is None
    if owned:
        options.workdir = tempfile.mkdtemp(prefix="pyflock-sim-")

    async def run(reactor):
        try:
            print(json.dumps(await simulate(reactor, options), indent=2), flush=True)
        finally:
            if owned:
                shutil.rmtree(options.workdir, ignore_errors=True)
    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
