"""C helpers compiled on first use as cffi API-mode modules, cached by what went into them.

Two parts of the server need a few lines of C that Python cannot express: the memory-ordered
accesses to shared rings (``nvme_emu/atomics.c``) and the SIGBUS guard for guest memory
(``vfio_user/dma_guard.c``). Both are built the same way, here: cffi writes the extension
module's C (no setuptools), the system compiler (``$CC``, else gcc) compiles it into
``${NVME_EMU_CACHE:-~/.cache/nvme-emu}/<cache_name>/<key>/``, ``<key>`` hashing the source,
the declarations, the flags, the compiler, the machine and the CPython ABI, so an edit, a new
toolchain or another Python gets a new directory. API mode needs the Python headers
(python3-dev) besides gcc; it was chosen over ABI mode (``ffi.dlopen``) because its calls
measured 2-3x cheaper (bench/README.md, "atomics"). ``./dev serve`` and ``./dev test`` install
gcc, libc6-dev and python3-dev.

Each caller turns :class:`NativeBuildError` into its own error type, with its own words on why
it needs the module.
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
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

#: No -Werror: the generated wrapper code is cffi's, and its warnings vary between versions.
CFLAGS = ("-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-Wall")


class NativeBuildError(RuntimeError):
    """A module could not be built or loaded (no compiler, no headers, a compile error...)."""


def cache_root() -> Path:
    """Where build products live (shared with the doorbell agent and the guest images)."""
    return Path(os.environ.get("NVME_EMU_CACHE") or Path.home() / ".cache" / "nvme-emu")


def extension_suffix() -> str:
    return importlib.machinery.EXTENSION_SUFFIXES[0]


@dataclass(frozen=True)
class CModule:
    """One C source built as the cffi API-mode module ``name``, exposing ``cdef``."""

    name: str
    source: Path
    cdef: str
    cache_name: str

    def compiler(self) -> str:
        cc = os.environ.get("CC", "gcc")
        path = shutil.which(cc)
        if path is None:
            raise NativeBuildError(f"C compiler {cc!r} not found: {self.source.name} is compiled on first use; "
                                   "install it with `apt-get install gcc libc6-dev` (./dev serve and ./dev test do this)")
        return path

    def key(self, compiler: str) -> str:
        import cffi

        h = hashlib.sha256(self.source.read_bytes())
        parts = (self.cdef, compiler, *CFLAGS, platform.machine(), sys.implementation.cache_tag, extension_suffix(), cffi.__version__)
        h.update("\0".join(parts).encode())
        return h.hexdigest()[:16]

    def build(self) -> Path:
        """Path of the compiled module, compiling it once per key (flock + rename: concurrent
        servers and test workers never see a half-written object)."""
        compiler = self.compiler()
        root = cache_root() / self.cache_name
        so = root / self.key(compiler) / (self.name + extension_suffix())
        if so.is_file():
            return so
        include = _python_include(self.source)
        try:
            so.parent.mkdir(parents=True, exist_ok=True)
            with open(root / ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not so.is_file():
                    self._compile(compiler, include, so)
        except OSError as e:
            raise NativeBuildError(f"cannot build {self.source.name} under {root}: {e}") from None
        return so

    def _compile(self, compiler: str, include: Path, so: Path) -> None:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(self.cdef)
        ffi.set_source(self.name, self.source.read_text())
        gen = so.with_name(f".{self.name}.{os.getpid()}.c")
        tmp = so.with_name(f".{so.name}.{os.getpid()}")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # cffi prints "generating ..."
                ffi.emit_c_code(str(gen))
            proc = subprocess.run([compiler, *CFLAGS, f"-I{include}", "-o", str(tmp), str(gen)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise NativeBuildError(f"compiling {self.source} failed:\n{proc.stderr.strip()}")
            os.replace(tmp, so)
        finally:
            tmp.unlink(missing_ok=True)
            gen.unlink(missing_ok=True)

    def load(self) -> ModuleType:
        """Build if needed, then import the module (its ``ffi`` and ``lib``)."""
        path = self.build()
        try:
            spec = importlib.util.spec_from_file_location(self.name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"no loader for {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except ImportError as e:
            raise NativeBuildError(f"cannot load {path}: {e}") from None
        return module


def _python_include(source: Path) -> Path:
    """CPython's headers (Debian: python3-dev), needed to compile an API-mode module."""
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        raise NativeBuildError(
            f"Python headers not found ({include}/Python.h): {source.name} is compiled as a cffi module on "
            "first use; install them with `apt-get install python3-dev` (./dev serve and ./dev test do this)")
    return include
