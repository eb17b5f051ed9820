"""
The cluster's desired configuration as immutable values: ``Configuration`` holds the
``Dataset`` and ``Lease`` values of ``pyflock.common._records`` (re-exported here).

Every method returns a new value and raises a typed error (``DatasetNotFound``,
``LeaseHeld``, ...) when the change is not allowed; nothing here does IO or reads a clock.
"""

from __future__ import annotations

from typing import Iterable, Optional

import attr
from pyrsistent import CheckedPMap, PClass, field, pmap, pmap_field

from pyflock.common._limits import MINIMUM_SIZE
from pyflock.common._records import Dataset, Lease


class ConfigurationError(Exception):
    """Base class of the refusals the model raises."""


class InconsistentConfiguration(Exception):
    """A configuration breaks its own invariants: a bug, never a user's mistake."""


class DatasetNotFound(ConfigurationError):
    """No dataset (live or deleted) has this id."""

    def __init__(self, dataset_id: str):
        super().__init__(dataset_id)
        self.dataset_id = dataset_id


class DatasetDeleted(ConfigurationError):
    """The dataset has been deleted and can no longer be changed."""

    def __init__(self, dataset_id: str):
        super().__init__(dataset_id)
        self.dataset_id = dataset_id


class DatasetGone(DatasetDeleted):
    """The deleted dataset's data is no longer kept (retention over, or purged): it
    cannot be restored."""


class DatasetNotDeleted(ConfigurationError):
    """The dataset is live: there is nothing to restore (nor to rename by restoring)."""

    @property
    def dataset_id(self) -> str:
        """The live dataset's id."""
        return self.args[0]


class DatasetIdTaken(ConfigurationError):
    """A dataset with this id already exists (deleted datasets included)."""

    def __init__(self, dataset_id: str):
        super().__init__(dataset_id)
        self.dataset_id = dataset_id


class NameTaken(ConfigurationError):
    """Another live dataset already has this ``metadata.name``."""

    def __init__(self, name: str, dataset_id: str):
        super().__init__(name, dataset_id)
        self.name = name
        self.dataset_id = dataset_id


class LeaseHeld(ConfigurationError):
    """Another node holds a lease on the dataset."""

    def __init__(self, dataset_id: str, node_uuid: str):
        super().__init__(dataset_id, node_uuid)
        self.dataset_id = dataset_id
        self.node_uuid = node_uuid


class LeaseNotFound(ConfigurationError):
    """No lease is held on the dataset (or not by the node named)."""

    def __init__(self, dataset_id: str):
        super().__init__(dataset_id)
        self.dataset_id = dataset_id


class Leases(CheckedPMap):
    """Leases by dataset id."""

    __key_type__ = str
    __value_type__ = Lease

    def acquire(self, now: float, dataset_id: str, node_uuid: str,
                expires: Optional[float]) -> "Leases":
        """Take or renew ``node_uuid``'s lease for ``expires`` seconds (None: forever)."""
        current = self.get(dataset_id)
        if current is not None and current.node_uuid != node_uuid and not current.expired(now):
            raise LeaseHeld(dataset_id, current.node_uuid)
        return self.set(dataset_id, Lease.lasting(dataset_id, node_uuid, now, expires))

    def release(self, dataset_id: str, node_uuid: Optional[str] = None) -> "Leases":
        """Drop the lease on ``dataset_id`` (only if ``node_uuid`` holds it, when given)."""
        current = self.get(dataset_id)
        if current is None or (node_uuid is not None and current.node_uuid != node_uuid):
            raise LeaseNotFound(dataset_id)
        return self.remove(dataset_id)

    def expire(self, now: float) -> "Leases":
        """The leases still valid at ``now``."""
        expired = [k for k, lease in self.items() if lease.expired(now)]
        if not expired:
            return self
        evolver = self.evolver()
        for k in expired:
            del evolver[k]
        return evolver.persistent()

    def holder(self, now: float, dataset_id: str) -> Optional[str]:
        """The node holding a live lease on ``dataset_id``, if any."""
        lease = self.get(dataset_id)
        if lease is None or lease.expired(now):
            return None
        return lease.node_uuid


class Configuration(PClass):
    """
    The desired configuration: datasets (deleted ones stay as tombstones), leases, the
    index of live names and the generation, which changes whenever a dataset does.
    """

    datasets = pmap_field(str, Dataset)
    leases = field(type=Leases, initial=Leases())
    names = pmap_field(str, str)
    generation = field(type=int, initial=0)

    @classmethod
    def from_records(cls, datasets: Iterable[Dataset], leases: Iterable[Lease],
                     generation: int) -> "Configuration":
        """Rebuild a configuration (and its name index) from stored records."""
        datasets = {d.dataset_id: d for d in datasets}
        names = {d.name: d.dataset_id for d in datasets.values()
                 if not d.deleted and d.name is not None}
        return cls(datasets=pmap(datasets), names=pmap(names),
                   leases=Leases({lease.dataset_id: lease for lease in leases}),
                   generation=generation)

    def check(self) -> None:
        """
        Check the invariants: the name index matches the datasets and every lease is on a
        live dataset; ``InconsistentConfiguration`` otherwise (O(n): tests and tools).
        """
        expected = {d.name: d.dataset_id for d in self.datasets.values()
                    if not d.deleted and d.name is not None}
        if dict(self.names) != expected:
            raise InconsistentConfiguration(
                f"the name index {dict(self.names)} does not match the datasets' names "
                f"{expected}")
        for dataset_id in self.leases:
            if dataset_id not in self.datasets or self.datasets[dataset_id].deleted:
                raise InconsistentConfiguration(
                    f"dataset {dataset_id} is leased but is not a live dataset")

    def live(self, dataset_id: str) -> Dataset:
        """The live dataset with this id, or raise ``DatasetNotFound``/``DatasetDeleted``."""
        dataset = self.datasets.get(dataset_id)
        if dataset is None:
            raise DatasetNotFound(dataset_id)
        if dataset.deleted:
            raise DatasetDeleted(dataset_id)
        return dataset

    def by_name(self, name: str) -> Optional[Dataset]:
        """The live dataset called ``name``, if any."""
        dataset_id = self.names.get(name)
        return None if dataset_id is None else self.datasets[dataset_id]

    def _check_name(self, name: Optional[str], dataset_id: str) -> None:
        if name is None:
            return
        owner = self.names.get(name)
        if owner is not None and owner != dataset_id:
            raise NameTaken(name, owner)

    def _put(self, old: Optional[Dataset], new: Dataset) -> "Configuration":
        names = self.names
        if old is not None and old.name is not None and not old.deleted:
            names = names.remove(old.name)
        if new.name is not None and not new.deleted:
            names = names.set(new.name, new.dataset_id)
        return self.set(datasets=self.datasets.set(new.dataset_id, new), names=names,
                        generation=self.generation + 1)

    def create(self, dataset: Dataset) -> "Configuration":
        """Add a new dataset; its id must be unused and its name free."""
        if dataset.dataset_id in self.datasets:
            raise DatasetIdTaken(dataset.dataset_id)
        self._check_name(dataset.name, dataset.dataset_id)
        return self._put(None, attr.evolve(dataset, deleted=False, retained_until=None))

    def update(self, now: float, dataset_id: str, primary: Optional[str] = None,
               metadata: Optional[dict] = None) -> "Configuration":
        """
        Move a dataset to ``primary`` and/or replace its metadata. A move is refused while
        a node other than the target holds a lease on it.
        """
        dataset = self.live(dataset_id)
        new = dataset
        if metadata is not None:
            new = attr.evolve(new, metadata=metadata)
            self._check_name(new.name, dataset_id)
        if primary is not None and primary != dataset.primary:
            holder = self.leases.holder(now, dataset_id)
            if holder is not None and holder != primary:
                raise LeaseHeld(dataset_id, holder)
            new = attr.evolve(new, primary=primary)
        if new == dataset:
            return self
        return self._put(dataset, new)

    def delete(self, now: float, dataset_id: str, allowed_holder: Optional[str] = None,
               retain_until: Optional[float] = None) -> "Configuration":
        """
        Mark a dataset deleted, freeing its name, its data kept until ``retain_until``
        (None: its data goes now). Refused while a lease is held on it, except by
        ``allowed_holder`` (whose lease goes with the dataset). Deleting a deleted dataset
        changes nothing, except that deleting a retained one with ``retain_until`` None
        lets its data go now (purge).
        """
        dataset = self.datasets.get(dataset_id)
        if dataset is None:
            raise DatasetNotFound(dataset_id)
        if dataset.deleted:
            if dataset.retained_until is None or retain_until is not None:
                return self
            return self._put(dataset, attr.evolve(dataset, retained_until=None))
        holder = self.leases.holder(now, dataset_id)
        if holder is not None and holder != allowed_holder:
            raise LeaseHeld(dataset_id, holder)
        config = self._put(dataset, attr.evolve(dataset, deleted=True,
                                                retained_until=retain_until))
        if dataset_id in config.leases:
            config = config.set(leases=config.leases.remove(dataset_id))
        return config

    def restore(self, dataset_id: str, name: Optional[str] = None) -> "Configuration":
        """
        Bring back a deleted dataset whose data is still kept, under its old name or
        ``name``: ``DatasetGone`` once its data goes, ``NameTaken`` if the name is another
        live dataset's. Restoring a live dataset changes nothing (``DatasetNotDeleted``
        if it is given another name).
        """
        dataset = self.datasets.get(dataset_id)
        if dataset is None:
            raise DatasetNotFound(dataset_id)
        if dataset.purging:
            raise DatasetGone(dataset_id)
        if not dataset.deleted and name not in (None, dataset.name):
            raise DatasetNotDeleted(dataset_id)
        new = dataset
        if name is not None:
            new = attr.evolve(new, metadata=new.metadata.set("name", name))
        self._check_name(new.name, dataset_id)
        new = attr.evolve(new, deleted=False, retained_until=None)
        return self if new == dataset else self._put(dataset, new)

    def release_retained(self, dataset_ids: Iterable[str], now: float) -> "Configuration":
        """Let the data go of those of ``dataset_ids`` whose retention is over at ``now``."""
        config = self
        for dataset_id in dataset_ids:
            dataset = config.datasets.get(dataset_id)
            if (dataset is not None and dataset.retained_until is not None
                    and dataset.retained_until <= now):
                config = config._put(dataset, attr.evolve(dataset, retained_until=None))
        return config

    def purge(self, dataset_id: str) -> "Configuration":
        """Forget a deleted dataset whose data goes entirely (once no node holds it any
        more); a retained one stays."""
        dataset = self.datasets.get(dataset_id)
        if dataset is None or not dataset.purging:
            return self
        return self.set(datasets=self.datasets.remove(dataset_id))

    def acquire_lease(self, now: float, dataset_id: str, node_uuid: str,
                      expires: Optional[float]) -> "Configuration":
        """Take or renew a lease on a live dataset; the generation does not change."""
        self.live(dataset_id)
        return self.set(leases=self.leases.acquire(now, dataset_id, node_uuid, expires))

    def release_lease(self, dataset_id: str,
                      node_uuid: Optional[str] = None) -> "Configuration":
        """Drop a lease (only ``node_uuid``'s, when given)."""
        return self.set(leases=self.leases.release(dataset_id, node_uuid))

    def expire_leases(self, now: float) -> "Configuration":
        """Drop the leases that have run out at ``now``."""
        leases = self.leases.expire(now)
        return self if leases is self.leases else self.set(leases=leases)


__all__ = [
    "MINIMUM_SIZE", "Configuration", "ConfigurationError", "Dataset", "DatasetDeleted",
    "DatasetGone", "DatasetNotDeleted",
    "DatasetIdTaken", "DatasetNotFound", "Lease", "LeaseHeld", "LeaseNotFound", "Leases",
    "NameTaken",
]
