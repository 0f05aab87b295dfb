"""Abort (admin opcode 08h)."""

from __future__ import annotations

from .queue import SubmissionQueue
from .spec.commands import NvmeError, Status
from .sqe import CDW10
from .state import ControllerHooks, ControllerState

#: Completion DW0 bit 0: the command was not aborted.
NOT_ABORTED = 1


def abort(state: ControllerState, hooks: ControllerHooks, sq: SubmissionQueue, e: tuple) -> int:
    """We never abort: a command is either done already or past the point of recall (its
    backend call is running), so DW0 bit 0 says "not aborted" (which the spec allows)."""
    sqid = e[CDW10] & 0xFFFF
    if sqid not in state.sqs:
        raise NvmeError(Status.INVALID_FIELD, f"abort on SQ {sqid} which does not exist")
    return NOT_ABORTED
