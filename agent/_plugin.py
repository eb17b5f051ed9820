"""
The Docker volume plugin (protocol v1 over a unix socket) that runs inside ``pyflock-agent``.

dockerd's calls and their traps are in notes/docker-plugin-protocol.md; in short: every
reply is HTTP 200 with an ``Err`` key (``""`` on success); ``Get``, ``List`` and ``Path``
answer from the agent's own view of the cluster, fast, also while the control service is
unreachable; ``Create`` is idempotent; ``Mount`` takes this node's lease, creates the
dataset here or moves it here, waits (event-driven) until the agent has mounted it, and
answers well inside dockerd's 120 s; mounts are counted per Mount ID and the last
``Unmount`` releases the lease.

The plugin is a pure core and thin IO around it: ``_plugin_core`` decides (a sans-IO state
machine per Mount), ``DockerPlugin`` here runs its actions against an ``IPluginBackend``
(``_plugin_backend``), the ``LeaseKeeper`` (``_lease_keeper``) and the mount counts, and
``_plugin_http`` serves it to dockerd. This module re-exports the plugin's public names.
"""

from __future__ import annotations

import json
from functools import partial
from uuid import uuid4
from typing import Any, Callable, Mapping, Optional

from twisted.internet.defer import (
    CancelledError, Deferred, TimeoutError as DeferredTimeout, maybeDeferred,
)
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from pyflock.agent._lease_keeper import LeaseKeeper
from pyflock.agent._mounts import MountCounts
from pyflock.agent._pending import PendingCreations
from pyflock.agent._plugin_backend import (
    IPluginBackend, LocalStates, PluginBackend, agent_view_source, is_mountpoint_in,
)
from pyflock.agent._plugin_core import NewVolume, PluginCore, World, describe, mounted_path
from pyflock.agent._plugin_http import PluginApp, listen_plugin, plugin_site
from pyflock.agent._plugin_model import (
    LEASE_DURATION, MOUNT_TIMEOUT, MOUNTED, OVERLAY_TTL, PROFILES, RELEASE_GRACE,
    RENEW_INTERVAL, REQUEST_TIMEOUT, SETTLE_RETRY, SETTLE_TIMEOUT, VOLUME_NAME, BadRequest,
    ClusterView, LocalState, NoSuchVolume, PluginError, PluginSocketError,
    check_volume_name, no_answer, node_label, parse_create_options, unreachable,
)
from pyflock.agent._plugin_runner import MountRunner, fetch_by_name, saved, within
from pyflock.common._client import (
    AccessDenied, Conflict, ControlError, ControlUnreachable, IControlClient, NotAllowed,
    NotFound,
)
from pyflock.common._logging import log_event
from pyflock.common._records import Dataset, DatasetEntry, Lease

_log = Logger()


class DockerPlugin:
    """
    One node's Docker volume plugin: runs the ``PluginCore``'s actions.

    ``backend`` provides the node uuid, control client, view and mount events;
    ``mounts`` the persisted mount counts; ``reactor`` the time. ``docker_mounts``, if
    given, fires with the mount points per pyflock volume of dockerd's running containers
    (``docker_volume_mounts``), or None while dockerd does not answer: after an Activate
    (a new dockerd) the plugin uses it to drop the counts of mounts the previous dockerd
    never unmounted (it crashed). ``pending``, if given, makes each new volume's dataset
    on this node while its create request is under way (``pyflock.agent._pending``).
    Call ``start()`` once the counts are reconciled (it starts lease renewal) and
    ``stop()`` at exit.
    """

    def __init__(self, backend: IPluginBackend, mounts: MountCounts, reactor: Any, *,
                 mount_timeout: float = MOUNT_TIMEOUT, lease_duration: float = LEASE_DURATION,
                 renew_interval: float = RENEW_INTERVAL,
                 request_timeout: float = REQUEST_TIMEOUT, overlay_ttl: float = OVERLAY_TTL,
                 release_grace: float = RELEASE_GRACE,
                 docker_mounts: Optional[Callable[[], Deferred]] = None,
                 settle_timeout: float = SETTLE_TIMEOUT,
                 pending: Optional[PendingCreations] = None):
        self._backend = backend
        self._pending = pending
        self._node = backend.node_uuid
        self._client: IControlClient = backend.client
        self._mounts = mounts
        self._reactor = reactor
        self._core = PluginCore(self._node, mount_timeout=mount_timeout,
                                lease_duration=lease_duration, release_grace=release_grace,
                                overlay_ttl=overlay_ttl)
        self._renew_interval = renew_interval
        self._request_timeout = request_timeout
        self._lease_duration = lease_duration
        self._leases = LeaseKeeper(self._client, self._node, lease_duration,
                                   lambda dataset_id: dataset_id in self._in_use())
        self._releases: dict[str, Any] = {}
        self._renewal: Optional[LoopingCall] = None
        self._docker_mounts = docker_mounts
        self._settle_timeout = settle_timeout
        self._settling: Optional[Deferred] = None
        self._mounting = MountRunner(self._core, backend, self._leases, mounts, reactor,
                                     self._world)

    def _world(self) -> World:
        return World(self._reactor.seconds(), self._backend.view(), self._mounts.table,
                     frozenset(self._leases.held))

    def _in_use(self) -> set[str]:
        return self._core.datasets_in_use(self._world())

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
        self._mounting.view_updated()

    def mount(self, body: dict) -> Deferred:
        """Mount: lease, create or move here, wait until mounted, answer the path."""
        return self._mounting.mount(body)

    def view_waiters(self) -> int:
        """How many Mounts wait for a view push (for tests and metrics)."""
        return len(self._core.waiting_for_view())

    def renew_leases(self) -> Deferred:
        """Renew this node's lease on every dataset in use here; never fails, and gives
        up on requests unanswered after half the renewal interval (the next one tries
        again)."""
        d = within(self._reactor, self._leases.renew(self._in_use()), self._renew_interval / 2)
        return d.addErrback(lambda failure: None)

    def reconcile(self, in_use: Mapping[str, int]) -> Deferred:
        """Correct the mount counts with the mount points running containers hold per
        volume name (``docker_volume_mounts``); fires once saved."""
        return saved(self._mounts.reconcile(in_use))

    def resource(self) -> Resource:
        """The web resource serving the protocol (see ``plugin_site``)."""
        return PluginApp(self).resource()

    def _release_later(self, dataset_id: Optional[str]) -> None:
        """Release this node's lease after the grace unless it is in use again."""
        if dataset_id is None:
            return
        pending = self._releases.pop(dataset_id, None)
        if pending is not None and pending.active():
            pending.cancel()

        def release() -> None:
            self._releases.pop(dataset_id, None)
            self._leases.release_if_idle(dataset_id)
        self._releases[dataset_id] = self._reactor.callLater(self._core.release_grace,
                                                             release)

    # -- Activate: a new dockerd -------------------------------------------------------

    def activate(self, body: dict) -> dict:
        """Activate: this plugin implements the volume driver protocol."""
        log_event(_log, "pyflock:plugin:activated", node_uuid=self._node)
        # dockerd activates a plugin once per lifetime: this is a new dockerd. If the
        # previous one crashed, it never unmounted what its containers held.
        self._core.activated()
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
                    in_use = await within(self._reactor, maybeDeferred(self._docker_mounts), left)
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
        world = self._world()
        # Before settling, while the table still names them; mounts that ``reconcile``
        # recorded have no dataset id, and ``dataset_of`` then asks the view.
        datasets = {name: self._core.dataset_of(name, world) for name in world.table.volumes}
        written = saved(self._mounts.settle(in_use, self._core.since_activate))
        # Every count left is now the new dockerd's (live-restore keeps containers
        # running): from here on, a Mount of a counted ID is another use (``docker cp``).
        self._core.settled()
        world = self._world()
        for name, dataset_id in sorted(datasets.items()):
            if self._core.uses_here(name, world) == 0:
                self._leases.release_if_idle(dataset_id)
        await written

    # -- Get, List, Path: from the view, never from the control service -----------------

    def _describe(self, volume: DatasetEntry, world: World, status: bool) -> dict:
        return describe(volume, self._backend.local_state(volume.dataset_id), self._node,
                        world, self._core.uses_here(volume.name, world), status)

    def get(self, body: dict) -> dict:
        """Get: the volume from the agent's view (never asks the control service)."""
        world = self._world()
        volume = self._core.find(body["Name"], world)
        if volume is None:
            raise NoSuchVolume(body["Name"])
        return {"Volume": self._describe(volume, world, status=True)}

    def path(self, body: dict) -> dict:
        """Path: where the volume is mounted here, from the agent's view."""
        volume = self._core.find(body["Name"], self._world())
        if volume is None:
            raise NoSuchVolume(body["Name"])
        path = mounted_path(self._backend.local_state(volume.dataset_id))
        return {"Mountpoint": path} if path else {}

    def list_volumes(self, body: dict) -> dict:
        """List: every named volume in the agent's view."""
        world = self._world()
        volumes = self._core.overlay.volumes(world.view, world.now)
        # A name Docker cannot use (made with the API or CLI) would only confuse dockerd.
        return {"Volumes": [self._describe(v, world, status=False)
                            for name, v in sorted(volumes.items()) if VOLUME_NAME.match(name)]}

    # -- Create, Unmount, Remove ------------------------------------------------------

    async def create(self, body: dict) -> dict:
        """Create: configure a dataset for the volume on this node (idempotent)."""
        name = body["Name"]
        world = self._world()
        new = self._core.create(name, body.get("Opts"), world)
        if new is None:
            # A Get that timed out makes dockerd Create a volume that exists (notes §7).
            log_event(_log, "pyflock:plugin:create-existing", name=name,
                      dataset_id=self._core.find(name, world).dataset_id)
            return {}
        dataset_id = None
        if self._pending is not None:
            dataset_id = str(uuid4())
            self._pending.begin(dataset_id, new.maximum_size, new.profile)
        asked = self._reactor.seconds()
        try:
            config, leased = await within(self._reactor, Deferred.fromCoroutine(
                self._create(new, dataset_id)), self._request_timeout)
        except Conflict as e:
            self._refused(dataset_id, e)
            # The name exists in the cluster but this node's view has not caught up;
            # fetching it lets Get answer it before the view does.
            found = None
            try:
                found = await within(self._reactor, Deferred.fromCoroutine(
                    fetch_by_name(self._client, name)), self._request_timeout)
            except (ControlError, DeferredTimeout):
                pass
            if found is not None:
                self._core.overlay.created(found, self._reactor.seconds())
            log_event(_log, "pyflock:plugin:create-existing", name=name,
                      dataset_id=None if found is None else found.dataset_id)
            return {}
        except ControlUnreachable as e:
            raise unreachable("create", name, e) from None
        except DeferredTimeout:
            raise no_answer("create", name, self._request_timeout) from None
        except ControlError as e:
            self._refused(dataset_id, e)
            raise
        lease = Lease.lasting(config.dataset_id, self._node, asked, self._lease_duration)
        self._core.overlay.created(config, self._reactor.seconds(), leased and lease or None)
        log_event(_log, "pyflock:plugin:created", name=name, dataset_id=config.dataset_id,
                  node_uuid=self._node, maximum_size=new.maximum_size, profile=new.profile)
        if leased:
            self._leases.took(config.dataset_id)
            self._release_later(config.dataset_id)  # unless a Mount uses it meanwhile
        return {}

    async def _create(self, new: NewVolume, dataset_id: Optional[str]) -> tuple[Dataset, bool]:
        """The new dataset, made with this node's lease (from after the call) in the
        same write: dockerd's first Mount, ms later, finds it held (``held_here``); and
        whether the lease came with it: a control service older than that refuses
        ``lease`` (400), and the Mount then takes the lease the usual way."""
        create = partial(self._client.create_dataset, self._node, dataset_id=dataset_id,
                         maximum_size=new.maximum_size, metadata=new.metadata)
        try:
            return await create(lease=self._lease_duration), True
        except ControlError as e:
            if e.code != 400:
                raise
        return await create(), False

    def _refused(self, dataset_id: Optional[str], error: ControlError) -> None:
        """The control service said no (4xx) to creating ``dataset_id``: what this node
        made for it goes. With no answer the creation may have happened: it stays."""
        if dataset_id is not None and error.code is not None and 400 <= error.code < 500:
            self._pending.abandon(dataset_id, self._reactor.seconds())

    async def unmount(self, body: dict) -> dict:
        """Unmount: count one mount fewer; the last one releases the lease."""
        name = body["Name"]
        mount_id = body.get("ID", "")
        if not isinstance(mount_id, str):
            raise BadRequest(f'"ID" must be a string (the mount ID), not '
                             f'{json.dumps(mount_id)[:60]}')
        dataset_id = self._core.dataset_of(name, self._world())
        before = self._mounts.table
        written = saved(self._mounts.unmount(name, mount_id))
        if self._mounts.table == before:
            log_event(_log, "pyflock:plugin:unmount-unknown", LogLevel.warn, name=name,
                      mount_id=mount_id)
        else:
            log_event(_log, "pyflock:plugin:unmount", name=name, mount_id=mount_id,
                      dataset_id=dataset_id, count=self._mounts.count(name))
        if self._core.uses_here(name, self._world()) == 0:
            # Dataset stays here and mounted, and the lease stays a moment: the copy-up
            # Unmount is followed at once by the start Mount, and another node must not
            # take the volume in between. Then only the lease goes.
            self._release_later(dataset_id)
        await written
        return {}

    async def remove(self, body: dict) -> dict:
        """Remove: delete the volume's dataset unless it is in use."""
        name = body["Name"]
        world = self._world()
        try:
            volume = self._core.removable(name, world)
        except PluginError:
            log_event(_log, "pyflock:plugin:remove-refused", name=name,
                      mounts_here=self._core.uses_here(name, world))
            raise
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
            await within(self._reactor, Deferred.fromCoroutine(delete()), self._request_timeout)
        except Conflict as e:
            log_event(_log, "pyflock:plugin:remove-refused", name=name,
                      dataset_id=dataset_id, holder=e.holder)
            raise PluginError(
                f"volume {name} is in use on {node_label(world.view, e.holder)}: stop and "
                f"remove the containers using it there, then retry") from None
        except (NotFound, NotAllowed):
            pass  # deleted meanwhile: what was asked for
        except ControlUnreachable as e:
            raise unreachable("remove", name, e) from None
        except DeferredTimeout:
            raise no_answer("remove", name, self._request_timeout) from None
        except ControlError as e:
            raise PluginError(f"cannot remove volume {name}: the control service refused: "
                              f"{e}") from None
        self._leases.forget(dataset_id)
        self._core.overlay.removed(name, dataset_id, self._reactor.seconds())
        log_event(_log, "pyflock:plugin:removed", name=name, dataset_id=dataset_id,
                  moved_from=moved_from)
        return {}


__all__ = [
    "BadRequest", "ClusterView", "DockerPlugin", "IPluginBackend", "LEASE_DURATION",
    "LocalState", "LocalStates", "MOUNTED", "MOUNT_TIMEOUT", "NoSuchVolume", "PROFILES",
    "PluginBackend", "PluginCore", "PluginError", "PluginSocketError", "RENEW_INTERVAL",
    "SETTLE_TIMEOUT", "VOLUME_NAME",
    "agent_view_source", "check_volume_name", "is_mountpoint_in", "listen_plugin",
    "parse_create_options", "plugin_site",
]
