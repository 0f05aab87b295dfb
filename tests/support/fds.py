"""eventfd and fd helpers (no NVMe here: the vfio-user suites use them too)."""

from __future__ import annotations

import errno
import os
import select

from .server import DEADLINE


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def efd_count(fd: int) -> int:
    """Read (and reset) an eventfd's counter; 0 when it was not signalled (never blocks,
    whether the fd is non-blocking or not)."""
    return efd_wait(fd, 0)


def efd_wait(fd: int, timeout: float = DEADLINE) -> int:
    """Wait (bounded) until the eventfd is signalled, then read its counter; 0 if it was not."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return 0
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:  # another reader got there first
        return 0


def is_closed(fd: int) -> bool:
    """``fd`` is not open in this process (EBADF)."""
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno == errno.EBADF
    return False
