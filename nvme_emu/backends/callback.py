"""Backends whose library completes calls by callback, rather than in a blocking call: on its
own threads (librbd's aio, :mod:`.rbd`), or on the loop thread that drives it (libnbd's aio on
the loop's fd, :mod:`.nbd` over :mod:`.nbd_link`).

Such a backend starts each operation and returns: ``complete(result, error)`` comes later from
one of the library's threads, exactly once (``error`` a :class:`~.errors.BackendError` that says
the status, or None). The namespace hands these operations out as Works with ``start``
(:mod:`nvme_emu.callback_work`), which the NVM command set starts on the loop thread and the
controller's I/O pool finishes there (:meth:`nvme_emu.aio.IoPool.start`): no worker thread.

Data never moves between the library and guest memory off the loop thread: a read lands in the
library's buffer (``start_read`` completes with ``bytes``), copied into the host's buffers on
the loop thread; a write's data is copied out of them as it starts, on the loop thread. So a
quiesce (DMA unmap, reset, Bus Master Enable cleared) only has to cancel what is in flight.

The blocking methods every :class:`~.base.Backend` has are the same operations waited for
(:func:`nvme_emu.aio.wait_for`): for callers with no loop (tests, a namespace's set-up, Format's
erase), for the I/O pool's workers (Flush, Compare, Verify, Copy, and I/O of a namespace with
metadata or zones, whose handlers compose blocking calls), and they are never called on the
loop thread while it serves I/O.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from functools import partial
from typing import Any, Callable

from ..aio import Callback, wait_for
from .base import Backend
from .iov import Buffers, byte_views, is_byte_view, total_bytes

#: How a started operation reports: ``complete(result, error)``, from any thread, once.
Complete = Callback


def gather(views: Buffers) -> bytes:
    """The bytes of ``views``, copied (what a library that takes ``bytes`` is given)."""
    if len(views) == 1 and is_byte_view(v := views[0]):
        return bytes(v)
    return b"".join(byte_views(views))


def scatter(data: Any, views: Buffers) -> None:
    """Copy ``data`` into ``views`` in order (a read's buffer into the host's)."""
    if len(views) == 1 and is_byte_view(v := views[0]):
        v[:] = data
        return
    src = memoryview(data)
    pos = 0
    for v in byte_views(views):
        v[:] = src[pos : pos + len(v)]
        pos += len(v)


def all_of(starts: list[Callable[[Complete], None]], complete: Complete) -> None:
    """Start every operation in ``starts`` at once; ``complete(None, first error)`` when the
    last has completed (Deallocate's ranges)."""
    if not starts:
        complete(None, None)
        return
    lock = threading.Lock()
    left = [len(starts)]
    errors: list[BaseException] = []

    def one(_result: Any, error: BaseException | None) -> None:
        with lock:
            if error is not None:
                errors.append(error)
            left[0] -= 1
            last = not left[0]
        if last:
            complete(None, errors[0] if errors else None)

    for start in starts:
        try:
            start(one)
        except Exception as e:  # refused at submission: it still counts as completed
            one(None, e)


class CallbackBackend(Backend):
    """A backend whose operations complete by callback (the module docstring)."""

    #: Its calls complete later: the controller never waits for one on the loop thread.
    blocking = True

    @abstractmethod
    def start_read(self, offset: int, length: int, complete: Complete) -> None:
        """Read ``length`` bytes at ``offset``: ``complete(data, None)`` with the bytes (any
        bytes-like object the backend owns: librbd's ``bytes``, the NBD link's buffer)."""

    @abstractmethod
    def start_write(self, offset: int, data: bytes, fua: bool, complete: Complete) -> None:
        """Write ``data`` at ``offset``; ``fua``: durable before it completes."""

    @abstractmethod
    def start_write_zeroes(self, offset: int, length: int, deallocate: bool, fua: bool, complete: Complete) -> None:
        """Zero the range (reads back zeros; ``deallocate``: the storage may free it)."""

    @abstractmethod
    def start_deallocate(self, offset: int, length: int, complete: Complete) -> None:
        """Deallocate the range (reads back what :attr:`deallocate_zeroes` promises)."""

    @abstractmethod
    def start_flush(self, complete: Complete) -> None:
        """Make every write completed so far durable."""

    # -- the blocking forms ------------------------------------------------------------------

    def read_into(self, offset: int, views: Buffers) -> None:
        scatter(wait_for(partial(self.start_read, offset, total_bytes(views))), views)

    def write_from(self, offset: int, views: Buffers, *, fua: bool = False) -> None:
        wait_for(partial(self.start_write, offset, gather(views), fua))

    def write_zeroes(self, offset: int, length: int, *, deallocate: bool = False) -> None:
        wait_for(partial(self.start_write_zeroes, offset, length, deallocate, False))

    def deallocate(self, offset: int, length: int) -> None:
        wait_for(partial(self.start_deallocate, offset, length))

    def flush(self) -> None:
        wait_for(self.start_flush)
