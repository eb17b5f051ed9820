"""
What one node certificate may make the cluster hold and do (issue 8): a cap on the live
datasets it may create and a token bucket on the rate of its dataset writes (creates,
moves, metadata changes, deletes). User certificates have neither. Pure: time is a
parameter (``now``), and the API (``_api_base``) turns a refusal into 403 or 429.
"""

from __future__ import annotations

import math
from typing import Optional

import attr

#: A node certificate may create datasets while it is the primary of fewer live ones.
DEFAULT_NODE_DATASET_QUOTA = 1000

#: A node certificate's dataset writes per second, sustained.
DEFAULT_NODE_WRITE_RATE = 20.0

#: How many dataset writes a node certificate may make at once after a quiet spell.
DEFAULT_NODE_WRITE_BURST = 100


@attr.s(frozen=True, auto_attribs=True)
class Bucket:
    """A token bucket: ``tokens`` left at time ``updated`` (POSIX seconds)."""

    tokens: float
    updated: float


@attr.s(frozen=True, auto_attribs=True)
class TokenBucketPolicy:
    """A bucket refilled at ``rate`` tokens per second, holding at most ``burst``."""

    rate: float = attr.ib(default=DEFAULT_NODE_WRITE_RATE)
    burst: int = attr.ib(default=DEFAULT_NODE_WRITE_BURST)

    @rate.validator
    def _check_rate(self, attribute, value) -> None:
        """The rate is a finite number greater than zero."""
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"a rate must be a positive number, not {value!r}")

    @burst.validator
    def _check_burst(self, attribute, value) -> None:
        """A burst allows at least one write."""
        if not value >= 1:
            raise ValueError(f"a burst must be at least 1, not {value!r}")

    def full(self, now: float) -> Bucket:
        """A bucket that has not been drawn from."""
        return Bucket(float(self.burst), now)

    def take(self, bucket: Optional[Bucket], now: float
             ) -> tuple[Bucket, Optional[float]]:
        """
        Draw one token from ``bucket`` (None: a full one) at ``now``: the new bucket and
        None, or the bucket unchanged and the seconds until a token will be there.
        """
        if bucket is None:
            bucket = self.full(now)
        # A clock that went back refills nothing (and takes nothing back).
        elapsed = max(0.0, now - bucket.updated)
        tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
        # Within rounding of a whole token is a whole token (1000.05 - 1000.0 < 0.05).
        if tokens >= 1 - 1e-9:
            return Bucket(max(0.0, tokens - 1), max(now, bucket.updated)), None
        return bucket, (1 - tokens) / self.rate


class WriteRateLimiter:
    """
    One token bucket per key (a node certificate's uuid) under ``policy``. Buckets that
    would be full again are forgotten, so the limiter holds only busy keys.
    """

    def __init__(self, policy: TokenBucketPolicy = TokenBucketPolicy()):
        self.policy = policy
        self._buckets: dict[str, Bucket] = {}

    def take(self, key: str, now: float) -> Optional[float]:
        """Count one write of ``key`` at ``now``: None if allowed, else the seconds to
        wait before retrying."""
        bucket, wait = self.policy.take(self._buckets.get(key), now)
        self._buckets[key] = bucket
        if len(self._buckets) > 1024:
            self._forget_full(now)
        return wait

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have refilled completely by ``now``."""
        policy = self.policy
        self._buckets = {
            key: bucket for key, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated) * policy.rate < policy.burst}


def live_datasets_on(configuration, node_uuid: str) -> int:
    """How many live (not deleted) datasets of ``configuration`` have ``node_uuid`` as
    primary."""
    return sum(1 for dataset in configuration.datasets.values()
               if dataset.primary == node_uuid and not dataset.deleted)


class QuotaCounts:
    """
    Whether a node is at its dataset quota, counting a configuration's datasets
    (``live_datasets_on``, O(datasets)) only when the answer could have changed: each
    generation changes one dataset, so a node counted ``n`` at generation ``g`` has at
    most ``n + (h - g)`` at generation ``h``.
    """

    def __init__(self):
        self._counted: dict[str, tuple[int, int]] = {}

    def at_quota(self, configuration, node_uuid: str, quota: int) -> Optional[int]:
        """The node's count of live datasets if it is at least ``quota``, else None."""
        generation = configuration.generation
        cached = self._counted.get(node_uuid)
        if cached is not None:
            count, counted_at = cached
            if counted_at == generation:
                return count if count >= quota else None
            if counted_at < generation and count + (generation - counted_at) < quota:
                return None
        count = live_datasets_on(configuration, node_uuid)
        self._counted[node_uuid] = (count, generation)
        return count if count >= quota else None


@attr.s(frozen=True, auto_attribs=True)
class NodeLimits:
    """
    The limits on node certificates: create only while primary of fewer than
    ``dataset_quota`` live datasets; dataset writes under ``writes``.
    """

    dataset_quota: int = attr.ib(default=DEFAULT_NODE_DATASET_QUOTA)
    writes: TokenBucketPolicy = attr.ib(default=TokenBucketPolicy())

    @dataset_quota.validator
    def _check_quota(self, attribute, value) -> None:
        """The quota is a whole number of at least 1."""
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"a dataset quota must be a whole number of at least 1, "
                             f"not {value!r}")


__all__ = ["Bucket", "DEFAULT_NODE_DATASET_QUOTA", "DEFAULT_NODE_WRITE_BURST",
           "DEFAULT_NODE_WRITE_RATE", "NodeLimits", "QuotaCounts", "TokenBucketPolicy",
           "WriteRateLimiter",
           "live_datasets_on"]
