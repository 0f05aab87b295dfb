"""The Admin Command Set: the dispatch table from opcode to the handler of its spec area.

Handlers live by area (:mod:`~nvme_emu.identify`, :mod:`~nvme_emu.log_page`,
:mod:`~nvme_emu.features`, :mod:`~nvme_emu.async_event`, :mod:`~nvme_emu.queue_management`,
:mod:`~nvme_emu.format_nvm`, :mod:`~nvme_emu.dbbuf`, :mod:`~nvme_emu.abort`,
:mod:`~nvme_emu.namespace_management`, :mod:`~nvme_emu.lba_status`). Each takes
(state, hooks, sq, decoded SQE) and returns DW0, or :data:`~nvme_emu.outcome.DEFERRED`, or
raises :class:`NvmeError` with the status the spec names. Admin commands move data through
PRPs only (SGLs are for I/O).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from .abort import abort
from .async_event import async_event_request
from .dbbuf import doorbell_buffer_config
from .features import get_features, set_features
from .format_nvm import format_nvm
from .identify import identify
from .lba_status import get_lba_status
from .log_page import get_log_page
from .namespace_management import namespace_attachment, namespace_management
from .queue import SubmissionQueue
from .queue_management import create_io_cq, create_io_sq, delete_io_cq, delete_io_sq
from .spec.commands import AdminOpcode, Fuse, NvmeError, Psdt, Status
from .sqe import CID, NSID, OPC, fuse, psdt
from .outcome import DEFERRED
from .state import ControllerConfig, ControllerHooks, ControllerState
from vfio_user.dma_guard import FAULTS as _FAULTS

log = logging.getLogger(__name__)

#: (state, hooks, sq, SQE) -> DW0 or DEFERRED
Handler = Callable[[ControllerState, ControllerHooks, SubmissionQueue, tuple], Any]

#: Mandatory and optional admin commands every controller has.
HANDLERS: dict[int, Handler] = {
    AdminOpcode.DELETE_IO_SQ: delete_io_sq,
    AdminOpcode.CREATE_IO_SQ: create_io_sq,
    AdminOpcode.GET_LOG_PAGE: get_log_page,
    AdminOpcode.DELETE_IO_CQ: delete_io_cq,
    AdminOpcode.CREATE_IO_CQ: create_io_cq,
    AdminOpcode.IDENTIFY: identify,
    AdminOpcode.ABORT: abort,
    AdminOpcode.SET_FEATURES: set_features,
    AdminOpcode.GET_FEATURES: get_features,
    AdminOpcode.ASYNC_EVENT_REQUEST: async_event_request,
    AdminOpcode.FORMAT_NVM: format_nvm,
    AdminOpcode.NAMESPACE_MANAGEMENT: namespace_management,
    AdminOpcode.NAMESPACE_ATTACHMENT: namespace_attachment,
    AdminOpcode.GET_LBA_STATUS: get_lba_status,
}


def handlers_for(config: ControllerConfig) -> dict[int, Handler]:
    """The table for a controller: Doorbell Buffer Config only where OACS advertises it."""
    table = dict(HANDLERS)
    if config.shadow_doorbells:
        table[AdminOpcode.DOORBELL_BUFFER_CONFIG] = doorbell_buffer_config
    return table


class AdminCommands:
    """Admin dispatch for one controller's state and hooks."""

    def __init__(self, state: ControllerState, hooks: ControllerHooks) -> None:
        self.state = state
        self.hooks = hooks
        self.handlers = handlers_for(state.config)

    def execute(self, sq: SubmissionQueue, e: tuple):
        """(status, DW0) of a command that is done, or DEFERRED."""
        handler = self.handlers.get(e[OPC])
        faults = _FAULTS[0]  # SIGBUSes absorbed in guest memory so far (vfio_user.dma_guard)
        try:
            if handler is None:
                raise NvmeError(Status.INVALID_OPCODE, f"admin opcode {e[OPC]:#x}")
            if fuse(e) is not Fuse.NORMAL:
                raise NvmeError(Status.INVALID_FIELD, "fused admin command")
            if psdt(e) is not Psdt.PRP:
                raise NvmeError(Status.INVALID_FIELD, "admin commands take PRPs, not SGLs")
            dw0 = handler(self.state, self.hooks, sq, e)
            if _FAULTS[0] != faults:  # its data went to (or came from) a scratch page
                raise self.state.transfer_faulted()
        except NvmeError as err:
            self.state.record_error(sq.qid, e[CID], err, nsid=e[NSID])
            log.debug("admin %#x failed: %r", e[OPC], err)
            return err.status_field, 0
        except Exception:  # a bug must cost one command (Internal Error), not the admin queue
            log.exception("admin opcode %#x (cid %d) failed unexpectedly", e[OPC], e[CID])
            return Status.INTERNAL_ERROR, 0
        if dw0 is DEFERRED:
            return DEFERRED
        return Status.SUCCESS, dw0
