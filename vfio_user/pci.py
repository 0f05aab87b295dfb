"""PCI configuration space: the bytes a device declares and the write rules a client sees.

QEMU forwards every guest config write to the server and reads back everything it does not
emulate itself (vfio-user-protocol.md §3), so the server keeps real registers here: a value
array, a writable mask, a write-one-to-clear mask, BAR sizing, and capability lists.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

# Header offsets (PCI Local Bus spec, type 0 header).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_IO = 0x1
COMMAND_MEMORY = 0x2
COMMAND_MASTER = 0x4
COMMAND_SERR = 0x100
COMMAND_INTX_DISABLE = 0x400
STATUS_INTERRUPT = 0x8
STATUS_CAP_LIST = 0x10
#: Error bits of STATUS: write one to clear.
STATUS_RW1C = 0xF900

BAR_IO = 0x1
BAR_MEM_64 = 0x4
BAR_PREFETCH = 0x8

CAP_ID_PM = 0x01
CAP_ID_MSI = 0x05
CAP_ID_EXP = 0x10
CAP_ID_MSIX = 0x11
EXT_CAP_START = 0x100

PCI_CONFIG_SIZE = 256
PCIE_CONFIG_SIZE = 4096

# PCI Express capability fields (offsets inside the capability).
EXP_FLAGS = 0x2
EXP_DEVCAP = 0x4
EXP_DEVCTL = 0x8
EXP_DEVSTA = 0xA
EXP_LNKCAP = 0xC
EXP_LNKCTL = 0x10
EXP_LNKSTA = 0x12
EXP_DEVCAP2 = 0x24
EXP_DEVCTL2 = 0x28
EXP_LNKCTL2 = 0x30
EXP_SIZE_V2 = 0x3C
EXP_DEVCAP_FLR = 1 << 28
EXP_DEVCTL_BCR_FLR = 1 << 15
EXP_TYPE_ENDPOINT = 0x0

MSIX_FLAGS = 0x2
MSIX_TABLE = 0x4
MSIX_PBA = 0x8
MSIX_FLAGS_ENABLE = 1 << 15
MSIX_FLAGS_MASKALL = 1 << 14
MSIX_ENTRY_SIZE = 16

PM_CTRL = 0x4
PM_CTRL_STATE_MASK = 0x3


@dataclass(frozen=True)
class MsixLayout:
    """Where an MSI-X table and PBA live (BAR index and offset within it)."""

    cap_offset: int
    vectors: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    @property
    def table_size(self) -> int:
        return self.vectors * MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return ((self.vectors + 63) // 64) * 8


ConfigHook = Callable[[int, int, int], None]  # (offset, old dword, new dword)


class PciConfigSpace:
    """Registers of one PCI function, with masks that decide what a write may change."""

    def __init__(self, *, express: bool = True) -> None:
        self.size = PCIE_CONFIG_SIZE if express else PCI_CONFIG_SIZE
        self.data = bytearray(self.size)
        self.wmask = bytearray(self.size)
        self.w1cmask = bytearray(self.size)
        self.bar_sizes: list[int] = [0] * 6
        self.bar_flags: list[int] = [0] * 6
        self.msix: MsixLayout | None = None
        self._last_cap = CAPABILITY_LIST
        self._next_cap = 0x40
        self._last_ext: int | None = None
        self._next_ext = EXT_CAP_START
        self.pm_offset: int | None = None
        self.exp_offset: int | None = None
        self.write_hooks: list[ConfigHook] = []
        self.set_u8(HEADER_TYPE, 0)
        self._set_mask(COMMAND, 2, COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_SERR | COMMAND_INTX_DISABLE | 0x40)
        self._set_mask(STATUS, 2, STATUS_RW1C, w1c=True)
        self._set_mask(CACHE_LINE_SIZE, 1, 0xFF)
        self._set_mask(LATENCY_TIMER, 1, 0xFF)
        self._set_mask(INTERRUPT_LINE, 1, 0xFF)

    # -- raw field access -----------------------------------------------------------

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset : offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        self.data[offset : offset + size] = value.to_bytes(size, "little")

    def set_u8(self, offset: int, value: int) -> None:
        self.set(offset, 1, value)

    def set_u16(self, offset: int, value: int) -> None:
        self.set(offset, 2, value)

    def set_u32(self, offset: int, value: int) -> None:
        self.set(offset, 4, value)

    def _set_mask(self, offset: int, size: int, mask: int, *, w1c: bool = False) -> None:
        target = self.w1cmask if w1c else self.wmask
        target[offset : offset + size] = mask.to_bytes(size, "little")

    # -- identity -------------------------------------------------------------------

    def set_ids(self, *, vendor: int, device: int, subsystem_vendor: int, subsystem: int, revision: int = 0) -> None:
        self.set_u16(VENDOR_ID, vendor)
        self.set_u16(DEVICE_ID, device)
        self.set_u16(SUBSYSTEM_VENDOR_ID, subsystem_vendor)
        self.set_u16(SUBSYSTEM_ID, subsystem)
        self.set_u8(REVISION_ID, revision)

    def set_class(self, base: int, sub: int, prog_if: int) -> None:
        self.set(CLASS_PROG, 3, prog_if | sub << 8 | base << 16)

    def set_interrupt_pin(self, pin: int) -> None:
        """1 = INTA; 0 = no INTx."""
        self.set_u8(INTERRUPT_PIN, pin)

    # -- BARs -----------------------------------------------------------------------

    def declare_bar(self, index: int, size: int, *, io: bool = False, bits64: bool = False, prefetchable: bool = False) -> None:
        """Record a BAR's size and type bits; the sizing mask follows from the size."""
        if size & (size - 1) or size < (4 if io else 16):
            raise ValueError(f"BAR{index} size {size:#x} is not a power of two >= 16")
        flags = BAR_IO if io else (BAR_MEM_64 if bits64 else 0) | (BAR_PREFETCH if prefetchable else 0)
        self.bar_sizes[index] = size
        self.bar_flags[index] = flags
        off = BAR0 + 4 * index
        self.set_u32(off, flags)
        self._set_mask(off, 4, ~(size - 1) & 0xFFFFFFFF & ~(0x3 if io else 0xF))
        if bits64:
            self._set_mask(off + 4, 4, ((~(size - 1)) >> 32) & 0xFFFFFFFF)

    # -- capabilities ---------------------------------------------------------------

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> int:
        """Append a standard capability (``body`` excludes the id/next bytes); returns its offset."""
        off = self._next_cap
        length = 2 + len(body)
        if off + length > PCI_CONFIG_SIZE:
            raise ValueError("no room for another capability")
        self.data[off] = cap_id
        self.data[off + 1] = 0
        self.data[off + 2 : off + length] = body
        if wmask is not None:
            self.wmask[off + 2 : off + 2 + len(wmask)] = wmask
        self.data[self._last_cap if self._last_cap == CAPABILITY_LIST else self._last_cap + 1] = off
        self._last_cap = off
        self._next_cap = (off + length + 3) & ~3
        self.set_u16(STATUS, self.get(STATUS, 2) | STATUS_CAP_LIST)
        return off

    def add_ext_capability(self, cap_id: int, version: int, body: bytes) -> int:
        """Append a PCIe extended capability in the 0x100.. area; returns its offset."""
        if self.size < PCIE_CONFIG_SIZE:
            raise ValueError("extended capabilities need a PCIe config space")
        off = self._next_ext
        self.set_u32(off, cap_id | version << 16)
        self.data[off + 4 : off + 4 + len(body)] = body
        if self._last_ext is not None:
            hdr = self.get(self._last_ext, 4)
            self.set_u32(self._last_ext, (hdr & 0xFFFFF) | off << 20)
        self._last_ext = off
        self._next_ext = (off + 4 + len(body) + 3) & ~3
        return off

    def add_pm_capability(self) -> int:
        """Power management v3, D0 only; PMCSR power state bits writable (QEMU forces D0)."""
        pmc = 0x0003  # version 3
        body = struct.pack("<HHBB", pmc, 0x0008, 0, 0)  # PMCSR: No_Soft_Reset
        self.pm_offset = self.add_capability(CAP_ID_PM, body, wmask=struct.pack("<HH", 0, PM_CTRL_STATE_MASK))
        return self.pm_offset

    def add_express_capability(self, *, flr: bool = True, max_payload: int = 0) -> int:
        """PCIe v2 endpoint capability; FLR arrives as a DEVCTL write (bit 15)."""
        body = bytearray(EXP_SIZE_V2 - 2)

        def put(field: int, size: int, value: int) -> None:
            body[field - 2 : field - 2 + size] = value.to_bytes(size, "little")

        put(EXP_FLAGS, 2, 0x2 | EXP_TYPE_ENDPOINT << 4)
        put(EXP_DEVCAP, 4, (EXP_DEVCAP_FLR if flr else 0) | max_payload)
        put(EXP_LNKCAP, 4, 0x1 | 0x1 << 4)  # 2.5 GT/s, x1
        put(EXP_LNKSTA, 2, 0x1 | 0x1 << 4)
        wmask = bytearray(len(body))
        wmask[EXP_DEVCTL - 2 : EXP_DEVCTL] = (0x7FFF | EXP_DEVCTL_BCR_FLR).to_bytes(2, "little")
        wmask[EXP_LNKCTL - 2 : EXP_LNKCTL] = (0x0FC3).to_bytes(2, "little")
        wmask[EXP_DEVCTL2 - 2 : EXP_DEVCTL2] = (0xFFFF).to_bytes(2, "little")
        self.exp_offset = self.add_capability(CAP_ID_EXP, bytes(body), wmask=bytes(wmask))
        return self.exp_offset

    def add_msix_capability(self, vectors: int, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int) -> MsixLayout:
        """MSI-X: QEMU emulates the table, but the capability and the PBA live here."""
        if not 1 <= vectors <= 2048:
            raise ValueError("MSI-X supports 1..2048 vectors")
        body = struct.pack("<HII", vectors - 1, table_offset | table_bar, pba_offset | pba_bar)
        off = self.add_capability(CAP_ID_MSIX, body, wmask=struct.pack("<H", MSIX_FLAGS_ENABLE | MSIX_FLAGS_MASKALL))
        self.msix = MsixLayout(off, vectors, table_bar, table_offset, pba_bar, pba_offset)
        return self.msix

    @property
    def msix_enabled(self) -> bool:
        return self.msix is not None and bool(self.get(self.msix.cap_offset + MSIX_FLAGS, 2) & MSIX_FLAGS_ENABLE)

    @property
    def command(self) -> int:
        return self.get(COMMAND, 2)

    # -- client access --------------------------------------------------------------

    def read(self, offset: int, count: int) -> bytes:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise IndexError(f"config read {offset:#x}+{count} outside {self.size} bytes")
        return bytes(self.data[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        """Apply a write through the masks, then tell hooks (FLR, MSI-X enable...) per dword."""
        end = offset + len(data)
        if offset < 0 or end > self.size:
            raise IndexError(f"config write {offset:#x}+{len(data)} outside {self.size} bytes")
        first, last = offset & ~3, (end + 3) & ~3
        old = bytes(self.data[first:last])
        for i, b in enumerate(data):
            pos = offset + i
            wm, cm = self.wmask[pos], self.w1cmask[pos]
            cur = self.data[pos]
            cur = (cur & ~wm) | (b & wm)
            cur &= ~(b & cm)
            self.data[pos] = cur & 0xFF
        for dw in range(first, last, 4):
            before = int.from_bytes(old[dw - first : dw - first + 4], "little")
            after = self.get(dw, 4)
            for hook in self.write_hooks:
                hook(dw, before, after)

    def reset_registers(self) -> None:
        """What a function-level or device reset clears: COMMAND, BARs, control fields."""
        self.set_u16(COMMAND, 0)
        self.set_u16(STATUS, self.get(STATUS, 2) & ~STATUS_RW1C)
        for i, flags in enumerate(self.bar_flags):
            self.set_u32(BAR0 + 4 * i, flags)
        if self.msix is not None:
            flags_off = self.msix.cap_offset + MSIX_FLAGS
            self.set_u16(flags_off, self.get(flags_off, 2) & ~(MSIX_FLAGS_ENABLE | MSIX_FLAGS_MASKALL))
        if self.exp_offset is not None:
            self.set_u16(self.exp_offset + EXP_DEVCTL, 0)
        if self.pm_offset is not None:
            ctrl = self.pm_offset + PM_CTRL
            self.set_u16(ctrl, self.get(ctrl, 2) & ~PM_CTRL_STATE_MASK)
