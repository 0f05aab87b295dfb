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
DMA_MAP. Build: like ``nvme_emu/atomics.py`` (whose pattern this copies; ``vfio_user`` imports
nothing of ``nvme_emu``), cffi writes an API-mode module's C on first use and the system gcc
compiles it into ``${NVME_EMU_CACHE:-~/.cache/nvme-emu}/dma_guard/<key>/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import io
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().with_name("dma_guard.c")
CFLAGS = ("-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-Wall")
MODULE = "_vfio_user_dma_guard"
CDEF = """
int dma_guard_install(uint64_t *faults);
int dma_guard_register(uintptr_t start, uintptr_t end);
void dma_guard_unregister(int slot);
uint64_t dma_guard_poisoned(int slot);
"""

#: SIGBUS faults absorbed in DMA mappings since start (the C handler increments it in place).
FAULTS = memoryview(bytearray(8)).cast("Q")


class DmaGuardUnavailable(RuntimeError):
    """The native guard could not be built, loaded or installed."""


def _cache_dir() -> Path:
    return Path(os.environ.get("NVME_EMU_CACHE") or Path.home() / ".cache" / "nvme-emu") / "dma_guard"


def _build() -> Path:
    """The compiled module, built once per source/flags/compiler/ABI (flock + rename)."""
    import cffi

    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None:
        raise DmaGuardUnavailable("no C compiler: the SIGBUS guard for guest memory is compiled on first use "
                                  "(`apt-get install gcc libc6-dev python3-dev`; ./dev does this)")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update("\0".join((CDEF, compiler, *CFLAGS, platform.machine(), sys.implementation.cache_tag, suffix, cffi.__version__)).encode())
    so = _cache_dir() / h.hexdigest()[:16] / (MODULE + suffix)
    if so.is_file():
        return so
    try:
        so.parent.mkdir(parents=True, exist_ok=True)
        with open(so.parent.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not so.is_file():
                _compile(compiler, so)
    except OSError as e:
        raise DmaGuardUnavailable(f"cannot build {SOURCE.name} under {so.parent}: {e}") from None
    return so


def _compile(compiler: str, so: Path) -> None:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(MODULE, SOURCE.read_text())
    gen = so.with_name(f".{MODULE}.{os.getpid()}.c")
    tmp = so.with_name(f".{so.name}.{os.getpid()}")
    include = sysconfig.get_paths()["include"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ffi.emit_c_code(str(gen))
        proc = subprocess.run([compiler, *CFLAGS, f"-I{include}", "-o", str(tmp), str(gen)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise DmaGuardUnavailable(f"compiling {SOURCE} failed:\n{proc.stderr.strip()}")
        os.replace(tmp, so)
    finally:
        tmp.unlink(missing_ok=True)
        gen.unlink(missing_ok=True)


class _Guard:
    """The loaded module, its handler installed over :data:`FAULTS`."""

    def __init__(self) -> None:
        path = _build()
        spec = importlib.util.spec_from_file_location(MODULE, path)
        if spec is None or spec.loader is None:
            raise DmaGuardUnavailable(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
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
