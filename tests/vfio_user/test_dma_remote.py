"""The server's DMA_READ/DMA_WRITE path against clients that answer badly, in-process so the
test can call the device's GuestMemory directly: every failure must surface as a DmaError.

Every test runs on both backends: ours and libvfio-user (``vfu_sgl_read/write``, skipped with
the reason printed where the library is not installed). Where they differ, the test says how.
"""

from __future__ import annotations

import asyncio
import errno
import struct
import time

import pytest

from vfio_user import messages as m
from vfio_user.vmm.client import GuestRam, VfioUserClient
from vfio_user.constants import Command, MsgType, FLAG_ERROR
from vfio_user.dma import DmaError
from vfio_user.protocol import Message, encode
from vfio_user.sample import Ticker
from vfio_user.server_api import ServerBackend

from ..libvfio.libvfio_helpers import BACKENDS, skip_unless_available
from ..support.inproc import InProcessServer
from ..support.server import DEADLINE

LIB = ServerBackend.LIBVFIO_USER


@pytest.fixture(params=BACKENDS)
def inproc(request, tmp_path):
    skip_unless_available(request.param)
    srv = InProcessServer(Ticker(), str(tmp_path / "dma.sock"), backend=request.param, dma_timeout=1.0)
    try:
        yield srv.server, srv.loop, srv.device
    finally:
        srv.close()


def _next_server_request(client: VfioUserClient) -> Message:
    while True:
        for i, ev in enumerate(client._events):
            if isinstance(ev, Message) and not ev.is_reply:
                del client._events[i]
                return ev
        client._receive(DEADLINE)


def _start(loop, device, coro_fn):
    async def run():
        return await coro_fn(device.ctx.memory)

    return asyncio.run_coroutine_threadsafe(run(), loop)


def _connected(server, ram):
    c = VfioUserClient(server.path, timeout=DEADLINE)
    c.negotiate()
    c.dma_map(0x10000, 0x10000, ram, with_fd=False)
    return c


BAD_READ_REPLIES = {
    "header-only": lambda req: encode(req.msg_id, req.command, MsgType.REPLY),
    "short-data": lambda req: encode(req.msg_id, req.command, MsgType.REPLY, req.payload[:16] + b"\0" * 3),
    "wrong-address": lambda req: encode(req.msg_id, req.command, MsgType.REPLY, m.DMA_ACCESS.pack(0x20000, 8) + bytes(8)),
    "wrong-count": lambda req: encode(req.msg_id, req.command, MsgType.REPLY, m.DMA_ACCESS.pack(0x10000, 4) + bytes(8)),
}


#: libvfio-user checks a DMA reply's size, address and count (EINVAL), and takes a reply whose
#: payload ends before the data it announced as a broken connection: it drops the client
#: (ENOTCONN). Ours answers EIO and keeps the client.
LIB_READ_ERRNO = {"header-only": errno.EINVAL, "short-data": errno.ENOTCONN, "wrong-address": errno.EINVAL, "wrong-count": errno.EINVAL}


def _dropped(c: VfioUserClient) -> bool:
    """Whether the server closed this client's connection."""
    try:
        c.region_read(0, 0, 4)
    except (ConnectionError, OSError):
        return True
    return False


def _serves_next_client(server) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:  # the server may still be noticing the last client's departure
        try:
            with VfioUserClient(server.path, timeout=DEADLINE) as c:
                c.negotiate()
                assert c.region_read(0, 0, 4) == struct.pack("<I", 0x7E571C4E)
                return
        except (ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("kind", list(BAD_READ_REPLIES))
def test_malformed_dma_read_reply_is_a_dma_error(inproc, kind):
    server, loop, device = inproc
    lib = server.backend == LIB
    with GuestRam(1 << 20) as ram:
        c = _connected(server, ram)
        try:
            fut = _start(loop, device, lambda mem: mem.aread(0x10000, 8))
            req = _next_server_request(c)
            assert req.command == Command.DMA_READ and m.DMA_ACCESS.unpack_from(req.payload) == (0x10000, 8)
            c.send_raw(BAD_READ_REPLIES[kind](req))
            with pytest.raises(DmaError) as e:
                fut.result(DEADLINE)
            assert e.value.errno == (LIB_READ_ERRNO[kind] if lib else errno.EIO)
            if lib and kind == "short-data":
                assert _dropped(c)
            else:
                c.region_read(0, 0, 4)  # the connection still works
        finally:
            c.close()
    _serves_next_client(server)


def test_dma_error_reply_carries_the_clients_errno(inproc):
    server, loop, device = inproc
    with GuestRam(1 << 20) as ram:
        c = _connected(server, ram)
        try:
            fut = _start(loop, device, lambda mem: mem.awrite(0x10000, b"x" * 8))
            req = _next_server_request(c)
            assert req.command == Command.DMA_WRITE
            assert m.DMA_ACCESS.unpack_from(req.payload) == (0x10000, 8) and req.payload[16:] == b"x" * 8
            c.send_raw(encode(req.msg_id, req.command, MsgType.REPLY | FLAG_ERROR, b"", errno.ENODEV))
            with pytest.raises(DmaError) as e:
                fut.result(DEADLINE)
            assert e.value.errno == errno.ENODEV
        finally:
            c.close()


def test_dma_request_pending_at_disconnect_fails(inproc):
    server, loop, device = inproc
    with GuestRam(1 << 20) as ram:
        c = _connected(server, ram)
        fut = _start(loop, device, lambda mem: mem.aread(0x10000, 8))
        _next_server_request(c)
        c.close()
        with pytest.raises(DmaError) as e:
            fut.result(DEADLINE)
        assert e.value.errno == errno.ENOTCONN


def test_dma_timeout_then_late_reply_is_dropped(inproc):
    """Both backends give up after dma_timeout with ETIMEDOUT. Ours keeps the client and drops
    the late reply; libvfio-user cannot leave an exchange halfway, so the client is dropped."""
    server, loop, device = inproc
    with GuestRam(1 << 20) as ram:
        c = _connected(server, ram)
        try:
            fut = _start(loop, device, lambda mem: mem.aread(0x10000, 8))
            req = _next_server_request(c)
            with pytest.raises(DmaError) as e:
                fut.result(DEADLINE)  # the server gives up after its dma_timeout
            assert e.value.errno == errno.ETIMEDOUT
            if server.backend == LIB:
                assert _dropped(c)
                _serves_next_client(server)
                return
            c.send_raw(encode(req.msg_id, req.command, MsgType.REPLY, req.payload + bytes(8)))  # too late
            assert c.region_read(0, 0, 4) == struct.pack("<I", 0x7E571C4E)
            assert c._events == []
        finally:
            c.close()


def test_dma_spanning_fd_and_message_mappings(inproc):
    """One access across two adjacent mappings: the fd part is read directly, the rest by message."""
    server, loop, device = inproc
    with GuestRam(1 << 20) as ram:
        c = VfioUserClient(server.path, timeout=DEADLINE)
        try:
            c.negotiate()
            c.dma_map(0x100000, 0x1000, ram, ram_offset=0x1000)  # fd
            c.dma_map(0x101000, 0x1000, ram, ram_offset=0x2000, with_fd=False)  # messages
            ram.view[0x1000:0x3000] = bytes(range(256)) * 32
            fut = _start(loop, device, lambda mem: mem.aread(0x100800, 0x1000))
            while not fut.done():
                c.poll(0.05)
            assert fut.result() == (bytes(range(256)) * 32)[0x800:0x1800]
            assert c.dma_requests_served == 1  # only the fd-less half went by message
            fut = _start(loop, device, lambda mem: mem.awrite(0x100F00, b"\xAB" * 0x200))
            while not fut.done():
                c.poll(0.05)
            fut.result()
            assert bytes(ram.view[0x1F00:0x2100]) == b"\xAB" * 0x200
        finally:
            c.close()


def test_read_only_mapping_refuses_device_writes(inproc):
    server, loop, device = inproc
    with GuestRam(1 << 20) as ram:
        c = VfioUserClient(server.path, timeout=DEADLINE)
        try:
            c.negotiate()
            c.dma_map(0x100000, 0x1000, ram, writable=False)
            c.dma_map(0x200000, 0x1000, ram, writable=False, with_fd=False)
            for iova in (0x100000, 0x200000):
                fut = _start(loop, device, lambda mem, iova=iova: mem.awrite(iova, b"x"))
                with pytest.raises(DmaError) as e:
                    fut.result(DEADLINE)
                assert e.value.errno == errno.EPERM
            fut = _start(loop, device, lambda mem: mem.aread(0x300000, 4))
            with pytest.raises(DmaError) as e:
                fut.result(DEADLINE)
            assert e.value.errno == errno.EFAULT
            assert c.dma_requests_served == 0
        finally:
            c.close()
