"""
The agent channel's messages and their encoding, shared by the control service and agents.

Each message is one JSON object, sent as a frame with a 4-byte big-endian length prefix
(``Int32StringReceiver``); ``"type"`` says which message it is. ``encode`` and ``decode``
turn the values below into frames' payloads and back, and ``decode`` checks every field, so
the rest of the code only ever sees well-formed values. ``MessageProtocol`` is the framing
both ends share: a peer's bad message gets an ``error`` message and a disconnect.

The ``error`` message keeps its shape in every protocol version (``code``, ``reason``,
``protocol``), so that a peer speaking another version still learns why it was refused.
"""

from __future__ import annotations

import json
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

#: The agent channel protocol this code speaks; a hello with another is refused.
PROTOCOL_VERSION = 1

#: Frames longer than this are refused (a snapshot of ~100,000 datasets fits).
MAX_MESSAGE = 32 * 1024 * 1024

_log = Logger()


class BadMessage(Malformed):
    """A frame is not a well-formed message; the text says what is wrong with it."""


class ProtocolMismatch(BadMessage):
    """A hello or welcome names another protocol version (``theirs``) than ours."""

    def __init__(self, theirs):
        super().__init__(f"the peer speaks agent-channel protocol {theirs!r}, this side "
                         f"speaks protocol {PROTOCOL_VERSION}")
        self.theirs = theirs


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


@attr.s(frozen=True, auto_attribs=True)
class Hello:
    """Agent -> control, first: who it is, where peers reach it, what view it has."""

    node_uuid: str
    era: str
    address: str
    peer_port: Optional[int] = None
    known: Optional[ViewVersion] = None
    protocol: int = PROTOCOL_VERSION


@attr.s(frozen=True, auto_attribs=True)
class Welcome:
    """Control -> agent: the hello is accepted; the control's current view version."""

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
        return {"type": "hello", "protocol": message.protocol,
                "node_uuid": message.node_uuid, "era": message.era,
                "address": message.address, "peer_port": message.peer_port,
                "known": _version_json(message.known)}
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
    return ViewVersion(epoch=read(value, "epoch", (str,), where),
                       version=read_natural(value, "version", where))


def _hello(obj: dict) -> Hello:
    address = read(obj, "address", (str,), "hello")
    era = read(obj, "era", (str,), "hello")
    if not address or not era:
        raise BadMessage("hello.address and hello.era must not be empty")
    return Hello(node_uuid=read_uuid(obj, "node_uuid", "hello"), era=era, address=address,
                 peer_port=read_port(obj, "peer_port", "hello"),
                 known=_version(obj, "known", "hello"))


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
                                 version=read_natural(o, "version", "welcome")),
    "error": lambda o: Error(code=read(o, "code", (str,), "error"),
                             reason=read(o, "reason", (str,), "error"),
                             protocol=read_natural(o, "protocol", "error")),
    "snapshot": _snapshot,
    "diff": _diff,
    "state": _state,
    "heartbeat": lambda o: Heartbeat(view=_version(o, "view", "heartbeat")),
    "sync": lambda o: SyncRequest(),
}


def decode(payload: bytes) -> Message:
    """
    The message a frame's payload carries. Raises ``ProtocolMismatch`` for a hello or
    welcome of another protocol version, ``BadMessage`` for anything malformed.
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
    # The version is checked before anything else: another version's hello may differ.
    if kind in ("hello", "welcome") and obj.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolMismatch(obj.get("protocol"))
    try:
        return decoder(obj)
    except BadMessage:
        raise
    except Malformed as e:
        raise BadMessage(str(e)) from None


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
            message = decode(payload)
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
    "Node", "PROTOCOL_VERSION", "ProtocolMismatch", "Snapshot", "StateReport",
    "SyncRequest", "ViewVersion", "Welcome", "dataset_entry_from_json",
    "dataset_entry_to_json", "decode", "encode", "message_to_json", "node_from_json",
    "node_to_json",
]
