"""
What the Docker plugin needs of the agent (``IPluginBackend``): this node's uuid, a
control-service client with the node's certificate, the agent's view of the cluster, the
datasets' states here as the convergence loop reports them (``LocalStates``, whose
``wait_mounted`` fires on a report, no polling), and a check that a path is mounted.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import attr
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from zope.interface import Attribute, Interface, implementer

from pyflock.agent._plugin_model import MOUNTED, ClusterView, LocalState
from pyflock.common._records import Transfer


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
            self.mounted_now(dataset_id, path)

    def report_all(self, states: Mapping[str, Any]) -> None:
        """
        Record a whole report: ``states`` maps every dataset this node has anything to do
        with to a status with ``state`` and ``path`` (the convergence loop's
        ``DatasetReport``); datasets left out are no longer here.
        """
        for dataset_id in [i for i in self._states if i not in states]:
            self.report_state(dataset_id, None)
        for dataset_id, status in states.items():
            self.report_state(dataset_id, status.state, status.path)

    def mounted_now(self, dataset_id: str, path: str) -> None:
        """The agent has just mounted ``dataset_id`` at ``path``: wake the Mounts waiting
        for it (each checks the mount point before it answers) without waiting for the
        discovery that will report it; the recorded state stays the reported one."""
        for d in self._waiters.pop(dataset_id, []):
            d.callback(path)

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

    def transfer(dataset_id) -> Optional[Transfer]:
        """The move of the dataset into this node under way (a ``Transfer``), if any."""

    def is_mountpoint(path) -> Deferred:
        """Fires with whether a filesystem is really mounted at ``path``."""


@implementer(IPluginBackend)
@attr.s(auto_attribs=True)
class PluginBackend:
    """
    The plugin's backend from its parts: ``view`` returns the current ``ClusterView``;
    ``states`` is fed by the convergence loop (``states.report_state``); ``is_mountpoint``
    checks a path (``is_mountpoint_in`` in the agent); ``transfers(dataset_id)`` gives
    the move into this node under way (``PeerReceiver.progress``; none off a
    peer-to-peer backend).
    """

    node_uuid: str
    client: Any
    view_of: Callable[[], ClusterView]
    states: LocalStates
    mountpoint_check: Callable[[str], Deferred]
    transfers: Callable[[str], Optional[Transfer]] = lambda dataset_id: None

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

    def transfer(self, dataset_id: str) -> Optional[Transfer]:
        """The move of ``dataset_id`` into this node under way, if any."""
        return self.transfers(dataset_id)


def agent_view_source(current: Callable[[], Any]) -> Callable[[], ClusterView]:
    """
    A ``view`` callable for ``PluginBackend`` from ``current()``, which returns the agent's
    latest ``AgentView``: each new view is converted once, when the plugin first reads it.
    """
    cache: list = [None, ClusterView()]

    def view() -> ClusterView:
        latest = current()
        if latest is not cache[0]:
            cache[:] = [latest, ClusterView.from_agent_view(latest)]
        return cache[1]
    return view


def is_mountpoint_in(run_blocking: Callable[..., Deferred]) -> Callable[[str], Deferred]:
    """An ``is_mountpoint`` reading this process's mount table through ``run_blocking``
    (the agent's pool for plugin IO)."""
    from pyflock.agent._fs import is_mounted

    def check(path: str) -> Deferred:
        return run_blocking(is_mounted, path)
    return check


__all__ = ["IPluginBackend", "LocalStates", "PluginBackend", "agent_view_source",
           "is_mountpoint_in"]
