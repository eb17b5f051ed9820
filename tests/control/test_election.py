"""
Unit tests of the leader election's pure core (``control/_election.py``): every state's
answer to every event, the grace of a new leader, and the choice of a compaction revision.
"""

from __future__ import annotations

from pyflock.control._election import (
    CAMPAIGNING, FENCED, FOLLOWING, LEADING, SOLE_LEADER, Campaign, Candidate, Candidates,
    Election, Fence, Grant, Granted, Lead, LeaseLost, Renewed, RenewFailed, Revoke, Started,
    StepDown, Stopped, WriteFenced, compaction_target, keep_samples,
)

TTL = 6.0
OURS = Candidate(b"/p/election/a", "one", 10)
OTHER = Candidate(b"/p/election/b", "two", 7)
LATER = Candidate(b"/p/election/c", "three", 12)


def campaigning(lease: int = 5) -> Election:
    """An election with lease ``lease`` granted at time 100, its key being put."""
    return Election(ttl=TTL).on(Started())[0].on(Granted(lease, 100.0))[0]


def leading() -> Election:
    """An election this replica leads since time 101."""
    return campaigning().on(Candidates(OURS, (OURS, LATER), 101.0))[0]


def following() -> Election:
    """An election replica ``two`` leads."""
    return campaigning().on(Candidates(OURS, (OTHER, OURS), 101.0))[0]


def test_start_asks_for_a_lease():
    """A replica that starts asks etcd for a lease, campaigning."""
    election, actions = Election(ttl=TTL).on(Started())
    assert (election.state, actions) == (CAMPAIGNING, (Grant(),))


def test_granted_lease_campaigns():
    """A granted lease is campaigned with: the key is put and the candidates read."""
    election, actions = Election(ttl=TTL).on(Granted(5, 100.0))
    assert (election.state, election.lease, election.renewed) == (CAMPAIGNING, 5, 100.0)
    assert actions == (Campaign(5),)


def test_lowest_create_revision_leads():
    """The campaign key with the lowest create revision leads, fenced by that revision."""
    election, actions = campaigning().on(Candidates(OURS, (OURS, LATER), 101.0))
    fence = Fence(OURS.key, OURS.revision)
    assert (election.state, election.leader, election.fence, election.since) == (
        LEADING, "one", fence, 101.0)
    assert actions == (Lead(fence),)


def test_lower_key_follows():
    """A replica whose key is not the lowest follows the lowest one's replica."""
    election, actions = campaigning().on(Candidates(OURS, (OTHER, OURS), 101.0))
    assert (election.state, election.leader, election.fence, actions) == (
        FOLLOWING, "two", None, ())


def test_follower_leads_once_the_leader_key_is_gone():
    """A follower reading the candidates again without the leader's key leads."""
    election, actions = following().on(Candidates(OURS, (OURS, LATER), 109.0))
    assert (election.state, election.since) == (LEADING, 109.0)
    assert actions == (Lead(Fence(OURS.key, OURS.revision)),)


def test_leader_reading_again_does_nothing():
    """A leader that reads the candidates again and still is lowest keeps leading."""
    before = leading()
    assert before.on(Candidates(OURS, (OURS,), 130.0)) == (before, ())


def test_leader_behind_a_lower_key_steps_down():
    """A leader that finds a lower key than its own (never in etcd) steps down."""
    election, actions = leading().on(Candidates(OURS, (OTHER, OURS), 130.0))
    assert election.state == FOLLOWING
    assert actions == (StepDown("two leads"),)


def test_own_key_gone_takes_a_new_lease():
    """Candidates read without our key (the lease ran out): a new lease, the old revoked."""
    election, actions = following().on(Candidates(None, (OTHER,), 120.0))
    assert (election.state, election.lease) == (CAMPAIGNING, None)
    assert actions == (Revoke(5), Grant())


def test_candidates_of_a_dropped_lease_are_ignored():
    """An answer to a campaign of a lease since dropped changes nothing."""
    election = leading().on(LeaseLost())[0]
    assert election.on(Candidates(OURS, (OURS,), 130.0)) == (election, ())


def test_renewal_moves_the_lease_time():
    """A keep-alive that answers notes when etcd last confirmed the lease."""
    election, actions = leading().on(Renewed(103.0))
    assert (election.renewed, actions) == (103.0, ())


def test_lost_lease_steps_down_and_asks_again():
    """etcd saying the lease is gone: the leader steps down and asks for a new lease."""
    election, actions = leading().on(LeaseLost())
    assert (election.state, election.lease, election.fence) == (CAMPAIGNING, None, None)
    assert actions == (StepDown("the etcd lease ran out"), Grant())


def test_lost_lease_of_a_follower():
    """A follower whose lease is gone asks for a new one, with nothing to step down."""
    assert following().on(LeaseLost())[1] == (Grant(),)


def test_lost_lease_without_a_lease():
    """A lease lost when none is held changes nothing."""
    election = Election(ttl=TTL)
    assert election.on(LeaseLost()) == (election, ())


def test_failed_renewal_within_the_ttl_keeps_leading():
    """A keep-alive nobody answered, less than a TTL after the last one: still leading."""
    election, actions = leading().on(RenewFailed(100.0 + TTL - 0.1))
    assert (election.state, actions) == (LEADING, ())


def test_failed_renewal_past_the_ttl_steps_down():
    """No keep-alive answered for a whole TTL: the lease may be gone; step down."""
    election, actions = leading().on(RenewFailed(100.0 + TTL))
    assert election.state == CAMPAIGNING
    assert [type(a) for a in actions] == [StepDown, Revoke, Grant]


def test_fenced_write_steps_down():
    """A leader-only write refused by its fence: fenced, step down, a new lease."""
    election, actions = leading().on(WriteFenced())
    assert (election.state, election.fence, election.leader) == (FENCED, None, None)
    assert [type(a) for a in actions] == [StepDown, Revoke, Grant]


def test_fenced_then_granted_campaigns():
    """A fenced replica's new lease makes it campaign again."""
    election, actions = leading().on(WriteFenced())[0].on(Granted(9, 140.0))
    assert (election.state, actions) == (CAMPAIGNING, (Campaign(9),))


def test_fenced_write_of_a_follower_is_ignored():
    """A refused write that arrives after stepping down changes nothing more."""
    election = following()
    assert election.on(WriteFenced()) == (election, ())


def test_stop_steps_down_and_revokes():
    """A stopping leader steps down and revokes its lease, so another leads at once."""
    election, actions = leading().on(Stopped())
    assert election.lease is None and not election.leading
    assert actions == (StepDown("stopping"), Revoke(5))


def test_stop_without_lease():
    """Stopping before any lease does nothing."""
    assert Election(ttl=TTL).on(Stopped())[1] == ()


def test_new_leader_waits_the_grace():
    """A new leader is settled only once it has led for the grace."""
    election = leading()
    assert not election.settled(101.0 + 29.9, 30.0)
    assert election.settled(101.0 + 30.0, 30.0)
    assert not following().settled(1000.0, 0.0)


def test_sole_leader_always_leads():
    """Alone (SQLite), the service leads at once and writes without a fence."""
    assert SOLE_LEADER.leading and SOLE_LEADER.fence is None
    assert SOLE_LEADER.settled(0.0, 30.0)


def test_compaction_keeps_the_retention():
    """The compaction revision is the newest sampled at least a retention ago."""
    samples = ((0.0, 10), (300.0, 40), (600.0, 90))
    assert compaction_target(samples, 500.0, 300.0) == 10
    assert compaction_target(samples, 900.0, 300.0) == 90
    assert compaction_target(samples, 200.0, 300.0) is None


def test_old_samples_are_dropped():
    """Samples older than the newest one a retention old are no longer kept."""
    samples = ((0.0, 10), (300.0, 40), (600.0, 90))
    assert keep_samples(samples, 650.0, 300.0) == ((300.0, 40), (600.0, 90))
    assert keep_samples(samples, 100.0, 300.0) == samples
