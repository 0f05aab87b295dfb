"""Hostile client, sans-IO: hypothesis drives the protocol core and the request handler.

A :class:`Connection` (framing) and a :class:`ServerSession` (request handling) in front of
the real NVMe function (RAM namespace, trapped doorbells) are fed random and mutated
messages in random chunkings, with real memfds and eventfds riding along. Properties:

- framing raises nothing but :class:`FatalProtocolError` (the transport then drops the client);
- the handler never raises, and answers every request that wants an answer with a well-formed
  reply carrying the request's id;
- after the session closes, every fd the "client" sent is closed and every DMA mapping is
  unmapped (counted in /proc/self/fd and /proc/self/maps);
- a fresh session on the same device still negotiates and reads a register.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvme_emu.controller import ControllerConfig
from nvme_emu.function import NvmeFunction
from nvme_emu.namespace_spec import open_namespace
from vfio_user import messages as m
from vfio_user.vmm.client import QEMU_CAPABILITIES
from vfio_user.constants import FLAG_ERROR, FLAG_NO_REPLY, HEADER_SIZE, Command, MsgType
from vfio_user.device import DeviceContext
from vfio_user.dma import GuestMemory
from vfio_user.memfd import sealed_memfd
from vfio_user.protocol import Connection, FatalProtocolError, Message, Rejected, encode
from vfio_user.session import ServerSession

from ..support.fds import is_closed

FUZZ_RAM = 1 << 20  # the memfd random DMA_MAPs point into


def _open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


def _memfd_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "memfd:hostile" in line)


class Rig:
    """Device + session + framing, attached the way the transport attaches them."""

    def __init__(self) -> None:
        ns = open_namespace("ram:size=1M", 1)
        self.function = NvmeFunction([ns], ControllerConfig(max_io_queues=4, msix_vectors=5), doorbell="trap")
        self.loop = asyncio.new_event_loop()
        self.open_session()

    def open_session(self) -> None:
        self.session = ServerSession(self.function)
        self.conn = Connection()
        self.memory = GuestMemory(self.session.dma)
        self.function.attached(DeviceContext(memory=self.memory, irqs=self.session.irqs, loop=self.loop))

    def close_session(self) -> None:
        self.conn.close()
        self.function.detached()
        self.session.close()
        # callbacks the device scheduled (loop_soon) run now, as they would on the server loop
        self.loop.run_until_complete(asyncio.sleep(0))

    def feed(self, data: bytes, fds: list[int]) -> list[bytes]:
        """One chunk in; the replies out (and their fds dropped: the device owns those)."""
        try:
            events = self.conn.receive(data, fds)
        except FatalProtocolError:
            raise
        replies = []
        for ev in events:
            if isinstance(ev, Rejected):
                if not ev.is_reply and not ev.no_reply:
                    replies.append(Connection.error_reply(ev, ev.errno))
                continue
            if ev.is_reply:  # a reply we never asked for: the transport drops it
                ev.close_fds()
                continue
            reply = self.session.handle(ev)
            self.loop.run_until_complete(asyncio.sleep(0))
            assert ev.fds == [], "handler left fds on the message"
            if ev.no_reply:
                assert reply is None
            else:
                assert reply is not None, f"no reply to command {ev.command}"
                msg_id, command, size, flags, _err = m.HEADER.unpack_from(reply.data)
                assert (msg_id, command, size) == (ev.msg_id, ev.command, len(reply.data))
                assert flags & 0xF == MsgType.REPLY
                replies.append(reply.data)
        return replies

    def close(self) -> None:
        self.close_session()
        self.function.close()
        self.loop.close()


def _version(caps=None) -> bytes:
    return m.VersionPayload.build({"major": 0, "minor": 2, "json": m.encode_version_json(QEMU_CAPABILITIES if caps is None else caps)})


u32 = st.integers(0, 2**32 - 1)
#: mostly addresses inside / at the edges of the fuzz RAM, sometimes anything
u64 = st.one_of(
    st.integers(0, 255).map(lambda x: x * 4096),
    st.sampled_from([0, 4096, FUZZ_RAM - 4096, FUZZ_RAM, FUZZ_RAM * 2, 2**64 - 4096, 2**63]),
    st.integers(0, 2**64 - 1),
)
pages = st.integers(1, 256).map(lambda x: x * 4096) | u64
#: register values a host would write (CC enable/shutdown, AQA, queue bases, doorbell values)
REG_VALUES = [0x460001, 0x464001, 0x460000, 0x0F000F, 0x1F001F, 0x10000, 0x20000, 0x0, 1, 5, 31, 32, 0xFFFFFFFF, 0x4E564D65]
BAR0_OFFSETS = [0x14, 0x14, 0x24, 0x28, 0x2C, 0x30, 0x34, 0x1C, 0x20, 0x0C, 0x10, 0x1000, 0x1000, 0x1004, 0x1008, 0x100C, 0x1010, 0x1048, 0x1FFC, 0x4, 0x0]


@st.composite
def payloads(draw, command: int) -> bytes:
    c = command
    if c == Command.VERSION:
        caps = draw(
            st.one_of(
                st.just(None),
                st.dictionaries(
                    st.sampled_from(["max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps", "migration", "x"]),
                    st.one_of(st.integers(-5, 2**40), st.text(max_size=4), st.booleans(), st.none()),
                    max_size=4,
                ),
            )
        )
        try:
            return _version(caps)
        except Exception:
            return _version()
    if c == Command.DMA_MAP:
        return m.DmaMap.build(
            {
                "argsz": draw(st.sampled_from([32, 32, 32, 0, 31, 33])),
                "flags": draw(st.sampled_from([3, 3, 1, 0, 2, 7])),
                "offset": draw(st.sampled_from([0, 0, 4096, FUZZ_RAM - 4096, FUZZ_RAM]) | u64),
                "address": draw(u64),
                "size": draw(pages),
            }
        )
    if c == Command.DMA_UNMAP:
        return m.DmaUnmap.build(
            {"argsz": draw(st.sampled_from([24, 24, 0, 25])), "flags": draw(st.sampled_from([0, 0, 2, 1, 3])), "address": draw(u64), "size": draw(pages)}
        )
    if c in (Command.DEVICE_GET_INFO,):
        return m.DeviceInfo.build({"argsz": draw(st.sampled_from([16, 0, 1000])), "flags": 0, "num_regions": 0, "num_irqs": 0})
    if c == Command.DEVICE_GET_REGION_INFO:
        return m.RegionInfo.build(
            {
                "argsz": draw(st.sampled_from([32, 0, 4096, 2**32 - 1])),
                "flags": 0,
                "index": draw(st.integers(0, 12) | u32),
                "cap_offset": 0,
                "size": 0,
                "offset": 0,
            }
        )
    if c == Command.DEVICE_GET_REGION_IO_FDS:
        return m.RegionIoFdsRequest.build(
            {
                "argsz": draw(st.sampled_from([16, 0, 64, 4096, 2**32 - 1])),
                "flags": draw(st.sampled_from([0, 0, 1])),
                "index": draw(st.integers(0, 10)),
                "count": draw(st.sampled_from([0, 0, 1])),
            }
        )
    if c == Command.DEVICE_GET_IRQ_INFO:
        return m.IrqInfo.build({"argsz": draw(st.sampled_from([16, 0])), "flags": 0, "index": draw(st.integers(0, 8) | u32), "count": 0})
    if c == Command.DEVICE_SET_IRQS:
        count = draw(st.integers(0, 8) | u32)
        data = draw(st.binary(max_size=16))
        return m.SetIrqs.build(
            {
                "argsz": draw(st.sampled_from([20, 20 + len(data), 0, 2**32 - 1])),
                "flags": draw(st.sampled_from([0x24, 0x24, 0x21, 0x22, 0x11, 0x14, 0x01]) | st.integers(0, 0x3F)),
                "index": draw(st.sampled_from([2, 2, 0, 1, 3, 4, 5, 6])),
                "start": draw(st.integers(0, 8) | u32),
                "count": count,
                "data": data,
            }
        )
    if c in (Command.REGION_READ, Command.REGION_WRITE):
        index = draw(st.sampled_from([0] * 8 + [4, 7, 7, 8, 9, 2**32 - 1]))
        offset = draw(st.sampled_from(BAR0_OFFSETS)) if draw(st.integers(0, 7)) else draw(u64)
        if c == Command.REGION_READ:
            count = draw(st.sampled_from([1, 2, 4, 4, 8]) | st.integers(0, 4096) | u32)
            return m.REGION_ACCESS.pack(offset, index, count)
        data = draw(st.sampled_from(REG_VALUES).map(lambda v: struct.pack("<I", v)) | st.binary(min_size=0, max_size=16))
        count = len(data) if draw(st.integers(0, 5)) else draw(u32)
        return m.REGION_ACCESS.pack(offset, index, count) + data
    if c == Command.REGION_WRITE_MULTI:
        n = draw(st.integers(0, 4))
        entries = b"".join(
            struct.pack(
                "<QII8s",
                draw(st.sampled_from(BAR0_OFFSETS) | u64),
                draw(st.sampled_from([0, 0, 7, 9])),
                draw(st.sampled_from([4, 4, 8, 0, 10])),
                draw(st.sampled_from(REG_VALUES).map(lambda v: struct.pack("<Q", v)) | st.binary(min_size=8, max_size=8)),
            )
            for _ in range(n)
        )
        return struct.pack("<Q", draw(st.sampled_from([n, n, n, n + 1, 0, 2**64 - 1]))) + entries
    return draw(st.binary(max_size=64))


@st.composite
def messages(draw) -> tuple[bytes, int, int]:
    """(wire bytes, number of fds to send with it, fd kind): mostly well-formed, sometimes not."""
    pick = draw(st.integers(0, 19))
    if pick == 0:
        command = draw(st.integers(0, 0xFFFF))
    elif pick < 8:
        command = draw(st.sampled_from([c for c in Command if c != Command.VERSION]))
    else:
        command = draw(
            st.sampled_from(
                [Command.REGION_WRITE] * 4 + [Command.REGION_READ, Command.DMA_MAP, Command.DMA_UNMAP, Command.DEVICE_SET_IRQS, Command.REGION_WRITE_MULTI]
            )
        )
    payload = draw(payloads(command))
    if draw(st.integers(0, 9)) == 0:  # byte-level mutation
        if payload:
            i = draw(st.integers(0, len(payload) - 1))
            payload = payload[:i] + bytes([draw(st.integers(0, 255))]) + payload[i + 1 :]
        payload = payload[: draw(st.integers(0, len(payload)))]
    flags = draw(st.sampled_from([MsgType.REQUEST] * 6 + [MsgType.REQUEST | FLAG_NO_REPLY, MsgType.REPLY, MsgType.REPLY | FLAG_ERROR]))
    msg_id = draw(st.integers(0, 0xFFFF))
    data = encode(msg_id, command, flags, payload)
    if command == Command.DMA_MAP:
        nfds = draw(st.sampled_from([1, 1, 1, 0, 2]))
    elif command == Command.DEVICE_SET_IRQS:
        nfds = draw(st.sampled_from([0, 1, 2, 4, 5, 20]))
    else:
        nfds = draw(st.sampled_from([0] * 12 + [1, 3]))
    kind = FD_MEMFD if command == Command.DMA_MAP else FD_EVENTFD
    if draw(st.integers(0, 4)) == 0:  # the wrong kind: any fd a hostile client can pass
        kind = draw(st.sampled_from(FD_KINDS))
    return data, nfds, kind


#: Kinds of fd riding along: what DMA_MAP (guest memory) and SET_IRQS (eventfd) expect, and
#: what they must refuse without keeping it: pipes, sockets, /dev/null, a directory, a memfd
#: too small for any mapping.
FD_MEMFD, FD_EVENTFD, FD_PIPE, FD_SOCKET, FD_DEVNULL, FD_DIRECTORY, FD_SMALL_MEMFD = range(7)
FD_KINDS = [FD_MEMFD, FD_EVENTFD, FD_PIPE, FD_SOCKET, FD_DEVNULL, FD_DIRECTORY, FD_SMALL_MEMFD]


def _make_fd(ram_fd: int, kind: int) -> int:
    """A fresh fd of ``kind``; the caller closes it after sending."""
    if kind == FD_MEMFD:
        return os.dup(ram_fd)  # guest memory, as a DMA_MAP carries
    if kind == FD_EVENTFD:
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    if kind == FD_PIPE:
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(w)
        return r
    if kind == FD_SOCKET:
        a, b = socket.socketpair()
        b.close()
        return a.detach()
    if kind == FD_DEVNULL:
        return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    if kind == FD_DIRECTORY:
        return os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)  # FD_SMALL_MEMFD: one page, smaller than most maps ask for
    return fd


@pytest.fixture(scope="module")
def rig():
    r = Rig()
    yield r
    r.function.close()
    r.loop.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(prologue=st.integers(0, 7).map(bool), msgs=st.lists(messages(), max_size=40), cuts=st.lists(st.integers(1, 200), max_size=30))
def test_random_message_streams(rig, prologue, msgs, cuts):
    before = _open_fds()
    maps_before = _memfd_maps()
    ram_fd = sealed_memfd("hostile", FUZZ_RAM)  # sealed, as QEMU's guest RAM, so its maps are taken
    stream = b""
    fd_at: dict[int, list[int]] = {}  # stream offset -> fds sent with the chunk starting there
    if prologue:
        stream += encode(0xFFFE, Command.VERSION, MsgType.REQUEST, _version())
    for data, nfds, kind in msgs:
        if nfds:
            fd_at[len(stream)] = [_make_fd(ram_fd, kind) for _ in range(nfds)]
        stream += data
    os.close(ram_fd)
    # cut the stream into chunks; a message with fds starts a chunk, as one sendmsg does
    bounds = sorted(set(fd_at) | {0})
    chunks: list[tuple[bytes, list[int]]] = []
    ci = 0
    for k, start in enumerate(bounds):
        end = bounds[k + 1] if k + 1 < len(bounds) else len(stream)
        pos = start
        first = True
        while pos < end:
            step = cuts[ci % len(cuts)] if cuts else end - pos
            ci += 1
            chunks.append((stream[pos : min(end, pos + step)], fd_at.get(start, []) if first else []))
            first = False
            pos += step
        if start == end and start in fd_at:  # fds with nothing after them
            for fd in fd_at[start]:
                os.close(fd)
    fatal = False
    try:
        for data, fds in chunks:
            if fatal:
                for fd in fds:
                    os.close(fd)
                continue
            try:
                rig.feed(data, fds)
            except FatalProtocolError:
                fatal = True  # the transport closes the connection here
    finally:
        rig.close_session()
    # every fd handed in is gone, every mapping unmapped
    assert rig.session.dma.open_count() == 0
    assert _memfd_maps() == maps_before
    leaked = _open_fds() - before
    assert not leaked, f"fds left open: {sorted(leaked)}"
    # and a new client is served
    rig.open_session()
    replies = rig.feed(
        encode(1, Command.VERSION, MsgType.REQUEST, _version()) + encode(2, Command.REGION_READ, MsgType.REQUEST, m.REGION_ACCESS.pack(0, 0, 8)), []
    )
    assert len(replies) == 2 and not m.HEADER.unpack_from(replies[1])[3] & FLAG_ERROR
    cap = int.from_bytes(replies[1][HEADER_SIZE + 16 :], "little")
    assert cap & 0xFFFF == rig.function.controller.config.max_queue_entries - 1


@settings(max_examples=200, deadline=None)
@given(header=st.binary(min_size=16, max_size=16), tail=st.binary(max_size=64))
def test_garbage_headers_are_fatal_or_rejected_never_crash(header, tail):
    conn = Connection()
    try:
        events = conn.receive(header + tail)
    except FatalProtocolError:
        return
    finally:
        conn.close()
    for ev in events:
        assert isinstance(ev, (Message, Rejected))
        if isinstance(ev, Message):
            ev.close_fds()


@settings(max_examples=50, deadline=None)
@given(size=st.integers(HEADER_SIZE, 2**32 - 1), nfds=st.integers(0, 253))
def test_huge_sizes_and_fd_floods_are_refused_without_buffering(size, nfds):
    """A header announcing up to 4 GiB and up to 253 fds: refused (E2BIG/EINVAL), fds closed,
    nothing larger than the limit is ever buffered, the stream stays in sync."""
    conn = Connection()
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
    try:
        head = struct.pack("<HHIII", 7, Command.REGION_WRITE, size, MsgType.REQUEST, 0)
        events = conn.receive(head + bytes(min(size - HEADER_SIZE, 1 << 16)), fds)
        limit = conn.max_msg_size
        if size > limit or nfds > conn.max_msg_fds:
            assert all(is_closed(fd) for fd in fds)
            assert len(conn._buf) <= (1 << 16) + HEADER_SIZE
        for ev in events:
            if isinstance(ev, Message):
                ev.close_fds()
    finally:
        conn.close()
    assert all(is_closed(fd) for fd in fds), "the connection must own (and close) every fd it was given"





def test_dma_map_of_a_non_file_fd_at_a_huge_offset_is_refused_cleanly(rig):
    """Found by the fuzzer: mmap() raised OverflowError (offset beyond off_t) for an fd that is
    not a regular file, which the session reported as a device failure (EIO). Now EINVAL."""
    rig.close_session()
    rig.open_session()
    rig.feed(encode(1, Command.VERSION, MsgType.REQUEST, _version()), [])
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    payload = m.DmaMap.build({"argsz": 32, "flags": 3, "offset": 2**63, "address": 0x100000, "size": 4096})
    [reply] = rig.feed(encode(2, Command.DMA_MAP, MsgType.REQUEST, payload), [efd])
    _id, _cmd, _size, flags, err = m.HEADER.unpack_from(reply)
    assert flags & FLAG_ERROR and err == errno.EINVAL
    assert is_closed(efd)
