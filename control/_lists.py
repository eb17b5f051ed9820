"""
The bodies of the REST API's large lists (``GET /v1/configuration/datasets`` and
``GET /v1/state/datasets``): each built once per generation of what it lists, off the
reactor thread, and shared by every request of that generation; a gzip copy made once,
for the first request that accepts gzip; and written to each client in chunks, as fast
as that client reads, so that a slow client holds no copy of its own.
"""

from __future__ import annotations

import struct
import threading
import zlib
from typing import Callable, Hashable, Iterable, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from pyflock.common._records import dataset_to_json, report_to_api_json
from pyflock.common._threads import RunBlocking, run_now
from pyflock.control._api_base import _encode

#: The zlib level of the gzip copies: measured in bench/control_api.py (docs/benchmarks.md);
#: a copy is made once per generation, by the first reader who accepts gzip, who waits
#: for it, so a fast level.
GZIP_LEVEL = 1

#: Bytes written to a connection at a time; the connection asks for more when it has
#: sent them (a TLS record is 16 KiB). A body is cut into chunks once per generation,
#: not per request (at 18 MB, slicing it again for every request cost a tenth of the
#: service's CPU per list).
CHUNK = 256 * 1024

_log = Logger()

def _codings(header: bytes) -> dict[str, float]:
    """The q-value of each coding an ``Accept-Encoding`` header names (lower case);
    an element whose q-value is not a number from 0 to 1 is left out."""
    weights: dict[str, float] = {}
    for element in header.decode("latin-1").split(","):
        coding, *params = [part.strip() for part in element.split(";")]
        if not coding:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = -1.0
        if 0.0 <= q <= 1.0:
            weights[coding.lower()] = q
    return weights


def accepts_gzip(header: Optional[bytes]) -> bool:
    """
    Whether a request with this ``Accept-Encoding`` header (None: none) gets gzip: when
    gzip (or x-gzip, or else ``*``) has a q-value above 0, at least that of ``identity``
    if the client names identity; no header, or ``gzip;q=0``, gets the plain body.
    """
    if header is None:
        return False
    weights = _codings(header)
    gzip = weights.get("gzip", weights.get("x-gzip", weights.get("*", 0.0)))
    return gzip > 0.0 and gzip >= weights.get("identity", 0.0)


#: A list is kept in this many segments (by a hash of each item's key), compressed
#: separately, so that a change recompresses only its segment (+4% size for 100,000
#: datasets).
SEGMENTS = 64

#: gzip's header (no name, no time, unknown OS) and the last, empty deflate block.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_FINAL_BLOCK = b"\x03\x00"


def _deflate(piece: bytes, level: int) -> bytes:
    """``piece`` as raw deflate blocks ending on a byte boundary, referring to nothing
    before it: such pieces join into one deflate stream."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    return compressor.compress(piece) + compressor.flush(zlib.Z_SYNC_FLUSH)


def chunked(pieces: list[bytes], size: int = CHUNK) -> tuple[bytes, ...]:
    """The join of ``pieces`` cut into chunks of ``size`` bytes (the last one shorter)."""
    whole = b"".join(pieces)
    if len(whole) <= size:
        return (whole,)
    return tuple(whole[offset:offset + size] for offset in range(0, len(whole), size))


def gzip_pieces(pieces: list[bytes], previous: dict, level: int = GZIP_LEVEL
                ) -> tuple[bytes, dict]:
    """
    The gzip of the concatenation of ``pieces``, compressing only the pieces that
    ``previous`` (piece -> deflate) lacks; and that mapping for these pieces. zlib
    releases the GIL while it compresses.
    """
    compressed = {}
    crc, size = 0, 0
    for piece in pieces:
        deflated = previous.get(piece)
        compressed[piece] = _deflate(piece, level) if deflated is None else deflated
        crc = zlib.crc32(piece, crc)
        size += len(piece)
    trailer = struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)
    return (_GZIP_HEADER + b"".join(compressed[p] for p in pieces) + _FINAL_BLOCK
            + trailer), compressed


class Segments:
    """
    A list's items, each encoded once, grouped in ``SEGMENTS`` segments by a hash of its
    key: rebuilt from every item (``rebuild``), or from the changed keys only
    (``update``); ``pieces()`` joins them, reusing each unchanged segment's bytes. Used
    by one build at a time.
    """

    def __init__(self, to_json: Callable[[object], object]):
        self._to_json = to_json
        self._segments: list[dict] = [{} for _ in range(SEGMENTS)]
        self._joined: list[Optional[bytes]] = [b""] * SEGMENTS

    def _encoded(self, segment: dict, key: Hashable, item) -> tuple:
        cached = segment.get(key)
        if cached is None or cached[0] is not item:
            cached = (item, _encode(self._to_json(item)))
        return cached

    def rebuild(self, items: Iterable[tuple[Hashable, object]]) -> list[bytes]:
        """The pieces of ``items``, reusing the encoding of every item that is the very
        same object as before."""
        segments: list[dict] = [{} for _ in range(SEGMENTS)]
        for key, item in items:
            index = hash(key) % SEGMENTS
            segments[index][key] = self._encoded(self._segments[index], key, item)
        self._segments, self._joined = segments, [None] * SEGMENTS
        return self.pieces()

    def update(self, changes: Iterable[tuple[Hashable, object]]) -> list[bytes]:
        """The pieces after ``changes``: (key, item), an item of None removing the key."""
        for key, item in changes:
            index = hash(key) % SEGMENTS
            segment = self._segments[index]
            if item is None:
                segment.pop(key, None)
            else:
                segment[key] = self._encoded(segment, key, item)
            self._joined[index] = None
        return self.pieces()

    def pieces(self) -> list[bytes]:
        """``[``, the non-empty segments between commas, ``]``: joined, the JSON array."""
        pieces = [b"["]
        for index, segment in enumerate(self._segments):
            if self._joined[index] is None:
                self._joined[index] = b",".join(e for _, e in segment.values())
            if segment:
                if len(pieces) > 1:
                    pieces.append(b",")
                pieces.append(self._joined[index])
        pieces.append(b"]")
        return pieces


class ChangeLog:
    """
    The keys each change touched, numbered from 1 (``count`` is the last number): the
    reactor ``record``s them, as a subscriber of the configuration; a build in a thread
    asks ``between`` two numbers. Entries a build has passed are dropped, and the oldest
    once there are more than ``limit`` (a build from before them starts afresh).
    """

    def __init__(self, limit: int = 10_000):
        self.count = 0
        self._limit = limit
        self._first = 1
        self._entries: list[Optional[tuple]] = []
        self._lock = threading.Lock()

    def record(self, _config, keys: Optional[Iterable[Hashable]]) -> None:
        """Note a change touching ``keys`` (None: anything)."""
        with self._lock:
            self._entries.append(None if keys is None else tuple(keys))
            self.count += 1
            if len(self._entries) > self._limit:
                self._drop(self.count - self._limit // 2)

    def _drop(self, upto: int) -> None:
        """Forget the changes up to ``upto``."""
        del self._entries[:max(0, upto + 1 - self._first)]
        self._first = max(self._first, upto + 1)

    def between(self, base: int, upto: int) -> Optional[set]:
        """The keys touched by changes ``base`` + 1 .. ``upto``, or None if one of them
        may have touched anything (or was dropped); forgets changes up to ``upto``."""
        with self._lock:
            if base + 1 < self._first or upto < base:
                return None
            keys: Optional[set] = set()
            for number in range(base + 1, upto + 1):
                touched = self._entries[number - self._first]
                if touched is None:
                    keys = None
                    break
                keys.update(touched)
            self._drop(upto)
            return keys


def encode_items(items: Iterable[tuple[Hashable, object]], previous: Optional[Segments],
                 to_json: Callable[[object], object]) -> tuple[Segments, list[bytes]]:
    """The JSON array of ``to_json(item)`` for each ``(key, item)`` as pieces to join, and
    the ``Segments`` holding them, reusing ``previous`` (of the last build, if any)."""
    segments = previous if previous is not None else Segments(to_json)
    return segments, segments.rebuild(items)


def _same_key(a: tuple, b: tuple) -> bool:
    """Keys match when each part is the very same object, or an equal plain value (so a
    configuration is never compared dataset by dataset)."""
    return len(a) == len(b) and all(
        x is y or (isinstance(x, (int, str, frozenset)) and x == y) for x, y in zip(a, b))


class _Shared:
    """One result computed once, off the reactor, for every Deferred asked of it."""

    def __init__(self):
        self.result: Optional[object] = None
        self._waiting: Optional[list[Deferred]] = None

    def get(self, run: RunBlocking, f, *args) -> Deferred:
        """A Deferred of ``f(*args)``, run by ``run`` only for the first caller."""
        if self.result is not None:
            return succeed(self.result)
        d: Deferred = Deferred()
        first = self._waiting is None
        if first:
            self._waiting = []
        self._waiting.append(d)
        if first:
            run(f, *args).addBoth(self._done)
        return d

    def _done(self, result) -> None:
        waiting, self._waiting = self._waiting or [], None
        if not isinstance(result, Failure):
            self.result = result
        for d in waiting:
            d.callback(result) if not isinstance(result, Failure) else d.errback(result)


class ListBody:
    """One generation of a list: its JSON bytes (the join of ``pieces``) as ``chunks``
    ready to write and, once asked for, their gzip, reusing the compressed pieces of
    ``reuse`` (piece -> deflate) that are unchanged."""

    def __init__(self, pieces: list[bytes], reuse: Optional[dict] = None):
        self.pieces = pieces
        self.chunks = chunked(pieces)
        self._reuse = reuse or {}
        #: The deflate of each piece, once the gzip is made (for the next generation's).
        self.compressed: Optional[dict] = None
        self._gzip = _Shared()

    @property
    def raw(self) -> bytes:
        """The whole JSON body (a new join of the chunks: for tests)."""
        return b"".join(self.chunks)

    def reusable(self) -> dict:
        """The compressed pieces the next generation's gzip may reuse."""
        return self.compressed if self.compressed is not None else self._reuse

    def gzipped(self, run: RunBlocking) -> Deferred:
        """A Deferred of the gzip of ``raw`` as chunks, compressed (by ``run``) for the
        first caller only."""
        return self._gzip.get(run, self._make_gzip)

    def _make_gzip(self) -> tuple[bytes, ...]:
        data, self.compressed = gzip_pieces(self.pieces, self._reuse)
        self._reuse = {}
        return chunked([data])


class ListCache:
    """
    The body of one list, built by ``build(inputs, previous) -> (state, pieces)`` (see
    ``encode_items``; ``previous`` is the state the last build returned, None at first
    or after a failed build) run by ``run``
    (a thread in the service). ``body(key, inputs, tag)`` answers a Deferred of
    ``(ListBody, tag)``: at once if the body of ``key`` is built; else every request
    waits for the one build of its key. One build runs at a time; requests for a newer
    key meanwhile share the next build, of the newest key asked for (never an older
    body: a client that just wrote reads its write).
    """

    def __init__(self, build: Callable[[object, object], tuple[object, list[bytes]]],
                 run: RunBlocking = run_now):
        self._build = build
        self._run = run
        self._encoded = None
        self._ready: Optional[tuple[tuple, ListBody, object]] = None
        self._building: Optional[tuple[tuple, object, list[Deferred]]] = None
        self._next: Optional[tuple[tuple, object, object, list[Deferred]]] = None
        #: How many bodies were built (for tests and the benchmark's report).
        self.builds = 0

    def body(self, key: tuple, inputs, tag=None) -> Deferred:
        """A Deferred of ``(ListBody, tag)`` for ``key``, built from ``inputs`` if needed."""
        if self._ready is not None and _same_key(self._ready[0], key):
            return succeed(self._ready[1:])
        d: Deferred = Deferred()
        if self._building is not None and _same_key(self._building[0], key):
            self._building[2].append(d)
        elif self._building is not None:
            waiting = self._next[3] if self._next is not None else []
            waiting.append(d)
            self._next = (key, inputs, tag, waiting)
        else:
            self._start(key, inputs, tag, [d])
        return d

    def _start(self, key: tuple, inputs, tag, waiting: list[Deferred]) -> None:
        self._building = (key, tag, waiting)
        self.builds += 1
        self._run(self._build, inputs, self._encoded).addBoth(self._built)

    def _built(self, result) -> None:
        key, tag, waiting = self._building
        self._building = None
        if isinstance(result, Failure):
            _log.failure("Building a list failed", result)
            self._encoded = None
            answer = result
        else:
            self._encoded, pieces = result
            ready = self._ready
            # An unchanged body (a state change the list does not show) keeps its gzip.
            if ready is not None and ready[1].pieces == pieces:
                body = ready[1]
            else:
                body = ListBody(pieces, ready[1].reusable() if ready is not None else None)
            self._ready = (key, body, tag)
            answer = (body, tag)
        if self._next is not None:
            following, self._next = self._next, None
            self._start(*following)
        for d in waiting:
            d.errback(answer) if isinstance(answer, Failure) else d.callback(answer)


class DatasetList:
    """
    Builds the body of ``GET /v1/configuration/datasets`` from ``(configuration, cluster
    state, its version, change number)``: after a change of the configuration alone, only
    the datasets it touched are visited again. Deleted datasets whose data goes are
    listed while a node still holds them.
    """

    def __init__(self, configuration):
        self.changes = ChangeLog()
        configuration.subscribe(self.changes.record)
        self._segments = Segments(dataset_to_json)
        self._base: Optional[tuple[int, int]] = None

    def build(self, inputs, previous) -> tuple[Segments, list[bytes]]:
        """The pieces of the list (in a thread; one build at a time)."""
        config, state, version, number = inputs
        base, self._base = self._base, None
        touched = None
        if base is not None and base[1] == version:
            touched = self.changes.between(base[0], number)

        def listed(dataset_id: str, dataset) -> bool:
            return dataset is not None and (not dataset.purging or any(
                dataset_id in node.datasets for node in state.nodes.values()))
        if touched is None:
            held = {d for n in state.nodes.values() for d in n.datasets}
            pieces = self._segments.rebuild(
                (dataset_id, dataset) for dataset_id, dataset in config.datasets.items()
                if not dataset.purging or dataset_id in held)
        else:
            pieces = self._segments.update(
                (i, d if listed(i, d) else None)
                for i, d in ((i, config.datasets.get(i)) for i in touched))
        self._base = (number, version)
        return self._segments, pieces


def state_list(inputs, previous: dict) -> tuple[dict, bytes]:
    """The body of ``GET /v1/state/datasets`` of ``(cluster state, alive node uuids)``."""
    state, alive = inputs
    return encode_items((((node.uuid, report.dataset_id), report)
                         for node in state.nodes.values() if node.uuid in alive
                         for report in node.datasets.values()),
                        previous, report_to_api_json)


@implementer(IPushProducer)
class _BodyWriter:
    """Writes one shared body (its chunks) to one request, a chunk whenever its
    connection has room."""

    def __init__(self, request, chunks: tuple[bytes, ...]):
        self._request = request
        self._chunks = chunks
        self._next = 0
        self._paused = False
        self._stopped = False

    def start(self) -> None:
        """Register with the request and write until paused or done."""
        self._request.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        """Write chunks until the connection is full, then wait to be resumed."""
        self._paused = False
        while not self._paused and not self._stopped:
            if self._next >= len(self._chunks):
                self._stopped = True
                self._request.unregisterProducer()
                self._request.finish()
                return
            self._next += 1
            self._request.write(self._chunks[self._next - 1])

    def pauseProducing(self) -> None:
        """The connection is full: stop writing until resumed."""
        self._paused = True

    def stopProducing(self) -> None:
        """The connection is gone: write nothing more."""
        self._stopped = True


class BodyResource(Resource):
    """The answer of a list: the body ``chunks`` (gzip-encoded if ``gzip``) with its
    length, written by a producer so that the connection's buffer holds at most a chunk
    or so of it."""

    isLeaf = True

    def __init__(self, chunks: tuple[bytes, ...], gzip: bool, headers: dict):
        super().__init__()
        self._chunks = chunks
        self._gzip = gzip
        self._headers = headers

    def render(self, request):
        """Set the headers and start writing the body."""
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"vary", b"Accept-Encoding")
        if self._gzip:
            request.setHeader(b"content-encoding", b"gzip")
        for name, value in self._headers.items():
            request.setHeader(name, value)
        request.setHeader(b"content-length", b"%d" % sum(map(len, self._chunks)))
        _BodyWriter(request, self._chunks).start()
        return NOT_DONE_YET


async def answer(request, cache: ListCache, run: RunBlocking, key: tuple, inputs,
                 tag: Optional[str] = None) -> BodyResource:
    """The answer to ``request`` of the list ``cache`` holds, for ``key``: gzip if the
    request accepts it; ``tag``, if any, as its ``X-Configuration-Tag``."""
    body, tag = await cache.body(key, inputs, tag)
    headers = {} if tag is None else {b"x-configuration-tag": tag.encode("ascii")}
    if accepts_gzip(request.getHeader(b"accept-encoding")):
        return BodyResource(await body.gzipped(run), True, headers)
    return BodyResource(body.chunks, False, headers)
