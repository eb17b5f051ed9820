"""
The convergence loop: discover -> calculate -> run, again and again until nothing is left
to do, woken by every view the control service pushes (a configuration change, or another
node reporting that it took or let go of a dataset) and, as a safety net, periodically.

``ConvergenceLoop`` knows nothing of backends or mounts: it is given ``discover``,
``calculate``, ``run`` and ``report_state``; ``node_convergence_loop`` wires it to the real
discovery, ``calculate_changes`` and the runner. Only one iteration runs at a time; an
update during an iteration makes one more iteration follow it. An update that asks
nothing new of this node, judged purely on what its last iteration discovered, wakes
nothing: every agent gets every push, and a rediscovery costs a snapshot of the node.
When the update comes with the diff that made it (a lease renewal, say), that judgement
looks at the diff's datasets and nodes alone (``diff_affects``), so a push costs what it
changes, not the size of the cluster.
Errors are logged and retried with exponential backoff; the loop never dies. Time comes
from the injected reactor (a ``Clock`` in tests).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from pyflock.agent._convergence import (
    CreateVolume, DestroyVolume, InParallel, calculate_changes, dataset_states,
    desired_from_view, in_parallel, is_nothing, is_waiting, leaves, summarize, view_desire,
    without,
)
from pyflock.agent._discovery import discover as discover_now
from pyflock.agent._pending import PendingCreations
from pyflock.agent._runner import (
    EXPECTED_ERRORS, ChangesFailed, Runner, StaleChange, log_failure,
)
from pyflock.agent._view import AgentView
from pyflock.common._logging import log_event
from pyflock.common._threads import RunBlocking, in_reactor_pool
from pyflock.common._wire import Diff

#: Seconds between two rediscoveries when nothing wakes the loop (DESIGN.md: a safety net).
DEFAULT_INTERVAL = 10.0

#: Seconds between two rediscoveries while waiting for another node to let go of a volume
#: this node needs. A safety net too: the push of that node's report that it no longer
#: holds the dataset (its ``holders`` in the view) wakes the loop at once.
DEFAULT_POLL_INTERVAL = 1.0

#: The first retry delay after an error, doubled after each further error...
DEFAULT_BACKOFF = 1.0

#: ... up to this.
DEFAULT_MAX_BACKOFF = 60.0

#: Steps (discover, calculate, run) one iteration may take before it counts as stuck:
#: a dataset needs about six, so only a change that never takes effect gets there.
DEFAULT_MAX_STEPS = 100


class ConvergenceStalled(Exception):
    """An iteration ran its maximum number of steps and still had changes to make."""

    def __init__(self, steps: int, change):
        super().__init__(steps, change)
        self.steps = steps
        self.change = change

    def __str__(self) -> str:
        return (f"still changing after {self.steps} steps (last: {summarize(self.change)}); "
                f"a change keeps succeeding without taking effect")


def _as_given(desired, now: float):
    return desired


def _parts(change) -> tuple:
    """The parts of a step that may run apart: a parallel group's members."""
    return change.changes if isinstance(change, InParallel) else (change,)


class _Background:
    """
    The changes of one iteration left running while it goes on, with the datasets they
    touch; their failures are kept for the iteration to collect (``harvest``), and
    ``ended`` counts those that ended.
    """

    def __init__(self):
        self.running: dict = {}
        self.ended = 0
        self._failures: list = []
        self._waiters: list[Deferred] = []

    def start(self, run: Callable[[object], Deferred], change) -> None:
        """Run ``change`` with ``run`` without waiting for it."""
        d = maybeDeferred(run, change)
        self.running[d] = frozenset(leaf.dataset_id for leaf in leaves(change))
        d.addBoth(self._done, d, change)

    def _done(self, result, d: Deferred, change) -> None:
        del self.running[d]
        self.ended += 1
        if isinstance(result, Failure):
            self._failures.append((result, change))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def dataset_ids(self) -> frozenset:
        """The datasets that changes under way touch."""
        return frozenset().union(*self.running.values())

    def harvest(self) -> list:
        """The (failure, change) of the changes that failed since last asked."""
        failures, self._failures = self._failures, []
        return failures

    def next_done(self, after: int = -1) -> Deferred:
        """Fires once more than ``after`` changes have ended (by default: at the next
        end), at once if that is so or none is under way."""
        if not self.running or (after >= 0 and self.ended > after):
            return succeed(None)
        d: Deferred = Deferred()
        self._waiters.append(d)
        return d

    async def all_done(self) -> None:
        """Wait until no change is under way."""
        while self.running:
            await self.next_done()


def _expected(failure: Failure) -> bool:
    if failure.check(ChangesFailed):
        return all(_expected(f) for f in failure.value.failures)
    return failure.check(StaleChange, *EXPECTED_ERRORS) is not None


class ConvergenceLoop:
    """
    Converges one node.

    - ``discover()`` returns a Deferred of what the node has (``Discovered``);
    - ``calculate(desired, discovered)`` returns the next change (pure);
    - ``run(change)`` runs it and returns a Deferred;
    - ``report_state(states)`` is called with ``describe(desired, discovered)`` whenever
      that changes (a ``pmap`` of ``DatasetReport`` by default); it may return a Deferred;
    - ``desire(view, now)`` turns the latest ``update``'s argument into the ``desired``
      that ``calculate`` takes, at the reactor's ``now`` (by default the argument is used
      as it is); while it returns None (no view yet) nothing is done;
    - ``waiting(desired, discovered)`` says whether the node waits for another node (the
      loop then looks again after ``poll_interval`` rather than ``interval``, in case the
      update announcing that the other node let go is lost);
    - ``affects(desired, change, now)`` (optional) says whether ``change``, the diff an
      update came with, may change ``desired``: False spares computing the whole desired
      state (see ``diff_affects``);
    - ``after_iteration()`` (optional) is called whenever an iteration ends, so that
      work that must stay off the loop's path (making spare volumes) may follow it, and
      ``on_stop()`` (optional) by ``stop()``, so that such work ends with the loop;
    - ``background(leaf)`` (optional) says whether a leaf change may run while the loop
      goes on: a part of a step (a member of its parallel group: one dataset's changes)
      holding such a leaf is started and not waited for, and its datasets are left out of
      the steps that follow until it ends (its end wakes the iteration), so that the other
      datasets' steps never wait behind it.

    Nothing runs before ``start()`` and the first ``update(view)``. An update wakes the
    loop unless, after a clean iteration, the new desired state asks nothing new of what
    that iteration last discovered: while waiting, unless the desired state changed at
    all; otherwise, unless ``calculate`` gives nothing to do and ``describe`` the same
    states as reported. ``wake()``, the timers and errors always iterate.
    """

    def __init__(self, reactor, discover: Callable[[], Deferred],
                 calculate: Callable, run: Callable[[object], Deferred],
                 report_state: Callable, desire: Callable = _as_given,
                 describe: Callable = dataset_states, waiting: Callable = is_waiting,
                 interval: float = DEFAULT_INTERVAL,
                 poll_interval: float = DEFAULT_POLL_INTERVAL,
                 backoff: float = DEFAULT_BACKOFF,
                 max_backoff: float = DEFAULT_MAX_BACKOFF,
                 max_steps: int = DEFAULT_MAX_STEPS, logger: Optional[Logger] = None,
                 node_uuid: Optional[str] = None, affects: Optional[Callable] = None,
                 background: Optional[Callable] = None,
                 after_iteration: Optional[Callable[[], None]] = None,
                 on_stop: Optional[Callable[[], None]] = None):
        self._reactor = reactor
        self._discover = discover
        self._calculate = calculate
        self._run = run
        self._report_state = report_state
        self._desire = desire
        self._describe = describe
        self._waiting = waiting
        self._affects = affects
        self._background = background
        self._after_iteration = after_iteration
        self._on_stop = on_stop
        self.interval = interval
        self.poll_interval = poll_interval
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_steps = max_steps
        self._log = logger if logger is not None else Logger()
        self._node_uuid = node_uuid
        self._view = None
        self._has_view = False
        self._started = False
        self._stopped = False
        self._busy = False
        self._again = False
        self._updated = False
        # (desired, discovered) where the last clean iteration ended; None after errors.
        self._settled = None
        self._timer = None
        self._idle_waiters: list[Deferred] = []
        self._reported = None
        self._waits = False
        #: Errors in a row; the next retry waits ``backoff * 2 ** (failures - 1)``.
        self.failures = 0

    @property
    def busy(self) -> bool:
        """Whether an iteration is running."""
        return self._busy

    @property
    def next_wake(self) -> Optional[float]:
        """When the loop wakes by itself next (reactor seconds), if it is waiting."""
        return None if self._timer is None else self._timer.getTime()

    def start(self) -> None:
        """Start converging (at once if a view was given, else at the first update)."""
        self._started = True
        self.wake()

    def update(self, view, change=None) -> None:
        """
        A new view (the channel calls this on every push), with the diff that made it
        from the view before if known: converge now, unless it asks nothing new of this
        node (see the class docstring).
        """
        self._view = view
        self._has_view = True
        if self._stopped or not self._started:
            return
        if self._busy:
            self._updated = True
            return
        if not self._asks_nothing_new(change):
            self.wake()

    def _asks_nothing_new(self, change=None) -> bool:
        """
        Whether the latest view asks nothing new of this node, judged (purely) on where
        its last clean iteration ended: on ``change`` alone when given and ``affects``
        can tell.
        """
        if self._settled is None or self.failures or self._reported is None:
            return False
        desired_then, discovered = self._settled
        try:
            now = self._reactor.seconds()
            if (change is not None and self._affects is not None
                    and not self._affects(desired_then, change, now)):
                return True
            desired = self._desire(self._view, now)
            if desired is None or desired == desired_then:
                return True
            if self._waits:
                # Another node letting go shows only as a change of the desired state.
                return False
            if (self._describe(desired, discovered) == self._reported
                    and is_nothing(self._calculate(desired, discovered))):
                # Where the loop rests now, so that later diffs are judged against it.
                self._settled = (desired, discovered)
                return True
            return False
        except Exception:
            return False

    def wake(self) -> None:
        """Iterate now, or right after the iteration under way."""
        if self._stopped or not self._started:
            return
        if self._busy:
            self._again = True
            return
        self._cancel_timer()
        self._busy = True
        ensureDeferred(self._iterate())

    def stop(self) -> Deferred:
        """Stop waking; the Deferred fires once the iteration under way (if any) ends."""
        self._stopped = True
        self._cancel_timer()
        if self._on_stop is not None:
            self._on_stop()
        if not self._busy:
            return succeed(None)
        d = Deferred()
        self._idle_waiters.append(d)
        return d

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, delay: float) -> None:
        if self._stopped:
            return
        self._cancel_timer()
        self._timer = self._reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.wake()

    def _go_again(self, failure) -> bool:
        """Whether to iterate again at once, after an iteration that ended with ``failure``."""
        if self._stopped:
            return False
        if self._again or (self._updated and failure is not None):
            return True
        return self._updated and not self._asks_nothing_new()

    async def _iterate(self) -> None:
        try:
            while True:
                self._again = False
                self._updated = False
                try:
                    failure = await self._converge()
                except Exception:
                    failure = Failure()
                if failure is not None:
                    self.failures += 1
                    delay = min(self.max_backoff,
                                self.backoff * 2 ** (self.failures - 1))
                    self._log_failure(failure, delay)
                    if self._go_again(failure):
                        continue
                    self._schedule(delay)
                    return
                self.failures = 0
                if self._go_again(None):
                    continue
                self._schedule(self.poll_interval if self._waits else self.interval)
                return
        finally:
            self._busy = False
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)
            if self._after_iteration is not None and not self._stopped:
                try:
                    self._after_iteration()
                except Exception:
                    log_failure(self._log, "pyflock:agent:after-iteration-failed",
                                Failure(), node_uuid=self._node_uuid)

    async def _converge(self) -> Optional[Failure]:
        """
        Steps until nothing is left to do; the last failure of a change, if any. A failed
        step does not stop the others: its leaves are left out of the following steps
        (they wait for the backoff), so one stuck dataset never slows the rest down. The
        iteration ends once the changes left running in the background are done too.
        """
        background = _Background()
        try:
            failure = await self._steps(background)
        finally:
            await background.all_done()
        later = background.harvest()
        return later[-1][0] if later else failure

    async def _steps(self, background: "_Background") -> Optional[Failure]:
        ran = 0
        waited = 0
        self._waits = False
        self._settled = None
        change = None
        failure = None
        skipped: set = set()

        def harvest() -> None:
            nonlocal failure
            for failed, part in background.harvest():
                failure = failed
                skipped.update(leaves(part))
        # A background change's end wakes the iteration: each may bring one more step,
        # up to ``max_steps`` more, so a burst of them does not count as being stuck.
        while ran < self.max_steps + min(waited, self.max_steps):
            if self._stopped or not self._has_view:
                return failure
            desired = self._desire(self._view, self._reactor.seconds())
            if desired is None:
                return failure
            # A dataset whose background change ran at any time during the discovery may
            # have been seen half changed: it waits for the next one.
            busy, ended = background.dataset_ids(), background.ended
            discovered = await self._discover()
            harvest()
            busy |= background.dataset_ids()
            change = self._calculate(desired, discovered)
            change = without(change, skipped | {c for c in leaves(change)
                                                if c.dataset_id in busy})
            self._report(desired, discovered)
            if is_nothing(change) and (background.running or background.ended != ended):
                await background.next_done(after=ended)
                waited += 1
                harvest()
                continue
            if is_nothing(change):
                self._waits = bool(self._waiting(desired, discovered))
                if failure is None:
                    self._settled = (desired, discovered)
                if ran and failure is None:
                    log_event(self._log, "pyflock:agent:converged", node_uuid=self._node_uuid,
                              steps=ran)
                return failure
            ran += 1
            log_event(self._log, "pyflock:agent:converge", node_uuid=self._node_uuid,
                      step=ran, changes=summarize(change),
                      dataset_ids=",".join(sorted({c.dataset_id for c in leaves(change)})))
            foreground = in_parallel(part for part in _parts(change)
                                     if not self._in_background(background, part))
            if is_nothing(foreground):
                await background.next_done(after=ended)
                waited += 1
            else:
                try:
                    await self._run(foreground)
                except Exception:
                    failure = Failure()
                    skipped.update(leaves(foreground))
            harvest()
        raise ConvergenceStalled(ran, change)

    def _in_background(self, background: "_Background", part) -> bool:
        """Start ``part`` in the background if it holds a leaf for it; whether it did."""
        if self._background is None or not any(map(self._background, leaves(part))):
            return False
        background.start(self._run, part)
        return True

    def _report(self, desired, discovered) -> None:
        try:
            states = self._describe(desired, discovered)
            if states == self._reported:
                return
            result = self._report_state(states)
        except Exception:
            log_failure(self._log, "pyflock:agent:report-failed", Failure(),
                        node_uuid=self._node_uuid)
            return
        self._reported = states
        if isinstance(result, Deferred):
            def failed(failure: Failure) -> None:
                # Not reported after all: try again at the next discovery.
                self._reported = None
                log_failure(self._log, "pyflock:agent:report-failed", failure,
                            node_uuid=self._node_uuid)
            result.addErrback(failed)

    def _log_failure(self, failure: Failure, delay: float) -> None:
        fields = dict(node_uuid=self._node_uuid, error=failure.getErrorMessage(),
                      error_type=failure.type.__name__, failures=self.failures,
                      retry_in=delay)
        if _expected(failure):
            log_event(self._log, "pyflock:agent:converge-failed", LogLevel.warn, **fields)
        else:
            log_failure(self._log, "pyflock:agent:converge-failed", failure, **fields)


def node_convergence_loop(reactor, backend, filesystems, mount_root: str,
                          report_state: Callable, desire: Optional[Callable] = None,
                          interval: float = DEFAULT_INTERVAL,
                          logger: Optional[Logger] = None,
                          run_blocking: Optional[RunBlocking] = None,
                          slow: Optional[RunBlocking] = None,
                          on_mounted: Optional[Callable[[str, str], None]] = None,
                          pending: Optional[PendingCreations] = None
                          ) -> ConvergenceLoop:
    """
    The loop of one agent: discovery through ``backend`` (its ``IBlockDeviceBackend``) and
    ``filesystems`` (``LocalFilesystems()`` in the agent) under ``mount_root``,
    ``calculate_changes``, and a ``Runner``; discovery and the quick steps run with
    ``run_blocking`` (default: in the reactor's thread pool), the slow ones (the
    runner's ``SLOW_CHANGES``) with ``slow`` (default: ``run_blocking``). ``desire(view, now)`` builds ``Desired`` from what is
    passed to ``update`` (default: ``view_desire(backend.node_uuid)``, for ``AgentView``s).
    Call ``start()``, then ``update(view)`` with the view loaded from disk and on every
    push; ``report_state`` gets a ``pmap`` of ``DatasetReport`` by dataset id, and
    ``on_mounted`` the ``Runner``'s word of each mount done. ``pending``: the Docker
    plugin's creations under way, made before the view brings them (they wake the loop).
    """
    view_desired = desire is None
    if desire is None:
        desire = view_desire(backend.node_uuid)
    if pending is not None:
        desire = pending.desire(desire)
    mount_root = os.path.realpath(mount_root)
    if run_blocking is None:
        run_blocking = in_reactor_pool(reactor)
    runner = Runner(backend, filesystems, run_blocking, logger=logger, slow=slow,
                    on_mounted=on_mounted)

    def discover() -> Deferred:
        return run_blocking(discover_now, backend, filesystems, mount_root)

    run = runner.run
    spares = None
    if callable(getattr(backend, "make_spares", None)):
        spares = SpareKeeper(reactor, backend.make_spares,
                             run_blocking if slow is None else slow,
                             logger=logger, node_uuid=backend.node_uuid)
        run = spares.watching(runner.run)
    loop = ConvergenceLoop(reactor, discover, calculate_changes, run, report_state,
                           desire=desire, interval=interval, logger=logger,
                           node_uuid=backend.node_uuid,
                           affects=diff_affects(backend.node_uuid) if view_desired else None,
                           background=runs_apart,
                           after_iteration=None if spares is None else spares.top_up,
                           on_stop=None if spares is None else spares.stop)
    if pending is not None:
        pending.changed = loop.wake
    return loop


#: Seconds between the end of the iteration that created a volume (or the agent's start)
#: and the making of spares: by then the container that asked for the volume has
#: started, so mkfs and its disk writes do not slow it down.
SPARE_DELAY = 1.0


class SpareKeeper:
    """
    Keeps a backend's spare volumes (``make_spares()``, blocking, run with ``run``: the
    bulk pool) topped up off the request path: ``delay`` seconds after the agent starts,
    and after every loop iteration in which a volume was created (and so may have taken a
    spare), never two at a time. A failure is logged and tried again after the next
    iteration.
    """

    def __init__(self, reactor, make_spares: Callable[[], object], run: RunBlocking,
                 logger: Optional[Logger] = None, node_uuid: Optional[str] = None,
                 delay: float = SPARE_DELAY):
        self._reactor = reactor
        self._make_spares = make_spares
        self._run = run
        self._log = logger if logger is not None else Logger()
        self._node_uuid = node_uuid
        self.delay = delay
        self.wanted = True
        self.running = False
        self._timer = None

    def watching(self, run: Callable[[object], Deferred]) -> Callable[[object], Deferred]:
        """``run``, noting every change that creates a volume (spares are then wanted)."""
        def watched(change) -> Deferred:
            if any(isinstance(leaf, CreateVolume) for leaf in leaves(change)):
                self.wanted = True
            return run(change)
        return watched

    def top_up(self) -> None:
        """Make spares ``delay`` seconds from now, if some may be missing and none are
        being made or about to be."""
        if self.wanted and not self.running and self._timer is None:
            self._timer = self._reactor.callLater(self.delay, self._start)

    def stop(self) -> None:
        """Make no more spares (what is being made is finished)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.wanted = False

    def _start(self) -> None:
        self._timer = None
        self.wanted, self.running = False, True
        d = self._run(self._make_spares)
        d.addCallbacks(self._made, self._failed)

    def _made(self, made) -> None:
        self.running = False
        if made:
            log_event(self._log, "pyflock:agent:spares-made", node_uuid=self._node_uuid,
                      count=made)
        self.top_up()

    def _failed(self, failure: Failure) -> None:
        self.running, self.wanted = False, True
        log_event(self._log, "pyflock:agent:spares-failed", LogLevel.warn,
                  node_uuid=self._node_uuid, error=failure.getErrorMessage(),
                  error_type=failure.type.__name__)


#: The changes that run while the loop goes on (``ConvergenceLoop``'s ``background``): a
#: volume's creation or destruction, which may take long (a cloud volume) and touch no
#: device of this node, so that a move or a mount never waits behind a burst of them.
BACKGROUND_CHANGES = (CreateVolume, DestroyVolume)


def runs_apart(leaf) -> bool:
    """Whether ``leaf`` runs while the loop goes on (``BACKGROUND_CHANGES``)."""
    return isinstance(leaf, BACKGROUND_CHANGES)


def diff_affects(node_uuid: str) -> Callable:
    """
    The ``affects(desired, change, now)`` of ``node_uuid``'s loop over ``AgentView``s
    (pure): whether ``change`` may make the desired state differ from ``desired``. A
    ``Diff`` is judged on its own datasets and nodes, at the cost of their number: each
    changed dataset must come out as the same ``DesiredDataset`` (a renewal of a live lease
    does), each node with the same alive flag, and no removed dataset may be in
    ``desired``. Anything else (a snapshot) may.
    """
    def affects(desired, change, now: float) -> bool:
        if not isinstance(change, Diff):
            return True
        if any(dataset_id in desired.datasets for dataset_id in change.removed):
            return True
        partial = desired_from_view(node_uuid, AgentView(
            epoch=change.epoch, version=change.version,
            datasets={d.dataset_id: d for d in change.datasets},
            nodes={n.uuid: n for n in change.nodes}), now)
        return (any(desired.datasets.get(i) != d for i, d in partial.datasets.items())
                or any(desired.nodes.get(u) != alive for u, alive in partial.nodes.items()))
    return affects
