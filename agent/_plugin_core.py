"""
The Docker plugin's decisions as a sans-IO state machine, like ``MountTable``: events go in
(a Mount, an IO result such as "lease refused by node B", a view push, a timer, dockerd
hanging up) with a ``World`` snapshot (time, the agent's view, the mount counts), and
actions come out (take the lease, ask for a move, wait, count, answer, release). Nothing
here does IO, reads a clock or holds a Deferred: ``pyflock.agent._plugin_runner`` runs the
actions and feeds their results back.

One ``MountAttempt`` per Mount in progress walks (state: event -> next state, action)::

    start            view names it -> LEASING (TakeLease), or PIPELINED if its primary is
                     this node, or WAITING_MOUNTED (WaitMounted) if this node holds its
                     lease already (dockerd's start Mount after the copy-up one); else
                     CREATING (CreateDataset)
    CREATING         Created -> PIPELINED (the new dataset is here); NameTaken ->
                     FETCHING_TAKEN (FetchByName)
    FETCHING_TAKEN   Fetched(found) -> LEASING or PIPELINED; Fetched(None) -> FAILED
    FETCHING         Fetched(found) -> LEASING or PIPELINED; Fetched(None) -> CREATING
    LEASING          LeaseTaken -> MOVING (AskMove); LeaseRefused -> WAITING_VIEW
                     (WaitView) until the retry deadline, then FAILED; LeaseGone ->
                     FETCHING the first time, then FAILED
    PIPELINED        (TakeLease, AskMove and WaitMounted at once) each result is kept
                     until all three are in, then -> CHECKING (CheckMountpoint); a move's
                     answer counts only once the lease is taken: LeaseTaken after a
                     MoveRefused asks again (AskMove, once), after a MoveGone -> FAILED;
                     MoveRefused or MoveGone after LeaseTaken -> FAILED; LeaseRefused and
                     LeaseGone go as in LEASING, abandoning (Abandon) what is still out
    WAITING_VIEW     ViewPushed, or Timer at the retry deadline -> LEASING or PIPELINED
    MOVING           Moved -> WAITING_MOUNTED (WaitMounted); MoveRefused, MoveGone -> FAILED
    WAITING_MOUNTED  Mounted -> CHECKING (CheckMountpoint)
    CHECKING         Checked(True) -> COUNTING (CountMount); Checked(False) -> FAILED
    COUNTING         Counted -> DONE (Answer)

and FAILED from any live state on a refusal, ``Failed``, ``HungUp`` or the Mount's
``Timer`` past its deadline, or early (see below) once a move here cannot end by it; a
failure uncounts what it counted and releases the lease unless another use holds it.
Events for a finished attempt are ignored (the late answers of cancelled IO); an IO
result a state does not wait for is a bug and raises ``UnexpectedEvent``.

In WAITING_MOUNTED and PIPELINED, while a move here may be under way (the dataset was
elsewhere, or another node still holds it), the Mount looks at the move's progress every
MOVE_RECHECK seconds (a ``SetTimer``, one at a time; its ``Timer`` brings the
``Transfer``): FAILED with ``still_moving`` and the estimate once the rate seen shows the
move cannot end by the deadline (``cannot_finish``), else another look. Nothing else
tells it of progress: the receiver counts the bytes in memory (the plugin reads them,
``IPluginBackend.transfer``), and a view push wakes only the Mounts waiting for a lease.

Why PIPELINED is as safe as LEASING then MOVING: when the dataset's primary is already
this node, the move changes nothing and the wait for the agent's mount does not depend on
the lease, so the three go out at once and the Mount answers only once all three
succeeded (then the mount point is checked and counted as always). The control service
checks a lease and a move atomically against the same configuration: a move is refused
unless its target holds the lease or no one does, so a move that races the lease is
accepted only where the sequential one would be, and one refused because another node
held the lease then is asked again once the lease is ours (the sequential order would have
asked it only then). A refused or vanished lease fails or waits exactly as in LEASING,
releasing what was taken; a ``Mounted`` that arrives before ``LeaseTaken`` and ``Moved``
is remembered, not acted on. When the primary is elsewhere the order stays: the lease
first, then the move (which the lease makes possible).

Why a Mount of a volume whose lease this node holds may skip both (dockerd's start Mount,
a moment after the copy-up Mount and Unmount, inside the release grace): its primary is
this node and the lease keeper holds a live lease on it and has started no release, so a
lease request would only renew that lease, and a move here would change nothing. From the
Mount's start it is a use: the keeper renews the lease and does not release it, so another
node cannot take the volume until the Mount fails or its count ends. If the keeper does not
hold the lease (never taken, lost, being released) or the view does not show it live, the
Mount goes the usual way.
"""

from __future__ import annotations

import enum
from typing import Any, Hashable, Optional

import attr
from twisted.internet.defer import CancelledError

from pyflock.agent._mounts import MountTable
from pyflock.agent._plugin_model import (
    LEASE_DURATION, LEASE_RETRY_MARGIN, MOUNT_TIMEOUT, MOUNTED, MOVE_RECHECK, OVERLAY_TTL,
    RELEASE_GRACE, ClusterView, LocalState, MoveWatch, PluginError, cannot_finish,
    check_volume_name, deleted_while_mounting, in_use_elsewhere, move_estimate,
    parse_create_options, still_moving, unreachable, watch_move,
)
from pyflock.common._client import ControlError, ControlUnreachable
from pyflock.common._records import Dataset, DatasetEntry, Lease, Transfer
from pyflock.common._sizes import format_size


class UnexpectedEvent(Exception):
    """The shell fed an attempt an IO result it was not waiting for (a bug in the shell)."""


@attr.s(frozen=True, auto_attribs=True)
class World:
    """What the core reads of the world at one event: the time, the view, the counts, and
    the datasets whose lease this node holds (taken, and no release started)."""

    now: float
    view: ClusterView
    table: MountTable
    held: frozenset = frozenset()


# -- events: what happened ----------------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class Created:
    """``CreateDataset`` succeeded with this record."""

    config: Dataset


@attr.s(frozen=True, auto_attribs=True)
class NameTaken:
    """``CreateDataset`` was refused: the name exists in the cluster (409)."""


@attr.s(frozen=True, auto_attribs=True)
class Fetched:
    """``FetchByName`` answered: the live dataset of that name, or None."""

    config: Optional[Dataset]


@attr.s(frozen=True, auto_attribs=True)
class LeaseTaken:
    """``TakeLease`` succeeded: this node holds the lease."""


@attr.s(frozen=True, auto_attribs=True)
class LeaseRefused:
    """``TakeLease`` was refused (409): ``holder`` (the answer's field) holds it."""

    holder: Optional[str]


@attr.s(frozen=True, auto_attribs=True)
class LeaseGone:
    """``TakeLease`` found no dataset (404) or a deleted one (405)."""


@attr.s(frozen=True, auto_attribs=True)
class Moved:
    """``AskMove`` was accepted (the dataset is here or on its way)."""


@attr.s(frozen=True, auto_attribs=True)
class MoveRefused:
    """``AskMove`` was refused (409): ``holder`` holds the lease; or, with no holder,
    ``reason`` says why (the volume's zone is not this node's)."""

    holder: Optional[str]
    reason: Optional[str] = None


@attr.s(frozen=True, auto_attribs=True)
class MoveGone:
    """``AskMove`` found no dataset (404) or a deleted one (405)."""


@attr.s(frozen=True, auto_attribs=True)
class Mounted:
    """``WaitMounted`` fired: the agent reports the dataset mounted at ``path``."""

    path: str


@attr.s(frozen=True, auto_attribs=True)
class Checked:
    """``CheckMountpoint`` answered whether a filesystem is mounted at the path."""

    mounted: bool


@attr.s(frozen=True, auto_attribs=True)
class Counted:
    """``CountMount`` is done (saved, or failed to save and logged)."""


@attr.s(frozen=True, auto_attribs=True)
class ViewPushed:
    """The agent's view changed."""


@attr.s(frozen=True, auto_attribs=True)
class Timer:
    """The time ``at`` that the attempt asked for (``SetTimer``, ``WaitView``) came;
    ``local_state`` is the dataset's state on this node then, and ``transfer`` the move
    into this node under way then (None: none), for the timeout's message."""

    at: float
    local_state: Optional[str] = None
    transfer: Optional[Transfer] = None


@attr.s(frozen=True, auto_attribs=True)
class HungUp:
    """dockerd closed the connection before the answer."""


@attr.s(frozen=True, auto_attribs=True)
class Failed:
    """An IO step failed in a way no other event describes (unreachable, refused...)."""

    error: BaseException


# -- actions: what to do ------------------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class CreateDataset:
    """Create a dataset called ``name`` on this node (answer ``Created`` / ``NameTaken``)."""

    name: str


@attr.s(frozen=True, auto_attribs=True)
class FetchByName:
    """Ask the control service for the live dataset called ``name`` (``Fetched``)."""

    name: str


@attr.s(frozen=True, auto_attribs=True)
class TakeLease:
    """Take this node's lease (``LeaseTaken`` / ``LeaseRefused`` / ``LeaseGone``)."""

    dataset_id: str


@attr.s(frozen=True, auto_attribs=True)
class WaitView:
    """Wait for the next view push (``ViewPushed``), or until ``until`` (``Timer``)."""

    until: float


@attr.s(frozen=True, auto_attribs=True)
class AskMove:
    """Ask for the dataset to be here (``Moved`` / ``MoveRefused`` / ``MoveGone``);
    ``source`` is where the view has it."""

    dataset_id: str
    source: str


@attr.s(frozen=True, auto_attribs=True)
class WaitMounted:
    """Wait until the agent reports the dataset mounted here (``Mounted``)."""

    dataset_id: str


@attr.s(frozen=True, auto_attribs=True)
class CheckMountpoint:
    """Check that a filesystem is really mounted at ``path`` (``Checked``)."""

    path: str


@attr.s(frozen=True, auto_attribs=True)
class CountMount:
    """Count the mount (``remount``: replace a previous dockerd's stale count of this ID)
    and save the counts (``Counted``); a hang-up must not cancel the write."""

    name: str
    mount_id: str
    dataset_id: str
    remount: bool = False


@attr.s(frozen=True, auto_attribs=True)
class Uncount:
    """Take back a mount counted by a Mount that then failed."""

    name: str
    mount_id: str


@attr.s(frozen=True, auto_attribs=True)
class ReleaseIfIdle:
    """Release this node's lease unless the dataset is in use here when it is done."""

    dataset_id: str


@attr.s(frozen=True, auto_attribs=True)
class Abandon:
    """Stop the IO of these action types (``AskMove``, ``WaitMounted``) still out for
    this Mount and drop their results: a pipelined Mount gone back to the lease."""

    actions: tuple


@attr.s(frozen=True, auto_attribs=True)
class SetTimer:
    """Feed a ``Timer`` at time ``at``."""

    at: float


@attr.s(frozen=True, auto_attribs=True)
class Answer:
    """Answer the Mount with ``path``."""

    path: str
    dataset_id: str


@attr.s(frozen=True, auto_attribs=True)
class Refuse:
    """Answer the Mount with ``error`` (a ``PluginError``, or an internal error as is)."""

    error: BaseException
    dataset_id: Optional[str]


# -- the machine --------------------------------------------------------------------------


class State(enum.Enum):
    """Where a Mount stands."""

    CREATING = "creating"
    FETCHING = "fetching"
    FETCHING_TAKEN = "fetching-taken"
    LEASING = "leasing"
    PIPELINED = "pipelined"
    WAITING_VIEW = "waiting-view"
    MOVING = "moving"
    WAITING_MOUNTED = "waiting-mounted"
    CHECKING = "checking"
    COUNTING = "counting"
    DONE = "done"
    FAILED = "failed"


#: The IO result each waiting state takes (besides Timer, ViewPushed, HungUp and Failed).
_AWAITS: dict[State, tuple[type, ...]] = {
    State.CREATING: (Created, NameTaken),
    State.FETCHING: (Fetched,),
    State.FETCHING_TAKEN: (Fetched,),
    State.LEASING: (LeaseTaken, LeaseRefused, LeaseGone),
    State.PIPELINED: (LeaseTaken, LeaseRefused, LeaseGone, Moved, MoveRefused, MoveGone,
                      Mounted),
    State.WAITING_VIEW: (),
    State.MOVING: (Moved, MoveRefused, MoveGone),
    State.WAITING_MOUNTED: (Mounted,),
    State.CHECKING: (Checked,),
    State.COUNTING: (Counted,),
}


#: The action whose answer each pipelined event is.
_ANSWERS: dict[type, type] = {
    LeaseTaken: TakeLease, LeaseRefused: TakeLease, LeaseGone: TakeLease,
    Moved: AskMove, MoveRefused: AskMove, MoveGone: AskMove, Mounted: WaitMounted,
}


@attr.s(auto_attribs=True, eq=False)
class MountAttempt:
    """One Mount in progress: a use of its volume until it answers."""

    core: "PluginCore"
    name: str
    mount_id: str
    deadline: float
    state: Optional[State] = None
    volume: Optional[DatasetEntry] = None
    path: Optional[str] = None
    lease_until: float = 0.0
    retried: bool = False
    counted: bool = False
    #: PIPELINED: the IO still out (``TakeLease``, ``AskMove``, ``WaitMounted``), whether
    #: the lease and the move are done, a move's answer kept until the lease is taken,
    #: and whether the move was asked again.
    pending: frozenset = frozenset()
    leased: bool = False
    moved: bool = False
    early_move: Any = None
    asked_again: bool = False
    #: While it waits for a move here (WAITING_MOUNTED, PIPELINED): the time of its next
    #: look at the move's progress (a ``SetTimer``), and where its watch of it began.
    recheck_at: Optional[float] = None
    watch: Optional[MoveWatch] = None

    @property
    def dataset_id(self) -> Optional[str]:
        """The dataset this Mount works on, once known."""
        return None if self.volume is None else self.volume.dataset_id

    @property
    def finished(self) -> bool:
        """Whether the Mount has answered."""
        return self.state in (State.DONE, State.FAILED)

    def start(self, world: World) -> list:
        """The first actions: lease the volume the view names, or create it here; wait
        only for its mount if it is mounted here already, under this node's live lease."""
        found = self.core.find(self.name, world)
        if found is None:
            return self._create(world)
        if self.core.held_here(found, world):
            self.volume = found
            self.state = State.WAITING_MOUNTED
            return [WaitMounted(found.dataset_id)] + self._watch_move(world.now)
        return self._lease(found, world)

    def handle(self, event: Any, world: World) -> list:
        """The actions that follow ``event``."""
        if self.finished or self.state is None:
            return []
        if isinstance(event, Failed):
            return self._fail(self._refusal(event.error), world)
        if isinstance(event, HungUp):
            return self._fail(CancelledError("dockerd hung up before the Mount finished"),
                              world)
        if isinstance(event, Timer):
            # A timer may fire a rounding error before its time: it is its time.
            now = max(world.now, event.at)
            if now >= self.deadline:
                return self._fail(self._timed_out(event.local_state, event.transfer, now),
                                  world)
            if event.at == self.recheck_at:
                return self._recheck(now, event.transfer, world)
            if self.state is State.WAITING_VIEW and now >= self.lease_until:
                return self._take_lease(now)
            return []
        if isinstance(event, ViewPushed):
            return self._take_lease(world.now) if self.state is State.WAITING_VIEW else []
        if not isinstance(event, _AWAITS[self.state]):
            raise UnexpectedEvent(f"a Mount in state {self.state.value} got {event!r}")
        if self.state is State.PIPELINED:
            return self._pipelined(event, world)
        return self._next(event, world)

    def _pipelined(self, event: Any, world: World) -> list:
        """PIPELINED: keep each result until the three are in (see the module's table)."""
        kind = _ANSWERS[type(event)]
        if kind not in self.pending:
            raise UnexpectedEvent(f"a pipelined Mount got {event!r} twice")
        self.pending -= {kind}
        if isinstance(event, (LeaseRefused, LeaseGone)):
            abandon = [Abandon(tuple(sorted(self.pending, key=lambda t: t.__name__)))] \
                if self.pending else []
            self.pending, self.early_move = frozenset(), None
            self.state = State.LEASING
            actions = self._next(event, world)
            return actions if self.finished else abandon + actions
        if isinstance(event, Mounted):
            self.path = event.path
        elif isinstance(event, LeaseTaken):
            self.leased = True
            early, self.early_move = self.early_move, None
            if early is not None:
                return self._move_answered(early, world)
        else:
            return self._move_answered(event, world)
        return self._pipeline_done()

    def _move_answered(self, event: Any, world: World) -> list:
        """A move's answer in PIPELINED: kept until the lease is taken, then acted on."""
        if not self.leased:
            self.early_move = event
            return []
        if isinstance(event, Moved):
            self.moved = True
            return self._pipeline_done()
        if isinstance(event, MoveRefused) and not self.asked_again:
            # Refused before our lease landed (another node held it then): ask again now.
            self.asked_again = True
            self.pending |= {AskMove}
            return [AskMove(self.dataset_id, self.volume.primary)]
        return self._next(event, world)

    def _pipeline_done(self) -> list:
        if self.leased and self.moved and self.path is not None:
            self.state = State.CHECKING
            return [CheckMountpoint(self.path)]
        return []

    def _next(self, event: Any, world: World) -> list:
        if isinstance(event, Created):
            return self._lease(self.core.overlay.created(event.config, world.now), world)
        if isinstance(event, NameTaken):
            self.state = State.FETCHING_TAKEN
            return [FetchByName(self.name)]
        if isinstance(event, Fetched):
            if event.config is not None:
                return self._lease(self.core.overlay.created(event.config, world.now), world)
            if self.state is State.FETCHING:
                return self._create(world)
            return self._fail(PluginError(f"volume {self.name} was created and deleted "
                                          f"elsewhere at the same time; retry"), world)
        if isinstance(event, LeaseTaken):
            self.state = State.MOVING
            return [AskMove(self.dataset_id, self.volume.primary)]
        if isinstance(event, LeaseRefused):
            if world.now < self.lease_until:
                # The holder may have just let go (its release grace): its release reaches
                # this node as a view push, so ask again then, not on a timer.
                self.state = State.WAITING_VIEW
                return [WaitView(self.lease_until)]
            return self._fail(self._elsewhere(event.holder, world), world)
        if isinstance(event, LeaseGone):
            if self.retried:
                return self._fail(deleted_while_mounting(self.name), world)
            # The view named a dataset deleted since: ask the control service itself.
            self.retried = True
            self.state = State.FETCHING
            return [FetchByName(self.name)]
        if isinstance(event, Moved):
            self.state = State.WAITING_MOUNTED
            return [WaitMounted(self.dataset_id)] + self._watch_move(world.now)
        if isinstance(event, MoveRefused):
            if event.holder is None and event.reason is not None:
                return self._fail(PluginError(f"cannot mount volume {self.name} on this "
                                              f"node: {event.reason}"), world)
            return self._fail(self._elsewhere(event.holder, world), world)
        if isinstance(event, MoveGone):
            return self._fail(deleted_while_mounting(self.name), world)
        if isinstance(event, Mounted):
            self.state = State.CHECKING
            self.path = event.path
            return [CheckMountpoint(event.path)]
        if isinstance(event, Checked):
            if not event.mounted:
                return self._fail(PluginError(
                    f"volume {self.name}: the agent reported it mounted at {self.path}, but "
                    f"no filesystem is mounted there; check the agent's log, then retry"),
                    world)
            self.state = State.COUNTING
            self.counted = True
            return [CountMount(self.name, self.mount_id, self.dataset_id,
                               self.core.count_as_remount(self.name, self.mount_id, world))]
        self.state = State.DONE
        return [Answer(self.path, self.dataset_id)]

    def _create(self, world: World) -> list:
        try:
            check_volume_name(self.name)
        except PluginError as e:
            return self._fail(e, world)
        self.state = State.CREATING
        return [CreateDataset(self.name)]

    def _lease(self, volume: DatasetEntry, world: World) -> list:
        self.volume = volume
        self.lease_until = world.now + self.core.release_grace + LEASE_RETRY_MARGIN
        return self._take_lease(world.now)

    def _take_lease(self, now: float) -> list:
        if self.volume.primary == self.core.node_uuid:
            # Here already: the lease, the move and the wait at once (see PIPELINED).
            self.state = State.PIPELINED
            self.pending = frozenset((TakeLease, AskMove, WaitMounted))
            self.leased = self.moved = self.asked_again = False
            self.early_move, self.path = None, None
            return [TakeLease(self.dataset_id), AskMove(self.dataset_id, self.volume.primary),
                    WaitMounted(self.dataset_id)] + self._watch_move(now)
        self.state = State.LEASING
        return [TakeLease(self.dataset_id)]

    def _fail(self, error: BaseException, world: World) -> list:
        self.state = State.FAILED
        actions: list = []
        if self.counted:
            actions.append(Uncount(self.name, self.mount_id))
        if self.dataset_id is not None:
            actions.append(ReleaseIfIdle(self.dataset_id))
        return actions + [Refuse(error, self.dataset_id)]

    def _elsewhere(self, holder: Optional[str], world: World) -> PluginError:
        return in_use_elsewhere(world.view, self.name, holder, self.core.lease_duration)

    def _watch_move(self, now: float) -> list:
        """Look at the move's progress again in a moment (see ``_recheck``), while a move
        here may be under way: the dataset was elsewhere, or another node still holds
        it; one look at a time."""
        volume, node = self.volume, self.core.node_uuid
        if self.recheck_at is not None or not (
                volume.primary != node or any(h != node for h in volume.holders)):
            return []
        self.recheck_at = now + MOVE_RECHECK
        return [SetTimer(self.recheck_at)] if self.recheck_at < self.deadline else []

    def _recheck(self, now: float, transfer: Optional[Transfer], world: World) -> list:
        """A look at the move's progress: fail now if it cannot end by the deadline,
        else look again in a moment while the Mount waits for it."""
        self.recheck_at = None
        if self.state not in (State.WAITING_MOUNTED, State.PIPELINED):
            return []
        self.watch = watch_move(self.watch, now, transfer)
        estimate = cannot_finish(self.watch, now, transfer, self.deadline)
        if estimate is not None:
            started = self.deadline - self.core.mount_timeout
            return self._fail(still_moving(self.name, round(now - started), transfer,
                                           estimate), world)
        return self._watch_move(now)

    def _timed_out(self, local_state: Optional[str], transfer: Optional[Transfer] = None,
                   now: float = 0.0) -> PluginError:
        if transfer is not None:
            return still_moving(self.name, self.core.mount_timeout, transfer,
                                move_estimate(self.watch, now, transfer))
        where = local_state or "not started"
        return PluginError(
            f"volume {self.name} was not ready on this node within "
            f"{self.core.mount_timeout:g} s (state here: {where}); the agent goes on "
            f"working on it: retry in a moment, and if this persists check "
            f"`pyflock list` and the agent's log")

    def _refusal(self, error: BaseException) -> BaseException:
        if isinstance(error, PluginError):
            return error
        if isinstance(error, ControlUnreachable):
            return unreachable("mount", self.name, error)
        if isinstance(error, ControlError):
            return PluginError(f"cannot mount volume {self.name}: the control service "
                               f"refused: {error}")
        return error


class Overlay:
    """
    This node's own creates and removes, trusted over a view that has not caught up with
    them (it lags by a push) for ``ttl`` seconds at most.
    """

    def __init__(self, ttl: float = OVERLAY_TTL):
        self._ttl = ttl
        self._created: dict[str, tuple[DatasetEntry, float]] = {}
        self._removed: dict[str, float] = {}

    def _tidy(self, view: ClusterView, now: float) -> None:
        for name, (record, expiry) in list(self._created.items()):
            if expiry <= now or record.dataset_id in view.datasets \
                    or view.by_name(name) is not None:
                del self._created[name]
        for dataset_id, expiry in list(self._removed.items()):
            current = view.datasets.get(dataset_id)
            if expiry <= now or current is None or current.deleted:
                del self._removed[dataset_id]

    def find(self, view: ClusterView, now: float, name: str) -> Optional[DatasetEntry]:
        """The live dataset called ``name``: the view, corrected by our own changes."""
        self._tidy(view, now)
        found = view.by_name(name)
        if found is not None and found.dataset_id in self._removed:
            return None
        if found is None and name in self._created:
            return self._created[name][0]
        return found

    def volumes(self, view: ClusterView, now: float) -> dict[str, DatasetEntry]:
        """Every live dataset by name: the view, corrected by our own changes."""
        self._tidy(view, now)
        volumes = {name: v for name, v in view.names.items()
                   if v.dataset_id not in self._removed}
        for name, (record, _) in self._created.items():
            volumes.setdefault(name, record)
        return volumes

    def created(self, config: Dataset, now: float,
                lease: Optional[Lease] = None) -> DatasetEntry:
        """Remember a dataset this node created (or fetched), with the lease taken with
        it if any; its view record."""
        record = DatasetEntry.of(config, lease)
        self._created[record.name] = (record, now + self._ttl)
        self._removed.pop(record.dataset_id, None)
        return record

    def removed(self, name: str, dataset_id: str, now: float) -> None:
        """Remember that this node deleted ``dataset_id`` (called ``name``)."""
        self._created.pop(name, None)
        self._removed[dataset_id] = now + self._ttl


@attr.s(frozen=True, auto_attribs=True)
class NewVolume:
    """What Create asks the control service for."""

    maximum_size: Optional[int]
    profile: Optional[str]
    metadata: dict


class PluginCore:
    """
    The decisions of one node's plugin: the Mounts in progress (by a key the shell
    chooses), its own recent creates and removes, and which mounts the new dockerd made
    since an Activate. ``mount``/``handle``/``view_pushed`` return actions.
    """

    def __init__(self, node_uuid: str, *, mount_timeout: float = MOUNT_TIMEOUT,
                 lease_duration: float = LEASE_DURATION,
                 release_grace: float = RELEASE_GRACE, overlay_ttl: float = OVERLAY_TTL):
        self.node_uuid = node_uuid
        self.mount_timeout = mount_timeout
        self.lease_duration = lease_duration
        self.release_grace = release_grace
        self.overlay = Overlay(overlay_ttl)
        self._attempts: dict[Hashable, MountAttempt] = {}
        # (name, mount ID) mounted since the last Activate, or None before any Activate.
        self._since_activate: Optional[set[tuple[str, str]]] = None

    # -- what is where ----------------------------------------------------------------

    def find(self, name: str, world: World) -> Optional[DatasetEntry]:
        """The live dataset called ``name``, as far as this node knows."""
        return self.overlay.find(world.view, world.now, name)

    def dataset_of(self, name: str, world: World) -> Optional[str]:
        """The dataset of volume ``name``: as counted, else as the view has it."""
        dataset_id = world.table.dataset_id(name)
        if dataset_id is None:
            volume = self.find(name, world)
            dataset_id = None if volume is None else volume.dataset_id
        return dataset_id

    def datasets_in_use(self, world: World) -> set[str]:
        """The datasets mounted here or being mounted (their leases are kept)."""
        result = {self.dataset_of(name, world) for name in world.table.volumes}
        result.update(a.dataset_id for a in self._attempts.values())
        result.discard(None)
        return result  # type: ignore[return-value]

    def held_here(self, volume: DatasetEntry, world: World) -> bool:
        """Whether this node holds ``volume`` already: its primary is this node, and its
        lease this node's (the lease keeper holds it and started no release of it; the
        view agrees that it is live), as after dockerd's copy-up Mount. A Mount of it then
        needs no lease and no move: while the Mount is in progress it is a use, so the
        lease is renewed and not released."""
        return (volume.dataset_id in world.held
                and volume.primary == self.node_uuid
                and volume.lease_holder(world.now) == self.node_uuid)

    def uses_here(self, name: str, world: World) -> int:
        """The mounts of volume ``name`` here, counting the Mounts in progress."""
        return world.table.count(name) + sum(
            1 for a in self._attempts.values() if a.name == name)

    # -- Mount ------------------------------------------------------------------------

    def mount(self, key: Hashable, name: str, mount_id: str, world: World) -> list:
        """A Mount arrived: its first actions (a ``SetTimer`` for its deadline first)."""
        if key in self._attempts:
            raise UnexpectedEvent(f"a Mount with key {key!r} is already in progress")
        deadline = world.now + self.mount_timeout
        attempt = MountAttempt(self, name, mount_id, deadline)
        self._attempts[key] = attempt
        return [SetTimer(deadline)] + self._after(key, attempt, attempt.start(world))

    def handle(self, key: Hashable, event: Any, world: World) -> list:
        """The actions that follow ``event`` for the Mount ``key`` (none once answered)."""
        attempt = self._attempts.get(key)
        if attempt is None:
            return []
        return self._after(key, attempt, attempt.handle(event, world))

    def view_pushed(self, world: World) -> dict[Hashable, list]:
        """The view changed: the actions of each Mount waiting for it, by key."""
        return {key: self.handle(key, ViewPushed(), world) for key in self.waiting_for_view()}

    def waiting_for_view(self) -> list[Hashable]:
        """The keys of the Mounts waiting for a view push."""
        return [key for key, a in self._attempts.items() if a.state is State.WAITING_VIEW]

    def attempt(self, key: Hashable) -> Optional[MountAttempt]:
        """The Mount in progress under ``key``, if any."""
        return self._attempts.get(key)

    def _after(self, key: Hashable, attempt: MountAttempt, actions: list) -> list:
        if attempt.finished:
            # No longer a use: it must not hold the lease its failure releases.
            del self._attempts[key]
        return actions

    # -- Activate: a new dockerd ------------------------------------------------------

    def activated(self) -> None:
        """dockerd activated the plugin: a new dockerd, whose mounts are recorded."""
        self._since_activate = set()

    def settled(self) -> None:
        """The counts were settled: every count is now the new dockerd's."""
        self._since_activate = None

    @property
    def since_activate(self) -> frozenset:
        """The (name, mount ID) mounted since the last unsettled Activate."""
        return frozenset(self._since_activate or ())

    def count_as_remount(self, name: str, mount_id: str, world: World) -> bool:
        """Whether counting this mount replaces the previous dockerd's count of its ID
        (a restarted container keeps its mount IDs; the new dockerd never saw that
        mount); records the mount as the new dockerd's."""
        since = self._since_activate
        if since is None:
            return False
        stale = (name, mount_id) not in since and world.table.mount_count(name, mount_id) > 0
        since.add((name, mount_id))
        return stale

    # -- Create, Unmount, Remove ------------------------------------------------------

    def create(self, name: str, opts: Any, world: World) -> Optional[NewVolume]:
        """What to create for a Create, or None if the volume exists; ``PluginError``
        for a bad name or options."""
        check_volume_name(name)
        size, profile = parse_create_options(name, opts)
        if self.find(name, world) is not None:
            return None
        metadata = {"name": name}
        if profile is not None:
            metadata["profile"] = profile
        return NewVolume(size, profile, metadata)

    def release_after_unmount(self, name: str, world: World) -> Optional[str]:
        """After an Unmount, the dataset whose lease to release after the grace (the
        volume's last use here), or None."""
        if self.uses_here(name, world):
            return None
        return self.dataset_of(name, world)

    def removable(self, name: str, world: World) -> Optional[DatasetEntry]:
        """The dataset a Remove deletes (None: no such volume, nothing to do);
        ``PluginError`` while it is in use here."""
        uses = self.uses_here(name, world)
        if uses:
            raise PluginError(
                f"volume {name} is in use by {uses} mount(s) on this node: stop and remove "
                f"the containers using it first (docker ps -a --filter volume={name})")
        return self.find(name, world)


def describe(volume: DatasetEntry, local: Optional[LocalState], node_uuid: str,
             world: World, uses: int, status: bool) -> dict:
    """The ``Volume`` object of Get (with ``Status``) and List (without) in ``world``."""
    result: dict[str, Any] = {"Name": volume.name}
    path = mounted_path(local)
    if path:
        result["Mountpoint"] = path
    if status:
        if local is not None:
            where = local.state
        elif volume.primary == node_uuid:
            where = "pending"
        else:
            where = "on another node"
        result["Status"] = {
            "dataset_id": volume.dataset_id,
            "primary": volume.primary,
            "primary_host": world.view.nodes.get(volume.primary) or "",
            "size": "default" if volume.maximum_size is None
                    else format_size(volume.maximum_size),
            "profile": volume.metadata.get("profile", ""),
            "state": where,
            "lease": volume.lease_holder(world.now) or "",
            "mounts_here": uses,
        }
    return result


def mounted_path(local: Optional[LocalState]) -> Optional[str]:
    """The path of a dataset mounted here, or None."""
    if local is None or local.state != MOUNTED:
        return None
    return local.path


__all__ = [
    "Abandon", "Answer", "AskMove", "CheckMountpoint", "Checked", "CountMount", "CreateDataset",
    "Created", "Failed", "FetchByName", "Fetched", "HungUp", "LeaseGone", "LeaseRefused",
    "LeaseTaken", "MountAttempt", "Mounted", "MoveGone", "MoveRefused", "Moved", "NameTaken",
    "NewVolume", "Overlay", "PluginCore", "Refuse", "ReleaseIfIdle", "SetTimer", "State",
    "Timer", "TakeLease", "Uncount", "UnexpectedEvent", "ViewPushed", "WaitMounted",
    "WaitView", "World", "describe", "mounted_path",
]
