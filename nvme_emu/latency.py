"""Latency anatomy: where each I/O's time goes inside the server, per stage, queue and path.

The server sees a command at a few points: the doorbell that announces it arrives (a trapped
REGION_WRITE, an eventfd wake-up, a spin or poll hit, a shadow doorbell buffer re-check), the
queue loop starts and fetches it, the handler runs the backend, its CQE is stored, the
interrupt is signalled. A command that goes to the I/O workers adds four more: submitted,
worker started, worker done, callback back on the loop. :class:`Stage` names the gaps between
those points, :class:`Via` how the doorbell came, and :class:`LatencyRecorder` keeps one
:class:`Histogram` per (queue, via, stage).

Cost, and why it is sampled. At QD1 the server spends ~6.5-7 us of CPU per I/O, so the
budget (under 3 % of ``server_throughput`` QD1 IOPS) is ~0.2 us per I/O. Measured here
(``timeit``, min of 7, this 2-vCPU VM, Python 3.11): ``time.perf_counter_ns()`` 50-70 ns,
``time.monotonic_ns()`` 64 ns (the same vDSO clock; nothing cheaper is reachable from
Python), one :meth:`Histogram.add` 170-190 ns, an enum member read through its class 70 ns
(so the recording code uses module-level ints). A fully stamped batch (seven clock reads,
six adds, the handler wrapper) costs 3.0 us: half a QD1 I/O. So the inline stages are
**sampled**: one batch in :data:`DEFAULT_SAMPLE_EVERY` (64) is stamped at every stage and the
one before it stamps its end; the others pay the countdown. Per QD1 I/O that is 87 ns in
``process_sq`` (countdown, ns clock, branches), ~20 ns on the doorbell path (one compare) and
3.1 us / 64 = 50 ns for the sampled batch: ~0.16 us, 2.5 % of 6.5 us. At QD128 it is that per
batch of 128. The two clock reads the queue loop always took for ``busy_seconds`` are the
fetch and CQE-stored stamps. The deferred path (file/block reads that miss the page cache,
writes to files, flushes) is stamped on **every** command: four clock reads (~0.25 us) against
a hand-off of 10-40 us.

Buckets: HDR-style log-linear, four sub-buckets per power of two (index from
``int.bit_length`` and the two bits below the leading one), so a reported percentile is the
midpoint of a bucket at most 25 % wide: within 12.5 % of the true value. Values below 8 ns
are exact. The maximum is exact too.
"""

from __future__ import annotations

import enum
import time
from typing import Any, Callable

#: One batch in this many is stamped at every inline stage (see the module docstring).
DEFAULT_SAMPLE_EVERY = 64

#: Sub-buckets per power of two (2 bits): the relative resolution is 1/4 of an octave.
_SUB_BITS = 2
_BUCKETS = (64 + 1) << _SUB_BITS

clock_ns = time.perf_counter_ns


class Stage(enum.IntEnum):
    """The gaps between the points where the server sees a command (per batch unless said)."""

    #: the previous batch's end (its interrupt) -> this doorbell: the host's turn and the loop's other work
    HOST_AND_LOOP = 0
    #: doorbell arrival -> the queue loop starts (the path's dispatch, validation)
    DOORBELL = 1
    #: the queue loop starts -> the first command's handler is called (ring views, SQE unpack)
    FETCH = 2
    #: one command's handler: the backend inline, or the hand-off to a worker (per command)
    BACKEND = 3
    #: the last handler returned -> the last CQE is stored
    CQE = 4
    #: the last CQE stored -> the interrupt is signalled (coalescing, eventfd write); only
    #: batches that raised one
    IRQ = 5
    #: the queue loop: start -> last CQE stored, divided by the batch's commands (per command)
    SERVICE = 6
    #: deferred, per command: submitted to the pool -> a worker starts it (queue, thread wake)
    TO_WORKER = 7
    #: deferred, per command: the blocking call on the worker
    WORKER = 8
    #: deferred, per command: worker done -> its callback runs on the loop (eventfd, loop turn, GIL)
    TO_LOOP = 9
    #: deferred, per command: callback -> CQE stored (waits for the loop's drain)
    TO_CQE = 10
    #: deferred, per drained CQ: CQEs stored -> the interrupt is signalled
    DRAIN_IRQ = 11


#: The stages as plain ints for the recording code: an enum member read through its class
#: costs ~70 ns in Python 3.11 (a module global ~10 ns), and a sampled batch reads a dozen.
_HOST_AND_LOOP, _DOORBELL, _FETCH, _BACKEND, _CQE, _IRQ, _SERVICE = (int(s) for s in list(Stage)[:7])
_TO_WORKER, _WORKER, _TO_LOOP, _TO_CQE, _DRAIN_IRQ = (int(s) for s in list(Stage)[7:])


class Via(str, enum.Enum):
    """How the doorbell of a batch reached the server (the label of its histograms)."""

    TRAP = "trap"  # a REGION_WRITE message
    EVENTFD = "shadow-eventfd"  # a shadow ioeventfd woke the loop
    SPIN = "shadow-spin"  # the shadow path's spin saw the slot change
    IOEVENTFD = "ioeventfd"  # a plain ioeventfd woke the loop (value in the dbbuf)
    DBBUF = "dbbuf-recheck"  # the EventIdx re-check found a new shadow tail: no doorbell at all
    POLL = "poll"  # the poller saw the slot change
    NONE = "none"  # no doorbell stamp: a stalled SQ resumed, a host that did not ring
    WORKER = "worker"  # the deferred stages: the command came back from the I/O workers


class Histogram:
    """Counts of nanosecond values in log-linear buckets; see the module docstring."""

    __slots__ = ("counts", "max")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.max = 0

    @property
    def n(self) -> int:
        """Samples so far (summed when asked: one counter less per add, ~40 ns)."""
        return sum(self.counts)

    def add(self, ns: int) -> None:
        if ns < 8:
            i = ns if ns > 0 else 0
        else:
            bl = ns.bit_length()
            i = (bl << 2) | ((ns >> (bl - 3)) & 3)  # _SUB_BITS = 2, as literals: ~20 ns less
        self.counts[i] += 1
        if ns > self.max:
            self.max = ns

    @staticmethod
    def bounds(i: int) -> tuple[int, int]:
        """Bucket ``i`` holds values in [low, high)."""
        if i < 8:
            return i, i + 1
        bl, sub = i >> _SUB_BITS, i & 3
        shift = bl - 1 - _SUB_BITS
        return (4 + sub) << shift, (5 + sub) << shift

    def percentile(self, p: float) -> float:
        """The value below which ``p`` percent of the samples fall: the midpoint of the bucket
        holding that rank (exact below 8 ns; never above the exact maximum)."""
        n = self.n
        if not n:
            return 0.0
        rank = max(1, -(-n * p // 100))  # the ceil(n*p/100)-th smallest value
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                low, high = self.bounds(i)
                return float(low) if high - low == 1 else min((low + high - 1) / 2, float(self.max))
        return float(self.max)

    def summary(self) -> dict[str, float]:
        return {
            "count": self.n,
            "p50_ns": self.percentile(50),
            "p99_ns": self.percentile(99),
            "max_ns": float(self.max),
        }


_NONE, _WORKER_VIA = Via.NONE, Via.WORKER

StageHistograms = list[Histogram]
#: A sampled batch in progress: its histograms, the doorbell arrival it consumed, the via.
Sampled = tuple[StageHistograms, int, "Via"]


def _stage_histograms() -> StageHistograms:
    return [Histogram() for _ in Stage]


class LatencyRecorder:
    """The per-(queue, via) stage histograms and the stamps in flight; loop thread only.

    The doorbell paths stamp an arrival (:meth:`arrive`, or inline: ``if rec.left == 1``)
    only when the next batch is the sampled one; :meth:`begin` starts a sampled batch;
    the controller calls :meth:`timed` for the handler wrapper and :meth:`end` after the
    interrupt. The deferred path calls :meth:`submitted`, :meth:`deferred_done` and
    :meth:`drain_signalled`, and records under :attr:`Via.WORKER`.
    """

    def __init__(self, every: int = DEFAULT_SAMPLE_EVERY) -> None:
        self.hists: dict[tuple[int, Via], StageHistograms] = {}
        self.set_sampling(every)
        #: ns of the newest SQ doorbell arrival for the coming sampled batch (0: none)
        self.arrived = 0
        self.via = _NONE
        #: per SQ: ns of the interrupt after its batch just before a sampled one
        self._last_irq: dict[int, int] = {}
        #: [first handler start, last handler end] of the sampled batch
        self._marks = [0, 0]

    def set_sampling(self, every: int) -> None:
        """Stamp one batch in ``every`` (1: all of them)."""
        if every < 1:
            raise ValueError("sample every must be >= 1")
        self.every = every
        #: batches until the sampled one; the batch that brings this to 0 is stamped, the one
        #: that brings it to 1 stamps its interrupt (the start of the next HOST_AND_LOOP)
        self.left = every

    def reset(self) -> None:
        self.hists.clear()
        self._last_irq.clear()
        self.arrived = 0

    def _of(self, qid: int, via: Via) -> StageHistograms:
        h = self.hists.get((qid, via))
        if h is None:
            h = self.hists[(qid, via)] = _stage_histograms()
        return h

    # -- the doorbell paths --------------------------------------------------------------

    def arrive(self, via: Via) -> None:
        """An SQ doorbell came: stamp it if the batch it starts is the sampled one."""
        if self.left == 1:
            self.arrived = clock_ns()
            self.via = via

    # -- the queue loop (sampled batches) -------------------------------------------------

    def begin(self, qid: int) -> Sampled:
        """A sampled batch starts: its histograms, and the arrival it consumes."""
        arrived, via = self.arrived, self.via
        self.arrived = 0
        if not arrived:
            via = _NONE
        self._marks[0] = 0
        h = self.hists.get((qid, via))
        return (h if h is not None else self._of(qid, via)), arrived, via

    def timed(self, execute: Callable[[Any, tuple], Any], hists: StageHistograms) -> Callable[[Any, tuple], Any]:
        """``execute`` with each call's duration in BACKEND and the batch's first start and
        last end kept for FETCH and CQE (one closure per sampled batch)."""
        marks, backend = self._marks, hists[_BACKEND]

        def run(sq: Any, e: tuple) -> Any:
            t0 = clock_ns()
            result = execute(sq, e)
            t1 = clock_ns()
            if not marks[0]:
                marks[0] = t0
            marks[1] = t1
            backend.add(t1 - t0)
            return result

        return run

    def end(self, qid: int, sampled: Sampled | None, started: int, ended: int, n: int, signalled: bool) -> None:
        """After the batch's interrupt: record the sampled batch's stages, or (on the batch
        just before it) only the interrupt stamp that starts HOST_AND_LOOP."""
        t_irq = clock_ns()
        if sampled is None:
            self._last_irq[qid] = t_irq  # the batch is over (interrupt raised or not needed)
            return
        hists, arrived, _via = sampled
        prev = self._last_irq.get(qid, 0)
        self._last_irq.clear()  # an older stamp would span many batches: never use one
        if arrived:
            if prev and arrived > prev:
                hists[_HOST_AND_LOOP].add(arrived - prev)
            hists[_DOORBELL].add(started - arrived)
        marks = self._marks
        if marks[0]:
            hists[_FETCH].add(marks[0] - started)
            hists[_CQE].add(ended - marks[1])
        if n:
            hists[_SERVICE].add((ended - started) // n)
        if signalled:
            hists[_IRQ].add(t_irq - ended)
        self._last_irq[qid] = t_irq  # for a sampled batch right after (sampling every 1)

    # -- the deferred path (every command) ------------------------------------------------

    @staticmethod
    def submitted() -> list[int]:
        """A command goes to the workers: its stamp list [submitted, started, done, callback]
        (the worker appends the next two, the callback the last)."""
        return [clock_ns()]

    def deferred_done(self, qid: int, stamps: list[int], cqe_ns: int) -> None:
        """Its CQE is stored (``cqe_ns``): record the hand-off stages."""
        if len(stamps) < 4:
            return  # no worker ran it: nothing to say
        submitted, started, done, callback = stamps[:4]
        h = self._of(qid, _WORKER_VIA)
        h[_TO_WORKER].add(started - submitted)
        h[_WORKER].add(done - started)
        h[_TO_LOOP].add(callback - done)
        h[_TO_CQE].add(cqe_ns - callback)

    def drain_signalled(self, qid: int, cqe_ns: int) -> None:
        """A drain's interrupt for CQEs stored at ``cqe_ns`` went out."""
        self._of(qid, _WORKER_VIA)[_DRAIN_IRQ].add(clock_ns() - cqe_ns)

    # -- reporting -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """JSON-able: sampling, resolution, and per queue and via the stages with samples."""
        rows = []
        for (qid, via), hists in sorted(self.hists.items(), key=lambda kv: (kv[0][0], kv[0][1].value)):
            stages = {s.name.lower(): hists[s].summary() for s in Stage if hists[s].n}
            if stages:
                rows.append({"qid": qid, "via": via.value, "stages": stages})
        return {
            "sample_every": self.every,
            "resolution": "log-linear buckets, 4 per power of two: percentiles within 12.5 %, max exact",
            "clock": "time.perf_counter_ns",
            "queues": rows,
        }


def format_table(snapshot: dict[str, Any]) -> str:
    """The snapshot as a text table: one line per queue, via and stage, in microseconds."""
    lines = [
        f"latency anatomy (1 batch in {snapshot['sample_every']} stamped inline, every deferred command; "
        f"{snapshot['resolution']})",
        f"{'queue':>5}  {'via':<15} {'stage':<14} {'count':>8} {'p50 us':>9} {'p99 us':>9} {'max us':>9}",
    ]
    for row in snapshot["queues"]:
        for stage, s in row["stages"].items():
            lines.append(
                f"{'sq' + str(row['qid']):>5}  {row['via']:<15} {stage:<14} {s['count']:>8} "
                f"{s['p50_ns'] / 1e3:>9.2f} {s['p99_ns'] / 1e3:>9.2f} {s['max_ns'] / 1e3:>9.2f}"
            )
    return "\n".join(lines)
