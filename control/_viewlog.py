"""
The agent channel's recent history (issue 12): the diffs pushed in the current epoch, as
encoded once for every agent, and one encoding of a snapshot in pages, so that a thousand
agents connecting together cost the control service one encoding, not one each.

An agent that needs the whole view gets the shared snapshot of version S followed by the
diffs from S on (an agent applies a snapshot, then each diff that follows it); the snapshot
is encoded again only once the diffs since it outweigh ``rebuild_fraction`` of it, so its
cost is spread over the changes that made it old. An agent that reconnects with a view of
this epoch whose diffs are all still here gets those diffs and nothing else (a network
blip, a silent control service, a storm of reconnects). The history keeps at most
``budget`` bytes of diffs; older ones are forgotten, oldest first.

No IO and no clock: the server hands in what it pushed and asks what to send.

Across a restart of the control service (issue 12 point 3) the view goes on: on stopping,
the server writes its view and these diffs to a checkpoint (``checkpoint_bytes``), and the
next run reads it back once (``read_checkpoint``), keeps its epoch and version, and pushes
what changed in the store meanwhile as the next diff; agents that reconnect with a version
of that epoch get the diffs since it, not a snapshot. A checkpoint is consumed when read:
a run that ends without writing one (a crash) leaves the next run a new epoch.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections import deque
from contextlib import contextmanager
from typing import Callable, Hashable, Iterable, Iterator, Optional

from pyflock.common._wire import (
    COMPRESSED_FRAMES, PAGED_SNAPSHOTS, PROTOCOL_VERSION, BadMessage, Diff, Snapshot,
    ViewVersion, compress, decode, encode, frame, join_pages, snapshot_pages,
)
from pyflock.common._wire import (  # issue 9
    SHARED_REVISIONS, Heartbeat, StoreRevision, Welcome,
)
from pyflock.common._logging import log_event
from pyflock.control._etcd_model import store_revision
from twisted.logger import Logger

_log = Logger()

#: Bytes of encoded diffs the history keeps (about 100,000 small diffs).
DEFAULT_HISTORY_BUDGET = 16 * 1024 * 1024

#: The snapshot is encoded again once the diffs since it reach this fraction of its size.
DEFAULT_REBUILD_FRACTION = 0.5

#: Snapshots streamed at once: enough to keep the link busy, few enough that each agent
#: gets its pages well within its silence timeout however many wait.
DEFAULT_SNAPSHOT_WIDTH = 16


class ViewLog:
    """The encoded diffs of one epoch since some version, and one encoded snapshot."""

    def __init__(self, budget: int = DEFAULT_HISTORY_BUDGET,
                 rebuild_fraction: float = DEFAULT_REBUILD_FRACTION):
        self.budget = budget
        self.rebuild_fraction = rebuild_fraction
        # (version, payload) of consecutive versions, oldest first
        self._diffs: deque[tuple[int, bytes]] = deque()
        self._bytes = 0
        # (version, page size, pages, their size in bytes), or None
        self._snapshot: Optional[tuple[int, int, list[bytes], int]] = None
        # the same pages compressed (protocol 3), made when first asked for
        self._compressed: Optional[list[bytes]] = None
        #: How many times a snapshot was encoded (for tests and logs).
        self.encodings = 0

    def reset(self) -> None:
        """A new epoch (or a change no diff carries): forget the history and the snapshot."""
        self._diffs.clear()
        self._bytes = 0
        self.forget_snapshot()

    def forget_snapshot(self) -> None:
        """The view changed in a way diffs do not carry (a forgotten node): encode anew."""
        self._snapshot = self._compressed = None

    def record(self, version: int, payload: bytes) -> None:
        """The diff to ``version`` (encoded as ``payload``) was pushed to every agent."""
        if self._diffs and self._diffs[-1][0] != version - 1:
            self._diffs.clear()
            self._bytes = 0
        self._diffs.append((version, payload))
        self._bytes += len(payload)
        while self._bytes > self.budget and len(self._diffs) > 1:
            _, old = self._diffs.popleft()
            self._bytes -= len(old)

    def kept(self) -> list[tuple[int, bytes]]:
        """The (version, payload) of the diffs kept, oldest first."""
        return list(self._diffs)

    def since(self, version: int, current: int) -> Optional[list[bytes]]:
        """The diffs from ``version`` to ``current``, or None if some are forgotten."""
        if version == current:
            return []
        if not self._diffs or version > current or version < self._diffs[0][0] - 1 \
                or self._diffs[-1][0] != current:
            return None
        start = version - self._diffs[0][0] + 1
        return [payload for _, payload in list(self._diffs)[start:]]

    def catch_up(self, version: int, current: int, limit: int) -> Optional[list[bytes]]:
        """The diffs from ``version`` to ``current`` if they are all here and weigh at most
        ``limit`` bytes (else a snapshot is cheaper for the agent); otherwise None."""
        diffs = self.since(version, current)
        if diffs is None or sum(len(p) for p in diffs) > limit:
            return None
        return diffs

    def snapshot(self, current: int, make: Callable[[], Snapshot],
                 page_size: int, compressed: bool = False) -> list[bytes]:
        """
        What brings an agent to view ``current`` from nothing: the shared snapshot's pages
        (of about ``page_size`` bytes; ``compressed``, for protocol 3) and the diffs since
        it, or the pages of a new snapshot (``make()``, the view now, of version
        ``current``) once those diffs outweigh ``rebuild_fraction`` of it.
        """
        diffs = None
        if self._snapshot is not None and self._snapshot[1] == page_size:
            version, _, pages, size = self._snapshot
            diffs = self.catch_up(version, current, int(size * self.rebuild_fraction))
        if diffs is None:
            pages = snapshot_pages(make(), page_size)
            self.encodings += 1
            self._snapshot = (current, page_size, pages, sum(len(p) for p in pages))
            self._compressed = None
            diffs = []
        if compressed:
            if self._compressed is None:
                self._compressed = [compress(page) for page in self._snapshot[2]]
            return self._compressed + diffs
        return self._snapshot[2] + diffs

    @property
    def snapshot_size(self) -> int:
        """Bytes of the shared snapshot (0 before one is encoded)."""
        return 0 if self._snapshot is None else self._snapshot[3]


class Turns:
    """
    At most ``width`` snapshots stream at once; the agents that need one meanwhile wait
    their turn, first come first served, and keep getting heartbeats (not their pages,
    which would starve every stream: a thousand snapshots at once leave each agent so
    little of the link that a page takes longer than the agent waits for a word).
    """

    def __init__(self, width: int = DEFAULT_SNAPSHOT_WIDTH):
        self.width = width
        self._streaming: set = set()
        # key -> start(), in order of request
        self._waiting: dict[Hashable, Callable[[], None]] = {}

    def request(self, key: Hashable, start: Callable[[], None]) -> None:
        """``start()`` once ``key`` has a turn (now if one is free); nothing if ``key``
        has one or waits for one already."""
        if key in self._streaming or key in self._waiting:
            return
        self._waiting[key] = start
        self._next()

    def has(self, key: Hashable) -> bool:
        """Whether ``key`` streams or waits to."""
        return key in self._streaming or key in self._waiting

    def queued(self, key: Hashable) -> bool:
        """Whether ``key`` waits for a turn (its stream, once started, brings it to the
        view then current: what is pushed meanwhile need not be sent to it)."""
        return key in self._waiting

    def done(self, key: Hashable) -> None:
        """``key``'s snapshot is sent, or it is gone: the next in line starts."""
        self._waiting.pop(key, None)
        if key in self._streaming:
            self._streaming.discard(key)
            self._next()

    def stream(self, key: Hashable, payloads: Iterable[bytes]) -> Iterator[bytes]:
        """``payloads``, then ``key``'s turn is over (also if the stream is dropped)."""
        try:
            yield from payloads
        finally:
            self.done(key)

    def _next(self) -> None:
        while self._waiting and len(self._streaming) < self.width:
            key = next(iter(self._waiting))
            start = self._waiting.pop(key)
            self._streaming.add(key)
            start()

    @property
    def waiting(self) -> int:
        """How many wait for a turn."""
        return len(self._waiting)


class Catchup:
    """
    What brings the agents of ``server`` (an ``AgentChannelServer``; protocol 3 on) to its
    current view: the shared snapshot and the diffs since it, in turns, or, for an agent
    with a view of this run, the diffs it missed.
    """

    def __init__(self, server):
        self._server = server
        self.history = ViewLog()
        self.turns = Turns()

    def snapshot(self, connection) -> None:
        """Send ``connection`` the whole view once it has a turn (the pages then current)."""
        self.turns.request(connection, lambda: self._stream(connection))

    def _stream(self, connection) -> None:
        if connection.closing:
            self.turns.done(connection)
            return
        server = self._server
        pages = self.history.snapshot(server.version, server.snapshot, server.page_size,
                                      connection.protocol_version >= COMPRESSED_FRAMES)
        connection.send_stream(self.turns.stream(connection, pages))

    def resume(self, connection, known: Optional[ViewVersion]) -> bool:
        """Send an agent whose view (``known``) is of this run the diffs since its
        version, if they are all here and lighter than a snapshot; whether it did."""
        server = self._server
        if known is None or known.epoch != server.epoch \
                or connection.protocol_version < PAGED_SNAPSHOTS:
            return False
        diffs = self.history.catch_up(known.version, server.version,
                                      self.history.snapshot_size or self.history.budget)
        if diffs is None:
            return False
        connection.send_stream(diffs)
        return True


#: A stamp for a change this replica made alone (an agent of its own said hello, reported
#: or went silent) until the store has it: newer than any revision, so sent on every resume.
UNPUBLISHED = 1 << 62

#: Datasets removed from the view whose removal ``Stamps`` remembers; past it, resuming
#: from before the oldest one forgotten gets a snapshot.
DEFAULT_REMOVALS_KEPT = 100_000


class Stamps:
    """
    Issue 9 point 5, on a shared store: the store revision at which each dataset and node
    of this replica's view last changed (pure). A change coming from the store (the
    configuration the replica follows, another replica's report, a death mark) is stamped
    with a revision the store had when the replica applied it, never older than the
    change; a change this replica made alone is ``UNPUBLISHED`` until ``published`` (its
    report written to the store by then). An agent whose view, from any replica of the
    store, reflects every change up to revision R needs only the entries stamped after R:
    every other entry is the same in both views. ``since``: the oldest R it can answer
    for (the view it started from, the removals it forgot).
    """

    def __init__(self, since: int, removals_kept: int = DEFAULT_REMOVALS_KEPT):
        self.since = since
        self.removals_kept = removals_kept
        self._datasets: dict[str, int] = {}
        self._nodes: dict[str, int] = {}
        # removed dataset id -> stamp, oldest first
        self._removed: dict[str, int] = {}
        self._unpublished: set[tuple[str, str]] = set()
        #: The stamp of the changes being applied (None: this replica's own).
        self.origin: Optional[int] = None

    def record(self, datasets: Iterable[str], removed: Iterable[str],
               nodes: Iterable[str]) -> None:
        """The view's entries of these datasets and nodes changed, and ``removed`` left."""
        stamp = UNPUBLISHED if self.origin is None else self.origin
        for kind, table, keys in (("d", self._datasets, datasets),
                                  ("n", self._nodes, nodes)):
            for key in keys:
                table[key] = stamp
                if stamp == UNPUBLISHED:
                    self._unpublished.add((kind, key))
        for key in removed:
            self._datasets.pop(key, None)
            self._removed.pop(key, None)
            self._removed[key] = stamp
            if stamp == UNPUBLISHED:
                self._unpublished.add(("r", key))
        while len(self._removed) > self.removals_kept:
            key = next(iter(self._removed))
            self.since = max(self.since, self._removed.pop(key))
            self._unpublished.discard(("r", key))

    def published(self, revision: int) -> None:
        """Everything this replica changed alone so far is in the store by ``revision``."""
        tables = {"d": self._datasets, "n": self._nodes, "r": self._removed}
        for kind, key in self._unpublished:
            if key in tables[kind]:
                tables[kind][key] = revision
        self._unpublished.clear()

    def changed_since(self, revision: int) -> Optional[tuple[list, list, list]]:
        """The (dataset ids, removed dataset ids, node uuids) stamped after ``revision``,
        or None if it is older than ``since``."""
        if revision < self.since:
            return None
        return tuple([k for k, at in table.items() if at > revision]
                     for table in (self._datasets, self._removed, self._nodes))


class StoreResume:
    """
    Issue 9 point 5 and issue 12 point 3: agents moving between replicas of a shared store
    (etcd; ``reports``, the server's ``SharedReports``) resume with a diff. The server's
    view versions are its own (``epoch``), but each reflects every change the store made
    up to some store revision, the same line on every replica (``point``: the revision the
    configuration pushed was read at, or the reports watched, whichever is older). Agents
    of protocol 4 are told it (welcome, heartbeats) and say it in their hello; a replica
    that has followed the store since then (``Stamps``) sends the entries changed after
    it as one diff based on the agent's view. Inert on a store of one service (SQLite).
    """

    def __init__(self, server, reports):
        self._server = server
        self._reports = reports
        self.stamps: Optional[Stamps] = None
        # the store revision of the configuration last pushed to agents
        self._pushed = 0

    def start(self) -> None:
        """The server's view is built from the committed configuration: stamp from now."""
        configuration = self._server.configuration
        if self._reports is None or not getattr(configuration, "store_id", ""):
            return
        self._pushed = configuration.revision
        self.stamps = Stamps(since=self._pushed)
        self._reports.on_published = lambda revision: self.stamps.published(
            store_revision(revision))

    @contextmanager
    def origin(self, revision: Optional[int] = None):
        """Changes made meanwhile come from the store: from the configuration (``revision``
        None: the configuration now) or, given an etcd revision, from the reports."""
        if self.stamps is None:
            yield
            return
        if revision is None:
            self._pushed = stamp = self._server.configuration.revision
        else:
            stamp = store_revision(revision)
        self.stamps.origin = stamp
        try:
            yield
        finally:
            self.stamps.origin = None

    def record(self, diff: Diff) -> None:
        """``diff`` was pushed: stamp what it changed."""
        if self.stamps is not None:
            self.stamps.record((d.dataset_id for d in diff.datasets), diff.removed,
                               (n.uuid for n in diff.nodes))

    def from_store(self, push: Callable) -> Callable:
        """``push(config, touched)`` stamping what it changes as the configuration's."""
        def pushed(*args) -> None:
            with self.origin():
                push(*args)
        return pushed

    def point(self, connection=None) -> Optional[StoreRevision]:
        """The store revision the view now reflects entirely (None: unknown, or
        ``connection`` does not speak protocol 4)."""
        loaded = getattr(self._reports, "loaded", 0)
        if self.stamps is None or not loaded or (
                connection is not None and connection.protocol_version < SHARED_REVISIONS):
            return None
        return StoreRevision(store=self._server.configuration.store_id, revision=min(
            self._pushed, store_revision(self._reports.watched)))

    def welcome(self, connection) -> Welcome:
        """The welcome of ``connection`` (protocol settled), with the resume point."""
        server = self._server
        return Welcome(epoch=server.epoch, version=server.version,
                       protocol=connection.protocol_version,
                       store_revision=self.point(connection))

    def heartbeats(self, connections: Iterable) -> None:
        """Send ``connections`` a heartbeat, with the resume point to those of protocol 4."""
        framed = frame(encode(Heartbeat(view=self._server.current)))
        point = self.point()
        shared = framed if point is None else frame(encode(Heartbeat(
            view=self._server.current, store_revision=point)))
        for connection in connections:  # framed once for all (issue 12)
            connection.send_frame(framed if (connection.protocol_version or 0)
                                  < SHARED_REVISIONS else shared)

    def resume(self, connection, hello) -> bool:
        """Send an agent whose view comes from another replica of this store the entries
        changed since its resume point as one diff, if this replica can tell and the diff
        fits a page; whether it did."""
        point, here = hello.resume, self.point()
        if point is None or here is None or hello.known is None \
                or connection.protocol_version < SHARED_REVISIONS \
                or point.store != here.store or point.revision > here.revision:
            if point is not None:
                log_event(_log, "pyflock:control:resume-refused", point=str(point),
                          here=str(here), known=str(hello.known))
            return False
        self.stamps.since = max(self.stamps.since, store_revision(self._reports.loaded))
        changed = self.stamps.changed_since(point.revision)
        if changed is None:
            log_event(_log, "pyflock:control:resume-too-old", revision=point.revision,
                      since=self.stamps.since)
            return False
        server = self._server
        datasets, removed, nodes = changed
        diff = Diff(epoch=server.epoch, version=server.version, base=hello.known,
                    datasets=tuple(server._datasets[i] for i in datasets
                                   if i in server._datasets),
                    removed=tuple(removed),
                    nodes=tuple(server._nodes[u] for u in nodes if u in server._nodes))
        payload = encode(diff)
        if len(payload) > server.page_size:
            return False
        connection.send_payload(payload)
        return True


#: Hellos admitted a second on average (issue 12 point 3); 0: no limit, the default. A
#: waiting agent is sent nothing (not even heartbeats), and a thousand agents resuming
#: after a restart were all served in 8.4 s with no limit against 30 s at 200 a second
#: (bench/simulator.py --restart, one run each, load 5): resuming is cheap, and the
#: snapshots, which are not, already stream a few at a time (``Turns``).
DEFAULT_ADMISSION_RATE = 0.0

#: Hellos admitted at once before the rate applies.
DEFAULT_ADMISSION_BURST = 100


class TokenBucket:
    """``rate`` admissions a second on average and ``burst`` at once (pure: the caller
    says what time it is)."""

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at: Optional[float] = None

    def take(self, now: float) -> float:
        """Take one admission at ``now`` (0.0), or the seconds until one is free (and
        take nothing)."""
        if self._at is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


class Admissions:
    """
    Connections admitted at a bounded rate (``TokenBucket``), first come first served;
    the others wait, in order, on ``reactor``. ``rate`` None or 0: all at once.
    """

    def __init__(self, reactor, rate: Optional[float] = DEFAULT_ADMISSION_RATE,
                 burst: int = DEFAULT_ADMISSION_BURST):
        self._reactor = reactor
        self.bucket = TokenBucket(rate, burst) if rate else None
        # key -> admit(), in order of request
        self._waiting: dict[Hashable, Callable[[], None]] = {}
        self._call = None

    def request(self, key: Hashable, admit: Callable[[], None]) -> None:
        """``admit()`` once ``key``'s turn comes (now if the rate allows)."""
        if self.bucket is None:
            admit()
            return
        self._waiting[key] = admit
        if self._call is None:
            self._drain()

    def cancel(self, key: Hashable) -> None:
        """``key`` is gone: it no longer waits."""
        self._waiting.pop(key, None)

    def stop(self) -> None:
        """Admit no more; forget who waits."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._waiting.clear()

    def _drain(self) -> None:
        self._call = None
        while self._waiting:
            delay = self.bucket.take(self._reactor.seconds())
            if delay > 0:
                self._call = self._reactor.callLater(delay, self._drain)
                return
            key = next(iter(self._waiting))
            self._waiting.pop(key)()

    @property
    def waiting(self) -> int:
        """How many wait to be admitted."""
        return len(self._waiting)


#: The checkpoint's layout (its header's ``format``).
CHECKPOINT_FORMAT = 1

_LENGTH = struct.Struct("!I")


class CheckpointInvalid(Exception):
    """A checkpoint that cannot be read back: the next run starts a new epoch."""


def checkpoint_bytes(view: Snapshot, diffs: list[tuple[int, bytes]]) -> bytes:
    """
    The checkpoint of ``view`` with the diffs that led to it (``ViewLog.kept()``, the last
    of ``view.version``): zlib of length-prefixed frames, a JSON header, the view's
    snapshot pages and the diffs' payloads as agents were sent them.
    """
    pages = snapshot_pages(view)
    header = json.dumps({"format": CHECKPOINT_FORMAT, "pages": len(pages),
                         "diffs": [v for v, _ in diffs]}).encode()
    body = b"".join(frame(part) for part in [header, *pages, *(p for _, p in diffs)])
    return zlib.compress(body, 1)


def read_checkpoint(data: bytes) -> tuple[Snapshot, list[tuple[int, bytes]]]:
    """The view and diffs of ``checkpoint_bytes``; ``CheckpointInvalid`` saying why not."""
    try:
        body = zlib.decompress(data)
        parts, offset = [], 0
        while offset < len(body):
            [length] = _LENGTH.unpack_from(body, offset)
            offset += _LENGTH.size
            parts.append(body[offset:offset + length])
            offset += length
        header = json.loads(parts[0])
        if header.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointInvalid(f"format {header.get('format')!r}, not "
                                    f"{CHECKPOINT_FORMAT}")
        count, versions = header["pages"], header["diffs"]
        pages = [decode(p, PROTOCOL_VERSION) for p in parts[1:1 + count]]
        view = join_pages(pages)
        payloads = parts[1 + count:]
        if len(payloads) != len(versions) or not all(
                isinstance(decode(p, PROTOCOL_VERSION), Diff) for p in payloads):
            raise CheckpointInvalid("its diffs do not match its header")
        if versions and (versions[-1] != view.version or versions != list(
                range(versions[0], versions[0] + len(versions)))):
            raise CheckpointInvalid("its diffs do not lead to its view")
        return view, list(zip(versions, payloads))
    except CheckpointInvalid:
        raise
    except (zlib.error, struct.error, ValueError, KeyError, TypeError, IndexError,
            AttributeError, BadMessage) as e:
        raise CheckpointInvalid(f"{type(e).__name__}: {e}") from None


__all__ = ["Admissions", "CHECKPOINT_FORMAT", "Catchup", "DEFAULT_ADMISSION_BURST",
           "DEFAULT_ADMISSION_RATE", "TokenBucket", "CheckpointInvalid", "checkpoint_bytes",
           "read_checkpoint", "DEFAULT_HISTORY_BUDGET", "DEFAULT_REBUILD_FRACTION", "DEFAULT_SNAPSHOT_WIDTH",
           "Turns", "ViewLog",
           "Stamps", "StoreResume", "UNPUBLISHED"]
