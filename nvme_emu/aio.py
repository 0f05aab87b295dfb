"""Blocking backend calls off the event loop: a small pool of worker threads.

File and block-device backends block in preadv/pwritev, fdatasync, fsync, fallocate and
BLKZEROOUT. Run on the loop thread, one slow call freezes every queue and the vfio-user
socket. :class:`IoPool` runs such calls on worker threads (the calls release the GIL) and
hands each result back **on the loop thread**, in one batch per loop turn: workers append
to a deque and signal one eventfd that the loop watches, so a burst of completions costs
one wake-up, not one per call.

A thread hand-off costs 10-40 us of CPU per call on this 2-CPU machine, so reads first try
``preadv(RWF_NOWAIT)`` on the loop thread (the kernel serves them from the page cache or
refuses with EAGAIN; it never blocks) and only misses come here. Why not io_uring: the
maintained PyPI binding (``liburing``) takes bytearrays only, not memoryviews of guest
memory, so it needs a bounce copy, and measured 0.56-0.58x of NOWAIT-inline reads
(bench/README.md, "async_io").
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections import deque
from typing import Any, Callable

log = logging.getLogger(__name__)

#: Worker threads per pool: enough to overlap a few device waits and fsyncs; the data
#: copies themselves are bounded by the machine's CPUs, not by this number.
DEFAULT_WORKERS = 4

#: ``callback(result, error)``: exactly one of them is meaningful (error is None on success).
Callback = Callable[[Any, BaseException | None], None]


class IoPool:
    """Worker threads that run blocking calls and report back on the loop thread.

    :meth:`submit` may only be called on the loop thread; callbacks run there too, from
    the eventfd reader, never from a worker. :meth:`close` joins the workers (a call in
    progress finishes first) and drops results not yet delivered.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, workers: int = DEFAULT_WORKERS, *, name: str = "nvme-io") -> None:
        self.loop = loop
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: deque = deque()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.pending = 0  #: submitted, callback not yet run (loop thread only)
        self._closed = False
        #: Run on the loop thread once ``pending`` is 0 (closing a deleted namespace's fd).
        self._idle_waiters: list[Callable[[], None]] = []
        loop.add_reader(self._efd, self._reap)
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[], Any], callback: Callback) -> None:
        """Run ``fn()`` on a worker; later, on the loop thread, ``callback(result, error)``."""
        if self._closed:
            raise RuntimeError("IoPool is closed")
        self.pending += 1
        self._jobs.put((fn, callback))

    def _work(self) -> None:
        jobs, done, efd = self._jobs, self._done, self._efd
        while True:
            job = jobs.get()
            if job is None:
                return
            fn, callback = job
            item: tuple[Callback, Any, BaseException | None]
            try:
                item = (callback, fn(), None)
            except BaseException as e:  # delivered to the callback, which decides the status
                item = (callback, None, e)
            done.append(item)  # deque.append is atomic under the GIL
            try:
                os.eventfd_write(efd, 1)
            except OSError:  # closed under us at shutdown: nobody is waiting any more
                return

    def _reap(self) -> None:
        """The eventfd fired: run every delivered callback (one batch per loop turn)."""
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        done = self._done
        while done:
            callback, result, error = done.popleft()
            self.pending -= 1
            try:
                callback(result, error)
            except Exception:  # one request's bug must not stop the others' completions
                log.exception("I/O completion callback failed")
        if not self.pending:
            self._run_idle_waiters()

    def when_idle(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread when no submitted call is left (now if none is):
        after that, no worker touches what the calls used."""
        self._idle_waiters.append(fn)
        if not self.pending:
            self._run_idle_waiters()

    def _run_idle_waiters(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for fn in waiters:
            try:
                fn()
            except Exception:
                log.exception("idle callback %r failed", fn)

    def drain(self) -> None:
        """Deliver what workers finished so far, now (tests and shutdown)."""
        self._reap()

    def close(self) -> None:
        """Stop the workers (each finishes its current call) and release the eventfd."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        if not self.loop.is_closed():
            self.loop.remove_reader(self._efd)
        os.close(self._efd)
        self._done.clear()
        self.pending = 0
        self._run_idle_waiters()  # the workers are joined: nothing uses anything any more
