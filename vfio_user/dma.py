"""Guest memory as the server sees it: the DMA map table and bounds-checked views.

The client (QEMU) describes guest RAM with DMA_MAP messages. Ranges that come with a file
descriptor are mmapped here and reached directly; ranges without one can only be reached by
asking the client (DMA_READ/DMA_WRITE messages), which the transport provides through a
:class:`RemoteDma` object. A device never sees a raw address: it asks :class:`GuestMemory` for a
view of ``[iova, iova + length)`` and gets a memoryview (or numpy array) that cannot reach
outside the mapping that holds it, or a :class:`DmaError`.

Guest memory must not be able to kill the server. A memfd must be sealed against shrinking
(``F_SEAL_SHRINK``, as QEMU's ``memory-backend-memfd`` does by default) unless the server was
told to accept unsealed ones; what can still fault (an opted-in unsealed memfd, a regular file
the client truncates, a sparse file on a full file system) is caught by :mod:`.dma_guard`, and
a mapping that faulted is refused from then on (EFAULT).
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import logging
import mmap
import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from . import dma_guard
from .constants import DEFAULT_MAX_DMA_MAPS, DEFAULT_PGSIZE, DMA_FLAG_READ, DMA_FLAG_WRITE

log = logging.getLogger(__name__)


class DmaError(Exception):
    """A guest-memory access that must not be performed; ``errno`` says why."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class RemoteDma(Protocol):
    """What the transport offers for ranges without an fd (DMA_READ/DMA_WRITE messages)."""

    async def dma_read(self, iova: int, length: int) -> bytes: ...

    async def dma_write(self, iova: int, data: bytes) -> None: ...


@dataclass(eq=False)
class DmaMapping:
    """One DMA_MAP: ``[iova, iova + size)``, mmapped when the client passed an fd."""

    iova: int
    size: int
    prot: int
    file_offset: int = 0
    mm: mmap.mmap | None = None
    view: memoryview | None = field(default=None, repr=False)
    #: The SIGBUS guard's slot for this mapping's memory (-1: none, e.g. no fd).
    guard_slot: int = field(default=-1, repr=False)
    #: Withdraw ``guard_slot`` at :meth:`close` even without ``mm`` (memory someone else
    #: unmaps right after: libvfio-user's own mapping when the glue cannot map its own).
    unguard_on_close: bool = field(default=False, repr=False)
    #: A SIGBUS was absorbed in it (see :meth:`DmaTable.quarantine`): refused from then on.
    poisoned: bool = False
    #: Derived once (a mapping never changes): every guest-memory access reads them, and
    #: plain attributes cost a third of what properties do there.
    end: int = field(init=False, repr=False)
    writable: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.end = self.iova + self.size
        self.writable = bool(self.prot & DMA_FLAG_WRITE)

    def close(self) -> bool:
        """Unmap; False when a device still holds a view (the mapping is then kept alive)."""
        if self.view is not None:
            self.view.release()
            self.view = None
        if self.mm is None:
            if self.unguard_on_close:
                dma_guard.unguard(self.guard_slot)
                self.guard_slot = -1
            return True
        try:
            self.mm.close()
        except BufferError:
            return False
        self.mm = None
        dma_guard.unguard(self.guard_slot)
        self.guard_slot = -1
        return True

    def withdraw(self) -> None:
        """Refuse every lookup from now on (a poisoned mapping): ``end`` shrinks to ``iova``;
        the bounds of the range (overlaps, unmap) are ``iova + size``, which stays."""
        self.poisoned = True
        self.end = self.iova


UnmapListener = Callable[[int, int], None]


def check_dma_fd(fd: int, file_offset: int, size: int, *, unsealed_ok: bool = False) -> None:
    """Refuse (DmaError) a DMA fd the server cannot map safely: a mapping past the end of a
    regular file or memfd would SIGBUS the server on first touch, and so would one the client
    can still shrink. Both backends check here.

    A memfd must carry ``F_SEAL_SHRINK`` unless ``unsealed_ok`` (``serve --dma-unsealed``).
    Other files cannot be sealed (only memfds take seals) and are accepted: QEMU's
    ``memory-backend-file`` (hugetlbfs, ``/dev/shm``, pmem) is a common, legitimate set-up, and
    what a truncation or a full file system does to them is caught by :mod:`.dma_guard`."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise DmaError(errno.EBADF, f"bad DMA fd: {e}") from None
    if stat.S_ISREG(st.st_mode) and st.st_size < file_offset + size:
        raise DmaError(errno.EINVAL, f"DMA range {file_offset:#x}+{size:#x} lies outside its fd ({st.st_size:#x} bytes)")
    if not unsealed_ok and is_memfd(fd) and not memfd_seals(fd) & fcntl.F_SEAL_SHRINK:
        log.warning("DMA_MAP refused: guest memory memfd not sealed against shrinking (F_SEAL_SHRINK), so the "
                    "client could truncate it under the server; QEMU's memory-backend-memfd seals by default "
                    "(seal=on); serve --dma-unsealed accepts it")
        raise DmaError(errno.EPERM, "DMA memfd is not sealed against shrinking (F_SEAL_SHRINK)")


def is_memfd(fd: int) -> bool:
    """Whether ``fd`` is a memfd (its /proc link is ``/memfd:NAME (deleted)``): a tmpfs file
    answers F_GET_SEALS too, but can never be sealed, so the seals alone cannot tell."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    except OSError:
        return False


def memfd_seals(fd: int) -> int:
    """The memfd's seals (0 where the file takes none)."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return 0


class DmaTable:
    """Interval map of DMA mappings, keyed by IOVA, with the limits the server declared."""

    def __init__(self, max_maps: int = DEFAULT_MAX_DMA_MAPS, pgsize: int = DEFAULT_PGSIZE, *, unsealed_ok: bool = False) -> None:
        self.max_maps = max_maps
        self.pgsize = pgsize
        #: Accept memfds not sealed against shrinking (``serve --dma-unsealed``).
        self.unsealed_ok = unsealed_ok
        self._starts: list[int] = []
        self._maps: list[DmaMapping] = []
        self._last: DmaMapping | None = None
        self._zombies: list[DmaMapping] = []
        self.unmap_listeners: list[UnmapListener] = []

    def __len__(self) -> int:
        return len(self._maps)

    def __iter__(self):
        return iter(list(self._maps))

    def add(self, iova: int, size: int, prot: int, fd: int | None, file_offset: int = 0) -> DmaMapping:
        """Map a range; the caller keeps ownership of ``fd`` (it may be closed right after)."""
        self._check_new(iova, size, prot)
        mapping = DmaMapping(iova, size, prot, file_offset)
        if fd is not None:
            mapping.mm = self._mmap(fd, size, prot, file_offset, self.unsealed_ok)
            mapping.guard_slot = guard_memory(mapping.mm)
            mapping.view = memoryview(mapping.mm)
        i = bisect.bisect_left(self._starts, iova)
        self._starts.insert(i, iova)
        self._maps.insert(i, mapping)
        return mapping

    def _check_new(self, iova: int, size: int, prot: int) -> None:
        if size <= 0 or iova < 0 or iova + size > 1 << 64:
            raise DmaError(errno.EINVAL, f"bad DMA range iova={iova:#x} size={size:#x}")
        if iova % self.pgsize or size % self.pgsize:
            raise DmaError(errno.EINVAL, f"DMA range iova={iova:#x} size={size:#x} not page aligned")
        if prot & ~(DMA_FLAG_READ | DMA_FLAG_WRITE) or not prot & DMA_FLAG_READ:
            raise DmaError(errno.EINVAL, f"bad DMA protection flags {prot:#x}")
        if len(self._maps) >= self.max_maps:
            raise DmaError(errno.ENOSPC, f"too many DMA mappings (max {self.max_maps})")
        i = bisect.bisect_right(self._starts, iova)
        if i > 0 and self._maps[i - 1].iova + self._maps[i - 1].size > iova:
            raise DmaError(errno.EEXIST, f"DMA range at {iova:#x} overlaps an existing mapping")
        if i < len(self._maps) and self._maps[i].iova < iova + size:
            raise DmaError(errno.EEXIST, f"DMA range at {iova:#x} overlaps an existing mapping")

    @staticmethod
    def _mmap(fd: int, size: int, prot: int, file_offset: int, unsealed_ok: bool) -> mmap.mmap:
        if file_offset % mmap.ALLOCATIONGRANULARITY:
            raise DmaError(errno.EINVAL, f"DMA file offset {file_offset:#x} not page aligned")
        check_dma_fd(fd, file_offset, size, unsealed_ok=unsealed_ok)
        mprot = mmap.PROT_READ | (mmap.PROT_WRITE if prot & DMA_FLAG_WRITE else 0)
        try:
            return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mprot, offset=file_offset)
        except (OSError, ValueError, OverflowError) as e:  # Overflow: offset/size beyond off_t
            raise DmaError(getattr(e, "errno", None) or errno.EINVAL, f"cannot mmap DMA fd: {e}") from None

    def remove(self, iova: int, size: int) -> DmaMapping:
        """Unmap exactly one previous map; listeners drop their views before the munmap."""
        i = bisect.bisect_left(self._starts, iova)
        if i >= len(self._maps) or self._maps[i].iova != iova or self._maps[i].size != size:
            raise DmaError(errno.ENOENT, f"no DMA mapping at iova={iova:#x} size={size:#x}")
        mapping = self._maps[i]
        del self._starts[i]
        del self._maps[i]
        self._release(mapping)
        return mapping

    def remove_all(self) -> None:
        maps, self._maps, self._starts = self._maps, [], []
        for m in maps:
            self._release(m)

    def _release(self, mapping: DmaMapping) -> None:
        if self._last is mapping:
            self._last = None
        for listener in list(self.unmap_listeners):
            listener(mapping.iova, mapping.size)
        if not mapping.close():
            log.warning("DMA mapping %#x+%#x still has views; munmap deferred", mapping.iova, mapping.size)
            self._zombies.append(mapping)
        self.close_deferred()

    def close_deferred(self) -> None:
        """Retry the munmaps deferred because the device still held views. The device calls
        it once it dropped them (requests that outlived the client finished): nothing else
        would, after the last unmap of a client that has gone."""
        self._zombies = [z for z in self._zombies if not z.close()]

    def lookup(self, iova: int, length: int = 1) -> DmaMapping:
        """The mapping wholly containing ``[iova, iova + length)``."""
        m = self._last
        if m is not None and m.iova <= iova and iova + length <= m.end:
            return m
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0:
            m = self._maps[i]
            if iova + length <= m.end and length >= 0:
                self._last = m
                return m
            if m.poisoned and iova < m.iova + m.size:
                raise DmaError(errno.EFAULT, f"DMA range {iova:#x}+{length:#x} lies in a mapping that faulted (SIGBUS)")
        raise DmaError(errno.EFAULT, f"DMA range {iova:#x}+{length:#x} is not mapped")

    def quarantine(self) -> list[DmaMapping]:
        """Withdraw the mappings in which the SIGBUS guard absorbed a fault (the client shrank
        their file, or it could not be backed): every access to them is refused from now on,
        until the client unmaps them. Returns the newly withdrawn ones."""
        hit = [m for m in self._maps if not m.poisoned and dma_guard.poisoned(m.guard_slot)]
        for m in hit:
            log.warning("DMA mapping %#x+%#x faulted (SIGBUS: its file shrank or cannot be backed); refusing "
                        "access to it until it is unmapped", m.iova, m.size)
            m.withdraw()
        if hit:
            self._last = None
        return hit

    def open_count(self) -> int:
        """Mappings still holding an mmap, including deferred ones (for leak tests)."""
        return sum(1 for m in self._maps if m.mm is not None) + len(self._zombies)


def guard_memory(buffer: mmap.mmap | memoryview) -> int:
    """Register a mapping's memory with the SIGBUS guard; its slot (DmaError if it cannot)."""
    try:
        return dma_guard.guard(buffer)
    except dma_guard.DmaGuardUnavailable as e:
        raise DmaError(errno.ENOSYS, str(e)) from None


class GuestMemory:
    """The device's window on guest memory: bounds-checked, zero-copy where an fd allows."""

    def __init__(self, table: DmaTable, remote: RemoteDma | None = None) -> None:
        self.table = table
        self.remote = remote

    def view(self, iova: int, length: int, *, write: bool = False) -> memoryview:
        """A memoryview of ``[iova, iova + length)`` inside one fd-backed mapping."""
        m = self.table.lookup(iova, length)
        if m.view is None:
            raise DmaError(errno.EFAULT, f"DMA range {iova:#x}+{length:#x} has no fd (message DMA only)")
        if write and not m.writable:
            raise DmaError(errno.EPERM, f"DMA range {iova:#x}+{length:#x} is read-only")
        start = iova - m.iova
        return m.view[start : start + length]

    def ndarray(self, iova: int, count: int, dtype: np.dtype | type | str, *, write: bool = False) -> np.ndarray:
        """A numpy view of ``count`` items of ``dtype`` at ``iova`` (for rings on the hot path)."""
        dt = np.dtype(dtype)
        view = self.view(iova, count * dt.itemsize, write=write)
        arr = np.frombuffer(view, dtype=dt, count=count)
        return arr

    def _pieces(self, iova: int, length: int):
        """Split a range over contiguous mappings, yielding (mapping, iova, length)."""
        end = iova + length
        while iova < end:
            m = self.table.lookup(iova, 1)
            n = min(end, m.end) - iova
            yield m, iova, n
            iova += n

    def read(self, iova: int, length: int) -> bytes:
        """Copy out a range that may span several adjacent fd-backed mappings."""
        if length == 0:
            return b""
        out = bytearray(length)
        pos = 0
        for _m, addr, n in self._pieces(iova, length):
            out[pos : pos + n] = self.view(addr, n)
            pos += n
        return bytes(out)

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """Copy in a range that may span several adjacent writable fd-backed mappings."""
        data = memoryview(data).cast("B")
        # Check the whole range first so a failing write changes nothing.
        pieces = list(self._pieces(iova, len(data)))
        views = [self.view(addr, n, write=True) for _m, addr, n in pieces]
        pos = 0
        for v in views:
            v[:] = data[pos : pos + len(v)]
            pos += len(v)

    async def aread(self, iova: int, length: int) -> bytes:
        """Like :meth:`read`, falling back to DMA_READ messages for ranges without an fd."""
        out = bytearray()
        for m, addr, n in list(self._pieces(iova, length)):
            if m.view is not None:
                out += self.view(addr, n)
            elif self.remote is not None:
                out += await self.remote.dma_read(addr, n)
            else:
                raise DmaError(errno.EFAULT, f"DMA range {addr:#x}+{n:#x} has no fd and no remote path")
        return bytes(out)

    async def awrite(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """Like :meth:`write`, falling back to DMA_WRITE messages for ranges without an fd."""
        data = memoryview(data).cast("B")
        pieces = list(self._pieces(iova, len(data)))
        pos = 0
        for m, addr, n in pieces:
            if not m.writable:
                raise DmaError(errno.EPERM, f"DMA range {addr:#x}+{n:#x} is read-only")
        for m, addr, n in pieces:
            chunk = data[pos : pos + n]
            if m.view is not None:
                self.view(addr, n, write=True)[:] = chunk
            elif self.remote is not None:
                await self.remote.dma_write(addr, bytes(chunk))
            else:
                raise DmaError(errno.EFAULT, f"DMA range {addr:#x}+{n:#x} has no fd and no remote path")
            pos += n
