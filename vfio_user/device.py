"""The device API: what a device implementer declares and the callbacks it receives.

A device is an object with a PCI config space, regions (BARs with read/write handlers and
optional mmap areas backed by shared memory), interrupt counts and ioeventfds. A backend (our
pure-Python server, or libvfio-user) serves it to a client and calls it back. The device
reaches guest memory and interrupts only through the :class:`DeviceContext` it is given when
a client attaches, so it never sees sockets, raw addresses or backend details.
"""

from __future__ import annotations

import asyncio
import enum
import mmap
import os
from dataclasses import dataclass, field
from typing import Callable

from .constants import IrqIndex, RegionIndex
from .memfd import SharedMemory
from .dma import GuestMemory
from .irq import IrqRouting
from .pci import PciConfigSpace

ReadHandler = Callable[[int, int], bytes]  # (offset, count) -> data
WriteHandler = Callable[[int, bytes], None]  # (offset, data)


class ResetKind(enum.Enum):
    DEVICE = "device"  # DEVICE_RESET message (system reset, guest reboot)
    FLR = "flr"  # function-level reset through the PCIe capability
    LOST_CONNECTION = "lost-connection"  # the client went away


class IoEventFd:
    """An eventfd a client may register with KVM for writes at ``offset`` of a region.

    With ``shadow`` set, it is a shadow ioeventfd (record type 2): KVM (POST_WRITE) or the
    client stores the written value at ``shadow_offset`` of the shared memory before it
    signals, so the device can read *what* was written, not only that something was.
    """

    def __init__(
        self,
        offset: int,
        size: int,
        *,
        datamatch: int | None = None,
        shadow: SharedMemory | None = None,
        shadow_offset: int = 0,
        pio: bool = False,
    ) -> None:
        if size not in (0, 1, 2, 4, 8):
            raise ValueError(f"ioeventfd size {size} is not 0/1/2/4/8")
        if shadow is not None and (size == 0 or shadow_offset + size > shadow.size):
            raise ValueError("shadow slot outside its shared memory")
        self.offset = offset
        self.size = size
        self.datamatch = datamatch
        self.shadow = shadow
        self.shadow_offset = shadow_offset
        self.pio = pio
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def drain(self) -> int:
        """Read and reset the counter: how many writes arrived since the last drain."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def shadow_value(self) -> int:
        """The last value written, as KVM (or an emulating client) stored it."""
        assert self.shadow is not None
        start = self.shadow_offset
        return int.from_bytes(self.shadow.view[start : start + self.size], "little")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(eq=False)
class Region:
    """One region (BAR, ROM or config) as the client sees it.

    ``mmap_areas`` are (offset, size) pairs the client may map; they are backed by
    ``memory`` (created here when not given), which the device reads and writes directly.
    Accesses outside mapped areas (or by a client that did not map) reach the handlers;
    with no handler, they are served from ``memory`` when there is one.
    """

    size: int
    read: ReadHandler | None = None
    write: WriteHandler | None = None
    io: bool = False
    bits64: bool = False
    prefetchable: bool = False
    mmap_areas: list[tuple[int, int]] = field(default_factory=list)
    memory: SharedMemory | None = None
    ioeventfds: list[IoEventFd] = field(default_factory=list)

    def __post_init__(self) -> None:
        for off, length in self.mmap_areas:
            if off % mmap.PAGESIZE or length % mmap.PAGESIZE or off + length > self.size:
                raise ValueError(f"mmap area {off:#x}+{length:#x} not page aligned inside the region")
        if self.mmap_areas and self.memory is None:
            self.memory = SharedMemory(self.size, "vfio-user-region")

    @property
    def readable(self) -> bool:
        return self.read is not None or self.memory is not None

    @property
    def writable(self) -> bool:
        return self.write is not None or self.memory is not None

    def do_read(self, offset: int, count: int) -> bytes:
        if self.read is not None:
            return self.read(offset, count)
        if self.memory is not None:
            return bytes(self.memory.view[offset : offset + count])
        raise PermissionError("region is not readable")

    def do_write(self, offset: int, data: bytes) -> None:
        if self.write is not None:
            self.write(offset, data)
        elif self.memory is not None:
            self.memory.view[offset : offset + len(data)] = data
        else:
            raise PermissionError("region is not writable")

    def add_ioeventfd(self, ioeventfd: IoEventFd) -> IoEventFd:
        if ioeventfd.offset + max(ioeventfd.size, 1) > self.size:
            raise ValueError("ioeventfd outside its region")
        self.ioeventfds.append(ioeventfd)
        return ioeventfd

    def remove_ioeventfd(self, ioeventfd: IoEventFd) -> None:
        self.ioeventfds.remove(ioeventfd)
        ioeventfd.close()

    def close(self) -> None:
        for efd in self.ioeventfds:
            efd.close()
        self.ioeventfds.clear()
        if self.memory is not None:
            self.memory.close()


@dataclass(eq=False)
class DeviceContext:
    """What a backend gives a device while a client is attached."""

    memory: GuestMemory
    irqs: IrqRouting
    loop: asyncio.AbstractEventLoop


class DeviceObserver:
    """Something outside the device that follows its attachment and its ioeventfds
    (e.g. :class:`vfio_user.ioeventfd_export.IoeventfdExport`). Methods are no-ops here."""

    def device_attached(self) -> None:
        """A client attached."""

    def device_detached(self) -> None:
        """The client went away."""

    def ioeventfds_changed(self, index: int) -> None:
        """The set :meth:`Device.exported_ioeventfds` returns for region ``index`` changed."""

    def describe(self) -> dict | None:
        """Counters for the device's stats (None: nothing to report)."""
        return None


class Device:
    """Base class: declare ``config``, ``regions`` and ``irq_counts``; override callbacks.

    All callbacks run on the backend's event-loop thread, one at a time, in message order.
    """

    #: Whether DEVICE_GET_INFO advertises reset (QEMU only sends DEVICE_RESET if it does).
    supports_reset = True

    def __init__(self, *, express: bool = True) -> None:
        self.config = PciConfigSpace(express=express)
        self.regions: dict[int, Region] = {}
        self.irq_counts: dict[IrqIndex, int] = {IrqIndex.INTX: 1, IrqIndex.ERR: 1, IrqIndex.REQ: 1}
        self.ctx: DeviceContext | None = None
        self.observers: list[DeviceObserver] = []

    def add_region(self, index: RegionIndex | int, region: Region) -> Region:
        """Declare a BAR (0-5) or the ROM (6); BAR type bits go into config space."""
        index = RegionIndex(index)
        if index == RegionIndex.CONFIG:
            raise ValueError("the config region is the device's config space")
        self.regions[index] = region
        if index <= RegionIndex.BAR5:
            self.config.declare_bar(index, region.size, io=region.io, bits64=region.bits64, prefetchable=region.prefetchable)
        return region

    # -- callbacks --------------------------------------------------------------------

    def attached(self, ctx: DeviceContext) -> None:
        """A client connected: guest memory and interrupts are now reachable through ``ctx``."""
        self.ctx = ctx
        for o in self.observers:
            o.device_attached()

    def detached(self) -> None:
        """The client is gone; its mappings and eventfds are already released. Keep state."""
        for o in self.observers:
            o.device_detached()
        self.ctx = None

    def exported_ioeventfds(self, index: int, post_write: bool) -> list[IoEventFd]:
        """The ioeventfds of region ``index`` an agent inside the VMM may register with KVM.

        With ``post_write`` (the kernel copies the value to the shadow slot) every one
        qualifies. Without it a shadow ioeventfd would deliver a signal with no value, so
        only plain ones do, unless the device knows the value lives elsewhere (override).
        """
        region = self.regions.get(index)
        if region is None:
            return []
        return [e for e in region.ioeventfds if post_write or e.shadow is None]

    def ioeventfds_changed(self, index: int) -> None:
        """Devices call this when :meth:`exported_ioeventfds` would answer differently."""
        for o in self.observers:
            o.ioeventfds_changed(index)

    def reset(self, kind: ResetKind) -> None:
        """DEVICE_RESET, FLR or lost connection; config registers are reset by the caller."""

    def dma_unmapping(self, iova: int, size: int) -> None:
        """Drop every view into ``[iova, iova + size)``: it is about to be unmapped."""

    def irq_unmasked(self, index: IrqIndex, vector: int) -> None:
        """The client unmasked an (INTx) interrupt: re-assert it if the condition holds."""

    def ioeventfds_taken(self, index: int) -> None:
        """The client fetched region ``index``'s ioeventfds (GET_REGION_IO_FDS with records)."""

    def config_written(self, offset: int, old: int, new: int) -> None:
        """A config dword changed (after masks): hook for FLR, COMMAND, MSI-X enable."""

    def close(self) -> None:
        """Release the device's own resources (regions' shared memory, ioeventfds)."""
        for region in self.regions.values():
            region.close()
