"""
The agent channel's messages and their encoding, shared by the control service and agents.

Each message is one JSON object, sent as a frame with a 4-byte big-endian length prefix
(``Int32StringReceiver``); ``"type"`` says which message it is. ``encode`` and ``decode``
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
from typing import Optional, Union

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger, LogLevel
from twisted.protocols.basic import Int32StringReceiver

from pyflock.common._jsonread import (
    Malformed, read, read_list, read_natural, read_port, read_uuid, unique, uuid_value,
)
from pyflock.common._limits import DATASET_STATES
from pyflock.common._logging import log_event
from pyflock.common._records import (
    DatasetEntry, DatasetReport, Node, dataset_entry_from_json, dataset_entry_to_json,
    node_from_json, node_to_json, report_from_json, report_to_json,
)

#: The newest agent-channel protocol this code speaks (docs/architecture.md, "Evolving the
#: agent channel"): 2 added the hello's ``protocols``; 3 the hello's ``zone``.
PROTOCOL_VERSION = 3

#: The oldest it still speaks: the previous one, so agents are upgraded one at a time.
OLDEST_PROTOCOL = PROTOCOL_VERSION - 1

#: What a node's availability zone may be called (``eu-west-1a``, ``us-west-2-lax-1a``).
ZONE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: Frames longer than this are refused (a snapshot of ~100,000 datasets fits).
MAX_MESSAGE = 32 * 1024 * 1024

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


@attr.s(frozen=True, auto_attribs=True)
class Error:
    """Either way: why the sender closes the connection (its shape never changes)."""

    code: str
    reason: str
    protocol: int = PROTOCOL_VERSION


@attr.s(frozen=True, auto_attribs=True)
class Snapshot:
    """Control -> agent: the whole view at ``version``."""

    epoch: str
    version: int
    datasets: tuple = ()
    nodes: tuple = ()


@attr.s(frozen=True, auto_attribs=True)
class Diff:
    """
    Control -> agent: what changed from ``version - 1`` to ``version``: new or changed
    datasets and nodes, and the ids of datasets forgotten (purged).
    """

    epoch: str
    version: int
    datasets: tuple = ()
    removed: tuple = ()
    nodes: tuple = ()


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
    """

    view: Optional[ViewVersion] = None


@attr.s(frozen=True, auto_attribs=True)
class SyncRequest:
    """Agent -> control: my view is out of step, send me a snapshot."""


Message = Union[Hello, Welcome, Error, Snapshot, Diff, StateReport, Heartbeat, SyncRequest]


# -- to JSON -------------------------------------------------------------------------------


def _version_json(view: Optional[ViewVersion]):
    return None if view is None else {"epoch": view.epoch, "version": view.version}


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
        return hello
    if isinstance(message, Welcome):
        return {"type": "welcome", "protocol": message.protocol, "epoch": message.epoch,
                "version": message.version}
    if isinstance(message, Error):
        return {"type": "error", "code": message.code, "reason": message.reason,
                "protocol": message.protocol}
    if isinstance(message, Snapshot):
        return {"type": "snapshot", "epoch": message.epoch, "version": message.version,
                "datasets": [dataset_entry_to_json(d) for d in message.datasets],
                "nodes": [node_to_json(n) for n in message.nodes]}
    if isinstance(message, Diff):
        return {"type": "diff", "epoch": message.epoch, "version": message.version,
                "datasets": [dataset_entry_to_json(d) for d in message.datasets],
                "removed": list(message.removed),
                "nodes": [node_to_json(n) for n in message.nodes]}
    if isinstance(message, StateReport):
        return {"type": "state", "node_uuid": message.node_uuid,
                "datasets": [report_to_json(r) for r in message.datasets],
                "view": _version_json(message.view)}
    if isinstance(message, Heartbeat):
        return {"type": "heartbeat", "view": _version_json(message.view)}
    if isinstance(message, SyncRequest):
        return {"type": "sync"}
    raise TypeError(f"not an agent-channel message: {message!r}")


def encode(message: Message) -> bytes:
    """The payload of the frame that carries ``message``."""
    return json.dumps(message_to_json(message), separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


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


def _hello(obj: dict) -> Hello:
    address = read(obj, "address", (str,), "hello")
    era = read(obj, "era", (str,), "hello")
    if not address or not era:
        raise BadMessage("hello.address and hello.era must not be empty")
    return Hello(node_uuid=read_uuid(obj, "node_uuid", "hello"), era=era, address=address,
                 peer_port=read_port(obj, "peer_port", "hello"),
                 known=_version(obj, "known", "hello"), protocols=_hello_protocols(obj),
                 zone=_zone(obj))


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
                    nodes=unique(nodes, lambda n: n.uuid, "snapshot.nodes"))


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
                nodes=unique(nodes, lambda n: n.uuid, "diff.nodes"))


def _state(obj: dict) -> StateReport:
    reports = tuple(report_from_json(r, f"state.datasets[{i}]")
                    for i, r in enumerate(read_list(obj, "datasets", "state")))
    return StateReport(node_uuid=read_uuid(obj, "node_uuid", "state"),
                       datasets=unique(reports, lambda r: r.dataset_id, "state.datasets"),
                       view=_version(obj, "view", "state"))


_DECODERS = {
    "hello": _hello,
    "welcome": lambda o: Welcome(epoch=read(o, "epoch", (str,), "welcome"),
                                 version=read_natural(o, "version", "welcome"),
                                 protocol=o["protocol"]),
    "error": lambda o: Error(code=read(o, "code", (str,), "error"),
                             reason=read(o, "reason", (str,), "error"),
                             protocol=read_natural(o, "protocol", "error")),
    "snapshot": _snapshot,
    "diff": _diff,
    "state": _state,
    "heartbeat": lambda o: Heartbeat(view=_version(o, "view", "heartbeat")),
    "sync": lambda o: SyncRequest(),
}


def decode(payload: bytes, protocol: Optional[int] = None) -> Message:
    """
    The message a frame's payload carries, in the version ``protocol`` the connection
    settled on (None: not settled yet, or a stored view: the newest). Raises
    ``ProtocolMismatch`` for a hello or welcome whose versions this side does not speak,
    ``BadMessage`` for anything malformed, a key unknown to the version included.
    """
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

#: The keys of each message type in each version this code speaks. Within a version a
#: message with another key is refused; a new key means a new version.
MESSAGE_KEYS = {
    2: dict(_V1_KEYS, hello=_V1_KEYS["hello"] | {"protocols"}),
    # Version 3: the hello's ``zone`` (issue 10).
    3: dict(_V1_KEYS, hello=_V1_KEYS["hello"] | {"protocols", "zone"}),
}

_VIEW_VERSION_KEYS = frozenset({"epoch", "version"})


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
    check_keys(obj, keys[kind], kind)


# -- framing -------------------------------------------------------------------------------


class MessageProtocol(Int32StringReceiver):
    """
    Length-prefixed JSON messages over a stream. Subclasses implement
    ``message_received(message)``; a bad frame from the peer (or a handler raising
    ``BadMessage``) gets an ``error`` message and a disconnect, never an exception.
    """

    #: Subclasses name their side in log events ("control" or "agent").
    side = "peer"

    def __init__(self, max_message: int = MAX_MESSAGE):
        self.MAX_LENGTH = max_message
        self.closing = False
        self.connected = False
        #: The protocol version the handshake settled on (None until it has).
        self.protocol_version: Optional[int] = None
        self._lost: list[Deferred] = []

    def connectionMade(self) -> None:
        self.connected = True

    def connectionLost(self, reason) -> None:
        self.connected = False
        self.closing = True
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

    def send(self, message: Message) -> None:
        """Send one message (nothing once closing)."""
        if not self.closing:
            self.sendString(encode(message))

    def send_payload(self, payload: bytes) -> None:
        """Send a payload already ``encode``-d (to encode a broadcast once)."""
        if not self.closing:
            self.sendString(payload)

    def fail(self, code: str, reason: str) -> None:
        """Tell the peer why, then close the connection; later frames are ignored."""
        if self.closing:
            return
        log_event(_log, f"pyflock:{self.side}:channel-error-sent", LogLevel.warn, code=code,
                  reason=reason, peer=str(self.transport.getPeer()))
        self.send(Error(code=code, reason=reason))
        self.closing = True
        self.transport.loseConnection()


__all__ = [
    "BadMessage", "DATASET_STATES", "DatasetEntry", "DatasetReport", "Diff", "Error",
    "Heartbeat", "Hello", "MAX_MESSAGE", "Message", "MessageProtocol",
    "MESSAGE_KEYS", "Node", "OLDEST_PROTOCOL", "PROTOCOL_VERSION", "ProtocolMismatch",
    "Snapshot", "StateReport", "check_keys", "describe_protocols", "negotiate",
    "SyncRequest", "ViewVersion", "Welcome", "ZONE_NAME", "dataset_entry_from_json",
    "dataset_entry_to_json", "decode", "encode", "message_to_json", "node_from_json",
    "node_to_json",
]
