"""Guest memory for the Python KVM VMM: memfd-backed regions and the memory slots over them.

:class:`MemfdRegion` is a memfd, its shared mapping and the userspace address KVM wants;
:class:`GuestRam` is one KVM memory slot over a region
(:meth:`vfio_user.vmm.kvm.VirtualMachine.add_memory` makes them). Nothing here issues a KVM
ioctl, so the guest programs (:mod:`vfio_user.vmm.x86`) and the POST_WRITE fallback
(:mod:`vfio_user.vmm.post_write`) take memory from here without the VM.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Optional

from ._kvm_cdef import ffi
from ..memfd import sealed_memfd

__all__ = ["MemfdRegion", "GuestRam", "close_fd"]


def close_fd(fd: int) -> None:
    """Close ``fd`` if it is one (>= 0); an error closing it is ignored (the VMM's objects
    close what they own exactly once, from ``close()``, and must not fail there)."""
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


class MemfdRegion:
    """A memfd + shared mmap + memoryview + userspace address.

    Why a memfd: the same pages must be shareable with another process (a vfio-user
    server gets guest RAM, and the shadow-doorbell page, by fd via SCM_RIGHTS). Anonymous
    memory could not be passed on.

    Pitfall handled here: ``ffi.from_buffer(mmap)`` and ``memoryview(mmap)`` both export
    the mmap's buffer; ``mmap.close()`` raises BufferError while an export is alive. So
    close() releases the memoryview and the cffi handle (``ffi.release``) before unmapping.
    Callers that took their own slices/casts of :attr:`view` must release them first.
    """

    def __init__(self, size: int, name: str = "nvme-emu", *, fd: Optional[int] = None) -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"size must be a positive multiple of {mmap.PAGESIZE}, got {size}")
        self.size = size
        self.owns_fd = fd is None
        # sealed as QEMU seals guest RAM: the server refuses a memfd the VMM could shrink
        self.fd: int = sealed_memfd(name, size) if fd is None else fd
        self.mmap: Optional[mmap.mmap] = None
        try:
            self.mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.view: memoryview = memoryview(self.mmap)
            self._cbuf = ffi.from_buffer("uint8_t[]", self.mmap, require_writable=True)
            #: Host virtual address of byte 0 (what KVM wants as userspace_addr/post_addr).
            self.addr: int = int(ffi.cast("uintptr_t", self._cbuf))
        except BaseException:
            self.close()
            raise

    def ptr(self, ctype: str, offset: int = 0):  # -> cffi pointer
        """A typed cffi pointer into the region (single aligned loads/stores)."""
        if not 0 <= offset < self.size:
            raise ValueError("offset out of range")
        return ffi.cast(ctype, self._cbuf + offset)

    def close(self) -> None:
        view = getattr(self, "view", None)
        if view is not None:
            view.release()
            del self.view
        cbuf = getattr(self, "_cbuf", None)
        if cbuf is not None:
            ffi.release(cbuf)
            del self._cbuf
        if self.mmap is not None:
            self.mmap.close()
            self.mmap = None
        if self.owns_fd:
            fd, self.fd = self.fd, -1
            close_fd(fd)

    def __enter__(self) -> "MemfdRegion":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class GuestRam:
    """One KVM memory slot backed by a :class:`MemfdRegion`.

    ``fd``/``view``/``addr`` are the region's; ``owned`` says whether the VM closes the
    region (True when :meth:`VirtualMachine.add_memory` allocated it).
    """

    gpa: int
    slot: int
    region: MemfdRegion
    owned: bool

    @property
    def fd(self) -> int:
        return self.region.fd

    @property
    def view(self) -> memoryview:
        return self.region.view

    @property
    def size(self) -> int:
        return self.region.size

    @property
    def addr(self) -> int:
        return self.region.addr

    def write(self, gpa: int, data: bytes) -> None:
        """Copy ``data`` into guest memory at guest-physical ``gpa``."""
        off = gpa - self.gpa
        if off < 0 or off + len(data) > self.size:
            raise ValueError(f"gpa range {gpa:#x}+{len(data)} outside slot {self.slot}")
        self.view[off : off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        off = gpa - self.gpa
        if off < 0 or off + n > self.size:
            raise ValueError(f"gpa range {gpa:#x}+{n} outside slot {self.slot}")
        return bytes(self.view[off : off + n])
