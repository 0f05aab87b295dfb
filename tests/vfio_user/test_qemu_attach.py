"""Replay of QEMU 11.1.3's attach sequence (vfio-user-protocol.md §3), checking every reply
against what QEMU requires: sizes within its receive buffers, fds only where it expects them,
and the values realize depends on."""

from __future__ import annotations

import errno
import json
import os
import struct


from vfio_user import messages as m
from vfio_user.vmm.client import QEMU_CAPABILITIES, GuestRam
from vfio_user.constants import (
    DEVICE_FLAG_PCI,
    DEVICE_FLAG_RESET,
    FLAG_NO_REPLY,
    HEADER_SIZE,
    IRQ_ACTION_TRIGGER,
    IRQ_ACTION_UNMASK,
    IRQ_DATA_EVENTFD,
    IRQ_DATA_NONE,
    REGION_FLAG_CAPS,
    REGION_FLAG_MMAP,
    REGION_FLAG_READ,
    REGION_FLAG_WRITE,
    Command,
    IrqIndex,
)
from vfio_user.messages import HEADER
from vfio_user.sample import REG_DOORBELL, REG_RINGS

from ..support.fds import efd_count, efd_wait, new_eventfd

CONFIG = 7
RAM_SIZE = 8 << 20  # sparse memfd: costs nothing until touched

#: Largest reply QEMU's receive buffer takes, per command (header included); §2.
MAX_REPLY = {
    Command.DMA_MAP: 48,
    Command.DMA_UNMAP: 40,
    Command.DEVICE_GET_INFO: 32,
    Command.DEVICE_GET_IRQ_INFO: 32,
    Command.DEVICE_SET_IRQS: 36,
    Command.DEVICE_RESET: 16,
}


class Qemu:
    """Sends requests exactly as QEMU lays them out and checks each reply as QEMU would."""

    def __init__(self, client) -> None:
        self.c = client

    def send(self, command: int, payload: bytes = b"", fds=(), *, max_reply: int | None = None, posted: bool = False):
        msg_id = self.c.conn.request(command, no_reply=posted)[0]
        self.c.send_raw(HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), FLAG_NO_REPLY if posted else 0, 0) + payload, list(fds))
        if posted:
            return None
        reply = self.c.wait_reply(msg_id)
        assert reply.command == command
        assert not reply.is_error, f"{Command(command).name} failed: {errno.errorcode.get(reply.error_no)}"
        limit = max_reply if max_reply is not None else MAX_REPLY.get(command)
        if limit is not None:
            assert HEADER_SIZE + len(reply.payload) <= limit, f"reply to {Command(command).name} exceeds QEMU's buffer"
        if command != Command.DEVICE_GET_REGION_INFO:
            assert reply.fds == [], f"unexpected FDs in reply to {Command(command).name}"
        else:
            assert len(reply.fds) <= 1
        return reply

    def dma_map(self, iova, size, flags, offset=0, fd=None):
        payload = m.DmaMap.build({"argsz": 32, "flags": flags, "offset": offset, "address": iova, "size": size})
        self.send(Command.DMA_MAP, payload, [fd] if fd is not None else [])

    def dma_unmap(self, iova, size):
        self.send(Command.DMA_UNMAP, m.DmaUnmap.build({"argsz": 24, "flags": 0, "address": iova, "size": size}))

    def region_info(self, index):
        reply = self.send(Command.DEVICE_GET_REGION_INFO, self._rinfo(index, 32), max_reply=16 + 32)
        info = m.RegionInfo.parse(reply.payload)
        reply.close_fds()
        if info.argsz > 32:  # ask again with the size the caps need (QEMU: 32, then 64 for a sparse area)
            reply = self.send(Command.DEVICE_GET_REGION_INFO, self._rinfo(index, info.argsz), max_reply=16 + info.argsz)
            info = m.RegionInfo.parse(reply.payload)
        return info, reply

    @staticmethod
    def _rinfo(index, argsz):
        return m.RegionInfo.build({"argsz": argsz, "flags": 0, "index": index, "cap_offset": 0, "size": 0, "offset": 0})

    def irq_info(self, index):
        reply = self.send(Command.DEVICE_GET_IRQ_INFO, m.IrqInfo.build({"argsz": 16, "flags": 0, "index": index, "count": 0}))
        return m.IrqInfo.parse(reply.payload)

    def set_irqs(self, flags, index, start, count, fds=()):
        self.send(Command.DEVICE_SET_IRQS, m.SetIrqs.build({"argsz": 20, "flags": flags, "index": index, "start": start, "count": count, "data": b""}), fds)

    def cfg_read(self, offset, count):
        reply = self.send(Command.REGION_READ, m.REGION_ACCESS.pack(offset, CONFIG, count), max_reply=32 + count)
        offset_r, region_r, count_r = m.REGION_ACCESS.unpack_from(reply.payload)
        assert (offset_r, region_r, count_r) == (offset, CONFIG, count)
        data = reply.payload[16:]
        assert len(data) == count, "short config read"
        return data

    def cfg_write(self, offset, data):
        self.send(Command.REGION_WRITE, m.REGION_ACCESS.pack(offset, CONFIG, len(data)) + data, max_reply=32)

    def bar_write(self, region, offset, data, *, posted=False):
        self.send(Command.REGION_WRITE, m.REGION_ACCESS.pack(offset, region, len(data)) + data, max_reply=32, posted=posted)

    def bar_read(self, region, offset, count):
        return self.send(Command.REGION_READ, m.REGION_ACCESS.pack(offset, region, count), max_reply=32 + count).payload[16:]


def _u16(b, off=0):
    return struct.unpack_from("<H", b, off)[0]


def _u32(b, off=0):
    return struct.unpack_from("<I", b, off)[0]


def test_qemu_11_1_3_attach_sequence(server):
    c = server.connect(negotiate=False)
    q = Qemu(c)
    ram = GuestRam(RAM_SIZE, "pc.ram")
    own_fds: list[int] = []
    try:
        # -- VERSION with QEMU's exact capabilities JSON (214-byte message)
        js = json.dumps({"capabilities": QEMU_CAPABILITIES}).encode() + b"\0"
        request = struct.pack("<HH", 0, 0) + js
        assert HEADER_SIZE + len(request) == 214
        reply = q.send(Command.VERSION, request, max_reply=214)
        major, minor = struct.unpack_from("<HH", reply.payload)
        assert (major, minor) == (0, 0)
        assert reply.payload[-1:] == b"\0"
        caps = json.loads(reply.payload[4:-1])["capabilities"]
        assert caps["max_data_xfer_size"] >= 4096  # realize reads 4 KiB of config in one go
        assert 1 <= caps["max_msg_fds"] <= 16
        assert caps.get("write_multiple") in (True, None)

        # -- DMA_MAPs before GET_INFO: fd-backed RAM, ROM/BIOS ranges without fd
        q.dma_map(0x0, 0xC0000, 0x3, offset=0, fd=ram.fd)
        q.dma_map(0xC0000, 0x40000, 0x1)  # isa-bios / option ROMs: read-only, no fd
        q.dma_map(0x100000, RAM_SIZE - 0x100000, 0x3, offset=0x100000, fd=ram.fd)
        q.dma_map(0xFFFC0000, 0x40000, 0x1)  # pc.bios

        # -- DEVICE_GET_INFO
        info = m.DeviceInfo.parse(q.send(Command.DEVICE_GET_INFO, m.DeviceInfo.build({"argsz": 16, "flags": 0, "num_regions": 0, "num_irqs": 0})).payload)
        assert info.flags & DEVICE_FLAG_PCI and info.flags & DEVICE_FLAG_RESET
        assert 8 <= info.num_regions <= 100 and 3 <= info.num_irqs <= 50

        # -- GET_REGION_INFO 0-5 and 7 (region 0 at argsz 32 first, then larger if needed)
        regions = {}
        for index in (0, 1, 2, 3, 4, 5, 7):
            rinfo, reply = q.region_info(index)
            assert rinfo.index == index
            if rinfo.flags & REGION_FLAG_MMAP:
                assert len(reply.fds) == 1  # QEMU's region fd
                assert rinfo.flags & REGION_FLAG_CAPS and 32 <= rinfo.cap_offset <= rinfo.argsz
                cap = m.SparseMmapCap.parse(reply.payload[rinfo.cap_offset :])
                for a in cap.areas:
                    assert a.offset % 4096 == 0 and a.size % 4096 == 0 and a.offset + a.size <= rinfo.size
                own_fds.append(reply.fds[0])
            else:
                assert reply.fds == []
            regions[index] = rinfo
        cfg_info = regions[7]
        assert cfg_info.size == 4096 and cfg_info.flags == REGION_FLAG_READ | REGION_FLAG_WRITE
        for index in (3, 4, 5):
            assert regions[index].size == 0 and regions[index].flags == 0
        for index in (0, 1, 2):
            assert regions[index].size and regions[index].size & (regions[index].size - 1) == 0

        # -- GET_IRQ_INFO 3 (ERR)
        err_info = q.irq_info(IrqIndex.ERR)
        assert err_info.count == 1

        # -- the 4096-byte config read
        cfg = q.cfg_read(0, 4096)
        assert _u16(cfg, 0) == 0x4E58 and _u16(cfg, 2) == 0x0001
        assert cfg[0x0E] & 0x7F == 0  # header type 0
        assert _u16(cfg, 0x06) & 0x10 and cfg[0x34] >= 0x40  # capability list
        caps_found = {}
        ptr = cfg[0x34]
        while ptr:
            caps_found[cfg[ptr]] = ptr
            ptr = cfg[ptr + 1]
        assert 0x10 in caps_found  # PCIe cap must be an endpoint for QEMU
        assert (_u16(cfg, caps_found[0x10] + 2) >> 4) & 0xF in (0x0, 0x1, 0x9)

        # -- ROM BAR sizing at 0x30: no ROM, so the sizing write reads back 0
        orig = q.cfg_read(0x30, 4)
        q.cfg_write(0x30, struct.pack("<I", 0xFFFFF800))
        assert q.cfg_read(0x30, 4) == bytes(4)
        q.cfg_write(0x30, orig)

        # -- BAR type bits of every BAR with a size
        for index in (0, 1, 2):
            bar = _u32(q.cfg_read(0x10 + 4 * index, 4))
            assert bar & 0x1 == 0 and (bar >> 1) & 0x3 == 0  # 32-bit memory BARs

        # -- MSI-X capability reads + GET_IRQ_INFO 2
        msix = caps_found[0x11]
        ctrl = _u16(q.cfg_read(msix + 2, 2))
        table = _u32(q.cfg_read(msix + 4, 4))
        pba = _u32(q.cfg_read(msix + 8, 4))
        vectors = (ctrl & 0x7FF) + 1
        msix_info = q.irq_info(IrqIndex.MSIX)
        assert msix_info.count == vectors == 2
        for bir_off in (table, pba):
            bir, off = bir_off & 7, bir_off & ~7
            assert regions[bir].size >= off + 16  # table/PBA lie inside a BAR QEMU knows
        assert q.bar_read(pba & 7, pba & ~7, 8) == bytes(8)  # PBA read forwarded to us

        # -- interrupt pin (read twice, as QEMU does)
        assert q.cfg_read(0x3D, 1) == b"\x01"
        assert q.cfg_read(0x3D, 1) == b"\x01"

        # -- SET_IRQS INTx trigger eventfd; SET_IRQS ERR
        intx = new_eventfd()
        err = new_eventfd()
        own_fds += [intx, err]
        q.set_irqs(IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, IrqIndex.INTX, 0, 1, [intx])
        q.set_irqs(IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, IrqIndex.ERR, 0, 1, [err])

        # == system reset ==========================================================
        q.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IrqIndex.INTX, 0, 0)  # vfio_pci_pre_reset
        cmd = _u16(q.cfg_read(0x4, 2))
        q.cfg_write(0x4, struct.pack("<H", cmd & ~0x407))  # IO/MEM/BME/INTxDis cleared
        pm = caps_found[0x01]
        pmcsr = _u16(q.cfg_read(pm + 4, 2))
        q.cfg_write(pm + 4, struct.pack("<H", pmcsr & ~0x3))  # force D0
        q.send(Command.DEVICE_RESET)
        intx2 = new_eventfd()
        own_fds.append(intx2)
        q.set_irqs(IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, IrqIndex.INTX, 0, 1, [intx2])  # post-reset re-arm
        for i in range(6):
            q.cfg_write(0x10 + 4 * i, bytes(4))

        # == firmware: PAM churn on 0xc0000-0xfffff ================================
        q.dma_unmap(0xC0000, 0x40000)
        q.dma_map(0xC0000, 0x20000, 0x3, offset=0xC0000, fd=ram.fd)  # shadowed to RAM
        q.dma_map(0xE0000, 0x20000, 0x1)
        q.dma_unmap(0xC0000, 0x20000)
        q.dma_unmap(0xE0000, 0x20000)
        q.dma_map(0xC0000, 0x40000, 0x3, offset=0xC0000, fd=ram.fd)

        # -- the guest places BAR1 (the mmapped one) and enables memory + bus master
        bar1_addr = 0xFEBF1000
        q.cfg_write(0x14, struct.pack("<I", bar1_addr))
        assert _u32(q.cfg_read(0x14, 4)) == bar1_addr
        q.cfg_write(0x4, struct.pack("<H", 0x6))
        assert _u16(q.cfg_read(0x4, 2)) == 0x6
        # QEMU then maps this device's own BAR page, without fd (ram_device region)
        q.dma_map(bar1_addr, 0x1000, 0x3)

        # == the device works after all this ========================================
        q.bar_write(0, REG_DOORBELL, struct.pack("<I", 0))  # MMAP present: QEMU does not post
        assert efd_wait(intx2, 5) == 1  # INTx (MSI-X not enabled by the guest yet)
        assert efd_count(intx) == 0  # the pre-reset eventfd was dropped
        q.bar_write(0, REG_DOORBELL, struct.pack("<I", 0), posted=True)  # masked until EOI...
        q.set_irqs(IRQ_DATA_NONE | IRQ_ACTION_UNMASK, IrqIndex.INTX, 0, 1)  # ...QEMU's EOI
        q.bar_write(0, REG_DOORBELL, struct.pack("<I", 0))
        assert efd_wait(intx2, 5) == 1
        assert _u32(q.bar_read(0, REG_RINGS, 4)) == 3
        assert efd_count(err) == 0  # an ERR signal would stop QEMU's VM
        assert c._events == []  # nothing unsolicited (no reply to the posted write)
    finally:
        for fd in own_fds:
            os.close(fd)
        c.close()
        ram.close()
