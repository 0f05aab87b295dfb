"""A misbehaving client must not stop the server: half messages, silence, unanswered DMA.

Each server runs ``serve_device.py --probe P``: the probe socket answers ``alive`` from the
server's own event loop, so "the loop still runs" is asked, not assumed. The libvfio-user
backend hands the library a request only once all of it is queued (the library would block in
``recv`` for the rest of a body, or drop a client for half a header), runs the calls that wait
on the client (accept + VERSION, DMA_READ/DMA_WRITE through ``vfu_sgl_read/write``) in a
worker thread, and drops a client that stalls longer than its ``handshake_timeout``.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from vfio_user import messages as m
from vfio_user.constants import HEADER_SIZE, Command, IrqIndex, MsgType
from vfio_user.protocol import encode
from vfio_user.sample import REG_DMA_DST, REG_DMA_SRC, REG_ID, REG_SCRATCH, TICKER_ID
from vfio_user.server_api import ServerBackend
from vfio_user.vmm.client import GuestRam, VfioUserClient

from ..support.server import DEADLINE, ServerProcess
from ..support.wire import read_reply, seconds_until_dropped, version_request
from .libvfio_helpers import BACKENDS, skip_unless_available

LIB = ServerBackend.LIBVFIO_USER
STALL = 0.5  #: --handshake-timeout of the servers that drop stalled clients


def serve(request, tmp_path, backend: str, *extra: str) -> ServerProcess:
    skip_unless_available(backend)
    probe = str(tmp_path / "probe.sock")
    srv = ServerProcess.device(backend, "ticker", str(tmp_path / "ticker.sock"), tmp_path / "server.log", "--probe", probe, *extra)
    srv.baseline_fds = srv.fd_count()
    request.addfinalizer(lambda: _stop(srv))
    return srv


def _stop(srv: ServerProcess) -> None:
    """Teardown: the server must still run (unless the test stopped it) and exit 0 on SIGTERM."""
    running = srv.alive()
    rc = srv.stop()
    print(f"---- server log ({srv.backend}) ----")
    print(srv.log()[-4000:])
    assert rc == 0, f"exit status {rc} (running at teardown: {running})"


def probe_path(srv: ServerProcess) -> str:
    return srv.argv[srv.argv.index("--probe") + 1]


def alive(srv: ServerProcess, timeout: float = 2.0) -> bool:
    """Whether the server's event loop answers the probe within ``timeout`` seconds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(probe_path(srv))
            return s.recv(16) == b"alive\n"
        except (TimeoutError, socket.timeout):
            return False


def negotiated(srv: ServerProcess) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(srv.path)
    s.sendall(version_request())
    msg_id, flags, _ = read_reply(s)
    assert (msg_id, flags & 0xF) == (0, MsgType.REPLY)
    return s


def read_id_request(msg_id: int) -> bytes:
    return encode(msg_id, Command.REGION_READ, MsgType.REQUEST, m.REGION_ACCESS.pack(0, REG_ID, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cut", [7, HEADER_SIZE + 5], ids=["half-header", "header-and-half-body"])
def test_half_a_message_waits_without_blocking_the_loop(request, tmp_path, backend, cut):
    """Half a request, a pause, then the rest: the loop answers meanwhile, and the request is
    served once whole (neither dropped for being slow nor read past its end)."""
    srv = serve(request, tmp_path, backend)
    s = negotiated(srv)
    try:
        req = read_id_request(1)
        s.sendall(req[:cut])
        assert alive(srv), "the server's loop stopped while half a request was queued"
        time.sleep(0.3)
        assert alive(srv)
        s.sendall(req[cut:])
        msg_id, flags, body = read_reply(s)
        assert msg_id == 1 and flags & 0xF == MsgType.REPLY
        assert struct.unpack_from("<I", body, m.REGION_ACCESS.size)[0] == TICKER_ID
        s.sendall(read_id_request(2))  # and the stream is still in step
        assert read_reply(s)[0] == 2
    finally:
        s.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_request_trickled_byte_by_byte(request, tmp_path, backend):
    srv = serve(request, tmp_path, backend)
    s = negotiated(srv)
    try:
        for i in range(3):
            for byte in read_id_request(10 + i):
                s.sendall(bytes([byte]))
                time.sleep(0.002)
            msg_id, _flags, body = read_reply(s)
            assert msg_id == 10 + i
            assert struct.unpack_from("<I", body, m.REGION_ACCESS.size)[0] == TICKER_ID
        assert alive(srv)
    finally:
        s.close()


def _slot_is_free(srv: ServerProcess) -> None:
    assert srv.alive()
    with srv.connect() as c:
        assert struct.unpack("<I", c.region_read(0, REG_ID, 4))[0] == TICKER_ID


@pytest.mark.parametrize("stage", ["silent", "half-version", "half-header", "header-and-half-body"])
def test_stalled_client_is_dropped_and_the_slot_freed(request, tmp_path, stage):
    """libvfio-user backend with a handshake timeout: a client stopped before VERSION or in the
    middle of a message is dropped after about that long, and the next client is served."""
    srv = serve(request, tmp_path, LIB, "--handshake-timeout", str(STALL))
    if stage in ("silent", "half-version"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.path)
        if stage == "half-version":
            s.sendall(version_request()[:HEADER_SIZE + 3])
    else:
        s = negotiated(srv)
        s.sendall(read_id_request(1)[: 7 if stage == "half-header" else HEADER_SIZE + 5])
    try:
        assert alive(srv), "the server's loop stopped while a client stalled"
        took = seconds_until_dropped(s)
    finally:
        s.close()
    assert STALL * 0.5 <= took < STALL + 3.0, took
    assert "no VERSION" in srv.log() if stage in ("silent", "half-version") else "stalled" in srv.log()
    _slot_is_free(srv)
    assert srv.wait_fds(srv.baseline_fds) == srv.baseline_fds


def test_idle_negotiated_client_is_kept(request, tmp_path):
    """Silence between whole messages is not a stall: a VMM is idle for long stretches."""
    srv = serve(request, tmp_path, LIB, "--handshake-timeout", str(STALL))
    with srv.connect() as c:
        time.sleep(STALL * 3)
        assert struct.unpack("<I", c.region_read(0, REG_ID, 4))[0] == TICKER_ID
    assert "stalled" not in srv.log() and "no VERSION" not in srv.log()


def _start_copy_through_messages(c: VfioUserClient, ram: GuestRam, size: int) -> list[int]:
    """Map ``ram`` without an fd and ask the Ticker to copy ``size`` bytes: DMA_READs follow."""
    c.dma_map(0x100000, 1 << 20, ram, with_fd=False)
    efds = c.enable_irqs(IrqIndex.MSIX, 2)
    ram.view[0:size] = os.urandom(size)
    c.region_write(0, REG_SCRATCH, struct.pack("<I", size))
    c.region_write(0, REG_DMA_SRC, struct.pack("<Q", 0x100000))
    c.region_write(0, REG_DMA_DST, struct.pack("<Q", 0x180000))
    return efds


@pytest.mark.parametrize("backend", BACKENDS)
def test_unanswered_dma_read_does_not_block_the_loop(request, tmp_path, backend):
    """The device reads guest memory that has no fd: the server sends DMA_READ and waits for
    the answer. While the client holds it back, the loop still runs; answered, the copy ends."""
    srv = serve(request, tmp_path, backend)
    with GuestRam(1 << 20) as ram, srv.connect() as c:
        _start_copy_through_messages(c, ram, 8192)
        time.sleep(0.2)  # the DMA_READ is on its way to us; we do not answer yet
        assert alive(srv), "the server's loop stopped while a DMA_READ was unanswered"
        deadline = time.monotonic() + DEADLINE
        while ram.view[0x80000 : 0x80000 + 8192] != ram.view[0:8192] and time.monotonic() < deadline:
            c.poll(0.05)
        assert ram.view[0x80000 : 0x80000 + 8192] == ram.view[0:8192]
        assert c.dma_requests_served >= 2  # a DMA_READ, then a DMA_WRITE
        assert struct.unpack("<I", c.region_read(0, REG_ID, 4))[0] == TICKER_ID


def test_dma_never_answered_drops_the_client(request, tmp_path):
    """libvfio-user cannot abandon a DMA exchange halfway; past dma_timeout the client goes,
    the server lives on and serves the next one."""
    srv = serve(request, tmp_path, LIB, "--dma-timeout", "0.5")
    with GuestRam(1 << 20) as ram:
        c = srv.connect()
        try:
            _start_copy_through_messages(c, ram, 4096)
            assert alive(srv)
            took = seconds_until_dropped(c.sock)
        finally:
            c.close()
    assert took < 0.5 + 3.0, took
    assert "not answered" in srv.log()
    _slot_is_free(srv)
    assert srv.wait_fds(srv.baseline_fds) == srv.baseline_fds


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_with_a_half_message_queued(request, tmp_path, backend):
    """A stalled client does not keep the server from shutting down cleanly."""
    srv = serve(request, tmp_path, backend)
    s = negotiated(srv)
    try:
        s.sendall(read_id_request(1)[: HEADER_SIZE + 5])
        assert alive(srv)
        t0 = time.monotonic()
        assert srv.stop(timeout=5) == 0
        assert time.monotonic() - t0 < 5
    finally:
        s.close()
    assert not os.path.exists(srv.path)
