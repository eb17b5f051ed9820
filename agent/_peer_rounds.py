"""
The backend side of one round of a move, for both ends: blocking calls on an
``IPeerBackend`` that the transfer service runs in threads (and tests run in process).
The decisions are ``pyflock.agent._peer_move``'s; the wire is ``_peer_protocol``'s.
"""

from __future__ import annotations

from typing import BinaryIO, Callable, Optional

from pyflock.agent._backends._interface import UnknownVolume
from pyflock.agent._backends._peer import IPeerBackend, PeerDataset
from pyflock.agent._peer_move import (
    PHASE_FINAL, MovePolicy, MoveState, newest_common, next_phase, receiver_keeps,
    round_done,
)
from pyflock.agent._peer_protocol import SendAnswer, SendRequest


class TransferRefused(Exception):
    """The other end refused a round, or this end refuses it; the text says why."""


def _copy(backend: IPeerBackend, dataset_id: str) -> Optional[PeerDataset]:
    """This node's copy of ``dataset_id``, or None."""
    try:
        return backend.get_dataset(dataset_id)
    except UnknownVolume:
        return None


# -- the sender ------------------------------------------------------------------------


def prepare_send(backend: IPeerBackend, request: SendRequest) -> SendAnswer:
    """
    The sender's answer to ``request`` (already allowed by its view): the newest common
    snapshot as base and the round's estimated size; for phase 2, the copy is frozen
    first, so that the stream that follows is the last one. A backend whose freeze does
    not stop writers that opened files before it (btrfs: ``writers``) has phase 2 refused
    while any remain: their writes would miss the last snapshot. The copy stays frozen,
    and the receiver asks again on its next step.
    """
    copy = _copy(backend, request.dataset_id)
    if copy is None or not copy.complete:
        return SendAnswer(error=f"this node holds no complete copy of dataset "
                                f"{request.dataset_id}")
    if request.phase == PHASE_FINAL:
        copy = backend.freeze_dataset(request.dataset_id)
        writers = getattr(backend, "writers", None)
        pids = writers(request.dataset_id) if writers is not None else ()
        if pids:
            return SendAnswer(error=(
                f"dataset {request.dataset_id} is frozen on node {backend.node_uuid} but "
                f"{len(pids)} process(es) still hold its files open for writing (pids "
                f"{', '.join(map(str, pids[:10]))}); the move waits until they stop "
                f"(stop the containers using it there)"))
    base = newest_common(copy.snapshots, request.snapshots)
    estimate = getattr(backend, "estimate_export", None)
    return SendAnswer(base=base, estimate=estimate(request.dataset_id, base)
                      if estimate is not None else None)


def send_stream(backend: IPeerBackend, dataset_id: str, answer: SendAnswer,
                into: BinaryIO) -> str:
    """Export the round's stream (from ``answer.base``) into ``into``; its snapshot."""
    return backend.export_dataset(dataset_id, into, answer.base)


# -- the receiver ----------------------------------------------------------------------


def make_request(backend: IPeerBackend, dataset_id: str, phase: int) -> SendRequest:
    """The request of a round of ``phase``, listing this node's partial copy's snapshots."""
    copy = _copy(backend, dataset_id)
    if copy is not None and copy.complete:
        raise TransferRefused(f"this node already holds a complete copy of dataset "
                              f"{dataset_id}; it receives none")
    return SendRequest(dataset_id, phase, copy.snapshots if copy is not None else ())


def prepare_receive(backend: IPeerBackend, dataset_id: str, answer: SendAnswer) -> None:
    """
    Make this node's partial copy ready for the stream ``answer`` announces: its latest
    snapshot the stream's base (later ones, which the sender lacks, pruned), or no copy
    at all for a whole stream.
    """
    if answer.error is not None:
        raise TransferRefused(answer.error)
    copy = _copy(backend, dataset_id)
    if copy is None:
        return
    if answer.base is None:
        backend.destroy_dataset(dataset_id)
    elif copy.latest != answer.base:
        backend.prune_snapshots(dataset_id, receiver_keeps(copy.snapshots, answer.base))


def finish_receive(backend: IPeerBackend, dataset_id: str) -> PeerDataset:
    """After the final round: complete the copy, keeping only its latest snapshot."""
    copy = backend.complete_dataset(dataset_id)
    return backend.prune_snapshots(dataset_id, [copy.latest] if copy.latest else [])


def receive_move(backend: IPeerBackend, policy: MovePolicy, state: MoveState,
                 one_round: Callable[[SendRequest], int]) -> MoveState:
    """
    Make the rounds of a move on the receiving node until its final one arrived, then
    complete the copy. ``one_round(request)`` runs one round (prepare, import) and returns
    its byte count; it raises if the round broke, and the move can be made again from
    the copy as it is then.
    """
    while not state.done:
        phase = next_phase(policy, state)
        nbytes = one_round(make_request(backend, state.dataset_id, phase))
        state = round_done(state, phase, nbytes)
    finish_receive(backend, state.dataset_id)
    return state


__all__ = [
    "TransferRefused", "finish_receive", "make_request", "prepare_receive", "prepare_send",
    "receive_move", "send_stream",
]
