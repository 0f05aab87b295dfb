"""The block device backend: a namespace on a host block device."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from typing import Self

from ..inline_budget import InlineBudget
from .base import BackendKind, BackendSpec
from .fd import FdBackend

# <linux/fs.h> block device ioctls.
BLKSSZGET = 0x1268  # _IO(0x12, 104)
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)


class BlockBackend(FdBackend):
    """A block device: size from BLKGETSIZE64, BLKZEROOUT for deallocate and Write Zeroes.

    BLKDISCARD does not promise zeros afterwards, and a deallocated NVMe block must read
    zeros here (DLFEAT), so only BLKZEROOUT (which may unmap) is used.
    """

    kind = BackendKind.BLOCK
    spec_path = True
    deallocate_zeroes = True

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self.inline_budget = InlineBudget()
        self._fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISBLK(st.st_mode):
                raise ValueError(f"{path}: not a block device")
            buf = fcntl.ioctl(self._fd, BLKGETSIZE64, b"\0" * 8)
            self.size = struct.unpack("=Q", buf)[0]
            self.sector_size = struct.unpack("=i", fcntl.ioctl(self._fd, BLKSSZGET, b"\0" * 4))[0]
            if self.size <= 0:
                raise ValueError(f"{path}: block device has no capacity")
        except BaseException:
            os.close(self._fd)
            raise

    @classmethod
    def check_spec(cls, spec: BackendSpec) -> None:
        if spec.size is not None:
            raise ValueError("a block device's size comes from the device")

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        assert spec.path is not None
        return cls(spec.path, readonly=spec.readonly)

    @classmethod
    def identity_seed(cls, spec: BackendSpec, controller_seed: str) -> str:
        """The device path as given, made absolute (``/dev/disk/by-id/...`` stays stable)."""
        assert spec.path is not None
        return f"{cls.kind}:{os.path.abspath(spec.path)}"

    def _range_ioctl(self, request: int, offset: int, length: int) -> bool:
        try:
            fcntl.ioctl(self._fd, request, struct.pack("=QQ", offset, length))
            return True
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
                return False
            raise

    def _zero_range(self, offset: int, length: int) -> bool:
        """Zeros by BLKZEROOUT (which may unmap); False where the device cannot."""
        return self._range_ioctl(BLKZEROOUT, offset, length)
