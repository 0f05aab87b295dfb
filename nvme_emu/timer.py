"""Microsecond timers for the event loop, on one timerfd.

uvloop (libuv) keeps time in whole milliseconds: ``loop.call_later(50e-6, ...)`` fires a
millisecond or more later. NVMe's interrupt coalescing counts in 100 us units and the
doorbell poller backs off from 1 us, so both need finer timers. A timerfd armed with an
absolute CLOCK_MONOTONIC deadline wakes the loop through an ordinary reader, at the
kernel's timer resolution; one fd serves every timer of its owner (a heap of deadlines,
the fd armed for the earliest).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import math
import os
import time
from typing import Callable

import cffi

log = logging.getLogger(__name__)

_CDEF = """
struct timespec { long tv_sec; long tv_nsec; };
struct itimerspec { struct timespec it_interval; struct timespec it_value; };
int timerfd_create(int clockid, int flags);
int timerfd_settime(int fd, int flags, const struct itimerspec *new_value, struct itimerspec *old_value);
"""
CLOCK_MONOTONIC = 1  # what time.monotonic() reads on Linux
TFD_TIMER_ABSTIME = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
#: The longest delay taken as asked; longer ones are clamped to it (a timer a year out does
#: not fire while anyone waits, and its deadline still fits a timespec).
MAX_DELAY = 365 * 86400.0


class _Libc:
    """The two timerfd calls, bound once per process on first use."""

    def __init__(self) -> None:
        self.ffi = cffi.FFI()
        self.ffi.cdef(_CDEF)
        self.lib = self.ffi.dlopen(None)

    def create(self) -> int:
        fd = self.lib.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            raise OSError(self.ffi.errno, os.strerror(self.ffi.errno), "timerfd_create")
        return fd

    def arm(self, fd: int, deadline: float | None) -> None:
        """Fire once at ``deadline`` (time.monotonic() seconds); None disarms."""
        spec = self.ffi.new("struct itimerspec *")
        if deadline is not None:
            ns = max(int(deadline * 1e9), 1)  # 0 would disarm
            spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(ns, 1_000_000_000)
        if self.lib.timerfd_settime(fd, TFD_TIMER_ABSTIME, spec, self.ffi.NULL) < 0:
            raise OSError(self.ffi.errno, os.strerror(self.ffi.errno), "timerfd_settime")


@functools.cache
def _bindings() -> _Libc:
    return _Libc()


class FineTimer:
    """A scheduled callback; cancel() before it fires and it never does."""

    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FineTimers:
    """``call_later`` with microsecond resolution for one owner on one loop; close() to free the fd."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._libc = _bindings()
        self.fd = self._libc.create()
        self._heap: list[tuple[float, int, FineTimer]] = []
        self._seq = itertools.count()
        self._armed_for: float | None = None
        loop.add_reader(self.fd, self._fired)

    def call_later(self, delay: float, callback: Callable[[], None]) -> FineTimer:
        """``callback`` after ``delay`` seconds (0 if negative, at most MAX_DELAY); ValueError
        for NaN or an infinity, which would break the heap's order (NaN compares false with
        everything) and could not be armed: every timer behind it would be lost."""
        if not math.isfinite(delay):
            raise ValueError(f"timer delay {delay} is not finite")
        timer = FineTimer(time.monotonic() + min(max(delay, 0.0), MAX_DELAY), callback)
        heapq.heappush(self._heap, (timer.deadline, next(self._seq), timer))
        self._rearm()
        return timer

    async def sleep(self, delay: float) -> None:
        future = self.loop.create_future()
        def wake() -> None:
            if not future.done():  # cancelled by then: nothing to wake
                future.set_result(None)

        timer = self.call_later(delay, wake)
        try:
            await future
        finally:
            timer.cancel()

    def _rearm(self) -> None:
        heap = self._heap
        while True:
            while heap and heap[0][2].cancelled:
                heapq.heappop(heap)
            deadline = heap[0][0] if heap else None
            if deadline == self._armed_for:
                return
            try:
                self._libc.arm(self.fd, deadline)
            except (ValueError, OverflowError, OSError) as e:
                if not heap:
                    raise  # disarming failed: the fd itself is broken
                # an entry the timerfd cannot take must not stay at the top, where it would
                # fail every re-arm and so every timer behind it: drop it, say so, go on
                timer = heapq.heappop(heap)[2]
                timer.cancelled = True
                log.error("timer %r at %r dropped: cannot arm the timerfd for it: %s", timer.callback, deadline, e)
                continue
            self._armed_for = deadline
            return

    def _fired(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass  # a re-arm raced the expiry: the heap below is the truth
        self._armed_for = None
        now = time.monotonic()
        heap = self._heap
        due = []
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap)[2])
        self._rearm()
        for timer in due:
            if not timer.cancelled:
                timer.cancelled = True  # fired: a late cancel() is a no-op
                try:
                    timer.callback()
                except Exception:  # one failing callback must not lose the others due now
                    log.exception("timer callback %r failed", timer.callback)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = -1
        self._heap.clear()
