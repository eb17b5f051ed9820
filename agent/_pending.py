"""
New volumes the Docker plugin is creating on this node, made before the control service
has answered (issue 7, the fast path).

dockerd's Create is followed within milliseconds by a Mount that must wait until this
node has made the dataset (a spare file renamed into place, a loop device, a mount). The
plugin chooses the new dataset's id itself, sends it with the create request, and at the
same time asks the convergence loop to make that dataset here: the making overlaps the
request instead of following the push that announces it, and the first Mount finds the
dataset mounted.

``PendingCreations`` wraps the loop's ``desire(view, now)``: a dataset it holds and the
view does not know is desired mounted here as the plugin asked, until the view brings it
(the view's record then wins, as for any dataset). A creation the control service refused
(an answer with a 4xx status: the name is taken, say) is *abandoned*: desired destroyed,
so that the loop unmounts, detaches and destroys the empty volume. A creation whose
outcome is unknown (no answer: it may have been carried out) is never abandoned: the
volume stays desired here until the view says what became of it. An agent that restarts
meanwhile forgets its pending creations; a volume it made for one that never reached the
configuration is then an unknown dataset, which the loop leaves alone (docs/docker.md).

Only the block-device loop uses it; the plugin never waits for it (a Mount still waits
until the dataset is mounted, however it was made).
"""

from __future__ import annotations

from typing import Callable, Optional

import attr
from pyrsistent import pmap

from pyflock.agent._convergence import Desired, DesiredDataset

#: Seconds an abandoned creation stays desired destroyed: long enough for the loop to
#: destroy the volume (one iteration, or its retries after an error), then forgotten.
ABANDONED_FOR = 600.0


@attr.s(frozen=True, auto_attribs=True)
class PendingCreation:
    """One new dataset the plugin is creating here; ``abandoned_until`` is set once the
    control service refused it."""

    dataset_id: str
    maximum_size: Optional[int] = None
    profile: Optional[str] = None
    abandoned_until: Optional[float] = None


class PendingCreations:
    """
    The plugin's creations under way on this node, and the ``desire`` that adds them to
    the view's desired state. ``changed`` (set by the agent) is called after each change,
    to wake the convergence loop.
    """

    def __init__(self):
        self._pending: dict[str, PendingCreation] = {}
        self.changed: Callable[[], None] = lambda: None

    def __len__(self) -> int:
        return len(self._pending)

    def begin(self, dataset_id: str, maximum_size: Optional[int] = None,
              profile: Optional[str] = None) -> None:
        """The plugin is about to ask the control service for ``dataset_id``: make it."""
        self._pending[dataset_id] = PendingCreation(dataset_id, maximum_size, profile)
        self.changed()

    def abandon(self, dataset_id: str, now: float) -> None:
        """The control service refused ``dataset_id``: destroy what was made for it."""
        creation = self._pending.get(dataset_id)
        if creation is not None:
            self._pending[dataset_id] = attr.evolve(
                creation, abandoned_until=now + ABANDONED_FOR)
            self.changed()

    def desire(self, base: Callable) -> Callable:
        """``desire(view, now)``: ``base``'s desired state with the pending creations the
        view does not hold yet; a creation the view holds, or abandoned long enough ago,
        is forgotten."""
        def desire(view, now: float) -> Optional[Desired]:
            desired = base(view, now)
            if desired is None or not self._pending:
                return desired
            self._forget(lambda c: c.dataset_id in desired.datasets
                         or (c.abandoned_until is not None and c.abandoned_until <= now))
            return add_pending(desired, self._pending.values())
        return desire

    def _forget(self, done: Callable[[PendingCreation], bool]) -> None:
        for dataset_id in [i for i, c in self._pending.items() if done(c)]:
            del self._pending[dataset_id]


def add_pending(desired: Desired, creations) -> Desired:
    """``desired`` with each creation as a dataset of this node: mounted here, or
    deleted (and so destroyed here) once abandoned (pure)."""
    extra = {c.dataset_id: DesiredDataset(
        dataset_id=c.dataset_id, primary=desired.node_uuid, maximum_size=c.maximum_size,
        profile=c.profile, deleted=c.abandoned_until is not None)
        for c in creations if c.dataset_id not in desired.datasets}
    if not extra:
        return desired
    return desired.set(datasets=desired.datasets.update(pmap(extra)))


__all__ = ["ABANDONED_FOR", "PendingCreation", "PendingCreations", "add_pending"]
