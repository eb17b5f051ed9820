"""
An agent's convergence on a peer-to-peer backend (btrfs; ``MemoryPeerBackend`` in tests):
discovery of its copies, a runner for the peer rows' changes, the peer transfer service,
and the loop that joins them.

``pyflock-agent`` runs it when its backend is a peer-to-peer one: see ``run`` and
``start_peer_transfers`` in ``pyflock.agent._script``.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import attr
from pyrsistent import pmap
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

from pyflock.agent._backends._interface import UnknownVolume
from pyflock.agent._backends._peer import IPeerBackend
from pyflock.agent._convergence import (
    CreateDataset, DemoteDataset, Discovered, DiscoveredDataset, DestroyDataset,
    MountFilesystem, PeerState, ReceiveDataset, RemoveMountPoint, ThawDataset,
    UnmountFilesystem, calculate_peer_changes, peer_dataset_states,
)
from pyflock.agent._loop import ConvergenceLoop
from pyflock.agent._peer_move import MovePolicy
from pyflock.agent._peer_receive import PeerReceiver
from pyflock.agent._peer_service import (
    PeerTransferService, Slots, TransferSettings, move_view,
)
from pyflock.agent._runner import Runner, log_failure
from pyflock.agent._convergence import view_desire
from pyflock.common._logging import log_event
from pyflock.common._threads import RunBlocking, in_reactor_pool
from pyflock.common._tls import ClusterTLS

#: The peer port when a node's record has none.
DEFAULT_PEER_PORT = 4525

#: Seconds between two reports of a sending node's progress while a transfer runs.
PROGRESS_INTERVAL = 0.5


def classify_copies(node_uuid: str, mount_root: str, copies, mounted: frozenset,
                    empty_directories: frozenset) -> Discovered:
    """
    What this node finds of its copies (pure): ``copies`` its ``PeerDataset``s,
    ``mounted`` the names under ``mount_root`` something is mounted at, and
    ``empty_directories`` the empty folders there.
    """
    datasets = {}
    for copy in copies:
        path = os.path.join(mount_root, copy.dataset_id)
        if not copy.complete:
            state = PeerState.PARTIAL
        elif copy.dataset_id in mounted:
            state = PeerState.MOUNTED
        else:
            state = PeerState.UNMOUNTED
        datasets[copy.dataset_id] = DiscoveredDataset(
            dataset_id=copy.dataset_id, state=state, mount_point=path, size=copy.size,
            device=copy.path, snapshot=copy.latest, frozen=copy.frozen,
            mount_point_left=copy.dataset_id in empty_directories)
    for name in mounted - set(datasets):
        datasets[name] = DiscoveredDataset(dataset_id=name, state=PeerState.STRAY_MOUNT,
                                           mount_point=os.path.join(mount_root, name))
    return Discovered(node_uuid=node_uuid, mount_root=mount_root, datasets=pmap(datasets))


def discover_copies(backend: IPeerBackend, filesystems, mount_root: str) -> Discovered:
    """What this node finds now (blocking): its copies, and what is mounted where."""
    mounted = frozenset(os.path.basename(m.mount_point)
                        for m in filesystems.mounts(mount_root))
    return classify_copies(backend.node_uuid, mount_root, backend.list_datasets(), mounted,
                           frozenset(filesystems.empty_directories(mount_root)))


def with_transfers(reports, progress: dict):
    """This node's reports with the progress of each dataset it is moving away (pure)."""
    return pmap({dataset_id: (attr.evolve(report, transfer=progress[dataset_id])
                              if dataset_id in progress and report.state == "moving"
                              else report)
                 for dataset_id, report in reports.items()})


class ProgressReports:
    """
    A peer-to-peer node's ``report_state`` with its sends' progress at a steady rate:
    every ``interval`` seconds while ``progress`` (the sender's, by dataset id) holds a
    transfer, the loop's last reports are reported again with the fresh progress if it
    changed, so that ``transfer`` in ``/v1/state/datasets`` moves on while the loop waits
    (it iterates only on a view change, a move's end or its timer).
    """

    def __init__(self, clock, report_state: Callable, progress: dict,
                 interval: float = PROGRESS_INTERVAL, logger: Optional[Logger] = None):
        self._report_state = report_state
        self._progress = progress
        self._log = logger if logger is not None else Logger()
        self._last = None
        self._sent = None
        self._ticker = LoopingCall(self.tick)
        self._ticker.clock = clock
        self._interval = interval
        self._stopped = False

    def report(self, reports):
        """The loop's ``report_state``: report ``reports``; the ticks start with the first."""
        self._last = self._sent = reports
        if not self._ticker.running and not self._stopped:
            self._ticker.start(self._interval, now=False)
        return self._report_state(reports)

    def tick(self) -> None:
        """Report the last reports again with the current progress, if it changed."""
        if self._last is None or not self._progress:
            return
        fresh = with_transfers(self._last, self._progress)
        if fresh == self._sent:
            return
        self._sent = fresh
        maybeDeferred(self._report_state, fresh).addErrback(
            lambda failure: log_failure(self._log, "pyflock:agent:report-failed", failure))

    def stop(self) -> None:
        """No more ticks (the loop stops)."""
        self._stopped = True
        if self._ticker.running:
            self._ticker.stop()


class PeerTransfers:
    """
    This node's peer transfer service, both sides: the sender listening on the peer
    port, and the receiver the runner makes moves with. ``current_view()`` gives the
    agent's current ``AgentView``: both sides judge moves by it.
    """

    def __init__(self, reactor, backend: IPeerBackend, tls: ClusterTLS, *,
                 current_view: Callable, settings: TransferSettings = TransferSettings(),
                 policy: MovePolicy = MovePolicy(),
                 run_blocking: Optional[RunBlocking] = None):
        run_blocking = run_blocking or in_reactor_pool(reactor)
        self._reactor = reactor
        self._tls = tls
        self._current_view = current_view
        self.slots = Slots(settings.max_transfers)
        self.service = PeerTransferService(
            reactor, backend, tls, view_of=self.view_of, settings=settings,
            slots=self.slots)
        # Before the reactor stops its threads: they may wait for the reactor (a stream
        # paced by the network), which would then wait for them forever.
        if hasattr(reactor, "addSystemEventTrigger"):
            reactor.addSystemEventTrigger("before", "shutdown", self.stop)
        self.receiver = PeerReceiver(
            reactor, backend, tls, view_of=self.view_of, address_of=self.address_of,
            run_blocking=run_blocking, slots=self.slots, policy=policy,
            idle_timeout=settings.idle_timeout)

    def view_of(self, dataset_id: str):
        """The ``MoveView`` of ``dataset_id`` in the current view."""
        return move_view(self._current_view(), dataset_id)

    def address_of(self, node_uuid: str) -> Optional[tuple]:
        """Where node ``node_uuid``'s peer port is, by the current view."""
        view = self._current_view()
        node = view.node(node_uuid) if view is not None else None
        if node is None:
            return None
        return node.host, node.peer_port or DEFAULT_PEER_PORT

    def stop(self) -> Deferred:
        """End every transfer under way, both sides (see ``PeerTransferService.stop``)."""
        return DeferredList([self.service.stop(), self.receiver.stop()],
                            consumeErrors=True)

    def listen(self, address: str, port) -> Deferred:
        """
        Listen on ``address:port`` (``node.address`` and ``node.peer-port``); a Deferred
        of the listening port (``PeerPort``). Only an agent with a peer-to-peer backend
        calls this.
        """
        return maybeDeferred(self.service.listen, address, int(port))


class PeerRunner(Runner):
    """
    Runs the peer rows' changes on one node: ``backend`` its ``IPeerBackend``,
    ``filesystems`` its ``IFilesystems`` (mounting a copy's folder), ``transfers`` its
    ``PeerTransfers``. A ``ReceiveDataset`` starts a move in the background (the
    convergence loop's ``background``) and ends when the move does. ``on_mounted`` hears
    of each mount done, as ``Runner``'s.
    """

    def __init__(self, backend, filesystems, run_blocking: RunBlocking,
                 transfers: PeerTransfers, logger: Optional[Logger] = None,
                 on_mounted: Optional[Callable[[str, str], None]] = None):
        super().__init__(backend, filesystems, run_blocking, logger=logger,
                         on_mounted=on_mounted)
        self._transfers = transfers
        self._leaves = {
            CreateDataset: self._create_dataset,
            DestroyDataset: self._destroy_dataset,
            DemoteDataset: self._demote_dataset,
            ThawDataset: lambda change: backend.thaw_dataset(change.dataset_id),
            MountFilesystem: self._mount_copy,
            UnmountFilesystem: self._unmount,
            RemoveMountPoint: self._remove_mount_point,
        }
        self._moves: dict = {}

    def run(self, change) -> Deferred:
        """Run ``change``; a ``ReceiveDataset`` is a whole move."""
        if isinstance(change, ReceiveDataset):
            return self._receive(change)
        return super().run(change)

    def _receive(self, change: ReceiveDataset) -> Deferred:
        if change.dataset_id in self._moves:
            return succeed(None)        # under way: its end wakes the loop
        d = self._transfers.receiver.receive(change.dataset_id, change.from_node)
        self._moves[change.dataset_id] = d

        def ended(result):
            del self._moves[change.dataset_id]
            return result

        def moved(state):
            log_event(self._log, "pyflock:peer:move-received", LogLevel.info,
                      dataset_id=state.dataset_id, from_node=state.from_node,
                      rounds=state.rounds, bytes_received=state.bytes_received)

        d.addBoth(ended)
        d.addCallbacks(moved, self._failed, errbackArgs=(change,))
        return d

    # Each of these runs in a thread.

    def _create_dataset(self, change: CreateDataset) -> None:
        self.backend.create_dataset(change.dataset_id, change.size)

    def _destroy_dataset(self, change: DestroyDataset) -> None:
        try:
            self.backend.destroy_dataset(change.dataset_id)
        except UnknownVolume:
            pass                        # destroyed by an earlier attempt

    def _demote_dataset(self, change: DemoteDataset) -> None:
        self.backend.demote_dataset(change.dataset_id)
        self.backend.prune_snapshots(change.dataset_id,
                                     [change.keep] if change.keep else [])

    def _mount_copy(self, change: MountFilesystem) -> None:
        self.filesystems.mount(change.device, change.mount_point)


def peer_convergence_loop(reactor, backend: IPeerBackend, filesystems, mount_root: str,
                          report_state: Callable, transfers: PeerTransfers,
                          logger: Optional[Logger] = None,
                          run_blocking: Optional[RunBlocking] = None,
                          on_mounted: Optional[Callable[[str, str], None]] = None,
                          progress_interval: float = PROGRESS_INTERVAL,
                          **options) -> ConvergenceLoop:
    """
    The convergence loop of an agent on a peer-to-peer backend: ``discover_copies``,
    ``calculate_peer_changes``, a ``PeerRunner`` (moves in the background; ``on_mounted``
    hears of each mount), and reports with each sent dataset's progress, again every
    ``progress_interval`` seconds while one is sent (``ProgressReports``). ``options`` go
    to ``ConvergenceLoop``.
    """
    mount_root = os.path.realpath(mount_root)
    run_blocking = run_blocking or in_reactor_pool(reactor)
    runner = PeerRunner(backend, filesystems, run_blocking, transfers, logger=logger,
                        on_mounted=on_mounted)

    def discover() -> Deferred:
        return run_blocking(discover_copies, backend, filesystems, mount_root)

    def describe(desired, discovered):
        return with_transfers(peer_dataset_states(desired, discovered),
                              transfers.service.progress)

    reports = ProgressReports(reactor, report_state, transfers.service.progress,
                              progress_interval, logger=logger)
    loop = ConvergenceLoop(reactor, discover, calculate_peer_changes, runner.run,
                           reports.report, desire=view_desire(backend.node_uuid),
                           describe=describe, logger=logger, node_uuid=backend.node_uuid,
                           background=lambda leaf: isinstance(leaf, ReceiveDataset),
                           on_stop=reports.stop, **options)
    # A move sent to its end froze the copy outside the loop: look again now, so that
    # the copy is unmounted as soon as the new node reports it has the dataset.
    transfers.service.on_sent = lambda dataset_id: loop.wake()
    return loop


__all__ = [
    "DEFAULT_PEER_PORT", "PROGRESS_INTERVAL", "PeerRunner", "PeerTransfers",
    "ProgressReports", "classify_copies",
    "discover_copies", "peer_convergence_loop", "with_transfers",
]
