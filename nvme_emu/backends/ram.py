"""The RAM backend: a namespace in process memory."""

from __future__ import annotations

import mmap
import os
from typing import Self

from .base import Backend, BackendKind, BackendSpec
from .iov import ZERO_CHUNK, ZEROS, Buffers, byte_views, is_byte_view

#: A RAM namespace's size when its spec gives none.
DEFAULT_RAM_SIZE = 1 << 30


class RamBackend(Backend):
    """Memory that disappears with the process: a memfd mapping, sparse until written.

    memfd gives us hole punching (MADV_REMOVE), so deallocate returns memory to the host; if
    memfd is unavailable an anonymous private mapping is used and deallocate zeroes slices.
    """

    kind = BackendKind.RAM
    default_size = DEFAULT_RAM_SIZE

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("RAM namespace size must be positive")
        self.size = size
        self._fd = -1
        try:
            self._fd = os.memfd_create("nvme-emu-ns", os.MFD_CLOEXEC)
            os.ftruncate(self._fd, size)
            self._mm = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (AttributeError, OSError):
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._mv = self.memory = memoryview(self._mm)

    @classmethod
    def check_spec(cls, spec: BackendSpec) -> None:
        if spec.readonly:
            raise ValueError("a RAM namespace cannot be read-only")

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        return cls(spec.size or DEFAULT_RAM_SIZE)

    @classmethod
    def identity_seed(cls, spec: BackendSpec, controller_seed: str) -> str:
        """Its controller's: the data does not outlive the process anyway."""
        return f"{cls.kind}:{controller_seed}"

    def read_into(self, offset: int, views: Buffers) -> None:
        if len(views) == 1 and is_byte_view(v := views[0]):  # one page or extent: the hot case
            v[:] = self._mv[offset : offset + v.nbytes]
            return
        pos = offset
        for v in byte_views(views):
            n = len(v)
            v[:] = self._mv[pos : pos + n]
            pos += n

    def write_from(self, offset: int, views: Buffers, *, fua: bool = False) -> None:
        if len(views) == 1 and is_byte_view(v := views[0]):
            self._mv[offset : offset + v.nbytes] = v
            return
        pos = offset
        for v in byte_views(views):
            n = len(v)
            self._mv[pos : pos + n] = v
            pos += n

    def write_zeroes(self, offset: int, length: int, *, deallocate: bool = False) -> None:
        self.deallocate(offset, length)

    def deallocate(self, offset: int, length: int) -> None:
        """Zero the range, giving whole pages back to the kernel where possible."""
        end = offset + length
        page = mmap.PAGESIZE
        lo = -(-offset // page) * page
        hi = end // page * page
        if self._fd >= 0 and hi > lo:
            self._zero_slice(offset, lo)
            self._mm.madvise(mmap.MADV_REMOVE, lo, hi - lo)
            self._zero_slice(hi, end)
        else:
            self._zero_slice(offset, end)

    def _zero_slice(self, start: int, end: int) -> None:
        while start < end:
            n = min(end - start, ZERO_CHUNK)
            self._mv[start : start + n] = ZEROS[:n]
            start += n

    def flush(self) -> None:
        """Nothing is volatile beyond process memory itself."""

    def allocated_bytes(self) -> int:
        if self._fd >= 0:
            return min(self.size, os.fstat(self._fd).st_blocks * 512)
        return self.size

    def close(self) -> None:
        if self._mv is not None:
            self._mv.release()
            self._mv = self.memory = None  # type: ignore[assignment]
            self._mm.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
