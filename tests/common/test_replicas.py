"""The pure core of replica order and backoff (``pyflock.common._replicas``)."""

import pytest
from hypothesis import given, strategies as st

from pyflock.common._replicas import MAX_DELAY, ReplicaOrder, backoff


def test_starting_at_spreads_over_replicas():
    """``starting_at`` maps chance evenly onto the replicas, the last included."""
    assert [ReplicaOrder.starting_at(3, c).current for c in (0.0, 0.34, 0.67, 0.999)] == \
        [0, 1, 2, 2]


def test_failure_moves_on_at_once():
    """A replica that fails is left for the next one with no wait, until a round is done."""
    order, delay = ReplicaOrder(count=3, current=1).failed_over(0.5)
    assert (order.current, delay) == (2, 0.0)
    order, delay = order.failed_over(0.5)
    assert (order.current, delay) == (0, 0.0)


def test_full_round_backs_off():
    """When every replica failed in a row the client waits, longer after each round."""
    order = ReplicaOrder(count=2)
    delays = []
    for _ in range(6):
        order, delay = order.failed_over(0.0)
        delays.append(delay)
    assert delays == [0.0, backoff(1, 0.0), 0.0, backoff(2, 0.0), 0.0, backoff(3, 0.0)]
    assert backoff(1, 0.0) < backoff(2, 0.0) < backoff(3, 0.0)


def test_single_replica_backs_off_every_time():
    """With one address every failure is a full round, so every retry waits."""
    order, delay = ReplicaOrder(count=1).failed_over(0.0)
    assert (order.current, delay) == (0, backoff(1, 0.0))


def test_success_starts_a_new_round():
    """A replica that answers resets the count: its failure moves on at once again."""
    order = ReplicaOrder(count=2)
    order, _ = order.failed_over()
    order, _ = order.failed_over()
    order = order.succeeded()
    assert order.failed_over()[1] == 0.0 and order.rounds == 0


def test_backoff_jitter_and_ceiling():
    """Backoff is half fixed, half jitter, and never above ``MAX_DELAY``."""
    assert backoff(1, 0.0) * 2 == pytest.approx(backoff(1, 0.9999), rel=1e-3)
    assert backoff(100, 0.9999) <= MAX_DELAY


def test_pick_and_bad_orders():
    """``pick`` chooses the current replica's item; an empty or out-of-range order is refused."""
    assert ReplicaOrder(count=3, current=2).pick("abc") == "c"
    with pytest.raises(ValueError, match="at least one"):
        ReplicaOrder(count=0)
    with pytest.raises(ValueError, match="not one of"):
        ReplicaOrder(count=2, current=2)


@given(count=st.integers(1, 9), start=st.floats(0, 1, exclude_max=True),
       rounds=st.integers(1, 4))
def test_every_round_visits_every_replica_once(count, start, rounds):
    """Failing over round after round tries each replica once per round, in order, and
    waits exactly once per round, after its last replica."""
    order = ReplicaOrder.starting_at(count, start)
    first = order.current
    tried, waits = [], []
    for _ in range(count * rounds):
        tried.append(order.current)
        order, delay = order.failed_over(0.5)
        waits.append(delay > 0)
    assert tried == [(first + n) % count for n in range(count * rounds)]
    assert waits == ([False] * (count - 1) + [True]) * rounds


def test_answered_moves_to_that_replica():
    """A replica that answered becomes the current one, with a new round."""
    order, _ = ReplicaOrder(count=3).failed_over()
    assert order.answered(2) == ReplicaOrder(count=3, current=2)
