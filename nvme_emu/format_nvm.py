"""Format NVM (admin opcode 80h): a new LBA format, with or without a secure erase.

Zeroing a RAM namespace is quick and done in place; a file or block device takes as long as
it takes, so its erase runs on the I/O pool and the command completes later, while every
other queue keeps being served. The new format applies only once the erase is done; until
then I/O commands to the namespaces being formatted, and another Format of them, fail with
Format In Progress (DNR clear: a host retries them after the format).

A format is the LBA format (LBAF, its metadata size among them) with MSET (extended LBAs), PI
(the protection type) and PIL (PI first in the metadata): Format switches between formats with
and without protection information either way, erasing data and metadata. What cannot be is
Invalid Format (:func:`nvme_emu.ns_format.check_ns_format`), a reserved PI type Invalid Field.
"""

from __future__ import annotations

import logging

from .async_event import namespace_changed
from .namespace import Namespace, NsFormat
from .pi.format import PiLocation, ProtectionType
from .queue import SubmissionQueue
from .spec.commands import NSID_ALL, NvmeError, Status
from .sqe import CDW10, CID, NSID
from .outcome import DEFERRED
from .state import ControllerHooks, ControllerState

log = logging.getLogger(__name__)


def format_nvm(state: ControllerState, hooks: ControllerHooks, sq: SubmissionQueue, e: tuple):
    """Check every target first, then erase them all (in place, or on the I/O pool)."""
    lbaf = (e[CDW10] & 0xF) | ((e[CDW10] >> 12) & 0x3) << 4
    mset, pi, pil, ses = (e[CDW10] >> 4) & 1, (e[CDW10] >> 5) & 7, (e[CDW10] >> 8) & 1, (e[CDW10] >> 9) & 7
    if pi > ProtectionType.TYPE3:
        raise NvmeError(Status.INVALID_FIELD, f"protection information type {pi} is reserved")
    if ses > 1:
        raise NvmeError(Status.INVALID_FIELD, f"secure erase setting {ses}")
    nsid = e[NSID]
    targets = list(state.namespaces.values()) if nsid == NSID_ALL else [state.active_namespace(nsid)]
    formats: dict[int, NsFormat] = {}
    for ns in targets:
        if ns.formatting:
            raise NvmeError(Status.FORMAT_IN_PROGRESS, f"namespace {ns.nsid} is being formatted", dnr=False)
        formats[ns.nsid] = ns.check_format(lbaf, secure_erase=bool(ses), mset=bool(mset), pi_type=ProtectionType(pi), pil=PiLocation(pil))
    pool = hooks.io_pool() if any(ns.blocking for ns in targets) else None
    if pool is None:  # RAM only (or no loop): quick enough to do here
        _erase(targets, formats)
        _formatted(state, hooks, targets, formats)
        return 0
    cid = e[CID]
    hooks.begin_request(sq)

    def finished(_result: object, error: BaseException | None) -> None:
        for ns in targets:
            ns.formatting = False
        status: int = Status.SUCCESS
        if error is None:
            _formatted(state, hooks, targets, formats)
        elif isinstance(error, NvmeError):
            state.record_error(sq.qid, cid, error, nsid=nsid)
            status = error.status_field
        else:
            log.error("Format NVM of namespace %#x failed unexpectedly", nsid, exc_info=error)
            status = Status.INTERNAL_ERROR
        hooks.finish_request(sq, cid, status)

    for ns in targets:  # until finished(): their I/O would race the erase
        ns.formatting = True
    pool.submit(lambda: _erase(targets, formats), finished)
    return DEFERRED


def _erase(targets: list[Namespace], formats: dict[int, NsFormat]) -> None:
    """Data and metadata, each namespace's metadata made for its new format."""
    for ns in targets:
        ns.erase(formats[ns.nsid])


def _formatted(state: ControllerState, hooks: ControllerHooks, targets: list[Namespace], formats: dict[int, NsFormat]) -> None:
    """The new format applies; each namespace's change is reported (Changed Namespace List)."""
    for ns in targets:
        ns.apply_format(formats[ns.nsid])
        if ns.uncorrectable.clear():  # the media was erased: nothing is unrecoverable any more
            state.lba_status.changed()
        namespace_changed(state, hooks, ns.nsid)
