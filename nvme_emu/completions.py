"""Completions: the one place that posts CQEs and raises interrupts.

QEMU's hw/nvme posts every CQE in ``nvme_post_cqes`` and SPDK's vfio-user target in
``post_completion``; here that is :meth:`Completions.post`, and the interrupt that follows
is :meth:`Completions.signal`. Three kinds of completion come through it:

- admin commands, posted by the admin queue loop as each one ends;
- requests (blocking backends, Format, a Delete I/O SQ waiting for its commands): they go
  in flight with :meth:`begin_request`, which promises them a CQ slot, end with
  :meth:`finish_request` on the loop thread, and :meth:`drain` posts everything finished
  once per loop turn, with the SQ head as of posting;
- deferred admin commands (Asynchronous Event Requests): :meth:`complete`.

The sanctioned copy: the I/O queue loop (:meth:`Controller._process_io_sq`) stores its
CQEs inline with the ring's ``store_cqe``, the same bytes :meth:`CompletionQueue.post`
writes, with the ring's view resolved once per batch instead of per command: the inlined
I/O queue loop, with the one-page PRP fast path, was worth +41 % median IOPS in
``server_throughput`` when it came in (commit d92aa0b). It then hands its count to
:meth:`signal` like everyone else.

What happens upward is reported, never done: "the queue's memory is gone" goes to the
``memory_gone`` hook (the controller sets CFS), and "this CQ has room again" to
``room_again`` (the controller runs the SQs that stalled on it). Nothing here holds a
pointer to the controller, and nothing here fetches a command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vfio_user.dma import GuestMemory

from .atomics import fence
from .coalescing import Coalescing
from .doorbell_port import CqHeadSource
from .latency import clock_ns
from .queue import CompletionQueue, RingUnavailable, SubmissionQueue
from .state import ControllerState
from .timer import FineTimers

IrqRaiser = Callable[[int], bool]


@dataclass(frozen=True)
class CompletionHooks:
    """What posting causes or needs outside; the controller binds them.

    - ``accept_cq_head(cq, value)``: validate and take a CQ head a doorbell path holds
      (an invalid one is a doorbell error event); False when it was refused.
    - ``memory_gone(reason)``: a CQ's memory was unmapped under us: the controller is fatal.
    - ``room_again(cq)``: entries were posted from ``cq``'s reserved slots: SQs that stalled
      on it may fetch again.
    - ``call_soon(fn)``: run ``fn`` after the current batch (the drain).
    """

    accept_cq_head: Callable[[CompletionQueue, int], bool]
    memory_gone: Callable[[str], None]
    room_again: Callable[[CompletionQueue], None]
    call_soon: Callable[[Callable[[], None]], None]


class Completions:
    """CQE posting and interrupts for one controller's state; see the module docstring."""

    def __init__(self, state: ControllerState, hooks: CompletionHooks) -> None:
        self.state = state
        self.hooks = hooks
        self.coalescing = Coalescing(state, self.flush_coalesced)
        #: Set while a host is attached (:meth:`attach`).
        self.raise_irq: IrqRaiser | None = None
        #: Microsecond timers (interrupt coalescing) while a host is attached with a loop.
        self.timers: FineTimers | None = None
        #: Set by a doorbell path that shares its doorbell page (shadow, poll).
        self.cq_head_source: CqHeadSource | None = None
        #: INTMC or an INTx unmask came while BME was clear: look at every CQ when it returns.
        self.recheck_irqs = False
        self.reset()

    def attach(self, raise_irq: IrqRaiser, timers: FineTimers | None) -> None:
        self.raise_irq = raise_irq
        if self.timers is not None:
            self.timers.close()
        self.timers = timers

    def detach(self) -> None:
        self.raise_irq = None
        if self.timers is not None:
            self.timers.close()
            self.timers = None

    def reset(self) -> None:
        """Controller Reset: nothing is left to post, no timer to deliver."""
        #: CQs with finished requests to post at the next drain (insertion ordered).
        self._ready_cqs: dict[CompletionQueue, None] = {}
        self._drain_scheduled = False
        self.coalescing.cancel_all()

    # -- posting ------------------------------------------------------------------------

    def post(self, memory: GuestMemory, cq: CompletionQueue, sqhd: int, sqid: int, cid: int, status: int, dw0: int = 0) -> None:
        """Write one CQE (the one writer besides the I/O loop's documented inline store)."""
        cq.post(memory, dw0, 0, sqhd, sqid, cid, status)

    def complete(self, sqid: int, cid: int, status: int, dw0: int = 0) -> bool:
        """Complete a deferred command (AER); False when its queues are gone or full."""
        state = self.state
        sq = state.sqs.get(sqid)
        memory = state.memory
        if sq is None or memory is None or not state.bus_master:
            return False
        if sq.cq.room <= 0 and not self.refresh_cq_head(sq.cq):
            return False
        try:
            self.post(memory, sq.cq, sq.head, sqid, cid, status, dw0)
        except RingUnavailable as e:
            self.hooks.memory_gone(f"queue {sqid} memory is gone: {e}")
            return False
        self.signal(sq.cq)
        return True

    def begin_request(self, sq: SubmissionQueue) -> None:
        """A command of ``sq`` goes in flight, holding one slot of its CQ until posted."""
        sq.outstanding += 1
        sq.stats.to_workers += 1
        sq.cq.reserved += 1

    def finish_request(self, sq: SubmissionQueue, cid: int, status: int, dw0: int = 0, stamps: list[int] | None = None) -> None:
        """A request begun with :meth:`begin_request` is done (loop thread only); its CQE goes
        out with the next drain. Dropped when a reset or detach took its queues away.
        ``stamps``: its hand-off times (:meth:`LatencyRecorder.submitted`), if the worker path kept them."""
        if not sq.live:
            return
        cq = sq.cq
        cq.ready.append((sq, cid, status, dw0, stamps))
        self._ready_cqs[cq] = None
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self.hooks.call_soon(self.drain)

    def drain(self) -> None:
        """Post every finished request, CQ by CQ, then one interrupt per vector (CQs may share
        one: a single interrupt makes the host look at all of them); SQs that stalled on a CQ
        without room run again (their slots are now used or free)."""
        self._drain_scheduled = False
        state = self.state
        if not state.bus_master:
            return  # held until BME is set again (the controller drains then)
        cqs, self._ready_cqs = self._ready_cqs, {}
        memory = state.memory
        posted: list[tuple[CompletionQueue, tuple[int, int] | None]] = []
        for cq in cqs:
            if memory is None or state.cqs.get(cq.qid) is not cq:
                cq.ready.clear()
                continue
            try:
                stamped = self._post_ready(cq, memory)
            except RingUnavailable as e:
                self.hooks.memory_gone(f"queue {cq.qid} memory is gone: {e}")
                return
            posted.append((cq, stamped))
        fired: set[int] = set()
        for cq, stamped in posted:
            self.signal(cq, fired)
            if stamped is not None:
                state.latency.drain_signalled(*stamped)
        for cq, _ in posted:
            self.hooks.room_again(cq)

    def _post_ready(self, cq: CompletionQueue, memory: GuestMemory) -> tuple[int, int] | None:
        """Post the CQ's finished requests; (qid, ns) of the last one whose hand-off was
        stamped, for its DRAIN_IRQ stage."""
        ready = cq.ready
        stamped = None
        while ready:
            sq, cid, status, dw0, stamps = ready.popleft()
            cq.reserved -= 1  # the promised slot becomes this entry: room can only grow
            self.post(memory, cq, sq.head, sq.qid, cid, status, dw0)
            if stamps is not None:
                now = clock_ns()
                self.state.latency.deferred_done(sq.qid, stamps, now)
                stamped = (sq.qid, now)
            sq.outstanding -= 1
            if not sq.outstanding and sq.on_idle is not None:
                on_idle, sq.on_idle = sq.on_idle, None
                on_idle()
        return stamped

    # -- the CQ head ----------------------------------------------------------------------

    def peek_cq_head(self, cq: CompletionQueue) -> None:
        """Take the newest CQ head the doorbell path holds without having woken us for it."""
        source = self.cq_head_source
        if source is not None:
            value = source.peek_cq_head(cq.qid)
            if value is not None:
                self.hooks.accept_cq_head(cq, value)

    def refresh_cq_head(self, cq: CompletionQueue) -> bool:
        """A CQ has no room: the host may have consumed entries without waking us.

        Two places can hold a newer head: the doorbell path's page (lazy CQ head doorbells)
        and the shadow doorbell buffer. If there is still no room, ask both to wake us when
        the host consumes: the path arms the CQ's eventfd, the buffer gets the CQ's EventIdx.
        Room counts the slots promised to commands in flight (:attr:`CompletionQueue.room`).
        """
        self.peek_cq_head(cq)
        dbbuf = self.state.dbbuf
        if cq.room <= 0 and dbbuf is not None and cq.qid:
            head = dbbuf.cq_head(cq.qid)
            if head < cq.size:
                cq.set_head(head)
            if cq.room <= 0:
                dbbuf.set_cq_eventidx(cq.qid, cq.head)  # ring us when you consume
                fence()
                head = dbbuf.cq_head(cq.qid)
                if head < cq.size:
                    cq.set_head(head)
        if cq.room <= 0 and self.cq_head_source is not None:
            self.cq_head_source.arm_cq_head(cq.qid)
        return cq.room > 0

    # -- interrupts -----------------------------------------------------------------------

    def signal(self, cq: CompletionQueue, fired: set[int] | None = None) -> None:
        """One interrupt for everything posted since the last one (subject to coalescing).

        ``fired``: vectors already raised in this batch; a CQ on one of them is covered.
        """
        if not cq.unsignalled or not cq.irq_enabled:
            cq.unsignalled = 0
            return
        if cq.qid != 0 and not self.coalescing.allows(cq, self.timers):
            return
        if fired is not None:
            if cq.vector in fired:
                cq.unsignalled = 0
                return
            fired.add(cq.vector)
        self._fire(cq)

    def flush_coalesced(self, cq: CompletionQueue) -> None:
        """Coalescing time ran out: deliver what is pending (held while BME is clear)."""
        if cq.unsignalled and cq.irq_enabled and self.state.bus_master:
            self._fire(cq)

    def _fire(self, cq: CompletionQueue) -> None:
        """Raise the CQ's vector; the raiser applies INTMS where the vector is pin-based.

        While BME is clear nothing posts, so :meth:`signal` is not reached; the callers that
        may run then (a coalescing timer, INTMC, an INTx unmask) check it themselves: an
        MSI-X message is a memory write."""
        cq.unsignalled = 0
        if self.raise_irq is not None and self.raise_irq(cq.vector):
            cq.stats.interrupts += 1

    def signal_all(self) -> None:
        """INTMC unmasked vectors: re-raise those whose CQs still hold entries."""
        self._raise_pending(first_only=False)

    def intx_unmasked(self) -> None:
        """INTx is level-triggered: while any CQ has unconsumed entries the line stays up."""
        self._raise_pending(first_only=True)

    def _raise_pending(self, *, first_only: bool) -> None:
        if not self.state.bus_master:
            self.recheck_irqs = True  # like the CQEs behind it, held until BME is set again
            return
        for cq in self.state.cqs.values():
            self.peek_cq_head(cq)
            if cq.pending and cq.irq_enabled:
                self._fire(cq)
                if first_only:
                    return

    def dma_resumed(self) -> None:
        """BME is back: interrupts held by a coalescing timer or an unmask go now."""
        for cq in list(self.state.cqs.values()):
            self.flush_coalesced(cq)
        if self.recheck_irqs:
            self.recheck_irqs = False
            self.signal_all()
