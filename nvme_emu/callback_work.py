"""The Works of a namespace whose backend completes by callback
(:class:`~nvme_emu.backends.callback.CallbackBackend`: rbd, nbd).

Each Work carries ``start`` (the NVM command set starts it on the loop thread and the I/O pool
finishes it there, :meth:`nvme_emu.aio.IoPool.start`) and ``run``, the same operation waited
for, for callers with no loop (:func:`nvme_emu.outcome.finish_here`). The guest-memory rule
lives here: a Read's data is copied into the host's views by ``done``, which runs on the loop
thread and only for a command no quiesce cancelled; a Write's data is copied out of them as
it starts, on the loop thread; no library thread ever touches guest memory.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from .aio import Callback, wait_for
from .backends.callback import CallbackBackend, Complete, all_of, gather, scatter
from .backends.iov import Buffers, total_bytes
from .outcome import Work


def _work(start: Callable[[Callback], None], views: Buffers = (), done: Callable[[object], None] | None = None) -> Work:
    return Work(partial(wait_for, start), views, done, start=start)


def read(backend: CallbackBackend, off: int, length: int, views: Buffers, counted: Callable[[int], None]) -> Work:
    """A Read into ``views`` (the Work owns them): the backend's bytes, copied in by ``done``."""

    def done(data: Any) -> None:
        scatter(data, views)
        counted(length)

    return _work(partial(backend.start_read, off, length), views, done)


def write(backend: CallbackBackend, off: int, views: Buffers, fua: bool, counted: Callable[[int], None]) -> Work:
    """A Write from ``views`` (the Work owns them until it completes, so a quiesce cancels it
    like any I/O on their memory; their bytes are taken as it starts)."""
    length = total_bytes(views)

    def start(complete: Complete) -> None:
        backend.start_write(off, gather(views), fua, complete)

    return _work(start, views, lambda _r: counted(length))


def write_zeroes(backend: CallbackBackend, off: int, length: int, deallocate: bool, fua: bool) -> Work:
    return _work(partial(backend.start_write_zeroes, off, length, deallocate, fua))


def deallocate(backend: CallbackBackend, extents: list[tuple[int, int]]) -> Work:
    """Deallocate byte ``extents`` (Dataset Management's ranges), all started at once."""
    return _work(partial(all_of, [partial(backend.start_deallocate, off, length) for off, length in extents]))
