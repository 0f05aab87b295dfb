"""Interrupt state: the eventfds a client gave per IRQ index and vector, and how to fire them.

The protocol has no message for raising an interrupt: the client hands over eventfds with
SET_IRQS and the server writes to them. INTx is level-triggered and auto-masked: once fired
it stays masked until the client unmasks it (an UNMASK action, or its resample eventfd), and
the device is then asked whether the line is still asserted.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Callable

from .constants import (
    IRQ_ACTION_MASK,
    IRQ_ACTION_TRIGGER,
    IRQ_ACTION_TYPE_MASK,
    IRQ_ACTION_UNMASK,
    IRQ_DATA_BOOL,
    IRQ_DATA_EVENTFD,
    IRQ_DATA_NONE,
    IRQ_DATA_TYPE_MASK,
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IrqIndex,
)
from .protocol import close_fds

log = logging.getLogger(__name__)

_ONE = (1).to_bytes(8, "little")
#: Members bound once: an IntEnum attribute access costs about 60 ns (CPython 3.11), and
#: these are read on every interrupt.
_INTX = IrqIndex.INTX
_PREFERENCE = (IrqIndex.MSIX, IrqIndex.MSI, IrqIndex.INTX)


def is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an eventfd: the only kind the server may write interrupts to (a pipe
    or socket would block it once full) or poll for a resample (epoll refuses directories and
    regular files). The kernel's VFIO refuses other kinds for the same reason."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:  # no /proc: an anonymous inode at least has no file type
        try:
            return stat.S_IFMT(os.fstat(fd).st_mode) == 0
        except OSError:
            return False


class IrqError(Exception):
    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


UnmaskCallback = Callable[[IrqIndex, int], None]  # (index, vector)
ResampleWatch = Callable[[int | None, int | None], None]  # (old fd, new fd)


class IrqRouting:
    """What a device sees of interrupts, whichever backend fires them: per-index vector counts,
    masks and enables, and routing of a vector to MSI-X, MSI or the INTx line."""

    def __init__(self, counts: dict[IrqIndex, int], on_unmask: UnmaskCallback | None = None) -> None:
        self.counts = {IrqIndex(i): counts.get(IrqIndex(i), 0) for i in IrqIndex}
        self.masked: dict[IrqIndex, list[bool]] = {i: [False] * n for i, n in self.counts.items()}
        self.enabled: dict[IrqIndex, bool] = {i: False for i in IrqIndex}
        self.fired: dict[IrqIndex, int] = {i: 0 for i in IrqIndex}
        self.on_unmask = on_unmask

    def trigger(self, index: IrqIndex, vector: int = 0) -> bool:
        raise NotImplementedError

    def active_index(self) -> IrqIndex | None:
        """Which of MSI-X, MSI, INTx the client has enabled, in that order of preference."""
        for index in _PREFERENCE:
            if self.enabled[index]:
                return index
        return None

    def trigger_vector(self, vector: int) -> bool:
        """Raise ``vector`` the way the client set up: MSI-X/MSI vector, else the INTx line."""
        index = self.active_index()
        if index is None:
            return False
        return self.trigger(index, 0 if index == _INTX else vector)


class IrqState(IrqRouting):
    """Per-client interrupt wiring; dropped with the client, re-made for the next one."""

    def __init__(self, counts: dict[IrqIndex, int], on_unmask: UnmaskCallback | None = None) -> None:
        super().__init__(counts, on_unmask)
        self.efds: dict[IrqIndex, list[int | None]] = {i: [None] * n for i, n in self.counts.items()}
        self.resample_fd: int | None = None
        #: Set by the transport: told when the resample eventfd changes, so it can watch the
        #: new one and call :meth:`resampled` when it fires (and stop watching before a close).
        self.resample_watch: ResampleWatch | None = None

    def info_flags(self, index: IrqIndex) -> int:
        if index == IrqIndex.INTX:
            return IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED
        return IRQ_INFO_EVENTFD

    # -- SET_IRQS ---------------------------------------------------------------------

    def set_irqs(self, flags: int, index: int, start: int, count: int, fds: list[int], data: bytes) -> None:
        """Apply one SET_IRQS; takes ownership of ``fds`` (closed on error)."""
        try:
            self._set_irqs(flags, index, start, count, fds, data)
        except IrqError:
            close_fds(fds)
            raise

    def _set_irqs(self, flags: int, index: int, start: int, count: int, fds: list[int], data: bytes) -> None:
        dtype, action = flags & IRQ_DATA_TYPE_MASK, flags & IRQ_ACTION_TYPE_MASK
        if flags & ~(IRQ_DATA_TYPE_MASK | IRQ_ACTION_TYPE_MASK):
            raise IrqError(errno.EINVAL, f"unknown SET_IRQS flags {flags:#x}")
        if dtype not in (IRQ_DATA_NONE, IRQ_DATA_BOOL, IRQ_DATA_EVENTFD) or action not in (IRQ_ACTION_MASK, IRQ_ACTION_UNMASK, IRQ_ACTION_TRIGGER):
            raise IrqError(errno.EINVAL, f"SET_IRQS needs one data type and one action, got {flags:#x}")
        if index not in self.counts.keys():
            raise IrqError(errno.EINVAL, f"bad IRQ index {index}")
        index = IrqIndex(index)
        n = self.counts[index]
        if start + count > n or start < 0 or count < 0:
            raise IrqError(errno.EINVAL, f"IRQ range {start}+{count} outside {n} vectors of {index.name}")
        if fds and dtype != IRQ_DATA_EVENTFD:
            raise IrqError(errno.EINVAL, "fds sent without DATA_EVENTFD")
        if dtype == IRQ_DATA_EVENTFD and fds and len(fds) != count:
            raise IrqError(errno.EINVAL, f"{len(fds)} fds for {count} vectors")
        if not all(is_eventfd(fd) for fd in fds):
            raise IrqError(errno.EINVAL, "SET_IRQS fds must be eventfds")
        if dtype == IRQ_DATA_BOOL and len(data) < count:
            raise IrqError(errno.EINVAL, "DATA_BOOL without one byte per vector")
        if action == IRQ_ACTION_TRIGGER:
            self._trigger_action(index, dtype, start, count, fds, data)
        elif action == IRQ_ACTION_MASK:
            self._mask_action(index, dtype, start, count, data, masked=True)
        else:
            self._unmask_action(index, dtype, start, count, fds, data)

    def _trigger_action(self, index: IrqIndex, dtype: int, start: int, count: int, fds: list[int], data: bytes) -> None:
        if dtype == IRQ_DATA_EVENTFD:
            for i in range(count):
                self._replace(index, start + i, fds[i] if fds else None)
            self.enabled[index] = True
        elif dtype == IRQ_DATA_NONE and count == 0:
            self.disable(index)
        else:  # loopback: fire the selected vectors
            for i in range(count):
                if dtype == IRQ_DATA_NONE or data[i]:
                    self.trigger(index, start + i)

    def _mask_action(self, index: IrqIndex, dtype: int, start: int, count: int, data: bytes, *, masked: bool) -> None:
        if dtype == IRQ_DATA_EVENTFD:
            raise IrqError(errno.EINVAL, "MASK takes no eventfd")
        for i in range(count):
            if dtype == IRQ_DATA_NONE or data[i]:
                self.masked[index][start + i] = masked

    def _unmask_action(self, index: IrqIndex, dtype: int, start: int, count: int, fds: list[int], data: bytes) -> None:
        if dtype == IRQ_DATA_EVENTFD:
            # A resample eventfd (KVM irqfd bypass for INTx): the client's way to say EOI.
            if index != IrqIndex.INTX or count != 1:
                raise IrqError(errno.EINVAL, "unmask eventfds are for INTx only")
            self._set_resample(fds[0] if fds else None)
            return
        for i in range(count):
            if dtype == IRQ_DATA_NONE or data[i]:
                self.unmask(index, start + i)

    def _set_resample(self, fd: int | None) -> None:
        """Swap the resample eventfd; if the transport cannot watch the new one, the old one
        stays in place and the caller closes the new one."""
        old = self.resample_fd
        if old == fd:
            return
        if self.resample_watch is not None:
            try:
                self.resample_watch(old, fd)
            except Exception as e:  # an fd the event loop cannot poll (uvloop: PermissionError, KeyError)
                raise IrqError(errno.EINVAL, f"cannot watch resample fd: {e!r}") from None
        if old is not None:
            close_fds([old])
        self.resample_fd = fd

    def resampled(self) -> None:
        """The resample eventfd fired (KVM saw the guest's EOI): unmask INTx, as UNMASK would."""
        self.unmask(IrqIndex.INTX, 0)

    def _replace(self, index: IrqIndex, vector: int, fd: int | None) -> None:
        old = self.efds[index][vector]
        if old is not None and old != fd:
            close_fds([old])
        self.efds[index][vector] = fd
        self.masked[index][vector] = False

    # -- device side ----------------------------------------------------------------

    def disable(self, index: IrqIndex) -> None:
        for v, fd in enumerate(self.efds[index]):
            if fd is not None:
                close_fds([fd])
            self.efds[index][v] = None
            self.masked[index][v] = False
        self.enabled[index] = False

    def trigger(self, index: IrqIndex, vector: int = 0) -> bool:
        """Fire one vector if the client wired it and it is not masked; True when fired."""
        if vector >= self.counts[index]:
            return False
        fd = self.efds[index][vector]
        masked = self.masked[index]
        if fd is None or masked[vector]:
            return False
        if index == _INTX:
            masked[vector] = True  # auto-masked until the client unmasks
        try:
            os.write(fd, _ONE)
        except OSError as e:
            log.warning("cannot signal %s vector %d: %s", index.name, vector, e)
            return False
        self.fired[index] += 1
        return True

    def unmask(self, index: IrqIndex, vector: int = 0) -> None:
        if vector < self.counts[index] and self.masked[index][vector]:
            self.masked[index][vector] = False
            if self.on_unmask is not None:
                self.on_unmask(index, vector)

    def close(self) -> None:
        for index in IrqIndex:
            self.disable(index)
        self._set_resample(None)
