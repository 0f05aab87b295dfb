"""Helpers for the doorbell-path tests.

* :func:`serve`: ``nvme-emu serve --doorbell MODE`` as a separate process
  (:class:`~tests.support.server.ServerProcess`, counters read with SIGUSR1).
* :class:`NvmeInProcess`: the same server + :class:`NvmeFunction` on an event loop in a daemon
  thread of this process, for tests that need the internal counters or must hold the server
  still (``paused()``) while the host rings.
* :class:`HostSession`: the real :class:`VfioUserClient` + :class:`NvmeHost` with memfd guest
  RAM DMA-mapped into the server, and one constructor per host doorbell strategy.

Nothing here asserts on time: every wait is bounded by :data:`DEADLINE` and only fails a test
that would otherwise hang.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any, Sequence

from nvme_emu.controller import ControllerConfig
from nvme_emu.function import NvmeFunction
from nvme_emu.testing.host import (
    HostDoorbells,
    HostMemory,
    MappedDoorbells,
    NvmeHost,
    ShadowBufferDoorbells,
    ShadowIoEventFdDoorbells,
)
from nvme_emu.namespace_spec import open_namespace
from nvme_emu.spec.commands import AdminOpcode, NvmOpcode, Status
from nvme_emu.spec.registers import Reg
from vfio_user.constants import IO_FD_TYPE_IOEVENTFD, IO_FD_TYPE_IOEVENTFD_SHADOW, REGION_FLAG_MMAP
from vfio_user.vmm.client import GuestRam, IoFd, VfioUserClient

from ..support.inproc import InProcessServer
from ..support.server import DEADLINE, ServerProcess

PAGE = 4096
LBA = 512
IOVA = 0x1000_0000
RAM_SIZE = 8 << 20
MAX_IO_QUEUES = 8
NS_SIZE = 16 << 20

#: The host doorbell strategies every path test runs with: (server --doorbell mode, host kind).
PATHS = {
    "trap": ("trap", "trap"),
    "shadow": ("shadow", "shadow"),
    "poll": ("poll", "poll"),
    "dbbuf-trap": ("trap", "dbbuf-trap"),
    "dbbuf-ioeventfd": ("ioeventfd", "dbbuf-ioeventfd"),
    # dbbuf works with the other paths too: the kick goes by shadow ioeventfd / mapped page
    "dbbuf-shadow": ("shadow", "dbbuf-shadow"),
    "dbbuf-poll": ("poll", "dbbuf-poll"),
}


def serve(tmp_path: Path, mode: str, *, namespace: str = f"ram:size={NS_SIZE}", spin_us: float | None = None, name: str = "nvme",
          extra: Sequence[str] = ()) -> ServerProcess:
    """``nvme-emu serve --doorbell MODE`` with :data:`MAX_IO_QUEUES` queues on one namespace."""
    args = ["--queues", str(MAX_IO_QUEUES)] + (["--spin-us", str(spin_us)] if spin_us is not None else []) + list(extra)
    return ServerProcess.serve(str(tmp_path / f"{name}.sock"), tmp_path / f"{name}.log", [namespace], doorbell=mode, extra=args)


class NvmeInProcess(InProcessServer):
    """An NVMe function on one namespace served in this process, with its counters."""

    def __init__(self, path: str, mode: str, *, spin_us: float = 0.0, namespace: str = f"ram:size={NS_SIZE}", **options: Any) -> None:
        ns = open_namespace(namespace, 1)
        self.function = NvmeFunction([ns], ControllerConfig(max_io_queues=MAX_IO_QUEUES), doorbell=mode, spin_us=spin_us, **options)
        self.ctrl = self.function.controller
        super().__init__(self.function, path)

    @property
    def doorbells(self):
        return self.function.doorbells

    def stats(self) -> dict:
        return self.call(self.function.stats)

    def doorbell_stats(self) -> dict:
        return self.stats()["doorbells"]


# --------------------------------------------------------------------------------------
# the host side
# --------------------------------------------------------------------------------------
class HostSession:
    """A negotiated client, memfd guest RAM mapped at :data:`IOVA`, and an NvmeHost on it."""

    def __init__(self, path: str, *, ram: object | None = None, ram_size: int = RAM_SIZE, iova: int = IOVA, mem_offset: int = 0) -> None:
        self.client = VfioUserClient(path, timeout=DEADLINE)
        self.own_ram = ram is None
        self.ram = GuestRam(ram_size) if ram is None else ram
        try:
            self.client.negotiate()
            self.client.dma_map(iova, ram_size, self.ram)
        except BaseException:
            self.close()
            raise
        self.view = self.ram.view[mem_offset:ram_size]
        self.mem = HostMemory(self.view, iova + mem_offset)
        self.host = NvmeHost(self.client, self.mem, poll=lambda: time.sleep(0.0002))
        self.iofds: list[IoFd] = []
        self.kind = "trap"
        self.dbbuf: tuple[int, int] | None = None
        self.kicks_by_slot: dict[int, int] = {}

    # -- doorbell strategies -----------------------------------------------------------

    def use(self, kind: str) -> None:
        """Select the host doorbell strategy for ``kind`` (see :data:`PATHS`); call after
        :meth:`enable` for the dbbuf kinds (Doorbell Buffer Config is an admin command)."""
        self.kind = kind
        if kind == "trap":
            self.host.doorbells = HostDoorbells(self.client)
        elif kind == "shadow":
            self.iofds = self.client.region_io_fds(0)
            assert self.iofds and all(f.type == IO_FD_TYPE_IOEVENTFD_SHADOW for f in self.iofds)
            self.host.doorbells = ShadowIoEventFdDoorbells(self.client, self.iofds)
        elif kind == "poll":
            self.host.doorbells = MappedDoorbells(self.client, self.mapped_doorbell_page())
        elif kind == "dbbuf-trap":
            self.host.doorbells = self.shadow_buffer(HostDoorbells(self.client), kick=None)
        elif kind == "dbbuf-shadow":
            self.iofds = self.client.region_io_fds(0)
            self.host.doorbells = self.shadow_buffer(ShadowIoEventFdDoorbells(self.client, self.iofds), kick=None)
        elif kind == "dbbuf-poll":
            self.host.doorbells = self.shadow_buffer(MappedDoorbells(self.client, self.mapped_doorbell_page()), kick=None)
        elif kind == "dbbuf-ioeventfd":
            self.iofds = self.client.region_io_fds(0)
            assert self.iofds and all(f.type == IO_FD_TYPE_IOEVENTFD and f.shadow is None for f in self.iofds)
            by_slot = {(f.gpa_offset - Reg.DOORBELLS) // 4: f for f in self.iofds}
            # What KVM does with a plain ioeventfd: signal, drop the value (it is in the shadow).
            self.host.doorbells = self.shadow_buffer(HostDoorbells(self.client), kick=lambda slot, value: by_slot[slot].signal())
        else:
            raise ValueError(kind)

    def mapped_doorbell_page(self):
        info = self.client.region_info(0)
        assert info.flags & REGION_FLAG_MMAP and info.areas == [(Reg.DOORBELLS, PAGE)], info
        maps = self.client.mmap_region(info)
        return maps[Reg.DOORBELLS]

    def shadow_buffer(self, inner: HostDoorbells, kick) -> ShadowBufferDoorbells:
        """Doorbell Buffer Config with fresh zeroed pages (as Linux after every enable)."""
        shadow, eventidx = self.mem.alloc(PAGE), self.mem.alloc(PAGE)
        self.mem.write(shadow, bytes(PAGE))
        self.mem.write(eventidx, bytes(PAGE))
        self.host.doorbells = inner  # the admin command itself goes through the real doorbell
        self.host.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=shadow, prp2=eventidx)
        self.dbbuf = (shadow, eventidx)
        base_kick = kick or inner.ring

        def counted(slot: int, value: int) -> None:
            self.kicks_by_slot[slot] = self.kicks_by_slot.get(slot, 0) + 1
            base_kick(slot, value)

        return ShadowBufferDoorbells(inner, self.mem, shadow, eventidx, kick=counted)

    def eventidx(self, slot: int) -> int:
        assert self.dbbuf is not None
        return self.mem.u32(self.dbbuf[1] + 4 * slot)

    def shadow_tail(self, slot: int) -> int:
        assert self.dbbuf is not None
        return self.mem.u32(self.dbbuf[0] + 4 * slot)

    # -- bring-up ----------------------------------------------------------------------

    def bring_up(self, kind: str, *, depth: int = 32, qid: int = 1) -> None:
        """Enable, pick the doorbell strategy, create one I/O queue pair."""
        self.host.doorbells = HostDoorbells(self.client)
        self.host.enable()
        self.use(kind)
        self.host.create_io_queue_pair(qid, depth)

    def reset_and_bring_up(self, kind: str, *, depth: int = 32, qid: int = 1) -> None:
        """CC.EN 1 -> 0 -> 1 and the queues again, the way a driver does after a reset."""
        self.host.doorbells = HostDoorbells(self.client)
        self.host.disable()
        self.host.enable()
        self.use(kind)
        self.host.create_io_queue_pair(qid, depth)

    # -- I/O ---------------------------------------------------------------------------

    def submit_io(self, qid: int, opc: int, slba: int, buf: int, nlb: int = PAGE // LBA, *, ring: bool) -> int:
        return self.host.submit(qid, opc, nsid=1, prp1=buf, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=nlb - 1, ring=ring)

    def write_read_check(self, qid: int, first_lba: int, count: int, *, qd: int, seed: int = 0) -> None:
        """Write ``count`` 4 KiB blocks, read them back into other buffers, compare.

        ``qd`` 1: one command at a time (ring, wait). ``qd`` > 1: ``qd`` commands placed with
        ring=False, then one doorbell for the whole batch.
        """
        blocks = [(first_lba + i * (PAGE // LBA), pattern(seed, i)) for i in range(count)]
        wbufs = [self.mem.alloc(PAGE) for _ in blocks]
        rbufs = [self.mem.alloc(PAGE) for _ in blocks]
        for (_lba, data), buf in zip(blocks, wbufs, strict=True):
            self.mem.write(buf, data)
        for rbuf in rbufs:
            self.mem.write(rbuf, b"\xee" * PAGE)
        for opc, bufs in ((NvmOpcode.WRITE, wbufs), (NvmOpcode.READ, rbufs)):
            for start in range(0, count, qd):
                batch = range(start, min(count, start + qd))
                cids = [self.submit_io(qid, opc, blocks[i][0], bufs[i], ring=False) for i in batch]
                self.host.ring_sq(qid)
                done = self.host.wait(qid, len(cids))
                assert sorted(c.cid for c in done) == sorted(cids)
                assert all(c.status == Status.SUCCESS for c in done), done
        for (lba, data), rbuf in zip(blocks, rbufs, strict=True):
            assert self.mem.read(rbuf, PAGE) == data, f"LBA {lba}: data read back differs"

    def read_blocks(self, qid: int, first_lba: int, count: int) -> list[bytes]:
        out = []
        for i in range(count):
            buf = self.mem.alloc(PAGE)
            self.submit_io(qid, NvmOpcode.READ, first_lba + i * (PAGE // LBA), buf, ring=True)
            (c,) = self.host.wait(qid, 1)
            assert c.status == Status.SUCCESS
            out.append(self.mem.read(buf, PAGE))
        return out

    def expect_no_completion(self, qid: int, settle: float = 0.1) -> None:
        """Nothing more arrives on ``qid`` (bounded look, not a timing assertion)."""
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            got = self.host.reap(qid)
            assert not got, f"unexpected completions on queue {qid}: {got}"
            time.sleep(0.005)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            view = getattr(self, "view", None)
            if view is not None:
                view.release()
            if self.own_ram:
                self.ram.close()


def pattern(seed: int, i: int) -> bytes:
    """4 KiB that differ per (seed, block) and per dword."""
    head = struct.pack("<II", seed, i)
    return (head + bytes((seed * 31 + i * 7 + k) & 0xFF for k in range(56))) * (PAGE // 64)
