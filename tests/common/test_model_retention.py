"""The configuration model's recycle bin: deleted datasets kept, restored, purged."""

import pytest

from pyflock.common._model import (
    Configuration, Dataset, DatasetGone, DatasetNotDeleted, DatasetNotFound, NameTaken,
)
from pyflock.common._records import dataset_from_json, dataset_to_json, Malformed

A = "aaaaaaaa-0000-4000-8000-000000000001"
IDS = [f"11111111-2222-4333-8444-{i:012d}" for i in range(3)]


def _config() -> Configuration:
    """A configuration with dataset 0 called ``db``, deleted at 10 and kept until 70."""
    c = Configuration().create(Dataset(dataset_id=IDS[0], primary=A, metadata={"name": "db"}))
    return c.delete(10, IDS[0], retain_until=70)


def test_delete_keeps_data_and_frees_name():
    """A retained delete frees the name at once and keeps the time its data goes."""
    c = _config()
    dataset = c.datasets[IDS[0]]
    assert dataset.deleted and dataset.retained_until == 70 and not dataset.purging
    assert c.by_name("db") is None
    c.check()


def test_restore_brings_back_name():
    """Restoring a kept dataset makes it live again under its old name."""
    c = _config().restore(IDS[0])
    assert c.by_name("db").dataset_id == IDS[0]
    assert not c.datasets[IDS[0]].deleted and c.datasets[IDS[0]].retained_until is None
    c.check()


def test_restore_after_name_taken_needs_new_name():
    """Once another dataset took the name, a restore needs a new one."""
    c = _config().create(Dataset(dataset_id=IDS[1], primary=A, metadata={"name": "db"}))
    with pytest.raises(NameTaken):
        c.restore(IDS[0])
    c = c.restore(IDS[0], "db-old")
    assert c.by_name("db-old").dataset_id == IDS[0] and c.by_name("db").dataset_id == IDS[1]
    c.check()


def test_purge_now_and_retention_over():
    """A purge, or the end of the retention, lets the data go: then no restore."""
    purged = _config().delete(20, IDS[0])
    assert purged.datasets[IDS[0]].purging
    with pytest.raises(DatasetGone):
        purged.restore(IDS[0])
    c = _config()
    assert c.release_retained([IDS[0]], 69) is c
    over = c.release_retained([IDS[0]], 70)
    assert over.datasets[IDS[0]].purging
    with pytest.raises(DatasetGone):
        over.restore(IDS[0])


def test_retained_is_never_forgotten():
    """``purge`` forgets a dataset only once its data goes."""
    c = _config()
    assert c.purge(IDS[0]) is c
    assert IDS[0] not in c.delete(20, IDS[0]).purge(IDS[0]).datasets


def test_restore_refusals():
    """Restoring an unknown dataset, or renaming a live one by restoring, is refused."""
    c = _config()
    with pytest.raises(DatasetNotFound):
        c.restore(IDS[2])
    live = c.restore(IDS[0])
    assert live.restore(IDS[0]) is live
    with pytest.raises(DatasetNotDeleted):
        live.restore(IDS[0], "other")


def test_retained_until_json():
    """``retained_until`` goes through the JSON codec, only for deleted datasets."""
    dataset = _config().datasets[IDS[0]]
    assert dataset_from_json(dataset_to_json(dataset)) == dataset
    assert "retained_until" not in dataset_to_json(Dataset(dataset_id=IDS[1], primary=A))
    with pytest.raises(Malformed):
        dataset_from_json({"dataset_id": IDS[1], "primary": A, "retained_until": 5})
    with pytest.raises(ValueError):
        Dataset(dataset_id=IDS[1], primary=A, retained_until=5)
