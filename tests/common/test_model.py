"""The configuration model: typed refusals and the name index invariant."""

import pytest
from hypothesis import given, settings, strategies as st

from pyflock.common._model import (
    Configuration, Dataset, DatasetDeleted, DatasetIdTaken, DatasetNotDeleted, DatasetNotFound,
    InconsistentConfiguration, LeaseHeld, LeaseNotFound, NameTaken,
)
from pyflock.common._records import Lease

A = "aaaaaaaa-0000-4000-8000-000000000001"
B = "bbbbbbbb-0000-4000-8000-000000000002"
IDS = [f"11111111-2222-4333-8444-{i:012d}" for i in range(4)]


def named(i, name=None, primary=A):
    return Dataset(dataset_id=IDS[i], primary=primary,
                   metadata={} if name is None else {"name": name})


def test_refusals():
    """Each forbidden change raises its typed error and leaves the value unchanged."""
    c = Configuration().create(named(0, "db"))
    with pytest.raises(DatasetIdTaken):
        c.create(named(0))
    with pytest.raises(NameTaken):
        c.create(named(1, "db"))
    with pytest.raises(DatasetNotFound):
        c.update(0, IDS[3], primary=B)
    c = c.acquire_lease(0, IDS[0], A, 10)
    with pytest.raises(LeaseHeld):
        c.acquire_lease(5, IDS[0], B, 10)
    with pytest.raises(LeaseHeld):
        c.update(5, IDS[0], primary=B)
    with pytest.raises(LeaseHeld):
        c.delete(5, IDS[0])
    with pytest.raises(LeaseNotFound):
        c.release_lease(IDS[0], B)
    deleted = c.delete(5, IDS[0], allowed_holder=A)
    with pytest.raises(DatasetDeleted):
        deleted.update(5, IDS[0], primary=B)
    assert deleted.leases == {} and deleted.names == {}


def test_expired_lease_does_not_block():
    """An expired lease no longer blocks another node or a move."""
    c = Configuration().create(named(0)).acquire_lease(0, IDS[0], A, 10)
    assert c.acquire_lease(10, IDS[0], B, 10).leases[IDS[0]].node_uuid == B
    assert c.update(11, IDS[0], primary=B).datasets[IDS[0]].primary == B


def test_generation_not_changed_by_leases():
    """Lease changes keep the generation; dataset changes bump it."""
    c = Configuration().create(named(0))
    assert c.acquire_lease(0, IDS[0], A, 5).release_lease(IDS[0]).generation == c.generation
    assert c.update(0, IDS[0], primary=B).generation == c.generation + 1


operations = st.lists(st.tuples(
    st.sampled_from(["create", "rename", "move", "delete", "lease", "release", "purge",
                     "bin", "restore", "retention-over"]),
    st.integers(0, 3), st.sampled_from([None, "a", "b"]), st.sampled_from([A, B])),
    max_size=30)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_name_index_invariant(ops):
    """Whatever sequence of changes is accepted, the name index matches the datasets,
    and leases exist only on live datasets."""
    c = Configuration()
    for op, i, name, node in ops:
        try:
            if op == "create":
                c = c.create(named(i, name, node))
            elif op == "rename":
                c = c.update(0, IDS[i], metadata={} if name is None else {"name": name})
            elif op == "move":
                c = c.update(0, IDS[i], primary=node)
            elif op == "delete":
                c = c.delete(0, IDS[i], allowed_holder=node)
            elif op == "lease":
                c = c.acquire_lease(0, IDS[i], node, None)
            elif op == "release":
                c = c.release_lease(IDS[i], node)
            elif op == "bin":
                c = c.delete(0, IDS[i], allowed_holder=node, retain_until=10)
            elif op == "restore":
                c = c.restore(IDS[i], name)
            elif op == "retention-over":
                c = c.release_retained(IDS, 10)
            else:
                c = c.purge(IDS[i])
        except (DatasetIdTaken, NameTaken, DatasetNotFound, DatasetDeleted, LeaseHeld,
                LeaseNotFound, DatasetNotDeleted):
            pass
        c.check()


def test_check_finds_broken_invariants():
    """``check`` raises ``InconsistentConfiguration`` (not an assert, gone under -O) for a
    name index that disagrees with the datasets and for a lease on no live dataset."""
    c = Configuration().create(named(0, "db"))
    with pytest.raises(InconsistentConfiguration, match="name index"):
        c.set(names=c.names.set("other", IDS[1])).check()
    with pytest.raises(InconsistentConfiguration, match="not a live dataset"):
        Configuration.from_records([], [Lease(IDS[2], A, None)], 0).check()
