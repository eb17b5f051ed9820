"""
The agent channel's client: keeps a connection to the control service, applies the view it
pushes, and reports what this node holds.

On every connection the agent says hello (its node uuid, era, the address and port its
peers reach it at, the view version it has, and its availability zone if it has one); the control service answers with a
welcome, then a snapshot unless the agent's view is current, then a diff on every change.
The agent reports its whole state whenever it changes and sends a heartbeat every few
seconds; a control service silent for ``timeout`` (two heartbeats) is given up on.

Several control service replicas may be given (issue 9): the agent uses one (picked at
random, so that agents spread over them), and moves to the next at once when its connection
closes, is refused, or goes silent; only after every replica failed in a row does it wait,
with jittered exponential backoff (``pyflock.common._replicas``). On the new replica it
resumes from the view version it holds: its hello says that version, and the replica sends
nothing more when it is current, the diffs since when it is of this replica's epoch, and
otherwise a snapshot. Each replica numbers its own views, but on a shared store (etcd,
protocol 4) the control service also tells which store revision a version reflects (in
the welcome and its heartbeats, ``resume``); the hello carries it, and a replica that has
followed the store since that revision answers with one diff based on the agent's view
(``Diff.base``) instead of a snapshot. Nothing polls.

Each new view goes to ``on_view`` at once and to ``save_view`` (the view file); the agent
tells the control service which view version it has stored, and only that one, because the
control service purges deleted datasets on the strength of it.

From protocol 3 the control service also sends the cluster's revocation list; each goes to
``on_crl`` (``NodeRevocations.received``, which checks and stores it; issue 8).
"""

from __future__ import annotations

import random
from typing import Callable, Iterable, Optional, Sequence, Union

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pyflock.common._logging import log_event
from pyflock.common._replicas import ReplicaOrder, backoff
from pyflock.common._tls import ClusterTLS, Identity, tls_client_endpoint
from pyflock.common._wire import (
    MAX_MESSAGE, OLDEST_PROTOCOL, PROTOCOL_VERSION, BadMessage, CRLUpdate, DatasetReport,
    Diff, Error, Heartbeat, Hello, MessageProtocol, ProtocolMismatch, Snapshot, StateReport,
    StoreRevision, SyncRequest, ViewVersion, Welcome, describe_protocols, join_pages,
)
from pyflock.agent._view import AgentView, ViewOutOfStep

#: Where peers reach an agent for data transfer, unless configured (DESIGN.md).
DEFAULT_PEER_PORT = 4525

#: Seconds between heartbeats (DESIGN.md).
DEFAULT_HEARTBEAT = 5.0

#: A control service silent this long (two heartbeats) is left for another replica.
DEFAULT_TIMEOUT = 2 * DEFAULT_HEARTBEAT

_log = Logger()


def default_retry_policy() -> Callable[[int], float]:
    """After the n-th full round of failed replicas, wait about 0.5, 1, 2, ... seconds (at
    most 30), half of it random jitter."""
    return lambda rounds: backoff(rounds, random.random())


def control_endpoint(reactor, host: str, port: int, tls: ClusterTLS) -> IStreamClientEndpoint:
    """
    The TLS endpoint of the control service's agent port: this node presents its
    certificate (``tls``, loaded from ``node.crt/.key``) and accepts only the control
    service, whose certificate names ``host``.
    """
    return tls.client_endpoint(reactor, host, port, Identity.control())


class _ControlConnection(MessageProtocol):
    """One connection to the control service."""

    side = "agent"

    def __init__(self, channel: "AgentChannel"):
        super().__init__(channel.max_message)
        self._channel = channel
        self.welcomed = False
        self.refused: Optional[Error] = None
        self.syncing = False
        #: The view the welcome promised (a snapshot or the diffs since this agent's
        #: version follow it), until this agent has it: heartbeats meanwhile are ahead of
        #: this agent's view, not signs that it fell out of step (issue 12).
        self.promised: Optional[ViewVersion] = None
        self.sent_state: Optional[tuple] = None
        #: The pages of a snapshot received so far (protocol 3), until its last page.
        self.pages: list[Snapshot] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        self._channel._connection_made(self)

    def connectionLost(self, reason) -> None:
        self.connected = False
        self.closing = True
        self._channel._connection_lost(self, reason)
        super().connectionLost(reason)

    def bad_message(self, error: BadMessage) -> None:
        if isinstance(error, ProtocolMismatch):
            self.fail("protocol-version",
                      f"the control service answered agent-channel {error.describe_theirs()}"
                      f", this agent speaks "
                      f"{describe_protocols(OLDEST_PROTOCOL, PROTOCOL_VERSION)}")
        else:
            self.fail("bad-message", str(error))

    def message_received(self, message) -> None:
        self._channel._received(self, message)


class _ConnectionFactory(Factory):
    def __init__(self, channel: "AgentChannel"):
        self._channel = channel

    def buildProtocol(self, addr):
        return _ControlConnection(self._channel)


class AgentChannel:
    """
    This node's channel to the control service at ``endpoint`` (see ``control_endpoint``
    and ``over_tls``), or at any of several replicas' endpoints (a sequence; ``names``
    label them in logs). ``on_view(view)`` is called with every new ``AgentView``;
    ``save_view(view)`` (e.g. ``ViewFile.save``) stores it and fires once it is durable.
    ``view`` is where to start from (the stored view); ``address`` where peers reach this
    node (default: the local address of the connection to the control service); ``zone``
    its availability zone, if it has one (the ebs backend's), said in every hello.
    ``on_crl(pem)`` is called with each revocation list the control service sends.
    ``retry_policy(rounds)`` is the wait after the n-th full round of failed replicas;
    ``chance()`` a random number in [0, 1) (which replica comes first).
    """

    def __init__(self, reactor,
                 endpoint: Union[IStreamClientEndpoint, Sequence[IStreamClientEndpoint]],
                 node_uuid: str, era: str,
                 on_view: Callable[[AgentView], object], *,
                 address: Optional[str] = None, peer_port: Optional[int] = DEFAULT_PEER_PORT,
                 zone: Optional[str] = None,
                 view: AgentView = AgentView(),
                 save_view: Optional[Callable[[AgentView], Deferred]] = None,
                 heartbeat: float = DEFAULT_HEARTBEAT, timeout: float = DEFAULT_TIMEOUT,
                 retry_policy: Optional[Callable[[int], float]] = None,
                 max_message: int = MAX_MESSAGE,
                 on_crl: Optional[Callable[[str], object]] = None,
                 names: Optional[Sequence[str]] = None,
                 chance: Callable[[], float] = random.random):
        self.reactor = reactor
        self.endpoints = tuple(endpoint) if isinstance(endpoint, (list, tuple)) \
            else (endpoint,)
        self.names = tuple(names) if names is not None else tuple(
            f"replica-{number}" for number in range(len(self.endpoints)))
        if len(self.names) != len(self.endpoints):
            raise ValueError("give one name per control service endpoint")
        self._chance = chance
        self._order = ReplicaOrder.starting_at(len(self.endpoints), chance())
        #: The name of the replica that last welcomed this agent (None before any).
        self.replica: Optional[str] = None
        self.node_uuid = node_uuid
        self.era = era
        self.address = address
        self.peer_port = peer_port
        self.zone = zone
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.max_message = max_message
        self.view = view
        #: The message that made ``view`` from the view before (a ``Diff``, or a
        #: ``Snapshot``); None for the starting view.
        self.change: Union[Snapshot, Diff, None] = None
        self._on_view = on_view
        self._save_view = save_view
        self._on_crl = on_crl  # issue 8
        self._retry_policy = retry_policy or default_retry_policy()
        # The latest view version known to be stored (the starting view came from disk).
        self.stored: Optional[ViewVersion] = view.current
        #: Protocol 4 (issue 9 point 5): the store revision ``view`` reflects, as the
        #: control service last said for a version it had (None: unknown); sent in the
        #: hello, so that another replica of the same store can resume with a diff.
        self.resume: Optional[StoreRevision] = None
        # (view version, its store revision) the control service last told
        self._told: Optional[tuple[ViewVersion, StoreRevision]] = None
        self._saves = 0
        self._stored_save = 0
        self._state: Optional[tuple[DatasetReport, ...]] = None
        self._running = False
        self._attempt: Optional[Deferred] = None
        self._retry = None
        self._connection: Optional[_ControlConnection] = None
        self._heartbeats: Optional[LoopingCall] = None
        self._silence = None

    @classmethod
    def over_tls(cls, reactor, host: str, port: int, tls_options, node_uuid: str, era: str,
                 on_view: Callable[[AgentView], object], **kwargs) -> "AgentChannel":
        """A channel to ``host:port`` over TLS with ``tls_options`` (``client_tls_options``)."""
        return cls(reactor, tls_client_endpoint(reactor, host, port, tls_options),
                   node_uuid, era, on_view, **kwargs)

    @property
    def endpoint(self) -> IStreamClientEndpoint:
        """The endpoint of the replica this channel uses or tries next."""
        return self._order.pick(self.endpoints)

    @property
    def connected(self) -> bool:
        """Whether the control service has welcomed the current connection."""
        return self._connection is not None and self._connection.welcomed

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Connect, and keep reconnecting until ``stop``."""
        if self._running:
            return
        self._running = True
        self._connect()

    def stop(self) -> Deferred:
        """Stop reconnecting and close the connection; fires once it is closed."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        connection = self._connection
        if connection is None:
            return succeed(None)
        lost = connection.when_lost()
        connection.closing = True
        connection.transport.loseConnection()
        abort = self.reactor.callLater(self.heartbeat, connection.transport.abortConnection)
        return lost.addCallback(lambda _: abort.cancel() if abort.active() else None)

    def report_state(self, datasets: Iterable[DatasetReport]) -> None:
        """Report every dataset this node holds now (sent at once, or on reconnecting)."""
        self._state = tuple(sorted(datasets, key=lambda r: r.dataset_id))
        self._send_state()

    # -- connecting ---------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        attempt = self.endpoint.connect(_ConnectionFactory(self))
        self._attempt = attempt

        def connected(protocol):
            self._attempt = None

        def failed(failure):
            self._attempt = None
            if failure.check(CancelledError) or not self._running:
                return
            log_event(_log, "pyflock:agent:control-unreachable",
                      replica=self._order.pick(self.names), reason=str(failure.value))
            self._fail_over()
        attempt.addCallbacks(connected, failed)

    def _fail_over(self) -> None:
        """The replica in use closed, refused or went silent: try the next one, at once
        unless every replica failed in a row (then after ``retry_policy``)."""
        if not self._running or self._retry is not None:
            return
        self._order, delay = self._order.failed_over()
        if delay:
            delay = self._retry_policy(self._order.rounds)
        log_event(_log, "pyflock:agent:channel-retry", delay=round(delay, 3),
                  rounds=self._order.rounds, replica=self._order.pick(self.names))
        self._retry = self.reactor.callLater(delay, self._connect)

    def _connection_made(self, connection: _ControlConnection) -> None:
        self._connection = connection
        address = self.address or connection.transport.getHost().host
        connection.send(Hello(node_uuid=self.node_uuid, era=self.era, address=address,
                              peer_port=self.peer_port, known=self.view.current,
                              zone=self.zone, resume=self.resume))
        self._silence = self.reactor.callLater(self.timeout, self._silent, connection)

    def _connection_lost(self, connection: _ControlConnection, reason) -> None:
        if connection is not self._connection:
            return
        self._connection = None
        if self._heartbeats is not None and self._heartbeats.running:
            self._heartbeats.stop()
        if self._silence is not None and self._silence.active():
            self._silence.cancel()
        self._silence = None
        log_event(_log, "pyflock:agent:channel-lost", welcomed=connection.welcomed,
                  replica=self._order.pick(self.names), reason=str(reason.value))
        self._fail_over()

    def _silent(self, connection: _ControlConnection) -> None:
        self._silence = None
        log_event(_log, "pyflock:agent:control-silent", timeout=self.timeout)
        connection.closing = True
        connection.transport.abortConnection()

    # -- messages -----------------------------------------------------------------------

    def _received(self, connection: _ControlConnection, message) -> None:
        if self._silence is not None and self._silence.active():
            self._silence.reset(self.timeout)
        if isinstance(message, Error):
            connection.refused = message
            log_event(_log, "pyflock:agent:channel-refused", code=message.code,
                      reason=message.reason, protocol=message.protocol)
            connection.closing = True
            connection.transport.loseConnection()
            return
        if not connection.welcomed:
            if not isinstance(message, Welcome):
                raise BadMessage(f"the control service must answer a hello with a welcome, "
                                 f"not {type(message).__name__}")
            self._welcomed(connection, message)
        elif isinstance(message, Snapshot):
            connection.pages.append(message)
            if message.more:
                return
            pages, connection.pages = connection.pages, []
            snapshot = join_pages(pages)
            connection.syncing = False
            self._set_view(self.view.apply(snapshot), snapshot)
        elif connection.pages:
            raise BadMessage(f"a {type(message).__name__} came before the last page of a "
                             f"snapshot")
        elif isinstance(message, Diff):
            if connection.syncing:
                return
            try:
                view = self.view.apply(message)
            except ViewOutOfStep as e:
                self._resync(connection, str(e))
                return
            self._set_view(view, message)
        elif isinstance(message, Heartbeat):
            self._told_revision(message.view, message.store_revision)
            if connection.promised is not None:
                return  # the snapshot (waiting for its turn) or diffs are still to come
            if not connection.syncing and message.view != self.view.current:
                self._resync(connection, f"the control service is at {message.view}, this "
                                         f"agent at {self.view.current}")
        elif isinstance(message, CRLUpdate):  # issue 8 (protocol 3)
            self._crl_received(message)
        else:
            raise BadMessage(f"the control service does not send "
                             f"{type(message).__name__} messages")

    def _has(self, version: ViewVersion) -> bool:
        """Whether this agent's view is ``version`` or newer (of the same epoch)."""
        current = self.view.current
        return current is not None and current.epoch == version.epoch \
            and current.version >= version.version

    def _welcomed(self, connection: _ControlConnection, welcome: Welcome) -> None:
        connection.welcomed = True
        promised = ViewVersion(welcome.epoch, welcome.version)
        connection.promised = None if self._has(promised) else promised
        # decode has refused a welcome to a version this agent does not speak.
        connection.protocol_version = welcome.protocol
        self._told_revision(ViewVersion(welcome.epoch, welcome.version),
                            welcome.store_revision)
        self._order = self._order.succeeded()
        name = self._order.pick(self.names)
        if self.replica is not None and self.replica != name:
            log_event(_log, "pyflock:agent:control-switched", node_uuid=self.node_uuid,
                      **{"from": self.replica, "to": name})
        self.replica = name
        log_event(_log, "pyflock:agent:channel-connected", node_uuid=self.node_uuid,
                  replica=name,
                  epoch=welcome.epoch, version=welcome.version, protocol=welcome.protocol,
                  snapshot=ViewVersion(welcome.epoch, welcome.version) != self.view.current)
        self._heartbeats = LoopingCall(self._send_heartbeat, connection)
        self._heartbeats.clock = self.reactor
        self._heartbeats.start(self.heartbeat, now=False)
        self._send_state()

    def _resync(self, connection: _ControlConnection, reason: str) -> None:
        log_event(_log, "pyflock:agent:view-out-of-step", reason=reason)
        connection.syncing = True
        connection.send(SyncRequest())

    def _send_heartbeat(self, connection: _ControlConnection) -> None:
        # Until this connection carried a report, a stored version would vouch for a
        # report the control service may not have.
        view = self.stored if connection.sent_state is not None else None
        connection.send(Heartbeat(view=view))

    def _send_state(self) -> None:
        connection = self._connection
        if connection is None or not connection.welcomed or self._state is None:
            return
        if connection.sent_state == self._state:
            return
        connection.sent_state = self._state
        connection.send(StateReport(node_uuid=self.node_uuid, datasets=self._state,
                                    view=self.stored))

    def _crl_received(self, update: CRLUpdate) -> None:
        """Hand a revocation list on to ``on_crl`` (issue 8)."""
        if self._on_crl is None:
            return
        try:
            self._on_crl(update.crl)
        except Exception:
            _log.failure("the revocation list callback failed",
                         event_type="pyflock:agent:crl-callback-failed")

    # -- the view -----------------------------------------------------------------------

    def _told_revision(self, version: Optional[ViewVersion],
                       point: Optional[StoreRevision]) -> None:
        """The control service says ``version`` reflects store revision ``point``."""
        if version is not None and point is not None:
            self._told = (version, point)
            self._resume_point()

    def _resume_point(self) -> None:
        # An older resume point stays true of a newer view of the same line (it reflects
        # at least as much); a snapshot starts a line of its own.
        if self._told is not None and self._told[0] == self.view.current:
            self.resume = self._told[1]

    def _set_view(self, view: AgentView, change: Union[Snapshot, Diff]) -> None:
        self.view = view
        self.change = change
        connection = self._connection
        if connection is not None and connection.promised is not None \
                and self._has(connection.promised):
            connection.promised = None
        if isinstance(change, Snapshot):
            self.resume = None
        self._resume_point()
        try:
            self._on_view(view)
        except Exception:
            _log.failure("the view callback failed",
                         event_type="pyflock:agent:view-callback-failed")
        if self._save_view is None:
            self.stored = view.current
            return
        self._saves += 1
        number = self._saves

        def saved(_):
            # Saves may finish out of order; a late one must not move ``stored`` back.
            if number > self._stored_save:
                self._stored_save = number
                self.stored = view.current

        def failed(failure):
            log_event(_log, "pyflock:agent:view-save-failed", reason=str(failure.value),
                      version=view.version)
        maybeDeferred(self._save_view, view).addCallbacks(saved, failed)


__all__ = ["AgentChannel", "DEFAULT_HEARTBEAT", "DEFAULT_PEER_PORT", "DEFAULT_TIMEOUT",
           "control_endpoint", "default_retry_policy"]
