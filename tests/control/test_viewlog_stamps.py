"""
``Stamps`` (issue 9 point 5), pure: which entries of a replica's view changed after a
store revision, how this replica's own changes count until published, and when it
cannot tell; and ``AgentView.apply`` of a diff based on another replica's view.
"""

from pyflock.agent._view import AgentView, ViewOutOfStep
from pyflock.common._wire import Diff, Snapshot, ViewVersion
from pyflock.control._viewlog import Stamps

import pytest


def stamped(stamps: Stamps, revision, datasets=(), removed=(), nodes=()) -> None:
    """Record a change with origin ``revision`` (None: this replica's own)."""
    stamps.origin = revision
    stamps.record(datasets, removed, nodes)
    stamps.origin = None


def test_changes_after_a_revision():
    """Entries stamped after the revision asked about are told; older ones are not."""
    stamps = Stamps(since=10)
    stamped(stamps, 12, datasets=["d1"], nodes=["n1"])
    stamped(stamps, 15, datasets=["d2"], removed=["d3"])
    assert stamps.changed_since(12) == (["d2"], ["d3"], [])
    assert stamps.changed_since(10) == (["d1", "d2"], ["d3"], ["n1"])
    assert stamps.changed_since(15) == ([], [], [])


def test_older_than_since_cannot_be_told():
    """Before the view the replica started from, it cannot tell: None."""
    assert Stamps(since=10).changed_since(9) is None


def test_own_changes_are_newer_than_anything_until_published():
    """A change of this replica's own goes with every resume until published."""
    stamps = Stamps(since=0)
    stamped(stamps, None, datasets=["d1"], nodes=["n1"])
    assert stamps.changed_since(1000) == (["d1"], [], ["n1"])
    stamps.published(20)
    assert stamps.changed_since(20) == ([], [], [])
    assert stamps.changed_since(19) == (["d1"], [], ["n1"])


def test_forgotten_removals_raise_since():
    """Past ``removals_kept``, the oldest removal is forgotten and ``since`` rises."""
    stamps = Stamps(since=0, removals_kept=1)
    stamped(stamps, 5, removed=["d1"])
    stamped(stamps, 7, removed=["d2"])
    assert stamps.since == 5 and stamps.changed_since(4) is None
    assert stamps.changed_since(5) == ([], ["d2"], [])


def test_agent_view_takes_a_diff_based_on_it():
    """A diff whose base is the view changes it and moves it to the diff's epoch."""
    view = AgentView.from_snapshot(Snapshot(epoch="one", version=7))
    moved = view.apply(Diff(epoch="two", version=3, base=ViewVersion("one", 7)))
    assert moved.current == ViewVersion("two", 3)
    with pytest.raises(ViewOutOfStep):
        view.apply(Diff(epoch="two", version=3, base=ViewVersion("one", 6)))
