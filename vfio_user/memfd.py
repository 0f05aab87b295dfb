"""Memory that two processes share by fd: a memfd and its mapping.

Both ends of vfio-user need it: a device's shared pages (a sparse-mmap area, the shadow
doorbell page handed out with the io fds) and the VMM's guest RAM (DMA-mapped into the
server by fd). One class serves both, so neither end imports the other's module for it.

Every such memfd is sealed against resizing before anyone else sees it: whoever holds the fd
could otherwise ``ftruncate`` it, and the other side's next access to the vanished pages is a
SIGBUS that kills that process (an outside fuzz found this against the server's doorbell
page). QEMU's ``memory-backend-memfd`` seals guest RAM the same way by default (``seal=on``).
"""

from __future__ import annotations

import fcntl
import mmap
import os

#: The seals that fix a memfd's size for good (QEMU's ``seal=on`` adds the same three).
SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def sealed_memfd(name: str, size: int) -> int:
    """A memfd of ``size`` bytes that nobody can shrink or grow (see the module docstring)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SIZE_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


class SharedMemory:
    """A sealed memfd with a mapping: memory both the server and the client (or KVM) can map."""

    def __init__(self, size: int, name: str = "vfio-user-shm") -> None:
        self.size = (size + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
        self.fd = sealed_memfd(name, self.size)
        try:
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
