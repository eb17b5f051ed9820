"""
The Docker plugin's vocabulary, without IO: its limits and timings, the errors that reach
the Docker user as ``Err``, the agent's view as the plugin reads it (``ClusterView`` of
``DatasetEntry``), a dataset's state on this node, Create's options, and the refusals'
wording. ``pyflock.agent._plugin_core`` decides with these; the shell acts.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Mapping, Optional

import attr
from pyrsistent import PMap, pmap

from pyflock.common._client import ControlUnreachable
from pyflock.common._limits import MINIMUM_SIZE
from pyflock.common._records import Dataset, DatasetEntry, Lease, Node, Transfer
from pyflock.common._sizes import parse_size

#: Docker's rule for local volume names, which pyflock applies to the volumes it creates.
VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+\Z", re.ASCII)

#: The storage profiles ``-o profile=`` accepts; kept in the dataset's metadata.
PROFILES = ("gold", "silver", "bronze")

#: Seconds a Mount may take before it gives up; dockerd itself gives up at 120 s.
MOUNT_TIMEOUT = 100.0

#: A Mount waiting for a move here looks at the move's progress this often (seconds) and,
#: once it has seen it progress for MOVE_WATCH_MIN seconds, gives up at once if the rate
#: seen projects the move's end more than MOVE_MARGIN (a share of the time left) past
#: the Mount's deadline: the user learns in seconds, not at the deadline, to retry later.
MOVE_RECHECK = 1.0
MOVE_WATCH_MIN = 5.0
MOVE_MARGIN = 0.2

#: Seconds the plugin's leases last, and how often they are renewed while in use.
LEASE_DURATION = 60.0
RENEW_INTERVAL = 20.0

#: How long the lease outlives the last Unmount here: a ``docker run`` of an image with
#: content at the mount point unmounts after the copy-up and mounts again at once.
RELEASE_GRACE = 0.5

#: A Mount refused by another node's lease asks again whenever the view changes, until
#: RELEASE_GRACE + LEASE_RETRY_MARGIN have passed (that node may have just let go).
LEASE_RETRY_MARGIN = 0.5

#: Seconds Create, Remove and Unmount wait for the control service (dockerd: 60 s or more).
REQUEST_TIMEOUT = 50.0

#: Seconds the plugin trusts its own creates and removes over a view that has not caught up.
OVERLAY_TTL = 120.0

#: Seconds the plugin waits, after an Activate, for the new dockerd's API to answer so
#: that it can settle the mount counts (dockerd restores its containers first).
SETTLE_TIMEOUT = 300.0

#: Longest pause between two attempts to reach dockerd's API after an Activate.
SETTLE_RETRY = 2.0

#: The mount state the convergence loop reports once a dataset is mounted on this node.
MOUNTED = "mounted"


class PluginError(Exception):
    """A refusal or failure that reaches the Docker user as ``Err``: one actionable line."""

    @property
    def err(self) -> str:
        """The ``Err`` text dockerd shows (after ``Error response from daemon:``)."""
        return f"pyflock: {self}"


class NoSuchVolume(PluginError):
    """No volume has this name (dockerd then treats the volume as absent)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no such volume {self.name}"

    @property
    def err(self) -> str:
        """The plain ``no such volume NAME`` of Docker's own drivers."""
        return str(self)


class PluginSocketError(Exception):
    """The plugin's socket cannot be served; the message says why and what to do."""


class BadRequest(PluginError):
    """The request itself was malformed (never from a well-behaved dockerd)."""


# -- the agent's view, as the plugin reads it --------------------------------------------


def _as_pmap(value: Any) -> PMap:
    # The agent's view already holds a persistent map of its entries: taken as it is.
    return value if isinstance(value, PMap) else pmap(value)


@attr.s(frozen=True, auto_attribs=True)
class ClusterView:
    """
    What the plugin needs of the agent's view of the cluster: every ``DatasetEntry`` by id
    (deleted ones may be included; a lease counts while ``entry.lease_holder(now)`` says
    so) and each node's host by uuid. A value; build a new one per change.
    """

    datasets: PMap = attr.ib(default=pmap(), converter=_as_pmap)
    nodes: PMap = attr.ib(default=pmap(), converter=_as_pmap)

    @property
    def names(self) -> PMap:
        """Live datasets by name (computed once per view)."""
        cached = self.__dict__.get("_names")
        if cached is None:
            cached = pmap({d.name: d for d in self.datasets.values()
                           if not d.deleted and d.name is not None})
            object.__setattr__(self, "_names", cached)
        return cached

    def by_name(self, name: str) -> Optional[DatasetEntry]:
        """The live dataset called ``name``, if any."""
        return self.names.get(name)

    @classmethod
    def from_records(cls, datasets: Iterable[Dataset], leases: Iterable[Lease] = (),
                     nodes: Iterable[Node] = ()) -> "ClusterView":
        """The view of REST API records (datasets, leases, nodes)."""
        leases_by_id = {lease.dataset_id: lease for lease in leases}
        return cls(datasets={d.dataset_id: DatasetEntry.of(d, leases_by_id.get(d.dataset_id))
                             for d in datasets},
                   nodes={n.uuid: n.host for n in nodes})

    @classmethod
    def from_agent_view(cls, view: Any) -> "ClusterView":
        """The view of the agent's ``AgentView`` (``pyflock.agent._view``)."""
        return cls(datasets=view.datasets,
                   nodes={n.uuid: n.host for n in view.nodes.values()})

    @classmethod
    def from_configuration(cls, config: Any,
                           nodes: Mapping[str, str] = pmap()) -> "ClusterView":
        """The view of a ``pyflock.common.Configuration``."""
        return cls(datasets={d.dataset_id: DatasetEntry.of(d, config.leases.get(d.dataset_id))
                             for d in config.datasets.values()},
                   nodes=nodes)


@attr.s(frozen=True, auto_attribs=True)
class LocalState:
    """Where a dataset stands on this node (``creating``, ``mounted``, ...) and its path."""

    state: str
    path: Optional[str] = None


# -- options ------------------------------------------------------------------------------

_ACCEPTED = ("pyflock accepts size (e.g. -o size=10G, at least 64M) and profile "
             "(-o profile=gold, silver or bronze)")


def check_volume_name(name: str) -> None:
    """Raise ``PluginError`` unless ``name`` is a valid Docker volume name."""
    if not VOLUME_NAME.match(name):
        raise PluginError(
            f"invalid volume name {name!r}: use at least 2 characters, a letter or digit "
            f"first, then letters, digits, '_', '.' or '-'")


def parse_create_options(name: str, opts: Any) -> tuple[Optional[int], Optional[str]]:
    """
    ``(maximum_size, profile)`` from Create's ``Opts`` (null or an object of strings);
    ``PluginError`` saying what is accepted for anything else. Sizes are binary, at least
    64 MiB, rounded up to whole KiB.
    """
    if opts is None:
        return None, None
    if not isinstance(opts, dict):
        raise BadRequest(f'"Opts" must be an object of strings or null, not '
                         f'{json.dumps(opts)[:60]}')
    size = profile = None
    for key, value in opts.items():
        option = key.lower()
        if option not in ("size", "profile"):
            raise PluginError(f"unknown option {key!r} for volume {name}: {_ACCEPTED}")
        if not isinstance(value, str):
            raise BadRequest(f"option {key!r} for volume {name} must be a string, not "
                              f"{json.dumps(value)[:60]}")
        if option == "size":
            try:
                size = parse_size(value)
            except ValueError:
                raise PluginError(f"invalid size {value!r} for volume {name}: use a binary "
                                  f"size such as 500M, 10G or 1TiB (at least 64M)") from None
            if size < MINIMUM_SIZE:
                raise PluginError(f"size {value} for volume {name} is too small: the "
                                  f"minimum is 64M")
            size = -(-size // 1024) * 1024
        else:
            profile = value.lower()
            if profile not in PROFILES:
                raise PluginError(f"invalid profile {value!r} for volume {name}: use gold, "
                                  f"silver or bronze")
    return size, profile


# -- the refusals' wording ----------------------------------------------------------------


def node_label(view: ClusterView, node_uuid: Optional[str]) -> str:
    """How a refusal names a node: its uuid and host, or "another node" if unknown."""
    if node_uuid is None:
        return "another node"
    host = view.nodes.get(node_uuid)
    return f"node {node_uuid} (host {host})" if host else f"node {node_uuid}"


def in_use_elsewhere(view: ClusterView, name: str, holder: Optional[str],
                     lease_duration: float) -> PluginError:
    """The refusal of a Mount whose volume another node leases or holds."""
    return PluginError(
        f"volume {name} is in use on {node_label(view, holder)}: stop the containers "
        f"using it there first; if that node is down, its lease expires within "
        f"{lease_duration:g} s and the volume can then be used here")


def deleted_while_mounting(name: str) -> PluginError:
    """The refusal of a Mount whose dataset was deleted under it."""
    return PluginError(f"volume {name} was deleted from the cluster while it was being "
                       f"mounted; retry to create it afresh")


def unreachable(action: str, name: str, error: ControlUnreachable) -> PluginError:
    """The refusal of ``action`` when the control service cannot be reached."""
    return PluginError(f"cannot {action} volume {name}: {error.description}; retry once the "
                       f"control service is reachable from this node")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2 ** 20:.1f} MiB"


# -- a move's progress, as a Mount waiting for it sees it ----------------------------------


@attr.s(frozen=True, auto_attribs=True)
class MoveWatch:
    """Where a Mount began watching a move progress: the time and the bytes done then."""

    since: float
    bytes_done: int


@attr.s(frozen=True, auto_attribs=True)
class MoveEstimate:
    """A move's rate as a Mount saw it (bytes per second) and the seconds it projects."""

    rate: float
    seconds_left: float

    def __str__(self) -> str:
        return f"about {self.seconds_left:.0f} s left at {self.rate / 2 ** 20:.1f} MiB/s"


def watch_move(watch: Optional[MoveWatch], now: float,
               transfer: Optional[Transfer]) -> Optional[MoveWatch]:
    """The watch after seeing ``transfer`` at ``now`` (None: no move under way). It starts
    at the last sight before any progress, so that a move still setting up does not count
    as a slow one, and starts again if the move starts again (fewer bytes done)."""
    if transfer is None:
        return None
    if watch is None or transfer.bytes_done <= watch.bytes_done:
        return MoveWatch(now, transfer.bytes_done)
    return watch


def move_estimate(watch: Optional[MoveWatch], now: float,
                  transfer: Optional[Transfer]) -> Optional[MoveEstimate]:
    """The rate since ``watch`` began and the seconds left at that rate; None if the total
    is unknown or no progress was seen."""
    if watch is None or transfer is None or transfer.bytes_total is None:
        return None
    progress, elapsed = transfer.bytes_done - watch.bytes_done, now - watch.since
    if progress <= 0 or elapsed <= 0:
        return None
    rate = progress / elapsed
    return MoveEstimate(rate, max(0, transfer.bytes_total - transfer.bytes_done) / rate)


def cannot_finish(watch: Optional[MoveWatch], now: float, transfer: Optional[Transfer],
                  deadline: float) -> Optional[MoveEstimate]:
    """The estimate of a move that will not end by ``deadline`` at the rate seen since
    ``watch`` began (watched for MOVE_WATCH_MIN seconds at least, projected more than
    MOVE_MARGIN of the time left past it); None while it may, or nothing is known."""
    estimate = move_estimate(watch, now, transfer)
    if estimate is None or now - watch.since < MOVE_WATCH_MIN:
        return None
    if estimate.seconds_left <= (deadline - now) * (1 + MOVE_MARGIN):
        return None
    return estimate


def still_moving(name: str, seconds: float, transfer: Transfer,
                 estimate: Optional[MoveEstimate] = None) -> PluginError:
    """A Mount that gives up in time while its volume is still being moved to this node
    (a peer-to-peer move), at its deadline or as soon as ``estimate`` shows the move will
    not end by then: the move goes on, and a later Mount finds the volume here."""
    done = _mib(transfer.bytes_done)
    if transfer.bytes_total:
        share = min(100, transfer.bytes_done * 100 // transfer.bytes_total)
        progress = f"{done} of {_mib(transfer.bytes_total)} received ({share}%)"
    else:
        progress = f"{done} received"
    if estimate is not None:
        progress = f"{progress}, {estimate}"
    return PluginError(f"volume {name} is still moving to this node after {seconds:g} s: "
                       f"{progress}; the move goes on: retry when done (`pyflock list` "
                       f"shows it here once it is)")


def no_answer(action: str, name: str, seconds: float) -> PluginError:
    """The refusal of ``action`` when the control service did not answer in time."""
    return PluginError(f"cannot {action} volume {name}: the control service did not answer "
                       f"within {seconds:g} s; retry once it is reachable from this node")
