"""
The Docker plugin's sans-IO core: every Mount state against every event, and the
bookkeeping around it, with no reactor, no HTTP and no clock (time is ``World.now``).
"""

from __future__ import annotations

import attr
import pytest
from twisted.internet.defer import CancelledError

from pyflock.agent._mounts import MountTable
from pyflock.agent._plugin_core import (
    Abandon, Answer, AskMove, CheckMountpoint, Checked, CountMount, Counted, CreateDataset, Created,
    Failed, FetchByName, Fetched, HungUp, LeaseGone, LeaseRefused, LeaseTaken, Mounted,
    MoveGone, MoveRefused, Moved, NameTaken, NewVolume, PluginCore, Refuse, ReleaseIfIdle,
    SetTimer, State, TakeLease, Timer, Uncount, UnexpectedEvent, ViewPushed, WaitMounted,
    WaitView, World, describe, mounted_path,
)
from pyflock.agent._plugin_model import (
    LEASE_RETRY_MARGIN, ClusterView, LocalState, PluginError,
)
from pyflock.common._client import ControlUnreachable, InvalidRequest
from pyflock.common._records import Dataset, DatasetEntry, Lease, Transfer

NODE = "0b41c2b0-5fd6-4e2c-9a8f-42a5b0f3c1d2"
OTHER = "7c5e1f00-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
ID = "11111111-2222-4333-8444-555555555555"
NEW_ID = "66666666-7777-4888-9999-aaaaaaaaaaaa"
MOUNT = "0e4c01a3" * 8
PATH = "/var/lib/pyflock/mounts/" + ID
NEW_PATH = "/var/lib/pyflock/mounts/" + NEW_ID
TIMEOUT = 100.0
GRACE = 0.5
LEASE_UNTIL = GRACE + LEASE_RETRY_MARGIN

V1 = DatasetEntry(dataset_id=ID, primary=NODE, metadata={"name": "v1"})
ELSEWHERE = DatasetEntry(dataset_id=ID, primary=OTHER, metadata={"name": "v1"})
NEW = Dataset(dataset_id=NEW_ID, primary=NODE, metadata={"name": "v1"})
VIEW = ClusterView(datasets={ID: V1}, nodes={NODE: "10.0.0.1", OTHER: "10.0.0.2"})
AWAY = ClusterView(datasets={ID: ELSEWHERE}, nodes={NODE: "10.0.0.1", OTHER: "10.0.0.2"})
EMPTY = ClusterView(nodes={NODE: "10.0.0.1", OTHER: "10.0.0.2"})


def world(now: float = 0.0, view: ClusterView = VIEW,
          table: MountTable = MountTable(), held: frozenset = frozenset()) -> World:
    """A snapshot of the world at ``now``."""
    return World(now, view, table, held)


def new_core() -> PluginCore:
    """A core for node NODE with the default timings."""
    return PluginCore(NODE, mount_timeout=TIMEOUT, lease_duration=60.0, release_grace=GRACE)


def plain(actions: list) -> list:
    """``actions`` comparable: a refusal becomes (Refuse, error type, dataset id)."""
    return [(Refuse, type(a.error), a.dataset_id) if isinstance(a, Refuse) else a
            for a in actions]


#: How to reach each state: the view at the Mount, then the events fed (at time 0).
ROUTES = {
    State.CREATING: (EMPTY, []),
    State.FETCHING_TAKEN: (EMPTY, [NameTaken()]),
    State.LEASING: (AWAY, []),
    State.FETCHING: (AWAY, [LeaseGone()]),
    State.WAITING_VIEW: (AWAY, [LeaseRefused(OTHER)]),
    State.PIPELINED: (VIEW, []),
    State.MOVING: (AWAY, [LeaseTaken()]),
    State.WAITING_MOUNTED: (AWAY, [LeaseTaken(), Moved()]),
    State.CHECKING: (VIEW, [LeaseTaken(), Moved(), Mounted(PATH)]),
    State.COUNTING: (VIEW, [LeaseTaken(), Moved(), Mounted(PATH), Checked(True)]),
    State.DONE: (VIEW, [LeaseTaken(), Moved(), Mounted(PATH), Checked(True), Counted()]),
    State.FAILED: (VIEW, [HungUp()]),
}


def in_state(state: State) -> PluginCore:
    """A core whose Mount "m" (volume v1, ID MOUNT) is in ``state``."""
    core = new_core()
    view, events = ROUTES[state]
    core.mount("m", "v1", MOUNT, world(view=view))
    for event in events:
        core.handle("m", event, world(view=view))
    if state_of(core) is not (None if state in (State.DONE, State.FAILED) else state):
        raise AssertionError(f"the route to {state} ends in {state_of(core)}")
    return core


def refused(dataset_id=ID, error=PluginError, counted=False) -> list:
    """The actions of a failed Mount."""
    return ([Uncount("v1", MOUNT)] if counted else []) + \
        ([ReleaseIfIdle(dataset_id)] if dataset_id else []) + [(Refuse, error, dataset_id)]


LIVE = [s for s in State if s not in (State.DONE, State.FAILED)]
NO_DATASET = (State.CREATING, State.FETCHING_TAKEN)

#: Every IO result, by name.
RESULTS = {
    "created": Created(NEW), "name-taken": NameTaken(), "fetched": Fetched(NEW),
    "fetched-none": Fetched(None), "lease-taken": LeaseTaken(),
    "lease-refused": LeaseRefused(OTHER), "lease-gone": LeaseGone(), "moved": Moved(),
    "move-refused": MoveRefused(OTHER), "move-gone": MoveGone(), "mounted": Mounted(PATH),
    "checked": Checked(True), "not-a-mountpoint": Checked(False), "counted": Counted(),
}

#: (state, result) -> (actions at time 0, state after); pairs absent here are refused.
PIPELINE_NEW = [TakeLease(NEW_ID), AskMove(NEW_ID, NODE), WaitMounted(NEW_ID)]

TRANSITIONS = {
    (State.CREATING, "created"): (PIPELINE_NEW, State.PIPELINED),
    (State.CREATING, "name-taken"): ([FetchByName("v1")], State.FETCHING_TAKEN),
    (State.FETCHING_TAKEN, "fetched"): (PIPELINE_NEW, State.PIPELINED),
    (State.FETCHING_TAKEN, "fetched-none"): (refused(None), State.FAILED),
    (State.FETCHING, "fetched"): (PIPELINE_NEW, State.PIPELINED),
    (State.FETCHING, "fetched-none"): ([CreateDataset("v1")], State.CREATING),
    (State.LEASING, "lease-taken"): ([AskMove(ID, OTHER)], State.MOVING),
    (State.LEASING, "lease-refused"): ([WaitView(LEASE_UNTIL)], State.WAITING_VIEW),
    (State.LEASING, "lease-gone"): ([FetchByName("v1")], State.FETCHING),
    # A move from another node: the Mount looks at its progress each MOVE_RECHECK.
    (State.MOVING, "moved"): ([WaitMounted(ID), SetTimer(1.0)], State.WAITING_MOUNTED),
    (State.MOVING, "move-refused"): (refused(), State.FAILED),
    (State.MOVING, "move-gone"): (refused(), State.FAILED),
    (State.WAITING_MOUNTED, "mounted"): ([CheckMountpoint(PATH)], State.CHECKING),
    (State.CHECKING, "checked"): ([CountMount("v1", MOUNT, ID)], State.COUNTING),
    (State.CHECKING, "not-a-mountpoint"): (refused(), State.FAILED),
    (State.COUNTING, "counted"): ([Answer(PATH, ID)], State.DONE),
}


def state_of(core: PluginCore) -> State:
    """The state of Mount "m" (DONE or FAILED once it has left the core)."""
    attempt = core.attempt("m")
    return attempt.state if attempt is not None else None


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
@pytest.mark.parametrize("result", list(RESULTS), ids=str)
def test_every_result_in_every_state(state, result):
    """Each IO result in each state: its transition, ignored once answered, else
    ``UnexpectedEvent`` (PIPELINED's own table is ``PIPELINE_TRANSITIONS``)."""
    if state is State.PIPELINED:
        test_every_result_in_every_pipeline_step("start", result)
        return
    core = in_state(state)
    view = ROUTES[state][0]
    if state in (State.DONE, State.FAILED):
        assert core.handle("m", RESULTS[result], world(view=view)) == []
    elif (state, result) in TRANSITIONS:
        actions, after = TRANSITIONS[state, result]
        assert plain(core.handle("m", RESULTS[result], world(view=view))) == actions
        assert state_of(core) is (None if after in (State.DONE, State.FAILED) else after)
    else:
        with pytest.raises(UnexpectedEvent):
            core.handle("m", RESULTS[result], world(view=view))



# -- PIPELINED: the lease, the move and the wait at once ----------------------------------

#: The steps of a pipelined Mount: the results fed since it started (view VIEW: the
#: dataset's primary is this node).
STEPS = {
    "start": [],
    "leased": [LeaseTaken()],
    "moved": [Moved()],
    "move-refused": [MoveRefused(OTHER)],
    "move-gone": [MoveGone()],
    "mounted": [Mounted(PATH)],
    "leased-moved": [LeaseTaken(), Moved()],
    "moved-leased": [Moved(), LeaseTaken()],
    "leased-mounted": [LeaseTaken(), Mounted(PATH)],
    "moved-mounted": [Moved(), Mounted(PATH)],
    "asked-again": [MoveRefused(OTHER), LeaseTaken()],
    "asked-again-mounted": [MoveRefused(OTHER), LeaseTaken(), Mounted(PATH)],
    "move-refused-mounted": [MoveRefused(OTHER), Mounted(PATH)],
    "move-gone-mounted": [MoveGone(), Mounted(PATH)],
}

BOTH = Abandon((AskMove, WaitMounted))
MOUNT_OUT = Abandon((WaitMounted,))
MOVE_OUT = Abandon((AskMove,))
ASK_AGAIN = [AskMove(ID, NODE)]
WAIT_VIEW = [WaitView(LEASE_UNTIL)]
FETCH = [FetchByName("v1")]
CHECK = [CheckMountpoint(PATH)]
P, W, F, C, X = (State.PIPELINED, State.WAITING_VIEW, State.FETCHING, State.CHECKING,
                 State.FAILED)

#: (step, result) -> (actions at time 0, state after); pairs absent are UnexpectedEvent.
PIPELINE_TRANSITIONS = {
    ("start", "lease-taken"): ([], P),
    ("start", "lease-refused"): ([BOTH] + WAIT_VIEW, W),
    ("start", "lease-gone"): ([BOTH] + FETCH, F),
    ("start", "moved"): ([], P),
    ("start", "move-refused"): ([], P),
    ("start", "move-gone"): ([], P),
    ("start", "mounted"): ([], P),
    ("leased", "moved"): ([], P),
    ("leased", "move-refused"): (ASK_AGAIN, P),
    ("leased", "move-gone"): (refused(), X),
    ("leased", "mounted"): ([], P),
    ("moved", "lease-taken"): ([], P),
    ("moved", "lease-refused"): ([MOUNT_OUT] + WAIT_VIEW, W),
    ("moved", "lease-gone"): ([MOUNT_OUT] + FETCH, F),
    ("moved", "mounted"): ([], P),
    ("move-refused", "lease-taken"): (ASK_AGAIN, P),
    ("move-refused", "lease-refused"): ([MOUNT_OUT] + WAIT_VIEW, W),
    ("move-refused", "lease-gone"): ([MOUNT_OUT] + FETCH, F),
    ("move-refused", "mounted"): ([], P),
    ("move-gone", "lease-taken"): (refused(), X),
    ("move-gone", "lease-refused"): ([MOUNT_OUT] + WAIT_VIEW, W),
    ("move-gone", "lease-gone"): ([MOUNT_OUT] + FETCH, F),
    ("move-gone", "mounted"): ([], P),
    ("mounted", "lease-taken"): ([], P),
    ("mounted", "lease-refused"): ([MOVE_OUT] + WAIT_VIEW, W),
    ("mounted", "lease-gone"): ([MOVE_OUT] + FETCH, F),
    ("mounted", "moved"): ([], P),
    ("mounted", "move-refused"): ([], P),
    ("mounted", "move-gone"): ([], P),
    ("leased-moved", "mounted"): (CHECK, C),
    ("moved-leased", "mounted"): (CHECK, C),
    ("leased-mounted", "moved"): (CHECK, C),
    ("leased-mounted", "move-refused"): (ASK_AGAIN, P),
    ("leased-mounted", "move-gone"): (refused(), X),
    ("moved-mounted", "lease-taken"): (CHECK, C),
    ("moved-mounted", "lease-refused"): (WAIT_VIEW, W),
    ("moved-mounted", "lease-gone"): (FETCH, F),
    ("asked-again", "moved"): ([], P),
    ("asked-again", "move-refused"): (refused(), X),
    ("asked-again", "move-gone"): (refused(), X),
    ("asked-again", "mounted"): ([], P),
    ("asked-again-mounted", "moved"): (CHECK, C),
    ("asked-again-mounted", "move-refused"): (refused(), X),
    ("asked-again-mounted", "move-gone"): (refused(), X),
    ("move-refused-mounted", "lease-taken"): (ASK_AGAIN, P),
    ("move-refused-mounted", "lease-refused"): (WAIT_VIEW, W),
    ("move-refused-mounted", "lease-gone"): (FETCH, F),
    ("move-gone-mounted", "lease-taken"): (refused(), X),
    ("move-gone-mounted", "lease-refused"): (WAIT_VIEW, W),
    ("move-gone-mounted", "lease-gone"): (FETCH, F),
}


def at_step(step: str, now: float = 0.0) -> PluginCore:
    """A core whose Mount "m" of the local volume v1 is pipelined and at ``step``."""
    core = new_core()
    assert core.mount("m", "v1", MOUNT, world(now, view=VIEW)) == [
        SetTimer(now + TIMEOUT), TakeLease(ID), AskMove(ID, NODE), WaitMounted(ID)]
    for event in STEPS[step]:
        core.handle("m", event, world(now, view=VIEW))
    assert state_of(core) is State.PIPELINED
    return core


@pytest.mark.parametrize("step", list(STEPS), ids=str)
@pytest.mark.parametrize("result", list(RESULTS), ids=str)
def test_every_result_in_every_pipeline_step(step, result):
    """Each IO result at each step of a pipelined Mount: its transition, else
    ``UnexpectedEvent`` (a result it does not wait for, or one it has had)."""
    core = at_step(step)
    if (step, result) not in PIPELINE_TRANSITIONS:
        with pytest.raises(UnexpectedEvent):
            core.handle("m", RESULTS[result], world())
        return
    actions, after = PIPELINE_TRANSITIONS[step, result]
    assert plain(core.handle("m", RESULTS[result], world())) == actions
    assert state_of(core) is (None if after is State.FAILED else after)


@pytest.mark.parametrize("step", list(STEPS), ids=str)
def test_hang_up_at_every_pipeline_step(step):
    """dockerd hanging up fails a pipelined Mount at any step: release, refuse."""
    core = at_step(step)
    assert plain(core.handle("m", HungUp(), world())) == refused(error=CancelledError)
    assert core.attempt("m") is None


@pytest.mark.parametrize("step", list(STEPS), ids=str)
def test_failure_at_every_pipeline_step(step):
    """An IO failure at any step of a pipelined Mount refuses it, releasing the lease."""
    core = at_step(step)
    actions = core.handle("m", Failed(ControlUnreachable("control", 4523, "refused")),
                          world())
    assert plain(actions) == refused()
    assert "cannot reach" in str(actions[-1].error)


@pytest.mark.parametrize("step", list(STEPS), ids=str)
def test_timers_at_every_pipeline_step(step):
    """At any step of a pipelined Mount, an early timer changes nothing and the deadline
    fails it."""
    core = at_step(step)
    assert core.handle("m", Timer(LEASE_UNTIL), world(now=LEASE_UNTIL)) == []
    assert state_of(core) is State.PIPELINED
    actions = core.handle("m", Timer(TIMEOUT, "attaching"), world(now=TIMEOUT))
    assert plain(actions) == refused()
    assert "(state here: attaching)" in str(actions[-1].error)


@pytest.mark.parametrize("step", list(STEPS), ids=str)
def test_view_push_at_every_pipeline_step(step):
    """A view push does nothing to a pipelined Mount."""
    core = at_step(step)
    assert core.view_pushed(world()) == {}
    assert core.handle("m", ViewPushed(), world()) == []
    assert state_of(core) is State.PIPELINED


@pytest.mark.parametrize("step", ["start", "moved", "mounted", "moved-mounted"], ids=str)
def test_pipelined_lease_refused_after_the_retry_deadline(step):
    """A pipelined lease refused after the retry window fails at once (nothing to abandon:
    the answer stops all IO), naming the holder's host."""
    core = at_step(step)
    actions = core.handle("m", LeaseRefused(OTHER), world(now=LEASE_UNTIL))
    assert plain(actions) == refused()
    assert f"in use on node {OTHER} (host 10.0.0.2)" in str(actions[-1].error)


def test_pipelined_lease_gone_twice():
    """A pipelined dataset gone again after the control service named it fails."""
    core = at_step("start")
    core.handle("m", LeaseGone(), world())
    assert core.handle("m", Fetched(NEW), world()) == PIPELINE_NEW
    actions = core.handle("m", LeaseGone(), world())
    assert plain(actions) == refused(NEW_ID)
    assert "deleted from the cluster while it was being mounted" in str(actions[-1].error)


def test_pipelined_wait_then_pipelined_again():
    """A pipelined lease refused in the window waits for the view, then pipelines again
    from scratch (the early results of the first round are forgotten)."""
    core = at_step("moved-mounted")
    core.handle("m", LeaseRefused(OTHER), world())
    assert core.view_pushed(world(now=0.1)) == {
        "m": [TakeLease(ID), AskMove(ID, NODE), WaitMounted(ID)]}
    assert core.handle("m", LeaseTaken(), world(now=0.1)) == []
    assert core.handle("m", Moved(), world(now=0.1)) == []
    assert core.handle("m", Mounted(NEW_PATH), world(now=0.1)) == [
        CheckMountpoint(NEW_PATH)]


def test_pipelined_mount_answers():
    """A pipelined Mount whose three results are in checks, counts and answers."""
    core = at_step("moved-mounted")
    assert core.handle("m", LeaseTaken(), world()) == CHECK
    assert core.handle("m", Checked(True), world()) == [CountMount("v1", MOUNT, ID)]
    assert core.handle("m", Counted(), world()) == [Answer(PATH, ID)]
    assert core.attempt("m") is None


def test_new_volume_is_pipelined():
    """A Mount that creates its volume pipelines the rest: the new dataset is here."""
    core = new_core()
    assert core.mount("m", "v1", MOUNT, world(view=EMPTY)) == [
        SetTimer(TIMEOUT), CreateDataset("v1")]
    assert core.handle("m", Created(NEW), world(view=EMPTY)) == PIPELINE_NEW

def _leased(holder: str = NODE, expiration: float = 60.0, primary: str = NODE) -> ClusterView:
    """VIEW with v1 on ``primary`` leased by ``holder`` until ``expiration``."""
    entry = DatasetEntry(dataset_id=ID, primary=primary, metadata={"name": "v1"},
                         lease=Lease(ID, holder, expiration))
    return ClusterView(datasets={ID: entry}, nodes=VIEW.nodes)


HELD = frozenset({ID})


def test_start_mount_under_own_lease_only_waits():
    """A Mount of a volume whose lease this node holds and the view shows live (dockerd's
    start Mount after the copy-up one) asks for no lease and no move: it waits, checks,
    counts."""
    core, now = new_core(), world(view=_leased(), held=HELD)
    assert core.mount("m", "v1", MOUNT, now) == [SetTimer(TIMEOUT), WaitMounted(ID)]
    assert core.attempt("m").state is State.WAITING_MOUNTED
    assert core.uses_here("v1", now) == 1
    assert core.handle("m", Mounted(PATH), now) == CHECK
    assert core.handle("m", Checked(True), now) == [CountMount("v1", MOUNT, ID)]
    assert core.handle("m", Counted(), now) == [Answer(PATH, ID)]


@pytest.mark.parametrize("view, held, now", [
    (_leased(), frozenset(), 0.0),                    # the keeper does not hold it
    (_leased(), frozenset({NEW_ID}), 0.0),            # the keeper holds another
    (_leased(holder=OTHER), HELD, 0.0),               # the view: another node's lease
    (_leased(), HELD, 60.0),                          # the view: our lease ran out
    (VIEW, HELD, 0.0),                                # the view: no lease (yet)
], ids=["not-held", "other-held", "other-holder", "expired", "no-lease"])
def test_start_mount_fast_only_under_own_live_lease(view, held, now):
    """Unless the keeper holds the lease and the view shows it this node's and live, a
    Mount takes the lease (pipelined) as any other."""
    core = new_core()
    actions = core.mount("m", "v1", MOUNT, world(now, view=view, held=held))
    assert core.attempt("m").state is State.PIPELINED
    assert TakeLease(ID) in actions


def test_start_mount_fast_never_when_primary_elsewhere():
    """A Mount of a volume whose primary is elsewhere leases first, even if the lease is
    this node's."""
    core = new_core()
    actions = core.mount("m", "v1", MOUNT, world(view=_leased(primary=OTHER), held=HELD))
    assert actions == [SetTimer(TIMEOUT), TakeLease(ID)]


@pytest.mark.parametrize("state", LIVE, ids=lambda s: s.value)
def test_hang_up_in_every_state(state):
    """dockerd hanging up fails the Mount: uncount if counted, release, refuse."""
    core = in_state(state)
    dataset_id = None if state in NO_DATASET else ID
    assert plain(core.handle("m", HungUp(), world(view=ROUTES[state][0]))) == refused(
        dataset_id, CancelledError, counted=state is State.COUNTING)
    assert core.attempt("m") is None


@pytest.mark.parametrize("state", LIVE, ids=lambda s: s.value)
@pytest.mark.parametrize("error,refusal", [
    (ControlUnreachable("control", 4523, "connection refused"), "cannot reach"),
    (InvalidRequest(400, "bad"), "the control service refused: bad"),
    (PluginError("as is"), "as is"),
], ids=["unreachable", "refused", "plugin-error"])
def test_failure_in_every_state(state, error, refusal):
    """An IO failure in any state refuses the Mount with an actionable message."""
    core = in_state(state)
    actions = core.handle("m", Failed(error), world(view=ROUTES[state][0]))
    dataset_id = None if state in NO_DATASET else ID
    assert plain(actions) == refused(dataset_id, PluginError,
                                     counted=state is State.COUNTING)
    assert refusal in str(actions[-1].error)


def test_internal_error_passes_through():
    """An unexpected exception is refused as is (the HTTP layer logs it as internal)."""
    core = in_state(State.WAITING_MOUNTED)
    error = RuntimeError("bug")
    actions = core.handle("m", Failed(error), world())
    assert actions[-1].error is error


@pytest.mark.parametrize("state", LIVE, ids=lambda s: s.value)
def test_timeout_in_every_state(state):
    """The Mount's timer at its deadline fails it, naming the state here."""
    core = in_state(state)
    actions = core.handle("m", Timer(TIMEOUT, "attaching"),
                          world(now=TIMEOUT, view=ROUTES[state][0]))
    dataset_id = None if state in NO_DATASET else ID
    assert plain(actions) == refused(dataset_id, PluginError,
                                     counted=state is State.COUNTING)
    assert "not ready on this node within 100 s (state here: attaching)" in \
        str(actions[-1].error)


def test_timeout_not_started():
    """A Mount that times out before the agent reported anything says "not started"."""
    core = in_state(State.WAITING_MOUNTED)
    actions = core.handle("m", Timer(TIMEOUT, None), world(now=TIMEOUT + 1))
    assert "(state here: not started)" in str(actions[-1].error)


@pytest.mark.parametrize("transfer, progress", [
    (Transfer(3 * 2 ** 20, 12 * 2 ** 20), "3.0 MiB of 12.0 MiB received (25%)"),
    (Transfer(5 * 2 ** 19, None), "2.5 MiB received"),
], ids=["estimated", "no estimate"])
def test_timeout_while_moving_here(transfer, progress):
    """A Mount whose budget ends while its volume is still moving to this node (a
    peer-to-peer move) fails then with the bytes received and "retry when done", and
    gives its lease back like any timeout; the move itself is not touched."""
    core = in_state(State.WAITING_MOUNTED)
    actions = core.handle("m", Timer(TIMEOUT, "receiving", transfer),
                          world(now=TIMEOUT))
    assert plain(actions) == refused(ID, PluginError)
    assert str(actions[-1].error) == (
        f"volume v1 is still moving to this node after 100 s: {progress}; the move goes "
        f"on: retry when done (`pyflock list` shows it here once it is)")


@pytest.mark.parametrize("state", LIVE, ids=lambda s: s.value)
def test_early_timer_in_every_state(state):
    """A timer before the deadline retries the lease only when waiting for the view; in
    WAITING_MOUNTED after a move it is the look at the move's progress (none: look
    again)."""
    core = in_state(state)
    actions = core.handle("m", Timer(LEASE_UNTIL), world(now=LEASE_UNTIL, view=ROUTES[state][0]))
    if state is State.WAITING_VIEW:
        assert actions == [TakeLease(ID)]
        assert state_of(core) is State.LEASING
    else:
        assert actions == ([SetTimer(LEASE_UNTIL + 1.0)] if state is State.WAITING_MOUNTED
                           else [])
        assert state_of(core) is state


def test_timer_a_rounding_error_early():
    """A timer that fires a rounding error before its time counts as on time."""
    core = in_state(State.WAITING_MOUNTED)
    actions = core.handle("m", Timer(TIMEOUT), world(now=TIMEOUT - 1e-9))
    assert plain(actions) == refused()


# -- a Mount waiting for a move here: fail early when the move cannot end in time ---------

MIB = 2 ** 20


def watch(core: PluginCore, progress, view: ClusterView = AWAY, start: float = 1.0) -> list:
    """Feed Mount "m" its looks at the move's progress, ``progress(t)`` at each second
    from ``start`` while it asks for them; the actions of the last look."""
    now, actions = start, [SetTimer(start)]
    while actions and isinstance(actions[-1], SetTimer) and actions[-1].at < TIMEOUT:
        now = actions[-1].at
        actions = core.handle("m", Timer(now, "receiving", progress(now)),
                              world(now=now, view=view))
    return actions


def test_move_too_slow_fails_early():
    """A Mount waiting for a move that the rate it sees cannot end by its deadline fails
    once it has watched it for 5 s, with the progress, the time left, the rate and
    "retry when done"; it gives its lease back, and the move itself is not touched."""
    core = in_state(State.WAITING_MOUNTED)
    # 1 MiB/s from t=1 (the first look), 1000 MiB in all: about 990 s to go.
    actions = watch(core, lambda t: Transfer(int((t - 1) * MIB), 1000 * MIB))
    assert plain(actions) == refused(ID, PluginError)
    assert str(actions[-1].error) == (
        "volume v1 is still moving to this node after 6 s: 5.0 MiB of 1000.0 MiB "
        "received (0%), about 995 s left at 1.0 MiB/s; the move goes on: retry when done "
        "(`pyflock list` shows it here once it is)")


def test_move_fast_enough_waits():
    """A Mount waiting for a move that the rate it sees ends in time keeps looking until
    the agent has mounted the volume, then answers as always."""
    core = in_state(State.WAITING_MOUNTED)
    # 1 MiB/s, 80 MiB in all: done at t=81, well before the deadline.
    actions = watch(core, lambda t: Transfer(int((t - 1) * MIB), 80 * MIB)
                    if t < 81 else None)
    assert actions == []
    assert state_of(core) is State.WAITING_MOUNTED
    assert core.handle("m", Mounted(PATH), world(now=82.0, view=AWAY)) == \
        [CheckMountpoint(PATH)]


@pytest.mark.parametrize("transfer", [Transfer(0, 1000 * MIB), None],
                         ids=["stalled", "none"])
def test_move_without_progress_waits(transfer):
    """A move that has not progressed yet, or none under way: the Mount waits for its
    deadline as always."""
    core = in_state(State.WAITING_MOUNTED)
    actions = watch(core, lambda t: transfer)
    assert actions == []
    assert state_of(core) is State.WAITING_MOUNTED


def test_move_total_unknown_waits_until_the_timeout():
    """A move of unknown total however slow: the Mount waits until its deadline and then
    fails with the bytes received (no estimate)."""
    core = in_state(State.WAITING_MOUNTED)
    progress = lambda t: Transfer(int((t - 1) * 2 ** 10), None)  # noqa: E731
    assert watch(core, progress) == []
    assert state_of(core) is State.WAITING_MOUNTED
    actions = core.handle("m", Timer(TIMEOUT, "receiving", progress(TIMEOUT)),
                          world(now=TIMEOUT, view=AWAY))
    assert plain(actions) == refused(ID, PluginError)
    assert "after 100 s: 0.1 MiB received; the move goes on" in str(actions[-1].error)


def test_timeout_gives_the_rate_seen():
    """A Mount that reaches its deadline while its move is still under way says how long
    the move has left at the rate it saw."""
    core = in_state(State.WAITING_MOUNTED)
    assert core.handle("m", Timer(1.0, "receiving", Transfer(0, 200 * MIB)),
                       world(now=1.0, view=AWAY)) == [SetTimer(2.0)]
    actions = core.handle("m", Timer(TIMEOUT, "receiving", Transfer(99 * MIB, 200 * MIB)),
                          world(now=TIMEOUT, view=AWAY))
    assert "99.0 MiB of 200.0 MiB received (49%), about 101 s left at 1.0 MiB/s" in \
        str(actions[-1].error)


def test_pipelined_watches_a_move_under_way():
    """A Mount of a volume whose primary is here already while another node still holds
    it (a move asked by an earlier Mount, under way) watches the move and fails early
    too; with no other holder it does not look."""
    core = new_core()
    assert core.mount("m", "v1", MOUNT, world()) == [
        SetTimer(TIMEOUT), TakeLease(ID), AskMove(ID, NODE), WaitMounted(ID)]
    held = ClusterView(datasets={ID: attr.evolve(V1, holders=(NODE, OTHER))},
                       nodes=VIEW.nodes)
    core = new_core()
    assert core.mount("m", "v1", MOUNT, world(view=held)) == [
        SetTimer(TIMEOUT), TakeLease(ID), AskMove(ID, NODE), WaitMounted(ID), SetTimer(1.0)]
    core.handle("m", LeaseTaken(), world(view=held))
    core.handle("m", Moved(), world(view=held))
    actions = watch(core, lambda t: Transfer(int((t - 1) * MIB), 1000 * MIB), view=held)
    assert plain(actions) == refused(ID, PluginError)
    assert "about 995 s left at 1.0 MiB/s" in str(actions[-1].error)


def test_one_look_at_a_time():
    """A pipelined Mount that goes back to the lease and pipelines again keeps the one
    look it asked for, and looks again after it, not twice."""
    held = ClusterView(datasets={ID: attr.evolve(V1, holders=(OTHER,))}, nodes=VIEW.nodes)
    core = new_core()
    core.mount("m", "v1", MOUNT, world(view=held))
    assert core.handle("m", LeaseRefused(OTHER), world(view=held)) == [
        Abandon((AskMove, WaitMounted)), WaitView(LEASE_UNTIL)]
    assert core.handle("m", ViewPushed(), world(now=0.5, view=held)) == [
        TakeLease(ID), AskMove(ID, NODE), WaitMounted(ID)]
    assert core.handle("m", Timer(1.0, "receiving", None), world(now=1.0, view=held)) == [
        SetTimer(2.0)]


def test_view_wait_timer_too_early():
    """The view-wait timer before its time changes nothing."""
    core = in_state(State.WAITING_VIEW)
    assert core.handle("m", Timer(LEASE_UNTIL / 2), world(now=LEASE_UNTIL / 2)) == []
    assert state_of(core) is State.WAITING_VIEW


@pytest.mark.parametrize("state", LIVE, ids=lambda s: s.value)
def test_view_push_in_every_state(state):
    """A view push retries the lease of a Mount waiting for one, and nothing else."""
    core = in_state(state)
    pushed = core.view_pushed(world(view=ROUTES[state][0]))
    direct = in_state(state).handle("m", ViewPushed(), world(view=ROUTES[state][0]))
    if state is State.WAITING_VIEW:
        assert pushed == {"m": [TakeLease(ID)]}
        assert direct == [TakeLease(ID)]
    else:
        assert (pushed, direct) == ({}, [])
        assert state_of(core) is state


@pytest.mark.parametrize("state", [State.DONE, State.FAILED], ids=lambda s: s.value)
def test_finished_ignores_everything(state):
    """A Mount that answered ignores timers, pushes, hang-ups and late failures."""
    core = in_state(state)
    for event in (Timer(TIMEOUT), ViewPushed(), HungUp(), Failed(CancelledError())):
        assert core.handle("m", event, world(now=TIMEOUT)) == []
    assert core.view_pushed(world()) == {}


def test_view_push_frees_the_lease():
    """Refused, then a push (the holder let go): the retried lease is taken, the Mount
    goes on."""
    core = in_state(State.WAITING_VIEW)
    assert core.view_pushed(world(now=0.1, view=AWAY)) == {"m": [TakeLease(ID)]}
    assert core.handle("m", LeaseTaken(), world(now=0.1, view=AWAY)) == [AskMove(ID, OTHER)]


def test_refused_lease_after_the_retry_deadline():
    """A lease still refused after the retry window fails, naming the holder's host."""
    core = in_state(State.WAITING_VIEW)
    core.handle("m", Timer(LEASE_UNTIL), world(now=LEASE_UNTIL))
    actions = core.handle("m", LeaseRefused(OTHER), world(now=LEASE_UNTIL))
    assert plain(actions) == refused()
    message = str(actions[-1].error)
    assert f"in use on node {OTHER} (host 10.0.0.2)" in message
    assert "expires within 60 s" in message


def test_refused_by_an_unknown_holder():
    """A refusal without a holder says "another node"."""
    core = in_state(State.MOVING)
    actions = core.handle("m", MoveRefused(None), world())
    assert "in use on another node" in str(actions[-1].error)


def test_lease_gone_twice():
    """A dataset gone again after the control service named it fails the Mount."""
    core = in_state(State.FETCHING)
    moved_away = attr_evolve(NEW, primary=OTHER)
    assert core.handle("m", Fetched(moved_away), world()) == [TakeLease(NEW_ID)]
    actions = core.handle("m", LeaseGone(), world())
    assert plain(actions) == refused(NEW_ID)
    assert "deleted from the cluster while it was being mounted" in str(actions[-1].error)


def test_created_and_deleted_elsewhere():
    """A name taken but then not found means a race elsewhere: retry."""
    core = in_state(State.FETCHING_TAKEN)
    actions = core.handle("m", Fetched(None), world(view=EMPTY))
    assert "created and deleted elsewhere at the same time" in str(actions[-1].error)


def test_created_volume_is_found_before_the_view_has_it():
    """A dataset the Mount created is the volume until the view catches up."""
    core = in_state(State.CREATING)
    core.handle("m", Created(NEW), world(view=EMPTY))
    assert core.find("v1", world(view=EMPTY)).dataset_id == NEW_ID


def test_mount_moves_from_elsewhere():
    """The move names where the view has the dataset."""
    core = new_core()
    view = ClusterView(datasets={ID: ELSEWHERE})
    core.mount("m", "v1", MOUNT, world(view=view))
    assert core.handle("m", LeaseTaken(), world(view=view)) == [AskMove(ID, OTHER)]


def test_mount_starts_with_its_deadline():
    """A Mount asks for its deadline timer first, then leases the viewed volume (and,
    when it is here already, asks for the move and waits for it at once)."""
    assert new_core().mount("m", "v1", MOUNT, world(now=5.0, view=AWAY)) == [
        SetTimer(5.0 + TIMEOUT), TakeLease(ID)]
    assert new_core().mount("m", "v1", MOUNT, world(now=5.0)) == [
        SetTimer(5.0 + TIMEOUT), TakeLease(ID), AskMove(ID, NODE), WaitMounted(ID)]


def test_mount_of_a_bad_name_not_in_the_view():
    """A volume to create here with a name Docker cannot use is refused at once."""
    core = new_core()
    actions = core.mount("m", "-bad", MOUNT, world(view=EMPTY))
    assert plain(actions) == [SetTimer(TIMEOUT), (Refuse, PluginError, None)]
    assert core.attempt("m") is None


def test_same_key_twice():
    """Two Mounts under one key are a bug in the shell."""
    core = new_core()
    core.mount("m", "v1", MOUNT, world())
    with pytest.raises(UnexpectedEvent):
        core.mount("m", "v1", MOUNT, world())


def test_unknown_key_ignored():
    """An event for a Mount the core does not know (answered long ago) does nothing."""
    assert new_core().handle("nope", LeaseTaken(), world()) == []


# -- bookkeeping --------------------------------------------------------------------------


def test_mount_in_progress_is_a_use():
    """A Mount in progress counts as a use of its volume and keeps its lease."""
    core = in_state(State.WAITING_MOUNTED)
    assert core.uses_here("v1", world()) == 1
    assert core.datasets_in_use(world()) == {ID}
    core.handle("m", HungUp(), world())
    assert core.uses_here("v1", world()) == 0
    assert core.datasets_in_use(world()) == set()


def test_counted_mounts_are_uses():
    """Counted mounts are uses; their dataset comes from the table, else the view."""
    core = new_core()
    table = MountTable().mount("v1", MOUNT, None).mount("other", "x" * 64, NEW_ID)
    assert core.uses_here("v1", world(table=table)) == 1
    assert core.datasets_in_use(world(table=table)) == {ID, NEW_ID}


def test_release_after_last_unmount():
    """The last Unmount's dataset is released later; an Unmount with uses left is not."""
    core = new_core()
    assert core.release_after_unmount("v1", world()) == ID
    table = MountTable().mount("v1", MOUNT, ID)
    assert core.release_after_unmount("v1", world(table=table)) is None


def test_remove_own_idle_volume():
    """Remove of a volume idle here (its own idle lease included) deletes its dataset."""
    core = new_core()
    leased = ClusterView(datasets={ID: DatasetEntry(dataset_id=ID, primary=NODE,
                                                    metadata={"name": "v1"},
                                                    lease=Lease(ID, NODE, 60.0))})
    assert core.removable("v1", world(view=leased)).dataset_id == ID


def test_remove_in_use_here():
    """Remove of a volume mounted here is refused, saying how many mounts."""
    table = MountTable().mount("v1", MOUNT, ID)
    with pytest.raises(PluginError, match=r"in use by 1 mount\(s\) on this node"):
        new_core().removable("v1", world(table=table))


def test_remove_absent():
    """Remove of an unknown volume has nothing to delete."""
    assert new_core().removable("nope", world()) is None


def test_removed_hidden_until_the_view_agrees():
    """A removed volume is gone at once, though the view still shows it."""
    core = new_core()
    core.overlay.removed("v1", ID, 0.0)
    assert core.find("v1", world()) is None
    assert core.overlay.volumes(VIEW, 0.0) == {}
    deleted = ClusterView(datasets={ID: attr_evolve(V1, deleted=True)})
    core.find("v1", world(view=deleted))
    assert core.find("v1", world()) == V1


def attr_evolve(record, **changes):
    """``record`` with ``changes``."""
    import attr
    return attr.evolve(record, **changes)


def test_overlay_expires():
    """Our own create is trusted over the view for the overlay's time only."""
    core = PluginCore(NODE, overlay_ttl=10.0)
    core.overlay.created(NEW, 0.0)
    assert core.overlay.volumes(EMPTY, 5.0)["v1"].dataset_id == NEW_ID
    assert core.find("v1", world(now=10.0, view=EMPTY)) is None


def test_create_decisions():
    """Create asks for what the options say, and nothing for an existing volume."""
    core = new_core()
    assert core.create("v1", None, world()) is None
    assert core.create("v2", {"size": "1G", "profile": "Gold"}, world()) == NewVolume(
        1024 ** 3, "gold", {"name": "v2", "profile": "gold"})
    with pytest.raises(PluginError, match="invalid volume name"):
        core.create("-x", None, world())
    with pytest.raises(PluginError, match="unknown option"):
        core.create("v3", {"color": "red"}, world())


def test_remount_after_activate():
    """After an Activate, a mount ID the old dockerd counted is counted afresh, once."""
    core = new_core()
    table = MountTable().mount("v1", MOUNT, ID)
    assert core.count_as_remount("v1", MOUNT, world(table=table)) is False
    core.activated()
    assert core.count_as_remount("v1", MOUNT, world(table=table)) is True
    assert core.count_as_remount("v1", MOUNT, world(table=table)) is False
    assert core.since_activate == {("v1", MOUNT)}
    core.settled()
    assert core.since_activate == frozenset()


def test_remount_action():
    """The counting step of a Mount replaces a stale count after an Activate."""
    core = new_core()
    core.activated()
    table = MountTable().mount("v1", MOUNT, ID)
    core.mount("m", "v1", MOUNT, world(table=table))
    for event in (LeaseTaken(), Moved(), Mounted(PATH)):
        core.handle("m", event, world(table=table))
    assert core.handle("m", Checked(True), world(table=table)) == [
        CountMount("v1", MOUNT, ID, remount=True)]


def test_describe():
    """Get's record: where the volume is, its size, lease (while valid) and uses here."""
    local = LocalState("mounted", PATH)
    leased = attr_evolve(V1, lease=Lease(ID, NODE, 60.0), maximum_size=1024 ** 3)
    assert describe(leased, local, NODE, world(), 2, status=True) == {
        "Name": "v1", "Mountpoint": PATH,
        "Status": {"dataset_id": ID, "primary": NODE, "primary_host": "10.0.0.1",
                   "size": "1G", "profile": "", "state": "mounted", "lease": NODE,
                   "mounts_here": 2}}
    assert describe(leased, local, NODE, world(60.0), 2, status=True)["Status"]["lease"] == ""
    assert describe(ELSEWHERE, None, NODE, world(), 0, status=True)["Status"]["state"] == \
        "on another node"
    assert describe(V1, None, NODE, world(), 0, status=True)["Status"]["state"] == "pending"
    assert describe(V1, None, NODE, world(), 0, status=False) == {"Name": "v1"}
    assert mounted_path(LocalState("attaching")) is None
