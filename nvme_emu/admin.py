"""The Admin Command Set: Identify, queue management, features, log pages, AER and more.

Each handler takes the decoded SQE and returns DW0 (or raises :class:`NvmeError` with the
status the spec names). Admin commands move data through PRPs only (SGLs are for I/O).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Callable

from . import prp
from . import structures as st
from .features import Features
from .queue import CompletionQueue, SubmissionQueue
from .spec import (
    CQES_LOG2,
    CSE_SHIFT,
    NSID_ALL,
    SQES_LOG2,
    AdminOpcode,
    AsyncEventConfig,
    AsyncEventError,
    AsyncEventNotice,
    AsyncEventSmart,
    AsyncEventType,
    Cc,
    Cns,
    CommandEffects,
    CriticalWarning,
    Csi,
    FeatureId,
    LogPageId,
    NvmeError,
    NvmOpcode,
    Oacs,
    Oaes,
    Oncs,
    Lpa,
    Sgls,
    Status,
    Vwc,
)

if TYPE_CHECKING:
    from .controller import Controller

log = logging.getLogger(__name__)

# Field positions in the SQE tuple of queue.SQE.
OPC, FLAGS, CID, NSID, CDW2, CDW3, MPTR, PRP1, PRP2, CDW10, CDW11, CDW12, CDW13, CDW14, CDW15 = range(15)

Handler = Callable[[SubmissionQueue, tuple], int]


class AdminCommands:
    """Admin command dispatch and the state only admin commands touch (AER, events)."""

    def __init__(self, ctrl: "Controller") -> None:
        self.ctrl = ctrl
        self.features = Features(ctrl)
        self.handlers: dict[int, Handler] = {
            AdminOpcode.DELETE_IO_SQ: self.delete_io_sq,
            AdminOpcode.CREATE_IO_SQ: self.create_io_sq,
            AdminOpcode.GET_LOG_PAGE: self.get_log_page,
            AdminOpcode.DELETE_IO_CQ: self.delete_io_cq,
            AdminOpcode.CREATE_IO_CQ: self.create_io_cq,
            AdminOpcode.IDENTIFY: self.identify,
            AdminOpcode.ABORT: self.abort,
            AdminOpcode.SET_FEATURES: self.set_features,
            AdminOpcode.GET_FEATURES: self.get_features,
            AdminOpcode.ASYNC_EVENT_REQUEST: self.async_event_request,
            AdminOpcode.KEEP_ALIVE: self.keep_alive,
            AdminOpcode.FORMAT_NVM: self.format_nvm,
        }
        if ctrl.config.shadow_doorbells:
            self.handlers[AdminOpcode.DOORBELL_BUFFER_CONFIG] = self.doorbell_buffer_config
        self.changed_nsids: set[int] = set()
        self.reset()

    def reset(self) -> None:
        self.features.reset()
        self.aer_cids: deque[int] = deque()
        self.events: deque[tuple[int, int, int]] = deque()
        #: Event types reported and not yet acknowledged by reading their log page.
        self.masked_types: set[int] = set()

    # -- dispatch --------------------------------------------------------------------------

    def execute(self, sq: SubmissionQueue, e: tuple):
        from .controller import DEFERRED

        handler = self.handlers.get(e[OPC])
        try:
            if handler is None:
                raise NvmeError(Status.INVALID_OPCODE, f"admin opcode {e[OPC]:#x}")
            if e[FLAGS] & 0x03:
                raise NvmeError(Status.INVALID_FIELD, "fused admin command")
            if e[FLAGS] >> 6:
                raise NvmeError(Status.INVALID_FIELD, "admin commands take PRPs, not SGLs")
            dw0 = handler(sq, e)
        except NvmeError as err:
            self.ctrl.record_error(sq, e[CID], err, nsid=e[NSID])
            log.debug("admin %#x failed: %r", e[OPC], err)
            return err.status_field, 0
        except Exception:  # a bug must cost one command (Internal Error), not the admin queue
            log.exception("admin opcode %#x (cid %d) failed unexpectedly", e[OPC], e[CID])
            return Status.INTERNAL_ERROR, 0
        if dw0 is DEFERRED:
            return DEFERRED
        return Status.SUCCESS, dw0

    # -- data transfer -------------------------------------------------------------------

    def to_host(self, e: tuple, data: bytes, length: int | None = None) -> None:
        """Copy ``data`` (cut or zero-padded to ``length``) into the command's PRPs."""
        n = len(data) if length is None else length
        if n == 0:
            return
        # A host-chosen length (Get Log Page NUMD: up to 16 GiB) is bounded by MDTS before
        # anything is allocated; scatter() zero-fills past the data.
        if n > self.ctrl.config.max_transfer:
            raise NvmeError(Status.INVALID_FIELD, f"transfer of {n} bytes exceeds MDTS")
        views = prp.prp_views(self.ctrl.memory, e[PRP1], e[PRP2], n, self.ctrl.page_size, write=True)
        try:
            prp.scatter(views, data[:n])
        finally:
            prp.release_views(views)

    def from_host(self, e: tuple, length: int) -> bytes:
        views = prp.prp_views(self.ctrl.memory, e[PRP1], e[PRP2], length, self.ctrl.page_size, write=False)
        try:
            return prp.gather(views)
        finally:
            prp.release_views(views)

    # -- queues --------------------------------------------------------------------------

    def _check_io_qid(self, qid: int, limit: int) -> None:
        if qid == 0 or qid > limit:
            raise NvmeError(Status.INVALID_QUEUE_IDENTIFIER, f"queue id {qid} outside 1..{limit}")

    def _check_qsize(self, qsize: int) -> None:
        if qsize < 2 or qsize > self.ctrl.config.max_queue_entries:
            raise NvmeError(Status.INVALID_QUEUE_SIZE, f"queue size {qsize}")

    def _check_base(self, base: int, qsize: int, entry_size: int) -> None:
        if base & (self.ctrl.page_size - 1):
            raise NvmeError(Status.INVALID_PRP_OFFSET, f"queue base {base:#x} not page aligned")
        self.ctrl.dma_check(base, qsize * entry_size)

    def create_io_cq(self, sq: SubmissionQueue, e: tuple) -> int:
        qid, qsize = e[CDW10] & 0xFFFF, (e[CDW10] >> 16) + 1
        pc, ien, iv = e[CDW11] & 1, bool(e[CDW11] & 2), e[CDW11] >> 16
        _nsq, ncq = self.features.io_queue_limit
        self._check_io_qid(qid, ncq)
        if qid in self.ctrl.cqs:
            raise NvmeError(Status.INVALID_QUEUE_IDENTIFIER, f"CQ {qid} exists")
        self._check_qsize(qsize)
        if not pc:
            raise NvmeError(Status.INVALID_FIELD, "non-contiguous queues are not supported (CAP.CQR)")
        if (self.ctrl.cc >> Cc.IOCQES_SHIFT) & Cc.IOCQES_MASK != CQES_LOG2:
            raise NvmeError(Status.INVALID_FIELD, "CC.IOCQES is not 4 (16-byte CQEs)")
        if iv >= self.ctrl.config.msix_vectors:
            raise NvmeError(Status.INVALID_INTERRUPT_VECTOR, f"vector {iv}")
        self._check_base(e[PRP1], qsize, 16)
        self.ctrl.cqs[qid] = CompletionQueue(qid, e[PRP1], qsize, vector=iv, irq_enabled=ien)
        self._notify("create-cq", qid)
        return 0

    def create_io_sq(self, sq: SubmissionQueue, e: tuple) -> int:
        qid, qsize = e[CDW10] & 0xFFFF, (e[CDW10] >> 16) + 1
        pc, qprio, cqid = e[CDW11] & 1, (e[CDW11] >> 1) & 3, e[CDW11] >> 16
        nsq, _ncq = self.features.io_queue_limit
        self._check_io_qid(qid, nsq)
        if qid in self.ctrl.sqs:
            raise NvmeError(Status.INVALID_QUEUE_IDENTIFIER, f"SQ {qid} exists")
        if cqid == 0 or cqid not in self.ctrl.cqs:
            raise NvmeError(Status.COMPLETION_QUEUE_INVALID, f"CQ {cqid} does not exist")
        self._check_qsize(qsize)
        if not pc:
            raise NvmeError(Status.INVALID_FIELD, "non-contiguous queues are not supported (CAP.CQR)")
        if (self.ctrl.cc >> Cc.IOSQES_SHIFT) & Cc.IOSQES_MASK != SQES_LOG2:
            raise NvmeError(Status.INVALID_FIELD, "CC.IOSQES is not 6 (64-byte SQEs)")
        self._check_base(e[PRP1], qsize, 64)
        cq = self.ctrl.cqs[cqid]
        self.ctrl.sqs[qid] = SubmissionQueue(qid, e[PRP1], qsize, cq, priority=qprio)
        cq.sqs.add(qid)
        self._notify("create-sq", qid)
        return 0

    def delete_io_sq(self, sq: SubmissionQueue, e: tuple) -> int:
        qid = e[CDW10] & 0xFFFF
        if qid == 0 or qid not in self.ctrl.sqs:
            raise NvmeError(Status.INVALID_QUEUE_IDENTIFIER, f"SQ {qid} does not exist")
        victim = self.ctrl.sqs.pop(qid)  # no more doorbells or fetches for it
        victim.ring.drop()
        if not victim.outstanding:
            self._finish_delete_sq(victim)
            return 0
        # Commands in flight cannot be recalled from a worker thread: they complete (and
        # post) first, then the deletion completes, so no buffer the host frees after it
        # is ever written again.
        from .controller import DEFERRED

        ctrl, cid = self.ctrl, e[CID]
        ctrl.begin_request(sq)

        def idle() -> None:
            if sq.live:  # else a reset took every queue away already
                self._finish_delete_sq(victim)
                ctrl.finish_request(sq, cid, Status.SUCCESS)

        victim.on_idle = idle
        return DEFERRED

    def _finish_delete_sq(self, victim: SubmissionQueue) -> None:
        victim.cq.sqs.discard(victim.qid)
        self._notify("delete-sq", victim.qid)

    def delete_io_cq(self, sq: SubmissionQueue, e: tuple) -> int:
        qid = e[CDW10] & 0xFFFF
        if qid == 0 or qid not in self.ctrl.cqs:
            raise NvmeError(Status.INVALID_QUEUE_IDENTIFIER, f"CQ {qid} does not exist")
        if self.ctrl.cqs[qid].sqs:
            raise NvmeError(Status.INVALID_QUEUE_DELETION, f"CQ {qid} still has SQs")
        self.ctrl.cqs.pop(qid).ring.drop()
        self._notify("delete-cq", qid)
        return 0

    def _notify(self, event: str, qid: int) -> None:
        for listener in self.ctrl.queue_listeners:
            listener(event, qid)

    # -- identify ------------------------------------------------------------------------

    def identify(self, sq: SubmissionQueue, e: tuple) -> int:
        cns, cntid, csi = e[CDW10] & 0xFF, e[CDW10] >> 16, e[CDW11] >> 24
        nsid = e[NSID]
        if cns == Cns.CONTROLLER:
            data = self.identify_controller()
        elif cns == Cns.NAMESPACE:
            data = self._identify_namespace(nsid)
        elif cns in (Cns.ACTIVE_NSID_LIST, Cns.IOCS_ACTIVE_NSID_LIST):
            if cns == Cns.IOCS_ACTIVE_NSID_LIST and csi != Csi.NVM:
                data = st.build_nsid_list([])
            else:
                if nsid in (NSID_ALL, NSID_ALL - 1):
                    raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"nsid {nsid:#x} for a list")
                data = st.build_nsid_list(self.ctrl.namespaces, greater_than=nsid)
        elif cns == Cns.NS_ID_DESCRIPTOR_LIST:
            data = self._active_ns(nsid).identify_ns_descriptors()
        elif cns == Cns.IOCS_NAMESPACE:
            ns = self._active_ns(nsid)
            if csi != Csi.NVM:
                raise NvmeError(Status.INVALID_FIELD, f"command set {csi}")
            data = ns.identify_namespace_nvm()
        elif cns == Cns.IOCS_CONTROLLER:
            if csi != Csi.NVM:
                raise NvmeError(Status.INVALID_FIELD, f"command set {csi}")
            data = self._identify_controller_nvm()
        elif cns == Cns.IOCS_INDEPENDENT_NAMESPACE:
            data = self._active_ns(nsid).identify_namespace_independent()
        elif cns == Cns.IO_COMMAND_SET:
            data = st.build_identify_io_command_set()
        else:
            raise NvmeError(Status.INVALID_FIELD, f"CNS {cns:#x} not supported")
        del cntid
        self.to_host(e, data, 4096)
        return 0

    def _active_ns(self, nsid: int):
        ns = self.ctrl.namespaces.get(nsid)
        if ns is None:
            raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"namespace {nsid} is not active")
        return ns

    def _identify_namespace(self, nsid: int) -> bytes:
        if nsid == NSID_ALL:
            # The format common to all namespaces: what a new namespace would get.
            return st.build_identify_namespace(lbaf=[(0, 9, 0), (0, 12, 0)], flbas=0)
        ns = self.ctrl.namespaces.get(nsid)
        if ns is None:
            if 0 < nsid <= self.ctrl.config.max_namespaces:
                return bytes(4096)  # allocated-but-inactive IDs read as zeroes
            raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"namespace {nsid}")
        return ns.identify_namespace()

    def identify_controller(self) -> bytes:
        c = self.ctrl.config
        oacs = Oacs.FORMAT_NVM | (Oacs.DOORBELL_BUFFER_CONFIG if c.shadow_doorbells else 0)
        oncs = Oncs.COMPARE | Oncs.DATASET_MANAGEMENT | Oncs.WRITE_ZEROES | Oncs.TIMESTAMP | Oncs.VERIFY | Oncs.COPY
        return st.build_identify_controller(
            vid=self.ctrl.pci_vendor,
            ssvid=self.ctrl.pci_vendor,
            sn=c.serial,
            mn=c.model,
            fr=c.firmware,
            mdts=c.mdts,
            cntlid=1,
            ver=self.ctrl.vs,
            oaes=Oaes.NAMESPACE_ATTRIBUTE,
            oacs=oacs,
            acl=c.acl,
            aerl=c.aerl,
            lpa=Lpa.COMMANDS_EFFECTS | Lpa.EXTENDED_DATA | Lpa.MISC_LOG_PAGES,
            elpe=c.error_log_entries - 1,
            sqes=(SQES_LOG2 << 4) | SQES_LOG2,
            cqes=(CQES_LOG2 << 4) | CQES_LOG2,
            maxcmd=c.max_queue_entries,
            nn=c.max_namespaces,
            oncs=oncs,
            vwc=(Vwc.PRESENT | Vwc.FLUSH_BROADCAST_SUPPORTED) if c.volatile_write_cache else 0,
            sgls=Sgls.SUPPORTED_NO_ALIGNMENT | Sgls.BIT_BUCKET,
            subnqn=st.subsystem_nqn(c.serial),
        )

    def _identify_controller_nvm(self) -> bytes:
        # Limits in units of the minimum page size, 2^n; 0 = no limit beyond MDTS.
        return st.build_identify_controller_nvm(vsl=0, wzsl=0, wusl=0, dmrl=255, dmrsl=0xFFFFFFFF, dmsl=0)

    # -- features --------------------------------------------------------------------------

    def get_features(self, sq: SubmissionQueue, e: tuple) -> int:
        fid, sel = e[CDW10] & 0xFF, (e[CDW10] >> 8) & 0x7
        dw0, data = self.features.get(fid, sel, e[CDW11])
        if data is not None:
            self.to_host(e, data)
        return dw0

    def set_features(self, sq: SubmissionQueue, e: tuple) -> int:
        fid, save = e[CDW10] & 0xFF, bool(e[CDW10] >> 31)
        length = self.features.data_length(fid)
        data = self.from_host(e, length) if length else None
        return self.features.set(fid, save, e[CDW11], data)

    # -- log pages -------------------------------------------------------------------------

    def get_log_page(self, sq: SubmissionQueue, e: tuple) -> int:
        lid, lsp, rae = e[CDW10] & 0xFF, (e[CDW10] >> 8) & 0x7F, bool(e[CDW10] & (1 << 15))
        numd = ((e[CDW11] & 0xFFFF) << 16 | (e[CDW10] >> 16)) + 1
        offset = e[CDW13] << 32 | e[CDW12]
        csi = e[CDW14] >> 24
        length = numd * 4
        if offset & 3:
            raise NvmeError(Status.INVALID_FIELD, "log page offset not dword aligned")
        page = self._log_page(lid, e[NSID], lsp, csi)
        if offset > len(page):
            raise NvmeError(Status.INVALID_FIELD, f"offset {offset} beyond log page {lid:#x}")
        self.to_host(e, page[offset:], length)
        if not rae:
            self._acknowledge(lid)
        return 0

    def _log_page(self, lid: int, nsid: int, lsp: int, csi: int) -> bytes:
        if lid == LogPageId.SUPPORTED_LOG_PAGES:
            return st.build_supported_log_pages(self.supported_log_pages())
        if lid == LogPageId.ERROR_INFORMATION:
            entries = [st.build_error_log_entry(error_count=x["error_count"], sqid=x["sqid"], cid=x["cid"], status=x["status_field"] << 1, nsid=x["nsid"], lba=x["lba"]) for x in self.ctrl.error_log.entries]
            return b"".join(entries).ljust(64 * self.ctrl.config.error_log_entries, b"\0")
        if lid == LogPageId.SMART_HEALTH:
            if nsid not in (0, NSID_ALL):
                raise NvmeError(Status.INVALID_FIELD, "SMART is per controller (LPA bit 0 clear)")
            return self.smart_log()
        if lid == LogPageId.FIRMWARE_SLOT:
            return st.build_firmware_slot_log(afi=1, frs=[self.ctrl.config.firmware])
        if lid == LogPageId.CHANGED_NAMESPACE_LIST:
            data = st.build_changed_ns_list(self.changed_nsids)
            self.changed_nsids.clear()
            return data
        if lid == LogPageId.COMMANDS_SUPPORTED_EFFECTS:
            return self.commands_effects(csi)
        raise NvmeError(Status.INVALID_LOG_PAGE, f"log page {lid:#x}")

    def supported_log_pages(self) -> list[int]:
        return [
            LogPageId.SUPPORTED_LOG_PAGES,
            LogPageId.ERROR_INFORMATION,
            LogPageId.SMART_HEALTH,
            LogPageId.FIRMWARE_SLOT,
            LogPageId.CHANGED_NAMESPACE_LIST,
            LogPageId.COMMANDS_SUPPORTED_EFFECTS,
        ]

    def commands_effects(self, csi: int) -> bytes:
        admin = {op: CommandEffects.CSUPP for op in self.handlers}
        admin[AdminOpcode.FORMAT_NVM] = CommandEffects.CSUPP | CommandEffects.LBCC | CommandEffects.NCC | CommandEffects.NIC | 1 << CSE_SHIFT
        io = {}
        if csi == Csi.NVM:
            io[NvmOpcode.FLUSH] = CommandEffects.CSUPP  # dispatched outside nvm.handlers
            for op in self.ctrl.nvm.handlers:
                io[op] = CommandEffects.CSUPP
            for op in (NvmOpcode.WRITE, NvmOpcode.WRITE_ZEROES, NvmOpcode.DATASET_MANAGEMENT, NvmOpcode.COPY):
                io[op] = CommandEffects.CSUPP | CommandEffects.LBCC
        return st.build_commands_effects_log(admin, io)

    def smart_log(self) -> bytes:
        h = self.ctrl.health
        totals = self.ctrl.nvm.totals()
        temp = self.ctrl.config.temperature_kelvin
        return st.build_smart_log(
            critical_warning=self.critical_warning(),
            composite_temperature=temp,
            data_units_read=st.smart_data_units(totals["bytes_read"]),
            data_units_written=st.smart_data_units(totals["bytes_written"]),
            host_read_commands=totals["read_commands"],
            host_write_commands=totals["write_commands"],
            controller_busy_time=int(h.busy_seconds // 60),
            power_cycles=h.power_cycles,
            power_on_hours=int((time.monotonic() - h.started) // 3600),
            unsafe_shutdowns=h.unsafe_shutdowns,
            media_errors=h.media_errors,
            num_error_log_entries=self.ctrl.error_log.count,
            temperature_sensors=[temp],
        )

    def critical_warning(self) -> int:
        temp = self.ctrl.config.temperature_kelvin
        over = self.features.state.temp_thresholds.get((0, 0), 0xFFFF)
        under = self.features.state.temp_thresholds.get((0, 1), 0)
        warning = 0
        if temp >= over or temp < under:
            warning |= CriticalWarning.TEMPERATURE
        if any(getattr(ns.backend, "readonly", False) for ns in self.ctrl.namespaces.values()):
            warning |= CriticalWarning.READ_ONLY
        return warning

    def check_temperature(self) -> None:
        """A threshold change may put the temperature out of range: a SMART event."""
        if self.critical_warning() & CriticalWarning.TEMPERATURE and self.features.state.async_event_config & CriticalWarning.TEMPERATURE:
            self.async_event(AsyncEventType.SMART_HEALTH, AsyncEventSmart.TEMPERATURE_THRESHOLD, LogPageId.SMART_HEALTH)

    # -- asynchronous events ----------------------------------------------------------------

    def async_event_request(self, sq: SubmissionQueue, e: tuple):
        from .controller import DEFERRED

        if len(self.aer_cids) > self.ctrl.config.aerl:
            raise NvmeError(Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED, "too many AERs outstanding", dnr=True)
        self.aer_cids.append(e[CID])
        self.ctrl.loop_soon(self.deliver_events)
        return DEFERRED

    def async_event(self, event_type: int, info: int, log_page: int) -> None:
        """Queue an event; it completes an outstanding AER unless its type is masked."""
        self.events.append((event_type, info, log_page))
        log.info("asynchronous event type %d info %#x (log %#x)", event_type, info, log_page)
        self.deliver_events()

    def deliver_events(self) -> None:
        """Complete outstanding AERs with queued events (again after the admin CQ had no room)."""
        kept: deque[tuple[int, int, int]] = deque()
        while self.events:
            ev = self.events.popleft()
            if ev[0] in self.masked_types or not self.aer_cids:
                kept.append(ev)
                continue
            cid = self.aer_cids.popleft()
            dw0 = (ev[0] & 7) | (ev[1] & 0xFF) << 8 | (ev[2] & 0xFF) << 16
            if not self.ctrl.complete(0, cid, Status.SUCCESS, dw0):
                self.aer_cids.appendleft(cid)
                kept.append(ev)
                break
            self.masked_types.add(ev[0])
        kept.extend(self.events)
        self.events = kept

    def _acknowledge(self, lid: int) -> None:
        """Reading a log page with RAE clear re-enables its event type."""
        by_log = {
            LogPageId.ERROR_INFORMATION: AsyncEventType.ERROR,
            LogPageId.SMART_HEALTH: AsyncEventType.SMART_HEALTH,
            LogPageId.CHANGED_NAMESPACE_LIST: AsyncEventType.NOTICE,
        }
        etype = by_log.get(LogPageId(lid)) if lid in LogPageId._value2member_map_ else None
        if etype is not None and etype in self.masked_types:
            self.masked_types.discard(etype)
            self.deliver_events()

    def namespace_changed(self, nsid: int) -> None:
        self.changed_nsids.add(nsid)
        if self.features.state.async_event_config & AsyncEventConfig.NAMESPACE_ATTRIBUTE:
            self.async_event(AsyncEventType.NOTICE, AsyncEventNotice.NAMESPACE_ATTRIBUTE_CHANGED, LogPageId.CHANGED_NAMESPACE_LIST)

    # -- the rest ------------------------------------------------------------------------

    def abort(self, sq: SubmissionQueue, e: tuple) -> int:
        """Commands complete synchronously, so there is never one left to abort: DW0 bit 0."""
        sqid, cid = e[CDW10] & 0xFFFF, e[CDW10] >> 16
        if sqid not in self.ctrl.sqs:
            raise NvmeError(Status.INVALID_FIELD, f"abort on SQ {sqid} which does not exist")
        del cid
        return 1

    def keep_alive(self, sq: SubmissionQueue, e: tuple) -> int:
        return 0

    def doorbell_buffer_config(self, sq: SubmissionQueue, e: tuple) -> int:
        shadow, eventidx = e[PRP1], e[PRP2]
        page = self.ctrl.page_size
        if shadow & (page - 1) or eventidx & (page - 1) or not shadow or not eventidx:
            raise NvmeError(Status.INVALID_FIELD, "doorbell buffers must be page aligned")
        self.ctrl.dma_check(shadow, page)
        self.ctrl.dma_check(eventidx, page)
        self.ctrl.configure_doorbell_buffer(shadow, eventidx)
        return 0

    def format_nvm(self, sq: SubmissionQueue, e: tuple) -> int:
        lbaf = (e[CDW10] & 0xF) | ((e[CDW10] >> 12) & 0x3) << 4
        mset, pi, pil, ses = (e[CDW10] >> 4) & 1, (e[CDW10] >> 5) & 7, (e[CDW10] >> 8) & 1, (e[CDW10] >> 9) & 7
        if pi or mset or pil:
            raise NvmeError(Status.INVALID_FORMAT, "no metadata or protection information formats")
        if ses > 1:
            raise NvmeError(Status.INVALID_FIELD, f"secure erase setting {ses}")
        nsid = e[NSID]
        targets = list(self.ctrl.namespaces.values()) if nsid == NSID_ALL else [self._active_ns(nsid)]
        for ns in targets:
            ns.check_format(lbaf, secure_erase=bool(ses))
        pool = self.ctrl.io_pool() if any(ns.blocking for ns in targets) else None
        if pool is None:  # RAM only (or no loop): quick enough to do here
            for ns in targets:
                ns.erase()
            self._formatted(targets, lbaf)
            return 0
        # Zeroing a file or device takes as long as it takes: off the loop, so every other
        # queue keeps being served meanwhile; the new format applies when it is done.
        from .controller import DEFERRED

        ctrl, cid = self.ctrl, e[CID]
        ctrl.begin_request(sq)

        def erase_all() -> None:
            for ns in targets:
                ns.erase()

        def finished(_result: object, error: BaseException | None) -> None:
            status = Status.SUCCESS
            if error is None:
                self._formatted(targets, lbaf)
            elif isinstance(error, NvmeError):
                ctrl.record_error(sq, cid, error, nsid=nsid)
                status = error.status_field
            else:
                log.error("Format NVM of namespace %#x failed unexpectedly", nsid, exc_info=error)
                status = Status.INTERNAL_ERROR
            ctrl.finish_request(sq, cid, status)

        pool.submit(erase_all, finished)
        return DEFERRED

    def _formatted(self, targets: list, lbaf: int) -> None:
        for ns in targets:
            ns.lbaf_index = lbaf
            self.namespace_changed(ns.nsid)


__all__ = ["AdminCommands", "AsyncEventError", "FeatureId"]
