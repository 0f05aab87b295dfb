"""Blocking backend calls off the event loop: a small pool of worker threads.

File and block-device backends block in preadv/pwritev, fdatasync, fsync, fallocate and
BLKZEROOUT. Run on the loop thread, one slow call freezes every queue and the vfio-user
socket. :class:`IoPool` runs such calls on worker threads (the calls release the GIL) and
hands each result back **on the loop thread**, in one batch per loop turn: workers append
to a deque and signal one eventfd that the loop watches, so a burst of completions costs
one wake-up, not one per call.

A thread hand-off costs 10-40 us of CPU per call on this 2-CPU machine, so reads first try
``preadv(RWF_NOWAIT)`` on the loop thread (the kernel serves them from the page cache or
refuses with EAGAIN; it never blocks) and only misses come here; and when nothing else is in
flight (QD1), misses and writes without FUA skip the hand-off too, on a time budget
(:mod:`nvme_emu.inline_budget`). Why not io_uring: the
maintained PyPI binding (``liburing``) takes bytearrays only, not memoryviews of guest
memory, so it needs a bounce copy, and measured 0.56-0.58x of NOWAIT-inline reads
(bench/README.md, "async_io").

A backend whose library completes calls by callback (librbd's aio on its own threads,
:mod:`nvme_emu.backends.rbd`; libnbd's on the loop thread, :mod:`nvme_emu.backends.nbd_link`)
needs no worker: :meth:`IoPool.start` starts such a call on the
loop thread, and its completion comes back through the same :class:`Inbox` (deque + eventfd)
as the workers' results, so one drain per loop turn serves both, and :meth:`IoPool.quiesce`
and :meth:`IoPool.when_idle` cover both kinds of call.
"""

from __future__ import annotations

import asyncio
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


class Inbox:
    """Results handed to the loop thread by other threads: a deque and one eventfd the loop
    watches, so a burst of results costs one wake-up. ``reap`` (the owner's) runs on the loop
    thread when the eventfd fires; it calls :meth:`acknowledge` and empties :attr:`items`.

    Two ways in: append to :attr:`items` and write 1 to :attr:`efd` yourself, lock-free, for
    threads that are joined before :meth:`close` (the pool's workers: the hot path of file
    I/O, kept as it was, with no call added); :meth:`post`, under a lock, for threads nobody
    can join (a storage library's callback threads), which may still complete a call after
    :meth:`close`: the item is dropped then, and the closed eventfd's number, perhaps reused,
    is never written."""

    __slots__ = ("loop", "items", "efd", "_lock", "_closed", "_reap", "_owner", "_soon")

    def __init__(self, loop: asyncio.AbstractEventLoop, reap: Callable[[], None]) -> None:
        self.loop = loop
        self.items: deque = deque()
        #: the eventfd the loop watches (OSError to a writer once closed: the class docstring)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._closed = False
        self._reap = reap
        #: the thread that runs ``loop`` (the one that makes the inbox: the controller makes
        #: its pool on the loop thread)
        self._owner = threading.get_ident()
        self._soon = False
        loop.add_reader(self.efd, reap)

    def post(self, item: Any) -> None:
        """Append ``item`` and wake the loop, from any thread, also after :meth:`close`.

        On the loop thread itself (a library the loop drives completes there: the NBD link)
        there is nobody to wake: the items wait for one reap on the next loop turn, without
        the eventfd's write and wake-up (two syscalls and a pass through epoll per batch)."""
        if threading.get_ident() == self._owner:
            if self._closed:
                return
            self.items.append(item)
            if not self._soon:
                self._soon = True
                self.loop.call_soon(self._reap_soon)
            return
        with self._lock:
            if self._closed:
                return
            self.items.append(item)  # deque.append is atomic under the GIL
            os.eventfd_write(self.efd, 1)

    def _reap_soon(self) -> None:
        self._soon = False
        if not self._closed:
            self._reap()

    def acknowledge(self) -> None:
        """The loop woke (or drains anyway): reset the eventfd before emptying :attr:`items`."""
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self.loop.is_closed():
                self.loop.remove_reader(self.efd)
            os.close(self.efd)
            self.items.clear()


class _Job:
    """One submitted call. ``finished`` and ``waiter`` are how a worker and a quiesce meet
    without a lock: the worker sets ``finished`` and then reads ``waiter``; quiesce sets
    ``waiter`` and then reads ``finished`` (each step is atomic under the GIL, so one of the
    two sees the other's). ``fn`` None: a call started with :meth:`IoPool.start`, which no
    worker runs; ``finished`` then means its completion is in the inbox."""

    __slots__ = ("fn", "callback", "views", "finished", "waiter")

    def __init__(self, fn: Callable[[], Any] | None, callback: Callback, views: Sequence[memoryview]) -> None:
        self.fn = fn
        self.callback = callback
        self.views = views
        self.finished = False
        self.waiter: threading.Event | None = None


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
        #: Jobs submitted and not yet delivered (loop thread only, in submission order).
        self._live: dict[_Job, None] = {}
        #: Jobs no worker took yet. A worker takes one and quiesce takes one back with the
        #: same atomic ``dict.pop``: whoever gets it owns it. Per call (submit to callback,
        #: a trivial call, 40,000 in batches of 64) this bookkeeping costs 2.3 -> 2.9 us of
        #: wall time; a Condition guarding a state per job cost 2.2 -> 5.3 us.
        self._unclaimed: dict[_Job, bool] = {}
        #: Where finished calls wait for the loop thread (workers' and started calls' alike).
        self._inbox = Inbox(loop, self._reap)
        self.pending = 0  #: submitted, callback not yet run (loop thread only)
        self._closed = False
        #: Run on the loop thread once ``pending`` is 0 (closing a deleted namespace's fd).
        self._idle_waiters: list[Callable[[], None]] = []
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
        self._unclaimed[job] = True
        self._jobs.put(job)

    def start(self, begin: Callable[[Callback], None], callback: Callback, views: Sequence[memoryview] = ()) -> None:
        """Start a call that completes by callback, on this (the loop) thread: ``begin(complete)``
        now; the library calls ``complete(result, error)`` once, from any thread; later, on the
        loop thread, ``callback(result, error)`` (an exception ``begin`` raised is its error).

        ``views``: the guest memory the call's completion will copy into or out of (what
        :meth:`quiesce` looks at). Such a call is never waited for: quiesce cancels it (its
        callback gets the quiesce's error at once) and drops its late completion, so a read
        that lands in the library's buffer afterwards is never copied into guest memory.
        """
        if self._closed:
            raise RuntimeError("IoPool is closed")
        self.pending += 1
        job = _Job(None, callback, views)
        self._live[job] = None
        post = self._inbox.post

        def complete(result: Any, error: BaseException | None = None) -> None:
            post((job, result, error))
            job.finished = True  # after the post: a quiesce that sees it lets the reap deliver it

        try:
            begin(complete)
        except BaseException as e:  # delivered to the callback, which decides the status
            complete(None, e)

    def _work(self) -> None:
        jobs, claim = self._jobs, self._unclaimed.pop
        done, efd = self._inbox.items, self._inbox.efd
        while True:
            job = jobs.get()
            if job is None:
                return
            if not claim(job, False):
                continue  # taken back by quiesce, which delivers its callback itself
            item: tuple[_Job, Any, BaseException | None]
            try:
                item = (job, job.fn(), None)
            except BaseException as e:  # delivered to the callback, which decides the status
                item = (job, None, e)
            done.append(item)  # deque.append is atomic under the GIL
            job.finished = True  # then the waiter: see _Job
            waiter = job.waiter
            if waiter is not None:
                waiter.set()
            try:
                os.eventfd_write(efd, 1)
            except OSError:  # closed under us at shutdown: nobody is waiting any more
                return

    def _reap(self) -> None:
        """The eventfd fired: run every delivered callback (one batch per loop turn)."""
        inbox = self._inbox
        inbox.acknowledge()
        done, live = inbox.items, self._live
        while done:
            job, result, error = done.popleft()
            try:
                del live[job]
            except KeyError:  # a started call quiesce cancelled, completing after all: dropped
                continue
            self.pending -= 1
            try:
                job.callback(result, error)
            except Exception:  # one request's bug must not stop the others' completions
                log.exception("I/O completion callback failed")
        if not self.pending:
            self._run_idle_waiters()

    def _cancel(self, job: _Job, error: BaseException) -> None:
        """Deliver a job quiesce took back (loop thread)."""
        self.pending -= 1
        del self._live[job]
        try:
            job.callback(None, error)
        except Exception:
            log.exception("I/O completion callback failed")

    def quiesce(self, touches: ViewsPredicate, cancelled: Callable[[], BaseException]) -> int:
        """Make sure no worker writes or reads the guest memory ``touches`` selects, now.

        Called on the loop thread when that memory is about to go (DMA unmap) or the device
        must stop all DMA (resets, Bus Master Enable cleared), before the transport replies.
        Jobs not started yet whose views ``touches`` selects are taken back: their callbacks
        get ``cancelled()`` as the error (the caller's status, e.g. Data Transfer Error). Jobs
        running with such views are waited for (a worker needs nothing of the loop to finish
        its call; one call moves at most one MDTS of data, but a stuck backend call keeps
        the loop waiting too). Then every finished job's callback runs here, so the views
        are released before this returns and the memory can really be unmapped. Calls started
        with :meth:`start` whose completion has not arrived are cancelled the same way. Jobs
        that use no such memory (fsync, Format's erase, other mappings) go on untouched.
        Returns how many jobs were cancelled.
        """
        taken: list[_Job] = []
        busy: list[threading.Event] = []
        claim = self._unclaimed.pop
        for job in self._live:
            if job.finished or not touches(job.views):
                continue
            if job.fn is None:
                taken.append(job)  # started, completing by callback: cancelled, never waited for
                continue
            if claim(job, False):
                taken.append(job)  # no worker will run it now
                continue
            job.waiter = waiter = threading.Event()  # running: see _Job
            if not job.finished:
                busy.append(waiter)
        for waiter in busy:
            waiter.wait()
        for job in taken:
            self._cancel(job, cancelled())
        self._reap()
        if taken or busy:
            log.info("I/O pool: %d queued call(s) cancelled, %d running waited for", len(taken), len(busy))
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
        """Stop the workers (each finishes its current call) and release the eventfd; calls
        started with :meth:`start` and not yet delivered are dropped (their late completions
        too: :class:`Inbox`)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._inbox.close()
        self._live.clear()
        self._unclaimed.clear()
        self.pending = 0
        self._run_idle_waiters()  # the workers are joined: nothing uses anything any more


def wait_for(begin: Callable[[Callback], None]) -> Any:
    """The blocking form of a call that completes by callback (:meth:`IoPool.start`): start
    it on this thread and wait for its completion; its result, or its error raised. For
    callers with no loop (tests, tools, a namespace's set-up) and for worker threads."""
    finished = threading.Event()
    outcome: list[tuple[Any, BaseException | None]] = []

    def complete(result: Any, error: BaseException | None = None) -> None:
        outcome.append((result, error))
        finished.set()

    begin(complete)
    finished.wait()
    result, error = outcome[0]
    if error is not None:
        raise error
    return result
