"""Explicit memory ordering for guest memory: fences, release stores, acquire loads.

The device and the guest's driver share CQ rings and doorbell pages with no lock between
them. Python cannot express the orderings the NVMe protocol relies on (a CQE's phase must not
be visible before the rest of the entry; an EventIdx store must be visible before the shadow
tail is re-loaded), and the tricks it used to lean on only held on x86's TSO and on CPython
internals. So the few ordered accesses are done in C with GCC's ``__atomic`` builtins
(``atomics.c``), which emit the right instructions on every architecture we support.

Supported architectures: x86-64 and aarch64 (little-endian, where the ``__atomic`` builtins
are lock-free for 32-bit words). Anything else is refused at start-up by
:func:`check_architecture`, in one place, rather than run with unverified ordering.

Build: on first use, as a cffi API-mode module (``vfio_user.native``: cached under
``${NVME_EMU_CACHE:-~/.cache/nvme-emu}/atomics/<key>/``; it needs gcc and the Python headers).
API mode was chosen over ABI mode (``ffi.dlopen`` of a plain .so) because bench/atomics.py
measured its calls 2-3x cheaper: libffi converting 9 arguments costs more than the whole
plain-Python CQE store did (bench/README.md, "atomics").
There is deliberately no fallback when the compiler or headers are missing: the old lock-based
fence was only correct on x86, and one code path means the tests exercise what production
runs. ``./dev serve`` and ``./dev test`` install gcc, libc6-dev and python3-dev.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfio_user.native import CModule, NativeBuildError, cache_root

#: platform.machine() values we build for and have reasoned about (see the module docstring).
SUPPORTED_MACHINES: dict[str, str] = {"x86_64": "x86-64", "aarch64": "aarch64"}

SOURCE = Path(__file__).resolve().with_name("atomics.c")
#: The cffi API-mode extension module built from SOURCE.
MODULE = "_nvme_emu_atomics"

CDEF = """
void nvme_emu_fence(void);
int nvme_emu_store_release_u32(uint8_t *base, size_t len, size_t off, uint32_t value);
int64_t nvme_emu_load_acquire_u32(const uint8_t *base, size_t len, size_t off);
int nvme_emu_store_cqe(uint8_t *base, size_t len, size_t off, uint64_t result, uint32_t dw1,
                       uint32_t sqhd, uint32_t sqid, uint32_t cid, uint32_t status_phase);
"""
_MODULE = CModule(MODULE, SOURCE, CDEF, "atomics")


class UnsupportedArchitecture(RuntimeError):
    """This CPU's memory model is not one we build the ordering helpers for."""


class AtomicsUnavailable(RuntimeError):
    """The native helpers could not be built or loaded (no compiler, unwritable cache...)."""


def check_architecture(machine: str | None = None) -> str:
    """The supported architecture's name, or :class:`UnsupportedArchitecture` with why.

    The one place the list is enforced: ``nvme-emu serve`` calls it before anything else and
    :func:`load` calls it again, so no path runs on an architecture we did not reason about.
    """
    machine = platform.machine() if machine is None else machine
    name = SUPPORTED_MACHINES.get(machine)
    if name is None:
        supported = ", ".join(SUPPORTED_MACHINES.values())
        raise UnsupportedArchitecture(
            f"unsupported architecture {machine or 'unknown'!r}: nvme-emu's shared-memory ordering "
            f"(CQE phase release stores, doorbell fences) is only built and verified for {supported}")
    return name


def cache_dir() -> Path:
    """Where build products live (shared with the doorbell agent and the guest images)."""
    return cache_root()


def build() -> Path:
    """Path of the compiled extension, compiling it once per key (:class:`CModule`)."""
    try:
        return _MODULE.build()
    except NativeBuildError as e:
        raise AtomicsUnavailable(f"{e} (nvme-emu needs it for explicit memory ordering on shared rings)") from None


@dataclass(frozen=True)
class Native:
    ffi: Any
    lib: Any
    path: Path


_native: Native | None = None


def load() -> Native:
    """The loaded helpers (architecture check, build on first use, import)."""
    global _native
    if _native is None:
        check_architecture()
        path = build()
        try:
            module = _MODULE.load()
        except NativeBuildError as e:
            raise AtomicsUnavailable(str(e)) from None
        _native = Native(module.ffi, module.lib, path)
    return _native


def ensure_ready() -> Native:
    """For start-up: refuse an unsupported architecture, then build and load the helpers, so
    a missing compiler is reported before a guest attaches rather than at its first I/O."""
    check_architecture()
    return load()


def fence() -> None:
    """A full (sequentially consistent) memory fence: orders an earlier store before a later
    load, the one reordering x86 does too (EventIdx store, then shadow tail re-load)."""
    load().lib.nvme_emu_fence()


def load_acquire_u32(buffer: Any, off: int) -> int:
    """One acquire load from any buffer, the pointer taken and given back around the call.

    For callers that do not own the buffer's lifetime (the host side in tests and benches,
    whose harnesses close their mmaps at will): ~100 ns more than a cached
    :class:`AtomicBuffer`, and nothing outlives the call to hold the mapping open."""
    native = load()
    ptr = native.ffi.from_buffer("uint8_t[]", buffer)
    try:
        value = native.lib.nvme_emu_load_acquire_u32(ptr, len(ptr), off)
    finally:
        native.ffi.release(ptr)
    if value < 0:
        raise IndexError(f"acquire load at offset {off} refused (buffer of {len(buffer)} bytes, or unaligned)")
    return value


def store_release_u32(buffer: Any, off: int, value: int) -> None:
    """One release store into any writable buffer (see :func:`load_acquire_u32`)."""
    native = load()
    ptr = native.ffi.from_buffer("uint8_t[]", buffer, require_writable=True)
    try:
        rc = native.lib.nvme_emu_store_release_u32(ptr, len(ptr), off, value)
    finally:
        native.ffi.release(ptr)
    if rc:
        raise IndexError(f"release store at offset {off} refused (buffer of {len(buffer)} bytes, or unaligned)")


class AtomicBuffer:
    """Ordered 32-bit accesses and CQE stores into one buffer (a ring or page view).

    The native pointer is taken once (``ffi.from_buffer``), not per access (that alone costs
    more than the access, bench/atomics.py). It holds a buffer export on its own memoryview of
    ``view``, so the owner can still ``release()`` ``view`` (Ring.drop), and the mmap under it
    stays mapped while any reference to the pointer lives (vfio_user.dma defers the munmap of
    a mapping that still has exports): a stale pointer can never reach unmapped memory.
    :meth:`release` drops our reference; later accesses through this object are refused.
    A read-only buffer (``writable=False``) refuses stores the same way: its store bound is 0.
    """

    __slots__ = ("_lib", "ptr", "size", "_store_size")

    def __init__(self, view: Any, *, writable: bool = True) -> None:
        native = load()
        self._lib = native.lib
        self.ptr = native.ffi.from_buffer("uint8_t[]", memoryview(view), require_writable=writable)
        self.size = len(self.ptr)
        self._store_size = self.size if writable else 0

    def release(self) -> None:
        """Forget the pointer (CPython frees it, and its export, with the last reference).

        No ``ffi.release``: a caller may still hold the pointer (a queue loop in progress),
        and an early release could let the mapping go while it writes."""
        self.ptr, self.size, self._store_size = load().ffi.NULL, 0, 0

    def store_release_u32(self, off: int, value: int) -> None:
        """Store ``value`` at ``off`` after every earlier store (4-aligned, in bounds)."""
        if self._lib.nvme_emu_store_release_u32(self.ptr, self._store_size, off, value):
            raise IndexError(self._refused(off, 4))

    def load_acquire_u32(self, off: int) -> int:
        """The word at ``off``, loaded before every later load (4-aligned, in bounds)."""
        value = self._lib.nvme_emu_load_acquire_u32(self.ptr, self.size, off)
        if value < 0:
            raise IndexError(self._refused(off, 4))
        return value

    def store_cqe(self, off: int, dw0: int, dw1: int, sqhd: int, sqid: int, cid: int, status_phase: int) -> None:
        """One 16-byte CQE at ``off``, its last dword (CID, status, phase) stored last with
        release semantics: a host that sees the new phase sees the whole entry. ``dw0`` may be
        a 64-bit command result (Zone Append's LBA): its upper half goes into DW1 (ORed)."""
        if self._lib.nvme_emu_store_cqe(self.ptr, self._store_size, off, dw0, dw1, sqhd, sqid, cid, status_phase):
            raise IndexError(self._refused(off, 16))

    def _refused(self, off: int, n: int) -> str:
        return f"ordered access of {n} bytes at offset {off} refused (buffer of {self.size} bytes, or unaligned)"
