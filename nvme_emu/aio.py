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
import enum
import logging
import os
import queue
import threading
from collections import deque
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

#: Worker threads per pool: enough to overlap a few device waits and fsyncs; the data
#: copies themselves are bounded by the machine's CPUs, not by this number.
DEFAULT_WORKERS = 4

#: ``callback(result, error)``: exactly one of them is meaningful (error is None on success).
Callback = Callable[[Any, BaseException | None], None]
#: Which jobs a :meth:`IoPool.quiesce` concerns, by the guest memory they were submitted with.
ViewsPredicate = Callable[[Sequence[memoryview]], bool]


class JobState(enum.Enum):
    QUEUED = 1
    RUNNING = 2
    DONE = 3  #: its result waits in the done deque (or was delivered)
    CANCELLED = 4  #: taken back by quiesce before a worker started it


class _Job:
    """One submitted call; ``state`` changes under the pool's lock only."""

    __slots__ = ("fn", "callback", "views", "state")

    def __init__(self, fn: Callable[[], Any], callback: Callback, views: Sequence[memoryview]) -> None:
        self.fn = fn
        self.callback = callback
        self.views = views
        self.state = JobState.QUEUED


class IoPool:
    """Worker threads that run blocking calls and report back on the loop thread.

    :meth:`submit` may only be called on the loop thread; callbacks run there too, from
    the eventfd reader, never from a worker. :meth:`close` joins the workers (a call in
    progress finishes first) and drops results not yet delivered. :meth:`quiesce` takes back
    the queued calls that use some guest memory and waits for the running ones, before the
    transport unmaps that memory or the device stops all DMA.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, workers: int = DEFAULT_WORKERS, *, name: str = "nvme-io") -> None:
        self.loop = loop
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: deque = deque()
        #: Guards every job's ``state``; quiesce waits on it for running jobs to end.
        self._cond = threading.Condition(threading.Lock())
        #: Jobs submitted and not yet delivered (loop thread only, in submission order).
        self._live: dict[_Job, None] = {}
        self._quiescing = False  #: a worker ending a job must wake quiesce (under _cond)
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.pending = 0  #: submitted, callback not yet run (loop thread only)
        self._closed = False
        #: Run on the loop thread once ``pending`` is 0 (closing a deleted namespace's fd).
        self._idle_waiters: list[Callable[[], None]] = []
        loop.add_reader(self._efd, self._reap)
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[], Any], callback: Callback, views: Sequence[memoryview] = ()) -> None:
        """Run ``fn()`` on a worker; later, on the loop thread, ``callback(result, error)``.

        ``views``: the guest memory ``fn`` reads or writes (what :meth:`quiesce` looks at).
        """
        if self._closed:
            raise RuntimeError("IoPool is closed")
        self.pending += 1
        job = _Job(fn, callback, views)
        self._live[job] = None
        self._jobs.put(job)

    def _work(self) -> None:
        jobs, efd, cond = self._jobs, self._efd, self._cond
        running, done_state = JobState.RUNNING, JobState.DONE
        while True:
            job = jobs.get()
            if job is None:
                return
            with cond:
                if job.state is not JobState.QUEUED:
                    continue  # cancelled by quiesce, which delivers its callback itself
                job.state = running
            item: tuple[_Job, Any, BaseException | None]
            try:
                item = (job, job.fn(), None)
            except BaseException as e:  # delivered to the callback, which decides the status
                item = (job, None, e)
            with cond:
                job.state = done_state
                self._done.append(item)
                if self._quiescing:
                    cond.notify_all()
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
            job, result, error = done.popleft()
            self._deliver(job, result, error)
        if not self.pending:
            self._run_idle_waiters()

    def _deliver(self, job: _Job, result: Any, error: BaseException | None) -> None:
        self.pending -= 1
        self._live.pop(job, None)
        try:
            job.callback(result, error)
        except Exception:  # one request's bug must not stop the others' completions
            log.exception("I/O completion callback failed")

    def quiesce(self, touches: ViewsPredicate, cancelled: Callable[[], BaseException]) -> int:
        """Make sure no worker writes or reads the guest memory ``touches`` selects, now.

        Called on the loop thread when that memory is about to go (DMA unmap) or the device
        must stop all DMA (resets, Bus Master Enable cleared), before the transport replies.
        Jobs not started yet whose views ``touches`` selects are taken back: their callbacks
        get ``cancelled()`` as the error (the caller's status, e.g. Data Transfer Error). Jobs
        running with such views are waited for (a worker needs nothing of the loop to finish
        its call; one call moves at most one MDTS of data). Then every finished job's
        callback runs here, so the views are released before this returns and the memory can
        really be unmapped. Jobs that use no such memory (fsync, Format's erase, other
        mappings) go on untouched. Returns how many jobs were cancelled.
        """
        taken: list[_Job] = []
        with self._cond:
            busy = []
            for job in self._live:
                if job.state is JobState.QUEUED and touches(job.views):
                    job.state = JobState.CANCELLED
                    taken.append(job)
                elif job.state is JobState.RUNNING and touches(job.views):
                    busy.append(job)
            self._quiescing = True
            try:
                self._cond.wait_for(lambda: all(j.state is JobState.DONE for j in busy))
            finally:
                self._quiescing = False
        for job in taken:
            self._deliver(job, None, cancelled())
        self._reap()
        if taken:
            log.info("I/O pool: %d queued call(s) cancelled, %d waited for", len(taken), len(busy))
        return len(taken)

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
        self._live.clear()
        self.pending = 0
        self._run_idle_waiters()  # the workers are joined: nothing uses anything any more
