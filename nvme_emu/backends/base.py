"""The backend interface: byte-addressed storage behind a namespace."""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..inline_budget import InlineBudget
from .iov import Buffers


class Backend(ABC):
    """Byte-addressed storage. Offsets and lengths are already range-checked by Namespace."""

    #: a deallocated range reads back as zeros (lets the namespace report DLFEAT = 001b)
    deallocate_zeroes: bool = True
    #: calls may wait for a device or a disk (the controller runs them off the event loop);
    #: False: they only touch process memory, and run inline (the synchronous fast path)
    blocking: bool = False
    #: opened read-only: the namespace is write protected
    readonly: bool = False
    #: blocking backends: when one of their calls (a Read the page cache missed, a Write
    #: without FUA) may run on the loop thread instead of a worker (nvme_emu.inline_budget)
    inline_budget: InlineBudget | None = None
    #: the bytes themselves when they are plain process memory (RAM); Read and Write of one
    #: page copy straight to and from them (:meth:`Namespace.read_memory`)
    memory: memoryview | None = None
    size: int

    @abstractmethod
    def read_into(self, offset: int, views: Buffers) -> None: ...

    def read_into_nowait(self, offset: int, views: Buffers) -> bool:
        """Read only if that cannot block; False: nothing promised, use :meth:`read_into`."""
        return False

    def read_page_nowait(self, offset: int, view: memoryview) -> bool:
        """:meth:`read_into_nowait` for the one flat byte view of a one-page command."""
        return self.read_into_nowait(offset, [view])

    @abstractmethod
    def write_from(self, offset: int, views: Buffers, *, fua: bool = False) -> None: ...

    @abstractmethod
    def write_zeroes(self, offset: int, length: int, *, deallocate: bool = False) -> None: ...

    @abstractmethod
    def deallocate(self, offset: int, length: int) -> None: ...

    @abstractmethod
    def flush(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def allocated_bytes(self) -> int:
        """Bytes actually backed by storage (for NUSE); the whole size if unknown."""
        return self.size

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
