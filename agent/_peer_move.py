"""
The pure core of a move between two nodes with a peer-to-peer backend (no IO; the
transfer service and runner are its shells).

A move is pulled by the new primary (the receiver) from a node holding a complete copy
(the sender), one round per connection:

- Phase 1, while the dataset is still in use on the sender: each round asks for a stream
  from the newest snapshot both copies have (the sender snapshots its copy now) until a
  round brings no more than ``MovePolicy.small_delta`` bytes, or ``max_rounds`` rounds were
  made.
- Phase 2: the sender freezes its copy (read-only in place, so a container still holding
  it can write no more), snapshots it and sends the last delta; the receiver completes its
  copy (a writable snapshot of the received one), and convergence mounts it. Only a
  mounted copy is reported as the dataset's home, so ownership flips after that.
- Afterwards each side keeps one snapshot, the last one sent (the newest common one): the
  sender demotes its copy to those snapshots, the receiver prunes older ones. A move back
  then sends only what changed since.

A round that breaks (connection, crash of either side) leaves the receiver's copy at its
last complete import (the backend discards partial imports); the next round starts again
from the newest common snapshot. Each end checks the move against its own view: a sender
serves only the dataset's primary, and a receiver takes only from a node holding a copy.
"""

from __future__ import annotations

from typing import Iterable, Optional

import attr

from pyflock.agent._backends._interface import MiB

#: The two phases of a move.
PHASE_COPY = 1
PHASE_FINAL = 2


@attr.s(frozen=True, auto_attribs=True)
class MovePolicy:
    """
    When a move enters phase 2: once a phase-1 round brought at most ``small_delta``
    bytes, or after ``max_rounds`` phase-1 rounds (a dataset written faster than it can
    be sent would never converge otherwise).
    """

    small_delta: int = 64 * MiB
    max_rounds: int = 5


@attr.s(frozen=True, auto_attribs=True)
class MoveState:
    """
    The receiver's view of one move: the dataset, the node it comes from, the phase-1
    rounds done, the bytes the last round brought, every byte received, and whether the
    final round (phase 2) has arrived.
    """

    dataset_id: str
    from_node: str
    rounds: int = 0
    last_bytes: Optional[int] = None
    bytes_received: int = 0
    done: bool = False


def next_phase(policy: MovePolicy, state: MoveState) -> int:
    """The phase of the next round of ``state`` (pure)."""
    if state.rounds == 0 or state.last_bytes is None:
        return PHASE_COPY
    if state.last_bytes <= policy.small_delta or state.rounds >= policy.max_rounds:
        return PHASE_FINAL
    return PHASE_COPY


def round_done(state: MoveState, phase: int, nbytes: int) -> MoveState:
    """``state`` after a round of ``phase`` brought ``nbytes`` bytes (pure)."""
    return attr.evolve(state, rounds=state.rounds + (phase == PHASE_COPY),
                       last_bytes=nbytes, bytes_received=state.bytes_received + nbytes,
                       done=phase == PHASE_FINAL)


def newest_common(sender: Iterable[str], receiver: Iterable[str]) -> Optional[str]:
    """
    The newest of the sender's snapshots (oldest first) that the receiver has too: the
    base of the next stream; None (a whole stream) if they share none (pure).
    """
    theirs = set(receiver)
    common = [name for name in sender if name in theirs]
    return common[-1] if common else None


def receiver_keeps(receiver: Iterable[str], base: Optional[str]) -> tuple:
    """
    The receiver's snapshots up to and including ``base``: what it keeps so that ``base``
    is its latest and an incremental stream from it can be imported (pure).
    """
    names = tuple(receiver)
    if base is None or base not in names:
        return ()
    return names[:names.index(base) + 1]


@attr.s(frozen=True, auto_attribs=True)
class MoveView:
    """
    What a node knows of one dataset from the view the control service gave it: its
    primary, the other nodes reporting a complete copy (``holders``), and whether it is
    deleted and its data may go.
    """

    primary: Optional[str]
    holders: tuple = ()
    gone: bool = False


def send_refusal(view: Optional[MoveView], here: str, requester: str,
                 dataset_id: str) -> Optional[str]:
    """
    Why this node (``here``) refuses to send ``dataset_id`` to ``requester``, or None:
    it sends only for a move the control service told it of, the dataset's primary being
    the requester in this node's view (pure).
    """
    if view is None or view.gone:
        return f"dataset {dataset_id} is not configured in this node's view"
    if view.primary != requester:
        return (f"dataset {dataset_id} is not moving to node {requester} in this node's "
                f"view (its primary is {view.primary})")
    if requester == here:
        return "a node does not send a dataset to itself"
    return None


def receive_refusal(view: Optional[MoveView], here: str, sender: str,
                    dataset_id: str) -> Optional[str]:
    """
    Why this node (``here``) refuses to receive ``dataset_id`` from ``sender``, or None:
    it receives only as the dataset's primary, from a node that reports a copy (pure).
    """
    if view is None or view.gone:
        return f"dataset {dataset_id} is not configured in this node's view"
    if view.primary != here:
        return (f"dataset {dataset_id} is not moving to this node in its view "
                f"(its primary is {view.primary})")
    if sender not in view.holders:
        return f"node {sender} does not hold dataset {dataset_id} in this node's view"
    return None


__all__ = [
    "MovePolicy", "MoveState", "MoveView", "PHASE_COPY", "PHASE_FINAL",
    "newest_common", "next_phase", "receive_refusal", "receiver_keeps", "round_done",
    "send_refusal",
]
