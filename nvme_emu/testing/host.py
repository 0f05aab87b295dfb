"""A minimal NVMe *host* driver, for tests, benchmarks and the KVM harness.

It plays the guest's Linux driver against any "bus" that offers ``region_read`` and
``region_write`` (the vfio-user client does) and a block of guest RAM it owns. Doorbells go
through a pluggable :class:`HostDoorbells` strategy, so the same driver exercises every
doorbell path of the controller.
"""

from __future__ import annotations

import os
import select
import struct
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from ..atomics import fence, load_acquire_u32, store_release_u32
from ..queue import CQE
from ..spec.commands import CQE_SIZE, SQE_SIZE, AdminOpcode, NvmOpcode, Status
from ..spec.identify import Cns
from ..spec.registers import Cc, CcCss, Csts, Reg
from ..spec.zns import ZMR_PARTIAL_REPORT, ZMS_SELECT_ALL, ZONE_DESCRIPTOR_SIZE, ZONE_REPORT_HEADER_SIZE, ZRASF_SHIFT, ZS_SHIFT
from ..spec.zns import ZnsOpcode, ZoneReceiveAction, ZoneReportOption, ZoneSendAction, ZoneState
from ..sqe import SQE
from ..zoned.structures import ZoneDescriptor, ZoneReportHeader, report_zones_capacity
from vfio_user.constants import RegionIndex
from vfio_user.pci import COMMAND, COMMAND_MASTER

BAR0 = 0
PAGE = 4096


class Bus(Protocol):
    def region_read(self, index: int, offset: int, count: int) -> bytes: ...

    def region_write(self, index: int, offset: int, data: bytes, *, posted: bool = False) -> None: ...


class CommandFailed(Exception):
    def __init__(self, status: int, cqe: "Completion") -> None:
        name = Status(status).name if status in Status._value2member_map_ else hex(status)
        super().__init__(f"command {cqe.cid} failed: {name}")
        self.status = status
        self.cqe = cqe


@dataclass
class Completion:
    dw0: int
    sqhd: int
    sqid: int
    cid: int
    status: int  # 11-bit status (SCT << 8 | SC)
    dnr: bool
    dw1: int = 0

    @property
    def result64(self) -> int:
        """DW1:DW0, a 64-bit command result (Zone Append's LBA)."""
        return self.dw1 << 32 | self.dw0


@dataclass(frozen=True)
class ReportedZone:
    """One zone descriptor of a Report Zones answer (the fields a host acts on)."""

    state: ZoneState
    zslba: int
    wp: int  #: all ones where the state has no valid write pointer (Full, Read Only, Offline)
    zcap: int
    attrs: int


@dataclass(frozen=True)
class ZoneReportData:
    """A Report Zones answer: the header's Number of Zones and the descriptors that fit."""

    nr_zones: int
    zones: list[ReportedZone]


class HostDoorbells:
    """Default strategy: every doorbell is a (posted) REGION_WRITE, like QEMU's trap path."""

    def __init__(self, bus: Bus, *, posted: bool = True) -> None:
        self.bus = bus
        self.posted = posted

    def ring(self, slot: int, value: int) -> None:
        self.bus.region_write(BAR0, Reg.DOORBELLS + 4 * slot, struct.pack("<I", value), posted=self.posted)


class ShadowIoEventFdDoorbells(HostDoorbells):
    """Doorbells by shadow ioeventfds, emulating KVM's POST_WRITE (value, then signal)."""

    def __init__(self, bus: Bus, iofds: list) -> None:
        super().__init__(bus)
        self.by_slot = {(f.gpa_offset - Reg.DOORBELLS) // 4: f for f in iofds if f.shadow is not None}

    def ring(self, slot: int, value: int) -> None:
        fd = self.by_slot.get(slot)
        if fd is None:
            super().ring(slot, value)
        else:
            fd.emulate_post_write(value)


class MappedDoorbells(HostDoorbells):
    """Doorbells written straight into the mmapped doorbell page (poll path)."""

    def __init__(self, bus: Bus, page) -> None:
        super().__init__(bus)
        self.page = page

    def ring(self, slot: int, value: int) -> None:
        # one 4-byte release store: the SQEs (or CQ reads) it announces come first
        store_release_u32(self.page, 4 * slot, value)


class ShadowBufferDoorbells(HostDoorbells):
    """NVMe shadow doorbells with EventIdx (as Linux does after Doorbell Buffer Config).

    ``kick`` is what happens when EventIdx says the controller wants a real doorbell: a
    trapped write by default, or a plain ioeventfd signal.
    """

    def __init__(self, inner: HostDoorbells, ram: "HostMemory", shadow: int, eventidx: int, kick: Callable[[int, int], None] | None = None) -> None:
        super().__init__(inner.bus)
        self.inner = inner
        self.ram = ram
        self.shadow = shadow
        self.eventidx = eventidx
        self.kick = kick or inner.ring
        self.kicks = 0
        self.suppressed = 0

    def ring(self, slot: int, value: int) -> None:
        if slot < 2:  # the admin queue never uses shadow doorbells
            self.inner.ring(slot, value)
            return
        old = self.ram.u32(self.shadow + 4 * slot)
        self.ram.store_release_u32(self.shadow + 4 * slot, value)  # the SQEs before the tail
        # Full barrier (Linux: mb()): the shadow store must be visible before EventIdx is
        # loaded, or we and the controller's EventIdx store + re-check can both miss.
        fence()
        event = self.ram.u32(self.eventidx + 4 * slot)
        # nvme_dbbuf_need_event: ring if event_idx lies in (old, new]
        if (value - event - 1) & 0xFFFF < (value - old) & 0xFFFF:
            self.kicks += 1
            self.kick(slot, value)
        else:
            self.suppressed += 1


class HostMemory:
    """Guest RAM the host driver owns: a view plus a bump allocator of page-aligned buffers."""

    def __init__(self, view: memoryview, iova: int) -> None:
        self.view = view
        self.iova = iova
        self.next = iova

    def alloc(self, size: int, align: int = PAGE) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.iova + len(self.view):
            raise MemoryError("host memory exhausted")
        self.next = addr + size
        return addr

    def buf(self, iova: int, size: int) -> memoryview:
        off = iova - self.iova
        return self.view[off : off + size]

    def read(self, iova: int, size: int) -> bytes:
        return bytes(self.buf(iova, size))

    def write(self, iova: int, data: bytes) -> None:
        self.buf(iova, len(data))[:] = data

    def u32(self, iova: int) -> int:
        return struct.unpack_from("<I", self.view, iova - self.iova)[0]

    def set_u32(self, iova: int, value: int) -> None:
        off = iova - self.iova
        self.view[off : off + 4] = struct.pack("<I", value)  # one store, never a transient 0

    def load_acquire_u32(self, iova: int) -> int:
        """The word at ``iova``, read before anything this thread reads after it (no pointer
        is kept: the harness owning ``view`` may close its mmap at any time)."""
        return load_acquire_u32(self.view, iova - self.iova)

    def store_release_u32(self, iova: int, value: int) -> None:
        """Store ``value`` at ``iova`` after everything this thread stored before it."""
        store_release_u32(self.view, iova - self.iova, value)


class HostQueue:
    def __init__(self, qid: int, depth: int, mem: HostMemory) -> None:
        self.qid = qid
        self.depth = depth
        self.sq = mem.alloc(depth * SQE_SIZE)
        self.cq = mem.alloc(depth * CQE_SIZE)
        mem.buf(self.cq, depth * CQE_SIZE)[:] = bytes(depth * CQE_SIZE)
        self.tail = 0
        self.head = 0
        self.phase = 1
        self.next_cid = 0
        self.inflight = 0


class NvmeHost:
    """Enable the controller, make queues, submit commands, reap completions."""

    def __init__(
        self, bus: Bus, mem: HostMemory, *, doorbells: HostDoorbells | None = None, poll: Callable[[], object] | None = None, irq_fd: int | None = None
    ) -> None:
        self.bus = bus
        self.mem = mem
        self.doorbells = doorbells or HostDoorbells(bus)
        self.poll = poll
        self.irq_fd = irq_fd
        self.queues: dict[int, HostQueue] = {}
        self.scratch = mem.alloc(PAGE * 4)
        self._scratch_list: int | None = None  # a PRP list for all of scratch, made on first use

    # -- registers -------------------------------------------------------------------------

    def reg32(self, offset: int) -> int:
        return struct.unpack("<I", self.bus.region_read(BAR0, offset, 4))[0]

    def reg64(self, offset: int) -> int:
        return struct.unpack("<Q", self.bus.region_read(BAR0, offset, 8))[0]

    def set_reg32(self, offset: int, value: int) -> None:
        self.bus.region_write(BAR0, offset, struct.pack("<I", value))

    def set_reg64(self, offset: int, value: int) -> None:
        self.bus.region_write(BAR0, offset, struct.pack("<Q", value))

    def wait_ready(self, ready: bool, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while bool(self.reg32(Reg.CSTS) & Csts.RDY) != ready:
            if self.reg32(Reg.CSTS) & Csts.CFS:
                raise RuntimeError("controller fatal status")
            if time.monotonic() > deadline:
                raise TimeoutError(f"CSTS.RDY did not become {int(ready)}")
            time.sleep(0.001)

    def set_bus_master(self, enabled: bool = True) -> None:
        """PCI COMMAND.BME, read-modify-write as Linux's pci_set_master() does before it
        enables the controller: without it the function may do no DMA (a reset clears it)."""
        cmd = int.from_bytes(self.bus.region_read(RegionIndex.CONFIG, COMMAND, 2), "little")
        new = cmd | COMMAND_MASTER if enabled else cmd & ~COMMAND_MASTER
        if new != cmd:
            self.bus.region_write(RegionIndex.CONFIG, COMMAND, new.to_bytes(2, "little"))

    def enable(self, admin_depth: int = 32) -> None:
        self.set_bus_master()
        self.set_reg32(Reg.CC, 0)
        self.wait_ready(False)
        q = HostQueue(0, admin_depth, self.mem)
        self.queues = {0: q}
        self.set_reg32(Reg.AQA, (admin_depth - 1) << 16 | (admin_depth - 1))
        self.set_reg64(Reg.ASQ, q.sq)
        self.set_reg64(Reg.ACQ, q.cq)
        cc = Cc.EN | CcCss.ALL_IO_COMMAND_SETS << Cc.CSS_SHIFT | 6 << Cc.IOSQES_SHIFT | 4 << Cc.IOCQES_SHIFT
        self.set_reg32(Reg.CC, cc)
        self.wait_ready(True)

    def disable(self) -> None:
        self.set_reg32(Reg.CC, 0)
        self.wait_ready(False)
        self.queues.clear()

    def shutdown(self, timeout: float = 10.0) -> int:
        """Normal shutdown; like Linux, wait while CSTS.SHST reads "occurring". The last SHST."""
        cc = self.reg32(Reg.CC)
        self.set_reg32(Reg.CC, cc | 1 << Cc.SHN_SHIFT)
        deadline = time.monotonic() + timeout
        while (shst := (self.reg32(Reg.CSTS) >> 2) & 3) == 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        return shst

    # -- submission ------------------------------------------------------------------------

    def submit(
        self,
        qid: int,
        opc: int,
        *,
        nsid: int = 0,
        prp1: int = 0,
        prp2: int = 0,
        cdw10: int = 0,
        cdw11: int = 0,
        cdw12: int = 0,
        cdw13: int = 0,
        cdw14: int = 0,
        cdw15: int = 0,
        flags: int = 0,
        ring: bool = True,
    ) -> int:
        q = self.queues[qid]
        cid = q.next_cid
        q.next_cid = (q.next_cid + 1) & 0xFFFF
        entry = SQE.pack(opc, flags, cid, nsid, 0, 0, 0, prp1, prp2, cdw10, cdw11, cdw12, cdw13, cdw14, cdw15)
        self.mem.write(q.sq + q.tail * SQE_SIZE, entry)
        q.tail = (q.tail + 1) % q.depth
        q.inflight += 1
        if ring:
            self.doorbells.ring(2 * qid, q.tail)
        return cid

    def ring_sq(self, qid: int) -> None:
        self.doorbells.ring(2 * qid, self.queues[qid].tail)

    def reap(self, qid: int, *, limit: int = 1 << 30) -> list[Completion]:
        """Every completion posted so far on ``qid`` (updates the CQ head doorbell once)."""
        q = self.queues[qid]
        out: list[Completion] = []
        while len(out) < limit:
            entry = q.cq + q.head * CQE_SIZE
            # Phase first with an acquire load, the rest after (as Linux does with dma_rmb()).
            if self.mem.load_acquire_u32(entry + 12) >> 16 & 1 != q.phase:
                break
            dw0, dw1, sqhd, sqid, cid, sf = CQE.unpack_from(self.mem.view, entry - self.mem.iova)
            out.append(Completion(dw0, sqhd, sqid, cid, (sf >> 1) & 0x7FF, bool(sf & (1 << 15)), dw1))
            q.head += 1
            if q.head == q.depth:
                q.head = 0
                q.phase ^= 1
        if out:
            q.inflight -= len(out)
            self.doorbells.ring(2 * qid + 1, q.head)
        return out

    def wait(self, qid: int, count: int = 1, timeout: float = 5.0) -> list[Completion]:
        deadline = time.monotonic() + timeout
        got: list[Completion] = []
        while len(got) < count:
            got += self.reap(qid, limit=count - len(got))
            if len(got) >= count:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(got)} of {count} completions on queue {qid}")
            if self.poll is not None:
                self.poll()
            elif self.irq_fd is not None:
                select.select([self.irq_fd], [], [], 0.01)
                try:
                    os.eventfd_read(self.irq_fd)
                except BlockingIOError:
                    pass
        return got

    def command(self, qid: int, opc: int, **kw) -> Completion:
        """Submit one command, wait for it, raise :class:`CommandFailed` on error status."""
        cid = self.submit(qid, opc, **kw)
        (cqe,) = self.wait(qid, 1)
        assert cqe.cid == cid, (cqe.cid, cid)
        if cqe.status != Status.SUCCESS:
            raise CommandFailed(cqe.status, cqe)
        return cqe

    def admin(self, opc: int, **kw) -> Completion:
        return self.command(0, opc, **kw)

    # -- common commands -------------------------------------------------------------------

    def identify(self, cns: int, nsid: int = 0, csi: int = 0) -> bytes:
        self.admin(AdminOpcode.IDENTIFY, nsid=nsid, prp1=self.scratch, cdw10=cns, cdw11=csi << 24)
        return self.mem.read(self.scratch, 4096)

    def identify_controller(self) -> bytes:
        return self.identify(Cns.CONTROLLER)

    def get_log(self, lid: int, length: int, *, nsid: int = 0xFFFFFFFF, offset: int = 0, rae: bool = False) -> bytes:
        numd = length // 4 - 1
        self.admin(
            AdminOpcode.GET_LOG_PAGE,
            nsid=nsid,
            prp1=self.scratch,
            prp2=self.scratch + PAGE,
            cdw10=lid | (1 << 15 if rae else 0) | (numd & 0xFFFF) << 16,
            cdw11=numd >> 16,
            cdw12=offset & 0xFFFFFFFF,
            cdw13=offset >> 32,
        )
        return self.mem.read(self.scratch, length)

    def set_features(self, fid: int, cdw11: int, **kw) -> int:
        return self.admin(AdminOpcode.SET_FEATURES, cdw10=fid, cdw11=cdw11, **kw).dw0

    def get_features(self, fid: int, cdw11: int = 0, sel: int = 0, **kw) -> int:
        return self.admin(AdminOpcode.GET_FEATURES, cdw10=fid | sel << 8, cdw11=cdw11, **kw).dw0

    def create_io_queue_pair(self, qid: int, depth: int, *, vector: int | None = None) -> HostQueue:
        q = HostQueue(qid, depth, self.mem)
        iv = qid if vector is None else vector
        self.admin(AdminOpcode.CREATE_IO_CQ, prp1=q.cq, cdw10=(depth - 1) << 16 | qid, cdw11=iv << 16 | 0b11)
        self.admin(AdminOpcode.CREATE_IO_SQ, prp1=q.sq, cdw10=(depth - 1) << 16 | qid, cdw11=qid << 16 | 0b1)
        self.queues[qid] = q
        return q

    def delete_io_queue_pair(self, qid: int) -> None:
        self.admin(AdminOpcode.DELETE_IO_SQ, cdw10=qid)
        self.admin(AdminOpcode.DELETE_IO_CQ, cdw10=qid)
        del self.queues[qid]

    def prps(self, buf: int, length: int) -> tuple[int, int]:
        """PRP1/PRP2 for a page-aligned buffer, building a PRP list when needed."""
        pages = (length + PAGE - 1) // PAGE
        if pages <= 1:
            return buf, 0
        if pages == 2:
            return buf, buf + PAGE
        plist = self.mem.alloc(PAGE)
        entries = [buf + PAGE * i for i in range(1, pages)]
        if len(entries) > PAGE // 8:
            raise ValueError("PRP list longer than one page")
        self.mem.write(plist, struct.pack(f"<{len(entries)}Q", *entries))
        return buf, plist

    def io(
        self, qid: int, opc: int, nsid: int, slba: int, nlb: int, buf: int, length: int, *, fua: bool = False, prps: tuple[int, int] | None = None
    ) -> Completion:
        prp1, prp2 = prps if prps is not None else self.prps(buf, length)
        return self.command(qid, opc, nsid=nsid, prp1=prp1, prp2=prp2, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=(nlb - 1) | (1 << 30 if fua else 0))

    def write(self, qid: int, nsid: int, slba: int, nlb: int, buf: int, length: int, **kw) -> Completion:
        return self.io(qid, NvmOpcode.WRITE, nsid, slba, nlb, buf, length, **kw)

    def read(self, qid: int, nsid: int, slba: int, nlb: int, buf: int, length: int, **kw) -> Completion:
        return self.io(qid, NvmOpcode.READ, nsid, slba, nlb, buf, length, **kw)

    # -- the Zoned Namespace Command Set (ZNS 1.1) --------------------------------------------

    def scratch_prps(self, length: int) -> tuple[int, int]:
        """PRP1/PRP2 for the first ``length`` bytes of the scratch buffer (4 pages), with one
        PRP list kept for it (so repeated large transfers do not use up host memory)."""
        if length > 4 * PAGE:
            raise ValueError("the scratch buffer holds 4 pages")
        if length <= 2 * PAGE:
            return self.scratch, self.scratch + PAGE if length > PAGE else 0
        if self._scratch_list is None:
            self._scratch_list = self.mem.alloc(PAGE)
            self.mem.write(self._scratch_list, struct.pack("<3Q", *(self.scratch + PAGE * i for i in range(1, 4))))
        return self.scratch, self._scratch_list

    def zone_append(self, qid: int, nsid: int, zslba: int, nlb: int, buf: int, length: int, *, fua: bool = False,
                    prps: tuple[int, int] | None = None) -> int:
        """Zone Append of ``nlb`` blocks from ``buf`` to the zone starting at ``zslba``; the LBA
        the controller wrote them at (ALBA: CQE DW1:DW0)."""
        return self.io(qid, ZnsOpcode.ZONE_APPEND, nsid, zslba, nlb, buf, length, fua=fua, prps=prps).result64

    def zone_management_send(self, qid: int, nsid: int, slba: int, action: ZoneSendAction, *, select_all: bool = False) -> Completion:
        """Zone Management Send: ``action`` on the zone holding ``slba``, or with Select All on
        every zone in the states the action lists (then SLBA is ignored)."""
        return self.command(qid, ZnsOpcode.ZONE_MANAGEMENT_SEND, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                            cdw13=action | (ZMS_SELECT_ALL if select_all else 0))

    def zone_reset(self, qid: int, nsid: int, slba: int = 0, *, select_all: bool = False) -> Completion:
        """Reset the zone holding ``slba`` (or every Opened, Closed and Full zone): Empty again."""
        return self.zone_management_send(qid, nsid, slba, ZoneSendAction.RESET, select_all=select_all)

    def report_zones(self, qid: int, nsid: int, slba: int = 0, *, size: int = PAGE, option: ZoneReportOption = ZoneReportOption.ALL,
                     partial: bool = False) -> ZoneReportData:
        """Report Zones (Zone Management Receive, ZRA 0h) from the zone holding ``slba`` into a
        ``size``-byte buffer (at most 4 pages: the header and up to 255 descriptors)."""
        prp1, prp2 = self.scratch_prps(size)
        self.command(qid, ZnsOpcode.ZONE_MANAGEMENT_RECEIVE, nsid=nsid, prp1=prp1, prp2=prp2, cdw10=slba & 0xFFFFFFFF,
                     cdw11=slba >> 32, cdw12=size // 4 - 1,
                     cdw13=ZoneReceiveAction.REPORT_ZONES | option << ZRASF_SHIFT | (ZMR_PARTIAL_REPORT if partial else 0))
        data = self.mem.read(self.scratch, size)
        nr_zones = ZoneReportHeader.parse(data[:ZONE_REPORT_HEADER_SIZE]).nr_zones
        zones = []
        for i in range(min(nr_zones, report_zones_capacity(size))):
            off = ZONE_REPORT_HEADER_SIZE + i * ZONE_DESCRIPTOR_SIZE
            d = ZoneDescriptor.parse(data[off : off + ZONE_DESCRIPTOR_SIZE])
            zones.append(ReportedZone(ZoneState(d.zs >> ZS_SHIFT), d.zslba, d.wp, d.zcap, d.za))
        return ZoneReportData(nr_zones, zones)
