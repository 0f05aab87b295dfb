"""What the server refuses itself before libvfio-user sees a message.

The library takes any fd on any command and keeps it, maps a memfd smaller than a DMA range
(the first touch past its end would SIGBUS the server) and takes wrapping or unaligned
ranges (docs/reliability.md, fix 9). So the server peeks at each whole request, with copies
of its fds, and asks :func:`screen` whether the library may have it; a message refused here
is read past the library (:func:`recv_closing_fds`) and answered with the Python backend's
errno.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from ..constants import DEFAULT_PGSIZE, HEADER_SIZE, IRQ_DATA_EVENTFD, IRQ_DATA_TYPE_MASK, Command, MsgType
from ..dma import DmaError, check_dma_fd
from ..irq import is_eventfd
from .library import MSG_DONTWAIT

#: Bytes peeked per request: the 16-byte header and the first 32 payload bytes (DMA_MAP).
PEEK_SIZE = HEADER_SIZE + 32
#: Room for the fds a peek may bring along (more than any client may send: MAX_MSG_FDS).
PEEK_ANCILLARY = socket.CMSG_SPACE(256 * 4)


def fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds an SCM_RIGHTS message brought into this process."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"<{usable // 4}i", data[:usable]))
    return fds


def recv_closing_fds(sock: socket.socket, limit: int) -> int:
    """Read up to ``limit`` queued bytes past the library, closing the fds they carry; 0 at EOF."""
    data, ancillary, _flags, _addr = sock.recvmsg(limit, PEEK_ANCILLARY, MSG_DONTWAIT)
    for fd in fds_of(ancillary):
        os.close(fd)
    return len(data)


def command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"


def screen_dma_map(payload: bytes, fds: list[int], unsealed_ok: bool) -> int | None:
    """The DMA_MAP checks libvfio-user lacks: a range that wraps past 2^64 or is not page
    aligned, more than one fd, or an fd too small for the range (SIGBUS on first touch)."""
    if len(payload) < 32:
        return None  # the library refuses a short payload itself
    _argsz, _flags, offset, iova, size = struct.unpack_from("<IIQQQ", payload)
    if iova + size > 1 << 64 or (iova | size | offset) % DEFAULT_PGSIZE:
        return errno.EINVAL
    if len(fds) > 1:
        return errno.EINVAL
    if fds:
        try:
            check_dma_fd(fds[0], offset, size, unsealed_ok=unsealed_ok)
        except DmaError as e:
            return e.errno
    return None


def screen(command: int, flags: int, payload: bytes, fds: list[int], *, unsealed_ok: bool = False) -> int | None:
    """What we answer for a message before libvfio-user sees it: None to hand it over, an
    errno to refuse it, 0 to drop it unanswered. The library takes any fd on any command, so
    fds it would keep, or map past their end (SIGBUS), or write interrupts to (a pipe would
    block), are refused here, with the errnos of the Python backend."""
    if flags & 0xF != MsgType.REQUEST:
        return 0  # a reply nobody asked for (DMA replies are read while a DMA call is busy)
    if command == Command.DMA_MAP:
        return screen_dma_map(payload, fds, unsealed_ok)
    if not fds:
        return None
    if command == Command.DEVICE_SET_IRQS and len(payload) >= 8:
        irq_flags = struct.unpack_from("<I", payload, 4)[0]
        if irq_flags & IRQ_DATA_TYPE_MASK == IRQ_DATA_EVENTFD and all(is_eventfd(fd) for fd in fds):
            return None
    return errno.EINVAL  # fds on a command that takes none, or not eventfds for interrupts
