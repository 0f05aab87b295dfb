"""The file backend: a namespace in a regular file."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
from typing import Self

from ..inline_budget import InlineBudget
from .base import BackendKind, BackendSpec
from .fd import FdBackend

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc: ctypes.CDLL | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) through libc (Python only wraps posix_fallocate); raises OSError."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.fallocate.restype = ctypes.c_int
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileBackend(FdBackend):
    """A regular file, read and written with preadv/pwritev straight into guest memory.

    A new file is created sparse (ftruncate) when ``size`` is given; an existing file keeps
    its size. Write Zeroes/deallocate punch holes, falling back to writing zeros.
    """

    kind = BackendKind.FILE
    spec_path = True

    def __init__(self, path: str, size: int | None = None, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self.inline_budget = InlineBudget()
        exists = os.path.exists(path)
        if not exists and size is None:
            raise ValueError(f"{path}: file does not exist and no size= was given to create it")
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | (0 if exists or readonly else os.O_CREAT)
        self._fd = os.open(path, flags, 0o644)
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{path}: not a regular file (use blk: for block devices)")
            if st.st_size == 0 and size:
                if readonly:
                    raise ValueError(f"{path}: empty file opened read-only")
                os.ftruncate(self._fd, size)
            elif exists and size is not None and size != st.st_size:
                log.warning("%s: keeping existing size %d (size=%d ignored)", path, st.st_size, size)
            self.size = os.fstat(self._fd).st_size
            if self.size <= 0:
                raise ValueError(f"{path}: file is empty")
        except BaseException:
            os.close(self._fd)
            raise
        self._punch_ok = True

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        assert spec.path is not None
        return cls(spec.path, spec.size, readonly=spec.readonly)

    @classmethod
    def identity_seed(cls, spec: BackendSpec, controller_seed: str) -> str:
        """The file's real path and inode: a copy is a new disk, the same file keeps its IDs
        whichever socket serves it."""
        assert spec.path is not None
        real = os.path.realpath(spec.path)
        return f"{cls.kind}:{real}:{os.stat(real).st_ino}"

    def _zero_range(self, offset: int, length: int) -> bool:
        """Zeros as a hole (FALLOC_FL_PUNCH_HOLE); False where the filesystem cannot."""
        if not self._punch_ok:
            return False
        try:
            _fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            return True
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self._punch_ok = False  # this filesystem cannot; stop asking
                return False
            raise

    def allocated_bytes(self) -> int:
        return min(self.size, os.fstat(self._fd).st_blocks * 512)
