"""
The agent channel's messages and their encoding, shared by the control service and agents.

Each message is one JSON object, sent as a frame with a 4-byte big-endian length prefix
(``FrameReader`` reassembles them); ``"type"`` says which message it is. ``encode`` and ``decode``
turn the values below into frames' payloads and back, and ``decode`` checks every field, so
the rest of the code only ever sees well-formed values. ``MessageProtocol`` is the framing
both ends share: a peer's bad message gets an ``error`` message and a disconnect.

The ``error`` message keeps its shape in every protocol version (``code``, ``reason``,
``protocol``), so that a peer speaking another version still learns why it was refused.
The hello names the versions an agent speaks and the welcome the one the connection
speaks from then on (``negotiate``); within a version a key it does not have is refused
(``MESSAGE_KEYS``). The rule for adding to the protocol is in docs/architecture.md,
"Evolving the agent channel".
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections import deque
from typing import Iterable, Optional, Union

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from pyflock.common._jsonread import (
    Malformed, read, read_host, read_list, read_natural, read_port, read_uuid, unique,
    uuid_value,
)
from pyflock.common._limits import (
    AGENT_MESSAGE_LIMIT, DATASET_STATES, MAX_MESSAGE, SEND_LIMIT, SNAPSHOT_PAGE,
)
from pyflock.common._logging import log_event
from pyflock.common._records import (
    DatasetEntry, DatasetReport, Node, dataset_entry_from_json, dataset_entry_to_json,
    node_from_json, node_to_json, report_from_json, report_to_json,
)

#: The newest agent-channel protocol this code speaks (docs/architecture.md, "Evolving the
#: agent channel"): 2 added the hello's ``protocols``; 3 the hello's ``zone`` (issue 10)
#: and snapshots in pages (the snapshot's ``more``, issue 8), and the ``revocations``
#: message (issue 8; added before version 3 was released), and compressed frames (issue
#: 12; also before version 3 was released); 4 the resume point of a shared store (issue 9
#: point 5, issue 12 point 3: ``StoreRevision``: the hello's ``resume``, the welcome's and
#: control heartbeat's ``store_revision``, and the diff's ``base``).
PROTOCOL_VERSION = 4

#: The oldest it still speaks: the previous one, so agents are upgraded one at a time.
OLDEST_PROTOCOL = PROTOCOL_VERSION - 1

#: What a node's availability zone may be called (``eu-west-1a``, ``us-west-2-lax-1a``).
ZONE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: The first version whose snapshots may come in pages (issue 8).
PAGED_SNAPSHOTS = 3

#: The first version that carries the revocation list (``CRLUpdate``, issue 8).
REVOCATION_LISTS = 3

#: The first version whose frames may be compressed (issue 12; version 3 was not released): a payload that starts with
#: ``x`` (zlib's header; JSON starts with ``{``) is a zlib stream of the message's JSON. The
#: control service sends snapshot pages so, compressed once for every agent: a quarter of
#: the bytes to encrypt, send and read.
COMPRESSED_FRAMES = 3

#: The first version that resumes across replicas of one store (``StoreRevision``).
SHARED_REVISIONS = 4

#: How hard snapshot pages are compressed (zlib's level: fast, and about 4x on a view).
COMPRESSION_LEVEL = 6

_log = Logger()


class BadMessage(Malformed):
    """A frame is not a well-formed message; the text says what is wrong with it."""


def describe_protocols(oldest, newest) -> str:
    """``protocol 2`` or ``protocols 1 to 2``, for messages naming a side's versions."""
    if oldest == newest:
        return f"protocol {newest!r}"
    return f"protocols {oldest!r} to {newest!r}"


class ProtocolMismatch(BadMessage):
    """
    A hello or welcome names versions (``theirs_oldest`` to ``theirs``, as sent) that
    share none with the versions this side speaks (``OLDEST_PROTOCOL`` to
    ``PROTOCOL_VERSION``).
    """

    def __init__(self, theirs, theirs_oldest=None):
        self.theirs = theirs
        self.theirs_oldest = theirs if theirs_oldest is None else theirs_oldest
        super().__init__(f"the peer speaks agent-channel {self.describe_theirs()}, this "
                         f"side speaks {describe_protocols(OLDEST_PROTOCOL, PROTOCOL_VERSION)}")

    def describe_theirs(self) -> str:
        """The peer's versions, as ``describe_protocols`` words them."""
        return describe_protocols(self.theirs_oldest, self.theirs)


def negotiate(theirs: tuple[int, int],
              ours: tuple[int, int] = (OLDEST_PROTOCOL, PROTOCOL_VERSION)) -> int:
    """
    The version a connection speaks: the newest that both the peer (``theirs``, oldest to
    newest) and this side (``ours``) speak; ``ProtocolMismatch`` if there is none (pure).
    """
    newest = min(theirs[1], ours[1])
    if newest < max(theirs[0], ours[0]):
        raise ProtocolMismatch(theirs[1], theirs[0])
    return newest


# -- the view's parts ----------------------------------------------------------------------


# A view's datasets are ``DatasetEntry`` values, its nodes ``Node`` values and a state
# report's datasets ``DatasetReport`` values (pyflock.common._records, with their codecs);
# the versions are here.


@attr.s(frozen=True, auto_attribs=True)
class ViewVersion:
    """A version of the view: versions only compare within one control service ``epoch``."""

    epoch: str
    version: int


@attr.s(frozen=True, auto_attribs=True)
class StoreRevision:
    """
    Version 4: a resume point that means the same on every replica of one store (issue 9
    point 5): the view of some version reflects every change store ``store`` (its id)
    made up to store ``revision``. A replica that has followed the store since then can
    send an agent holding such a view what changed since, whichever replica it came from.
    """

    store: str
    revision: int


# -- messages ------------------------------------------------------------------------------


def _check_protocols(instance, attribute, value) -> None:
    """attrs validator: ``protocols`` is (oldest, newest), 1 <= oldest <= newest."""
    if (not isinstance(value, tuple) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not 1 <= value[0] <= value[1]):
        raise ValueError(f"protocols must be (oldest, newest) versions, not {value!r}")


@attr.s(frozen=True, auto_attribs=True)
class Hello:
    """
    Agent -> control, first: who it is, where peers reach it, what view it has, the
    protocol versions it speaks (``protocols``: oldest, newest) and, from version 3, its
    availability zone (``zone``; None: it has none, e.g. loopback nodes).
    """

    node_uuid: str
    era: str
    address: str
    peer_port: Optional[int] = None
    known: Optional[ViewVersion] = None
    protocols: tuple = attr.ib(default=(OLDEST_PROTOCOL, PROTOCOL_VERSION),
                               converter=tuple, validator=_check_protocols)
    zone: Optional[str] = None
    #: Version 4: the resume point the agent's view (``known``) reflects, if it has one.
    resume: Optional[StoreRevision] = None

    @property
    def protocol(self) -> int:
        """The newest version the agent speaks (the hello's ``protocol``)."""
        return self.protocols[1]


@attr.s(frozen=True, auto_attribs=True)
class Welcome:
    """
    Control -> agent: the hello is accepted; the control's current view version, and the
    protocol version the connection speaks from now on (``protocol``).
    """

    epoch: str
    version: int
    protocol: int = PROTOCOL_VERSION
    #: Version 4: the resume point of that version, on a shared store.
    store_revision: Optional[StoreRevision] = None


@attr.s(frozen=True, auto_attribs=True)
class Error:
    """Either way: why the sender closes the connection (its shape never changes)."""

    code: str
    reason: str
    protocol: int = PROTOCOL_VERSION


@attr.s(frozen=True, auto_attribs=True)
class Snapshot:
    """
    Control -> agent: the whole view at ``version``, or (from version 3 on) one page of
    it: ``more`` says that further pages of the same view follow.
    """

    epoch: str
    version: int
    datasets: tuple = ()
    nodes: tuple = ()
    more: bool = False


@attr.s(frozen=True, auto_attribs=True)
class Diff:
    """
    Control -> agent: what changed from ``version - 1`` to ``version``: new or changed
    datasets and nodes, and the ids of datasets forgotten (purged). From version 4, a diff
    with a ``base`` changes the view of that version (of another replica's epoch) into
    this one's ``version`` (a resume across replicas).
    """

    epoch: str
    version: int
    datasets: tuple = ()
    removed: tuple = ()
    nodes: tuple = ()
    base: Optional[ViewVersion] = None


@attr.s(frozen=True, auto_attribs=True)
class StateReport:
    """
    Agent -> control: every dataset the node holds now, and the latest view version the
    agent had stored when it sent this (None before it has any).
    """

    node_uuid: str
    datasets: tuple = ()
    view: Optional[ViewVersion] = None


@attr.s(frozen=True, auto_attribs=True)
class Heartbeat:
    """
    Either way, every few seconds. From control: its current view version; from an agent:
    the latest view version it has stored, once it has reported its state (else None).
    From version 4 the control's may carry that version's resume point.
    """

    view: Optional[ViewVersion] = None
    store_revision: Optional[StoreRevision] = None


@attr.s(frozen=True, auto_attribs=True)
class SyncRequest:
    """Agent -> control: my view is out of step, send me a snapshot."""


# -- issue 8: the revocation list (version 3) --
@attr.s(frozen=True, auto_attribs=True)
class CRLUpdate:
    """
    Control -> agent, from version 3: the cluster's revocation list (``cluster.crl``, PEM
    text, ``crl``), after the welcome (and snapshot) and whenever the control service
    loads a new one; never sent while it has none. The agent checks its signature.
    """

    crl: str


Message = Union[Hello, Welcome, Error, Snapshot, Diff, StateReport, Heartbeat, SyncRequest,
                CRLUpdate]


# -- to JSON -------------------------------------------------------------------------------


def _version_json(view: Optional[ViewVersion]):
    return None if view is None else {"epoch": view.epoch, "version": view.version}


def _with_revision(obj: dict, key: str, point: Optional[StoreRevision]) -> dict:
    """``obj`` with ``point`` as ``key`` (version 4), if there is one."""
    if point is not None:
        obj[key] = {"store": point.store, "revision": point.revision}
    return obj


def message_to_json(message: Message) -> dict:
    """The JSON object of ``message``."""
    if isinstance(message, Hello):
        hello = {"type": "hello", "protocol": message.protocol,
                 "node_uuid": message.node_uuid, "era": message.era,
                 "address": message.address, "peer_port": message.peer_port,
                 "known": _version_json(message.known)}
        if message.protocol >= 2:
            hello["protocols"] = list(message.protocols)
        if message.protocol >= 3:  # version 3: the zone
            hello["zone"] = message.zone
        if message.protocol >= SHARED_REVISIONS:
            _with_revision(hello, "resume", message.resume)
        return hello
    if isinstance(message, Welcome):
        return _with_revision({"type": "welcome", "protocol": message.protocol,
                               "epoch": message.epoch, "version": message.version},
                              "store_revision", message.store_revision)
    if isinstance(message, Error):
        return {"type": "error", "code": message.code, "reason": message.reason,
                "protocol": message.protocol}
    if isinstance(message, Snapshot):
        snapshot = {"type": "snapshot", "epoch": message.epoch, "version": message.version,
                    "datasets": [dataset_entry_to_json(d) for d in message.datasets],
                    "nodes": [node_to_json(n) for n in message.nodes]}
        if message.more:
            snapshot["more"] = True  # version 3: a page (never sent to version 2)
        return snapshot
    if isinstance(message, Diff):
        diff = {"type": "diff", "epoch": message.epoch, "version": message.version,
                "datasets": [dataset_entry_to_json(d) for d in message.datasets],
                "removed": list(message.removed),
                "nodes": [node_to_json(n) for n in message.nodes]}
        if message.base is not None:  # version 4: a resume across replicas
            diff["base"] = _version_json(message.base)
        return diff
    if isinstance(message, StateReport):
        return {"type": "state", "node_uuid": message.node_uuid,
                "datasets": [report_to_json(r) for r in message.datasets],
                "view": _version_json(message.view)}
    if isinstance(message, Heartbeat):
        return _with_revision({"type": "heartbeat", "view": _version_json(message.view)},
                              "store_revision", message.store_revision)
    if isinstance(message, SyncRequest):
        return {"type": "sync"}
    if isinstance(message, CRLUpdate):  # version 3 (issue 8)
        return {"type": "revocations", "crl": message.crl}
    raise TypeError(f"not an agent-channel message: {message!r}")


def _dumps(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")


def encode(message: Message) -> bytes:
    """The payload of the frame that carries ``message``."""
    return _dumps(message_to_json(message))


def group_by_size(sizes: Iterable[int], budget: int) -> list[range]:
    """
    Consecutive index ranges of ``sizes`` whose sums stay within ``budget``; an item
    larger than the budget gets a range of its own (pure). No items: one empty range.
    """
    groups, start, total = [], 0, 0
    sizes = list(sizes)
    for i, size in enumerate(sizes):
        if i > start and total + size > budget:
            groups.append(range(start, i))
            start, total = i, 0
        total += size
    groups.append(range(start, len(sizes)))
    return groups


def snapshot_pages(snapshot: Snapshot, budget: int = SNAPSHOT_PAGE) -> list[bytes]:
    """
    The payloads of ``snapshot`` sent in pages of about ``budget`` bytes (version 3): each
    a ``snapshot`` of some of its datasets and nodes, every page but the last with
    ``more``. A snapshot within the budget is one page, as ``encode`` gives it.
    """
    # Each item is marked as a dataset or a node by a byte, which counts for its comma.
    items = ([b'd' + _dumps(dataset_entry_to_json(d)) for d in snapshot.datasets]
             + [b'n' + _dumps(node_to_json(n)) for n in snapshot.nodes])
    head = (b'{"type":"snapshot","epoch":' + _dumps(snapshot.epoch) + b',"version":'
            + _dumps(snapshot.version) + b',"datasets":[')
    groups = group_by_size((len(item) for item in items), budget - len(head) - 40)
    pages = []
    for number, group in enumerate(groups):
        page = [items[i] for i in group]
        datasets = b",".join(item[1:] for item in page if item[:1] == b'd')
        nodes = b",".join(item[1:] for item in page if item[:1] == b'n')
        more = b',"more":true' if number < len(groups) - 1 else b''
        pages.append(head + datasets + b'],"nodes":[' + nodes + b']' + more + b'}')
    return pages


def join_pages(pages: list[Snapshot]) -> Snapshot:
    """
    The snapshot whose pages are ``pages``, in order, the last without ``more`` (pure);
    ``BadMessage`` if they are not pages of one view or name a dataset or node twice.
    """
    first, last = pages[0], pages[-1]
    if last.more or not all(p.more for p in pages[:-1]):
        raise BadMessage("a paged snapshot's pages all have more, but its last")
    if any((p.epoch, p.version) != (first.epoch, first.version) for p in pages):
        raise BadMessage(f"a page of another view came before the last page of version "
                         f"{first.version} of epoch {first.epoch}")
    if len(pages) == 1:
        return first
    datasets = tuple(d for p in pages for d in p.datasets)
    nodes = tuple(n for p in pages for n in p.nodes)
    return Snapshot(epoch=first.epoch, version=first.version,
                    datasets=unique(datasets, lambda d: d.dataset_id, "snapshot.datasets"),
                    nodes=unique(nodes, lambda n: n.uuid, "snapshot.nodes"))


def split_diff(diff: Diff, budget: int = SNAPSHOT_PAGE) -> list[Diff]:
    """
    ``diff`` as consecutive diffs (versions ``diff.version``, +1, ...) of about ``budget``
    bytes each, so that no frame outgrows the limit however much changed at once; a diff
    within the budget is itself (pure).
    """
    # Each item's size counts the comma after it.
    items = ([("datasets", d, len(_dumps(dataset_entry_to_json(d))) + 1)
              for d in diff.datasets]
             + [("removed", r, 40) for r in diff.removed]
             + [("nodes", n, len(_dumps(node_to_json(n))) + 1) for n in diff.nodes])
    groups = group_by_size((size for _, _, size in items), budget - 200)
    diffs = []
    for number, group in enumerate(groups):
        parts: dict = {"datasets": [], "removed": [], "nodes": []}
        for i in group:
            parts[items[i][0]].append(items[i][1])
        diffs.append(Diff(epoch=diff.epoch, version=diff.version + number,
                          **{k: tuple(v) for k, v in parts.items()}))
    return diffs


# -- from JSON, checking every field -------------------------------------------------------


def _reject_constant(name: str):
    raise BadMessage(f"{name} is not a JSON number pyflock accepts")


def _version(obj: dict, key: str, where: str) -> Optional[ViewVersion]:
    value = read(obj, key, (dict,), where, optional=True)
    if value is None:
        return None
    where = f"{where}.{key}"
    check_keys(value, _VIEW_VERSION_KEYS, where)
    return ViewVersion(epoch=read(value, "epoch", (str,), where),
                       version=read_natural(value, "version", where))


def _store_revision(obj: dict, key: str, where: str) -> Optional[StoreRevision]:
    value = read(obj, key, (dict,), where, optional=True, default=None)
    if value is None:
        return None
    where = f"{where}.{key}"
    check_keys(value, _STORE_REVISION_KEYS, where)
    store = read(value, "store", (str,), where)
    if not store:
        raise BadMessage(f"{where}.store must not be empty")
    return StoreRevision(store=store, revision=read_natural(value, "revision", where))


def _hello(obj: dict) -> Hello:
    era = read(obj, "era", (str,), "hello")
    if not era:
        raise BadMessage("hello.era must not be empty")
    address = read_host(obj, "address", "hello")
    return Hello(node_uuid=read_uuid(obj, "node_uuid", "hello"), era=era, address=address,
                 peer_port=read_port(obj, "peer_port", "hello"),
                 known=_version(obj, "known", "hello"), protocols=_hello_protocols(obj),
                 zone=_zone(obj), resume=_store_revision(obj, "resume", "hello"))


def _zone(obj: dict) -> Optional[str]:
    """A hello's ``zone`` (version 3; absent from older hellos): a short name or null."""
    zone = read(obj, "zone", (str,), "hello", optional=True, default=None)
    if zone is not None and not ZONE_NAME.fullmatch(zone):
        raise BadMessage(f"hello.zone must be an availability zone name (letters, digits, "
                         f"'.', '_' and '-', at most 64), not {zone[:70]!r}")
    return zone


def _snapshot(obj: dict) -> Snapshot:
    datasets = tuple(dataset_entry_from_json(d, f"snapshot.datasets[{i}]")
                     for i, d in enumerate(read_list(obj, "datasets", "snapshot")))
    nodes = tuple(node_from_json(n, f"snapshot.nodes[{i}]")
                  for i, n in enumerate(read_list(obj, "nodes", "snapshot")))
    return Snapshot(epoch=read(obj, "epoch", (str,), "snapshot"),
                    version=read_natural(obj, "version", "snapshot"),
                    datasets=unique(datasets, lambda d: d.dataset_id, "snapshot.datasets"),
                    nodes=unique(nodes, lambda n: n.uuid, "snapshot.nodes"),
                    more=read(obj, "more", (bool,), "snapshot", default=False))


def _diff(obj: dict) -> Diff:
    datasets = tuple(dataset_entry_from_json(d, f"diff.datasets[{i}]")
                     for i, d in enumerate(read_list(obj, "datasets", "diff")))
    removed = tuple(uuid_value(r, f"diff.removed[{i}]")
                    for i, r in enumerate(read_list(obj, "removed", "diff")))
    nodes = tuple(node_from_json(n, f"diff.nodes[{i}]")
                  for i, n in enumerate(read_list(obj, "nodes", "diff")))
    return Diff(epoch=read(obj, "epoch", (str,), "diff"),
                version=read_natural(obj, "version", "diff", low=1),
                datasets=unique(datasets, lambda d: d.dataset_id, "diff.datasets"),
                removed=unique(removed, lambda i: i, "diff.removed"),
                nodes=unique(nodes, lambda n: n.uuid, "diff.nodes"),
                base=_version(obj, "base", "diff") if "base" in obj else None)


#: The keys of a dataset in a state report (every version; ``transfer`` only while a
#: peer-to-peer move sends it).
_REPORT_KEYS = frozenset({"dataset_id", "state", "path", "maximum_size", "transfer"})


def _report(value, where: str):
    if isinstance(value, dict):
        check_keys(value, _REPORT_KEYS, where)
    return report_from_json(value, where)


def _state(obj: dict) -> StateReport:
    reports = tuple(_report(r, f"state.datasets[{i}]")
                    for i, r in enumerate(read_list(obj, "datasets", "state")))
    return StateReport(node_uuid=read_uuid(obj, "node_uuid", "state"),
                       datasets=unique(reports, lambda r: r.dataset_id, "state.datasets"),
                       view=_version(obj, "view", "state"))


def _crl_update(obj: dict) -> CRLUpdate:
    """A ``revocations`` message (version 3): ``crl``, PEM text (ASCII, not empty)."""
    crl = read(obj, "crl", (str,), "revocations")
    if not crl or not crl.isascii():
        raise BadMessage("revocations.crl must be a PEM revocation list (ASCII text)")
    return CRLUpdate(crl=crl)


_DECODERS = {
    "hello": _hello,
    "welcome": lambda o: Welcome(epoch=read(o, "epoch", (str,), "welcome"),
                                 version=read_natural(o, "version", "welcome"),
                                 protocol=o["protocol"],
                                 store_revision=_store_revision(o, "store_revision",
                                                                "welcome")),
    "error": lambda o: Error(code=read(o, "code", (str,), "error"),
                             reason=read(o, "reason", (str,), "error"),
                             protocol=read_natural(o, "protocol", "error")),
    "snapshot": _snapshot,
    "diff": _diff,
    "state": _state,
    "heartbeat": lambda o: Heartbeat(view=_version(o, "view", "heartbeat"),
                                     store_revision=_store_revision(o, "store_revision",
                                                                    "heartbeat")),
    "sync": lambda o: SyncRequest(),
    "revocations": _crl_update,
}


def compress(payload: bytes) -> bytes:
    """``payload`` as a compressed frame's payload (version ``COMPRESSED_FRAMES`` on)."""
    return zlib.compress(payload, COMPRESSION_LEVEL)


def inflate(payload: bytes, protocol: Optional[int], limit: int = MAX_MESSAGE) -> bytes:
    """
    The JSON of a frame's payload: itself, or what a compressed one (version
    ``COMPRESSED_FRAMES`` on; None: the newest) expands to; ``BadMessage`` if it is compressed in an older
    version, is not a zlib stream, or expands past ``limit`` bytes.
    """
    if payload[:1] != b"x":
        return payload
    if protocol is not None and protocol < COMPRESSED_FRAMES:
        raise BadMessage(f"a compressed frame is not part of agent-channel protocol "
                         f"{protocol} (only of {COMPRESSED_FRAMES} on)")
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(payload, limit + 1)
    except zlib.error as e:
        raise BadMessage(f"a compressed frame is not a zlib stream: {e}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise BadMessage(f"a compressed frame expands past the limit of {limit} bytes")
    if not inflater.eof:
        raise BadMessage("a compressed frame ends before its zlib stream does")
    return data


def decode(payload: bytes, protocol: Optional[int] = None) -> Message:
    """
    The message a frame's payload carries, in the version ``protocol`` the connection
    settled on (None: not settled yet, or a stored view: the newest). Raises
    ``ProtocolMismatch`` for a hello or welcome whose versions this side does not speak,
    ``BadMessage`` for anything malformed, a key unknown to the version included.
    """
    payload = inflate(payload, protocol)
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except BadMessage:
        raise
    except (UnicodeDecodeError, ValueError) as e:
        raise BadMessage(f"the message is not UTF-8 JSON: {e}") from None
    except RecursionError:
        raise BadMessage("the message is nested too deeply") from None
    if not isinstance(obj, dict):
        raise BadMessage(f"a message must be an object, not {type(obj).__name__}")
    kind = obj.get("type")
    decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise BadMessage(f"unknown message type {kind!r}: expected one of "
                         f"{', '.join(sorted(_DECODERS))}")
    _check_message_keys(obj, kind, protocol)
    try:
        return decoder(obj)
    except BadMessage:
        raise
    except Malformed as e:
        raise BadMessage(str(e)) from None


# -- versions: the handshake settles one, and each version knows its keys -----------------

_V1_KEYS = {
    "hello": frozenset({"type", "protocol", "node_uuid", "era", "address", "peer_port",
                        "known"}),
    "welcome": frozenset({"type", "protocol", "epoch", "version"}),
    "error": frozenset({"type", "code", "reason", "protocol"}),
    "snapshot": frozenset({"type", "epoch", "version", "datasets", "nodes"}),
    "diff": frozenset({"type", "epoch", "version", "datasets", "removed", "nodes"}),
    "state": frozenset({"type", "node_uuid", "datasets", "view"}),
    "heartbeat": frozenset({"type", "view"}),
    "sync": frozenset({"type"}),
}

_V2_KEYS = dict(_V1_KEYS, hello=_V1_KEYS["hello"] | {"protocols"})

#: The keys of each message type in each version this code speaks. Within a version a
#: message with another key is refused; a new key means a new version.
MESSAGE_KEYS = {
    2: _V2_KEYS,
    # Version 3: the hello's ``zone`` (issue 10); a snapshot may be a page, ``more`` (true:
    # more pages of this view follow; absent on the last page or a snapshot in one page;
    # issue 8); and the ``revocations`` message (the cluster's CRL, issue 8).
    3: dict(_V2_KEYS, hello=_V2_KEYS["hello"] | {"zone"},
            snapshot=_V2_KEYS["snapshot"] | {"more"},
            revocations=frozenset({"type", "crl"})),
}
# Version 4 (issue 9 point 5): the resume point of a shared store: the hello's ``resume``
# (the agent's), the welcome's and heartbeat's ``store_revision`` (the control's, for the
# version they name), and the ``base`` of a diff that resumes from another replica's view.
MESSAGE_KEYS[4] = dict(MESSAGE_KEYS[3], hello=MESSAGE_KEYS[3]["hello"] | {"resume"},
                       welcome=MESSAGE_KEYS[3]["welcome"] | {"store_revision"},
                       heartbeat=MESSAGE_KEYS[3]["heartbeat"] | {"store_revision"},
                       diff=MESSAGE_KEYS[3]["diff"] | {"base"})

_VIEW_VERSION_KEYS = frozenset({"epoch", "version"})

_STORE_REVISION_KEYS = frozenset({"store", "revision"})


def check_keys(obj: dict, allowed: frozenset, where: str) -> None:
    """``BadMessage`` naming the keys of ``obj`` that are not ``allowed``, if any."""
    unknown = sorted(str(k) for k in set(obj) - allowed)
    if unknown:
        raise BadMessage(f"{where} has unknown keys {', '.join(map(repr, unknown))} "
                         f"(expected only {', '.join(sorted(allowed))})")


def _version_number(value) -> Optional[int]:
    """``value`` if it is a protocol version number (a positive integer), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


def _hello_protocols(obj: dict) -> tuple[int, int]:
    """
    The versions a hello's sender speaks, checked before anything else is read (another
    version's hello may have another shape): ``protocols`` ``[oldest, newest]``, whose
    newest is ``protocol``; a hello without it (version 1) speaks ``protocol`` alone.
    ``ProtocolMismatch`` if this side speaks none of them.
    """
    newest = _version_number(obj.get("protocol"))
    if newest is None:
        raise ProtocolMismatch(obj.get("protocol"))
    if newest >= 2 and "protocols" in obj:
        value = obj["protocols"]
        numbers = ([_version_number(v) for v in value]
                   if isinstance(value, list) and len(value) == 2 else [None])
        if None in numbers or numbers[0] > numbers[1] or numbers[1] != newest:
            raise BadMessage(f"hello.protocols must be [oldest, newest] versions ending "
                             f"with hello.protocol ({newest}), not {value!r}")
        oldest = numbers[0]
    else:
        oldest = newest
    negotiate((oldest, newest))
    return oldest, newest


def _check_message_keys(obj: dict, kind: str, protocol: Optional[int]) -> None:
    """
    Refuse the keys ``kind`` does not have in version ``protocol`` (None: the newest). A
    handshake is read before any version is settled: a hello by the keys of the newest
    version both sides speak (the rest of a newer agent's hello is its business), a
    welcome by its chosen version, which must be one this side speaks; an error's shape
    never changes, so another version's error is read as well as can be.
    """
    if kind == "hello":
        newest = _hello_protocols(obj)[1]
        protocol = min(newest, PROTOCOL_VERSION)
        if newest > PROTOCOL_VERSION:
            return
    elif kind == "welcome":
        chosen = _version_number(obj.get("protocol"))
        if chosen is None or not OLDEST_PROTOCOL <= chosen <= PROTOCOL_VERSION:
            raise ProtocolMismatch(obj.get("protocol"))
        protocol = chosen
    elif kind == "error":
        return
    keys = MESSAGE_KEYS[PROTOCOL_VERSION if protocol is None else protocol]
    if kind not in keys:  # a message type newer than the connection's version
        raise BadMessage(f"{kind} messages are not part of agent-channel protocol {protocol}")
    check_keys(obj, keys[kind], kind)


# -- framing -------------------------------------------------------------------------------

_PREFIX = struct.Struct("!I")


class FrameTooLarge(BadMessage):
    """A frame's length prefix announces more than the limit (``length`` bytes)."""

    def __init__(self, length: int, limit: int):
        super().__init__(f"a message of {length} bytes exceeds the limit of {limit} bytes")
        self.length = length
        self.limit = limit


def frame(payload: bytes) -> bytes:
    """``payload`` with its 4-byte big-endian length prefix, as sent."""
    return _PREFIX.pack(len(payload)) + payload


class FrameReader:
    """
    Reassembles length-prefixed frames from a stream's chunks in linear time: chunks are
    kept as they came and each frame is joined once (``Int32StringReceiver`` concatenates
    its buffer with every chunk, quadratic in a frame's size). A length prefix over
    ``limit`` is refused (``FrameTooLarge``) before any of the frame is kept.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # bytes of the first chunk already taken
        self._buffered = 0
        self._length: Optional[int] = None  # of the frame being read, once known

    def _take(self, count: int) -> bytes:
        pieces = []
        while count:
            chunk = self._chunks[0]
            available = len(chunk) - self._offset
            if available <= count:
                pieces.append(chunk[self._offset:] if self._offset else chunk)
                self._chunks.popleft()
                self._offset = 0
                count -= available
            else:
                pieces.append(chunk[self._offset:self._offset + count])
                self._offset += count
                count = 0
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def feed(self, data: bytes) -> list[bytes]:
        """The payloads of the frames ``data`` completes, in order."""
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
        payloads = []
        while True:
            if self._length is None:
                if self._buffered < _PREFIX.size:
                    return payloads
                (length,) = _PREFIX.unpack(self._take(_PREFIX.size))
                self._buffered -= _PREFIX.size
                if length > self.limit:
                    raise FrameTooLarge(length, self.limit)
                self._length = length
            if self._buffered < self._length:
                return payloads
            payloads.append(self._take(self._length))
            self._buffered -= self._length
            self._length = None


@implementer(IPushProducer)
class MessageProtocol(Protocol):
    """
    Length-prefixed JSON messages over a stream. Subclasses implement
    ``message_received(message)``; a bad frame from the peer (or a handler raising
    ``BadMessage``) gets an ``error`` message and a disconnect, never an exception.

    Frames from the peer are at most ``max_message`` bytes. What is sent goes out as the
    transport takes it: the protocol is the transport's producer, so while the transport's
    buffer is full what is sent waits here (``send_stream`` produces its frames only as
    they go out), and a peer that lets more than ``send_limit`` bytes wait is dropped
    (``overflowed``): a peer that does not read cannot make this side hold its data.
    """

    #: Subclasses name their side in log events ("control" or "agent").
    side = "peer"

    def __init__(self, max_message: int = MAX_MESSAGE, send_limit: int = SEND_LIMIT):
        self.MAX_LENGTH = max_message
        self.send_limit = send_limit
        self.closing = False
        self.connected = False
        #: The protocol version the handshake settled on (None until it has).
        self.protocol_version: Optional[int] = None
        self._lost: list[Deferred] = []
        self._reader = FrameReader(max_message)
        self._paused = False
        # Frames (bytes) and streams of frames (iterators) not yet given to the transport.
        self._waiting: deque = deque()
        self._waiting_bytes = 0
        self._streams = 0

    def connectionMade(self) -> None:
        self.connected = True
        self.transport.registerProducer(self, True)

    def connectionLost(self, reason) -> None:
        self.connected = False
        self.closing = True
        self._forget_waiting()
        waiting, self._lost = self._lost, []
        for d in waiting:
            d.callback(None)

    def when_lost(self) -> Deferred:
        """Fires once the connection is closed."""
        if not self.connected:
            return succeed(None)
        d: Deferred = Deferred()
        self._lost.append(d)
        return d

    def message_received(self, message: Message) -> None:
        """Handle one well-formed message from the peer."""
        raise NotImplementedError

    def bad_message(self, error: BadMessage) -> None:
        """A frame from the peer was malformed; by default: tell it why and hang up."""
        self.fail("bad-message", str(error))

    def dataReceived(self, data: bytes) -> None:
        """Reassemble frames and hand each on; refuse one announced over the limit."""
        if self.closing:
            return
        try:
            payloads = self._reader.feed(data)
        except FrameTooLarge as e:
            self.lengthLimitExceeded(e.length)
            return
        for payload in payloads:
            if self.closing:
                return
            self.stringReceived(payload)

    def stringReceived(self, payload: bytes) -> None:
        """Decode one frame and hand the message on; refuse it if it is malformed."""
        if self.closing:
            return
        try:
            message = decode(payload, self.protocol_version)
        except BadMessage as e:
            self.bad_message(e)
            return
        try:
            self.message_received(message)
        except BadMessage as e:
            self.bad_message(e)
        except Exception:
            _log.failure("agent-channel message handler failed",
                         event_type=f"pyflock:{self.side}:channel-handler-failed")
            self.fail("internal-error", "the peer failed to handle a message; see its log")

    def lengthLimitExceeded(self, length: int) -> None:
        """Refuse a frame announced larger than the limit, before reading it."""
        self.fail("too-large", f"a message of {length} bytes exceeds the limit of "
                               f"{self.MAX_LENGTH} bytes")

    # -- sending, as fast as the peer reads --------------------------------------------

    def send(self, message: Message) -> None:
        """Send one message (nothing once closing)."""
        self.send_payload(encode(message))

    def send_payload(self, payload: bytes) -> None:
        """Send a payload already ``encode``-d (to encode a broadcast once)."""
        self.send_frame(frame(payload))

    def send_frame(self, data: bytes) -> None:
        """Send a payload already ``frame``-d (to frame a broadcast once, issue 12)."""
        if self.closing:
            return
        if not self._paused and not self._waiting:
            self.transport.write(data)
            return
        self._waiting.append(data)
        self._waiting_bytes += len(data)
        if self._waiting_bytes > self.send_limit:
            self.overflowed()

    def send_stream(self, payloads: Iterable[bytes]) -> None:
        """Send ``payloads`` in order, each made only when the transport takes it."""
        if self.closing:
            return
        self._waiting.append(iter(payloads))
        self._streams += 1
        self._flush()

    @property
    def streaming(self) -> bool:
        """Whether a ``send_stream`` has frames not yet given to the transport."""
        return self._streams > 0

    @property
    def unsent(self) -> int:
        """Bytes of sent frames waiting for the transport (streams' frames not made yet)."""
        return self._waiting_bytes

    def _flush(self) -> None:
        while self._waiting and not self._paused and not self.closing:
            item = self._waiting[0]
            if isinstance(item, bytes):
                self._waiting.popleft()
                self._waiting_bytes -= len(item)
                self.transport.write(item)
                continue
            payload = next(item, None)
            if payload is None:
                self._waiting.popleft()
                self._streams -= 1
            else:
                self.transport.write(frame(payload))

    def _forget_waiting(self) -> None:
        self._waiting.clear()
        self._waiting_bytes = self._streams = 0

    def pauseProducing(self) -> None:
        """The transport's buffer is full: keep what is sent until it asks again."""
        self._paused = True

    def resumeProducing(self) -> None:
        """The transport takes data again: give it what waits."""
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        """The connection is going: what waits will never be sent."""
        self._forget_waiting()

    def overflowed(self) -> None:
        """More than ``send_limit`` bytes wait for a peer that does not read: drop it."""
        log_event(_log, f"pyflock:{self.side}:channel-overflow", LogLevel.warn,
                  unsent=self._waiting_bytes, limit=self.send_limit,
                  peer=str(self.transport.getPeer()))
        self.closing = True
        self._forget_waiting()
        self.transport.abortConnection()

    def fail(self, code: str, reason: str) -> None:
        """Tell the peer why, then close the connection; later frames are ignored."""
        if self.closing:
            return
        log_event(_log, f"pyflock:{self.side}:channel-error-sent", LogLevel.warn, code=code,
                  reason=reason, peer=str(self.transport.getPeer()))
        # What waits for a slow reader is dropped; the error goes next (it may still
        # wait in the transport's buffer, which closing leaves to drain).
        self._forget_waiting()
        self.transport.write(frame(encode(Error(code=code, reason=reason))))
        self.closing = True
        self.transport.loseConnection()


__all__ = [
    "AGENT_MESSAGE_LIMIT", "BadMessage", "DATASET_STATES", "DatasetEntry", "DatasetReport",
    "Diff", "Error", "FrameReader", "FrameTooLarge", "Heartbeat", "Hello", "MAX_MESSAGE",
    "Message", "MessageProtocol", "MESSAGE_KEYS", "Node", "OLDEST_PROTOCOL",
    "PAGED_SNAPSHOTS", "PROTOCOL_VERSION", "ProtocolMismatch", "SEND_LIMIT", "SNAPSHOT_PAGE",
    "Snapshot", "StateReport", "check_keys", "describe_protocols", "negotiate",
    "SyncRequest", "ViewVersion", "Welcome", "ZONE_NAME", "dataset_entry_from_json",
    "dataset_entry_to_json", "decode", "encode", "frame", "group_by_size", "join_pages",
    "message_to_json", "node_from_json", "node_to_json", "snapshot_pages", "split_diff",
    "CRLUpdate", "REVOCATION_LISTS",  # issue 8
    "COMPRESSED_FRAMES", "compress", "inflate",  # issue 12
    "SHARED_REVISIONS", "StoreRevision",  # issue 9 point 5
]
