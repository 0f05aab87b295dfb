"""What the file and block device backends share: vectored I/O on a file descriptor."""

from __future__ import annotations

import errno
import os

from .base import Backend
from .errors import ReadOnlyError, translate_os_error
from .iov import IOV_MAX, Buffers, byte_views, is_byte_view, preadv_all, pwritev_all, write_zeros

_RWF_NOWAIT = os.RWF_NOWAIT


class FdBackend(Backend):
    """Shared by file and block device backends: vectored I/O on ``_fd`` straight into or out
    of guest memory, FUA as fdatasync, OS errors translated to NVMe statuses."""

    path: str
    readonly: bool
    _fd: int
    blocking = True
    #: cleared the first time the kernel refuses RWF_NOWAIT for this file
    _nowait_ok = True

    def read_into(self, offset: int, views: Buffers) -> None:
        try:
            preadv_all(self._fd, views, offset)
        except OSError as e:
            raise translate_os_error(e, f"read {self.path}@{offset}", writing=False) from None

    def read_into_nowait(self, offset: int, views: Buffers) -> bool:
        """``preadv(RWF_NOWAIT)``: the kernel copies from the page cache or refuses (EAGAIN);
        it never waits for the disk, so a warm read needs no hand-off to a worker thread
        (bench/README.md, "async_io"). A short read (a partial hit, or past end of file) is
        redone in full by :meth:`read_into`, which also zero-fills past the end."""
        if not self._nowait_ok:
            return False
        if len(views) == 1 and is_byte_view(v := views[0]):
            pending, want = views, v.nbytes  # one page: the hot case, as handed over
        else:
            pending = byte_views(views)
            if len(pending) > IOV_MAX:
                return False
            want = sum(v.nbytes for v in pending)
        try:
            n = os.preadv(self._fd, pending, offset, _RWF_NOWAIT)
        except OSError as e:
            return self._nowait_refused(e, offset)
        return n == want

    def read_page_nowait(self, offset: int, view: memoryview) -> bool:
        """The one-page fast path's read: :meth:`read_into_nowait` without its view checks
        (``view`` is one flat byte view of at most a page). Worth it: those checks cost a
        third as much as the ``preadv`` itself (bench/README.md, "Issue 13, third pass")."""
        if not self._nowait_ok:
            return False
        try:
            return os.preadv(self._fd, (view,), offset, _RWF_NOWAIT) == len(view)
        except OSError as e:
            return self._nowait_refused(e, offset)

    def _nowait_refused(self, e: OSError, offset: int) -> bool:
        """False for a read the kernel would have to wait for (or cannot do without waiting,
        which it says once per file); a real error is the command's."""
        if isinstance(e, BlockingIOError):
            return False
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            self._nowait_ok = False
            return False
        raise translate_os_error(e, f"read {self.path}@{offset}", writing=False) from None

    def write_from(self, offset: int, views: Buffers, *, fua: bool = False) -> None:
        if self.readonly:
            raise ReadOnlyError(errno.EROFS, f"{self.path} is read-only")
        try:
            pwritev_all(self._fd, views, offset)
            if fua:
                os.fdatasync(self._fd)
        except OSError as e:
            raise translate_os_error(e, f"write {self.path}@{offset}", writing=True) from None

    # Write Zeroes, Deallocate, Flush and close are the same for a file and a block device;
    # only the quick way to zeros (a hole punch, BLKZEROOUT) is each one's own.
    def _zero_range(self, offset: int, length: int) -> bool:
        """Zero ``[offset, offset + length)`` without writing zeros; False: not possible here."""
        return False

    def write_zeroes(self, offset: int, length: int, *, deallocate: bool = False) -> None:
        if self.readonly:
            raise ReadOnlyError(errno.EROFS, f"{self.path} is read-only")
        try:
            if not self._zero_range(offset, length):
                write_zeros(self._fd, offset, length)
        except OSError as e:
            raise translate_os_error(e, f"zero {self.path}@{offset}+{length}", writing=True) from None

    def deallocate(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, deallocate=True)

    def flush(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise translate_os_error(e, f"fsync {self.path}", writing=True) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
