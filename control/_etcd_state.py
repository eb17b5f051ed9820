"""
Shared cluster state on etcd, the IO shell (issue 9, point 3; the keys and the rules are
in ``control/_etcd_state_model.py``).

``SharedReports`` holds an etcd lease of its own (``--state-lease-ttl``, kept alive every
third of it) and announces the replica under ``P replicas/<name>`` with it. The agent
channel calls ``claim`` when an agent says hello, ``publish`` when its report changes
(never on a heartbeat) and ``withdraw`` when it goes silent; each puts or deletes the
node's report, bound to the lease. Writes leave one at a time; a later one for the same
node replaces one still waiting, so a burst of changes costs one write. A watch on the
reports tells it what the other replicas publish, handed to ``merge`` (the agent
channel's ``shared.merge``). When the lease is lost (etcd expired it while this replica
could not reach etcd), a new one is taken and every node this replica publishes is
claimed again.

Death (``follow_leader``, ``_Deaths``). A node whose report vanished stays as it was
until the leader marks it dead: the leader puts ``P state/dead/<uuid>`` with its fence
while the report is still absent, and every replica wipes the node when its watch shows
the mark, the one that withdrew the report too. A replica that starts leading marks the
nodes still waiting; a replica that never saw the node (it started since) lists it dead
as the mark describes it; a replica that forgets a dead node deletes its mark
(``forget``), and every other replica whose watch shows the mark deleted with no report
of the node in the same batch (a claim puts one in the transaction deleting the mark)
forgets it too (``on_forgotten``), writing nothing. Without an election (no ``follow_leader``), a replica wipes a vanished node
at once.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger, LogLevel

from pyflock.common._jsonread import Malformed
from pyflock.common._logging import log_event
from pyflock.control._clusterstate import NodeState
from pyflock.control._etcd_client import EtcdError, describe
from pyflock.control._etcd_model import Keys, keepalive_ttl, unb64
from pyflock.control._etcd_state_model import (
    DEAD, DEFAULT_STATE_LEASE_TTL, IGNORE, LOST, REMOTE, VANISHED, ReplicaInfo,
    ReportEvent, claim_request, claimed_elsewhere, control_status, death_request,
    decode_replica, decode_report, encode_death, forget_request, judge, leader_name,
    member_json, publish_request, range_events, read_watch_line, replica_request,
    reports_range, resync_events, status_request, watch_request, withdraw_outcome,
    withdraw_request,
)
from pyflock.control._etcd_watch import WATCH_RETRY, _Lines, stream_lines
from pyflock.control._store import Fenced

_log = Logger()

#: The kinds of a waiting write, and what a later one for the same node makes of it.
CLAIM, PUBLISH, WITHDRAW, FORGET = "claim", "publish", "withdraw", "forget"


class SharedReports:
    """
    One replica's part in the shared cluster state (see the module's docstring):
    ``replica`` is announced, ``merge(uuid, node_or_None)`` is told of the other replicas'
    reports and of deaths (``merge(uuid, None, last)``: a dead node this replica never saw,
    as ``last`` published). ``writes`` counts the report writes sent to etcd.
    """

    def __init__(self, reactor: Any, gateway: Any, keys: Keys, replica: ReplicaInfo,
                 ttl: float = DEFAULT_STATE_LEASE_TTL):
        self._reactor = reactor
        self._gateway = gateway
        self._keys = keys
        self.replica = replica
        self._ttl = ttl
        self.lease = 0
        self._merge: Callable[..., None] = lambda uuid, node, last=None: None
        # node uuid -> the etcd revision of this replica's latest write of its report
        self._owned: dict[str, int] = {}
        # node uuid -> what this replica last wrote (or waits to write) of it
        self._published: dict[str, NodeState] = {}
        # node uuid -> the node as another replica publishes it
        self._remote: dict[str, NodeState] = {}
        # node uuid -> (kind, node): writes waiting; events held while one waits
        self._waiting: dict[str, tuple[str, Optional[NodeState]]] = {}
        self._held: dict[str, list[ReportEvent]] = {}
        self._writing = False
        self._watched = 0
        self._compacted = False
        self._stream: Optional[_Lines] = None
        self._watching: Optional[Deferred] = None
        self._keepalive: Optional[LoopingCall] = None
        self._renewing = False
        self._stopped = False
        self.writes = 0
        self.deaths = _Deaths(self)  # issue 9 point 4
        # Issue 9 point 5 (the agent channel's ``StoreResume``): the etcd revision of the
        # first full read, and told the revision by which every write so far is in etcd.
        self.loaded = 0
        self.on_published: Callable[[int], None] = lambda revision: None
        #: Told the uuid of a dead node another replica forgot (the agent channel's).
        self.on_forgotten: Callable[[str], None] = lambda uuid: None
        self._written = 0

    @property
    def watched(self) -> int:
        """The etcd revision up to which every report event has been applied."""
        return self._watched

    def follow_leader(self, leadership: Any) -> None:
        """Leave marking nodes dead to the leader of ``leadership`` (``EtcdLeadership``)."""
        self.deaths.leadership = leadership
        leadership.on_change(self.deaths.leading)

    def shows(self, uuid: str) -> bool:
        """Whether node ``uuid``'s report is published, by this replica or another."""
        return uuid in self._remote or uuid in self._published or uuid in self._waiting

    # -- life cycle ------------------------------------------------------------------------

    async def start(self, merge: Callable[..., None]) -> None:
        """Take a lease, announce the replica, merge every report published, and from
        then on keep the lease alive and follow the reports."""
        self._merge = merge
        await self._grant()
        await self._resync()
        self._watching = Deferred.fromCoroutine(self._watch_forever())
        self._keepalive = LoopingCall(self._renew)
        self._keepalive.clock = self._reactor
        self._keepalive.start(self._ttl / 3, now=False)

    async def stop(self) -> None:
        """Stop following and revoke the lease: this replica's reports go at once."""
        self._stopped = True
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        if self._stream is not None:
            self._stream.abort()
        if self._watching is not None:
            await self._watching
        try:
            await self._gateway.call("lease/revoke", {"ID": str(self.lease)}, deadline=2.0)
        except Exception as e:
            log_event(_log, "pyflock:control:state-lease-revoke-failed", LogLevel.warn,
                      reason=describe(e))

    async def _grant(self) -> None:
        answer = await self._gateway.call("lease/grant", {"TTL": str(max(2, round(self._ttl)))})
        self.lease = int(answer["ID"])
        await self._gateway.call("kv/txn", replica_request(self._keys, self.replica,
                                                           self.lease))
        log_event(_log, "pyflock:control:state-lease", lease=self.lease, ttl=self._ttl,
                  replica=self.replica.name)

    def _renew(self) -> Deferred:
        return Deferred.fromCoroutine(self._renew_once())

    async def _renew_once(self) -> None:
        """Keep the lease alive; a lease etcd no longer has is replaced and every node this
        replica publishes claimed again."""
        if self._renewing or self._stopped:
            return
        self._renewing = True
        try:
            answer = await self._gateway.call("lease/keepalive", {"ID": str(self.lease)},
                                              deadline=self._ttl / 3)
            if keepalive_ttl(answer) > 0:
                return
            log_event(_log, "pyflock:control:state-lease-lost", LogLevel.warn,
                      lease=self.lease, nodes=len(self._published))
            await self._grant()
            self._owned.clear()
            for uuid, node in self._published.items():
                self._queue(uuid, CLAIM, node)
        except Exception as e:
            log_event(_log, "pyflock:control:state-lease-renew-failed", LogLevel.warn,
                      reason=describe(e))
        finally:
            self._renewing = False

    # -- the agent channel's hooks ---------------------------------------------------------

    def claim(self, node: NodeState) -> None:
        """``node``'s agent said hello here: publish its report, whoever published it."""
        self._published[node.uuid] = node
        self._remote.pop(node.uuid, None)
        self.deaths.vanished.pop(node.uuid, None)
        self._queue(node.uuid, CLAIM, node)

    def publish(self, node: NodeState) -> None:
        """``node``'s report changed: publish it while this replica still holds it."""
        self._published[node.uuid] = node
        self._queue(node.uuid, PUBLISH, node)

    def withdraw(self, node: NodeState) -> None:
        """``node`` went silent here: delete its report unless another replica has claimed
        it since; it is dead once the leader marks it (the agent channel's ``merge``)."""
        self._published.pop(node.uuid, None)
        self._owned.pop(node.uuid, None)
        self._queue(node.uuid, WITHDRAW, node)

    def forget(self, uuid: str) -> None:
        """Dead node ``uuid`` was forgotten here: delete the leader's mark of its death, so
        that the marks do not pile up and no replica starting later lists it again."""
        self.deaths.vanished.pop(uuid, None)
        self._queue(uuid, FORGET, None)

    def _queue(self, uuid: str, kind: str, node: Optional[NodeState]) -> None:
        before = self._waiting.pop(uuid, None)
        if before is not None and before[0] == CLAIM and kind == PUBLISH:
            kind = CLAIM  # the claim still has to happen; with the newer report
        self._waiting[uuid] = (kind, node)
        if not self._writing:
            self._writing = True
            Deferred.fromCoroutine(self._write_all())

    async def _write_all(self) -> None:
        try:
            while self._waiting and not self._stopped:
                uuid = next(iter(self._waiting))
                kind, node = self._waiting[uuid]
                try:
                    await self._write(uuid, kind, node)
                except Exception as e:
                    log_event(_log, "pyflock:control:state-publish-failed", LogLevel.warn,
                              node_uuid=uuid, kind=kind, reason=describe(e))
                    if isinstance(e, EtcdError):
                        await self._renew_once()  # say, the lease is gone
                    await deferLater(self._reactor, WATCH_RETRY, lambda: None)
                    continue
                if self._waiting.get(uuid) == (kind, node):
                    del self._waiting[uuid]
                self._release(uuid)
            if not self._waiting and self._written:
                self.on_published(self._written)
        finally:
            self._writing = False

    async def _write(self, uuid: str, kind: str, node: Optional[NodeState]) -> None:
        self.writes += 1
        answer = await self._write_once(uuid, kind, node)
        if answer is not None and "header" in answer:
            self._written = max(self._written, int(answer["header"]["revision"]))

    async def _write_once(self, uuid: str, kind: str, node: Optional[NodeState]):
        if kind == FORGET:
            return await self._gateway.call("kv/txn", forget_request(self._keys, uuid))
        if kind == WITHDRAW:
            answer = await self._gateway.call("kv/txn", withdraw_request(self._keys, uuid,
                                                                         self.lease))
            self.deaths.withdrawn(node, withdraw_outcome(answer),
                                  int(answer["header"]["revision"]))
            return answer
        request = (claim_request if kind == CLAIM else publish_request)(
            self._keys, self.replica.name, node, self.lease)
        answer = await self._gateway.call("kv/txn", request)
        if answer.get("succeeded"):
            self._owned[uuid] = int(answer["header"]["revision"])
        elif claimed_elsewhere(answer):
            # Another replica claimed it since: its report is the current one.
            self._owned.pop(uuid, None)
            self._published.pop(uuid, None)
        else:
            self.writes += 1  # the key is gone (this replica's lease was): claim it again
            answer = await self._gateway.call("kv/txn", claim_request(
                self._keys, self.replica.name, node, self.lease))
            self._owned[uuid] = int(answer["header"]["revision"])
        return answer

    def _release(self, uuid: str) -> None:
        """Judge the events held while a write of ``uuid``'s report was waiting."""
        if uuid not in self._waiting:
            self._apply_all(self._held.pop(uuid, []))

    def _apply_all(self, events) -> None:
        """Apply a batch of events (one watch message, the events held for a node, a full
        read), then settle what only the whole batch tells (``_Deaths.settle``)."""
        for event in events:
            self._apply(event)
        self.deaths.settle()

    # -- other replicas' reports -----------------------------------------------------------

    def _apply(self, event: ReportEvent) -> None:
        uuid = event.node_uuid
        waiting = self._waiting.get(uuid)
        # A mark waits for a withdrawal too: it may come before the withdrawal's answer.
        if waiting is not None and (waiting[0] != WITHDRAW or event.death):
            self._held.setdefault(uuid, []).append(event)
            return
        if event.death:
            self.deaths.marked(event)
            return
        verdict = judge(event, self.lease, self._owned.get(uuid), uuid in self._remote)
        if verdict == REMOTE:
            try:
                node = decode_report(uuid, event.value or b"", self._reactor.seconds())
            except Malformed as e:
                log_event(_log, "pyflock:control:state-report-unreadable", LogLevel.warn,
                          node_uuid=uuid, reason=str(e))
                return
            self._owned.pop(uuid, None)
            self._published.pop(uuid, None)
            self._remote[uuid] = node
            self.deaths.vanished.pop(uuid, None)
            self._merge(uuid, node)
        elif verdict == VANISHED:
            self.deaths.vanish(self._remote.pop(uuid), event.revision)
        elif verdict == LOST:
            self._owned.pop(uuid, None)
            Deferred.fromCoroutine(self._renew_once())
        else:
            assert verdict == IGNORE

    async def _resync(self) -> None:
        """Read every report and apply it as if the watch had told it."""
        revision, present = range_events(self._keys, await self._gateway.call(
            "kv/range", reports_range(self._keys)))
        # Watched first: what the events change is stamped no older than their revision.
        self._watched = revision
        self._apply_all(resync_events(present, set(self._remote) | set(self._owned),
                                      revision, set(self.deaths.marks)))
        self.loaded = self.loaded or revision

    async def _watch_forever(self) -> None:
        while not self._stopped:
            try:
                if self._compacted:
                    # Compacted past the watch: read everything again, then watch on.
                    await self._resync()
                    self._compacted = False
                await self._watch_once()
            except Exception as e:
                log_event(_log, "pyflock:control:state-watch-failed", LogLevel.warn,
                          endpoint=self._gateway.endpoint, reason=describe(e))
            if not self._stopped:
                await deferLater(self._reactor, WATCH_RETRY, lambda: None)

    async def _watch_once(self) -> None:
        def opened(stream: Optional[_Lines]) -> None:
            self._stream = stream
            if stream is not None and self._stopped:
                stream.abort()
        await stream_lines(self._gateway, watch_request(self._keys, self._watched + 1),
                           self._line, opened)

    def _line(self, line: bytes) -> None:
        try:
            message = read_watch_line(self._keys, line)
        except ValueError as e:
            log_event(_log, "pyflock:control:state-watch-failed", LogLevel.warn,
                      reason=str(e))
            message = None
        if message is not None and message.kind == "events":
            self._watched = max(self._watched, message.revision)
            self._apply_all(message.events)
            return
        if message is None or message.kind in ("canceled", "error"):
            if message is not None and message.kind == "canceled":
                self._compacted = bool(message.revision)
            elif message is not None:
                self._gateway.skip(self._gateway.endpoint)
            if self._stream is not None:
                self._stream.abort()

    # -- GET /v1/state/control -------------------------------------------------------------

    async def status(self) -> dict:
        """The replicas announced, the one leading and the etcd members."""
        answer = await self._gateway.call("kv/txn", status_request(self._keys))
        found = [r.get("response_range", {}).get("kvs", []) for r in answer["responses"]]
        replicas = [r for r in (decode_replica(unb64(kv.get("value"))) for kv in found[0])
                    if r is not None]
        try:
            members = await self._gateway.call("cluster/member/list", {})
            listed, error = [member_json(m) for m in members.get("members", [])], None
        except Exception as e:
            listed, error = None, describe(e)
        return control_status(self.replica.name, "etcd", replicas, leader_name(found[1]),
                              listed, error)


class _Deaths:
    """
    Issue 9 point 4: a replica's part in nodes' deaths (its reports' ``deaths``). Nodes
    whose report vanished wait in ``vanished`` (uuid -> the leader's mark of its death,
    ``encode_death``) until the mark is in etcd; the leader of ``leadership`` puts it
    (``marking`` those under way); every replica wipes them when its watch shows it.
    Marks deleted wait in ``unmarked`` until their batch is applied (``settle``);
    ``marks`` are the nodes whose mark was last seen put (a full read misses no delete).
    """

    def __init__(self, reports: SharedReports):
        self._reports = reports
        #: The election (None: none, this replica judges deaths alone).
        self.leadership: Any = None
        self.vanished: dict[str, bytes] = {}
        self.marking: set[str] = set()
        self.unmarked: set[str] = set()
        self.marks: set[str] = set()

    def vanish(self, node: NodeState, revision: int) -> None:
        """``node``'s report vanished at etcd ``revision``: it waits for the leader's mark
        (this replica may lead), or without an election is dead at once."""
        reports = self._reports
        if self.leadership is None:
            reports._merge(node.uuid, None)
            return
        self.vanished[node.uuid] = encode_death(node.remote or reports.replica.name, node,
                                                revision)
        self._mark(node.uuid)

    def withdrawn(self, node: NodeState, outcome: str, revision: int) -> None:
        """This replica's withdrawal of ``node``'s report had ``outcome`` (a
        ``withdraw_outcome``) at etcd ``revision``."""
        if node.uuid in self._reports._published:
            return  # its agent said hello here again meanwhile: claimed once more
        if outcome == VANISHED:
            self.vanish(node, revision)
        elif outcome == DEAD:  # marked while this replica's lease was gone: dead already
            self._dead(node.uuid)
        # else another replica claimed it since: its report comes in the watch

    def marked(self, event: ReportEvent) -> None:
        """The watch (or a full read) shows the leader's mark of a node's death put (or
        deleted: a claim, or a replica forgetting the node; judged by ``settle``)."""
        uuid, reports = event.node_uuid, self._reports
        if event.value is None:
            self.marks.discard(uuid)
            self.unmarked.add(uuid)
            return
        self.marks.add(uuid)
        self.unmarked.discard(uuid)
        if self.vanished.pop(uuid, None) is not None:
            self._dead(uuid)
        elif not reports.shows(uuid):
            # Its report vanished before this replica started: listed dead, as marked.
            try:
                node = decode_report(uuid, event.value, reports._reactor.seconds())
            except Malformed as e:
                log_event(_log, "pyflock:control:state-report-unreadable", LogLevel.warn,
                          node_uuid=uuid, reason=str(e))
                return
            self._dead(uuid, node)

    def settle(self) -> None:
        """A batch of events is applied: a node whose mark was deleted and that has no
        report is forgotten here too, as another replica forgot it (``on_forgotten``,
        which writes nothing: the mark is gone already)."""
        # Judged after the whole batch, not at the mark's delete event: a claim deletes
        # the mark and puts the report in one transaction, so both come in one watch
        # message (etcd keeps a revision's events together), but in the order of the
        # transaction's operations, which is no promise this code should lean on. The
        # watch applies a message's events one by one and synchronously, so the end of
        # that loop (``SharedReports._apply_all``) is the batch's end; a later reactor
        # turn (``callLater(0)``) would also be after it, but after further messages
        # too, and would need cancelling on stop. A node whose events are held while
        # this replica writes its report is judged when they are released, its batch.
        reports, unmarked = self._reports, self.unmarked
        self.unmarked = set()
        for uuid in sorted(unmarked):
            if (reports.shows(uuid) or uuid in self.vanished or uuid in reports._held
                    or uuid in reports._owned):
                continue  # claimed, or its report vanished again: not forgotten
            reports.on_forgotten(uuid)  # logged if forgotten: the replica that forgot
            # it sees its own delete too, and finds the node gone already

    def _dead(self, uuid: str, node: Optional[NodeState] = None) -> None:
        log_event(_log, "pyflock:control:node-dead-marked", node_uuid=uuid,
                  replica=self._reports.replica.name)
        self._reports._merge(uuid, None, node)

    def leading(self, leading: bool) -> None:
        """The election's news: a replica that starts leading marks every node waiting."""
        if leading:
            for uuid in list(self.vanished):
                self._mark(uuid)

    def _mark(self, uuid: str) -> None:
        if self.leadership.leading and uuid not in self.marking:
            self.marking.add(uuid)
            d = Deferred.fromCoroutine(self._mark_once(uuid))
            d.addBoth(lambda _: self.marking.discard(uuid))

    async def _mark_once(self, uuid: str) -> None:
        """As leader, mark ``uuid`` dead (fenced) while its report is absent; retried
        after an etcd failure while it still leads and the node still waits."""
        reports = self._reports
        while uuid in self.vanished and not reports._stopped and self.leadership.leading:
            try:
                answer = await self.leadership.write_fenced(reports._gateway, death_request(
                    reports._keys, uuid, self.vanished[uuid]))
                log_event(_log, "pyflock:control:node-dead-written", node_uuid=uuid,
                          written=bool(answer.get("succeeded")))
                return
            except Fenced:
                return
            except Exception as e:
                log_event(_log, "pyflock:control:node-dead-write-failed", LogLevel.warn,
                          node_uuid=uuid, reason=describe(e))
                await deferLater(reports._reactor, WATCH_RETRY, lambda: None)


__all__ = ["SharedReports"]
