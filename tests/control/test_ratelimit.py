"""
The pure limits on node certificates (issue 8): the token bucket of their dataset writes,
the limiter that keeps one per node, and the count their dataset quota is checked on.
"""

import pytest
from hypothesis import given, strategies as st

from pyflock.common._model import Configuration, Dataset
from pyflock.control._ratelimit import (
    NodeLimits, QuotaCounts, TokenBucketPolicy, WriteRateLimiter, live_datasets_on,
)

A = "aaaaaaaa-0000-4000-8000-000000000001"
B = "bbbbbbbb-0000-4000-8000-000000000002"


def test_burst_then_rate():
    """A full bucket allows ``burst`` writes at once, then one per ``1/rate`` seconds,
    saying how long to wait when empty."""
    policy = TokenBucketPolicy(rate=20, burst=100)
    bucket = None
    for _ in range(100):
        bucket, wait = policy.take(bucket, 1000.0)
        assert wait is None
    same, wait = policy.take(bucket, 1000.0)
    assert (same, wait) == (bucket, pytest.approx(0.05))
    bucket, wait = policy.take(bucket, 1000.05)
    assert wait is None
    assert policy.take(bucket, 1000.05)[1] == pytest.approx(0.05)


def test_clock_going_back_refills_nothing():
    """A clock that steps back neither refills the bucket nor fails."""
    policy = TokenBucketPolicy(rate=1, burst=1)
    bucket, _ = policy.take(None, 100.0)
    assert policy.take(bucket, 50.0)[1] == pytest.approx(1.0)
    assert policy.take(bucket, 101.0)[1] is None


@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), max_size=300),
       st.floats(min_value=0.5, max_value=50), st.integers(min_value=1, max_value=20))
def test_never_more_than_burst_plus_rate(gaps, rate, burst):
    """However writes are spaced, those allowed by ``t`` never pass
    ``burst + rate * t``."""
    policy = TokenBucketPolicy(rate=rate, burst=burst)
    bucket, now, allowed = None, 0.0, 0
    for gap in gaps:
        now += gap
        bucket, wait = policy.take(bucket, now)
        allowed += wait is None
        assert allowed <= burst + rate * now + 1e-6


def test_limiter_keeps_nodes_apart():
    """One node's writes do not use another's bucket."""
    limiter = WriteRateLimiter(TokenBucketPolicy(rate=1, burst=2))
    assert [limiter.take(A, 0.0) for _ in range(3)][:2] == [None, None]
    assert limiter.take(A, 0.0) is not None
    assert limiter.take(B, 0.0) is None


def test_limiter_forgets_refilled_buckets():
    """Buckets of nodes that stopped writing are dropped once many keys are known, and
    they come back full."""
    limiter = WriteRateLimiter(TokenBucketPolicy(rate=1, burst=1))
    for index in range(1100):
        limiter.take(f"node-{index}", float(index))
    assert len(limiter._buckets) < 1100
    assert limiter.take("node-0", 2000.0) is None


def test_bad_policies_refused():
    """A rate or burst that allows nothing, or a quota below 1, is refused."""
    for make in (lambda: TokenBucketPolicy(rate=0), lambda: TokenBucketPolicy(burst=0),
                 lambda: TokenBucketPolicy(rate=float("inf")),
                 lambda: NodeLimits(dataset_quota=0), lambda: NodeLimits(dataset_quota=True)):
        with pytest.raises(ValueError):
            make()


def test_live_datasets_on():
    """The quota counts the live datasets a node is the primary of."""
    config = Configuration()
    for index, primary in enumerate([A, A, B, A]):
        config = config.create(Dataset(dataset_id=f"11111111-2222-4333-8444-{index:012d}",
                                       primary=primary))
    config = config.delete(0.0, "11111111-2222-4333-8444-000000000000")
    assert (live_datasets_on(config, A), live_datasets_on(config, B)) == (2, 1)


@given(st.lists(st.tuples(st.sampled_from(["create", "delete", "move"]),
                          st.sampled_from([A, B]), st.integers(0, 30), st.booleans()),
                max_size=80),
       st.integers(1, 6))
def test_quota_counts_agree_with_counting(steps, quota):
    """Whatever changes happen between checks, ``QuotaCounts`` answers what counting the
    configuration answers."""
    config, counts = Configuration(), QuotaCounts()
    for action, node, number, check in steps:
        dataset_id = f"11111111-2222-4333-8444-{number:012d}"
        existing = config.datasets.get(dataset_id)
        if action == "create" and existing is None:
            config = config.create(Dataset(dataset_id=dataset_id, primary=node))
        elif action == "delete" and existing is not None and not existing.deleted:
            config = config.delete(0.0, dataset_id)
        elif action == "move" and existing is not None and not existing.deleted:
            config = config.update(0.0, dataset_id, primary=node)
        for checked in (A, B) if check else ():
            expected = live_datasets_on(config, checked)
            assert counts.at_quota(config, checked, quota) == (
                expected if expected >= quota else None)
