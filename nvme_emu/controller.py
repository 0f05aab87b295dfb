"""The NVMe controller: registers, queues, command dispatch, completions and interrupts.

It knows nothing of sockets or of vfio-user messages. It is given guest memory (a
:class:`vfio_user.dma.GuestMemory`) and a function that raises an interrupt vector when a
host attaches, and it is driven by register accesses and doorbell writes, whatever path
those come by (see :mod:`nvme_emu.doorbell`).

It is the composition of the spec areas: it owns the :class:`~nvme_emu.state.ControllerState`,
binds the :class:`~nvme_emu.state.ControllerHooks` the command handlers may call to its own
methods, and drives registers, doorbells, queues, requests and interrupts itself. No handler
holds a pointer back to it.
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
from .coalescing import Coalescing
from .doorbell_port import CqHeadSource, QueueListener
from .faults import FaultInjector
from .latency import Sampled, Via, clock_ns
from .namespace import Namespace
from .nvm import NvmCommands
from .queue import CompletionQueue, QueueEvent, RingUnavailable, SubmissionQueue
from .spec.commands import CQE_PHASE, CQE_SIZE, SQE_SIZE, NvmeError, Status
from .spec.events import AsyncEventError
from .spec.log_pages import ERROR_LOG_NOT_SPECIFIC
from .spec.registers import NSSR_RESET_VALUE, Aqa, Cap, CapCss, Cc, CcCss, Csts, Reg, Shn, Shst
from .outcome import DEFERRED
from .sqe import SQE
from .state import ControllerConfig, ControllerHooks, ControllerState, ErrorLog, HealthCounters
from .timer import FineTimers

log = logging.getLogger(__name__)

#: a module global: an enum member read through its class costs ~70 ns (Python 3.11)
_DBBUF = Via.DBBUF

IrqRaiser = Callable[[int], bool]

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

    def __init__(self, namespaces: Iterable[Namespace], config: ControllerConfig | None = None) -> None:
        self.state = ControllerState.of(namespaces, config)
        #: PCI COMMAND.BME as the function last saw it (see :meth:`set_bus_master`). A
        #: controller used on its own is one whose host enabled bus mastering.
        self.bus_master = True
        #: INTMC or an INTx unmask came while BME was clear: look at every CQ when it returns.
        self._recheck_irqs = False
        self.state.cap = self._capabilities()
        self.raise_irq: IrqRaiser | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        #: Microsecond timers (interrupt coalescing) while a host is attached with a loop.
        self.timers: FineTimers | None = None
        #: Hooks per queue event (doorbell paths, coalescing timers); before the command sets.
        self.queue_listeners: list[Callable[[QueueEvent, int], None]] = []
        self.coalescing = Coalescing(self.state, self.flush_coalesced)
        self.queue_listeners.append(self._queue_event)
        self.hooks = ControllerHooks(
            complete=self.complete,
            begin_request=self.begin_request,
            finish_request=self.finish_request,
            io_pool=self.io_pool,
            queue_event=self._notify,
            call_soon=self.loop_soon,
            async_event=self.async_event,
        )
        self.admin = AdminCommands(self.state, self.hooks)
        self.nvm = NvmCommands(self.state, self.hooks)
        self.state.admin_opcodes = frozenset(self.admin.handlers)
        self.state.io_opcodes = self.nvm.opcodes
        #: Injected faults (the control plane's); out of the I/O path while there are none.
        self.faults = FaultInjector(self.state, self.nvm, self.call_later, on_change=self._faults_changed)
        #: The I/O dispatcher the queue loop calls: the NVM command set, or the fault wrapper
        #: in front of it while faults are configured (:meth:`_faults_changed`).
        self.io: NvmCommands | FaultInjector = self.nvm
        #: Set by a doorbell path that shares its doorbell page (shadow, poll).
        self.cq_head_source: CqHeadSource | None = None
        self._reset_state()

    # -- the doorbell port (nvme_emu.doorbell_port.DoorbellPort) -------------------------
    # What the doorbell paths use of the controller: these, doorbell(), sq_tail_doorbell(),
    # set_fatal(), bus_master and the sqs/cqs/dbbuf views above, and nothing else.

    latency = _state_view("latency", "The latency anatomy's recorder (it lives as long as the controller).")
    max_io_queues = _state_view("config.max_io_queues", "I/O queues supported (a doorbell slot pair each).")

    def add_queue_listener(self, listener: QueueListener) -> None:
        """Call ``listener`` on every queue event, after the listeners before it."""
        self.queue_listeners.append(listener)

    def register_cq_head_source(self, source: CqHeadSource) -> None:
        """A doorbell path offers its page's CQ head values (see :attr:`cq_head_source`)."""
        self.cq_head_source = source

    def unregister_cq_head_source(self, source: CqHeadSource) -> None:
        """The path goes away; a path registered after it stays."""
        if self.cq_head_source is source:
            self.cq_head_source = None

    # -- state -------------------------------------------------------------------------

    def _capabilities(self) -> int:
        c = self.state.config
        return (
            (c.max_queue_entries - 1) << Cap.MQES_SHIFT
            | Cap.CQR
            | c.timeout_500ms << Cap.TO_SHIFT
            | 0 << Cap.DSTRD_SHIFT
            | Cap.NSSRS
            | (CapCss.NVM | CapCss.IO_COMMAND_SETS) << Cap.CSS_SHIFT
            | 0 << Cap.MPSMIN_SHIFT
            | c.mpsmax << Cap.MPSMAX_SHIFT
        )

    def _reset_state(self) -> None:
        """Controller Level Reset: queues, registers and features back to defaults, except
        AQA, ASQ and ACQ, which the spec has a Controller Reset keep (a host may re-enable
        with the admin queue it configured before)."""
        state = self.state
        state.cc = state.csts = state.intms = 0
        state.sqs = {}
        state.cqs = {}
        state.page_size = 4096
        state.dbbuf = None
        #: CQs with finished requests to post at the next drain (insertion ordered).
        self._ready_cqs: dict[CompletionQueue, None] = {}
        self._drain_scheduled = False
        self.coalescing.cancel_all()
        features.reset(state)
        state.events.reset()
        self._notify(QueueEvent.RESET, 0)

    def _notify(self, event: QueueEvent, qid: int) -> None:
        """Tell every queue listener (the ``queue_event`` hook)."""
        for listener in self.queue_listeners:
            listener(event, qid)

    def _queue_event(self, event: QueueEvent, qid: int) -> None:
        """A deleted CQ takes its coalescing timer along (a new CQ may reuse the QID)."""
        if event is QueueEvent.DELETE_CQ:
            self.coalescing.cancel(qid)

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
        self.raise_irq = raise_irq
        self.loop = loop
        if self.timers is not None:
            self.timers.close()
        self.timers = FineTimers(loop) if loop is not None else None
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
        if self.timers is not None:
            self.timers.call_later(delay, fn)
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
        self.raise_irq = None
        self.loop = None
        if self.timers is not None:
            self.timers.close()
            self.timers = None

    def controller_reset(self) -> None:
        """CC.EN 1 -> 0: queues go away, namespace data and the admin queue registers stay.

        Returns only once no worker can touch guest memory for a command from before: the
        host may reuse its buffers as soon as its register write (or reset) is answered."""
        for sq in self.state.sqs.values():
            sq.live = False  # requests still in flight finish into nothing
        self._quiesce_io(_any_guest_memory, "controller reset")
        for sq in self.state.sqs.values():
            sq.ring.drop()
        for cq in self.state.cqs.values():
            cq.ring.drop()
        self._reset_state()

    def full_reset(self) -> None:
        """NVM Subsystem Reset, PCI reset or a departed host: a Controller Reset that also
        returns AQA, ASQ and ACQ to their power-on value 0."""
        self.controller_reset()
        self.state.aqa = self.state.asq = self.state.acq = 0

    def set_fatal(self, reason: str) -> None:
        """CSTS.CFS: the host must reset us; nothing more is processed until then."""
        if not self.state.fatal:
            log.error("controller fatal status: %s", reason)
        self.state.csts |= Csts.CFS

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
        if enabled == self.bus_master:
            return
        self.bus_master = enabled
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
            self.drain_completions()
            dbbuf = self.state.dbbuf
            for sq in list(self.state.sqs.values()):
                if dbbuf is not None and sq.qid and self.state.sqs.get(sq.qid) is sq:
                    self._accept_sq_tail(sq, dbbuf.sq_tail(sq.qid))
                self._run_sq_if_alive(sq)
        except RingUnavailable as e:
            self.set_fatal(f"doorbell buffer memory is gone: {e}")
        for cq in list(self.state.cqs.values()):
            self.flush_coalesced(cq)
        if self._recheck_irqs:  # INTMC or an INTx unmask came meanwhile
            self._recheck_irqs = False
            self._signal_all()
        async_event.deliver_events(self.state, self.hooks)

    # -- registers ---------------------------------------------------------------------

    def _register_block(self) -> bytes:
        """Registers 0x00-0x3F as the host reads them (CMBLOC/CMBSZ 0: no CMB)."""
        out = bytearray(0x40)
        out[Reg.CAP : Reg.CAP + 8] = self.state.cap.to_bytes(8, "little")
        out[Reg.VS : Reg.VS + 4] = self.state.vs.to_bytes(4, "little")
        out[Reg.INTMS : Reg.INTMS + 4] = self.state.intms.to_bytes(4, "little")
        out[Reg.INTMC : Reg.INTMC + 4] = self.state.intms.to_bytes(4, "little")
        out[Reg.CC : Reg.CC + 4] = self.state.cc.to_bytes(4, "little")
        out[Reg.CSTS : Reg.CSTS + 4] = self.state.csts.to_bytes(4, "little")
        out[Reg.AQA : Reg.AQA + 4] = self.state.aqa.to_bytes(4, "little")
        out[Reg.ASQ : Reg.ASQ + 8] = self.state.asq.to_bytes(8, "little")
        out[Reg.ACQ : Reg.ACQ + 8] = self.state.acq.to_bytes(8, "little")
        return bytes(out)

    def read_register(self, offset: int, size: int) -> bytes:
        """Register reads of any width inside 0x000-0xFFF; unknown registers read 0."""
        if offset + size <= 0x40:
            return self._register_block()[offset : offset + size]
        return bytes(size)

    def write_register(self, offset: int, data: bytes) -> None:
        """Register writes of 4 or 8 bytes (8-byte ASQ/ACQ may also come as two halves)."""
        value = int.from_bytes(data, "little")
        size = len(data)
        if size == 8 and offset in (Reg.ASQ, Reg.ACQ):
            self._write_dword(offset, value & 0xFFFFFFFF)
            self._write_dword(offset + 4, value >> 32)
        elif size == 4:
            self._write_dword(offset, value)
        else:
            log.debug("ignored %d-byte register write at %#x", size, offset)

    def _write_dword(self, offset: int, value: int) -> None:
        if offset == Reg.INTMS:
            self.state.intms |= value
        elif offset == Reg.INTMC:
            self.state.intms &= ~value
            self._signal_all()
        elif offset == Reg.CC:
            self._write_cc(value)
        elif offset == Reg.NSSR:
            if value == NSSR_RESET_VALUE:
                log.info("NVM subsystem reset")
                self.full_reset()
                self.state.csts |= Csts.NSSRO
        elif offset == Reg.AQA and not self.state.enabled:
            self.state.aqa = value & (Aqa.ASQS_MASK | Aqa.ACQS_MASK << Aqa.ACQS_SHIFT)
        elif offset in (Reg.ASQ, Reg.ASQ + 4, Reg.ACQ, Reg.ACQ + 4) and not self.state.enabled:
            self._write_queue_base(offset, value)
        elif offset == Reg.CSTS and value & Csts.NSSRO:
            self.state.csts &= ~Csts.NSSRO  # write 1 to clear

    def _write_queue_base(self, offset: int, value: int) -> None:
        base = Reg.ASQ if offset < Reg.ACQ else Reg.ACQ
        current = self.state.asq if base == Reg.ASQ else self.state.acq
        if offset == base:
            current = (current & ~0xFFFFFFFF) | (value & ~0xFFF)
        else:
            current = (current & 0xFFFFFFFF) | value << 32
        if base == Reg.ASQ:
            self.state.asq = current
        else:
            self.state.acq = current

    def _write_cc(self, value: int) -> None:
        was_enabled = self.state.enabled
        now_enabled = bool(value & Cc.EN)
        if was_enabled and not now_enabled:
            log.info("controller disabled (CC.EN 1 -> 0)")
            self.controller_reset()
            return
        shn_before = (self.state.cc >> Cc.SHN_SHIFT) & Cc.SHN_MASK
        value = self._without_reserved_shn(value, shn_before)
        self.state.cc = value
        if not was_enabled and now_enabled:
            self._enable()
        shn = (value >> Cc.SHN_SHIFT) & Cc.SHN_MASK
        if shn != Shn.NONE and shn_before == Shn.NONE:
            self._shutdown(Shn(shn))
        elif shn == Shn.NONE and shn_before != Shn.NONE:
            self.state.csts &= ~(Csts.SHST_MASK << Csts.SHST_SHIFT)

    @staticmethod
    def _without_reserved_shn(value: int, shn_before: int) -> int:
        """CC.SHN 11b is reserved: the field keeps its value and the rest of CC applies, so
        a host's mistake neither half-applies the write nor starts a shutdown."""
        shn = (value >> Cc.SHN_SHIFT) & Cc.SHN_MASK
        if shn in Shn.__members__.values():
            return value
        log.warning("CC.SHN %s is reserved: ignored", bin(shn))
        return (value & ~(Cc.SHN_MASK << Cc.SHN_SHIFT)) | shn_before << Cc.SHN_SHIFT

    def _enable(self) -> None:
        mps = (self.state.cc >> Cc.MPS_SHIFT) & Cc.MPS_MASK
        css = (self.state.cc >> Cc.CSS_SHIFT) & Cc.CSS_MASK
        asqs = ((self.state.aqa >> Aqa.ASQS_SHIFT) & Aqa.ASQS_MASK) + 1
        acqs = ((self.state.aqa >> Aqa.ACQS_SHIFT) & Aqa.ACQS_MASK) + 1
        problem = None
        if mps > self.state.config.mpsmax:
            problem = f"CC.MPS {mps} above MPSMAX"
        elif css not in (CcCss.NVM, CcCss.ALL_IO_COMMAND_SETS):
            problem = f"CC.CSS {css:#b} not supported"
        elif asqs < 2 or acqs < 2:
            problem = f"admin queue sizes {asqs}/{acqs} too small"
        elif self.state.memory is None:
            problem = "no host attached"
        if problem is not None:
            log.warning("cannot enable controller: %s", problem)
            self.set_fatal(problem)
            return
        self.state.page_size = 1 << (12 + mps)
        if self.state.asq % self.state.page_size or self.state.acq % self.state.page_size:
            self.set_fatal("admin queue base not page aligned")
            return
        cq = CompletionQueue(0, self.state.acq, acqs, vector=0, irq_enabled=True)
        self.state.cqs[0] = cq
        self.state.sqs[0] = SubmissionQueue(0, self.state.asq, asqs, cq)
        cq.sqs.add(0)
        self.state.csts = (self.state.csts & Csts.NSSRO) | Csts.RDY
        log.info("controller enabled: page size %d, admin queues %d/%d", self.state.page_size, asqs, acqs)
        self._notify(QueueEvent.CREATE_SQ, 0)

    def _shutdown(self, kind: Shn) -> None:
        """Flush every namespace, then report shutdown complete. A file or block flush (fsync)
        runs on the I/O pool: SHST reads "occurring" meanwhile (the host polls it) and every
        queue stays served; a reset or SHN cleared before it ends cancels the "complete"."""
        self._set_shst(Shst.OCCURRING)
        namespaces = list(self.state.namespaces.values())
        pool = self.io_pool() if any(ns.blocking for ns in namespaces) else None
        if pool is None:
            self._flush_all(namespaces)
            self._shutdown_complete(kind)
            return

        def flushed(_result: object, _error: BaseException | None) -> None:
            if (self.state.csts >> Csts.SHST_SHIFT) & Csts.SHST_MASK == Shst.OCCURRING:
                self._shutdown_complete(kind)

        pool.submit(partial(self._flush_all, namespaces), flushed)

    @staticmethod
    def _flush_all(namespaces: list[Namespace]) -> None:
        for ns in namespaces:
            try:
                ns.flush()
            except NvmeError as e:
                log.error("flush of namespace %d at shutdown failed: %s", ns.nsid, e)

    def _set_shst(self, shst: Shst) -> None:
        self.state.csts = (self.state.csts & ~(Csts.SHST_MASK << Csts.SHST_SHIFT)) | shst << Csts.SHST_SHIFT

    def _shutdown_complete(self, kind: Shn) -> None:
        self._set_shst(Shst.COMPLETE)
        log.info("controller shutdown (%s) complete", kind.name.lower())

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
        if dbbuf is not None and not self.bus_master:
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

    def _peek_cq_head(self, cq: CompletionQueue) -> None:
        """Take the newest CQ head the doorbell path holds without having woken us for it."""
        source = self.cq_head_source
        if source is not None:
            value = source.peek_cq_head(cq.qid)
            if value is not None:
                self._accept_cq_head(cq, value)

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
        if not self.bus_master:
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
        if memory is None or state.csts & (Csts.RDY | Csts.CFS) != Csts.RDY or not self.bus_master:  # ready, not fatal
            return 0
        cq = sq.cq
        if self.cq_head_source is not None and (cq.tail - cq.head) % cq.size * 2 >= cq.size:
            # lazy CQ head doorbells, looked at once the CQ is half full by our count: at QD1
            # that is once per size/2 commands, not per command; an invalid value shows here
            self._peek_cq_head(cq)
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
                self.signal(cq)
            else:
                irqs = cq.stats.interrupts
                self.signal(cq)
                lat.end(sq.qid, sampled, started, ended, n, cq.stats.interrupts != irqs)
        if sampled is not None:
            lat.left = lat.every
        return n

    def _process_io_sq(self, sq: SubmissionQueue, cq: CompletionQueue, memory: GuestMemory, sampled: Sampled | None = None) -> int:
        """The I/O queue loop (the hot path): the same steps as :meth:`_process_admin_sq` with
        :meth:`SubmissionQueue.fetch` and :meth:`CompletionQueue.post` inlined; ring views
        are resolved once per batch (NVM commands never touch queues or mappings). A sampled
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
                cq.post(memory, dw0, 0, sq.head, sq.qid, entry[2], status)
        except RingUnavailable as e:
            self.set_fatal(f"queue {sq.qid} memory is gone: {e}")
        return n

    def _refresh_cq_head(self, cq: CompletionQueue) -> bool:
        """A CQ has no room: the host may have consumed entries without waking us.

        Two places can hold a newer head: the doorbell path's page (lazy CQ head doorbells)
        and the shadow doorbell buffer. If there is still no room, ask both to wake us when
        the host consumes: the path arms the CQ's eventfd, the buffer gets the CQ's EventIdx.
        Room counts the slots promised to commands in flight (:attr:`CompletionQueue.room`).
        """
        self._peek_cq_head(cq)
        if cq.room <= 0 and self.state.dbbuf is not None and cq.qid:
            head = self.state.dbbuf.cq_head(cq.qid)
            if head < cq.size:
                cq.set_head(head)
            if cq.room <= 0:
                self.state.dbbuf.set_cq_eventidx(cq.qid, cq.head)  # ring us when you consume
                fence()
                head = self.state.dbbuf.cq_head(cq.qid)
                if head < cq.size:
                    cq.set_head(head)
        if cq.room <= 0 and self.cq_head_source is not None:
            self.cq_head_source.arm_cq_head(cq.qid)
        return cq.room > 0

    def complete(self, sqid: int, cid: int, status: int, dw0: int = 0) -> bool:
        """Complete a deferred command (AER); False when its queues are gone or full."""
        sq = self.state.sqs.get(sqid)
        if sq is None or self.state.memory is None or not self.bus_master:
            return False
        if sq.cq.room <= 0 and not self._refresh_cq_head(sq.cq):
            return False
        try:
            sq.cq.post(self.state.memory, dw0, 0, sq.head, sqid, cid, status)
        except RingUnavailable as e:
            self.set_fatal(f"queue {sqid} memory is gone: {e}")
            return False
        self.signal(sq.cq)
        return True

    # -- requests ----------------------------------------------------------------------
    #
    # A command is a request from fetch to CQE. Most complete at once, inside the queue
    # loop (RAM namespaces, admin commands): the loop posts their CQEs itself. The others
    # (blocking backends, Format, a Delete I/O SQ waiting for its commands) return
    # DEFERRED after begin_request(), which promises them a CQ slot; they end with
    # finish_request() on the loop thread, and drain_completions() posts everything
    # finished, once per loop turn, with the SQ head as of posting.

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
            self.loop_soon(self.drain_completions)

    def drain_completions(self) -> None:
        """Post every finished request, CQ by CQ, then one interrupt per vector (CQs may share
        one: a single interrupt makes the host look at all of them); SQs that stalled on a CQ
        without room run again (their slots are now used or free)."""
        self._drain_scheduled = False
        if not self.bus_master:
            return  # held until BME is set again (set_bus_master drains)
        cqs, self._ready_cqs = self._ready_cqs, {}
        memory = self.state.memory
        posted: list[tuple[CompletionQueue, tuple[int, int] | None]] = []
        for cq in cqs:
            if memory is None or self.state.cqs.get(cq.qid) is not cq:
                cq.ready.clear()
                continue
            try:
                stamped = self._post_ready(cq, memory)
            except RingUnavailable as e:
                self.set_fatal(f"queue {cq.qid} memory is gone: {e}")
                return
            posted.append((cq, stamped))
        fired: set[int] = set()
        for cq, stamped in posted:
            self.signal(cq, fired)
            if stamped is not None:
                self.state.latency.drain_signalled(*stamped)
        for cq, _ in posted:
            self._resume_stalled(cq)

    def _post_ready(self, cq: CompletionQueue, memory: GuestMemory) -> tuple[int, int] | None:
        """Post the CQ's finished requests; (qid, ns) of the last one whose hand-off was
        stamped, for its DRAIN_IRQ stage."""
        ready = cq.ready
        stamped = None
        while ready:
            sq, cid, status, dw0, stamps = ready.popleft()
            cq.reserved -= 1  # the promised slot becomes this entry: room can only grow
            cq.post(memory, dw0, 0, sq.head, sq.qid, cid, status)
            if stamps is not None:
                now = clock_ns()
                self.state.latency.deferred_done(sq.qid, stamps, now)
                stamped = (sq.qid, now)
            sq.outstanding -= 1
            if not sq.outstanding and sq.on_idle is not None:
                on_idle, sq.on_idle = sq.on_idle, None
                on_idle()
        return stamped

    def close(self) -> None:
        """Stop the I/O workers (a call in progress finishes) before namespaces close."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # -- interrupts --------------------------------------------------------------------

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
        if cq.unsignalled and cq.irq_enabled and self.bus_master:
            self._fire(cq)

    def _fire(self, cq: CompletionQueue) -> None:
        """Raise the CQ's vector; the raiser applies INTMS where the vector is pin-based.

        While BME is clear nothing posts, so :meth:`signal` is not reached; the callers that
        may run then (a coalescing timer, INTMC, an INTx unmask) check it themselves: an
        MSI-X message is a memory write."""
        cq.unsignalled = 0
        if self.raise_irq is not None and self.raise_irq(cq.vector):
            cq.stats.interrupts += 1

    def _signal_all(self) -> None:
        """INTMC unmasked vectors: re-raise those whose CQs still hold entries."""
        if not self.bus_master:
            self._recheck_irqs = True  # done when BME is set again (_resume_dma)
            return
        for cq in self.state.cqs.values():
            self._peek_cq_head(cq)
            if cq.pending and cq.irq_enabled:
                self._fire(cq)

    def intx_unmasked(self) -> None:
        """INTx is level-triggered: while any CQ has unconsumed entries the line stays up."""
        if not self.bus_master:
            self._recheck_irqs = True  # like the CQEs behind it, held until BME is set again
            return
        for cq in self.state.cqs.values():
            self._peek_cq_head(cq)
            if cq.pending and cq.irq_enabled:
                self._fire(cq)
                return

    # -- stats ---------------------------------------------------------------------------

    def queue_stats(self) -> dict[str, dict[str, int]]:
        out = {}
        for qid, sq in sorted(self.state.sqs.items()):
            d = sq.stats.as_dict()
            d.update({f"cq_{k}": v for k, v in sq.cq.stats.as_dict().items() if k in ("completions", "interrupts")})
            out[f"sq{qid}"] = d
        return out


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
