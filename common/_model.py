"""
The cluster's desired configuration as immutable values.

Every method returns a new value and raises a typed error (``DatasetNotFound``,
``LeaseHeld``, ...) when the change is not allowed; nothing here does IO or reads a clock.
"""

from __future__ import annotations

from typing import Iterable, Optional

from pyrsistent import CheckedPMap, PClass, field, pmap, pmap_field

#: Flocker's lower bound for ``maximum_size``: 64 MiB.
MINIMUM_SIZE = 64 * 1024 * 1024


class ConfigurationError(Exception):
    """Base class of the refusals the model raises."""


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


def _optional_int(value) -> tuple[bool, str]:
    return (value is None or (value >= MINIMUM_SIZE and value % 1024 == 0),
            "maximum_size must be null or at least 64 MiB and a multiple of 1024")


class Dataset(PClass):
    """One dataset as configured: where it should live, how big and what it is called."""

    dataset_id = field(type=str, mandatory=True)
    primary = field(type=str, mandatory=True)
    maximum_size = field(type=(int, type(None)), initial=None, invariant=_optional_int)
    metadata = pmap_field(str, str)
    deleted = field(type=bool, initial=False)

    @property
    def name(self) -> Optional[str]:
        """The dataset's ``metadata.name``, its Docker volume name, if it has one."""
        return self.metadata.get("name")


class Lease(PClass):
    """A node's claim that a dataset is in use there; ``expiration`` is absolute or None."""

    dataset_id = field(type=str, mandatory=True)
    node_uuid = field(type=str, mandatory=True)
    expiration = field(type=(float, type(None)), initial=None,
                       factory=lambda v: None if v is None else float(v))

    def expired(self, now: float) -> bool:
        """Whether the lease has run out at ``now``."""
        return self.expiration is not None and self.expiration <= now

    def remaining(self, now: float) -> Optional[float]:
        """Seconds left before expiry, or None for a lease that never expires."""
        if self.expiration is None:
            return None
        return max(0.0, self.expiration - now)


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
        expiration = None if expires is None else now + expires
        return self.set(dataset_id, Lease(dataset_id=dataset_id, node_uuid=node_uuid,
                                          expiration=expiration))

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
        """Assert the name index matches the datasets (for tests; O(n))."""
        expected = {d.name: d.dataset_id for d in self.datasets.values()
                    if not d.deleted and d.name is not None}
        assert dict(self.names) == expected, (dict(self.names), expected)
        for dataset_id in self.leases:
            assert dataset_id in self.datasets and not self.datasets[dataset_id].deleted

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
        return self._put(None, dataset.set(deleted=False))

    def update(self, now: float, dataset_id: str, primary: Optional[str] = None,
               metadata: Optional[dict] = None) -> "Configuration":
        """
        Move a dataset to ``primary`` and/or replace its metadata. A move is refused while
        a node other than the target holds a lease on it.
        """
        dataset = self.live(dataset_id)
        new = dataset
        if metadata is not None:
            new = new.set(metadata=pmap(metadata))
            self._check_name(new.name, dataset_id)
        if primary is not None and primary != dataset.primary:
            holder = self.leases.holder(now, dataset_id)
            if holder is not None and holder != primary:
                raise LeaseHeld(dataset_id, holder)
            new = new.set(primary=primary)
        if new == dataset:
            return self
        return self._put(dataset, new)

    def delete(self, now: float, dataset_id: str,
               allowed_holder: Optional[str] = None) -> "Configuration":
        """
        Mark a dataset deleted, freeing its name. Refused while a lease is held on it,
        except by ``allowed_holder`` (whose lease goes with the dataset). Deleting a deleted
        dataset changes nothing.
        """
        dataset = self.datasets.get(dataset_id)
        if dataset is None:
            raise DatasetNotFound(dataset_id)
        if dataset.deleted:
            return self
        holder = self.leases.holder(now, dataset_id)
        if holder is not None and holder != allowed_holder:
            raise LeaseHeld(dataset_id, holder)
        config = self._put(dataset, dataset.set(deleted=True))
        if dataset_id in config.leases:
            config = config.set(leases=config.leases.remove(dataset_id))
        return config

    def purge(self, dataset_id: str) -> "Configuration":
        """Forget a deleted dataset entirely (once no node holds it any more)."""
        dataset = self.datasets.get(dataset_id)
        if dataset is None or not dataset.deleted:
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
