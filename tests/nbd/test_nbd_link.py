"""NbdLink: one libnbd connection driven by a real event loop, against real servers."""

from __future__ import annotations

import asyncio
import errno
import time
from pathlib import Path
from typing import Any

import pytest

from nvme_emu.backends.nbd_link import CmdFlag, ExportFlags, NbdLink, Op, State, buffer
from nvme_emu.backends.libnbd_ffi import ffi
from vfio_user.server import new_event_loop

from .nbd_servers import NbdServer


class Lost(Exception):
    """The test's stand-in for the backend's Namespace Not Ready."""


class Harness:
    """A link on a fresh loop, and ``run(op, ...)`` that waits for the command's completion."""

    def __init__(self, uri: str, timeout: float = 5.0, size: int | None = None) -> None:
        self.loop = new_event_loop()
        self.handshakes: list[ExportFlags] = []

        def on_ready(flags: ExportFlags) -> str | None:
            self.handshakes.append(flags)
            return None if size is None or flags.size == size else f"size {flags.size}, was {size}"

        self.link = NbdLink(uri, self.loop, timeout=timeout, on_ready=on_ready, lost=Lost)

    def start(self, op: Op, offset: int = 0, length: int = 0, buf: Any = None, flags: int = 0) -> asyncio.Future:
        fut = self.loop.create_future()
        self.link.submit(op, offset, length, buf, lambda err: fut.set_result(err), flags)
        return fut

    def run(self, op: Op, offset: int = 0, length: int = 0, buf: Any = None, flags: int = 0, wait: float = 30) -> BaseException | None:
        return self.loop.run_until_complete(asyncio.wait_for(self.start(op, offset, length, buf, flags), wait))

    def write(self, offset: int, data: bytes, flags: int = 0) -> BaseException | None:
        buf = buffer(len(data))
        ffi.memmove(buf, data, len(data))
        return self.run(Op.WRITE, offset, len(data), buf, flags)

    def read(self, offset: int, length: int) -> bytes:
        buf = buffer(length)
        err = self.run(Op.READ, offset, length, buf)
        assert err is None, err
        return bytes(ffi.buffer(buf, length))

    def close(self) -> None:
        self.link.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


@pytest.fixture
def memory(memory_server: NbdServer):
    h = Harness(memory_server.uri)
    yield h
    h.close()


def test_every_command_round_trips(memory: Harness):
    data = bytes(range(256)) * 64
    assert memory.write(8192, data) is None
    assert memory.link.state is State.READY and memory.handshakes[0].size == 64 << 20
    assert memory.read(8192, len(data)) == data
    assert memory.write(0, b"\xaa" * 4096, CmdFlag.FUA) is None
    assert memory.run(Op.FLUSH) is None
    assert memory.run(Op.ZERO, 8192, 4096, flags=CmdFlag.NO_HOLE) is None
    assert memory.read(8192, 8192) == bytes(4096) + data[4096:8192]
    assert memory.run(Op.TRIM, 0, 4096) is None
    assert memory.link.connects == 1 and memory.link.in_flight == 0


def test_many_in_flight_complete_each_once(memory: Harness):
    """QD 64 of mixed reads and writes on one connection: each completes once, in any order."""
    bufs = []
    futs = []
    for i in range(64):
        buf = buffer(4096)
        ffi.memmove(buf, bytes([i]) * 4096, 4096)
        bufs.append(buf)
        futs.append(memory.start(Op.WRITE, i * 4096, 4096, buf))
    results = memory.loop.run_until_complete(asyncio.gather(*futs))
    assert results == [None] * 64
    reads = [buffer(4096) for _ in range(64)]
    futs = [memory.start(Op.READ, i * 4096, 4096, reads[i]) for i in range(64)]
    assert memory.loop.run_until_complete(asyncio.gather(*futs)) == [None] * 64
    assert [bytes(ffi.buffer(b, 1))[0] for b in reads] == list(range(64))


def test_server_error_is_the_commands(memory: Harness):
    """A read past the end is refused by libnbd or the server: an OSError with an errno, and
    the connection stays (not a lost connection)."""
    err = memory.run(Op.READ, 64 << 20, 4096, buffer(4096))
    assert isinstance(err, OSError) and not isinstance(err, Lost) and err.errno in (errno.EINVAL, errno.EIO, errno.ENOSPC)
    assert memory.read(0, 512) == bytes(512)
    assert memory.link.connects == 1


def test_killed_server_fails_commands_then_reconnects(file_server: NbdServer):
    h = Harness(file_server.uri)
    try:
        assert h.write(0, b"\x5a" * 4096) is None and h.run(Op.FLUSH) is None
        file_server.kill()
        t0 = time.monotonic()
        err = h.run(Op.READ, 0, 4096, buffer(4096), wait=10)
        assert isinstance(err, Lost), err
        assert time.monotonic() - t0 < 5
        assert h.link.state is State.IDLE
        err = h.run(Op.READ, 0, 4096, buffer(4096), wait=10)  # refused: still down
        assert isinstance(err, Lost), err
        file_server.start()
        assert h.read(0, 4096) == b"\x5a" * 4096  # the flushed write survived the kill
        assert h.link.connects == 2
    finally:
        h.close()


def test_stopped_server_times_out(memory_server: NbdServer):
    h = Harness(memory_server.uri, timeout=1.0)
    try:
        assert h.read(0, 512) == bytes(512)
        memory_server.stop()
        t0 = time.monotonic()
        err = h.run(Op.READ, 0, 4096, buffer(4096), wait=10)
        took = time.monotonic() - t0
        assert isinstance(err, Lost) and "no answer" in str(err), err
        assert 0.9 <= took < 4, took
        memory_server.cont()
        assert h.read(0, 512) == bytes(512)
    finally:
        h.close()


def test_changed_size_is_refused(tmp_path: Path, memory_server: NbdServer):
    h = Harness(memory_server.uri, size=1 << 20)
    try:
        err = h.run(Op.READ, 0, 512, buffer(512))
        assert isinstance(err, Lost) and "size" in str(err), err
    finally:
        h.close()


def test_close_fails_what_is_in_flight(memory: Harness):
    fut = memory.start(Op.READ, 0, 4096, buffer(4096))  # queued behind the handshake
    memory.link.close()
    err = memory.loop.run_until_complete(asyncio.wait_for(fut, 5))
    assert isinstance(err, Lost) and "closed" in str(err)
    assert isinstance(memory.run(Op.FLUSH), Lost)
