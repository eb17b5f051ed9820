"""
A Mount's judgement of a move it waits for (``pyflock.agent._plugin_model``): the rate it
saw, the time it projects, and whether the move can end before the Mount's deadline.
"""

from __future__ import annotations

from hypothesis import given, strategies as st

from pyflock.agent._plugin_model import (
    MOVE_MARGIN, MOVE_WATCH_MIN, MoveEstimate, MoveWatch, cannot_finish, move_estimate,
    still_moving, watch_move,
)
from pyflock.common._records import Transfer

MIB = 2 ** 20


def test_watch_starts_at_first_sight():
    """The watch starts at the first sight of a move, and not without one."""
    assert watch_move(None, 3.0, None) is None
    assert watch_move(None, 3.0, Transfer(10, 100)) == MoveWatch(3.0, 10)


def test_watch_slides_until_progress():
    """Until the move progresses the watch starts again at each sight (a move still
    setting up is not a slow one); once it has, it keeps its start."""
    watch = MoveWatch(3.0, 10)
    assert watch_move(watch, 4.0, Transfer(10, 100)) == MoveWatch(4.0, 10)
    assert watch_move(watch, 4.0, Transfer(20, 100)) is watch


def test_watch_restarts_with_the_move():
    """A move that starts again (fewer bytes done) or ends resets the watch."""
    assert watch_move(MoveWatch(3.0, 50), 4.0, Transfer(5, 100)) == MoveWatch(4.0, 5)
    assert watch_move(MoveWatch(3.0, 50), 4.0, None) is None


def test_estimate():
    """The rate since the watch began, and the bytes left at that rate."""
    assert move_estimate(MoveWatch(0.0, 0), 10.0, Transfer(20 * MIB, 100 * MIB)) == \
        MoveEstimate(2 * MIB, 40.0)


def test_no_estimate():
    """No total, no progress, or no watch: no estimate."""
    assert move_estimate(MoveWatch(0.0, 0), 10.0, Transfer(20 * MIB, None)) is None
    assert move_estimate(MoveWatch(0.0, 5), 10.0, Transfer(5, 100)) is None
    assert move_estimate(None, 10.0, Transfer(5, 100)) is None


def test_cannot_finish_waits_its_minimum():
    """A move however slow is judged only once watched for MOVE_WATCH_MIN seconds."""
    transfer = Transfer(MIB, 1000 * MIB)
    assert cannot_finish(MoveWatch(0.0, 0), MOVE_WATCH_MIN - 0.1, transfer, 100.0) is None
    assert cannot_finish(MoveWatch(0.0, 0), MOVE_WATCH_MIN, transfer, 100.0) is not None


def test_margin():
    """A projection past the deadline by no more than MOVE_MARGIN of the time left waits."""
    # 10 s watched at 1 MiB/s, 90 s left until the deadline.
    fits = Transfer(10 * MIB, int((10 + 90 * (1 + MOVE_MARGIN)) * MIB))
    assert cannot_finish(MoveWatch(0.0, 0), 10.0, fits, 100.0) is None
    late = Transfer(10 * MIB, fits.bytes_total + MIB)
    assert cannot_finish(MoveWatch(0.0, 0), 10.0, late, 100.0) is not None


def test_message():
    """The early failure says how far the move got, the time left and the rate seen."""
    estimate = MoveEstimate(2.5 * MIB, 431.4)
    assert str(still_moving("v1", 6, Transfer(15 * MIB, 1093 * MIB), estimate)) == (
        "volume v1 is still moving to this node after 6 s: 15.0 MiB of 1093.0 MiB "
        "received (1%), about 431 s left at 2.5 MiB/s; the move goes on: retry when done "
        "(`pyflock list` shows it here once it is)")


times = st.floats(min_value=0, max_value=1000, allow_nan=False)
spans = st.floats(min_value=0.01, max_value=200, allow_nan=False)
sizes = st.integers(min_value=0, max_value=2 ** 40)


@given(since=times, watched=spans, left=spans, start=sizes, progress=sizes, rest=sizes)
def test_never_fails_a_move_that_fits(since, watched, left, start, progress, rest):
    """A move whose projection at the rate seen ends by the deadline is never judged
    unable to finish."""
    now = since + watched
    transfer = Transfer(start + progress, start + progress + rest)
    estimate = move_estimate(MoveWatch(since, start), now, transfer)
    if estimate is not None and now + estimate.seconds_left <= now + left:
        assert cannot_finish(MoveWatch(since, start), now, transfer, now + left) is None


@given(since=times, watched=st.floats(min_value=MOVE_WATCH_MIN + 0.001, max_value=200),
       left=spans, start=sizes, progress=st.integers(min_value=1, max_value=2 ** 40),
       factor=st.floats(min_value=2 * (1 + MOVE_MARGIN), max_value=1000))
def test_always_fails_a_move_that_clearly_cannot(since, watched, left, start, progress,
                                                 factor):
    """A move watched long enough whose rate needs well over the time left (twice its
    margin) is judged unable to finish, with the time it projects."""
    now = since + watched
    rate = progress / watched
    rest = int(rate * left * factor) + 1
    transfer = Transfer(start + progress, start + progress + rest)
    estimate = cannot_finish(MoveWatch(since, start), now, transfer, now + left)
    assert estimate is not None
    assert estimate.seconds_left > left
