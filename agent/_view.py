"""
The agent's view of the cluster, as the control service pushes it, and its file on disk.

``AgentView`` is an immutable value: every dataset (deleted ones until purged) with its
primary, size, metadata, lease and the nodes reporting that they hold it, and every node
with its address and liveness, at one ``version`` of one control service ``epoch``. A
snapshot replaces it; a diff applies only to the version just before it. The agent keeps
it in ``<data-path>/view.json`` (a base and the diffs since, as JSON lines, so that a push
costs what it changes) and loads it at start, so that the Docker plugin can answer from it
while the control service is away.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import attr
from pyrsistent import PClass, field, pmap_field
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyflock.common._files import append_durably, whole_lines, write_atomically
from pyflock.common._logging import log_event
from pyflock.common._records import DatasetEntry
from pyflock.common._threads import in_reactor_pool
from pyflock.common._wire import (
    BadMessage, Diff, Node, Snapshot, ViewVersion, decode, encode,
)

#: The view file's name under the agent's data path.
VIEW_FILE = "view.json"

#: The version of the view file's format: 2, a base and the diffs since (see below).
VIEW_FORMAT = 2

#: The formats the agent reads: 1 is a base alone, as a format 2 file without diffs.
READABLE_FORMATS = (1, 2)

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
        ``version + 1`` of the same epoch changes it, and so does a diff whose ``base`` is
        this view (a resume on another replica: it takes the diff's epoch and version);
        any other diff is ``ViewOutOfStep``.
        """
        if isinstance(message, Snapshot):
            return self.from_snapshot(message)
        if message.base is not None:
            # Protocol 4: a resume from another replica's view, the one this view is.
            if message.base != self.current:
                raise ViewOutOfStep(
                    f"a resume from version {message.base.version} of epoch "
                    f"{message.base.epoch} does not apply to this view (version "
                    f"{self.version} of epoch {self.epoch})")
        elif message.epoch != self.epoch or message.version != self.version + 1:
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
        return self.set(epoch=message.epoch, version=message.version,
                        datasets=datasets.persistent(),
                        names=names.persistent(), nodes=nodes.persistent())


# -- the file ------------------------------------------------------------------------------
#
# The file is a log of JSON lines: a base (the whole view, ``{"format": 2, "view":
# <snapshot>}``), then the wire encoding of each diff pushed since, appended and fsync'd
# one batch at a time. A lease renewal so costs the bytes of its diff, not a rewrite of
# every dataset (1.9 MB at 10,000 datasets); once the diffs outweigh the base, the next
# save writes a new base in their place (``write_view``), atomically, so the file never
# grows past about twice the view and each byte appended pays for about one rewritten.
# A crash in the middle of an append leaves a torn last line, which reading ignores (the
# control service sends what it lacks) and the next append cuts off. Format 1, the base
# alone, is read as a log without diffs.


def view_to_bytes(view: AgentView) -> bytes:
    """The view file's content for ``view``: a base line and no diff."""
    body = json.loads(encode(view.to_snapshot()))
    return json.dumps({"format": VIEW_FORMAT, "view": body}, separators=(",", ":"),
                      sort_keys=True).encode("utf-8") + b"\n"


def diff_to_bytes(diff: Diff) -> bytes:
    """The line that appends ``diff`` to a view file."""
    return encode(diff) + b"\n"


def _base_from_bytes(line: bytes, where: str) -> AgentView:
    try:
        document = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ViewFileError(f"{where} is not JSON: {e}") from None
    if not isinstance(document, dict) or document.get("format") not in READABLE_FORMATS:
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


@attr.s(frozen=True, auto_attribs=True)
class ViewLog:
    """
    What a view file holds: the ``view`` after its base and every whole diff, the
    ``length`` of that readable part (a torn or stray tail follows it), the length of the
    base, and the bytes of diffs after it.
    """

    view: AgentView
    length: int
    base: int
    appended: int


def parse_view_log(content: bytes, where: str = "the view file") -> ViewLog:
    """
    The view a view file's content holds (pure); ``ViewFileError`` saying what is wrong
    if the base is unreadable. Diffs are applied up to the first line that is torn,
    malformed or out of step: what follows it is not part of the view.
    """
    end = content.find(b"\n")
    base = len(content) if end < 0 else end + 1
    view = _base_from_bytes(content[:base], where)
    length = base
    for line, end in whole_lines(content, base):
        try:
            diff = decode(line)
            if not isinstance(diff, Diff):
                break
            view = view.apply(diff)
        except (BadMessage, ViewOutOfStep):
            break
        length = end
    return ViewLog(view=view, length=length, base=base, appended=length - base)


def view_from_bytes(content: bytes, where: str = "the view file") -> AgentView:
    """The view in a view file's content; ``ViewFileError`` saying what is wrong."""
    return parse_view_log(content, where).view


def _read_log(path: Path) -> ViewLog:
    """The log stored in ``path`` (an empty one if there is no such file). Blocks."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return ViewLog(view=AgentView(), length=0, base=0, appended=0)
    except OSError as e:
        raise ViewFileError(f"cannot read {path}: {e.strerror}") from None
    return parse_view_log(content, str(path))


def read_view(path: Union[str, Path]) -> AgentView:
    """The view stored in ``path``; the empty view if there is no such file. Blocks."""
    return _read_log(Path(path)).view


def write_view(path: Union[str, Path], view: AgentView) -> int:
    """
    Replace ``path`` with ``view`` as a base without diffs, atomically and durably: a
    crash leaves the old file or the new one, never a mix. Returns its length. Blocks.
    """
    content = view_to_bytes(view)
    write_atomically(path, content)
    return len(content)


def append_diffs(path: Union[str, Path], lines: bytes, at: int) -> int:
    """Append diff ``lines`` to the view file ``path`` at offset ``at`` (cutting off a
    torn tail) durably; returns its new length. Blocks."""
    return append_durably(path, lines, at=at)


#: Diffs smaller than this (bytes) are never compacted into a new base, however small
#: the view: rewriting a tiny file is cheap, but not worth doing at every push.
COMPACT_AFTER = 64 * 1024


class ViewFile:
    """
    The agent's view file, read and written in threads (``run_in_thread``; file IO
    blocks). ``save(view, change)`` appends ``change``, the diff that made ``view`` from
    the view saved before, and writes a new base instead when there is no such diff (a
    snapshot, a gap) or the diffs outweigh the base. Writes are serial and batched: the
    diffs saved while one write runs go out together in the next, and a new base replaces
    whatever waited.
    """

    def __init__(self, path: Union[str, Path], reactor,
                 run_in_thread: Optional[Callable[..., Deferred]] = None,
                 compact_after: int = COMPACT_AFTER):
        self.path = Path(path)
        self._run = in_reactor_pool(reactor) if run_in_thread is None else run_in_thread
        self._compact_after = compact_after
        self._writing = False
        #: The file's readable length once the writes under way end; None: unknown (not
        #: loaded, or a write failed), so the next save writes a base.
        self._length: Optional[int] = None
        self._base = 0
        self._appended = 0
        #: The version the file holds once every queued write is done.
        self._tail: Optional[ViewVersion] = None
        self._latest = AgentView()
        self._next_base: Optional[AgentView] = None
        self._next_lines: list[bytes] = []
        self._next_waiters: list[Deferred] = []

    def load(self) -> Deferred:
        """
        Fires with the stored view; with the empty view if there is none, or if it cannot
        be read (logged: the control service sends a snapshot anyway).
        """
        def loaded(log: ViewLog) -> AgentView:
            if log.length:
                self._length, self._base, self._appended = log.length, log.base, log.appended
                self._tail = log.view.current
            return log.view

        def unreadable(failure: Failure) -> AgentView:
            failure.trap(ViewFileError)
            log_event(_log, "pyflock:agent:view-file-unreadable", path=str(self.path),
                      reason=str(failure.value))
            return AgentView()
        return maybeDeferred(self._run, _read_log, self.path).addCallbacks(loaded, unreadable)

    def save(self, view: AgentView, change: Union[Snapshot, Diff, None] = None) -> Deferred:
        """
        Store ``view``, which ``change`` (if a diff) made from the view saved before; fires
        once it (or a newer view) is durable, or fails.
        """
        d: Deferred = Deferred()
        follows = (isinstance(change, Diff) and self._tail is not None
                   and self._tail == ViewVersion(change.epoch, change.version - 1)
                   and view.current == ViewVersion(change.epoch, change.version))
        if follows and self._next_base is None and self._length is not None:
            self._next_lines.append(diff_to_bytes(change))
            pending = sum(map(len, self._next_lines))
            if self._appended + pending > max(self._compact_after, self._base):
                self._next_base, self._next_lines = view, []
        elif follows and self._next_base is not None:
            self._next_base = view  # the base waiting to be written takes this view too
        else:
            self._next_base, self._next_lines = view, []
        self._tail = view.current
        self._latest = view
        self._next_waiters.append(d)
        if not self._writing:
            self._write_next()
        return d

    def _write_next(self) -> None:
        base, lines, waiters = self._next_base, self._next_lines, self._next_waiters
        self._next_base, self._next_lines, self._next_waiters = None, [], []
        self._writing = True
        if base is not None:
            self._appended = 0  # diffs saved meanwhile count from the new base
            d = maybeDeferred(self._run, write_view, self.path, base)
        else:
            data = b"".join(lines)
            d = maybeDeferred(self._run, append_diffs, self.path, data, self._length)

        def done(result):
            self._writing = False
            if isinstance(result, Failure):
                # What the file holds is unknown now: the next save writes a new base.
                self._length = None
                if self._next_waiters:
                    self._next_base, self._next_lines = self._latest, []
            elif base is not None:
                self._length = self._base = result
                self._appended = 0
            else:
                self._appended += result - self._length
                self._length = result
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(None)
            if self._next_waiters:
                self._write_next()
        d.addBoth(done)


__all__ = ["AgentView", "COMPACT_AFTER", "VIEW_FILE", "ViewFile", "ViewFileError",
           "ViewLog", "ViewOutOfStep", "append_diffs", "diff_to_bytes", "parse_view_log",
           "read_view", "view_from_bytes", "view_to_bytes", "write_view"]
