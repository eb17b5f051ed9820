"""Unit tests of the pure cores of moves (``_peer_move``) and their wire (``_peer_protocol``)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyflock.agent._peer_move import (
    PHASE_COPY, PHASE_FINAL, MovePolicy, MoveState, MoveView, newest_common,
    next_phase, receive_refusal, receiver_keeps, round_done, send_refusal,
)
from pyflock.common._records import Transfer
from pyflock.agent._peer_protocol import (
    END_FRAME, MAX_FRAME, Decoder, ProtocolError, SendAnswer, SendRequest, Throttle, framed,
    parse_answer, parse_request,
)

A, B, C = "node-a", "node-b", "node-c"
POLICY = MovePolicy(small_delta=100, max_rounds=3)


def test_first_round_is_phase_one():
    """A move starts with a phase-1 round, whatever the size."""
    assert next_phase(POLICY, MoveState("ds", A)) == PHASE_COPY


def test_small_delta_enters_phase_two():
    """A phase-1 round that brought a small delta leads to the final round."""
    state = round_done(MoveState("ds", A), PHASE_COPY, 10_000)
    assert next_phase(POLICY, state) == PHASE_COPY
    state = round_done(state, PHASE_COPY, 50)
    assert next_phase(POLICY, state) == PHASE_FINAL
    done = round_done(state, PHASE_FINAL, 5)
    assert (done.done, done.rounds, done.bytes_received) == (True, 2, 10_055)


def test_rounds_are_bounded():
    """A dataset written faster than it is sent still enters phase 2 after max rounds."""
    state = MoveState("ds", A)
    for _ in range(POLICY.max_rounds):
        assert next_phase(POLICY, state) == PHASE_COPY
        state = round_done(state, PHASE_COPY, 10 ** 9)
    assert next_phase(POLICY, state) == PHASE_FINAL


def test_newest_common_snapshot():
    """The base is the newest snapshot both have; none in common is a whole stream."""
    assert newest_common(["s1", "s2", "s3"], ["s1", "s2", "x9"]) == "s2"
    assert newest_common(["s1"], []) is None
    assert newest_common([], ["s1"]) is None


@given(st.lists(st.sampled_from("abcdef"), unique=True),
       st.lists(st.sampled_from("abcdef"), unique=True))
def test_newest_common_is_common_and_newest(sender, receiver):
    """The base is in both lists, and no later sender snapshot is in the receiver's."""
    base = newest_common(sender, receiver)
    if base is None:
        assert not set(sender) & set(receiver)
    else:
        assert base in receiver
        assert not set(sender[sender.index(base) + 1:]) & set(receiver)


def test_receiver_keeps_up_to_the_base():
    """The receiver keeps its snapshots up to the base, so the base is its latest."""
    assert receiver_keeps(["s1", "s2", "x9"], "s2") == ("s1", "s2")
    assert receiver_keeps(["s1"], None) == ()


def test_sender_serves_only_the_primary():
    """A sender refuses every node but the dataset's primary in its own view."""
    view = MoveView(primary=B, holders=(A,))
    assert send_refusal(view, A, B, "ds") is None
    assert "not moving to node node-c" in send_refusal(view, A, C, "ds")
    assert "not configured" in send_refusal(None, A, B, "ds")
    assert "not configured" in send_refusal(MoveView(B, gone=True), A, B, "ds")
    assert "itself" in send_refusal(MoveView(A), A, A, "ds")


def test_receiver_takes_only_from_a_holder_as_primary():
    """A receiver takes a dataset only as its primary, and only from a holder."""
    view = MoveView(primary=B, holders=(A,))
    assert receive_refusal(view, B, A, "ds") is None
    assert "does not hold" in receive_refusal(view, B, C, "ds")
    assert "not moving to this node" in receive_refusal(view, C, A, "ds")


def test_progress_counts_and_estimates():
    """Progress adds the bytes sent; each round's estimate extends the total."""
    progress = Transfer().expecting(1000).sent(400)
    assert progress == Transfer(400, 1000)
    assert progress.sent(700) == Transfer(1100, 1100), "the total never falls behind"
    assert Transfer(5).expecting(None) == Transfer(5)


def test_request_round_trip():
    """A request survives its line; bad ones are refused with the reason."""
    request = SendRequest("ds", PHASE_FINAL, ("s1", "s2"))
    assert parse_request(request.to_line()) == request
    for obj, reason in [({"version": 9}, "version"),
                        ({"version": 1, "phase": 1}, "dataset_id"),
                        ({"version": 1, "dataset_id": "d", "phase": 3}, "phase"),
                        ({"version": 1, "dataset_id": "d", "phase": 1, "snapshots": [1]},
                         "snapshots")]:
        with pytest.raises(ProtocolError, match=reason):
            parse_request(json.dumps(obj).encode())
    with pytest.raises(ProtocolError, match="not JSON"):
        parse_request(b"\xff")


def test_answer_round_trip():
    """An answer or a refusal survives its line."""
    for answer in (SendAnswer("s1", 1234), SendAnswer(), SendAnswer(error="no")):
        assert parse_answer(answer.to_line()) == answer
    with pytest.raises(ProtocolError, match="estimate"):
        parse_answer(b'{"estimate": true}')


@given(st.binary(max_size=3 * MAX_FRAME + 7), st.integers(1, 5000))
def test_decoder_reassembles_any_split(data, cut):
    """Whatever the pieces the network cuts it into, the decoder gives the stream back."""
    wire = SendAnswer("s1").to_line() + framed(data) + END_FRAME
    decoder = Decoder()
    out = []
    for i in range(0, len(wire), cut):
        out.extend(decoder.feed(wire[i:i + cut]))
    assert parse_answer(out[0]) == SendAnswer("s1")
    assert out[-1] is None and b"".join(out[1:-1]) == data


def test_decoder_refuses_oversized_frames_and_trailing_data():
    """A frame over the limit, or data after the end, is a protocol error."""
    with pytest.raises(ProtocolError, match="over"):
        Decoder().feed(b"{}\n" + (MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="after the end"):
        Decoder().feed(b"{}\n" + END_FRAME + b"x")


def test_throttle_paces_to_the_rate():
    """A limited throttle lets a burst go at once, then makes the sender wait."""
    throttle = Throttle(rate=1000, burst=500)
    throttle, wait = throttle.take(0.0, 500)
    assert wait == 0
    throttle, wait = throttle.take(0.0, 1000)
    assert wait == pytest.approx(1.0)
    throttle, wait = throttle.take(3.0, 100)
    assert wait == 0
    assert Throttle().take(0.0, 10 ** 9)[1] == 0, "no limit, no wait"
