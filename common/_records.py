"""
The values pyflock passes around for one dataset, and their one JSON codec each.

- ``Dataset``: a dataset as configured (id, primary node, size limit, metadata, deleted,
  and for a deleted one the time until which its data is kept: ``retained_until``).
  The configuration model, the REST API, its client and the agent channel all use it.
- ``Lease``: a node's claim on a dataset; ``expiration`` is an absolute time (None:
  never). The REST API speaks of ``expires``, the seconds left: its codec maps one to the
  other at a given ``now``.
- ``DatasetEntry``: a ``Dataset`` as agents see it, with its ``Lease`` and the nodes whose
  latest report lists it (``holders``). The agent channel pushes these; the agent's view
  holds them.
- ``DatasetReport``: one dataset as a node reports it (state there, mount path, size,
  and while a peer-to-peer backend sends it to another node, the move's ``Transfer``).
- ``Node``: a node as the control service tells clients and agents of it (uuid, host,
  peer port, whether it is alive, seconds since it was last heard, availability zone).

Each value has its codec here: ``*_to_json`` gives the JSON object, ``*_from_json`` checks
every field and raises ``Malformed`` saying where and what is wrong. The REST API and the
agent channel give a lease, a report and a node in different JSON objects (the API's are
Flocker's); both forms are here, next to each other. The limits checked are those of
``pyflock.common._limits``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import attr
from attr.validators import instance_of, optional
from pyrsistent import CheckedPMap, pmap

from pyflock.common._jsonread import (
    Malformed, as_object, read, read_list, read_natural, read_number, read_port, read_uuid,
    unique, uuid_value,
)
from pyflock.common._limits import (
    DATASET_STATES, MAXIMUM_BYTES, MAXIMUM_LEASE, MAXIMUM_METADATA_ENTRIES,
    MAXIMUM_METADATA_TEXT, MINIMUM_SIZE, SIZE_MULTIPLE,
)

#: What ``maximum_size`` may be, said once for every refusal.
SIZE_RULE = (f"maximum_size must be null or a multiple of {SIZE_MULTIPLE} from "
             f"{MINIMUM_SIZE} (64 MiB) to {MAXIMUM_BYTES}")


class Metadata(CheckedPMap):
    """A dataset's metadata: strings to strings (``name`` is its Docker volume name)."""

    __key_type__ = str
    __value_type__ = str


def metadata_of(value: Any) -> Metadata:
    """``value``, a mapping of strings to strings, as ``Metadata`` (``TypeError`` if not)."""
    if isinstance(value, Metadata):
        return value
    for key, text in value.items():
        if type(key) is not str or type(text) is not str:
            raise TypeError(f"metadata must map strings to strings, not {key!r}: {text!r}")
    plain = pmap(value)
    # Checked above, so built from the plain map: pyrsistent's own checking costs 7 times
    # as much, and every dataset of a view or a configuration goes through here.
    try:
        return Metadata(plain._buckets, plain._size)
    except AttributeError:
        # Another pyrsistent whose internals differ: the slower, public way.
        return Metadata.create(plain)


def valid_size(value: Any) -> bool:
    """Whether ``value`` is a ``maximum_size`` a dataset may have (None included)."""
    return value is None or (type(value) is int and MINIMUM_SIZE <= value <= MAXIMUM_BYTES
                             and value % SIZE_MULTIPLE == 0)


def _check_size(instance: Any, attribute: Any, value: Any) -> None:
    if not valid_size(value):
        raise ValueError(f"{SIZE_RULE}, not {value!r}")


_text = instance_of(str)


def _optional_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def _check_retained(instance: Any, attribute: Any, value: Optional[float]) -> None:
    if value is not None and not instance.deleted:
        raise ValueError("only a deleted dataset is retained")


@attr.s(frozen=True, auto_attribs=True)
class Dataset:
    """One dataset as configured: where it should live, how big and what it is called."""

    dataset_id: str = attr.ib(validator=_text)
    primary: str = attr.ib(validator=_text)
    maximum_size: Optional[int] = attr.ib(default=None, validator=_check_size)
    metadata: Metadata = attr.ib(default=Metadata(), converter=metadata_of)
    deleted: bool = attr.ib(default=False, validator=instance_of(bool))
    #: Deleted but restorable: its data is kept until this absolute time. None: live, or
    #: deleted with its data going now (``purging``).
    retained_until: Optional[float] = attr.ib(default=None, converter=_optional_float,
                                              validator=_check_retained)

    @property
    def name(self) -> Optional[str]:
        """The dataset's ``metadata.name``, its Docker volume name, if it has one."""
        return self.metadata.get("name")

    @property
    def purging(self) -> bool:
        """Whether the dataset is deleted and its data may go (no longer retained)."""
        return self.deleted and self.retained_until is None


@attr.s(frozen=True, auto_attribs=True)
class Lease:
    """A node's claim that a dataset is in use there; ``expiration`` is absolute or None."""

    dataset_id: str = attr.ib(validator=_text)
    node_uuid: str = attr.ib(validator=_text)
    expiration: Optional[float] = attr.ib(default=None, converter=_optional_float)

    @classmethod
    def lasting(cls, dataset_id: str, node_uuid: str, now: float,
                expires: Optional[float]) -> "Lease":
        """The lease that runs out ``expires`` seconds after ``now`` (None: never)."""
        return cls(dataset_id, node_uuid, None if expires is None else now + expires)

    def expired(self, now: float) -> bool:
        """Whether the lease has run out at ``now``."""
        return self.expiration is not None and self.expiration <= now

    def remaining(self, now: float) -> Optional[float]:
        """Seconds left at ``now`` before expiry (``expires``), or None: never expires."""
        if self.expiration is None:
            return None
        return max(0.0, self.expiration - now)


def _check_lease(instance: Any, attribute: Any, lease: Optional[Lease]) -> None:
    if lease is not None and lease.dataset_id != instance.dataset_id:
        raise ValueError(f"the lease on {lease.dataset_id} is not dataset "
                         f"{instance.dataset_id}'s")


def _sorted_tuple(items: Any) -> tuple:
    return tuple(sorted(items))


@attr.s(frozen=True, auto_attribs=True)
class DatasetEntry(Dataset):
    """
    A configured dataset as agents see it, deleted ones included, with its lease and the
    nodes whose latest state report lists it (``holders``, sorted), so that a node waiting
    for another to let go of the dataset is woken by the push that says it has.
    """

    lease: Optional[Lease] = attr.ib(default=None, validator=[
        optional(instance_of(Lease)), _check_lease])
    holders: tuple = attr.ib(default=(), converter=_sorted_tuple)

    @classmethod
    def of(cls, dataset: Dataset, lease: Optional[Lease] = None,
           holders: Any = ()) -> "DatasetEntry":
        """The entry of ``dataset`` with its lease (if any) and holders."""
        return cls(dataset.dataset_id, dataset.primary, dataset.maximum_size,
                   dataset.metadata, dataset.deleted, dataset.retained_until, lease, holders)

    def lease_holder(self, now: float) -> Optional[str]:
        """The node holding a lease on the dataset still valid at ``now``, if any."""
        if self.lease is None or self.lease.expired(now):
            return None
        return self.lease.node_uuid


@attr.s(frozen=True, auto_attribs=True)
class Transfer:
    """
    A move's progress as the node sending the dataset counts it: the bytes sent so far,
    and the estimated total (None: no estimate yet); the total grows as rounds add to it.
    """

    bytes_done: int = 0
    bytes_total: Optional[int] = None

    def sent(self, nbytes: int) -> "Transfer":
        """This progress after ``nbytes`` more were sent; the total grows to cover them."""
        done = self.bytes_done + nbytes
        return Transfer(done, None if self.bytes_total is None else max(self.bytes_total,
                                                                         done))

    def expecting(self, nbytes: Optional[int]) -> "Transfer":
        """This progress with a new round of an estimated ``nbytes`` (None: unknown)."""
        if nbytes is None:
            return self
        return Transfer(self.bytes_done, self.bytes_done + nbytes)


@attr.s(frozen=True, auto_attribs=True)
class DatasetReport:
    """
    One dataset as a node reports it: what the node is doing with it (``state``: one of
    ``DATASET_STATES``; None from a Flocker service), its mount path there once mounted,
    its size, the reporting node (None in an agent's own report: its message names it),
    and while it sends the dataset to another node (a peer-to-peer move), its ``Transfer``.
    """

    dataset_id: str = attr.ib(validator=_text)
    state: Optional[str] = attr.ib(default=None, validator=optional(_text))
    path: Optional[str] = None
    maximum_size: Optional[int] = None
    node_uuid: Optional[str] = None
    transfer: Optional[Transfer] = attr.ib(default=None,
                                           validator=optional(instance_of(Transfer)))


@attr.s(frozen=True, auto_attribs=True)
class Node:
    """
    A node as the control service tells clients and agents of it: its uuid, the host its
    peers reach it at (and their port, on the agent channel), whether it is alive (None:
    not known, from a Flocker service) and, in the REST API, the seconds since it was last
    heard (``last_seen``; a Flocker service may give text) and its availability zone
    (``zone``; None: not known, or a node outside any cloud zone).
    """

    uuid: str = attr.ib(validator=_text)
    host: str = attr.ib(validator=_text)
    peer_port: Optional[int] = None
    alive: Optional[bool] = attr.ib(default=True, validator=optional(instance_of(bool)))
    last_seen: Optional[float | str] = None
    zone: Optional[str] = attr.ib(default=None, validator=optional(_text))


# -- Dataset -------------------------------------------------------------------------------


def dataset_to_json(dataset: Dataset) -> dict:
    """The JSON object of a configured dataset (the REST API's, Flocker's; a retained
    deleted dataset's also tells ``retained_until``)."""
    obj = {"dataset_id": dataset.dataset_id, "primary": dataset.primary,
           "maximum_size": dataset.maximum_size, "metadata": dict(dataset.metadata),
           "deleted": dataset.deleted}
    if dataset.retained_until is not None:
        obj["retained_until"] = dataset.retained_until
    return obj


def _read_metadata(obj: dict, where: str) -> dict:
    metadata = read(obj, "metadata", (dict,), where, default={})
    if len(metadata) > MAXIMUM_METADATA_ENTRIES:
        raise Malformed(f"{where}.metadata has {len(metadata)} pairs; at most "
                        f"{MAXIMUM_METADATA_ENTRIES} are allowed")
    for key, value in metadata.items():
        if not (isinstance(value, str) and 0 < len(key) <= MAXIMUM_METADATA_TEXT
                and len(value) <= MAXIMUM_METADATA_TEXT):
            raise Malformed(f"{where}.metadata values must be strings, keys and values at "
                            f"most {MAXIMUM_METADATA_TEXT} characters and keys not empty: "
                            f"not {key[:40]!r}: {str(value)[:40]!r}")
    return metadata


def _dataset_fields(obj: Any, where: str) -> tuple:
    obj = as_object(obj, where)
    size = read(obj, "maximum_size", (int,), where, optional=True, default=None)
    if not valid_size(size):
        raise Malformed(f"{where}.{SIZE_RULE}, not {size}")
    deleted = read(obj, "deleted", (bool,), where, default=False)
    retained = read_number(obj, "retained_until", where, optional=True, default=None)
    if retained is not None and not deleted:
        raise Malformed(f"{where}.retained_until is for deleted datasets only")
    return (obj, read_uuid(obj, "dataset_id", where), read_uuid(obj, "primary", where),
            size, _read_metadata(obj, where), deleted, retained)


def dataset_from_json(obj: Any, where: str = "dataset") -> Dataset:
    """The dataset of its JSON object (missing optional fields take their defaults)."""
    return Dataset(*_dataset_fields(obj, where)[1:])


# -- Lease ---------------------------------------------------------------------------------


def lease_to_json(lease: Lease, now: float) -> dict:
    """The REST API's JSON object of a lease at ``now``: ``expires`` is the seconds left."""
    return {"dataset_id": lease.dataset_id, "node_uuid": lease.node_uuid,
            "expires": lease.remaining(now)}


def lease_from_json(obj: Any, now: float, where: str = "lease") -> Lease:
    """The lease of the REST API's JSON object read at ``now`` (``expires`` from then)."""
    obj = as_object(obj, where)
    expires = read_number(obj, "expires", where, optional=True, high=MAXIMUM_LEASE)
    return Lease.lasting(read_uuid(obj, "dataset_id", where),
                         read_uuid(obj, "node_uuid", where), now, expires)


# -- DatasetEntry --------------------------------------------------------------------------


def dataset_entry_to_json(entry: DatasetEntry) -> dict:
    """The agent channel's JSON object of a dataset as agents see it."""
    lease = None if entry.lease is None else {"node_uuid": entry.lease.node_uuid,
                                               "expiration": entry.lease.expiration}
    return dict(dataset_to_json(entry), lease=lease, holders=list(entry.holders))


def dataset_entry_from_json(obj: Any, where: str = "dataset") -> DatasetEntry:
    """The entry of its agent-channel JSON object (absolute lease ``expiration``)."""
    obj, dataset_id, *fields = _dataset_fields(obj, where)
    lease = read(obj, "lease", (dict,), where, optional=True, default=None)
    if lease is not None:
        lease = Lease(dataset_id, read_uuid(lease, "node_uuid", f"{where}.lease"),
                      read_number(lease, "expiration", f"{where}.lease", optional=True,
                                  low=-math.inf))
    # Views stored by an earlier pyflock have no holders: unknown until the next push.
    holders = tuple(uuid_value(h, f"{where}.holders[{i}]")
                    for i, h in enumerate(read_list(obj, "holders", where, default=[])))
    return DatasetEntry(dataset_id, *fields, lease=lease,
                        holders=unique(holders, lambda h: h, f"{where}.holders"))


# -- DatasetReport -------------------------------------------------------------------------


def transfer_to_json(transfer: Transfer) -> dict:
    """The JSON object of a move's progress (agent channel and REST API alike)."""
    return {"bytes_done": transfer.bytes_done, "bytes_total": transfer.bytes_total}


def _read_transfer(obj: dict, where: str) -> Optional[Transfer]:
    """The optional ``transfer`` object of a report, checked."""
    value = read(obj, "transfer", (dict,), where, optional=True, default=None)
    if value is None:
        return None
    where = f"{where}.transfer"
    return Transfer(read_natural(value, "bytes_done", where),
                    read_natural(value, "bytes_total", where, optional=True, default=None))


def report_to_json(report: DatasetReport) -> dict:
    """The agent channel's JSON object of one dataset in a node's state report (with
    ``transfer`` only while a move sends it: older control services never see it)."""
    result = {"dataset_id": report.dataset_id, "state": report.state, "path": report.path,
              "maximum_size": report.maximum_size}
    if report.transfer is not None:
        result["transfer"] = transfer_to_json(report.transfer)
    return result


def report_from_json(obj: Any, where: str = "report") -> DatasetReport:
    """One dataset of an agent's state report, its ``state`` one of ``DATASET_STATES``
    (the message names the node)."""
    obj = as_object(obj, where)
    state = read(obj, "state", (str,), where)
    if state not in DATASET_STATES:
        raise Malformed(f"{where}.state must be one of {', '.join(sorted(DATASET_STATES))}"
                        f", not {state!r}")
    return DatasetReport(read_uuid(obj, "dataset_id", where), state,
                         read(obj, "path", (str,), where, optional=True),
                         read_natural(obj, "maximum_size", where, optional=True),
                         transfer=_read_transfer(obj, where))


def report_to_api_json(report: DatasetReport) -> dict:
    """The REST API's JSON object of a reported dataset: ``primary`` is the reporting node,
    and the path is given only while the dataset is mounted there."""
    result = {"dataset_id": report.dataset_id, "primary": report.node_uuid,
              "maximum_size": report.maximum_size}
    if report.state is not None:
        result["state"] = report.state
    if report.path is not None and report.state in ("mounted", None):
        result["path"] = report.path
    if report.transfer is not None:
        result["transfer"] = transfer_to_json(report.transfer)
    return result


def report_from_api_json(obj: Any, where: str = "dataset state") -> DatasetReport:
    """A reported dataset of the REST API's JSON object; any ``state`` text is taken, so
    that a newer service's states still read."""
    obj = as_object(obj, where)
    primary = read(obj, "primary", (str,), where, optional=True, default=None)
    return DatasetReport(
        read_uuid(obj, "dataset_id", where),
        read(obj, "state", (str,), where, optional=True, default=None),
        read(obj, "path", (str,), where, optional=True, default=None),
        read_natural(obj, "maximum_size", where, optional=True, default=None),
        None if primary is None else uuid_value(primary, f"{where}.primary"),
        _read_transfer(obj, where))


# -- Node ----------------------------------------------------------------------------------


def node_to_json(node: Node) -> dict:
    """The agent channel's JSON object of a node (where its peers reach it)."""
    return {"uuid": node.uuid, "host": node.host, "peer_port": node.peer_port,
            "alive": node.alive}


def node_from_json(obj: Any, where: str = "node") -> Node:
    """The node of its agent-channel JSON object."""
    obj = as_object(obj, where)
    return Node(read_uuid(obj, "uuid", where), read(obj, "host", (str,), where),
                read_port(obj, "peer_port", where),
                read(obj, "alive", (bool,), where))


def node_to_api_json(node: Node) -> dict:
    """The REST API's JSON object of a node (Flocker's, with ``alive``, ``last_seen`` and
    ``zone``)."""
    return {"uuid": node.uuid, "host": node.host, "alive": node.alive,
            "last_seen": node.last_seen, "zone": node.zone}


def node_from_api_json(obj: Any, where: str = "node") -> Node:
    """The node of the REST API's JSON object (``alive``, ``last_seen`` and ``zone`` may be
    absent)."""
    obj = as_object(obj, where)
    return Node(read(obj, "uuid", (str,), where), read(obj, "host", (str,), where),
                alive=read(obj, "alive", (bool,), where, True, None),
                last_seen=read(obj, "last_seen", (int, float, str), where, True, None),
                zone=read(obj, "zone", (str,), where, True, None))


__all__ = [
    "Dataset", "DatasetEntry", "DatasetReport", "Lease", "Malformed", "Metadata", "Node",
    "SIZE_RULE", "metadata_of", "dataset_entry_from_json", "dataset_entry_to_json",
    "dataset_from_json", "dataset_to_json", "lease_from_json", "lease_to_json",
    "node_from_api_json", "node_from_json", "node_to_api_json", "node_to_json",
    "report_from_api_json", "report_from_json", "report_to_api_json", "report_to_json",
    "Transfer", "transfer_to_json",
    "valid_size",
]
