"""
The pure core of the leader election among control service replicas (issue 9, point 4),
after etcd's election recipe: each replica holds an etcd lease and puts one campaign key
bound to it under the election prefix; the key with the lowest create revision leads. The
leader's timed work (lease expiry, purging, forgetting dead nodes, pruning, compaction)
writes only with a ``Fence``: a compare on its campaign key's create revision in the same
transaction, so a leader whose lease ran out while it was paused cannot write when it wakes.

``Election.on(event)`` answers the next election and the actions to take; it does no IO
and takes the time from events. States:

- ``campaigning``: no lease yet, or a lease whose campaign key is being put and read;
- ``leading``: our key has the lowest create revision;
- ``following``: another key is lower; the replica reads the candidates again and again
  until it leads;
- ``fenced``: a leader-only write was refused (our key is gone): the replica stepped down
  and campaigns with a new lease.

``_etcd_leader`` is the IO shell on etcd; on SQLite the one process always leads
(``SOLE_LEADER``).
"""

from __future__ import annotations

from typing import Optional

import attr

CAMPAIGNING = "campaigning"
LEADING = "leading"
FOLLOWING = "following"
FENCED = "fenced"


@attr.s(frozen=True, auto_attribs=True)
class Fence:
    """What a leader-only write compares: the leader's campaign key and its create
    revision (the write is refused unless that key still exists, created then)."""

    key: bytes
    revision: int


@attr.s(frozen=True, auto_attribs=True)
class Candidate:
    """One campaign key: its key, the replica's name it holds, and its create revision."""

    key: bytes
    name: str
    revision: int


# -- events ----------------------------------------------------------------------------------

@attr.s(frozen=True, auto_attribs=True)
class Started:
    """The replica starts campaigning."""


@attr.s(frozen=True, auto_attribs=True)
class Granted:
    """etcd granted lease ``lease`` at ``now``."""

    lease: int
    now: float


@attr.s(frozen=True, auto_attribs=True)
class Candidates:
    """The campaign keys read (after putting ours if absent): ours is ``own`` (None: gone)."""

    own: Optional[Candidate]
    all: tuple[Candidate, ...]
    now: float


@attr.s(frozen=True, auto_attribs=True)
class Renewed:
    """A keep-alive of the lease answered at ``now`` that it lives."""

    now: float


@attr.s(frozen=True, auto_attribs=True)
class LeaseLost:
    """etcd answered that the lease is gone (it ran out, or was revoked)."""


@attr.s(frozen=True, auto_attribs=True)
class RenewFailed:
    """No member answered a keep-alive at ``now``."""

    now: float


@attr.s(frozen=True, auto_attribs=True)
class WriteFenced:
    """A leader-only write was refused: the fence's key is gone or was created again."""


@attr.s(frozen=True, auto_attribs=True)
class Stopped:
    """The replica stops."""


# -- actions ---------------------------------------------------------------------------------

@attr.s(frozen=True, auto_attribs=True)
class Grant:
    """Ask etcd for a new lease."""


@attr.s(frozen=True, auto_attribs=True)
class Campaign:
    """Put our campaign key (bound to ``lease``) unless it exists, and read the candidates."""

    lease: int


@attr.s(frozen=True, auto_attribs=True)
class Lead:
    """Start the timed work, writing with ``fence``."""

    fence: Fence


@attr.s(frozen=True, auto_attribs=True)
class StepDown:
    """Stop the timed work at once; ``reason`` goes to the log."""

    reason: str


@attr.s(frozen=True, auto_attribs=True)
class Revoke:
    """Revoke ``lease`` (best effort: it runs out anyway), deleting our campaign key."""

    lease: int


@attr.s(frozen=True, auto_attribs=True)
class Election:
    """
    One replica's view of the election: its state, its lease, the fence it leads with,
    the leader's name (None: unknown), since when it leads, and when etcd last confirmed
    the lease (``ttl`` seconds of life from then).
    """

    ttl: float
    state: str = CAMPAIGNING
    lease: Optional[int] = None
    fence: Optional[Fence] = None
    leader: Optional[str] = None
    since: Optional[float] = None
    renewed: float = 0.0

    @property
    def leading(self) -> bool:
        """Whether this replica leads."""
        return self.state == LEADING

    def settled(self, now: float, grace: float) -> bool:
        """Whether it has led for at least ``grace`` seconds (a new leader waits the lease
        grace before expiring anything: holders may not have renewed through it yet)."""
        return self.leading and self.since is not None and now - self.since >= grace

    def on(self, event) -> tuple["Election", tuple]:
        """The election after ``event``, and the actions to take, in order."""
        handler = getattr(self, "_on_" + type(event).__name__)
        return handler(event)

    def _new_lease(self, state: str, reason: str, revoke: bool) -> tuple["Election", tuple]:
        """Step down if leading, drop the lease (revoking it) and ask for another."""
        actions: tuple = ()
        if self.leading:
            actions += (StepDown(reason),)
        if revoke and self.lease is not None:
            actions += (Revoke(self.lease),)
        return (attr.evolve(self, state=state, lease=None, fence=None, leader=None,
                            since=None), actions + (Grant(),))

    def _on_Started(self, event: Started):
        return attr.evolve(self, state=CAMPAIGNING), (Grant(),)

    def _on_Granted(self, event: Granted):
        return (attr.evolve(self, state=CAMPAIGNING, lease=event.lease, renewed=event.now),
                (Campaign(event.lease),))

    def _on_Candidates(self, event: Candidates):
        if self.lease is None:
            return self, ()  # an answer to a campaign of a lease since dropped
        if event.own is None:
            return self._new_lease(CAMPAIGNING, "the campaign key is gone", revoke=True)
        first = min(event.all + (event.own,), key=lambda c: c.revision)
        if first.revision == event.own.revision:
            if self.leading:
                return self, ()
            fence = Fence(event.own.key, event.own.revision)
            return (attr.evolve(self, state=LEADING, fence=fence, leader=event.own.name,
                                since=event.now), (Lead(fence),))
        actions: tuple = (StepDown(f"{first.name} leads"),) if self.leading else ()
        return (attr.evolve(self, state=FOLLOWING, fence=None, leader=first.name,
                            since=None), actions)

    def _on_Renewed(self, event: Renewed):
        return attr.evolve(self, renewed=max(self.renewed, event.now)), ()

    def _on_LeaseLost(self, event: LeaseLost):
        if self.lease is None:
            return self, ()
        return self._new_lease(CAMPAIGNING, "the etcd lease ran out", revoke=False)

    def _on_RenewFailed(self, event: RenewFailed):
        if self.lease is None or event.now - self.renewed < self.ttl:
            return self, ()
        # etcd has not confirmed the lease for a whole TTL: it may be gone.
        return self._new_lease(CAMPAIGNING, "the etcd lease could not be renewed within "
                               "its TTL", revoke=True)

    def _on_WriteFenced(self, event: WriteFenced):
        if not self.leading:
            return self, ()
        return self._new_lease(FENCED, "a leader-only write was refused: another replica "
                               "leads", revoke=True)

    def _on_Stopped(self, event: Stopped):
        actions: tuple = (StepDown("stopping"),) if self.leading else ()
        if self.lease is not None:
            actions += (Revoke(self.lease),)
        return attr.evolve(self, state=CAMPAIGNING, lease=None, fence=None, leader=None,
                           since=None), actions


class SoleLeader:
    """The leadership of a control service that runs alone (SQLite): it always leads,
    from the start, and writes without a fence."""

    leading = True
    fence: Optional[Fence] = None
    state = LEADING

    def __init__(self, name: str = ""):
        self.name = name
        self.leader = name or None

    def settled(self, now: float, grace: float) -> bool:
        """Always: the store's own lease grace after a start applies instead."""
        return True

    def fenced(self, fence) -> None:
        """Never happens: writes carry no fence."""


#: The leadership of a service with no replicas.
SOLE_LEADER = SoleLeader()


def compaction_target(samples: tuple[tuple[float, int], ...], now: float,
                      retention: float) -> Optional[int]:
    """
    The etcd revision to compact to, keeping ``retention`` seconds of history: the newest
    of ``samples`` ((time, revision), oldest first) taken at least ``retention`` seconds
    before ``now``; None when none is that old.
    """
    old = [revision for at, revision in samples if now - at >= retention]
    return old[-1] if old else None


def keep_samples(samples: tuple[tuple[float, int], ...], now: float,
                 retention: float) -> tuple[tuple[float, int], ...]:
    """``samples`` without those older than the newest one ``retention`` seconds old
    (they are no longer needed to choose a compaction revision)."""
    old = [i for i, (at, _) in enumerate(samples) if now - at >= retention]
    return samples[old[-1]:] if old else samples


__all__ = ["Election", "Fence", "Candidate", "SoleLeader", "SOLE_LEADER", "CAMPAIGNING",
           "LEADING", "FOLLOWING", "FENCED", "compaction_target", "keep_samples"]
