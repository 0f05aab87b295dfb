"""The device's side of a libvfio-user context: set it up from the device, answer its callbacks.

:class:`ContextGlue` translates the device API into libvfio-user calls (config space, regions
with their sparse mmap areas, interrupt counts, DMA, reset, ioeventfds: see the package's
docstring) and is called back by the library for each access, reset, interrupt state change
and DMA (un)registration. It knows nothing of the socket: the server owns the context, the
connection and the worker thread, and tells the glue of a new client
(:meth:`ContextGlue.attach_table`) and of the worker (:attr:`ContextGlue.worker_thread`).
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import threading
from typing import Any, Callable

from .. import dma_guard
from ..constants import DMA_FLAG_WRITE, IOEVENTFD_FLAG_DATAMATCH, IOEVENTFD_FLAG_PIO, IrqIndex
from ..device import Device, Region, ResetKind
from ..dma import DmaError, DmaMapping, DmaTable, guard_memory
from ..pci import EXP_DEVCTL, EXP_DEVCTL_BCR_FLR, REVISION_ID
from .library import (
    MREMAP_MAYMOVE,
    PCI_HEADER_TYPE_NORMAL,
    SYSLOG_TO_LOGGING,
    VFU_PCI_DEV_CFG_REGION_IDX,
    VFU_PCI_TYPE_CONVENTIONAL,
    VFU_PCI_TYPE_EXPRESS,
    VFU_REGION_FLAG_64_BITS,
    VFU_REGION_FLAG_ALWAYS_CB,
    VFU_REGION_FLAG_MEM,
    VFU_REGION_FLAG_PREFETCH,
    VFU_REGION_FLAG_READ,
    VFU_REGION_FLAG_RW,
    VFU_REGION_FLAG_WRITE,
    VFU_RESET_LOST_CONN,
    VFU_RESET_PCI_FLR,
    Library,
)

log = logging.getLogger(__name__)

#: libvfio-user's interrupt state callback, by index: (index, start, count, masked).
IrqStateCallback = Callable[[IrqIndex, int, int, bool], None]


class ForeignDmaTable(DmaTable):
    """A DMA table whose mappings libvfio-user made: entries come in, never from an fd here."""

    def insert(self, mapping: DmaMapping) -> None:
        """Add a mapping libvfio-user accepted (it did the alignment checks); overlaps raise."""
        i = bisect.bisect_right(self._starts, mapping.iova)
        if i > 0 and self._maps[i - 1].iova == mapping.iova and self._maps[i - 1].size == mapping.size:
            return  # libvfio-user treats an identical DMA_MAP as a no-op
        if (i > 0 and self._maps[i - 1].iova + self._maps[i - 1].size > mapping.iova) or (i < len(self._maps) and self._maps[i].iova < mapping.end):
            raise DmaError(errno.EEXIST, f"DMA range at {mapping.iova:#x} overlaps an existing mapping")
        self._starts.insert(i, mapping.iova)
        self._maps.insert(i, mapping)


class ContextGlue:
    """Sets a libvfio-user context up for ``device`` and answers the library's callbacks.

    ``lost_connection``: the library reset the context because the client is gone (the
    server tears the connection down). ``irq_state``: the client masked or unmasked vectors
    (the server hands it to the attached client's interrupts).
    """

    def __init__(self, library: Library, device: Device, *, lost_connection: Callable[[], None], irq_state: IrqStateCallback) -> None:
        self._ffi, self._lib, self._libc = library.ffi, library.lib, library.libc
        self._library = library
        self.device = device
        self._lost_connection = lost_connection
        self._irq_state = irq_state
        #: Whether shadow ioeventfds were accepted (library built with -Dshadow-ioeventfd=true).
        self.shadow_ioeventfds: bool | None = None
        self.skipped_ioeventfds = 0
        self.offered_ioeventfds: dict[int, int] = {}
        #: The attached client's DMA mappings (from :meth:`attach_table`).
        self.table: ForeignDmaTable | None = None
        self._callbacks: list[Any] = []  # keep every cffi callback alive as long as the ctx
        self.worker_thread: int | None = None  # the server's worker's ident, once it has run something
        #: Callbacks libvfio-user made from the worker (a DMA exchange that found the client
        #: gone resets the context there): run on the loop thread once the call returns.
        self._deferred: list[Callable[[], None]] = []

    def attach_table(self, max_dma_maps: int) -> ForeignDmaTable:
        """A new client: its empty DMA table, whose unmaps the device hears of."""
        self.table = ForeignDmaTable(max_dma_maps)
        self.table.unmap_listeners.append(self.device.dma_unmapping)
        return self.table

    # -- set-up ---------------------------------------------------------------------------

    def _cb(self, ctype: str, fn: Callable) -> Any:
        cb = self._ffi.callback(ctype, fn)
        self._callbacks.append(cb)
        return cb

    def setup(self, vfu: Any, *, max_dma_maps: int, library_log_level: int) -> None:
        """Register the device with the new context ``vfu``: log, PCI header, config space,
        regions, interrupts, DMA, reset, ioeventfds (raises OSError as the library fails)."""
        ffi, lib, dev = self._ffi, self._lib, self.device
        self._library.check(lib.vfu_setup_log(vfu, self._cb("vfu_log_fn_t", self._log), library_log_level), "vfu_setup_log")
        pci_type = VFU_PCI_TYPE_EXPRESS if dev.config.size > 256 else VFU_PCI_TYPE_CONVENTIONAL
        self._library.check(lib.vfu_pci_init(vfu, pci_type, PCI_HEADER_TYPE_NORMAL, dev.config.get(REVISION_ID, 1)), "vfu_pci_init")
        # Config space: always through our callback, so PciConfigSpace stays authoritative.
        cfg_cb = self._cb("vfu_region_access_cb_t", self._config_access)
        self._library.check(
            lib.vfu_setup_region(vfu, VFU_PCI_DEV_CFG_REGION_IDX, dev.config.size, cfg_cb, VFU_REGION_FLAG_RW | VFU_REGION_FLAG_ALWAYS_CB, ffi.NULL, 0, -1, 0),
            "vfu_setup_region(config)",
        )
        for index, region in sorted(dev.regions.items()):
            self._setup_region(vfu, int(index), region)
        for index in IrqIndex:
            count = dev.irq_counts.get(index, 0)
            self._library.check(lib.vfu_setup_device_nr_irqs(vfu, int(index), count), f"vfu_setup_device_nr_irqs({index.name})")
            if count:
                cb = self._cb("vfu_dev_irq_state_cb_t", lambda _ctx, start, n, mask, index=index: self._irq_state(index, start, n, mask))
                self._library.check(lib.vfu_setup_irq_state_callback(vfu, int(index), cb), "vfu_setup_irq_state_callback")
        self._library.check(
            lib.vfu_setup_device_dma(
                vfu, max_dma_maps, self._cb("vfu_dma_register_cb_t", self._dma_register), self._cb("vfu_dma_unregister_cb_t", self._dma_unregister)
            ),
            "vfu_setup_device_dma",
        )
        self._library.check(lib.vfu_setup_device_reset_cb(vfu, self._cb("vfu_reset_cb_t", self._reset)), "vfu_setup_device_reset_cb")
        for index, region in sorted(dev.regions.items()):
            for efd in region.ioeventfds:
                self._create_ioeventfd(vfu, int(index), efd)

    def _setup_region(self, vfu: Any, index: int, region: Region) -> None:
        ffi, lib = self._ffi, self._lib
        flags = (VFU_REGION_FLAG_READ if region.readable else 0) | (VFU_REGION_FLAG_WRITE if region.writable else 0)
        if not flags:
            log.warning("region %d is neither readable nor writable: not offered", index)
            return
        if not region.io:
            flags |= VFU_REGION_FLAG_MEM
        if region.bits64:
            flags |= VFU_REGION_FLAG_64_BITS
        if region.prefetchable:
            flags |= VFU_REGION_FLAG_PREFETCH
        cb = self._cb("vfu_region_access_cb_t", lambda _ctx, buf, count, offset, is_write: self._region_access(region, buf, count, offset, is_write))
        areas, nr, fd = ffi.NULL, 0, -1
        if region.mmap_areas and region.memory is not None:
            nr = len(region.mmap_areas)
            areas = ffi.new("struct iovec[]", nr)
            for i, (off, size) in enumerate(region.mmap_areas):
                areas[i].iov_base = ffi.cast("void *", off)
                areas[i].iov_len = size
            fd = region.memory.fd
        self._library.check(lib.vfu_setup_region(vfu, index, region.size, cb, flags, areas, nr, fd, 0), f"vfu_setup_region({index})")

    def _create_ioeventfd(self, vfu: Any, index: int, efd: Any) -> None:
        flags = (IOEVENTFD_FLAG_DATAMATCH if efd.datamatch is not None else 0) | (IOEVENTFD_FLAG_PIO if efd.pio else 0)
        shadow_fd = efd.shadow.fd if efd.shadow is not None else -1
        ret = self._lib.vfu_create_ioeventfd(vfu, index, efd.fd, efd.offset, efd.size, flags, efd.datamatch or 0, shadow_fd, efd.shadow_offset)
        if ret < 0:
            err = self._ffi.errno
            if shadow_fd != -1 and err == errno.EINVAL:
                # Built without -Dshadow-ioeventfd=true: a plain record would signal without the
                # value, so the device would act on a stale shadow slot. Offer nothing instead:
                # those writes keep arriving as REGION_WRITEs.
                if self.shadow_ioeventfds is None:
                    log.warning("libvfio-user was built without shadow ioeventfd support (-Dshadow-ioeventfd=true): shadow ioeventfds not offered")
                self.shadow_ioeventfds = False
                self.skipped_ioeventfds += 1
                return
            raise OSError(err, f"vfu_create_ioeventfd(region {index}, offset {efd.offset:#x}) failed: {os.strerror(err)}")
        if shadow_fd != -1:
            self.shadow_ioeventfds = True
        self.offered_ioeventfds[index] = self.offered_ioeventfds.get(index, 0) + 1

    # -- callbacks from libvfio-user (all on the loop thread, inside vfu_run_ctx) ------------

    def _log(self, _ctx: Any, level: int, msg: Any) -> None:
        log.log(SYSLOG_TO_LOGGING.get(level, logging.ERROR), "libvfio-user: %s", self._ffi.string(msg).decode(errors="replace"))

    def _fail(self, err: int) -> int:
        self._ffi.errno = err
        return -1

    def _region_access(self, region: Region, buf: Any, count: int, offset: int, is_write: bool) -> int:
        ffi = self._ffi
        try:
            if is_write:
                region.do_write(offset, ffi.unpack(buf, count))
            else:
                data = region.do_read(offset, count)
                if len(data) != count:
                    log.warning("device returned %d of %d bytes", len(data), count)
                    return self._fail(errno.EIO)
                ffi.memmove(buf, data, count)
            return count
        except PermissionError:
            return self._fail(errno.EPERM)
        except Exception:  # a device bug must not take the server down
            log.exception("region access failed in the device")
            return self._fail(errno.EIO)

    def _config_access(self, _ctx: Any, buf: Any, count: int, offset: int, is_write: bool) -> int:
        ffi = self._ffi
        try:
            if is_write:
                self.device.config.write(offset, ffi.unpack(buf, count))
            else:
                ffi.memmove(buf, self.device.config.read(offset, count), count)
            return count
        except IndexError:
            return self._fail(errno.EINVAL)
        except Exception:
            log.exception("config access failed in the device")
            return self._fail(errno.EIO)

    def config_hook(self, offset: int, old: int, new: int) -> None:
        """The device's config space was written (a write hook the server registers): FLR
        resets the device, anything else goes to the device."""
        exp = self.device.config.exp_offset
        if exp is not None and offset == exp + EXP_DEVCTL and new & EXP_DEVCTL_BCR_FLR:
            log.info("function-level reset requested")
            self._device_reset(ResetKind.FLR)
            return
        self.device.config_written(offset, old, new)

    def _device_reset(self, kind: ResetKind) -> None:
        self.device.config.reset_registers()
        self.device.reset(kind)

    def _off_loop(self, fn: Callable, *args: Any) -> bool:
        """Called from the worker thread: queue ``fn(*args)`` for the loop thread (True)."""
        if threading.get_ident() != self.worker_thread:
            return False
        self._deferred.append(lambda: fn(*args))
        return True

    def run_deferred(self) -> None:
        """On the loop thread, once a call in the worker returned: what it deferred."""
        while self._deferred:
            self._deferred.pop(0)()

    def _reset(self, _ctx: Any, kind: int) -> int:
        if self._off_loop(self._reset, _ctx, kind):
            return 0
        try:
            if kind == VFU_RESET_LOST_CONN:
                self._lost_connection()
            else:
                self._device_reset(ResetKind.FLR if kind == VFU_RESET_PCI_FLR else ResetKind.DEVICE)
            return 0
        except Exception:
            log.exception("reset failed in the device")
            return self._fail(errno.EIO)

    def _dma_register(self, _ctx: Any, info: Any) -> None:
        ffi = self._ffi
        try:
            iova = int(ffi.cast("uintptr_t", info.iova.iov_base))
            size = int(info.iova.iov_len)
            prot = int(info.prot)
            mapping = DmaMapping(iova, size, prot)
            if info.vaddr != ffi.NULL:
                mapping.view, mapping.guard_slot, mapping.unguard_on_close = self._own_view(info, size, prot)
            assert self.table is not None
            self.table.insert(mapping)
        except Exception:
            # libvfio-user has already accepted the map; the device just cannot reach it.
            log.exception("DMA register callback failed")

    def _own_view(self, info: Any, size: int, prot: int) -> tuple[memoryview, int, bool]:
        """A view on a second mapping of the region's pages, unmapped when its last view dies;
        with its SIGBUS guard slot (withdrawn right before that munmap) and whether the
        mapping's close must withdraw it instead (libvfio-user's own mapping, the fallback)."""
        ffi, libc = self._ffi, self._libc
        base = info.mapping.iov_base
        length = int(info.mapping.iov_len)
        delta = int(ffi.cast("uintptr_t", info.vaddr)) - int(ffi.cast("uintptr_t", base))
        new = libc.mremap(base, ffi.cast("size_t", 0), ffi.cast("size_t", length), ffi.cast("int", MREMAP_MAYMOVE))
        if int(ffi.cast("intptr_t", new)) == -1:
            log.warning("mremap failed (%s): using libvfio-user's mapping directly", os.strerror(ffi.errno))
            view = memoryview(ffi.buffer(ffi.cast("char *", info.vaddr), size))
            slot, unguard_on_close = guard_memory(view), True
        else:
            slot, unguard_on_close = dma_guard.guard_range(int(ffi.cast("uintptr_t", new)), length), False

            def unmap(p: Any, n: int = length, s: int = slot) -> None:
                dma_guard.unguard(s)
                libc.munmap(p, n)

            owner = ffi.gc(ffi.cast("char *", new), unmap)
            # the buffer must reference ``owner`` itself (``owner + n`` would not keep it alive)
            view = memoryview(ffi.buffer(owner, length))[delta : delta + size]
        return (view if prot & DMA_FLAG_WRITE else view.toreadonly()), slot, unguard_on_close

    def _dma_unregister(self, _ctx: Any, info: Any) -> None:
        ffi = self._ffi
        try:
            iova = int(ffi.cast("uintptr_t", info.iova.iov_base))
            size = int(info.iova.iov_len)
            if self._off_loop(self._forget_dma, iova, size):
                return  # our views are our own mappings: libvfio-user may unmap its own now
            self._forget_dma(iova, size)
        except Exception:
            log.exception("DMA unregister callback failed")

    def _forget_dma(self, iova: int, size: int) -> None:
        try:
            if self.table is not None:
                self.table.remove(iova, size)  # listeners (device.dma_unmapping) first
        except DmaError as e:
            log.warning("DMA unregister of an unknown range: %s", e)
        except Exception:
            log.exception("DMA unregister failed")
