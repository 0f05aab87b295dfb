"""Memory that two processes share by fd: a memfd and its mapping.

Both ends of vfio-user need it: a device's shared pages (a sparse-mmap area, the shadow
doorbell page handed out with the io fds) and the VMM's guest RAM (DMA-mapped into the
server by fd). One class serves both, so neither end imports the other's module for it.
"""

from __future__ import annotations

import mmap
import os


class SharedMemory:
    """A memfd with a mapping: memory both the server and the client (or KVM) can map."""

    def __init__(self, size: int, name: str = "vfio-user-shm") -> None:
        self.size = (size + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            self.mm = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self.mm)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.view.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # a numpy view still alive; the mapping goes when it does
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "SharedMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
