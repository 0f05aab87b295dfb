"""The host side of the NVMe suites and benchmarks: a client, guest RAM, a driver, helpers.

:class:`Host` is the real vfio-user client (:class:`VfioUserClient`) with memfd guest RAM
DMA-mapped into the server, MSI-X (and optionally INTx) eventfds, and :class:`NvmeHost` on
top; completions are collected by command ID, so tests may wait for commands in any order
(a completion reaped while waiting for another one waits in the stash). :func:`prps` builds
a transfer's PRP1/PRP2 (and PRP list) the way the spec says a host must.
"""

from __future__ import annotations

import struct
import time
from typing import Any

from nvme_emu.testing.host import Completion, HostMemory, HostQueue, NvmeHost
from nvme_emu.spec.commands import CQE_SIZE, AdminOpcode, NvmOpcode, Status
from nvme_emu.spec.features import FeatureId
from nvme_emu.spec.registers import Reg
from vfio_user.constants import IrqIndex
from vfio_user.vmm.client import GuestRam, VfioUserClient

from .server import DEADLINE

PAGE = 4096
#: Where guest RAM is DMA-mapped.
IOVA = 0x100000
RAM_SIZE = 64 << 20  # sparse memfd: only what the tests touch is allocated


def status_name(status: int) -> str:
    return Status(status).name if status in Status._value2member_map_ else hex(status)


# ---------------------------------------------------------------------------------------------
# data pointers
# ---------------------------------------------------------------------------------------------


def prps(mem: HostMemory, buf: int, length: int, page: int = PAGE) -> tuple[int, int]:
    """PRP1/PRP2 for ``length`` bytes of contiguous guest memory at ``buf``.

    PRP1 may carry an offset into its page; every later entry is page aligned. The
    transfer's pages after the first are counted from the end of PRP1's page, so a buffer
    that starts mid-page and spans two pages needs PRP2 = the second page, and one that
    spans more needs a PRP list (allocated from ``mem``; lists longer than a page chain,
    which this builder never needs for the transfers the suites make, so it refuses them).
    """
    first = min(length, page - buf % page)
    rest = length - first
    if rest <= 0:
        return buf, 0
    page2 = buf - buf % page + page
    if rest <= page:
        return buf, page2
    n = -(-rest // page)
    if n > page // 8:
        raise ValueError(f"{length} bytes need a chained PRP list")
    plist = mem.alloc(n * 8, 8)
    mem.write(plist, struct.pack(f"<{n}Q", *(page2 + page * i for i in range(n))))
    return buf, plist


# ---------------------------------------------------------------------------------------------
# the host
# ---------------------------------------------------------------------------------------------


class Host:
    """A negotiated client + memfd guest RAM at :data:`IOVA` + NvmeHost; completions by CID."""

    def __init__(self, sock: str, *, ram_size: int = RAM_SIZE, msix: int = 8, intx: bool = False, enable: bool = True,
                 timeout: float = DEADLINE) -> None:
        self.sock = sock
        self.client = VfioUserClient(sock, timeout=timeout)
        self.ram = GuestRam(ram_size)
        try:
            self.client.negotiate()
            self.client.dma_map(IOVA, ram_size, self.ram)
            self.efds: list[int] = self.client.enable_irqs(IrqIndex.MSIX, msix) if msix else []
            self.intx_fd: int | None = self.client.enable_irqs(IrqIndex.INTX, 1)[0] if intx else None
        except BaseException:
            self.close()
            raise
        self.mem = HostMemory(self.ram.view, IOVA)
        self.host = NvmeHost(self.client, self.mem)
        #: completions reaped while waiting for another command: qid -> cid -> Completion
        self.stash: dict[int, dict[int, Completion]] = {}
        if enable:
            self.enable()

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.ram.close()

    # -- registers ------------------------------------------------------------------------

    def reg32(self, off: int) -> int:
        return self.host.reg32(off)

    def reg64(self, off: int) -> int:
        return self.host.reg64(off)

    def set_reg32(self, off: int, value: int) -> None:
        self.host.set_reg32(off, value)

    def csts(self) -> int:
        return self.host.reg32(Reg.CSTS)

    def sync(self) -> int:
        """A round trip: everything posted before has been handled by the server."""
        return self.csts()

    def enable(self) -> None:
        self.host.enable()
        self.stash.clear()

    # -- memory ---------------------------------------------------------------------------

    def alloc(self, size: int, align: int = PAGE) -> int:
        """Zeroed guest memory."""
        addr = self.mem.alloc(size, align)
        self.mem.write(addr, bytes(size))
        return addr

    def write_mem(self, iova: int, data: bytes) -> None:
        self.mem.write(iova, data)

    def read_mem(self, iova: int, size: int) -> bytes:
        return self.mem.read(iova, size)

    def prps(self, buf: int, length: int) -> tuple[int, int]:
        return prps(self.mem, buf, length)

    # -- commands -------------------------------------------------------------------------

    def submit(self, qid: int, opc: int, **kw: Any) -> int:
        return self.host.submit(qid, opc, **kw)

    def reap_all(self, qid: int) -> None:
        """Move every completion posted on ``qid`` into the stash."""
        stash = self.stash.setdefault(qid, {})
        for c in self.host.reap(qid):
            stash[c.cid] = c

    def wait_cid(self, qid: int, cid: int, timeout: float = DEADLINE) -> Completion:
        stash = self.stash.setdefault(qid, {})
        deadline = time.monotonic() + timeout
        while cid not in stash:
            self.reap_all(qid)
            if cid in stash:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no completion for cid {cid} on queue {qid}")
            time.sleep(0.0002)
        return stash.pop(cid)

    def no_completion(self, qid: int, cid: int) -> bool:
        """After a round trip, the command ``cid`` has still not completed."""
        self.sync()
        self.reap_all(qid)
        return cid not in self.stash.get(qid, {})

    def cmd(self, qid: int, opc: int, *, timeout: float = DEADLINE, **kw: Any) -> Completion:
        return self.wait_cid(qid, self.submit(qid, opc, **kw), timeout)

    def ok(self, qid: int, opc: int, **kw: Any) -> Completion:
        c = self.cmd(qid, opc, **kw)
        assert c.status == Status.SUCCESS, f"opcode {opc:#x} on queue {qid}: {status_name(c.status)}"
        return c

    def fails(self, status: int, qid: int, opc: int, **kw: Any) -> Completion:
        c = self.cmd(qid, opc, **kw)
        assert c.status == status, f"opcode {opc:#x}: expected {status_name(status)}, got {status_name(c.status)}"
        return c

    def admin(self, opc: int, **kw: Any) -> Completion:
        return self.cmd(0, opc, **kw)

    def identify(self, cns: int, nsid: int = 0, csi: int = 0) -> tuple[Completion, bytes]:
        buf = self.alloc(PAGE)
        self.write_mem(buf, b"\xa5" * PAGE)  # so zeros in the answer are the controller's
        c = self.admin(AdminOpcode.IDENTIFY, nsid=nsid, prp1=buf, cdw10=cns, cdw11=csi << 24)
        return c, self.read_mem(buf, PAGE)

    def set_features(self, fid: int, cdw11: int = 0, *, save: bool = False, **kw: Any) -> Completion:
        return self.admin(AdminOpcode.SET_FEATURES, cdw10=fid | (1 << 31 if save else 0), cdw11=cdw11, **kw)

    def get_features(self, fid: int, cdw11: int = 0, sel: int = 0, **kw: Any) -> Completion:
        return self.admin(AdminOpcode.GET_FEATURES, cdw10=fid | sel << 8, cdw11=cdw11, **kw)

    def get_log(self, lid: int, length: int, *, nsid: int = 0xFFFFFFFF, offset: int = 0, rae: bool = False, lsp: int = 0,
                csi: int = 0) -> tuple[Completion, bytes]:
        buf = self.alloc(-(-length // PAGE) * PAGE)
        prp1, prp2 = self.prps(buf, length)
        numd = length // 4 - 1
        c = self.admin(
            AdminOpcode.GET_LOG_PAGE,
            nsid=nsid,
            prp1=prp1,
            prp2=prp2,
            cdw10=lid | lsp << 8 | (1 << 15 if rae else 0) | (numd & 0xFFFF) << 16,
            cdw11=numd >> 16,
            cdw12=offset & 0xFFFFFFFF,
            cdw13=offset >> 32,
            cdw14=csi << 24,
        )
        return c, self.read_mem(buf, length)

    def set_queues(self, n: int) -> int:
        """Number of Queues: ``n`` SQs and CQs asked; DW0 (what was granted)."""
        return self.ok(0, AdminOpcode.SET_FEATURES, cdw10=FeatureId.NUMBER_OF_QUEUES, cdw11=(n - 1) << 16 | (n - 1)).dw0

    def create_pair(self, qid: int, depth: int = 64, *, vector: int | None = None, ien: bool = True) -> HostQueue:
        """An I/O CQ (interrupts on vector ``qid`` unless told otherwise) and its SQ."""
        q = HostQueue(qid, depth, self.mem)
        iv = qid if vector is None else vector
        self.ok(0, AdminOpcode.CREATE_IO_CQ, prp1=q.cq, cdw10=(depth - 1) << 16 | qid, cdw11=iv << 16 | (2 if ien else 0) | 1)
        self.ok(0, AdminOpcode.CREATE_IO_SQ, prp1=q.sq, cdw10=(depth - 1) << 16 | qid, cdw11=qid << 16 | 1)
        self.host.queues[qid] = q
        self.stash.pop(qid, None)
        return q

    # -- I/O ------------------------------------------------------------------------------

    def rw(self, qid: int, opc: int, nsid: int, slba: int, nlb: int, buf: int, length: int, *, fua: bool = False,
           ring: bool = True) -> int:
        """Submit a read or write of ``nlb`` blocks at ``slba`` to/from ``buf``; its CID."""
        p1, p2 = self.prps(buf, length)
        return self.host.submit(qid, opc, nsid=nsid, prp1=p1, prp2=p2, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                                cdw12=(nlb - 1) | (1 << 30 if fua else 0), ring=ring)

    def io(self, qid: int, opc: int, nsid: int, slba: int, nlb: int, *, prp1: int = 0, prp2: int = 0, cdw12: int = 0,
           flags: int = 0, **kw: Any) -> Completion:
        """Any LBA-range command with hand-made data pointers; waits for its completion."""
        return self.cmd(qid, opc, nsid=nsid, prp1=prp1, prp2=prp2, cdw10=slba & 0xFFFFFFFF, cdw11=(slba >> 32) & 0xFFFFFFFF,
                        cdw12=((nlb - 1) & 0xFFFF) | cdw12, flags=flags, **kw)

    def write(self, qid: int, nsid: int, slba: int, data: bytes, lba_size: int = 512, **kw: Any) -> Completion:
        buf = self.alloc(len(data))
        self.write_mem(buf, data)
        p1, p2 = self.prps(buf, len(data))
        return self.io(qid, NvmOpcode.WRITE, nsid, slba, len(data) // lba_size, prp1=p1, prp2=p2, **kw)

    def read(self, qid: int, nsid: int, slba: int, nlb: int, lba_size: int = 512, **kw: Any) -> tuple[Completion, bytes]:
        length = nlb * lba_size
        buf = self.alloc(length)
        self.write_mem(buf, b"\xee" * length)  # so the data read is the controller's
        p1, p2 = self.prps(buf, length)
        c = self.io(qid, NvmOpcode.READ, nsid, slba, nlb, prp1=p1, prp2=p2, **kw)
        return c, self.read_mem(buf, length)

    def write_ok(self, qid: int, nsid: int, slba: int, data: bytes, lba_size: int = 512, **kw: Any) -> None:
        c = self.write(qid, nsid, slba, data, lba_size, **kw)
        assert c.status == Status.SUCCESS, status_name(c.status)

    def read_ok(self, qid: int, nsid: int, slba: int, nlb: int, lba_size: int = 512, **kw: Any) -> bytes:
        c, data = self.read(qid, nsid, slba, nlb, lba_size, **kw)
        assert c.status == Status.SUCCESS, status_name(c.status)
        return data

    # -- completions without consuming them -------------------------------------------------

    def peek_cqe(self, qid: int, timeout: float = DEADLINE) -> None:
        """Wait until the next CQE of ``qid`` is posted, without consuming it (no head doorbell)."""
        q = self.host.queues[qid]
        status_hi = q.cq + q.head * CQE_SIZE + 14 - self.mem.iova  # the phase tag is bit 0 of byte 14
        deadline = time.monotonic() + timeout
        while self.mem.view[status_hi] & 1 != q.phase:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no completion posted on queue {qid}")
            time.sleep(0.0002)
