"""The NVM Command Set: Read, Write, Flush, Write Zeroes, Dataset Management, Compare,
Verify and Copy, with the statuses the spec names for every failure.

Data moves zero-copy: the data pointer (PRP or SGL) becomes a list of memoryviews into
guest memory, and the namespace backend reads into or writes from those views directly.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Callable

from . import prp
from .namespace import Namespace
from .queue import SubmissionQueue
from .spec import (
    COPY_DESCRIPTOR_FORMAT0_SIZE,
    DSM_RANGE_SIZE,
    NSID_ALL,
    DsmAttr,
    NvmeError,
    NvmOpcode,
    RwCdw12,
    Status,
)

if TYPE_CHECKING:
    from .controller import Controller

log = logging.getLogger(__name__)

OPC, FLAGS, CID, NSID, CDW2, CDW3, MPTR, PRP1, PRP2, CDW10, CDW11, CDW12, CDW13, CDW14, CDW15 = range(15)
#: Copy limits we report in Identify Namespace (MSSRL, MCL, MSRC is 0-based).
COPY_MAX_RANGE_LBAS = 1 << 16
COPY_MAX_RANGES = 128
COPY_DESCRIPTOR = struct.Struct("<8xQH14x")  # format 0: SLBA at 8, NLB (0-based) at 16
DSM_RANGE = struct.Struct("<IIQ")

Handler = Callable[[Namespace, tuple], int]


class NvmCommands:
    def __init__(self, ctrl: "Controller") -> None:
        self.ctrl = ctrl
        self.handlers: dict[int, Handler] = {
            NvmOpcode.READ: self.read,
            NvmOpcode.WRITE: self.write,
            NvmOpcode.WRITE_ZEROES: self.write_zeroes,
            NvmOpcode.DATASET_MANAGEMENT: self.dataset_management,
            NvmOpcode.COMPARE: self.compare,
            NvmOpcode.VERIFY: self.verify,
            NvmOpcode.COPY: self.copy,
        }
    # -- dispatch ----------------------------------------------------------------------------

    def execute(self, sq: SubmissionQueue, e: tuple) -> tuple[int, int]:
        opc = e[OPC]
        try:
            if e[FLAGS] & 0x03:
                raise NvmeError(Status.INVALID_FIELD, "fused operations are not supported")
            if opc == NvmOpcode.FLUSH:
                return Status.SUCCESS, self.flush(e)
            handler = self.handlers.get(opc)
            if handler is None:
                raise NvmeError(Status.INVALID_OPCODE, f"I/O opcode {opc:#x}")
            ns = self.ctrl.namespaces.get(e[NSID])
            if ns is None:
                raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"namespace {e[NSID]}")
            return Status.SUCCESS, handler(ns, e)
        except NvmeError as err:
            self.ctrl.record_error(sq, e[CID], err, nsid=e[NSID], lba=e[CDW11] << 32 | e[CDW10])
            return err.status_field, 0
        except Exception:  # a bug must cost one command (Internal Error), not the whole batch
            log.exception("I/O opcode %#x (cid %d) failed unexpectedly", opc, e[CID])
            return Status.INTERNAL_ERROR, 0

    # -- data pointers ---------------------------------------------------------------------------

    def views(self, e: tuple, length: int, *, to_host: bool) -> list[memoryview]:
        """The command's data buffer as views; ``to_host``: the controller writes into it."""
        if length > self.ctrl.config.max_transfer:
            raise NvmeError(Status.INVALID_FIELD, f"transfer of {length} bytes exceeds MDTS")
        memory = self.ctrl.memory
        psdt = e[FLAGS] >> 6
        if psdt == 0:
            return prp.prp_views(memory, e[PRP1], e[PRP2], length, self.ctrl.page_size, write=to_host)
        if psdt == 3:
            raise NvmeError(Status.INVALID_FIELD, "reserved PSDT")
        return prp.sgl_views(memory, struct.pack("<QQ", e[PRP1], e[PRP2]), length, write=to_host)

    def read_buffer(self, e: tuple, length: int) -> bytes:
        """Copy a small host buffer (range lists) out of guest memory."""
        views = self.views(e, length, to_host=False)
        try:
            return prp.gather(views)
        finally:
            prp.release_views(views)

    @staticmethod
    def _lba_range(e: tuple) -> tuple[int, int]:
        return e[CDW11] << 32 | e[CDW10], (e[CDW12] & RwCdw12.NLB_MASK) + 1

    # -- commands ------------------------------------------------------------------------------

    def read(self, ns: Namespace, e: tuple) -> int:
        slba, nlb = self._lba_range(e)
        ns.check_range(slba, nlb)
        views = self.views(e, nlb << ns.lba_shift, to_host=True)
        try:
            ns.read_lbas(slba, nlb, views)
        finally:
            prp.release_views(views)
        return 0

    def write(self, ns: Namespace, e: tuple) -> int:
        slba, nlb = self._lba_range(e)
        ns.check_range(slba, nlb)
        fua = bool(e[CDW12] & RwCdw12.FUA) or not self.ctrl.admin.features.state.write_cache
        views = self.views(e, nlb << ns.lba_shift, to_host=False)
        try:
            ns.write_lbas(slba, nlb, views, fua=fua)
        finally:
            prp.release_views(views)
        return 0

    def compare(self, ns: Namespace, e: tuple) -> int:
        slba, nlb = self._lba_range(e)
        ns.check_range(slba, nlb)
        views = self.views(e, nlb << ns.lba_shift, to_host=False)
        try:
            same = ns.compare(slba, nlb, views)
        finally:
            prp.release_views(views)
        if not same:
            raise NvmeError(Status.COMPARE_FAILURE, f"LBAs {slba}+{nlb} differ")
        return 0

    def verify(self, ns: Namespace, e: tuple) -> int:
        slba, nlb = self._lba_range(e)
        ns.check_range(slba, nlb)
        ns.verify(slba, nlb)
        return 0

    def write_zeroes(self, ns: Namespace, e: tuple) -> int:
        slba, nlb = self._lba_range(e)
        ns.check_range(slba, nlb)
        ns.write_zeroes(slba, nlb, deallocate=bool(e[CDW12] & RwCdw12.DEAC), fua=bool(e[CDW12] & RwCdw12.FUA))
        return 0

    def flush(self, e: tuple) -> int:
        nsid = e[NSID]
        if nsid == NSID_ALL:
            for ns in self.ctrl.namespaces.values():
                ns.flush()
            return 0
        ns = self.ctrl.namespaces.get(nsid)
        if ns is None:
            raise NvmeError(Status.INVALID_NAMESPACE_OR_FORMAT, f"namespace {nsid}")
        ns.flush()
        return 0

    def dataset_management(self, ns: Namespace, e: tuple) -> int:
        nr = (e[CDW10] & 0xFF) + 1
        attrs = e[CDW11]
        raw = self.read_buffer(e, nr * DSM_RANGE_SIZE)
        ranges = []
        for i in range(nr):
            _ctx, nlb, slba = DSM_RANGE.unpack_from(raw, i * DSM_RANGE_SIZE)
            if nlb == 0:
                continue
            ns.check_range(slba, nlb)
            ranges.append((slba, nlb))
        if attrs & DsmAttr.AD:
            ns.deallocate(ranges)
        return 0

    def copy(self, ns: Namespace, e: tuple) -> int:
        sdlba = e[CDW11] << 32 | e[CDW10]
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
            ns.check_range(slba, nlb)
            ranges.append((slba, nlb))
            total += nlb
        if total > COPY_MAX_RANGE_LBAS:
            raise NvmeError(Status.COMMAND_SIZE_LIMIT_EXCEEDED, f"copy of {total} blocks")
        ns.check_range(sdlba, total)
        ns.copy(ranges, sdlba, fua=bool(e[CDW12] & RwCdw12.FUA))
        return 0

    # -- SMART -------------------------------------------------------------------------------------

    def totals(self) -> dict[str, int]:
        out = {"bytes_read": 0, "bytes_written": 0, "read_commands": 0, "write_commands": 0}
        for ns in self.ctrl.namespaces.values():
            for key in out:
                out[key] += getattr(ns.stats, key)
        return out
