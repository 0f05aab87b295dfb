"""A SIGBUS guard for guest memory: a fault in a DMA mapping fails a command, not the server.

Guest RAM is the client's file, mmapped here. If the client shrinks it after DMA_MAP (an
unsealed memfd, a regular file), or it is a sparse file on a full tmpfs, or a memfd hole the
kernel cannot back, the server's next load or store there raises SIGBUS, whose default action
kills the process. Python cannot catch a synchronous SIGBUS (its handlers run later, between
bytecodes, after the faulting instruction has been retried for ever), so a small handler in C
(``dma_guard.c``) does it: for an address inside a registered mapping it maps an anonymous
scratch page over the faulting page, counts the fault (per mapping and process-wide), and
returns, so the copy that faulted completes into the scratch page. Any other SIGBUS goes to
the previous disposition, so real bugs still crash. System calls that copy into or out of such
a page (``preadv``/``pwritev`` of the file backends) get EFAULT from the kernel, no signal.

The callers turn a fault into an error: :class:`vfio_user.dma.DmaTable` refuses a mapping once
it has been poisoned (DmaError EFAULT), and a device compares :data:`FAULTS` around a data copy
to fail the command that faulted (nvme_emu/nvm.py: Data Transfer Error). :data:`FAULTS` is
Python memory the handler increments, so that check is one memoryview load, no call.

It costs nothing until a fault: the handler is installed once, registration is one C call per
DMA_MAP. Build: a cffi API-mode module compiled on first use (:mod:`vfio_user.native`, as
``nvme_emu/atomics.c`` is), cached under ``${NVME_EMU_CACHE:-~/.cache/nvme-emu}/dma_guard/<key>/``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .native import CModule, NativeBuildError

SOURCE = Path(__file__).resolve().with_name("dma_guard.c")
MODULE = "_vfio_user_dma_guard"
CDEF = """
int dma_guard_install(uint64_t *faults);
int dma_guard_register(uintptr_t start, uintptr_t end);
void dma_guard_unregister(int slot);
uint64_t dma_guard_poisoned(int slot);
"""
_MODULE = CModule(MODULE, SOURCE, CDEF, "dma_guard")

#: SIGBUS faults absorbed in DMA mappings since start (the C handler increments it in place).
FAULTS = memoryview(bytearray(8)).cast("Q")


class DmaGuardUnavailable(RuntimeError):
    """The native guard could not be built, loaded or installed."""


class _Guard:
    """The loaded module, its handler installed over :data:`FAULTS`."""

    def __init__(self) -> None:
        try:
            module = _MODULE.load()
        except NativeBuildError as e:
            raise DmaGuardUnavailable(f"{e} (the SIGBUS guard for guest memory)") from None
        self.ffi: Any = module.ffi
        self.lib: Any = module.lib
        self._faults_ptr = self.ffi.from_buffer("uint64_t[]", FAULTS.cast("B"), require_writable=True)
        if self.lib.dma_guard_install(self._faults_ptr) != 0:
            raise DmaGuardUnavailable(f"cannot install the SIGBUS handler: {os.strerror(self.ffi.errno)}")

    def address(self, buffer: Any) -> int:
        """The address of a buffer's first byte (the export is dropped at once)."""
        ptr = self.ffi.from_buffer(buffer)
        try:
            return int(self.ffi.cast("uintptr_t", ptr))
        finally:
            self.ffi.release(ptr)


_guard: _Guard | None = None


def _loaded() -> _Guard:
    global _guard
    if _guard is None:
        _guard = _Guard()
    return _guard


def ensure_ready() -> None:
    """Build, load and install now (servers call it at start, so a missing compiler is
    reported before a client attaches rather than at its first DMA_MAP)."""
    _loaded()


def guard(buffer: Any) -> int:
    """Register ``buffer`` (a DMA mapping's mmap or view) with the handler; returns its slot."""
    return guard_range(_loaded().address(buffer), memoryview(buffer).nbytes)


def guard_range(start: int, length: int) -> int:
    """Register ``[start, start + length)`` (memory mapped from a client's fd); its slot."""
    slot = int(_loaded().lib.dma_guard_register(start, start + length))
    if slot < 0:
        raise DmaGuardUnavailable("no free SIGBUS guard slot")
    return slot


def unguard(slot: int) -> None:
    """Withdraw a slot before (or right after) its memory is unmapped."""
    if _guard is not None and slot >= 0:
        _guard.lib.dma_guard_unregister(slot)


def poisoned(slot: int) -> bool:
    """Whether a fault was absorbed in this slot's range since it was registered."""
    return _guard is not None and slot >= 0 and _guard.lib.dma_guard_poisoned(slot) > 0
