"""
How the CLI names things and shows them: datasets and nodes by uuid, unique prefix, name
or address; aligned tables; durations. Every text that comes from the cluster (names,
addresses, paths, the control service's errors) is shown through ``visible``, so no
dataset name can move the cursor, recolour the terminal or hide text (issue 8).
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
import uuid as _uuid
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any, Iterable, Optional, Sequence

from pyflock.cli._parser import CLIError

if TYPE_CHECKING:
    from pyflock.common._records import Dataset, DatasetReport, Node


#: The characters ``visible`` escapes: Unicode's control (Cc: C0, DEL, C1 including ESC and
#: CSI), format (Cf: bidirectional overrides, zero-width characters), surrogate (Cs),
#: private-use (Co) and unassigned (Cn) characters, and line and paragraph separators.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})

# Printable ASCII only: the fast path, for the text nearly every name is.
_PLAIN = re.compile(r"[\x20-\x7e]*\Z")


def _escape(character: str) -> str:
    """``character`` as a Python-style escape: ``\\x1b``, ``\\u202e``, ``\\U000e0001``."""
    code = ord(character)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def visible(text: str) -> str:
    """``text`` with every control, format or otherwise invisible character written as an
    escape (``\\x1b``), so a terminal shows it instead of obeying it."""
    if _PLAIN.match(text):
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _HIDDEN_CATEGORIES else c
                   for c in text)


def _is_uuid(text: str) -> bool:
    try:
        return str(_uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


def short_ids(uuids: Iterable[str], minimum: int = 8) -> dict[str, str]:
    """For each uuid, its shortest prefix of at least ``minimum`` characters that no other
    uuid given shares."""
    uuids = sorted(set(uuids))
    result = {}
    for i, u in enumerate(uuids):
        length = minimum
        for neighbour in uuids[max(0, i - 1):i] + uuids[i + 1:i + 2]:
            common = len(os.path.commonprefix([u, neighbour]))
            length = max(length, common + 1)
        result[u] = u[:length]
    return result


def dataset_label(dataset: Dataset) -> str:
    """A dataset's id, and its name (made ``visible``) when it has one."""
    return dataset.dataset_id + (f" ({visible(dataset.name)})" if dataset.name else "")


def resolve_dataset(text: str, datasets: Sequence[Dataset]
                    ) -> tuple[str, Optional[Dataset]]:
    """
    The dataset ``text`` names: an exact id (even one not listed), else a live dataset's
    name, else the one live dataset whose id starts with ``text``; ``CLIError`` otherwise.
    """
    wanted = text.strip().lower()
    for dataset in datasets:
        if dataset.dataset_id.lower() == wanted:
            return dataset.dataset_id, dataset
    if _is_uuid(wanted):
        return wanted, None
    live = [d for d in datasets if not d.deleted]
    named = [d for d in live if d.name == text]
    if named:
        return named[0].dataset_id, named[0]
    matches = [d for d in live if d.dataset_id.lower().startswith(wanted)] if wanted else []
    if len(matches) == 1:
        return matches[0].dataset_id, matches[0]
    if matches:
        candidates = ", ".join(dataset_label(d) for d in
                               sorted(matches, key=lambda d: d.dataset_id))
        raise CLIError(f"{text!r} matches {len(matches)} datasets: {candidates}; give more "
                       "of the id, or the name")
    raise CLIError(f"no dataset has the id, id prefix or name {text!r}; 'pyflock list' "
                   "shows them")


def resolve_node(text: str, nodes: Sequence[Node]) -> str:
    """
    The uuid of the node ``text`` names: a known node's uuid, any well-formed uuid (a node
    may be named before its agent first connects), a node's address, or a unique prefix
    of a known node's uuid; ``CLIError`` otherwise.
    """
    wanted = text.strip().lower()
    for node in nodes:
        if node.uuid.lower() == wanted:
            return node.uuid
    if _is_uuid(wanted):
        return wanted
    for kind, matches in (
            ("address", [n for n in nodes if n.host.lower() == wanted]),
            ("uuid prefix", [n for n in nodes if wanted and n.uuid.lower().startswith(wanted)])):
        if len(matches) == 1:
            return matches[0].uuid
        if matches:
            candidates = ", ".join(f"{n.uuid} ({visible(n.host)})" for n in
                                   sorted(matches, key=lambda n: n.uuid))
            raise CLIError(f"{text!r} is the {kind} of {len(matches)} nodes: {candidates}; "
                           "give the node's uuid or a longer prefix of it")
    raise CLIError(f"no node has the uuid, uuid prefix or address {text!r}; "
                   "'pyflock list-nodes' shows them")


# -- output ---------------------------------------------------------------------------

def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """``rows`` under ``headers`` in left-aligned columns two spaces apart, every cell
    made ``visible``."""
    rows = [[visible(str(cell)) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [list(headers)] + rows]
    return "\n".join(lines) + "\n"


def print_json(out: IO[str], value: Any) -> None:
    out.write(json.dumps(value, indent=2) + "\n")


def seconds_text(value: Optional[float]) -> str:
    if value is None:
        return "never"
    minutes, seconds = divmod(int(round(value)), 60)
    if minutes == 0:
        return f"{seconds}s"
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def utc_text(seconds: float) -> str:
    """An absolute time (seconds since the epoch) as UTC text to the second."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


class NodeLabels:
    """How to show node uuids: a short id, and the address when the node is known."""

    def __init__(self, nodes: Sequence[Node], also: Iterable[str] = ()):
        self._hosts = {n.uuid: n.host for n in nodes}
        self._short = short_ids([n.uuid for n in nodes] + list(also))

    def label(self, uuid: str) -> str:
        short = self._short.get(uuid, uuid[:8])
        host = self._hosts.get(uuid)
        return f"{short} ({visible(host)})" if host else short


def dataset_state(dataset: Dataset,
                   states: Sequence[DatasetReport]) -> tuple[str, Optional[str]]:
    """What the dataset is doing, as far as the nodes report it, and its mount path."""
    if dataset.deleted:
        return ("deleted" if dataset.retained_until is None else
                f"deleted, kept until {utc_text(dataset.retained_until)}"), None
    here = [s for s in states if s.node_uuid == dataset.primary]
    if here:
        state = here[0]
        return state.state or ("mounted" if state.path else "attached"), state.path
    if states:
        return "moving", None
    return "pending", None


