"""The PCI Express function of the controller: what a vfio_user backend serves.

Config space: class 01:08:02 (mass storage, NVM, NVMe I/O controller), PM, PCIe endpoint
(with FLR) and MSI-X capabilities, INTA. BAR0 (64-bit) holds the controller registers and
the doorbell array; BAR4 holds the MSI-X table (QEMU emulates it) and the PBA (served here).
This module translates between the device API and the controller; it knows no socket.
"""

from __future__ import annotations

import logging

from vfio_user.constants import IrqIndex, RegionIndex
from vfio_user.device import Device, DeviceContext, Region, ResetKind
from vfio_user.pci import COMMAND, COMMAND_INTX_DISABLE, COMMAND_MASTER

from .controller import Controller, ControllerConfig
from .doorbell import AutoPath, DoorbellMode, DoorbellPath, bar0_mmap_areas, make_path
from .namespace import Namespace
from .queue import QueueEvent
from .spec.registers import Reg

log = logging.getLogger(__name__)

CLASS_MASS_STORAGE, SUBCLASS_NVM, PROG_IF_NVME = 0x01, 0x08, 0x02
MSIX_BAR = RegionIndex.BAR4
MSIX_PBA_OFFSET = 0x1000
#: Bound once for the per-interrupt path (an IntEnum attribute access costs about 60 ns).
_MSIX, _INTX = IrqIndex.MSIX, IrqIndex.INTX
BAR4_SIZE = 0x2000
#: Windows' NVMe driver masks BAR0's address with 0xFFFFC000, so a smaller BAR0 would put its
#: registers below the BAR. The doorbells stay in their one page at 1000h (every doorbell path,
#: the poll path's mmap area and the ioeventfds use that page); the rest reads as zero.
BAR0_MIN_SIZE = 0x4000


def _pow2(n: int) -> int:
    size = 1
    while size < n:
        size <<= 1
    return size


class NvmeFunction(Device):
    """One NVMe controller as a PCI function; see the module docstring."""

    def __init__(
        self,
        namespaces: list[Namespace],
        config: ControllerConfig | None = None,
        *,
        doorbell: DoorbellMode | str = DoorbellMode.AUTO,
        spin_us: float | None = None,
        poll_idle_max_us: float | None = None,
    ) -> None:
        super().__init__(express=True)
        self.controller = Controller(namespaces, config)
        cfg = self.controller.config
        if not 1 <= cfg.msix_vectors <= 2048:
            raise ValueError("MSI-X vectors must be 1..2048")
        self._declare_config(cfg)
        bar0_size = _pow2(max(BAR0_MIN_SIZE, Reg.DOORBELLS + cfg.doorbell_bytes))
        self.bar0 = self.add_region(
            RegionIndex.BAR0,
            Region(bar0_size, read=self._bar0_read, write=self._bar0_write, bits64=True, mmap_areas=bar0_mmap_areas(doorbell)),
        )
        self.add_region(MSIX_BAR, Region(BAR4_SIZE, read=self._msix_read, write=self._msix_write))
        self.irq_counts[IrqIndex.MSIX] = cfg.msix_vectors
        options: dict[str, float] = {} if spin_us is None else {"spin_us": spin_us}  # None: the path's own default
        if poll_idle_max_us is not None:
            if DoorbellMode(doorbell) != DoorbellMode.POLL:
                raise ValueError("the poller's idle cap applies to the poll doorbell path only")
            options["idle_max_us"] = poll_idle_max_us
        self.doorbells: DoorbellPath = make_path(doorbell, self.controller, self.bar0, **options)
        self.controller.add_queue_listener(self._queue_event)
        self._follow_bus_master()  # clear at power-on: no DMA until the host enables it

    def _queue_event(self, event: QueueEvent, qid: int) -> None:
        if event is QueueEvent.DBBUF or event is QueueEvent.RESET:  # where a doorbell's value lives has changed
            self.ioeventfds_changed(RegionIndex.BAR0)

    def exported_ioeventfds(self, index: int, post_write: bool) -> list:
        """With POST_WRITE every doorbell ioeventfd carries its value. Without it a signal
        says only "written": an I/O queue's doorbell may then go to KVM only while Doorbell
        Buffer Config keeps its value in guest memory (admin doorbells stay trapped)."""
        if index != RegionIndex.BAR0 or post_write:
            return super().exported_ioeventfds(index, post_write)
        if self.controller.dbbuf is None:
            return []
        return [e for e in self.bar0.ioeventfds if (e.offset - Reg.DOORBELLS) >> 2 >= 2]

    def _declare_config(self, cfg: ControllerConfig) -> None:
        c = self.config
        c.set_ids(vendor=cfg.pci_vendor, device=cfg.pci_device, subsystem_vendor=cfg.pci_vendor, subsystem=cfg.pci_device, revision=1)
        c.set_class(CLASS_MASS_STORAGE, SUBCLASS_NVM, PROG_IF_NVME)
        c.set_interrupt_pin(1)
        c.add_pm_capability()
        c.add_express_capability(flr=True)
        c.add_msix_capability(cfg.msix_vectors, table_bar=MSIX_BAR, table_offset=0, pba_bar=MSIX_BAR, pba_offset=MSIX_PBA_OFFSET)

    # -- BAR0 --------------------------------------------------------------------------

    def _bar0_read(self, offset: int, count: int) -> bytes:
        if offset < Reg.DOORBELLS:
            return self.controller.read_register(offset, count)
        return self.doorbells.read(offset, count)

    def _bar0_write(self, offset: int, data: bytes) -> None:
        if offset < Reg.DOORBELLS:
            self.controller.write_register(offset, data)
        else:
            self.doorbells.trapped_write(offset, data)

    def _msix_read(self, offset: int, count: int) -> bytes:
        """Table reads are QEMU's business; the PBA has no pending bits (QEMU masks)."""
        return bytes(count)

    def _msix_write(self, offset: int, data: bytes) -> None:
        """QEMU emulates the table; a client writing it here changes nothing."""

    # -- interrupts --------------------------------------------------------------------

    def _raise(self, vector: int) -> bool:
        ctx = self.ctx
        if ctx is None:
            return False
        irqs = ctx.irqs
        index = irqs.active_index()
        if index == _MSIX:
            return irqs.trigger(_MSIX, vector)
        if index == _INTX:
            if self.controller.intms & 1 or self.config.get(COMMAND, 2) & COMMAND_INTX_DISABLE:
                return False
            return irqs.trigger(_INTX, 0)
        return False

    def irq_unmasked(self, index: IrqIndex, vector: int) -> None:
        if index == IrqIndex.INTX:
            self.controller.intx_unmasked()

    # -- lifecycle ---------------------------------------------------------------------

    def attached(self, ctx: DeviceContext) -> None:
        super().attached(ctx)
        self.controller.attach_host(ctx.memory, self._raise, ctx.loop)
        self.doorbells.attach(ctx.loop)

    def detached(self) -> None:
        self.doorbells.detach()
        self.controller.detach_host()
        super().detached()

    def reset(self, kind: ResetKind) -> None:
        log.info("%s reset", kind.value)
        self.controller.full_reset()
        self._follow_bus_master()  # the reset cleared COMMAND

    def config_written(self, offset: int, old: int, new: int) -> None:
        if offset == COMMAND and (old ^ new) & COMMAND_MASTER:
            self._follow_bus_master()

    def _follow_bus_master(self) -> None:
        self.controller.set_bus_master(bool(self.config.command & COMMAND_MASTER))

    def dma_unmapping(self, iova: int, size: int) -> None:
        self.controller.dma_unmapping(iova, size)

    def ioeventfds_taken(self, index: int) -> None:
        if index == RegionIndex.BAR0 and isinstance(self.doorbells, AutoPath):
            self.doorbells.client_took_ioeventfds = True
            log.info("client took the shadow ioeventfds: doorbells by eventfd")

    def close(self) -> None:
        self.doorbells.close()
        super().close()
        self.controller.close()  # the I/O workers first: none may use a closed fd
        for ns in self.controller.state.allocated.values():  # attached or not
            ns.close()

    # -- introspection -----------------------------------------------------------------

    def stats(self) -> dict:
        return {
            "doorbell_mode": self.doorbells.active_mode.value,
            "doorbells": self.doorbells.stats.as_dict(),
            "queues": self.controller.queue_stats(),
            "latency": self.controller.state.latency.snapshot(),
            **{k: v for o in self.observers for k, v in (o.describe() or {}).items()},
        }
