"""Sans-IO tests of protocol.Connection: framing, fd ownership, rejection, fragmentation."""

from __future__ import annotations

import errno
import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfio_user.constants import FLAG_ERROR, FLAG_NO_REPLY, Command, MsgType
from vfio_user.protocol import Connection, FatalProtocolError, Message, Rejected, encode

from ..support.fds import is_closed


def _fds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def _close(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _req(msg_id: int, command: int = Command.REGION_READ, payload: bytes = b"", flags: int = MsgType.REQUEST) -> bytes:
    return encode(msg_id, command, flags, payload)


def _summary(events):
    return [
        (type(e).__name__, e.msg_id, e.command, e.flags, getattr(e, "payload", None), tuple(getattr(e, "fds", ())), getattr(e, "errno", None))
        for e in events
    ]


def test_whole_messages_and_fds_in_one_chunk():
    conn = Connection()
    fds = _fds(1)
    try:
        events = conn.receive(_req(1, Command.DMA_MAP, b"x" * 32), fds)
        assert len(events) == 1 and isinstance(events[0], Message)
        msg = events[0]
        assert (msg.msg_id, msg.command, msg.payload, msg.fds) == (1, Command.DMA_MAP, b"x" * 32, fds)
        assert msg.take_fds() == fds and msg.fds == []
    finally:
        _close(fds)


def test_fds_go_to_the_message_that_starts_in_the_chunk_not_the_tail():
    """One recv chunk = tail of message A + head of message B (B sent with fds): fds are B's."""
    conn = Connection()
    a = _req(1, Command.REGION_WRITE, b"A" * 40)
    b = _req(2, Command.DMA_MAP, b"B" * 32)
    fds = _fds(2)
    try:
        cut_a, cut_b = 10, 20
        assert conn.receive(a[:cut_a]) == []
        events = conn.receive(a[cut_a:] + b[:cut_b], fds)
        assert len(events) == 1 and events[0].msg_id == 1 and events[0].fds == []
        events = conn.receive(b[cut_b:])
        assert len(events) == 1 and events[0].msg_id == 2 and events[0].fds == fds
    finally:
        _close(fds)


def test_fds_on_a_chunk_without_a_message_start_belong_to_the_message_in_progress():
    conn = Connection()
    b = _req(7, Command.DEVICE_SET_IRQS, bytes(20))
    fds = _fds(1)
    try:
        assert conn.receive(b[:5]) == []  # even the header is incomplete
        assert conn.receive(b[5:30], fds) == []
        [msg] = conn.receive(b[30:])
        assert msg.msg_id == 7 and msg.fds == fds
    finally:
        _close(fds)


def test_fds_with_a_chunk_holding_a_whole_message_and_a_partial_header():
    conn = Connection()
    a = _req(1, Command.REGION_READ, bytes(16))
    b = _req(2, Command.DMA_MAP, bytes(32))
    fds = _fds(1)
    try:
        events = conn.receive(a + b[:3], fds)  # B's header is cut after 3 bytes
        assert [e.msg_id for e in events] == [1] and events[0].fds == []
        [msg] = conn.receive(b[3:])
        assert msg.fds == fds
    finally:
        _close(fds)


def test_unexpected_reply_is_rejected_and_its_fds_closed():
    conn = Connection()
    fds = _fds(2)
    events = conn.receive(encode(42, Command.DMA_READ, MsgType.REPLY, b"data"), fds)
    assert len(events) == 1 and isinstance(events[0], Rejected)
    assert events[0].msg_id == 42 and events[0].is_reply and events[0].errno == errno.EINVAL
    assert all(is_closed(fd) for fd in fds)


def test_expected_reply_accepted_once_then_rejected():
    conn = Connection()
    msg_id, data = conn.request(Command.DMA_READ, b"p")
    assert conn.receive(data)[0].msg_id == msg_id  # our own request parses back
    reply = encode(msg_id, Command.DMA_READ, MsgType.REPLY, b"ok")
    [ev] = conn.receive(reply)
    assert isinstance(ev, Message) and ev.is_reply and ev.payload == b"ok"
    [again] = conn.receive(reply)
    assert isinstance(again, Rejected)


def test_forgotten_request_reply_is_rejected():
    conn = Connection()
    msg_id, _ = conn.request(Command.DMA_WRITE, b"")
    conn.forget(msg_id)
    [ev] = conn.receive(encode(msg_id, Command.DMA_WRITE, MsgType.REPLY))
    assert isinstance(ev, Rejected)


def test_no_reply_requests_are_not_outstanding_and_ids_wrap():
    conn = Connection()
    conn._next_id = 0xFFFF
    a, data = conn.request(Command.REGION_WRITE, b"", no_reply=True)
    b, _ = conn.request(Command.REGION_READ, b"")
    assert (a, b) == (0xFFFF, 0)
    assert a not in conn.outstanding and b in conn.outstanding
    [ev] = Connection().receive(data)
    assert ev.no_reply


def test_oversized_message_rejected_skipped_and_stream_stays_in_sync():
    conn = Connection(max_data_xfer=4096)
    big = _req(1, Command.REGION_WRITE, bytes(4096 + 100))
    fds = _fds(1)
    after = _req(2, Command.REGION_READ, bytes(16))
    events = conn.receive(big[:100], fds)
    assert len(events) == 0
    events = conn.receive(big[100:3000]) + conn.receive(big[3000:] + after)
    assert isinstance(events[0], Rejected) and events[0].errno == errno.E2BIG and events[0].msg_id == 1
    assert isinstance(events[1], Message) and events[1].msg_id == 2 and events[1].payload == bytes(16)
    assert is_closed(fds[0])


def test_too_many_fds_rejected_and_closed():
    conn = Connection(max_msg_fds=2)
    fds = _fds(3)
    events = conn.receive(_req(5, Command.DMA_MAP, bytes(32)) + _req(6), fds[:0])
    assert [type(e) for e in events] == [Message, Message]
    events = conn.receive(_req(7, Command.DEVICE_SET_IRQS, bytes(20)), fds)
    assert len(events) == 1 and isinstance(events[0], Rejected) and events[0].errno == errno.EINVAL
    assert all(is_closed(fd) for fd in fds)
    [ok] = conn.receive(_req(8))
    assert ok.msg_id == 8


@pytest.mark.parametrize("size", [0, 1, 15])
def test_header_size_below_16_is_fatal(size):
    conn = Connection()
    import struct

    with pytest.raises(FatalProtocolError):
        conn.receive(struct.pack("<HHIII", 1, 1, size, 0, 0))


def test_unknown_message_type_is_fatal():
    with pytest.raises(FatalProtocolError):
        Connection().receive(encode(1, 1, 0x2, b""))


def test_fatal_error_closes_fds_of_messages_completed_in_the_same_chunk():
    """A good message with fds followed by a bad header in one chunk: no fd may leak."""
    import struct

    conn = Connection()
    fds = _fds(1)
    good = _req(1, Command.DMA_MAP, bytes(32))
    assert conn.receive(good[:20], fds) == []  # the fds arrive with the message's head
    with pytest.raises(FatalProtocolError):
        conn.receive(good[20:] + struct.pack("<HHIII", 2, 1, 3, 0, 0))
    conn.close()
    assert is_closed(fds[0])


def test_close_releases_fds_of_a_partial_message():
    conn = Connection()
    fds = _fds(2)
    assert conn.receive(_req(1, Command.DMA_MAP, bytes(32))[:20], fds) == []
    conn.close()
    assert all(is_closed(fd) for fd in fds)


def test_error_reply_shape():
    conn = Connection()
    [req] = conn.receive(_req(9, Command.DMA_UNMAP, bytes(24)))
    raw = Connection.error_reply(req, errno.ENOENT)
    assert len(raw) == 16
    msg_id, command, size, flags, err = __import__("struct").unpack("<HHIII", raw)
    assert (msg_id, command, size, flags, err) == (9, Command.DMA_UNMAP, 16, MsgType.REPLY | FLAG_ERROR, errno.ENOENT)


# -- fragmentation ----------------------------------------------------------------------

# A stream of messages, some with fds (count per message), some posted.
STREAM_SPEC = [
    (1, Command.VERSION, b"\0\0" + b'{"capabilities":{}}\0', 0, 0),
    (2, Command.DMA_MAP, bytes(range(32)), 1, 0),
    (3, Command.REGION_WRITE, b"w" * 20, 0, FLAG_NO_REPLY),
    (4, Command.DEVICE_RESET, b"", 0, 0),
    (5, Command.DEVICE_SET_IRQS, bytes(20), 3, 0),
    (6, Command.REGION_READ, bytes(16), 0, 0),
    (7, Command.DMA_MAP, bytes(32), 1, 0),
]


def _stream():
    data = b""
    starts = []
    for msg_id, cmd, payload, _nfds, flags in STREAM_SPEC:
        starts.append(len(data))
        data += encode(msg_id, cmd, flags, payload)
    return data, starts


def _feed(splits: list[int]):
    """Feed the stream cut at ``splits``; each fd-carrying message's fds come with the chunk
    holding its first byte, as Linux delivers them. Returns (events summary, all fds)."""
    data, starts = _stream()
    cuts = sorted(set([0, len(data)] + [s for s in splits if 0 < s < len(data)]))
    fd_of = {}
    all_fds = []
    for (_id, _c, _p, nfds, _f), start in zip(STREAM_SPEC, starts, strict=True):
        if nfds:
            fd_of[start] = _fds(nfds)
            all_fds += fd_of[start]
    conn = Connection()
    events = []
    try:
        for lo, hi in itertools.pairwise(cuts):
            chunk_fds = [fd for start, fds in fd_of.items() if lo <= start < hi for fd in fds]
            events += conn.receive(data[lo:hi], chunk_fds)
        return _summary(events), all_fds
    finally:
        conn.close()
        _close(all_fds)


def _fd_message_ends():
    """Linux ends a recv right after a segment with fds: cut after each fd-carrying message."""
    data, starts = _stream()
    ends = starts[1:] + [len(data)]
    return [end for (spec, end) in zip(STREAM_SPEC, ends, strict=True) if spec[3]]


def _expected(all_fds):
    out = []
    i = 0
    for msg_id, cmd, payload, nfds, flags in STREAM_SPEC:
        out.append(("Message", msg_id, cmd, flags, payload, tuple(all_fds[i : i + nfds]), None))
        i += nfds
    return out


def test_whole_stream_in_one_chunk_per_message():
    data, starts = _stream()
    events, fds = _feed(starts)
    assert events == _expected(fds)


def test_fragmentation_at_every_byte_boundary():
    data, _starts = _stream()
    forced = _fd_message_ends()
    for k in range(1, len(data)):
        events, fds = _feed([k] + forced)
        assert events == _expected(fds), f"split at byte {k}"


def test_one_byte_chunks():
    data, _ = _stream()
    events, fds = _feed(list(range(len(data))))
    assert events == _expected(fds)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=400), max_size=30))
def test_random_fragmentation_yields_identical_messages(splits):
    events, fds = _feed(splits + _fd_message_ends())
    assert events == _expected(fds)
