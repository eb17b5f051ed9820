"""
The Docker plugin's Mount IO: ``MountRunner`` runs the actions the ``PluginCore`` decides
for each Mount (take the lease, ask for the move, wait for the agent, check and count the
mount, answer) and feeds each result back as an event; plus the small Deferred helpers
the plugin's shell shares (``within``, ``saved``, ``uncancellable``, ``fetch_by_name``).
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Callable, Hashable, Optional

from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout, maybeDeferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from pyflock.agent._lease_keeper import LeaseKeeper
from pyflock.agent._mounts import MountCounts, MountsWriteError
from pyflock.agent._plugin_core import (
    Abandon, Answer, AskMove, CheckMountpoint, Checked, CountMount, Counted, CreateDataset, Created,
    Failed, FetchByName, Fetched, HungUp, LeaseGone, LeaseRefused, LeaseTaken, Mounted,
    MoveGone, MoveRefused, Moved, NameTaken, PluginCore, Refuse, ReleaseIfIdle, SetTimer,
    TakeLease, Timer, Uncount, WaitMounted, WaitView, World,
)
from pyflock.agent._plugin_model import BadRequest, PluginError
from pyflock.common._client import Conflict, NotAllowed, NotFound
from pyflock.common._logging import log_event

_log = Logger()


class MountRunner:
    """
    Runs the Mounts of one node's plugin: ``mount(name, mount_id)`` fires with dockerd's
    answer, or fails with the refusal; cancelling it is dockerd hanging up. ``backend``
    is the ``IPluginBackend``; ``world()`` the core's current snapshot.
    """

    def __init__(self, core: PluginCore, backend: Any, leases: LeaseKeeper,
                 mounts: MountCounts, reactor: Any, world: Callable[[], World]):
        self._core = core
        self._backend = backend
        self._node = backend.node_uuid
        self._client = backend.client
        self._leases = leases
        self._mounts = mounts
        self._reactor = reactor
        self._world = world
        self._keys = itertools.count()
        # Per Mount in progress, by key: its answer and what it was, its IO still out (by
        # action type: a pipelined Mount has several), its timers.
        self._answers: dict[Hashable, tuple[Deferred, str, str, float]] = {}
        self._io: dict[Hashable, dict[type, Deferred]] = {}
        self._timers: dict[Hashable, list] = {}

    def mount(self, body: dict) -> Deferred:
        """Mount: lease, create or move here, wait until mounted, answer the path."""
        name = body["Name"]
        mount_id = body.get("ID", "")
        if not isinstance(mount_id, str):
            raise BadRequest(f'"ID" must be a string (the mount ID), not '
                             f'{json.dumps(mount_id)[:60]}')
        key = next(self._keys)
        answer: Deferred = Deferred(lambda d: self._feed(key, HungUp()))
        self._answers[key] = (answer, name, mount_id, self._reactor.seconds())
        self._run(key, self._core.mount(key, name, mount_id, self._world()))
        return answer

    def view_updated(self) -> None:
        """The agent's view changed: run what the Mounts waiting for it do next."""
        for key, actions in self._core.view_pushed(self._world()).items():
            self._run(key, actions)

    def in_progress(self) -> int:
        """How many Mounts have not answered yet."""
        return len(self._answers)

    def _feed(self, key: Hashable, event: Any) -> None:
        self._run(key, self._core.handle(key, event, self._world()))

    def _run(self, key: Hashable, actions: list) -> None:
        started: list[tuple[type, Deferred]] = []
        for action in actions:
            if isinstance(action, (Answer, Refuse)):
                self._finish(key, action)
            elif isinstance(action, SetTimer):
                self._timer(key, action.at)
            elif isinstance(action, WaitView):
                self._timer(key, action.until)
            elif isinstance(action, Uncount):
                saved(self._mounts.unmount(action.name, action.mount_id))
            elif isinstance(action, ReleaseIfIdle):
                self._leases.release_if_idle(action.dataset_id)
            elif isinstance(action, Abandon):
                out = self._io.get(key, {})
                for kind in action.actions:
                    io = out.pop(kind, None)
                    if io is not None:
                        io.cancel()
            else:
                io = self._perform(action)
                self._io.setdefault(key, {})[type(action)] = io
                started.append((type(action), io))
        # Only now hear the results (some came at once): the IO started together is all
        # registered, so a result that abandons the rest finds it.
        for kind, io in started:
            io.addCallback(self._arrived, key, kind, io)

    def _arrived(self, event: Any, key: Hashable, kind: type, io: Deferred) -> None:
        """An IO result: fed to its Mount unless that IO was abandoned or the Mount
        answered (its IO is then cancelled, and the cancellation is no event)."""
        out = self._io.get(key)
        if out is None or out.get(kind) is not io:
            return
        del out[kind]
        self._feed(key, event)

    def _timer(self, key: Hashable, at: float) -> None:
        def fire() -> None:
            attempt = self._core.attempt(key)
            dataset_id = None if attempt is None else attempt.dataset_id
            local = None if dataset_id is None else self._backend.local_state(dataset_id)
            transfer = None if dataset_id is None else self._backend.transfer(dataset_id)
            self._feed(key, Timer(at, None if local is None else local.state, transfer))
        # Fired timers go: a Mount keeps only the ones still to come.
        calls = [c for c in self._timers.get(key, []) if c.active()]
        calls.append(self._reactor.callLater(max(0.0, at - self._reactor.seconds()), fire))
        self._timers[key] = calls

    def _finish(self, key: Hashable, action: Any) -> None:
        """The Mount answered: stop its timers and IO, log, then answer dockerd."""
        for call in self._timers.pop(key, []):
            if call.active():
                call.cancel()
        for io in self._io.pop(key, {}).values():
            io.cancel()
        answer, name, mount_id, started = self._answers.pop(key)
        seconds = round(self._reactor.seconds() - started, 3)
        if isinstance(action, Answer):
            log_event(_log, "pyflock:plugin:mount", name=name, mount_id=mount_id,
                      dataset_id=action.dataset_id, path=action.path,
                      count=self._mounts.count(name), seconds=seconds)
            answer.callback({"Mountpoint": action.path})
            return
        error = action.error
        log_event(_log, "pyflock:plugin:mount-failed", LogLevel.warn, name=name,
                  mount_id=mount_id, dataset_id=action.dataset_id, seconds=seconds,
                  reason=str(error) if isinstance(error, PluginError) else repr(error))
        if not answer.called:
            answer.errback(Failure(error))

    def _perform(self, action: Any) -> Deferred:
        """Run one IO action; fires with the event it results in, never fails."""
        if isinstance(action, TakeLease):
            d = self._leases.acquire(action.dataset_id)
            return d.addCallbacks(lambda _: LeaseTaken(), _outcome, errbackArgs=(
                {Conflict: LeaseRefused, (NotFound, NotAllowed): LeaseGone},))
        if isinstance(action, AskMove):
            if action.source != self._node:
                log_event(_log, "pyflock:plugin:move-requested", dataset_id=action.dataset_id,
                          source=action.source, target=self._node)
            # Always ask: the view may lag; a move to where it already is changes nothing.
            d = self._client.move_dataset(action.dataset_id, self._node)
            return d.addCallbacks(lambda _: Moved(), _outcome, errbackArgs=(
                {Conflict: MoveRefused, (NotFound, NotAllowed): MoveGone},))
        if isinstance(action, CreateDataset):
            d = self._client.create_dataset(self._node, metadata={"name": action.name})

            def created(config: Any) -> Created:
                log_event(_log, "pyflock:plugin:recreated", LogLevel.warn, name=action.name,
                          dataset_id=config.dataset_id, node_uuid=self._node)
                return Created(config)
            return d.addCallbacks(created, _outcome, errbackArgs=({Conflict: NameTaken},))
        if isinstance(action, FetchByName):
            d = Deferred.fromCoroutine(fetch_by_name(self._client, action.name))
            return d.addCallbacks(Fetched, _outcome, errbackArgs=({},))
        if isinstance(action, WaitMounted):
            return self._backend.wait_mounted(action.dataset_id).addCallbacks(
                Mounted, _outcome, errbackArgs=({},))
        if isinstance(action, CheckMountpoint):
            d = maybeDeferred(self._backend.is_mountpoint, action.path)
            return d.addCallbacks(lambda ok: Checked(bool(ok)), _outcome,
                                  errbackArgs=({},))
        if isinstance(action, CountMount):
            if action.remount:
                change = self._mounts.remount(action.name, action.mount_id, action.dataset_id)
            else:
                change = self._mounts.mount(action.name, action.mount_id, action.dataset_id)
            # A hang-up now must not cancel the write, only our wait for it.
            return uncancellable(saved(change)).addCallbacks(
                lambda _: Counted(), _outcome, errbackArgs=({},))
        raise TypeError(f"no IO for the plugin core's action {action!r}")


def _outcome(failure: Failure, events: dict) -> Any:
    """The event of a failed IO step: ``events`` maps error types to event types (a
    ``Conflict``'s event gets the 409's ``holder``); any other error is ``Failed``."""
    for kinds, event in events.items():
        if failure.check(*(kinds if isinstance(kinds, tuple) else (kinds,))):
            if event is MoveRefused and failure.value.zones is not None:
                return MoveRefused(None, failure.value.description)
            if event in (LeaseRefused, MoveRefused):
                return event(failure.value.holder)
            return event()
    return Failed(failure.value)


def saved(d: Deferred) -> Deferred:
    """``d``, a write of the mount counts, with its failure ignored: ``MountCounts`` has
    logged it and the count in memory is right."""
    def written_or_not(failure: Failure) -> None:
        failure.trap(MountsWriteError)
    return d.addErrback(written_or_not)


def within(reactor: Any, d: Deferred, seconds: float) -> Deferred:
    """``d``, cancelled after ``seconds``; whatever it then fails with (the client turns a
    cancelled request into ``ControlUnreachable``) becomes a timeout."""
    timed_out = []

    def expire() -> None:
        timed_out.append(True)
        d.cancel()
    call = reactor.callLater(seconds, expire)

    def done(result: Any) -> Any:
        if call.active():
            call.cancel()
        if timed_out and isinstance(result, Failure):
            raise DeferredTimeout(f"no answer within {seconds:g} s")
        return result
    return d.addBoth(done)


async def fetch_by_name(client: Any, name: str) -> Optional[Any]:
    """The live dataset record called ``name`` as the control service has it now."""
    listing = await client.list_datasets()
    return next((c for c in listing.datasets if c.name == name and not c.deleted), None)


def uncancellable(d: Deferred) -> Deferred:
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


__all__ = ["MountRunner", "fetch_by_name", "saved", "uncancellable", "within"]
