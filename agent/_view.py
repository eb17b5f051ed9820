"""
The agent's view of the cluster, as the control service pushes it, and its file on disk.

``AgentView`` is an immutable value: every dataset (deleted ones until purged) with its
primary, size, metadata, lease and the nodes reporting that they hold it, and every node
with its address and liveness, at one ``version`` of one control service ``epoch``. A
snapshot replaces it; a diff applies only to the version just before it. The agent keeps
it in ``<data-path>/view.json`` and loads it at start, so that the Docker plugin can answer
from it while the control service is away.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import attr
from pyrsistent import PClass, field, pmap_field
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyflock.common._logging import log_event
from pyflock.common._records import DatasetEntry
from pyflock.common._wire import (
    BadMessage, Diff, Node, Snapshot, ViewVersion, decode, encode,
)

#: The view file's name under the agent's data path.
VIEW_FILE = "view.json"

#: The version of the view file's format.
VIEW_FORMAT = 1

_log = Logger()


class ViewOutOfStep(Exception):
    """A diff does not follow the view's version: the agent needs a snapshot."""


class ViewFileError(Exception):
    """The view file cannot be read; the message names the file and what is wrong."""


class AgentView(PClass):
    """
    The cluster as an agent sees it: datasets by id (with an index of live names) and
    nodes by uuid, at ``version`` of control service run ``epoch`` (None: no view yet).
    """

    epoch = field(type=(str, type(None)), initial=None)
    version = field(type=int, initial=0)
    datasets = pmap_field(str, DatasetEntry)
    nodes = pmap_field(str, Node)
    names = pmap_field(str, str)

    def presuming_alive(self) -> "AgentView":
        """
        This view with every node presumed alive: how to act on a view read from disk
        before the control service has said who is alive now (a node dead when the view
        was stored may be alive and hold its datasets again, so no takeover yet).
        """
        nodes = {uuid: attr.evolve(node, alive=True) for uuid, node in self.nodes.items()}
        return self.set(nodes=nodes)

    @property
    def current(self) -> Optional[ViewVersion]:
        """This view's version, or None for the empty view an agent starts from."""
        return None if self.epoch is None else ViewVersion(self.epoch, self.version)

    def dataset(self, dataset_id: str) -> Optional[DatasetEntry]:
        """The dataset with this id (deleted or not), if any."""
        return self.datasets.get(dataset_id)

    def by_name(self, name: str) -> Optional[DatasetEntry]:
        """The live (not deleted) dataset called ``name``, if any."""
        dataset_id = self.names.get(name)
        return None if dataset_id is None else self.datasets[dataset_id]

    def node(self, uuid: str) -> Optional[Node]:
        """The node with this uuid, if any."""
        return self.nodes.get(uuid)

    def live_datasets(self) -> Iterator[DatasetEntry]:
        """The datasets not deleted."""
        return (d for d in self.datasets.values() if not d.deleted)

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot) -> "AgentView":
        """The view a snapshot describes."""
        return cls(epoch=snapshot.epoch, version=snapshot.version,
                   datasets={d.dataset_id: d for d in snapshot.datasets},
                   nodes={n.uuid: n for n in snapshot.nodes},
                   names={d.name: d.dataset_id for d in snapshot.datasets
                          if not d.deleted and d.name is not None})

    def to_snapshot(self) -> Snapshot:
        """The snapshot that describes this view."""
        return Snapshot(epoch=self.epoch or "", version=self.version,
                        datasets=tuple(self.datasets.values()),
                        nodes=tuple(self.nodes.values()))

    def apply(self, message: Union[Snapshot, Diff]) -> "AgentView":
        """
        The view after ``message``: a snapshot replaces it, a diff from ``version`` to
        ``version + 1`` of the same epoch changes it; any other diff is ``ViewOutOfStep``.
        """
        if isinstance(message, Snapshot):
            return self.from_snapshot(message)
        if message.epoch != self.epoch or message.version != self.version + 1:
            raise ViewOutOfStep(
                f"a diff to version {message.version} of epoch {message.epoch} does not "
                f"follow this view (version {self.version} of epoch {self.epoch})")
        datasets = self.datasets.evolver()
        names = self.names.evolver()
        # Free every old name first, so that names swapped within one diff stay indexed.
        for dataset_id in [d.dataset_id for d in message.datasets] + list(message.removed):
            old = self.datasets.get(dataset_id)
            if old is not None and old.name is not None \
                    and self.names.get(old.name) == dataset_id:
                del names[old.name]
        for dataset_id in message.removed:
            if dataset_id in datasets:
                del datasets[dataset_id]
        for entry in message.datasets:
            datasets[entry.dataset_id] = entry
            if not entry.deleted and entry.name is not None:
                names[entry.name] = entry.dataset_id
        nodes = self.nodes.evolver()
        for node in message.nodes:
            nodes[node.uuid] = node
        return self.set(version=message.version, datasets=datasets.persistent(),
                        names=names.persistent(), nodes=nodes.persistent())


# -- the file ------------------------------------------------------------------------------


def view_to_bytes(view: AgentView) -> bytes:
    """The view file's content for ``view``."""
    body = json.loads(encode(view.to_snapshot()))
    return json.dumps({"format": VIEW_FORMAT, "view": body}, separators=(",", ":"),
                      sort_keys=True).encode("utf-8")


def view_from_bytes(content: bytes, where: str = "the view file") -> AgentView:
    """The view in a view file's content; ``ViewFileError`` saying what is wrong."""
    try:
        document = json.loads(content)
    except (ValueError, UnicodeDecodeError) as e:
        raise ViewFileError(f"{where} is not JSON: {e}") from None
    if not isinstance(document, dict) or document.get("format") != VIEW_FORMAT:
        raise ViewFileError(f"{where} is not a pyflock view file of format {VIEW_FORMAT}")
    try:
        snapshot = decode(json.dumps(document.get("view")).encode("utf-8"))
    except BadMessage as e:
        raise ViewFileError(f"{where} holds a malformed view: {e}") from None
    if not isinstance(snapshot, Snapshot):
        raise ViewFileError(f"{where} holds no view snapshot")
    if not snapshot.epoch:
        return AgentView()
    return AgentView.from_snapshot(snapshot)


def read_view(path: Union[str, Path]) -> AgentView:
    """The view stored in ``path``; the empty view if there is no such file. Blocks."""
    path = Path(path)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return AgentView()
    except OSError as e:
        raise ViewFileError(f"cannot read {path}: {e.strerror}") from None
    return view_from_bytes(content, str(path))


def write_view(path: Union[str, Path], view: AgentView) -> None:
    """
    Replace ``path`` with ``view`` atomically and durably: a crash leaves the old file or
    the new one, never a mix. Blocks.
    """
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(view_to_bytes(view))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    # The rename is durable only once the folder is.
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class ViewFile:
    """
    The agent's view file, read and written in threads (file IO blocks). Saves are
    coalesced: while one write runs, only the newest view waiting is written next, so a
    burst of pushes (lease renewals) costs at most two writes.
    """

    def __init__(self, path: Union[str, Path], reactor,
                 run_in_thread: Optional[Callable[..., Deferred]] = None):
        self.path = Path(path)
        if run_in_thread is None:
            def run_in_thread(f, *args):
                return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
        self._run = run_in_thread
        self._writing = False
        self._next: Optional[AgentView] = None
        self._next_waiters: list[Deferred] = []

    def load(self) -> Deferred:
        """
        Fires with the stored view; with the empty view if there is none, or if it cannot
        be read (logged: the control service sends a snapshot anyway).
        """
        def unreadable(failure: Failure) -> AgentView:
            failure.trap(ViewFileError)
            log_event(_log, "pyflock:agent:view-file-unreadable", path=str(self.path),
                      reason=str(failure.value))
            return AgentView()
        return maybeDeferred(self._run, read_view, self.path).addErrback(unreadable)

    def save(self, view: AgentView) -> Deferred:
        """Store ``view``; fires once it (or a newer view) is durable, or fails."""
        d: Deferred = Deferred()
        self._next = view
        self._next_waiters.append(d)
        if not self._writing:
            self._write_next()
        return d

    def _write_next(self) -> None:
        view, waiters = self._next, self._next_waiters
        self._next, self._next_waiters = None, []
        self._writing = True

        def done(result):
            self._writing = False
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(None)
            if self._next_waiters:
                self._write_next()
        maybeDeferred(self._run, write_view, self.path, view).addBoth(done)


__all__ = ["AgentView", "VIEW_FILE", "ViewFile", "ViewFileError", "ViewOutOfStep",
           "read_view", "write_view", "view_from_bytes", "view_to_bytes"]
