"""A small sample device, to learn the device API in one sitting.

"Ticker" has one 32-byte register BAR, one shared-memory BAR the client may mmap, MSI-X
(2 vectors) with INTx as fallback, DMA, and a shadow ioeventfd on its doorbell:

BAR0 registers (32-bit unless noted)
  0x00 ID        read-only magic
  0x04 SCRATCH   read/write, survives client reconnects (device state)
  0x08 DOORBELL  write N: raise interrupt vector N & 1 and count the ring
  0x0C RINGS     read-only: doorbells seen so far
  0x10 DMA_SRC   64-bit guest address
  0x18 DMA_DST   64-bit guest address; writing it copies DMA_LEN bytes SRC -> DST
  (DMA_LEN lives in SCRATCH to keep the map short)
BAR1  4 KiB of shared memory, sparse-mmappable
BAR2  MSI-X table at 0, PBA at 0x800 (QEMU emulates the table; we serve PBA reads)

Run it: ``python -m vfio_user.sample --socket /tmp/ticker.sock``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import struct

from .constants import IrqIndex, RegionIndex
from .device import Device, DeviceContext, IoEventFd, Region, SharedMemory
from .dma import DmaError

TICKER_ID = 0x7E57_1C4E
REG_ID, REG_SCRATCH, REG_DOORBELL, REG_RINGS, REG_DMA_SRC, REG_DMA_DST = 0x0, 0x4, 0x8, 0xC, 0x10, 0x18
BAR0_SIZE = 32
MSIX_VECTORS = 2

log = logging.getLogger(__name__)


class Ticker(Device):
    def __init__(self) -> None:
        super().__init__()
        self.config.set_ids(vendor=0x4E58, device=0x0001, subsystem_vendor=0x4E58, subsystem=0x0001)
        self.config.set_class(0xFF, 0x00, 0x00)  # unclassified device
        self.config.set_interrupt_pin(1)
        self.config.add_pm_capability()
        self.config.add_express_capability()
        self.config.add_msix_capability(MSIX_VECTORS, table_bar=2, table_offset=0, pba_bar=2, pba_offset=0x800)
        self.irq_counts[IrqIndex.MSIX] = MSIX_VECTORS

        self.regs = bytearray(BAR0_SIZE)
        struct.pack_into("<I", self.regs, REG_ID, TICKER_ID)
        bar0 = self.add_region(RegionIndex.BAR0, Region(BAR0_SIZE, read=self._read, write=self._write))
        self.add_region(RegionIndex.BAR1, Region(4096, mmap_areas=[(0, 4096)]))
        self.add_region(RegionIndex.BAR2, Region(4096, read=self._msix_read, write=lambda off, data: None))

        # The doorbell may also come by a shadow ioeventfd: the value lands in shared memory.
        self.shadow = SharedMemory(4096, "ticker-shadow")
        self.doorbell_efd = bar0.add_ioeventfd(IoEventFd(REG_DOORBELL, 4, shadow=self.shadow, shadow_offset=0))
        self.pending_dma: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------

    def attached(self, ctx: DeviceContext) -> None:
        super().attached(ctx)
        ctx.loop.add_reader(self.doorbell_efd.fd, self._doorbell_signalled)

    def detached(self) -> None:
        if self.ctx is not None:
            self.ctx.loop.remove_reader(self.doorbell_efd.fd)
        super().detached()

    def reset(self, kind) -> None:
        struct.pack_into("<I", self.regs, REG_RINGS, 0)

    def close(self) -> None:
        super().close()
        self.shadow.close()

    # -- registers -----------------------------------------------------------------------

    def _read(self, offset: int, count: int) -> bytes:
        return bytes(self.regs[offset : offset + count])

    def _write(self, offset: int, data: bytes) -> None:
        if offset == REG_SCRATCH and len(data) == 4:
            self.regs[offset : offset + 4] = data
        elif offset == REG_DOORBELL and len(data) == 4:
            self._ring(int.from_bytes(data, "little"))
        elif offset in (REG_DMA_SRC, REG_DMA_DST) and len(data) == 8:
            self.regs[offset : offset + 8] = data
            if offset == REG_DMA_DST:
                self._start_dma()
        # other writes (ID, RINGS, odd sizes) are ignored, as hardware would

    def _doorbell_signalled(self) -> None:
        if self.doorbell_efd.drain():
            self._ring(self.doorbell_efd.shadow_value())

    def _ring(self, value: int) -> None:
        rings = struct.unpack_from("<I", self.regs, REG_RINGS)[0] + 1
        struct.pack_into("<I", self.regs, REG_RINGS, rings)
        if self.ctx is not None:
            self.ctx.irqs.trigger_vector(value & 1)

    def _msix_read(self, offset: int, count: int) -> bytes:
        return bytes(count)  # table reads are QEMU's; PBA: nothing pending

    # -- DMA -----------------------------------------------------------------------------

    def _start_dma(self) -> None:
        if self.ctx is None:
            return
        src, dst = struct.unpack_from("<QQ", self.regs, REG_DMA_SRC)
        length = struct.unpack_from("<I", self.regs, REG_SCRATCH)[0]
        task = self.ctx.loop.create_task(self._copy(self.ctx, src, dst, length))
        self.pending_dma.add(task)
        task.add_done_callback(self.pending_dma.discard)

    async def _copy(self, ctx: DeviceContext, src: int, dst: int, length: int) -> None:
        """Copy through guest memory: zero-copy views where mapped by fd, messages otherwise."""
        try:
            await ctx.memory.awrite(dst, await ctx.memory.aread(src, length))
        except DmaError as e:
            log.warning("ticker DMA %#x -> %#x (%d bytes) refused: %s", src, dst, length, e)
            return
        ctx.irqs.trigger_vector(1)


def main(argv: list[str] | None = None) -> None:
    from .backends import make_server
    from .server import new_event_loop
    from .server_api import ServerBackend

    parser = argparse.ArgumentParser(description="Serve the sample Ticker device over vfio-user.")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--backend", default=ServerBackend.PYTHON.value, choices=[b.value for b in ServerBackend],
                        help="vfio-user server: ours (python) or nutanix/libvfio-user (docs/libvfio-user.md)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    device = Ticker()
    loop = new_event_loop()
    server = make_server(ServerBackend(args.backend), device, args.socket)
    try:
        loop.run_until_complete(server.start())
        print(f"ticker: serving on {args.socket} (backend {server.backend})", flush=True)
        loop.run_until_complete(server.serve_forever())
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        device.close()
        loop.close()


if __name__ == "__main__":
    main()
