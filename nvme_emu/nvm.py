"""The NVM Command Set: Read, Write, Flush, Write Uncorrectable, Write Zeroes, Dataset
Management, Compare, Verify and Copy, with the statuses the spec names for every failure.

Data moves zero-copy: the data pointer (PRP or SGL) becomes a list of memoryviews into
guest memory, and the namespace reads into or writes from those views directly. The
:class:`~nvme_emu.namespace.Namespace` is the handlers' one door to storage: it checks LBA
ranges, computes byte offsets and counts for the SMART log; nothing here touches a backend.
A handler's part is the SQE: its fields, its data pointer, its marks and its statuses.

:class:`NvmCommands` is also the I/O dispatcher of every command set
(:mod:`nvme_emu.command_set`): a command's opcode means what its namespace's set says
(``tables[ns.csi]``): one dict lookup more than a single table, about 20 ns (CPython 3.11);
Flush, every set's, comes first.

Each command is a request: :meth:`NvmCommands.execute` returns (status, dw0) when it is
done, or :data:`~nvme_emu.outcome.DEFERRED` when it is in flight. On a RAM namespace
every command is done at once (the synchronous fast path, no per-command objects). On a
blocking namespace (file, block device) the namespace hands back a
:class:`~nvme_emu.outcome.Work`, the blocking part, which runs on the controller's
:class:`~nvme_emu.aio.IoPool`; the request completes later on the loop thread
(``hooks.finish_request``). Reads try the page cache without blocking first
(``RWF_NOWAIT``) and are done at once on a hit. A Work with ``start`` (a backend whose calls
complete by callback: rbd, nbd) is started on the loop thread instead, no worker
(:meth:`NvmCommands._start_async`).

A Read or Write whose data lies in PRP1's page, on a namespace whose format makes Read and
Write plain (``Namespace.plain_rw``: no metadata, no protection information, no zone rules),
takes the one-page fast path: one namespace call that checks, copies and counts.

Write Uncorrectable marks LBAs (``Namespace.uncorrectable``): reading them (Read, Compare,
Verify, a Copy source) fails with Unrecovered Read Error until a Write, Write Zeroes, a
Deallocate, a Copy onto them or a Format NVM replaces their data. Only while some namespace
has marks do Read and Write go through the handlers that look at them (:meth:`NvmCommands.
_marks_changed` swaps the table entries), so the one-page fast path pays nothing otherwise.
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Callable

from . import prp
from .latency import LatencyRecorder, clock_ns
from .lba_status import lba_status_changed
from .metadata_io import MetadataHandlers, PiCheckError, has_metadata
from .namespace import Namespace
from .queue import SubmissionQueue
from .sqe import CDW10, CDW11, CDW12, CID, FLAGS, NSID, OPC, PRP1, PRP2, lba_range, psdt, starting_lba
from .spec.commands import (
    COPY_DESCRIPTOR_FORMAT0_SIZE,
    COPY_MAX_LBAS,
    COPY_MAX_RANGES,
    COPY_MAX_RANGE_LBAS,
    DSM_RANGE_SIZE,
    LBA_CHANGING_OPCODES,
    NSID_ALL,
    DsmAttr,
    NvmOpcode,
    NvmeError,
    Psdt,
    RwCdw12,
    Status,
)
from .aio import Callback, IoPool
from .outcome import DEFERRED, Deferred, Work
from .spec.identify import Csi
from .state import ControllerHooks, ControllerState
from vfio_user.dma_guard import FAULTS as _FAULTS

log = logging.getLogger(__name__)

COPY_DESCRIPTOR = struct.Struct("<8xQH14x")  # format 0: SLBA at 8, NLB (0-based) at 16
DSM_RANGE = struct.Struct("<IIQ")
#: Bound once for the per-command path: an IntEnum attribute access costs about 60 ns
#: (CPython 3.11), a plain constant 14 ns, and a whole 4 KiB RAM read now about 1 us.
_FLUSH, _SUCCESS = NvmOpcode.FLUSH, Status.SUCCESS
_NLB_MASK = RwCdw12.NLB_MASK


#: A handler returns dw0 (done) or the Work that finishes it.
Handler = Callable[[Namespace, tuple], "int | Work"]


class NvmCommands:
    """I/O command dispatch for one controller's state; requests in flight go through hooks."""

    def __init__(self, state: ControllerState, hooks: ControllerHooks) -> None:
        self.state = state
        self.hooks = hooks
        self.handlers: dict[int, Handler] = {
            NvmOpcode.READ: self.read,
            NvmOpcode.WRITE: self.write,
            NvmOpcode.WRITE_ZEROES: self.write_zeroes,
            NvmOpcode.DATASET_MANAGEMENT: self.dataset_management,
            NvmOpcode.COMPARE: self.compare,
            NvmOpcode.VERIFY: self.verify,
            NvmOpcode.COPY: self.copy,
            NvmOpcode.WRITE_UNCORRECTABLE: self.write_uncorrectable,
        }
        #: Read and Write while no namespace has marks, and while one has.
        self._unmarked: dict[int, Handler] = {NvmOpcode.READ: self.read, NvmOpcode.WRITE: self.write}
        self._marked: dict[int, Handler] = {NvmOpcode.READ: self._read_marked, NvmOpcode.WRITE: self._write_marked}
        #: The handler table of every I/O command set, by CSI (:mod:`nvme_emu.command_set`
        #: binds the others: :meth:`bind`): a command's handler is looked up in its
        #: namespace's set. NVM's is :attr:`handlers` itself, so the marks' swap shows here.
        self.tables: dict[int, dict[int, Handler]] = {Csi.NVM: self.handlers}
        #: Each set's opcodes that change logical blocks (a write-protected namespace refuses them).
        self.lba_changing: dict[int, frozenset[int]] = {Csi.NVM: LBA_CHANGING_OPCODES}
        #: The commands of a namespace with metadata (and PI): reached only where ``plain_rw``
        #: is False, so a namespace without metadata never looks (issue 26).
        self.metadata = MetadataHandlers(state, self.views, self.read_buffer)

    @property
    def opcodes(self) -> frozenset[int]:
        """Every NVM opcode dispatched (Flush is handled before the table)."""
        return frozenset(self.handlers) | {NvmOpcode.FLUSH}

    def bind(self, csi: int, handlers: dict[int, Handler], opcodes: frozenset[int], lba_changing: frozenset[int]) -> None:
        """Dispatch commands to namespaces of command set ``csi`` through ``handlers`` (kept,
        not copied). ``opcodes`` are those its Commands Supported and Effects entries name:
        they must be the table's and Flush, or the log would tell the host a lie."""
        if frozenset(handlers) | {NvmOpcode.FLUSH} != opcodes:
            raise ValueError(f"command set {csi:#x}: effects name {sorted(opcodes)}, handlers {sorted(handlers)} and Flush")
        self.tables[csi] = handlers
        self.lba_changing[csi] = lba_changing

    # -- dispatch ----------------------------------------------------------------------------

    def execute(self, sq: SubmissionQueue, e: tuple) -> tuple[int, int] | Deferred:
        opc = e[OPC]
        faults = _FAULTS[0]  # SIGBUSes absorbed in guest memory so far (vfio_user.dma_guard)
        try:
            if e[FLAGS] & 0x03:  # sqe.fuse(e) is not Fuse.NORMAL, inlined
                raise NvmeError(Status.INVALID_FIELD, "fused operations are not supported")
            if opc == _FLUSH:  # every I/O command set's, and NSID FFFFFFFFh spans them all
                return self._done_or_start(sq, e, self.flush(e))
            ns = self.state.namespaces.get(e[NSID])
            if ns is None:
                raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"namespace {e[NSID]}")
            handler = self.tables[ns.csi].get(opc)  # the namespace's command set says what an opcode is
            if handler is None:
                raise NvmeError(Status.INVALID_OPCODE, f"I/O opcode {opc:#x} (command set {ns.csi:#x})")
            if ns.write_protected and opc in self.lba_changing[ns.csi]:
                raise NvmeError(Status.NAMESPACE_WRITE_PROTECTED, f"namespace {ns.nsid} is write protected")
            if ns.formatting:
                raise NvmeError(Status.FORMAT_IN_PROGRESS, f"namespace {ns.nsid} is being formatted", dnr=False)
            dw0 = handler(ns, e)  # RAM: always done here (the fast path), an int, never Work
            if ns.blocking and isinstance(dw0, Work):  # _done_or_start, inlined: a page cache hit ends here
                return self._start(sq, e, dw0)
            if _FAULTS[0] != faults:  # the data copy may have faulted: no success then
                raise self.state.transfer_faulted()
            return _SUCCESS, dw0  # type: ignore[return-value]
        except Exception as err:
            return self._failed(sq, e, err), 0

    def _done_or_start(self, sq: SubmissionQueue, e: tuple, dw0: int | Work) -> tuple[int, int] | Deferred:
        if isinstance(dw0, Work):
            return self._start(sq, e, dw0)
        return _SUCCESS, dw0

    def _failed(self, sq: SubmissionQueue, e: tuple, err: BaseException) -> int:
        """The status of a failed command, with its Error Information entry."""
        if isinstance(err, NvmeError):
            lba = err.lba if isinstance(err, (UnrecoveredRead, PiCheckError)) else starting_lba(e)
            self.state.record_error(sq.qid, e[CID], err, nsid=e[NSID], lba=lba)
            return err.status_for(acre=self.state.features.acre)  # a retry delay where the host enabled them
        # a bug must cost one command (Internal Error), not the whole batch
        log.error("I/O opcode %#x (cid %d) failed unexpectedly", e[OPC], e[CID], exc_info=err)
        return Status.INTERNAL_ERROR

    def _start(self, sq: SubmissionQueue, e: tuple, work: Work) -> tuple[int, int] | Deferred:
        """Put a command in flight: ``work`` runs on the I/O pool, the request completes on
        the loop thread. Without an event loop (in-process use) it runs here and now."""
        hooks = self.hooks
        pool = hooks.io_pool()
        if pool is None:
            return self._run_here(work)
        budget = work.inline
        if budget is None:
            if work.start is not None:  # completes by callback: no worker (an inline Work never does)
                return self._start_async(sq, e, work, pool)
        elif not pool.pending and sq.head == sq.tail and budget.admit():
            # Nothing in flight and nothing behind it in its queue (QD1, or the last of a
            # burst after the pool drained): a hand-off would only add two thread wake-ups
            # (inline_budget.py has the figures); the budget backs off when calls get slow.
            faults = _FAULTS[0]
            t0 = clock_ns()
            try:
                done = self._run_here(work)
            finally:
                budget.took(clock_ns() - t0)
            if _FAULTS[0] != faults:
                raise self.state.transfer_faulted()
            return done
        hooks.begin_request(sq)
        cid = e[CID]
        faults = _FAULTS[0]
        # the latency anatomy's hand-off stamps, on every deferred command (a hand-off costs
        # 10-40 us; four clock reads ~0.25 us): submitted, worker start, worker done, callback
        stamps = LatencyRecorder.submitted()
        run = work.run

        def timed_run() -> Any:
            stamps.append(clock_ns())
            try:
                return run()
            finally:
                stamps.append(clock_ns())

        def finished(result: Any, error: BaseException | None) -> None:
            stamps.append(clock_ns())
            prp.release_views(work.views)
            if error is None and _FAULTS[0] != faults:
                error = self.state.transfer_faulted()
            if error is None and work.done is not None:
                try:
                    work.done(result)
                except Exception as err:
                    error = err
            status = Status.SUCCESS if error is None else self._failed(sq, e, error)
            hooks.finish_request(sq, cid, status, work.result if error is None else 0, stamps)

        pool.submit(timed_run, finished, work.views)  # views: what a quiesce before an unmap or reset looks at
        return DEFERRED

    def _start_async(self, sq: SubmissionQueue, e: tuple, work: Work, pool: IoPool) -> Deferred:
        """Put in flight a command whose backend completes by callback (:attr:`Work.start`):
        started here, finished on the loop thread through the pool's inbox, with the same
        request bookkeeping as a worker's. ``done`` runs before the views are released, since
        a read's copies the backend's buffer into them; a quiesce (DMA unmap, reset, BME
        cleared) that cancelled the command delivers its error instead, and the late
        completion is dropped, so nothing is copied into guest memory after it."""
        hooks = self.hooks
        hooks.begin_request(sq)
        cid = e[CID]
        faults = _FAULTS[0]
        # the latency anatomy's stamps, as a worker's: submitted, started, the library's
        # completion (on its thread), the loop's callback
        stamps = LatencyRecorder.submitted()
        start = work.start
        assert start is not None

        def begin(complete: Callback) -> None:
            def completed(result: Any, error: BaseException | None) -> None:
                stamps.append(clock_ns())
                complete(result, error)

            stamps.append(clock_ns())
            start(completed)

        def finished(result: Any, error: BaseException | None) -> None:
            stamps.append(clock_ns())
            try:
                if error is None and work.done is not None:
                    work.done(result)
                if _FAULTS[0] != faults:  # the copy into or out of guest memory faulted
                    raise self.state.transfer_faulted()
            except Exception as err:
                error = error or err
            finally:
                prp.release_views(work.views)
            status = Status.SUCCESS if error is None else self._failed(sq, e, error)
            hooks.finish_request(sq, cid, status, work.result if error is None else 0, stamps)

        pool.start(begin, finished, work.views)  # views: what a quiesce cancels it by
        return DEFERRED

    @staticmethod
    def _run_here(work: Work) -> tuple[int, int]:
        """Run ``work`` on this thread and finish it (in-process use, and inline Work); its
        ``done`` before the views go (a read of a backend that completes by callback copies
        its buffer into them there)."""
        try:
            result = work.run()
            if work.done is not None:
                work.done(result)
        finally:
            prp.release_views(work.views)
        return Status.SUCCESS, work.result

    # -- data pointers ---------------------------------------------------------------------------

    def views(self, e: tuple, length: int, *, to_host: bool) -> list[memoryview]:
        """The command's data buffer as views; ``to_host``: the controller writes into it."""
        if length > self.state.config.max_transfer:
            raise NvmeError(Status.INVALID_FIELD, f"transfer of {length} bytes exceeds MDTS")
        memory = self.state.memory
        if memory is None:  # the client went while this command waited
            raise NvmeError(Status.DATA_TRANSFER_ERROR, "no host memory")
        pointer = psdt(e)
        if pointer is Psdt.PRP:
            return prp.prp_views(memory, e[PRP1], e[PRP2], length, self.state.page_size, write=to_host)
        if pointer is None:
            raise NvmeError(Status.INVALID_FIELD, "reserved PSDT")
        return prp.sgl_views(memory, struct.pack("<QQ", e[PRP1], e[PRP2]), length, write=to_host)

    def read_buffer(self, e: tuple, length: int) -> bytes:
        """Copy a small host buffer (range lists) out of guest memory."""
        views = self.views(e, length, to_host=False)
        try:
            return prp.gather(views)
        finally:
            prp.release_views(views)

    # -- commands ------------------------------------------------------------------------------

    def _page_view(self, e: tuple, length: int, *, to_host: bool) -> memoryview | None:
        """The data buffer of a Read or Write as one view, when PRP1's page holds it all
        (:func:`prp.single_page_view`): no data pointer walk, and no buffer checks after it
        (one page is never past MDTS, and the view is the command's length). None: the
        general path, which also reports anything wrong."""
        memory = self.state.memory
        if memory is None or e[FLAGS] >> 6:  # SGLs (sqe.psdt(e) is not Psdt.PRP, inlined) and a gone client go the general way
            return None
        return prp.single_page_view(memory, e[PRP1], length, write=to_host)

    def read(self, ns: Namespace, e: tuple) -> int | Work:
        slba, nlb = e[CDW11] << 32 | e[CDW10], (e[CDW12] & _NLB_MASK) + 1  # sqe.lba_range(e), inlined
        length = nlb << ns.lba_shift
        view = self._page_view(e, length, to_host=True)
        if view is not None and ns.plain_rw:  # the one-page fast path: range check, copy, count
            try:
                work = ns.read_page(slba, view)
            except BaseException:
                view.release()
                raise
            if work is None:
                view.release()
                return 0
            return work  # the page cache missed: the pool reads it (the Work owns the view)
        if not ns.plain_rw and has_metadata(ns):  # metadata and PI: its own buffers (issue 26)
            if view is not None:
                view.release()
            return self.metadata.read(ns, e)
        if view is None:
            ns.check_range(slba, nlb)  # LBA Out of Range before any walk of the data pointer
            views = self.views(e, length, to_host=True)
        else:
            views = [view]
        try:  # prp.done_or_owned, inlined (several pages at a high queue depth are hot too)
            work = ns.read(slba, nlb, views)
        except BaseException:
            prp.release_views(views)
            raise
        if work is None:
            prp.release_views(views)
            return 0
        return work

    def write(self, ns: Namespace, e: tuple) -> int | Work:
        slba, nlb = e[CDW11] << 32 | e[CDW10], (e[CDW12] & _NLB_MASK) + 1  # sqe.lba_range(e), inlined
        length = nlb << ns.lba_shift
        view = self._page_view(e, length, to_host=False)
        if view is not None and ns.plain_rw:  # the one-page fast path: range check, copy, count
            try:
                written = ns.write_page(slba, view)
            except BaseException:
                view.release()
                raise
            if written:
                view.release()
                return 0
            views = [view]  # a blocking namespace: the pool writes it, FUA as the command says
        elif not ns.plain_rw and has_metadata(ns):  # metadata and PI: its own buffers (issue 26)
            if view is not None:
                view.release()
            return self.metadata.write(ns, e)
        elif view is None:
            ns.check_range(slba, nlb)  # LBA Out of Range before any walk of the data pointer
            views = self.views(e, length, to_host=False)
        else:
            views = [view]
        fua = bool(e[CDW12] & RwCdw12.FUA) or not self.state.features.write_cache
        try:  # prp.done_or_owned, inlined
            work = ns.write(slba, nlb, views, fua=fua)
        except BaseException:
            prp.release_views(views)
            raise
        if work is None:
            prp.release_views(views)
            return 0
        return work

    @staticmethod
    def done_or_work(op: Callable[[int, int, list[memoryview]], Work | None], slba: int, nlb: int,
                     views: list[memoryview]) -> int | Work:
        """``op`` (a namespace method that takes views) on ``views``: released here when it is
        done or failed, or owned by the Work it handed back (other command sets' writes use it)."""
        return prp.done_or_owned(lambda: op(slba, nlb, views), views)

    def compare(self, ns: Namespace, e: tuple) -> int | Work:
        slba, nlb = lba_range(e)
        ns.check_range(slba, nlb)
        check_readable(ns, slba, nlb)
        if not ns.plain_rw and has_metadata(ns):
            return self.metadata.compare(ns, e)
        views = self.views(e, nlb << ns.lba_shift, to_host=False)
        return self.done_or_work(ns.compare, slba, nlb, views)

    def verify(self, ns: Namespace, e: tuple) -> int | Work:
        slba, nlb = lba_range(e)
        ns.check_range(slba, nlb)
        check_readable(ns, slba, nlb)
        if not ns.plain_rw and has_metadata(ns):
            return self.metadata.verify(ns, e)
        return ns.verify(slba, nlb) or 0

    def write_zeroes(self, ns: Namespace, e: tuple) -> int | Work:
        slba, nlb = lba_range(e)
        if not ns.plain_rw and has_metadata(ns):
            return self._clearing(ns, [(slba, nlb)], self.metadata.write_zeroes(ns, e))
        work = ns.write_zeroes(slba, nlb, deallocate=bool(e[CDW12] & RwCdw12.DEAC), fua=bool(e[CDW12] & RwCdw12.FUA))
        return self._clearing(ns, [(slba, nlb)], work or 0)

    def flush(self, e: tuple) -> int | Work:
        """Flush one namespace or all. Off the loop, it still covers every write completed
        before it: such a write's pwritev returned before this command was even fetched."""
        nsid = e[NSID]
        if nsid == NSID_ALL:
            targets = list(self.state.namespaces.values())
        else:
            ns = self.state.namespaces.get(nsid)
            if ns is None:
                raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"namespace {nsid}")
            targets = [ns]

        def flush_all() -> None:
            for ns in targets:
                ns.flush()

        if any(ns.blocking for ns in targets):
            return Work(flush_all)
        flush_all()
        return 0

    def dataset_management(self, ns: Namespace, e: tuple) -> int | Work:
        nr = (e[CDW10] & 0xFF) + 1
        attrs = e[CDW11]
        raw = self.read_buffer(e, nr * DSM_RANGE_SIZE)
        ranges = []
        for i in range(nr):
            _ctx, nlb, slba = DSM_RANGE.unpack_from(raw, i * DSM_RANGE_SIZE)
            if nlb == 0:
                continue
            ns.check_range(slba, nlb)  # every range, also without AD: a bad one fails the command
            ranges.append((slba, nlb))
        if attrs & DsmAttr.AD:  # deallocated blocks read as DLFEAT says: no longer unrecoverable
            return self._clearing(ns, ranges, ns.deallocate(ranges) or 0)
        return 0

    def copy(self, ns: Namespace, e: tuple) -> int | Work:
        if not ns.plain_rw and has_metadata(ns):  # descriptor formats 0h/1h with PI fields
            sources, dest, total = self.metadata.copy_command(ns, e)
            for src in sources:
                check_readable(ns, src.slba, src.nlb)
            return self._clearing(ns, [(dest.slba, total)], self.metadata.copy(ns, sources, dest, e))
        sdlba, ranges, total = self.copy_ranges(ns, e)
        for slba, nlb in ranges:
            check_readable(ns, slba, nlb)
        work = ns.copy(ranges, sdlba, fua=bool(e[CDW12] & RwCdw12.FUA))
        return self._clearing(ns, [(sdlba, total)], work or 0)

    def copy_ranges(self, ns: Namespace, e: tuple) -> tuple[int, list[tuple[int, int]], int]:
        """A Copy's destination, its source ranges and their total of blocks, every field and
        range checked with the status the spec names (the Zoned set's Copy adds its rules)."""
        sdlba = starting_lba(e)  # SDLBA sits where the others' SLBA does
        nr = (e[CDW12] & 0xFF) + 1
        desfmt = (e[CDW12] >> 8) & 0xF
        if desfmt != 0:
            raise NvmeError(Status.INVALID_FIELD, f"copy descriptor format {desfmt}")
        if nr > COPY_MAX_RANGES:
            raise NvmeError(Status.COMMAND_SIZE_LIMIT_EXCEEDED, f"{nr} source ranges")
        raw = self.read_buffer(e, nr * COPY_DESCRIPTOR_FORMAT0_SIZE)
        ranges = []
        total = 0
        for i in range(nr):
            slba, nlb0 = COPY_DESCRIPTOR.unpack_from(raw, i * COPY_DESCRIPTOR_FORMAT0_SIZE)
            nlb = nlb0 + 1
            if nlb > COPY_MAX_RANGE_LBAS:
                raise NvmeError(Status.COMMAND_SIZE_LIMIT_EXCEEDED, f"copy source range of {nlb} blocks")
            ns.check_range(slba, nlb)
            ranges.append((slba, nlb))
            total += nlb
        if total > COPY_MAX_LBAS:
            raise NvmeError(Status.COMMAND_SIZE_LIMIT_EXCEEDED, f"copy of {total} blocks")
        ns.check_range(sdlba, total)
        return sdlba, ranges, total

    # -- Write Uncorrectable and its marks ------------------------------------------------------

    def write_uncorrectable(self, ns: Namespace, e: tuple) -> int:
        """Mark the range; in memory, so done at once on every backend (no data moves)."""
        slba, nlb = lba_range(e)
        ns.check_range(slba, nlb)
        if ns.uncorrectable.add(slba, nlb):
            self._marks_changed(added=True)
        return 0

    def _read_marked(self, ns: Namespace, e: tuple) -> int | Work:
        """:meth:`read` while some namespace has marks."""
        if ns.uncorrectable:
            check_readable(ns, *lba_range(e))
        return self.read(ns, e)

    def _write_marked(self, ns: Namespace, e: tuple) -> int | Work:
        """:meth:`write` while some namespace has marks: a completed Write clears its range."""
        result = self.write(ns, e)
        return self._clearing(ns, [lba_range(e)], result) if ns.uncorrectable else result

    def _clearing(self, ns: Namespace, ranges: list[tuple[int, int]], result: int | Work) -> int | Work:
        """``result``, and the marks on ``ranges`` gone once it succeeded: now, or when its
        Work is done (a Work that failed leaves them)."""
        if not ns.uncorrectable:
            return result
        if not isinstance(result, Work):
            self._unmark(ns, ranges)
            return result
        done = result.done

        def cleared(r: Any) -> None:
            if done is not None:
                done(r)
            self._unmark(ns, ranges)

        result.done = cleared
        return result

    def _unmark(self, ns: Namespace, ranges: list[tuple[int, int]]) -> None:
        changed = False
        for slba, nlb in ranges:
            changed |= ns.uncorrectable.remove(slba, nlb)
        if changed:
            self._marks_changed(added=False)

    def _marks_changed(self, *, added: bool) -> None:
        """Read and Write look at marks only while a namespace has some; the tracked LBAs
        changed (LBA Status Information log, and its alert for new ones)."""
        state = self.state  # detached namespaces too: their marks count again once attached
        marked = any(ns.uncorrectable for ns in (*state.namespaces.values(), *state.allocated.values()))
        self.handlers.update(self._marked if marked else self._unmarked)
        lba_status_changed(self.state, self.hooks, added=added)


class UnrecoveredRead(NvmeError):
    """Unrecovered Read Error for a marked LBA; its Error Information entry names that LBA."""

    def __init__(self, nsid: int, lba: int) -> None:
        super().__init__(Status.UNRECOVERED_READ_ERROR, f"namespace {nsid} LBA {lba} is marked uncorrectable")
        self.lba = lba


def check_readable(ns: Namespace, slba: int, nlb: int) -> None:
    """Unrecovered Read Error if Write Uncorrectable marked an LBA of the range."""
    if ns.uncorrectable:
        lba = ns.uncorrectable.first_in(slba, nlb)
        if lba is not None:
            raise UnrecoveredRead(ns.nsid, lba)
