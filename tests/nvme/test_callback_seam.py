"""The seam for backends whose calls complete by callback (nvme_emu.backends.callback,
callback_work, IoPool.start, NvmCommands._start_async), with a backend of process memory that
completes each call from a thread of its own, held until the test lets it go: no Ceph needed.
What it holds the seam to: the data reaches guest memory on the loop thread only, a quiesce
cancels what is in flight and nothing is copied after it, and failures become statuses."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any, Callable, Self

import pytest

from ..nvme_areas.area_helpers import BUF, Guest, make_area, sqe
from nvme_emu.aio import IoPool
from nvme_emu.backends.base import BackendKind, BackendSpec
from nvme_emu.backends.callback import CallbackBackend, Complete
from nvme_emu.backends.errors import NotReadyError
from nvme_emu.namespace import Namespace
from nvme_emu.nvm import NvmCommands
from nvme_emu.outcome import DEFERRED
from nvme_emu.spec.commands import STATUS_DNR, DsmAttr, NvmOpcode, NvmeError, Status


class HeldBackend(CallbackBackend):
    """Process memory; every call completes from a thread of its own once :meth:`release`d."""

    kind = BackendKind.RAM  # not registered: built by the test

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        self.gate = threading.Event()
        self.gate.set()
        self.fail: BaseException | None = None
        self.completed = threading.Semaphore(0)
        self.threads: set[int] = set()

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        raise NotImplementedError

    @classmethod
    def identity_seed(cls, spec: BackendSpec, controller_seed: str) -> str:
        return "held"

    def _later(self, op: Callable[[], Any], complete: Complete) -> None:
        def run() -> None:
            self.gate.wait(10)
            self.threads.add(threading.get_ident())
            error = self.fail
            complete(None if error else op(), error)
            self.completed.release()

        threading.Thread(target=run, daemon=True).start()

    def start_read(self, offset: int, length: int, complete: Complete) -> None:
        self._later(lambda: bytes(self.data[offset : offset + length]), complete)

    def start_write(self, offset: int, data: bytes, fua: bool, complete: Complete) -> None:
        self._later(lambda: self.data.__setitem__(slice(offset, offset + len(data)), data), complete)

    def start_write_zeroes(self, offset: int, length: int, deallocate: bool, fua: bool, complete: Complete) -> None:
        self._later(lambda: self.data.__setitem__(slice(offset, offset + length), bytes(length)), complete)

    def start_deallocate(self, offset: int, length: int, complete: Complete) -> None:
        self.start_write_zeroes(offset, length, True, False, complete)

    def start_flush(self, complete: Complete) -> None:
        self._later(lambda: None, complete)

    def close(self) -> None:
        pass


@pytest.fixture
def rig():
    guest = Guest()
    area = make_area(guest)
    backend = HeldBackend(1 << 20)
    area.state.namespaces[2] = Namespace(2, backend)
    loop = asyncio.new_event_loop()
    pool = IoPool(loop, workers=1)
    nvm = NvmCommands(area.state, dataclasses.replace(area.hooks, io_pool=lambda: pool))
    try:
        yield area, guest, backend, loop, pool, nvm
    finally:
        pool.close()
        loop.close()
        guest.close()


def serve_until(loop: asyncio.AbstractEventLoop, done: Callable[[], bool]) -> None:
    async def wait() -> None:
        for _ in range(10000):
            if done():
                return
            await asyncio.sleep(0.001)
        raise TimeoutError

    loop.run_until_complete(wait())


def test_data_reaches_guest_memory_on_the_loop_thread_only(rig) -> None:
    area, guest, backend, loop, pool, nvm = rig
    backend.data[4096:8192] = b"\x5a" * 4096
    guest.write(BUF, b"\xee" * 4096)
    read = sqe(NvmOpcode.READ, nsid=2, prp1=BUF, cdw10=8, cdw11=0, cdw12=7)
    assert nvm.execute(area.admin_sq, read) is DEFERRED
    assert backend.completed.acquire(timeout=10)  # the backend's thread completed it...
    assert guest.read(BUF, 4096) == b"\xee" * 4096  # ...and nothing reached the guest off the loop
    assert threading.get_ident() not in backend.threads
    serve_until(loop, lambda: area.record.named("finish_request"))
    assert guest.read(BUF, 4096) == b"\x5a" * 4096
    assert area.record.named("finish_request")[-1][2] == Status.SUCCESS
    assert area.state.namespaces[2].stats.read_commands == 1

    guest.write(BUF, b"\x11" * 4096)  # a write's bytes are taken as it starts
    assert nvm.execute(area.admin_sq, sqe(NvmOpcode.WRITE, nsid=2, prp1=BUF, cdw10=16, cdw11=0, cdw12=7)) is DEFERRED
    serve_until(loop, lambda: len(area.record.named("finish_request")) == 2)
    assert backend.data[8192:12288] == b"\x11" * 4096
    assert nvm.execute(area.admin_sq, sqe(NvmOpcode.WRITE_ZEROES, nsid=2, cdw10=16, cdw11=0, cdw12=3)) is DEFERRED
    guest.write(BUF, (b"\0" * 4 + (4).to_bytes(4, "little") + (20).to_bytes(8, "little")))
    assert nvm.execute(area.admin_sq, sqe(NvmOpcode.DATASET_MANAGEMENT, nsid=2, prp1=BUF, cdw10=0, cdw11=DsmAttr.AD)) is DEFERRED
    serve_until(loop, lambda: len(area.record.named("finish_request")) == 4)
    assert backend.data[8192:12288] == bytes(4096) and pool.pending == 0


def test_quiesce_cancels_and_nothing_is_copied_after(rig) -> None:
    area, guest, backend, loop, pool, nvm = rig
    backend.data[:8192] = b"\x77" * 8192
    guest.write(BUF, b"\xee" * 8192)
    backend.gate.clear()  # the backend holds every completion
    for i in range(2):
        assert nvm.execute(area.admin_sq, sqe(NvmOpcode.READ, cid=i, nsid=2, prp1=BUF + 4096 * i, cdw10=8 * i, cdw11=0, cdw12=7)) is DEFERRED
    assert pool.quiesce(lambda views: True, lambda: NvmeError(Status.DATA_TRANSFER_ERROR, "reset")) == 2
    assert [f[2] for f in area.record.named("finish_request")] == [Status.DATA_TRANSFER_ERROR | STATUS_DNR] * 2
    backend.gate.set()
    assert backend.completed.acquire(timeout=10) and backend.completed.acquire(timeout=10)
    serve_until(loop, lambda: True)
    pool.drain()
    assert guest.read(BUF, 8192) == b"\xee" * 8192 and len(area.record.named("finish_request")) == 2


def test_failures_become_statuses(rig) -> None:
    area, guest, backend, loop, pool, nvm = rig
    backend.fail = NotReadyError("gone")
    assert nvm.execute(area.admin_sq, sqe(NvmOpcode.READ, nsid=2, prp1=BUF, cdw10=0, cdw11=0, cdw12=7)) is DEFERRED
    serve_until(loop, lambda: area.record.named("finish_request"))
    assert area.record.named("finish_request")[-1][2] == Status.NAMESPACE_NOT_READY  # DNR clear
    backend.fail = None

    def refuse(*args: Any) -> None:
        raise NotReadyError("refused as it started")

    backend.start_write = refuse  # type: ignore[method-assign]
    assert nvm.execute(area.admin_sq, sqe(NvmOpcode.WRITE, nsid=2, prp1=BUF, cdw10=0, cdw11=0, cdw12=7)) is DEFERRED
    serve_until(loop, lambda: len(area.record.named("finish_request")) == 2)
    assert area.record.named("finish_request")[-1][2] == Status.NAMESPACE_NOT_READY
