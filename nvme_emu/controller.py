"""The NVMe controller: doorbells, queue processing, command dispatch and DMA control.

It knows nothing of sockets or of vfio-user messages. It is given guest memory (a
:class:`vfio_user.dma.GuestMemory`) and a function that raises an interrupt vector when a
host attaches, and it is driven by register accesses and doorbell writes, whatever path
those come by (see :mod:`nvme_emu.doorbell`).

It is the composition of the spec areas, carved by object: :class:`~nvme_emu.registers.
Registers` holds the CC/CSTS state machine, :class:`~nvme_emu.completions.Completions`
posts every CQE and raises every interrupt, the command sets execute commands, and this
class fetches them: doorbells, SQ processing, resets, Bus Master Enable and unmaps. It owns
the :class:`~nvme_emu.state.ControllerState` and binds the named hooks each part may call
(:class:`~nvme_emu.state.ControllerHooks`, :class:`~nvme_emu.registers.RegisterHooks`,
:class:`~nvme_emu.completions.CompletionHooks`). No part holds a pointer back to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from operator import attrgetter
from typing import Callable, Iterable, Sequence

from vfio_user.dma import GuestMemory

from . import async_event, features, prp
from .admin import AdminCommands
from .aio import IoPool, ViewsPredicate
from .atomics import fence
from .command_set import COMMAND_SETS, namespace_attached
from .completions import CompletionHooks, Completions, IrqRaiser
from .doorbell_port import CqHeadSource, QueueListener
from .faults import FaultInjector
from .latency import Sampled, Via, clock_ns
from .namespace import Namespace
from .nvm import NvmCommands
from .queue import CompletionQueue, QueueEvent, RingUnavailable, SubmissionQueue
from .registers import RegisterHooks, Registers
from .spec.commands import CQE_PHASE, CQE_SIZE, SQE_SIZE, NvmeError, Status
from .spec.events import AsyncEventError
from .spec.log_pages import ERROR_LOG_NOT_SPECIFIC
from .spec.registers import Csts, Shst
from .outcome import DEFERRED
from .sqe import SQE
from .state import ControllerConfig, ControllerHooks, ControllerState, ErrorLog, HealthCounters
from .timer import FineTimers

log = logging.getLogger(__name__)

#: a module global: an enum member read through its class costs ~70 ns (Python 3.11)
_DBBUF = Via.DBBUF

#: Re-exported: their home is nvme_emu.state.
__all__ = ["Controller", "ControllerConfig", "ErrorLog", "HealthCounters"]


def _state_view(name: str, doc: str) -> property:
    """A read-only view of a state field, for the doorbell paths, the PCI function and tests
    (attrgetter: the doorbell paths read some of these once per wake-up)."""
    return property(attrgetter(f"state.{name}"), doc=doc)


class Controller:
    """One NVMe controller; see the module docstring."""

    #: the I/O worker pool, made by io_pool() on first use
    _pool: IoPool | None = None

    config = _state_view("config", "The controller's configuration.")
    namespaces = _state_view("namespaces", "Namespaces by NSID.")
    memory = _state_view("memory", "Guest memory while a host is attached.")
    sqs = _state_view("sqs", "Submission queues by QID.")
    cqs = _state_view("cqs", "Completion queues by QID.")
    dbbuf = _state_view("dbbuf", "The shadow doorbell buffer, once the host configured one.")
    intms = _state_view("intms", "The interrupt mask (INTMS/INTMC).")
    page_size = _state_view("page_size", "CC.MPS in bytes.")
    health = _state_view("health", "Counters behind the SMART log.")
    error_log = _state_view("error_log", "The Error Information log.")
    enabled = _state_view("enabled", "CC.EN.")
    ready = _state_view("ready", "CSTS.RDY.")
    fatal = _state_view("fatal", "CSTS.CFS.")
    bus_master = _state_view("bus_master", "PCI COMMAND.BME as the function last set it (:meth:`set_bus_master`).")

    def __init__(self, namespaces: Iterable[Namespace], config: ControllerConfig | None = None) -> None:
        self.state = ControllerState.of(namespaces, config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.registers = Registers(
            self.state,
            RegisterHooks(
                controller_reset=self.controller_reset,
                subsystem_reset=self.full_reset,
                create_admin_queues=self._create_admin_queues,
                flush_namespaces=self._flush_namespaces,
                interrupts_unmasked=self._interrupts_unmasked,
            ),
        )
        self.completions = Completions(
            self.state,
            CompletionHooks(
                accept_cq_head=self._accept_cq_head,
                memory_gone=self.set_fatal,
                room_again=self._resume_stalled,
                call_soon=self.loop_soon,
            ),
        )
        #: Bound once: the queue loop calls them per batch (an attribute of an attribute
        #: costs a lookup more per call).
        self._signal = self.completions.signal
        self._refresh_cq_head = self.completions.refresh_cq_head
        #: Hooks per queue event (doorbell paths, coalescing timers; add_queue_listener).
        self._queue_listeners: list[QueueListener] = [self._queue_event]
        self.hooks = ControllerHooks(
            complete=self.completions.complete,
            begin_request=self.completions.begin_request,
            finish_request=self.completions.finish_request,
            io_pool=self.io_pool,
            queue_event=self._notify,
            call_soon=self.loop_soon,
            async_event=self.async_event,
        )
        self.admin = AdminCommands(self.state, self.hooks)
        #: The I/O dispatcher and the NVM command set; every command set binds its table to it.
        self.nvm = NvmCommands(self.state, self.hooks)
        for cs in COMMAND_SETS.values():
            self.nvm.bind(cs.csi, cs.handlers(self.nvm), frozenset(cs.effects), cs.lba_changing)
        self.state.admin_opcodes = frozenset(self.admin.handlers)
        for ns in self.state.namespaces.values():  # active from the start: as if attached now
            namespace_attached(self.state, self.hooks, ns)
        #: Injected faults (the control plane's); out of the I/O path while there are none.
        self.faults = FaultInjector(self.state, self.nvm, self.call_later, on_change=self._faults_changed)
        #: The I/O dispatcher the queue loop calls: the NVM command set, or the fault wrapper
        #: in front of it while faults are configured (:meth:`_faults_changed`).
        self.io: NvmCommands | FaultInjector = self.nvm
        self._reset_state()

    # -- the doorbell port (nvme_emu.doorbell_port.DoorbellPort) -------------------------
    # What the doorbell paths use of the controller: these, doorbell(), sq_tail_doorbell(),
    # set_fatal(), bus_master and the sqs/cqs/dbbuf views above, and nothing else.

    latency = _state_view("latency", "The latency anatomy's recorder (it lives as long as the controller).")
    max_io_queues = _state_view("config.max_io_queues", "I/O queues supported (a doorbell slot pair each).")

    def add_queue_listener(self, listener: QueueListener) -> None:
        """Call ``listener`` on every queue event, after the listeners before it."""
        self._queue_listeners.append(listener)

    def register_cq_head_source(self, source: CqHeadSource) -> None:
        """A doorbell path offers its page's CQ head values (:attr:`Completions.cq_head_source`)."""
        self.completions.cq_head_source = source

    def unregister_cq_head_source(self, source: CqHeadSource) -> None:
        """The path goes away; a path registered after it stays."""
        if self.completions.cq_head_source is source:
            self.completions.cq_head_source = None

    # -- state -------------------------------------------------------------------------

    def _reset_state(self, *, admin_queue_registers: bool = False) -> None:
        """Controller Level Reset: queues, registers and features back to defaults (AQA,
        ASQ and ACQ only when ``admin_queue_registers``: :meth:`Registers.reset`)."""
        state = self.state
        self.registers.reset(admin_queue_registers=admin_queue_registers)
        state.sqs = {}
        state.cqs = {}
        state.page_size = 4096
        state.dbbuf = None
        self.completions.reset()
        features.reset(state)
        state.events.reset()
        self._notify(QueueEvent.RESET, 0)

    def _notify(self, event: QueueEvent, qid: int) -> None:
        """Tell every queue listener (the ``queue_event`` hook)."""
        for listener in self._queue_listeners:
            listener(event, qid)

    def _queue_event(self, event: QueueEvent, qid: int) -> None:
        """A deleted CQ takes its coalescing timer along (a new CQ may reuse the QID)."""
        if event is QueueEvent.DELETE_CQ:
            self.completions.coalescing.cancel(qid)

    def _faults_changed(self) -> None:
        """The first fault was added or the last removed: I/O goes through the fault wrapper
        only while there are faults, so a fault-free controller pays nothing for them. The
        NVM command set's hooks change with it (a delayed request's completion waits)."""
        active = self.faults.active
        self.io = self.faults if active else self.nvm
        self.nvm.hooks = self.faults.hooks if active else self.hooks

    def async_event(self, event_type: int, info: int, log_page: int) -> None:
        """Post an asynchronous event (the ``async_event`` hook)."""
        async_event.post_event(self.state, self.hooks, event_type, info, log_page)

    def attach_host(self, memory: GuestMemory, raise_irq: IrqRaiser, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.state.memory = memory
        self.loop = loop
        self.completions.attach(raise_irq, FineTimers(loop) if loop is not None else None)
        self.state.health.power_cycles += 1

    def loop_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after the current batch (directly when there is no loop)."""
        if self.loop is not None:
            self.loop.call_soon(fn)
        else:
            fn()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` after ``delay`` seconds on the loop's microsecond timers (at once when
        there is no loop: in-process use without one has no later)."""
        timers = self.completions.timers
        if timers is not None:
            timers.call_later(delay, fn)
        else:
            fn()

    def detach_host(self) -> None:
        """The host is gone without warning: count it, and stop touching its memory."""
        if self.state.enabled and (self.state.csts >> Csts.SHST_SHIFT) & Csts.SHST_MASK != Shst.COMPLETE:
            self.state.health.unsafe_shutdowns += 1
        self.full_reset()
        memory, self.state.memory = self.state.memory, None
        if memory is not None and self._pool is not None:
            # Requests on the workers, or finished and not yet reaped, still hold views of
            # the guest's memory, so the transport's unmap right after this is deferred:
            # once they are done, let it happen (else it waits for the next client's unmap).
            self._pool.when_idle(memory.table.close_deferred)
        self.completions.detach()
        self.loop = None

    def controller_reset(self) -> None:
        """CC.EN 1 -> 0: queues go away, namespace data and the admin queue registers stay.

        Returns only once no worker can touch guest memory for a command from before: the
        host may reuse its buffers as soon as its register write (or reset) is answered."""
        self._drop_queues()
        self._reset_state()

    def full_reset(self) -> None:
        """NVM Subsystem Reset, PCI reset or a departed host: a Controller Reset that also
        returns AQA, ASQ and ACQ to their power-on value 0."""
        self._drop_queues()
        self._reset_state(admin_queue_registers=True)

    def _drop_queues(self) -> None:
        """Every queue stops: requests in flight finish into nothing, and no worker holds a
        view of guest memory once this returns."""
        for sq in self.state.sqs.values():
            sq.live = False
        self._quiesce_io(_any_guest_memory, "controller reset")
        for sq in self.state.sqs.values():
            sq.ring.drop()
        for cq in self.state.cqs.values():
            cq.ring.drop()

    def set_fatal(self, reason: str) -> None:
        """CSTS.CFS: the host must reset us; nothing more is processed until then."""
        self.registers.set_fatal(reason)

    def dma_unmapping(self, iova: int, size: int) -> None:
        """``[iova, iova + size)`` is about to be unmapped (both backends call this before the
        munmap and before their reply): no view of it may outlive this call. Queued I/O into
        it is cancelled (Data Transfer Error, as the data cannot move), running I/O into it
        is waited for; I/O into other mappings goes on."""
        memory = self.state.memory
        if memory is not None:
            self._quiesce_io(_outside(memory), "DMA unmap")
        for q in list(self.state.sqs.values()) + list(self.state.cqs.values()):
            if q.ring.overlaps(iova, size):
                q.ring.drop()
        if self.state.dbbuf is not None and self.state.dbbuf.overlaps(iova, size):
            self.state.dbbuf.drop()

    def _quiesce_io(self, touches: ViewsPredicate, why: str) -> None:
        """No I/O worker touches the guest memory ``touches`` selects once this returns."""
        if self._pool is not None:
            self._pool.quiesce(touches, lambda: NvmeError(Status.DATA_TRANSFER_ERROR, f"{why} with the transfer queued"))

    # -- what register writes cause (RegisterHooks) ----------------------------------------

    def _create_admin_queues(self, asqs: int, acqs: int) -> None:
        """CC.EN 0 -> 1 passed its checks: the admin queue pair at ASQ/ACQ."""
        cq = CompletionQueue(0, self.state.acq, acqs, vector=0, irq_enabled=True)
        self.state.cqs[0] = cq
        self.state.sqs[0] = SubmissionQueue(0, self.state.asq, asqs, cq)
        cq.sqs.add(0)
        self._notify(QueueEvent.CREATE_SQ, 0)

    def _flush_namespaces(self, done: Callable[[], None]) -> None:
        """CC.SHN: flush every namespace, then ``done``. A file or block flush (fsync) runs on
        the I/O pool, so every queue stays served meanwhile."""
        namespaces = list(self.state.namespaces.values())
        pool = self.io_pool() if any(ns.blocking for ns in namespaces) else None
        if pool is None:
            _flush_all(namespaces)
            done()
            return
        pool.submit(partial(_flush_all, namespaces), lambda _result, _error: done())

    def _interrupts_unmasked(self) -> None:
        """INTMC: vectors whose CQs still hold entries fire again."""
        self.completions.signal_all()

    def read_register(self, offset: int, size: int) -> bytes:
        """BAR0 register read (:meth:`Registers.read`)."""
        return self.registers.read(offset, size)

    def write_register(self, offset: int, data: bytes) -> None:
        """BAR0 register write (:meth:`Registers.write`)."""
        self.registers.write(offset, data)

    # -- bus mastering -------------------------------------------------------------------

    def set_bus_master(self, enabled: bool) -> None:
        """PCI COMMAND.BME changed. A function without it issues no memory request (PCI
        Express Base, Command register: "Bus Master Enable"; MSI-X messages are memory writes
        too), so while it is clear the controller fetches no SQE, reads no PRP list or
        shadow doorbell, moves no data, posts no CQE and raises no interrupt.

        Neither spec says what becomes of commands already taken, so, like a device whose
        DMA engine stalls rather than one that forgets: doorbells are latched (a register
        write is no DMA; a shadow doorbell is read when BME returns); I/O the workers are
        running is waited for at the moment BME is cleared, and I/O not yet started is
        cancelled (Data Transfer Error: its data could not move); completions and interrupts
        are held and posted when BME is set again. A check per doorbell and per batch, none
        per command.
        """
        if enabled == self.state.bus_master:
            return
        self.state.bus_master = enabled
        if self.state.memory is not None:  # not at power-on or after the host left
            log.info("bus mastering %s", "enabled" if enabled else "disabled: DMA held")
        if not enabled:
            self._quiesce_io(_any_guest_memory, "Bus Master Enable cleared")
            return
        self._resume_dma()

    def _resume_dma(self) -> None:
        """BME is back: post the held completions, read the shadow tails, run every SQ, and
        raise the interrupts that were held."""
        try:
            self.completions.drain()
            dbbuf = self.state.dbbuf
            for sq in list(self.state.sqs.values()):
                if dbbuf is not None and sq.qid and self.state.sqs.get(sq.qid) is sq:
                    self._accept_sq_tail(sq, dbbuf.sq_tail(sq.qid))
                self._run_sq_if_alive(sq)
        except RingUnavailable as e:
            self.set_fatal(f"doorbell buffer memory is gone: {e}")
        self.completions.dma_resumed()
        async_event.deliver_events(self.state, self.hooks)

    def intx_unmasked(self) -> None:
        """The PCI function unmasked INTx (level-triggered): raise it again if a CQ holds entries."""
        self.completions.intx_unmasked()

    # -- doorbells ---------------------------------------------------------------------

    def doorbell(self, qid: int, is_cq: bool, value: int) -> None:
        """A doorbell value arrived, by whatever path; validate it, then do the work."""
        try:
            self._doorbell(qid, is_cq, value)
        except RingUnavailable as e:  # the shadow doorbell buffer was unmapped under us
            self.set_fatal(f"doorbell buffer memory is gone: {e}")

    def _doorbell(self, qid: int, is_cq: bool, value: int) -> None:
        state = self.state
        if state.csts & (Csts.RDY | Csts.CFS) != Csts.RDY:  # not ready, or fatal
            return
        dbbuf = state.dbbuf if qid else None
        if dbbuf is not None and not state.bus_master:
            return  # the value lives in host memory, read when BME is set again
        if is_cq:
            cq = state.cqs.get(qid)
            if cq is None:
                self._bad_doorbell(AsyncEventError.INVALID_DOORBELL_REGISTER)
                return
            if dbbuf is not None:
                value = dbbuf.cq_head(qid)
            had_no_room = cq.room <= 0  # SQs may be stalled on it (fetching stops at no room)
            if self._accept_cq_head(cq, value) and had_no_room:
                self._resume_stalled(cq)
            return
        sq = state.sqs.get(qid)
        if sq is None:
            self._bad_doorbell(AsyncEventError.INVALID_DOORBELL_REGISTER, qid)
            return
        if dbbuf is not None:
            if value >= sq.size:  # the kick itself must be a valid tail
                self._bad_doorbell(AsyncEventError.INVALID_DOORBELL_WRITE_VALUE, qid)
                return
            value = dbbuf.sq_tail(qid)
        if self._accept_sq_tail(sq, value):
            sq.stats.doorbells += 1
            self.run_sq(sq)

    def sq_tail_doorbell(self, sq: SubmissionQueue, value: int) -> None:
        """A new tail for an SQ the caller looked up, on a path without shadow doorbell
        buffers: what :meth:`_doorbell` does for it, minus the lookups."""
        if self.state.csts & (Csts.RDY | Csts.CFS) == Csts.RDY and self._accept_sq_tail(sq, value):
            sq.stats.doorbells += 1
            self.process_sq(sq)

    def _accept_sq_tail(self, sq: SubmissionQueue, value: int) -> bool:
        """Validate and take an SQ tail value; an invalid one raises the error event instead."""
        if value >= sq.size:
            self._bad_doorbell(AsyncEventError.INVALID_DOORBELL_WRITE_VALUE, sq.qid)
            return False
        sq.tail = value
        return True

    def _accept_cq_head(self, cq: CompletionQueue, value: int) -> bool:
        """Validate and take a CQ head value; an invalid one raises the error event instead."""
        if value >= cq.size:
            self._bad_doorbell(AsyncEventError.INVALID_DOORBELL_WRITE_VALUE)
            return False
        cq.set_head(value)
        return True

    def _bad_doorbell(self, info: AsyncEventError, sqid: int = ERROR_LOG_NOT_SPECIFIC) -> None:
        """A doorbell for a missing queue or beyond its size: an Error Information entry and
        an error event, nothing done."""
        async_event.doorbell_error(self.state, self.hooks, info, sqid)

    def _run_sq_if_alive(self, sq: SubmissionQueue) -> None:
        """A later look at ``sq``, unless it was deleted (or replaced) in between."""
        if self.state.sqs.get(sq.qid) is sq:
            self.run_sq(sq)

    def run_sq(self, sq: SubmissionQueue) -> int:
        """Process until idle; with shadow doorbells, publish EventIdx and re-check."""
        total = self.process_sq(sq)
        dbbuf = self.state.dbbuf
        if dbbuf is None or sq.qid == 0:
            return total
        if not self.state.bus_master:
            return total  # EventIdx is host memory too
        try:
            for _ in range(64):  # bounded: a host that keeps submitting gets a fresh turn
                if sq.head != sq.tail:
                    break  # stalled on a full CQ: the CQ head doorbell resumes us
                dbbuf.set_sq_eventidx(sq.qid, sq.tail)
                fence()
                tail = dbbuf.sq_tail(sq.qid)
                if tail == sq.tail or not self._accept_sq_tail(sq, tail):
                    break
                sq.stats.coalesced += 1
                lat = self.state.latency
                if lat.left == 1:  # inline arrive(): this is the dbbuf paths' per-I/O route
                    lat.arrived, lat.via = clock_ns(), _DBBUF
                total += self.process_sq(sq)
            else:
                # Still moving after 64 rounds: EventIdx now lags the tail, so the host will
                # not ring again. Look once more after the other ready callbacks ran.
                self.loop_soon(partial(self._run_sq_if_alive, sq))
        except RingUnavailable as e:
            self.set_fatal(f"doorbell buffer memory is gone: {e}")
        return total

    def _resume_stalled(self, cq: CompletionQueue) -> None:
        for sqid in sorted(cq.sqs):
            sq = self.state.sqs.get(sqid)
            if sq is not None and not sq.empty:
                self.run_sq(sq)
        if cq.qid == 0:
            async_event.deliver_events(self.state, self.hooks)  # an event held back by the full admin CQ

    # -- command processing ------------------------------------------------------------

    def process_sq(self, sq: SubmissionQueue) -> int:
        """Run every command in [head, tail), post completions, then one interrupt per CQ."""
        state = self.state
        memory = state.memory
        if memory is None or state.csts & (Csts.RDY | Csts.CFS) != Csts.RDY or not state.bus_master:  # ready, not fatal
            return 0
        cq = sq.cq
        completions = self.completions
        if completions.cq_head_source is not None and (cq.tail - cq.head) % cq.size * 2 >= cq.size:
            # lazy CQ head doorbells, looked at once the CQ is half full by our count: at QD1
            # that is once per size/2 commands, not per command; an invalid value shows here
            completions.peek_cq_head(cq)
        n = 0
        # Latency anatomy (nvme_emu.latency): one batch in `every` is stamped at each stage,
        # and the one before it stamps its interrupt; the others pay this countdown only.
        lat = state.latency
        lat.left = left = lat.left - 1
        sampled = lat.begin(sq.qid) if left <= 0 else None
        started = time.perf_counter_ns()  # also the FETCH and SERVICE stamps
        try:
            if sq.qid:
                n = self._process_io_sq(sq, cq, memory, sampled)
            else:
                n = self._process_admin_sq(sq, cq, memory)
        except Exception:  # a bug in the queue loop itself: tell the host to reset us
            log.exception("queue %d processing failed", sq.qid)
            self.set_fatal(f"internal error while processing queue {sq.qid}")
            n = 0
        ended = time.perf_counter_ns()
        state.health.busy_seconds += (ended - started) * 1e-9
        if n:
            st = sq.stats
            st.commands += n
            st.batches += 1
            if n > st.max_batch:
                st.max_batch = n
            if left > 1:
                self._signal(cq)
            else:
                irqs = cq.stats.interrupts
                self._signal(cq)
                lat.end(sq.qid, sampled, started, ended, n, cq.stats.interrupts != irqs)
        if sampled is not None:
            lat.left = lat.every
        return n

    def _process_io_sq(self, sq: SubmissionQueue, cq: CompletionQueue, memory: GuestMemory, sampled: Sampled | None = None) -> int:
        """The I/O queue loop (the hot path): the same steps as :meth:`_process_admin_sq` with
        :meth:`SubmissionQueue.fetch` and :meth:`Completions.post` inlined, the one sanctioned
        copy of the CQE writer (see :mod:`nvme_emu.completions` for why); ring views are
        resolved once per batch (NVM commands never touch queues or mappings). A sampled
        batch runs the same loop with each handler call timed (one branch per batch)."""
        n = 0
        deferred, in_flight = 0, DEFERRED
        execute = self.io.execute if sampled is None else self.state.latency.timed(self.io.execute, sampled[0])
        try:
            sq_view = sq.ring.view(memory, write=False)
            store_cqe = cq.ring.atomic(memory).store_cqe
            unpack = SQE.unpack_from
            qid, sq_size, cq_size = sq.qid, sq.size, cq.size
            while sq.head != sq.tail:
                if (cq.head - cq.tail - 1) % cq_size <= cq.reserved and not self._refresh_cq_head(cq):
                    sq.stats.cq_full_stalls += 1
                    break
                head = sq.head
                entry = unpack(sq_view, head * SQE_SIZE)
                head += 1
                sq.head = head = 0 if head == sq_size else head
                result = execute(sq, entry)
                if result is in_flight:  # it holds a CQ slot (cq.reserved) until posted
                    deferred += 1
                    continue
                status, dw0 = result
                # CQE: bytes 0-11, then CID + status|phase as a release store (see post)
                store_cqe(cq.tail * CQE_SIZE, dw0, 0, head, qid, entry[2], (status << 1) | cq.phase)
                tail = cq.tail + 1
                if tail == cq_size:
                    tail = 0
                    cq.phase ^= CQE_PHASE
                cq.tail = tail
                n += 1
        except RingUnavailable as e:
            self.set_fatal(f"queue {sq.qid} memory is gone: {e}")
        finally:
            cq.unsignalled += n
            cq.stats.completions += n
        return n + deferred

    def _process_admin_sq(self, sq: SubmissionQueue, cq: CompletionQueue, memory: GuestMemory) -> int:
        n = 0
        execute = self.admin.execute
        post = self.completions.post
        try:
            while sq.head != sq.tail:
                if cq.room <= 0 and not self._refresh_cq_head(cq):
                    sq.stats.cq_full_stalls += 1
                    break
                entry = sq.fetch(memory)
                result = execute(sq, entry)
                n += 1
                if result is DEFERRED:
                    continue
                status, dw0 = result
                post(memory, cq, sq.head, sq.qid, entry[2], status, dw0)
        except RingUnavailable as e:
            self.set_fatal(f"queue {sq.qid} memory is gone: {e}")
        return n


    # -- requests ------------------------------------------------------------------------

    def io_pool(self) -> IoPool | None:
        """The worker threads for blocking backends, made on first use; None without a loop."""
        loop = self.loop
        if loop is None:
            return None
        if self._pool is not None and self._pool.loop is not loop:  # re-attached elsewhere
            self._pool.close()
            self._pool = None
        if self._pool is None:
            self._pool = IoPool(loop)
        return self._pool

    def close(self) -> None:
        """Stop the I/O workers (a call in progress finishes) before namespaces close."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # -- stats ---------------------------------------------------------------------------

    def queue_stats(self) -> dict[str, dict[str, int]]:
        out = {}
        for qid, sq in sorted(self.state.sqs.items()):
            d = sq.stats.as_dict()
            d.update({f"cq_{k}": v for k, v in sq.cq.stats.as_dict().items() if k in ("completions", "interrupts")})
            out[f"sq{qid}"] = d
        return out


def _flush_all(namespaces: list[Namespace]) -> None:
    for ns in namespaces:
        try:
            ns.flush()
        except NvmeError as e:
            log.error("flush of namespace %d at shutdown failed: %s", ns.nsid, e)


def _any_guest_memory(views: Sequence[memoryview]) -> bool:
    """Jobs that move data to or from the host (an SGL Bit Bucket is no host memory)."""
    return any(not prp.is_bit_bucket(v) for v in views)


def _outside(memory: GuestMemory) -> ViewsPredicate:
    """Jobs with a view of memory no longer in ``memory``'s table: the mapping being
    unmapped (the table drops it before it calls the unmap listeners) or one whose munmap
    was deferred. A view belongs to the mapping whose buffer it was sliced from."""
    live = {id(m.view.obj) for m in memory.table if m.view is not None}

    def touches(views: Sequence[memoryview]) -> bool:
        return any(id(v.obj) not in live and not prp.is_bit_bucket(v) for v in views)

    return touches
