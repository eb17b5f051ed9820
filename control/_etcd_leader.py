"""
The leader election's IO shell on etcd (issue 9, point 4; the pure core is ``_election``).

Each replica asks etcd for a lease of ``ttl`` seconds (``--leader-ttl``) and keeps it alive
every ``ttl / 3`` seconds; it puts its campaign key ``election/<lease id>`` (holding its
replica name) bound to that lease if absent, and reads every campaign key: the one with the
lowest create revision leads. A follower reads them again every ``ttl / 3`` seconds, so it
leads within about a TTL of the leader's lease running out. A leader does not read: it
learns that it lost its lease from a keep-alive, or from a leader-only write refused by
its fence (``fenced``), never from its clock alone. What a replica does as leader starts
and stops through ``on_change``.

The leader also compacts etcd's history (``compaction_retention`` seconds kept): it notes
the etcd revision now and then and compacts to the one noted ``compaction_retention``
seconds ago, as etcd's own periodic auto-compaction does.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

from pyflock.common._logging import log_event
from pyflock.control._election import (
    LEADING, Campaign, Candidate, Candidates, Election, Grant, Granted, Lead, LeaseLost,
    Renewed, RenewFailed, Revoke, Started, StepDown, Stopped, WriteFenced,
    compaction_target, keep_samples,
)
from pyflock.control._etcd_client import EtcdError, EtcdGateway, EtcdUnavailable, describe
from pyflock.control._etcd_model import (
    COMPACTED_CODE, Keys, compare, fence_broken, fence_compares, get, header_revision,
    keepalive_ttl, prefix_end, put, responses, txn,
)
from pyflock.control._store import Fenced

#: The default TTL of a replica's etcd lease: a dead leader is replaced within about this.
DEFAULT_LEADER_TTL = 10.0

#: The default seconds of etcd history the leader keeps when it compacts.
DEFAULT_COMPACTION_RETENTION = 3600.0

#: Samples of the etcd revision per compaction retention.
COMPACTION_SAMPLES = 12

_log = Logger()


class EtcdLeadership:
    """
    One replica's part in the election under ``keys.election``, through ``gateway``; its
    name is ``name``. ``leading``, ``leader`` (the leading replica's name, None while
    unknown), ``fence`` and ``settled(now, grace)`` tell where it stands;
    ``on_change(callback)`` calls ``callback(leading)`` whenever that changes.
    """

    def __init__(self, reactor: Any, gateway: EtcdGateway, keys: Keys, name: str,
                 ttl: float = DEFAULT_LEADER_TTL,
                 compaction_retention: float = DEFAULT_COMPACTION_RETENTION):
        self._reactor = reactor
        self._gateway = gateway
        self._keys = keys
        self.name = name
        self.election = Election(ttl=ttl)
        self._listeners: list[Callable[[bool], None]] = []
        self._loop: Optional[LoopingCall] = None
        # etcd exchanges under way (a grant or campaign may start within another)
        self._busy = 0
        self._revoking: Optional[Deferred] = None
        self._stopped = False
        self._retention = compaction_retention
        self._samples: tuple[tuple[float, int], ...] = ()
        self._compacting: Optional[LoopingCall] = None

    # -- what the rest of the service reads ------------------------------------------------

    @property
    def leading(self) -> bool:
        """Whether this replica leads now."""
        return self.election.leading

    @property
    def state(self) -> str:
        """campaigning, leading, following or fenced."""
        return self.election.state

    @property
    def leader(self) -> Optional[str]:
        """The name of the replica that leads, as last read (None: not known)."""
        return self.election.leader

    @property
    def fence(self):
        """The fence leader-only writes carry (None unless leading)."""
        return self.election.fence

    def settled(self, now: float, grace: float) -> bool:
        """Whether it has led for ``grace`` seconds at least."""
        return self.election.settled(now, grace)

    def on_change(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(leading)`` when this replica starts or stops leading."""
        self._listeners.append(callback)

    def fenced(self, fence) -> None:
        """A leader-only write with ``fence`` was refused for it: step down (unless done
        already) and campaign again."""
        log_event(_log, "pyflock:control:leader-fenced", LogLevel.warn, replica=self.name,
                  fence_revision=fence.revision, leading=self.leading)
        self._handle(WriteFenced())

    async def write_fenced(self, gateway: EtcdGateway, request: dict) -> dict:
        """
        Send the ``kv/txn`` ``request`` (a leader-only write of another part of the service)
        through ``gateway`` with the leader's fence added to its compares; its answer.
        ``Fenced`` (and this replica steps down) when it no longer leads or the fence no
        longer holds; a refusal for the request's own compares answers as etcd did.
        """
        fence = self.fence
        if fence is None:
            raise Fenced(f"replica {self.name} does not lead; nothing was written")
        answer = await gateway.call("kv/txn", dict(
            request, compare=list(request.get("compare", [])) + fence_compares(fence),
            failure=list(request.get("failure", [])) + [get(fence.key)]))
        if fence_broken(answer, fence):
            self.fenced(fence)
            raise Fenced(f"replica {self.name} no longer leads (its campaign key, created "
                         f"at etcd revision {fence.revision}, is gone); nothing was written")
        if not answer.get("succeeded"):
            answer = dict(answer, responses=answer.get("responses", [])[:-1])
        return answer

    # -- running ---------------------------------------------------------------------------

    def start(self) -> None:
        """Campaign, and keep the lease alive (and read the candidates) every TTL / 3."""
        self._handle(Started())
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._reactor
        self._loop.start(self.election.ttl / 3, now=False)

    def stop(self) -> Deferred:
        """Stop leading and campaigning; revoke the lease (so another leads at once)."""
        self._stopped = True
        for loop in (self._loop, self._compacting):
            if loop is not None and loop.running:
                loop.stop()
        self._handle(Stopped())
        revoking, self._revoking = self._revoking, None
        return revoking if revoking is not None else Deferred.fromCoroutine(_nothing())

    def _handle(self, event) -> None:
        was = self.election.leading
        self.election, actions = self.election.on(event)
        for action in actions:
            self._act(action)
        if self.election.leading != was:
            for listener in self._listeners:
                listener(self.election.leading)

    def _act(self, action) -> None:
        if isinstance(action, Lead):
            log_event(_log, "pyflock:control:leader-elected", replica=self.name,
                      fence_revision=action.fence.revision)
            self._start_compacting()
        elif isinstance(action, StepDown):
            log_event(_log, "pyflock:control:leader-stepped-down", LogLevel.warn,
                      replica=self.name, reason=action.reason)
            if self._compacting is not None and self._compacting.running:
                self._compacting.stop()
        elif isinstance(action, Revoke):
            self._revoking = Deferred.fromCoroutine(self._revoke(action.lease))
        elif isinstance(action, Grant) and not self._stopped:
            self._spawn(self._grant())
        elif isinstance(action, Campaign) and not self._stopped:
            self._spawn(self._campaign(action.lease))

    def _spawn(self, coroutine) -> None:
        """Run one etcd exchange at a time; its failure is logged, and retried on a tick."""
        self._busy += 1
        d = Deferred.fromCoroutine(coroutine)

        def failed(failure):
            log_event(_log, "pyflock:control:election-failed", LogLevel.warn,
                      replica=self.name, reason=describe(failure.value))
        d.addErrback(failed)
        d.addBoth(self._done)

    def _done(self, _) -> None:
        self._busy -= 1

    def _tick(self) -> None:
        """Keep the lease alive; a follower (or a campaign that failed) reads again."""
        if self._busy or self._stopped:
            return
        lease = self.election.lease
        if lease is None:
            self._spawn(self._grant())
            return
        self._spawn(self._renew(lease, campaign=self.election.state != LEADING))

    # -- etcd exchanges --------------------------------------------------------------------

    async def _grant(self) -> None:
        answer = await self._gateway.call("lease/grant",
                                          {"TTL": str(max(1, round(self.election.ttl)))})
        self._handle(Granted(int(answer["ID"]), self._reactor.seconds()))

    async def _renew(self, lease: int, campaign: bool) -> None:
        now = self._reactor.seconds()
        try:
            answer = await self._gateway.call("lease/keepalive", {"ID": str(lease)},
                                              deadline=self.election.ttl / 3)
        except (EtcdError, EtcdUnavailable):
            self._handle(RenewFailed(self._reactor.seconds()))
            raise
        if lease != self.election.lease:
            return
        if keepalive_ttl(answer) <= 0:
            self._handle(LeaseLost())
            return
        self._handle(Renewed(now))
        if campaign:
            await self._campaign(lease)

    async def _campaign(self, lease: int) -> None:
        """Put our key unless it exists, and read every candidate, in one transaction."""
        keys = self._keys
        own = keys.election + format(lease, "x").encode("ascii")
        candidates = get(keys.election, prefix_end(keys.election))
        answer = await self._gateway.call("kv/txn", txn(
            compares=[compare(own, "CREATE", "EQUAL", 0)],
            success=[{"request_put": dict(put(own, self.name.encode("utf-8"))["request_put"],
                                          lease=str(lease))}, candidates],
            failure=[candidates]))
        if lease != self.election.lease:
            return
        found = [Candidate(kv.key, kv.value.decode("utf-8", "replace"), kv.create_revision)
                 for kv in responses(answer)[-1]]
        mine = next((c for c in found if c.key == own), None)
        if answer.get("succeeded") and mine is None:
            # The put and the read are one transaction: ours is there; say so plainly.
            mine = Candidate(own, self.name, header_revision(answer))
            found.append(mine)
        self._handle(Candidates(mine, tuple(found), self._reactor.seconds()))

    async def _revoke(self, lease: int) -> None:
        try:
            await self._gateway.call("lease/revoke", {"ID": str(lease)}, deadline=2.0)
        except Exception as e:
            log_event(_log, "pyflock:control:election-failed", LogLevel.warn,
                      replica=self.name, reason=f"revoking the lease: {describe(e)}")

    # -- compaction ------------------------------------------------------------------------

    def _start_compacting(self) -> None:
        self._samples = ()
        if self._compacting is not None and self._compacting.running:
            return
        self._compacting = LoopingCall(lambda: Deferred.fromCoroutine(self._compact()))
        self._compacting.clock = self._reactor
        self._compacting.start(self._retention / COMPACTION_SAMPLES, now=True)

    async def _compact(self) -> None:
        """Note the etcd revision now; compact to the one noted a retention ago."""
        try:
            answer = await self._gateway.call("kv/range", {"key": "AA==", "limit": "1",
                                                          "count_only": True})
            now = self._reactor.seconds()
            self._samples = self._samples + ((now, header_revision(answer)),)
            target = compaction_target(self._samples, now, self._retention)
            self._samples = keep_samples(self._samples, now, self._retention)
            if target is None or not self.leading:
                return
            await self._gateway.call("kv/compaction", {"revision": str(target)})
            log_event(_log, "pyflock:control:etcd-compacted", revision=target)
        except EtcdError as e:
            if e.code != COMPACTED_CODE:  # compacted further already: nothing to do
                log_event(_log, "pyflock:control:etcd-compaction-failed", LogLevel.warn,
                          reason=str(e))
        except EtcdUnavailable as e:
            log_event(_log, "pyflock:control:etcd-compaction-failed", LogLevel.warn,
                      reason=str(e))


async def _nothing() -> None:
    return None


__all__ = ["EtcdLeadership", "DEFAULT_LEADER_TTL", "DEFAULT_COMPACTION_RETENTION"]
