"""
The Docker volume plugin (protocol v1 over a unix socket) that runs inside ``pyflock-agent``.

dockerd's calls and their traps are in notes/docker-plugin-protocol.md; in short: every
reply is HTTP 200 with an ``Err`` key (``""`` on success); ``Get``, ``List`` and ``Path``
answer from the agent's own view of the cluster, fast, also while the control service is
unreachable; ``Create`` is idempotent; ``Mount`` takes this node's lease, creates the
dataset here or moves it here, waits (event-driven) until the agent has mounted it, and
answers well inside dockerd's 120 s; mounts are counted per Mount ID and the last
``Unmount`` releases the lease.

The plugin acts through an ``IPluginBackend``: this node's uuid, a control-service client
with the *node's* certificate (it can act only for this node), the agent's view of the
cluster, and ``wait_mounted`` fed by the convergence loop's state reports. ``PluginBackend``
is the one implementation; tests build it from in-memory parts, the agent from its real
ones. ``plugin_site`` and ``listen_plugin`` serve it on a unix socket.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
from typing import Any, Callable, Iterable, Mapping, Optional

import attr
from klein import Klein
from pyrsistent import PMap, pmap
from twisted.internet.defer import (
    CancelledError, Deferred, DeferredList, DeferredLock, TimeoutError as DeferredTimeout,
    maybeDeferred, succeed,
)
from twisted.internet.error import CannotListenError
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site
from werkzeug.exceptions import MethodNotAllowed, NotFound as RouteNotFound
from zope.interface import Attribute, Interface, implementer

from pyflock.common._client import (
    AccessDenied, Conflict, ControlError, ControlUnreachable, DatasetConfiguration,
    IControlClient, LeaseInfo, NodeInfo, NotAllowed, NotFound,
)
from pyflock.common._logging import log_event
from pyflock.common._model import MINIMUM_SIZE
from pyflock.common._sizes import format_size, parse_size
from pyflock.agent._mounts import MountCounts, MountsWriteError

_log = Logger()

#: Docker's rule for local volume names, which pyflock applies to the volumes it creates.
VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+\Z", re.ASCII)

#: The storage profiles ``-o profile=`` accepts; kept in the dataset's metadata.
PROFILES = ("gold", "silver", "bronze")

#: Seconds a Mount may take before it gives up; dockerd itself gives up at 120 s.
MOUNT_TIMEOUT = 100.0

#: Seconds the plugin's leases last, and how often they are renewed while in use.
LEASE_DURATION = 60.0
RENEW_INTERVAL = 20.0

#: How long the lease outlives the last Unmount here: a ``docker run`` of an image with
#: content at the mount point unmounts after the copy-up and mounts again at once.
RELEASE_GRACE = 0.5

#: How long Remove may spend finding out which node holds a refused volume's lease.
HOLDER_LOOKUP = 5.0

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

#: Largest request body read; dockerd's are a few hundred bytes.
MAX_BODY = 1024 * 1024

CONTENT_TYPE = b"application/vnd.docker.plugins.v1.1+json"

#: The mount state the convergence loop reports once a dataset is mounted on this node.
MOUNTED = "mounted"

_HOLDER = re.compile(r"held by node ([0-9a-fA-F-]{36})")


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


@attr.s(frozen=True, auto_attribs=True)
class ViewDataset:
    """One dataset as the agent's view has it: where it lives, its name and lease holder."""

    dataset_id: str
    primary: str
    maximum_size: Optional[int] = None
    metadata: PMap = attr.ib(default=pmap(), converter=pmap)
    deleted: bool = False
    lease: Optional[str] = None

    @property
    def name(self) -> Optional[str]:
        """``metadata.name``: the Docker volume name."""
        return self.metadata.get("name")

    @classmethod
    def from_configuration(cls, config: DatasetConfiguration,
                           lease: Optional[str] = None) -> "ViewDataset":
        """The view record of a REST API dataset record."""
        return cls(dataset_id=config.dataset_id, primary=config.primary,
                   maximum_size=config.maximum_size, metadata=config.metadata,
                   deleted=config.deleted, lease=lease)


@attr.s(frozen=True, auto_attribs=True)
class ClusterView:
    """
    What the plugin needs of the agent's view of the cluster: every dataset by id (deleted
    ones may be included) and each node's host by uuid. A value; build a new one per change.
    """

    datasets: PMap = attr.ib(default=pmap(), converter=pmap)
    nodes: PMap = attr.ib(default=pmap(), converter=pmap)

    @property
    def names(self) -> PMap:
        """Live datasets by name (computed once per view)."""
        cached = self.__dict__.get("_names")
        if cached is None:
            cached = pmap({d.name: d for d in self.datasets.values()
                           if not d.deleted and d.name is not None})
            object.__setattr__(self, "_names", cached)
        return cached

    def by_name(self, name: str) -> Optional[ViewDataset]:
        """The live dataset called ``name``, if any."""
        return self.names.get(name)

    @classmethod
    def from_records(cls, datasets: Iterable[DatasetConfiguration],
                     leases: Iterable[LeaseInfo] = (),
                     nodes: Iterable[NodeInfo] = ()) -> "ClusterView":
        """The view of REST API records (datasets, leases, nodes)."""
        holders = {lease.dataset_id: lease.node_uuid for lease in leases}
        return cls(datasets={d.dataset_id: ViewDataset.from_configuration(
                       d, holders.get(d.dataset_id)) for d in datasets},
                   nodes={n.uuid: n.host for n in nodes})

    @classmethod
    def from_agent_view(cls, view: Any, now: float) -> "ClusterView":
        """
        The view of the agent's ``AgentView`` (``pyflock.agent._view``) at time ``now``:
        a lease counts while its absolute expiration is in the future.
        """
        def holder(lease: Any) -> Optional[str]:
            if lease is None or (lease.expiration is not None and lease.expiration <= now):
                return None
            return lease.node_uuid
        return cls(datasets={d.dataset_id: ViewDataset(
                       dataset_id=d.dataset_id, primary=d.primary,
                       maximum_size=d.maximum_size, metadata=d.metadata, deleted=d.deleted,
                       lease=holder(d.lease))
                       for d in view.datasets.values()},
                   nodes={n.uuid: n.host for n in view.nodes.values()})

    @classmethod
    def from_configuration(cls, config: Any, now: float,
                           nodes: Mapping[str, str] = pmap()) -> "ClusterView":
        """The view of a ``pyflock.common.Configuration`` at time ``now``."""
        return cls(datasets={d.dataset_id: ViewDataset(
                       dataset_id=d.dataset_id, primary=d.primary,
                       maximum_size=d.maximum_size, metadata=d.metadata, deleted=d.deleted,
                       lease=config.leases.holder(now, d.dataset_id))
                       for d in config.datasets.values()},
                   nodes=nodes)


@attr.s(frozen=True, auto_attribs=True)
class LocalState:
    """Where a dataset stands on this node (``creating``, ``mounted``, ...) and its path."""

    state: str
    path: Optional[str] = None


class LocalStates:
    """
    The datasets' states on this node as the convergence loop reports them, and the
    Mounts waiting for one to be mounted: ``report_state`` fires them, no polling.
    """

    def __init__(self) -> None:
        self._states: dict[str, LocalState] = {}
        self._waiters: dict[str, list[Deferred]] = {}

    def report_state(self, dataset_id: str, state: Optional[str],
                     path: Optional[str] = None) -> None:
        """Record ``dataset_id``'s state here (None: no longer here); wakes waiters."""
        if state is None:
            self._states.pop(dataset_id, None)
            return
        self._states[dataset_id] = LocalState(state, path)
        if state == MOUNTED and path:
            for d in self._waiters.pop(dataset_id, []):
                d.callback(path)

    def report_all(self, states: Mapping[str, Any]) -> None:
        """
        Record a whole report: ``states`` maps every dataset this node has anything to do
        with to a status with ``state`` and ``path`` (the convergence loop's
        ``DatasetStatus``); datasets left out are no longer here.
        """
        for dataset_id in [i for i in self._states if i not in states]:
            self.report_state(dataset_id, None)
        for dataset_id, status in states.items():
            self.report_state(dataset_id, status.state, status.path)

    def get(self, dataset_id: str) -> Optional[LocalState]:
        """The last reported state of ``dataset_id`` here, if any."""
        return self._states.get(dataset_id)

    def mounted_path(self, dataset_id: str) -> Optional[str]:
        """The path ``dataset_id`` is mounted at here, or None if it is not."""
        state = self._states.get(dataset_id)
        if state is None or state.state != MOUNTED:
            return None
        return state.path

    def wait_mounted(self, dataset_id: str) -> Deferred:
        """Fires with the path once ``dataset_id`` is mounted here (at once if it is);
        cancellable."""
        path = self.mounted_path(dataset_id)
        if path:
            return succeed(path)
        waiters = self._waiters.setdefault(dataset_id, [])

        def cancel(d: Deferred) -> None:
            if d in waiters:
                waiters.remove(d)
            if not waiters and self._waiters.get(dataset_id) is waiters:
                del self._waiters[dataset_id]
        d: Deferred = Deferred(cancel)
        waiters.append(d)
        return d

    def waiting(self) -> int:
        """How many waits are outstanding (for tests and metrics)."""
        return sum(len(w) for w in self._waiters.values())


class IPluginBackend(Interface):
    """What the Docker plugin needs of the agent."""

    node_uuid = Attribute("This node's uuid, lower case.")
    client = Attribute("An IControlClient using this node's certificate.")

    def view() -> ClusterView:
        """The agent's current view of the cluster (kept on disk; never blocks)."""

    def local_state(dataset_id) -> Optional[LocalState]:
        """The dataset's state on this node as last reported, if any."""

    def wait_mounted(dataset_id) -> Deferred:
        """Fires with the mount path once the dataset is mounted here; cancellable."""

    def is_mountpoint(path) -> Deferred:
        """Fires with whether a filesystem is really mounted at ``path``."""


@implementer(IPluginBackend)
@attr.s(auto_attribs=True)
class PluginBackend:
    """
    The plugin's backend from its parts: ``view`` returns the current ``ClusterView``;
    ``states`` is fed by the convergence loop (``states.report_state``); ``is_mountpoint``
    checks a path (``threaded_is_mountpoint`` in the agent).
    """

    node_uuid: str
    client: Any
    view_of: Callable[[], ClusterView]
    states: LocalStates
    mountpoint_check: Callable[[str], Deferred]

    def view(self) -> ClusterView:
        """The agent's current view of the cluster."""
        return self.view_of()

    def local_state(self, dataset_id: str) -> Optional[LocalState]:
        """The dataset's state here as last reported."""
        return self.states.get(dataset_id)

    def wait_mounted(self, dataset_id: str) -> Deferred:
        """Fires with the path once the dataset is mounted here."""
        return self.states.wait_mounted(dataset_id)

    def is_mountpoint(self, path: str) -> Deferred:
        """Whether a filesystem is mounted at ``path``."""
        return maybeDeferred(self.mountpoint_check, path)


def agent_view_source(current: Callable[[], Any], reactor: Any) -> Callable[[], ClusterView]:
    """
    A ``view`` callable for ``PluginBackend`` from ``current()``, which returns the agent's
    latest ``AgentView``: each new view is converted once, when the plugin first reads it.
    """
    cache: list = [None, ClusterView()]

    def view() -> ClusterView:
        latest = current()
        if latest is not cache[0]:
            cache[:] = [latest, ClusterView.from_agent_view(latest, reactor.seconds())]
        return cache[1]
    return view


def threaded_is_mountpoint(reactor: Any) -> Callable[[str], Deferred]:
    """An ``is_mountpoint`` reading this process's mount table in ``reactor``'s threads."""
    from twisted.internet.threads import deferToThreadPool
    from pyflock.agent._fs import is_mounted

    def check(path: str) -> Deferred:
        return deferToThreadPool(reactor, reactor.getThreadPool(), is_mounted, path)
    return check


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


# -- leases -------------------------------------------------------------------------------


class _LeaseKeeper:
    """
    This node's leases: taken by Mount, renewed while in use, released when idle. The
    operations on one dataset run one after the other, so a release from the copy-up
    Unmount can never land after the start Mount's acquire.
    """

    def __init__(self, client: Any, node_uuid: str, duration: float,
                 in_use: Callable[[str], bool]):
        self._client = client
        self._node = node_uuid
        self._duration = duration
        self._in_use = in_use
        self._locks: dict[str, DeferredLock] = {}
        self.held: set[str] = set()

    def _serially(self, dataset_id: str, f: Callable[[], Deferred]) -> Deferred:
        lock = self._locks.get(dataset_id)
        if lock is None:
            lock = self._locks[dataset_id] = DeferredLock()

        def tidy(result: Any) -> Any:
            if not lock.locked and not lock.waiting and self._locks.get(dataset_id) is lock:
                del self._locks[dataset_id]
            return result
        return lock.run(f).addBoth(tidy)

    def acquire(self, dataset_id: str) -> Deferred:
        """Take or renew this node's lease; fails with the client's error (``Conflict``)."""
        def go() -> Deferred:
            d = self._client.acquire_lease(dataset_id, self._node, self._duration)

            def taken(lease: LeaseInfo) -> LeaseInfo:
                if dataset_id not in self.held:
                    log_event(_log, "pyflock:plugin:lease-acquired", dataset_id=dataset_id,
                              node_uuid=self._node, expires=self._duration)
                self.held.add(dataset_id)
                return lease
            return d.addCallback(taken)
        return self._serially(dataset_id, go)

    def release_if_idle(self, dataset_id: Optional[str]) -> Deferred:
        """Release this node's lease unless the dataset is in use again by then; never
        fails (a lease that cannot be released expires on its own)."""
        if dataset_id is None:
            return succeed(None)

        def go() -> Deferred:
            if self._in_use(dataset_id) or dataset_id not in self.held:
                return succeed(None)
            self.held.discard(dataset_id)
            d = self._client.release_lease(dataset_id)

            def released(_: Any) -> None:
                log_event(_log, "pyflock:plugin:lease-released", dataset_id=dataset_id,
                          node_uuid=self._node)

            def failed(failure: Failure) -> None:
                if failure.check(NotFound):
                    return None
                log_event(_log, "pyflock:plugin:lease-release-failed", LogLevel.warn,
                          dataset_id=dataset_id, reason=str(failure.value),
                          expires_within=self._duration)
            return d.addCallbacks(released, failed)
        return self._serially(dataset_id, go)

    def renew(self, dataset_ids: Iterable[str]) -> Deferred:
        """Renew the leases of ``dataset_ids`` (those in use); never fails, logs trouble."""
        def one(dataset_id: str) -> Deferred:
            def go() -> Deferred:
                if not self._in_use(dataset_id):
                    return succeed(None)
                d = self._client.acquire_lease(dataset_id, self._node, self._duration)

                def failed(failure: Failure) -> None:
                    if failure.check(Conflict):
                        self.held.discard(dataset_id)
                        log_event(_log, "pyflock:plugin:lease-lost", LogLevel.error,
                                  dataset_id=dataset_id, holder=_holder_in(failure.value),
                                  reason=str(failure.value))
                    elif failure.check(NotFound, NotAllowed):
                        self.held.discard(dataset_id)
                        log_event(_log, "pyflock:plugin:lease-lost", LogLevel.error,
                                  dataset_id=dataset_id, holder=None,
                                  reason="the dataset was deleted while in use here")
                    else:
                        log_event(_log, "pyflock:plugin:lease-renew-failed", LogLevel.warn,
                                  dataset_id=dataset_id, reason=str(failure.value))
                return d.addCallbacks(lambda _: self.held.add(dataset_id), failed)
            return self._serially(dataset_id, go)
        return DeferredList([one(i) for i in sorted(set(dataset_ids))], consumeErrors=True)

    def forget(self, dataset_id: str) -> None:
        """Stop treating the dataset's lease as this node's (it went with the dataset)."""
        self.held.discard(dataset_id)


def _holder_in(error: ControlError) -> Optional[str]:
    match = _HOLDER.search(error.description)
    return match.group(1).lower() if match else None


# -- the plugin ---------------------------------------------------------------------------


@attr.s(auto_attribs=True, eq=False)
class _MountInProgress:
    """A Mount that has not answered yet: it counts as a use of its volume."""

    name: str
    mount_id: str
    dataset_id: Optional[str] = None


class DockerPlugin:
    """
    The Klein application of Docker's volume plugin protocol for one node.

    ``backend`` provides the node uuid, control client, view and mount events;
    ``mounts`` the persisted mount counts; ``reactor`` the time. ``docker_mounts``, if
    given, fires with the mount points per pyflock volume of dockerd's running containers
    (``docker_volume_mounts``), or None while dockerd does not answer: after an Activate
    (a new dockerd) the plugin uses it to drop the counts of mounts the previous dockerd
    never unmounted (it crashed). Call ``start()`` once the counts are reconciled (it
    starts lease renewal) and ``stop()`` at exit.
    """

    app = Klein()

    def __init__(self, backend: IPluginBackend, mounts: MountCounts, reactor: Any, *,
                 mount_timeout: float = MOUNT_TIMEOUT, lease_duration: float = LEASE_DURATION,
                 renew_interval: float = RENEW_INTERVAL,
                 request_timeout: float = REQUEST_TIMEOUT, overlay_ttl: float = OVERLAY_TTL,
                 release_grace: float = RELEASE_GRACE,
                 docker_mounts: Optional[Callable[[], Deferred]] = None,
                 settle_timeout: float = SETTLE_TIMEOUT):
        self._backend = backend
        self._node = backend.node_uuid
        self._client: IControlClient = backend.client
        self._mounts = mounts
        self._reactor = reactor
        self._mount_timeout = mount_timeout
        self._lease_duration = lease_duration
        self._renew_interval = renew_interval
        self._request_timeout = request_timeout
        self._overlay_ttl = overlay_ttl
        self._release_grace = release_grace
        self._releases: dict[str, Any] = {}
        self._view_waiters: list[Deferred] = []
        self._in_progress: set[_MountInProgress] = set()
        self._leases = _LeaseKeeper(self._client, self._node, lease_duration,
                                    self._dataset_in_use)
        # Our own creates and removes, until the view shows them (it lags by a push).
        self._created: dict[str, tuple[ViewDataset, float]] = {}
        self._removed: dict[str, float] = {}
        self._renewal: Optional[LoopingCall] = None
        self._docker_mounts = docker_mounts
        self._settle_timeout = settle_timeout
        # (name, mount ID) mounted since the last Activate, or None before any Activate.
        self._since_activate: Optional[set[tuple[str, str]]] = None
        self._settling: Optional[Deferred] = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start renewing the leases of the volumes in use here (at once, then
        periodically)."""
        if self._renewal is not None:
            return
        self._renewal = LoopingCall(self.renew_leases)
        self._renewal.clock = self._reactor
        self._renewal.start(self._renew_interval, now=True)

    def stop(self) -> None:
        """Stop renewing leases (they expire on their own if the agent stays down)."""
        if self._renewal is not None and self._renewal.running:
            self._renewal.stop()
        self._renewal = None
        if self._settling is not None:
            self._settling.cancel()
        for call in self._releases.values():
            if call.active():
                call.cancel()
        self._releases.clear()

    def view_updated(self) -> None:
        """The agent's view changed (a push arrived): wake the Mounts waiting for one."""
        waiting, self._view_waiters = self._view_waiters, []
        for d in waiting:
            if not d.called:
                d.callback(None)

    def _next_view(self, timeout: float) -> Deferred:
        """Fires at the next ``view_updated``, or after ``timeout`` seconds."""
        d: Deferred = Deferred()
        self._view_waiters.append(d)
        call = self._reactor.callLater(timeout, lambda: d.called or d.callback(None))
        return d.addBoth(lambda result: (call.active() and call.cancel(), result)[1])

    def _release_later(self, dataset_id: Optional[str]) -> None:
        """Release this node's lease after ``release_grace`` unless it is in use again."""
        if dataset_id is None:
            return
        pending = self._releases.pop(dataset_id, None)
        if pending is not None and pending.active():
            pending.cancel()

        def release() -> None:
            self._releases.pop(dataset_id, None)
            self._leases.release_if_idle(dataset_id)
        self._releases[dataset_id] = self._reactor.callLater(self._release_grace, release)

    def renew_leases(self) -> Deferred:
        """Renew this node's lease on every dataset in use here; never fails, and gives
        up on requests unanswered after half the renewal interval (the next one tries
        again)."""
        d = self._within(self._leases.renew(self._datasets_in_use()),
                         self._renew_interval / 2)
        return d.addErrback(lambda failure: None)

    def reconcile(self, in_use: Mapping[str, int]) -> Deferred:
        """Correct the mount counts with the mount points running containers hold per
        volume name (``docker_volume_mounts``); fires once saved."""
        return self._saved(self._mounts.reconcile(in_use))

    def resource(self) -> Resource:
        """The web resource serving the protocol (see ``plugin_site``)."""
        return _DefaultHost(self.app.resource())

    # -- bookkeeping ------------------------------------------------------------------

    def _dataset_of(self, name: str) -> Optional[str]:
        dataset_id = self._mounts.table.dataset_id(name)
        if dataset_id is None:
            volume = self._find(name)
            dataset_id = None if volume is None else volume.dataset_id
        return dataset_id

    def _datasets_in_use(self) -> set[str]:
        result = {self._dataset_of(name) for name in self._mounts.table.volumes}
        result.update(m.dataset_id for m in self._in_progress)
        result.discard(None)
        return result  # type: ignore[return-value]

    def _dataset_in_use(self, dataset_id: str) -> bool:
        return dataset_id in self._datasets_in_use()

    def _uses_here(self, name: str) -> int:
        return self._mounts.count(name) + sum(1 for m in self._in_progress if m.name == name)

    def _saved(self, d: Deferred) -> Deferred:
        def written_or_not(failure: Failure) -> None:
            # MountCounts has logged it; the count in memory is right, so go on.
            failure.trap(MountsWriteError)
        return d.addErrback(written_or_not)

    def _find(self, name: str) -> Optional[ViewDataset]:
        """The live dataset called ``name``: the view, corrected by our own recent changes."""
        view = self._backend.view()
        self._tidy_overlay(view)
        found = view.by_name(name)
        if found is not None and found.dataset_id in self._removed:
            return None
        if found is None and name in self._created:
            return self._created[name][0]
        return found

    def _tidy_overlay(self, view: ClusterView) -> None:
        now = self._reactor.seconds()
        for name, (record, expiry) in list(self._created.items()):
            if expiry <= now or record.dataset_id in view.datasets \
                    or view.by_name(name) is not None:
                del self._created[name]
        for dataset_id, expiry in list(self._removed.items()):
            current = view.datasets.get(dataset_id)
            if expiry <= now or current is None or current.deleted:
                del self._removed[dataset_id]

    def _remember_created(self, config: DatasetConfiguration) -> ViewDataset:
        record = ViewDataset.from_configuration(config)
        self._created[record.name] = (record, self._reactor.seconds() + self._overlay_ttl)
        self._removed.pop(record.dataset_id, None)
        return record

    def _node_label(self, node_uuid: Optional[str]) -> str:
        if node_uuid is None:
            return "another node"
        host = self._backend.view().nodes.get(node_uuid)
        return f"node {node_uuid} (host {host})" if host else f"node {node_uuid}"

    def _in_use_elsewhere(self, name: str, holder: Optional[str]) -> PluginError:
        return PluginError(
            f"volume {name} is in use on {self._node_label(holder)}: stop the containers "
            f"using it there first; if that node is down, its lease expires within "
            f"{self._lease_duration:g} s and the volume can then be used here")

    async def _holder_of(self, error: ControlError, dataset_id: str) -> Optional[str]:
        holder = _holder_in(error)
        if holder is not None:
            return holder
        try:
            leases = await self._client.list_leases()
        except ControlError:
            return None
        return next((lease.node_uuid for lease in leases if lease.dataset_id == dataset_id),
                    None)

    async def _fetch_by_name(self, name: str) -> Optional[ViewDataset]:
        """The live dataset called ``name`` as the control service has it right now."""
        listing = await self._client.list_datasets()
        for config in listing.datasets:
            if config.name == name and not config.deleted:
                return self._remember_created(config)
        return None

    def _within(self, d: Deferred, seconds: float) -> Deferred:
        """``d``, cancelled after ``seconds``; whatever it then fails with (the client
        turns a cancelled request into ``ControlUnreachable``) becomes a timeout."""
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()
        call = self._reactor.callLater(seconds, expire)

        def done(result: Any) -> Any:
            if call.active():
                call.cancel()
            if timed_out and isinstance(result, Failure):
                raise DeferredTimeout(f"no answer within {seconds:g} s")
            return result
        return d.addBoth(done)

    # -- the protocol -----------------------------------------------------------------

    @app.handle_errors(RouteNotFound)
    def _unknown(self, request: Any, failure: Failure) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", CONTENT_TYPE)
        path = request.path.decode("utf-8", "replace")
        return _encode({"Err": f"pyflock: unknown endpoint {path}: this plugin implements "
                               f"/Plugin.Activate and /VolumeDriver.* (volume plugin "
                               f"protocol v1)"})

    @app.handle_errors(MethodNotAllowed)
    def _not_post(self, request: Any, failure: Failure) -> bytes:
        request.setResponseCode(405)
        request.setHeader(b"content-type", CONTENT_TYPE)
        request.setHeader(b"allow", b"POST")
        return _encode({"Err": "pyflock: the plugin protocol uses POST only"})

    @app.route("/Plugin.Activate", methods=["POST"])
    def activate(self, request: Any) -> Deferred:
        """Activate: this plugin implements the volume driver protocol."""
        return self._serve(request, "Plugin.Activate", self._activate, named=False)

    @app.route("/VolumeDriver.Capabilities", methods=["POST"])
    def capabilities(self, request: Any) -> Deferred:
        """Capabilities: volumes are cluster-wide (scope global)."""
        return self._serve(request, "VolumeDriver.Capabilities",
                           lambda body: {"Capabilities": {"Scope": "global"}}, named=False)

    @app.route("/VolumeDriver.Create", methods=["POST"])
    def create(self, request: Any) -> Deferred:
        """Create: configure a dataset for the volume on this node (idempotent)."""
        return self._serve(request, "VolumeDriver.Create", self._create)

    @app.route("/VolumeDriver.Remove", methods=["POST"])
    def remove(self, request: Any) -> Deferred:
        """Remove: delete the volume's dataset unless it is in use."""
        return self._serve(request, "VolumeDriver.Remove", self._remove)

    @app.route("/VolumeDriver.Mount", methods=["POST"])
    def mount(self, request: Any) -> Deferred:
        """Mount: lease, create or move here, wait until mounted, answer the path."""
        return self._serve(request, "VolumeDriver.Mount", self._mount)

    @app.route("/VolumeDriver.Unmount", methods=["POST"])
    def unmount(self, request: Any) -> Deferred:
        """Unmount: count one mount fewer; the last one releases the lease."""
        return self._serve(request, "VolumeDriver.Unmount", self._unmount)

    @app.route("/VolumeDriver.Path", methods=["POST"])
    def path(self, request: Any) -> Deferred:
        """Path: where the volume is mounted here, from the agent's view."""
        return self._serve(request, "VolumeDriver.Path", self._path)

    @app.route("/VolumeDriver.Get", methods=["POST"])
    def get(self, request: Any) -> Deferred:
        """Get: the volume from the agent's view (never asks the control service)."""
        return self._serve(request, "VolumeDriver.Get", self._get)

    @app.route("/VolumeDriver.List", methods=["POST"])
    def list_volumes(self, request: Any) -> Deferred:
        """List: every named volume in the agent's view."""
        return self._serve(request, "VolumeDriver.List", self._list, named=False)

    def _serve(self, request: Any, endpoint: str, handler: Callable[[dict], Any],
               named: bool = True) -> Deferred:
        """Run ``handler(body)`` and answer 200 with its result and ``Err``, whatever
        happens."""
        request.setHeader(b"content-type", CONTENT_TYPE)
        name = None

        def gone(failure: Failure) -> None:
            # Klein cancels the handler; this says why in the log.
            log_event(_log, "pyflock:plugin:caller-gone", LogLevel.warn, endpoint=endpoint,
                      name=name)
        request.notifyFinish().addErrback(gone)
        try:
            body = _read_body(request)
            if named:
                name = body.get("Name")
                if not isinstance(name, str) or not name:
                    raise BadRequest('the request has no volume name: "Name" must be a '
                                     'non-empty string')
            d = maybeDeferred(handler, body)
        except Exception:
            d = Deferred()
            d.errback()

        def answer(result: dict) -> bytes:
            return _encode(dict(result, Err=""))

        def refuse(failure: Failure) -> bytes:
            error = failure.value
            if isinstance(error, PluginError):
                if isinstance(error, BadRequest):
                    log_event(_log, "pyflock:plugin:bad-request", LogLevel.warn,
                              endpoint=endpoint, reason=str(error))
                return _encode({"Err": error.err})
            if isinstance(error, CancelledError):
                return _encode({"Err": "pyflock: the request was cancelled"})
            if isinstance(error, ControlError):
                return _encode({"Err": f"pyflock: {endpoint} of volume {name}: {error}"})
            log_event(_log, "pyflock:plugin:internal-error", LogLevel.critical,
                      endpoint=endpoint, name=name, traceback=failure.getTraceback())
            return _encode({"Err": f"pyflock: internal error in {endpoint} of volume "
                                   f"{name} ({type(error).__name__}); the agent's log has "
                                   f"the details (event pyflock:plugin:internal-error)"})
        return d.addCallbacks(answer, refuse)

    def _activate(self, body: dict) -> dict:
        log_event(_log, "pyflock:plugin:activated", node_uuid=self._node)
        # dockerd activates a plugin once per lifetime: this is a new dockerd. If the
        # previous one crashed, it never unmounted what its containers held.
        self._since_activate = set()
        if self._docker_mounts is not None:
            if self._settling is not None:
                self._settling.cancel()
            self._settling = Deferred.fromCoroutine(self._settle())
            self._settling.addErrback(self._settle_failed)
        return {"Implements": ["VolumeDriver"]}

    def _settle_failed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            log_event(_log, "pyflock:plugin:settle-failed", LogLevel.error,
                      reason=failure.getErrorMessage(), traceback=failure.getTraceback())

    async def _settle(self) -> None:
        """Once the new dockerd answers, keep only the counts its running containers
        justify (``MountCounts.settle``), and release the leases of volumes left unused."""
        deadline = self._reactor.seconds() + self._settle_timeout
        pause = 0.1
        while True:
            in_use = None
            left = deadline - self._reactor.seconds()
            if left > 0:
                # A call that never answers must not keep the counts unsettled forever.
                try:
                    in_use = await self._within(maybeDeferred(self._docker_mounts), left)
                except DeferredTimeout:
                    pass
            if in_use is not None:
                break
            left = deadline - self._reactor.seconds()
            if left <= 0:
                log_event(_log, "pyflock:plugin:settle-failed", LogLevel.warn,
                          reason=f"dockerd's API did not answer within "
                                 f"{self._settle_timeout:g} s of the Activate")
                return
            await deferLater(self._reactor, min(pause, left), lambda: None)
            pause = min(pause * 2, SETTLE_RETRY)
        before = self._mounts.table
        # Before settling, while the table still names them; mounts that ``reconcile``
        # recorded have no dataset id, and ``_dataset_of`` then asks the view.
        datasets = {name: self._dataset_of(name) for name in before.volumes}
        saved = self._saved(self._mounts.settle(in_use, self._since_activate or ()))
        # Every count left is now the new dockerd's (live-restore keeps containers
        # running): from here on, a Mount of a counted ID is another use (``docker cp``).
        self._since_activate = None
        for name, dataset_id in sorted(datasets.items()):
            if self._uses_here(name) == 0:
                self._leases.release_if_idle(dataset_id)
        await saved

    # -- Get, List, Path: from the view, never from the control service -----------------

    def _describe(self, volume: ViewDataset, status: bool) -> dict:
        result: dict[str, Any] = {"Name": volume.name}
        path = self._mounted_path(volume.dataset_id)
        if path:
            result["Mountpoint"] = path
        if status:
            local = self._backend.local_state(volume.dataset_id)
            host = self._backend.view().nodes.get(volume.primary)
            if local is not None:
                where = local.state
            elif volume.primary == self._node:
                where = "pending"
            else:
                where = "on another node"
            result["Status"] = {
                "dataset_id": volume.dataset_id,
                "primary": volume.primary,
                "primary_host": host or "",
                "size": "default" if volume.maximum_size is None
                        else format_size(volume.maximum_size),
                "profile": volume.metadata.get("profile", ""),
                "state": where,
                "lease": volume.lease or "",
                "mounts_here": self._uses_here(volume.name),
            }
        return result

    def _mounted_path(self, dataset_id: str) -> Optional[str]:
        local = self._backend.local_state(dataset_id)
        if local is None or local.state != MOUNTED:
            return None
        return local.path

    def _get(self, body: dict) -> dict:
        name = body["Name"]
        volume = self._find(name)
        if volume is None:
            raise NoSuchVolume(name)
        return {"Volume": self._describe(volume, status=True)}

    def _path(self, body: dict) -> dict:
        name = body["Name"]
        volume = self._find(name)
        if volume is None:
            raise NoSuchVolume(name)
        path = self._mounted_path(volume.dataset_id)
        return {"Mountpoint": path} if path else {}

    def _list(self, body: dict) -> dict:
        view = self._backend.view()
        self._tidy_overlay(view)
        volumes = {name: v for name, v in view.names.items()
                   if v.dataset_id not in self._removed}
        for name, (record, _) in self._created.items():
            volumes.setdefault(name, record)
        # A name Docker cannot use (made with the API or CLI) would only confuse dockerd.
        return {"Volumes": [self._describe(v, status=False)
                            for name, v in sorted(volumes.items()) if VOLUME_NAME.match(name)]}

    # -- Create -----------------------------------------------------------------------

    async def _create(self, body: dict) -> dict:
        name = body["Name"]
        check_volume_name(name)
        size, profile = parse_create_options(name, body.get("Opts"))
        existing = self._find(name)
        if existing is not None:
            # A Get that timed out makes dockerd Create a volume that exists (notes §7).
            log_event(_log, "pyflock:plugin:create-existing", name=name,
                      dataset_id=existing.dataset_id)
            return {}
        metadata = {"name": name}
        if profile is not None:
            metadata["profile"] = profile
        try:
            config = await self._within(self._client.create_dataset(
                self._node, maximum_size=size, metadata=metadata), self._request_timeout)
        except Conflict:
            # The name exists in the cluster but this node's view has not caught up;
            # fetching it lets Get answer it before the view does.
            found = None
            try:
                found = await self._within(Deferred.fromCoroutine(
                    self._fetch_by_name(name)), self._request_timeout)
            except (ControlError, DeferredTimeout):
                pass
            log_event(_log, "pyflock:plugin:create-existing", name=name,
                      dataset_id=None if found is None else found.dataset_id)
            return {}
        except ControlUnreachable as e:
            raise _unreachable("create", name, e) from None
        except DeferredTimeout:
            raise _no_answer("create", name, self._request_timeout) from None
        self._remember_created(config)
        log_event(_log, "pyflock:plugin:created", name=name, dataset_id=config.dataset_id,
                  node_uuid=self._node, maximum_size=size, profile=profile)
        return {}

    # -- Mount ------------------------------------------------------------------------

    async def _mount(self, body: dict) -> dict:
        name = body["Name"]
        mount_id = body.get("ID", "")
        if not isinstance(mount_id, str):
            raise BadRequest(f'"ID" must be a string (the mount ID), not '
                             f'{json.dumps(mount_id)[:60]}')
        started = self._reactor.seconds()
        progress = _MountInProgress(name, mount_id)
        self._in_progress.add(progress)
        counted = False
        try:
            work = Deferred.fromCoroutine(self._mount_steps(progress))
            path = await self._within(work, self._mount_timeout)
            counted = True
            since = self._since_activate
            if since is not None and (name, mount_id) not in since \
                    and self._mounts.table.mount_count(name, mount_id):
                # The previous dockerd's count of this ID (a restarted container keeps its
                # mount IDs) is stale: the new dockerd never saw that mount.
                change = self._mounts.remount(name, mount_id, progress.dataset_id)
            else:
                change = self._mounts.mount(name, mount_id, progress.dataset_id)
            if since is not None:
                since.add((name, mount_id))
            saved = self._saved(change)
            # A hang-up now must not cancel the write, only our wait for it.
            await _uncancellable(saved)
        except BaseException as e:
            self._in_progress.discard(progress)
            if counted:
                self._saved(self._mounts.unmount(name, mount_id))
            self._leases.release_if_idle(progress.dataset_id)
            error = self._mount_error(progress, e)
            log_event(_log, "pyflock:plugin:mount-failed", LogLevel.warn, name=name,
                      mount_id=mount_id, dataset_id=progress.dataset_id,
                      seconds=round(self._reactor.seconds() - started, 3),
                      reason=str(error) if error is not None else repr(e))
            if error is None:
                raise
            raise error from None
        self._in_progress.discard(progress)
        log_event(_log, "pyflock:plugin:mount", name=name, mount_id=mount_id,
                  dataset_id=progress.dataset_id, path=path, count=self._mounts.count(name),
                  seconds=round(self._reactor.seconds() - started, 3))
        return {"Mountpoint": path}

    def _mount_error(self, progress: _MountInProgress,
                     error: BaseException) -> Optional[BaseException]:
        """The error to answer a failed Mount with (None: re-raise the original)."""
        name = progress.name
        if isinstance(error, DeferredTimeout):
            local = None if progress.dataset_id is None else \
                self._backend.local_state(progress.dataset_id)
            where = "not started" if local is None else local.state
            return PluginError(
                f"volume {name} was not ready on this node within "
                f"{self._mount_timeout:g} s (state here: {where}); the agent goes on "
                f"working on it: retry in a moment, and if this persists check "
                f"`pyflock list` and the agent's log")
        if isinstance(error, CancelledError):
            return CancelledError("dockerd hung up before the Mount finished")
        if isinstance(error, ControlUnreachable):
            return _unreachable("mount", name, error)
        if isinstance(error, PluginError):
            return error
        if isinstance(error, ControlError):
            return PluginError(f"cannot mount volume {name}: the control service refused: "
                               f"{error}")
        return None

    async def _mount_steps(self, progress: _MountInProgress) -> str:
        name = progress.name
        volume = self._find(name)
        if volume is None:
            volume = await self._create_for_mount(name)
        progress.dataset_id = volume.dataset_id
        if not await self._take_lease(name, volume.dataset_id):
            # The view named a dataset deleted since: ask the control service itself.
            volume = await self._fetch_by_name(name) or await self._create_for_mount(name)
            progress.dataset_id = volume.dataset_id
            if not await self._take_lease(name, volume.dataset_id):
                raise _deleted_while_mounting(name)
        if volume.primary != self._node:
            log_event(_log, "pyflock:plugin:move-requested", name=name,
                      dataset_id=volume.dataset_id, source=volume.primary,
                      target=self._node)
        # Always ask: the view may lag, and a move to where it already is changes nothing.
        try:
            await self._client.move_dataset(volume.dataset_id, self._node)
        except Conflict as e:
            raise self._in_use_elsewhere(name, await self._holder_of(e, volume.dataset_id))
        except (NotFound, NotAllowed):
            raise _deleted_while_mounting(name) from None
        path = await self._backend.wait_mounted(volume.dataset_id)
        if not await self._backend.is_mountpoint(path):
            raise PluginError(f"volume {name}: the agent reported it mounted at {path}, "
                              f"but no filesystem is mounted there; check the agent's log, "
                              f"then retry")
        return path

    async def _take_lease(self, name: str, dataset_id: str) -> bool:
        """Take this node's lease: True once taken, False if the dataset is gone. If
        another node holds it, fail naming the holder, after retrying for just longer than
        the release grace: a container that stopped there a moment ago leaves the lease
        behind that long (``RELEASE_GRACE``)."""
        deadline = self._reactor.seconds() + self._release_grace + LEASE_RETRY_MARGIN
        while True:
            try:
                await self._leases.acquire(dataset_id)
            except Conflict as e:
                left = deadline - self._reactor.seconds()
                if left > 0:
                    # The release reaches this node as a pushed view: ask again then
                    # (or once more at the deadline), not on a timer.
                    await self._next_view(left)
                    continue
                raise self._in_use_elsewhere(
                    name, await self._holder_of(e, dataset_id)) from None
            except (NotFound, NotAllowed):
                return False
            return True

    async def _create_for_mount(self, name: str) -> ViewDataset:
        """A dataset for a volume dockerd knows but the cluster does not (deleted there)."""
        check_volume_name(name)
        try:
            config = await self._client.create_dataset(self._node, metadata={"name": name})
        except Conflict:
            found = await self._fetch_by_name(name)
            if found is None:
                raise PluginError(f"volume {name} was created and deleted elsewhere at the "
                                  f"same time; retry") from None
            return found
        log_event(_log, "pyflock:plugin:recreated", LogLevel.warn, name=name,
                  dataset_id=config.dataset_id, node_uuid=self._node)
        return self._remember_created(config)

    # -- Unmount ----------------------------------------------------------------------

    async def _unmount(self, body: dict) -> dict:
        name = body["Name"]
        mount_id = body.get("ID", "")
        if not isinstance(mount_id, str):
            raise BadRequest(f'"ID" must be a string (the mount ID), not '
                             f'{json.dumps(mount_id)[:60]}')
        dataset_id = self._dataset_of(name)
        before = self._mounts.table
        saved = self._saved(self._mounts.unmount(name, mount_id))
        if self._mounts.table == before:
            log_event(_log, "pyflock:plugin:unmount-unknown", LogLevel.warn, name=name,
                      mount_id=mount_id)
        else:
            log_event(_log, "pyflock:plugin:unmount", name=name, mount_id=mount_id,
                      dataset_id=dataset_id, count=self._mounts.count(name))
        if self._uses_here(name) == 0:
            # Dataset stays here and mounted, and the lease stays a moment: the copy-up
            # Unmount is followed at once by the start Mount, and another node must not
            # take the volume in between. Then only the lease goes.
            self._release_later(dataset_id)
        await saved
        return {}

    # -- Remove -----------------------------------------------------------------------

    async def _remove(self, body: dict) -> dict:
        name = body["Name"]
        uses = self._uses_here(name)
        if uses:
            log_event(_log, "pyflock:plugin:remove-refused", name=name, mounts_here=uses)
            raise PluginError(
                f"volume {name} is in use by {uses} mount(s) on this node: stop and remove "
                f"the containers using it first (docker ps -a --filter volume={name})")
        volume = self._find(name)
        if volume is None:
            log_event(_log, "pyflock:plugin:remove-absent", name=name)
            return {}
        dataset_id = volume.dataset_id
        moved_from = None

        async def delete() -> None:
            nonlocal moved_from
            try:
                await self._client.delete_dataset(dataset_id)
            except AccessDenied:
                # A node certificate may delete only a dataset whose primary is its node:
                # claim it first (refused while another node leases it), then delete.
                # The data is not copied here first: its old node destroys it.
                moved_from = volume.primary
                await self._client.move_dataset(dataset_id, self._node)
                await self._client.delete_dataset(dataset_id)
        try:
            # One deadline for all the steps: dockerd gives Remove 60 s in all.
            await self._within(Deferred.fromCoroutine(delete()), self._request_timeout)
        except Conflict as e:
            try:
                holder = await self._within(
                    Deferred.fromCoroutine(self._holder_of(e, dataset_id)), HOLDER_LOOKUP)
            except (ControlError, DeferredTimeout):
                holder = None
            log_event(_log, "pyflock:plugin:remove-refused", name=name,
                      dataset_id=dataset_id, holder=holder)
            raise PluginError(
                f"volume {name} is in use on {self._node_label(holder)}: stop and remove "
                f"the containers using it there, then retry") from None
        except (NotFound, NotAllowed):
            pass  # deleted meanwhile: what was asked for
        except ControlUnreachable as e:
            raise _unreachable("remove", name, e) from None
        except DeferredTimeout:
            raise _no_answer("remove", name, self._request_timeout) from None
        except ControlError as e:
            raise PluginError(f"cannot remove volume {name}: the control service refused: "
                              f"{e}") from None
        self._leases.forget(dataset_id)
        self._created.pop(name, None)
        self._removed[dataset_id] = self._reactor.seconds() + self._overlay_ttl
        log_event(_log, "pyflock:plugin:removed", name=name, dataset_id=dataset_id,
                  moved_from=moved_from)
        return {}


def _deleted_while_mounting(name: str) -> PluginError:
    return PluginError(f"volume {name} was deleted from the cluster while it was being "
                       f"mounted; retry to create it afresh")


def _unreachable(action: str, name: str, error: ControlUnreachable) -> PluginError:
    return PluginError(f"cannot {action} volume {name}: {error.description}; retry once the "
                       f"control service is reachable from this node")


def _no_answer(action: str, name: str, seconds: float) -> PluginError:
    return PluginError(f"cannot {action} volume {name}: the control service did not answer "
                       f"within {seconds:g} s; retry once it is reachable from this node")


def _uncancellable(d: Deferred) -> Deferred:
    """A Deferred following ``d`` whose cancellation leaves ``d`` running."""
    follower: Deferred = Deferred()

    def passthrough(result: Any) -> None:
        if follower.called:
            return
        if isinstance(result, Failure):
            follower.errback(result)
        else:
            follower.callback(result)
    d.addBoth(passthrough)
    return follower


def _encode(value: dict) -> bytes:
    return json.dumps(value).encode("utf-8")


def _read_body(request: Any) -> dict:
    """The JSON object of the request (an empty body is ``{}``); ``BadRequest`` if not."""
    content = request.content
    raw = content.read(MAX_BODY + 1) if content is not None else b""
    if len(raw) > MAX_BODY:
        raise BadRequest(f"the request body is larger than {MAX_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, not "
                         f"{type(body).__name__}")
    return body


class _DefaultHost(Resource):
    """
    Gives requests without a Host header a made-up one: dockerd 20.10 sends an empty Host,
    with which Twisted looks up the unix socket's (missing) host name and fails.
    """

    isLeaf = True

    def __init__(self, wrapped: Resource):
        super().__init__()
        self._wrapped = wrapped

    def render(self, request: Any) -> Any:
        """Render the wrapped resource with a usable Host header."""
        if not request.getHeader(b"host"):
            request.requestHeaders.setRawHeaders(b"host", [b"localhost"])
        return self._wrapped.render(request)


class _PluginSite(Site):
    """A Site without an access log: the plugin logs its own structured events."""

    noisy = False

    def log(self, request: Any) -> None:
        """Do not log each request (events ``pyflock:plugin:*`` say what happened)."""


def plugin_site(plugin: DockerPlugin) -> Site:
    """The HTTP site serving ``plugin`` (give it to ``listen_plugin``)."""
    site = _PluginSite(plugin.resource())
    site.displayTracebacks = False
    return site


def listen_plugin(reactor: Any, path: str, site: Site) -> Any:
    """
    Serve ``site`` on the unix socket ``path`` (mode 0600; its folder is created if
    missing) and return the listening port; ``stopListening()`` removes the socket. A stale
    socket left by a dead process is replaced; one that a live process serves is not, and
    ``PluginSocketError`` says so. Blocks briefly (a connect to a local socket): call it at
    start, before dockerd needs the plugin.
    """
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, mode=0o755, exist_ok=True)
        existing: Optional[os.stat_result] = os.lstat(path)
    except FileNotFoundError:
        existing = None
    except OSError as e:
        raise PluginSocketError(f"cannot serve the Docker plugin at {path}: {e.strerror}"
                                ) from None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise PluginSocketError(f"cannot serve the Docker plugin at {path}: it exists "
                                    f"and is not a socket; remove it or set another "
                                    f"plugin.socket")
        if _socket_is_live(path):
            raise PluginSocketError(f"cannot serve the Docker plugin at {path}: another "
                                    f"process serves it (another pyflock-agent?); stop it "
                                    f"first")
        os.unlink(path)
        log_event(_log, "pyflock:plugin:stale-socket-removed", path=path)
    try:
        port = reactor.listenUNIX(path, site, mode=0o600, wantPID=False)
    except CannotListenError as e:
        raise PluginSocketError(f"cannot serve the Docker plugin at {path}: "
                                f"{e.socketError}") from None
    log_event(_log, "pyflock:plugin:listening", path=path)
    return port


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


__all__ = [
    "BadRequest", "ClusterView", "DockerPlugin", "IPluginBackend", "LEASE_DURATION",
    "LocalState", "LocalStates", "MOUNTED", "MOUNT_TIMEOUT", "NoSuchVolume", "PROFILES",
    "PluginBackend", "PluginError", "PluginSocketError", "RENEW_INTERVAL", "SETTLE_TIMEOUT",
    "VOLUME_NAME", "ViewDataset",
    "agent_view_source", "check_volume_name", "listen_plugin", "parse_create_options",
    "plugin_site", "threaded_is_mountpoint",
]
