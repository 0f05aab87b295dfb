"""Format NVM (admin opcode 80h): a new LBA format, with or without a secure erase.

Zeroing a RAM namespace is quick and done in place; a file or block device takes as long as
it takes, so its erase runs on the I/O pool and the command completes later, while every
other queue keeps being served. The new format applies only once the erase is done; until
then I/O commands to the namespaces being formatted, and another Format of them, fail with
Format In Progress (DNR clear: a host retries them after the format).
"""

from __future__ import annotations

import logging

from .async_event import namespace_changed
from .namespace import Namespace
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
    if pi or mset or pil:
        raise NvmeError(Status.INVALID_FORMAT, "no metadata or protection information formats")
    if ses > 1:
        raise NvmeError(Status.INVALID_FIELD, f"secure erase setting {ses}")
    nsid = e[NSID]
    targets = list(state.namespaces.values()) if nsid == NSID_ALL else [state.active_namespace(nsid)]
    for ns in targets:
        if ns.formatting:
            raise NvmeError(Status.FORMAT_IN_PROGRESS, f"namespace {ns.nsid} is being formatted", dnr=False)
        ns.check_format(lbaf, secure_erase=bool(ses))
    pool = hooks.io_pool() if any(ns.blocking for ns in targets) else None
    if pool is None:  # RAM only (or no loop): quick enough to do here
        _erase(targets)
        _formatted(state, hooks, targets, lbaf)
        return 0
    cid = e[CID]
    hooks.begin_request(sq)

    def finished(_result: object, error: BaseException | None) -> None:
        for ns in targets:
            ns.formatting = False
        status: int = Status.SUCCESS
        if error is None:
            _formatted(state, hooks, targets, lbaf)
        elif isinstance(error, NvmeError):
            state.record_error(sq.qid, cid, error, nsid=nsid)
            status = error.status_field
        else:
            log.error("Format NVM of namespace %#x failed unexpectedly", nsid, exc_info=error)
            status = Status.INTERNAL_ERROR
        hooks.finish_request(sq, cid, status)

    for ns in targets:  # until finished(): their I/O would race the erase
        ns.formatting = True
    pool.submit(lambda: _erase(targets), finished)
    return DEFERRED


def _erase(targets: list[Namespace]) -> None:
    for ns in targets:
        ns.erase()


def _formatted(state: ControllerState, hooks: ControllerHooks, targets: list[Namespace], lbaf: int) -> None:
    """The new format applies; each namespace's change is reported (Changed Namespace List)."""
    for ns in targets:
        ns.apply_format(lbaf)
        if ns.uncorrectable.clear():  # the media was erased: nothing is unrecoverable any more
            state.lba_status.changed()
        namespace_changed(state, hooks, ns.nsid)
