"""The pure part of the btrfs backend: parsing, layout, stream headers and checks, errors."""

import uuid

import pytest

from pyflock.agent._backends._btrfs_model import (
    SEND_WRITE_SIZE, Holder, PoolFull, SendStreamChecker, StreamHeader, StreamSizeEstimate,
    Subvolume, decode_header,
    group_subvolumes, largest_first, parse_du_total, parse_subvolume_list,
)
from pyflock.agent._backends._peer import BadStream
from tests.harness.btrfs_pools import (
    A_CLONE_UUID, A_CTRANSID, A_INO, A_PATH, A_UUID, CLONE, END, MKFILE, SNAPSHOT, SUBVOL,
    send_command, send_stream,
)

U1, U2, U3 = (str(uuid.UUID(int=n)) for n in (1, 2, 3))

LISTING = f"""\
ID 256 gen 8 top level 5 parent_uuid - received_uuid - uuid {U1} path datasets/d1/live
ID 258 gen 9 top level 5 parent_uuid {U1} received_uuid - uuid {U2} path datasets/d1/snapshots/s2/s2
ID 257 gen 7 top level 5 parent_uuid {U1} received_uuid {U3} uuid {U3} path datasets/d1/snapshots/s1/s1
ID 259 gen 9 top level 5 parent_uuid - received_uuid {U3} uuid {U2} path staging/receive-x/s1
ID 260 gen 9 top level 5 parent_uuid - received_uuid {U3} uuid {U1} path <FS_TREE>/datasets/d2/snapshots/s1/s1
"""


def test_parse_subvolume_list():
    """Each line gives id, path (relative to the pool's root) and the three uuids."""
    subvolumes = parse_subvolume_list(LISTING)
    assert subvolumes[0] == Subvolume(256, "datasets/d1/live", U1)
    assert subvolumes[2] == Subvolume(257, "datasets/d1/snapshots/s1/s1", U3, U1, U3)
    assert subvolumes[4].path == "datasets/d2/snapshots/s1/s1"
    with pytest.raises(ValueError, match="unexpected line"):
        parse_subvolume_list("ID what\n")


def test_group_subvolumes():
    """Subvolumes group by dataset, snapshots oldest (lowest id) first, staging left out."""
    grouped = group_subvolumes(parse_subvolume_list(LISTING))
    assert list(grouped) == ["d1", "d2"]
    assert grouped["d1"].live.subvolume_id == 256
    assert [s.subvolume_id for s in grouped["d1"].snapshots] == [257, 258]
    assert grouped["d1"].snapshot("s2").uuid == U2
    assert (grouped["d2"].live, grouped["d2"].snapshot("s2")) == (None, None)


def test_sent_uuid():
    """A subvolume is sent under its received uuid when it has one, else its own."""
    assert Subvolume(1, "p", U1, received_uuid=U2).sent_uuid == U2
    assert Subvolume(1, "p", U1).sent_uuid == U1


def test_parse_du_total():
    """The total bytes of ``btrfs filesystem du -s --raw``; anything else is refused."""
    assert parse_du_total("     Total   Exclusive  Set shared  Filename\n"
                          "   1052672     1052672           0  /p/live\n") == 1052672
    with pytest.raises(ValueError):
        parse_du_total("nonsense\n")


HEADER = StreamHeader(dataset_id="d1", size=64 << 20, snapshot="s1", uuid=U1)
DELTA = StreamHeader(dataset_id="d1", size=64 << 20, snapshot="s2", uuid=U2, base="s1",
                     base_uuid=U1)


def test_header_round_trip():
    """A header decodes to what was encoded."""
    for header in (HEADER, DELTA):
        assert decode_header(header.encode(), "d1") == header


@pytest.mark.parametrize("line, message", [
    (b"garbage", "malformed"),
    (HEADER.encode()[:20], "malformed"),
    (b'{"format": "other"}\n', "malformed"),
    (HEADER.encode().replace(b"s1", b"../x"), "malformed"),
    (HEADER.encode().replace(b'"size": 67108864', b'"size": 0'), "malformed"),
    (HEADER.encode().replace(b'"base": null', b'"base": "s0"'), "malformed"),
    (HEADER.encode().replace(b'"d1"', b'"d2"'), "of dataset d2, not d1"),
])
def test_bad_headers(line, message):
    """A header that is not pyflock's, malformed or of another dataset is ``BadStream``."""
    with pytest.raises(BadStream, match=message):
        decode_header(line, "d1")


def subvol(name=b"s1", uid=U1):
    """The first command of a whole stream."""
    return send_command(SUBVOL, (A_PATH, name), (A_UUID, uuid.UUID(uid).bytes),
                        (A_CTRANSID, b"\0" * 8))


def mkfile(path):
    """A command making a file at ``path``."""
    return send_command(MKFILE, (A_PATH, path), (A_INO, b"\1" + b"\0" * 7))


def check(header, stream, piece=7):
    """Feed ``stream`` to a checker in small pieces, then finish it."""
    checker = SendStreamChecker(header)
    for at in range(0, len(stream), piece):
        checker.feed(stream[at:at + piece])
    checker.finish()


def test_checker_accepts_a_plain_stream():
    """A stream of one subvolume with relative paths passes, fed in any pieces."""
    stream = send_stream(subvol(), mkfile(b"a/b"), mkfile(b"c"), send_command(END))
    for piece in (1, 7, 10, 30, len(stream)):
        check(HEADER, stream, piece)


@pytest.mark.parametrize("stream, message", [
    (b"not a stream at all, long enough", "not a version-1"),
    (send_stream(subvol(), mkfile(b"../../etc/x"), send_command(END)), "leaves the dataset"),
    (send_stream(subvol(), mkfile(b"/etc/x"), send_command(END)), "leaves the dataset"),
    (send_stream(mkfile(b"a"), send_command(END)), "does not start with a subvolume"),
    (send_stream(subvol(), subvol(), send_command(END)), "more than one subvolume"),
    (send_stream(subvol(b"other"), send_command(END)), "its subvolume is b'other'"),
    (send_stream(subvol(uid=U2), send_command(END)), "uuid is not the one announced"),
    (send_stream(subvol(), mkfile(b"a")), "truncated"),
    (send_stream(subvol(), send_command(END), mkfile(b"a")), "after the end"),
    (send_stream(subvol(), send_command(99), send_command(END)), "unknown command 99"),
    (send_stream(subvol(), send_command(CLONE, (A_PATH, b"a"), (A_CLONE_UUID,
                                                                uuid.UUID(U3).bytes)),
                 send_command(END)), "clones from subvolume"),
    (send_stream(send_command(SNAPSHOT, (A_PATH, b"s1"), (A_UUID, uuid.UUID(U1).bytes)),
                 send_command(END)), "not what its header says"),
])
@pytest.mark.parametrize("piece", [7, 1 << 20])
def test_checker_refuses(stream, message, piece):
    """Paths out of the dataset, foreign clones, extra or wrong subvolumes are refused,
    whether the stream comes in small pieces or in one."""
    with pytest.raises(BadStream, match=message):
        check(HEADER, stream, piece)


def test_checker_incremental_base():
    """An incremental stream must start from the announced base."""
    def snapshot(base):
        return send_command(SNAPSHOT, (A_PATH, b"s2"), (A_UUID, uuid.UUID(U2).bytes),
                            (A_CLONE_UUID, uuid.UUID(base).bytes))
    check(DELTA, send_stream(snapshot(U1), send_command(END)))
    with pytest.raises(BadStream, match="base is not the one announced"):
        check(DELTA, send_stream(snapshot(U3), send_command(END)))


UPDATE_EXTENT, WRITE, A_SIZE, A_FILE_OFFSET, A_DATA = 22, 15, 4, 18, 19


def test_estimate_counts_writes_for_update_extents():
    """A ``--no-data`` stream's update_extent commands count as the write commands, of at
    most ``SEND_WRITE_SIZE`` bytes each, that the stream with data has instead."""
    length = 2 * SEND_WRITE_SIZE + 5
    offset = (A_FILE_OFFSET, b"\0" * 8)
    no_data = send_stream(subvol(), mkfile(b"f"), send_command(
        UPDATE_EXTENT, (A_PATH, b"f"), offset, (A_SIZE, length.to_bytes(8, "little"))),
        send_command(END))
    with_data = send_stream(subvol(), mkfile(b"f"), *(
        send_command(WRITE, (A_PATH, b"f"), offset, (A_DATA, b"x" * n))
        for n in (SEND_WRITE_SIZE, SEND_WRITE_SIZE, 5)), send_command(END))
    for piece in (7, len(no_data)):
        estimate = StreamSizeEstimate()
        for at in range(0, len(no_data), piece):
            estimate.feed(no_data[at:at + piece])
        assert estimate.size() == len(with_data)


def test_estimate_of_a_cut_stream_refused():
    """A ``--no-data`` stream without its end is no estimate."""
    estimate = StreamSizeEstimate()
    estimate.feed(send_stream(subvol(), mkfile(b"f")))
    with pytest.raises(ValueError, match="truncated"):
        estimate.size()


def test_pool_full_names_holders():
    """``PoolFull`` names the dataset, the pool and the largest holders of space."""
    error = PoolFull("d9", "/p.img", largest_first([Holder("a", 1 << 20), Holder("b", 3 << 30)]))
    assert str(error) == ("the btrfs pool /p.img is full: no space left for dataset d9; the "
                          "most space is held by b 3G, a 1M; destroy datasets, or grow the "
                          "pool (btrfs filesystem resize)")
