"""LBA status: Get LBA Status (admin opcode 86h), the LBA Status Information log (0Eh) and
its asynchronous event, the LBA Status Information Alert.

What is reported as tracked potentially unrecoverable LBAs: the marks Write Uncorrectable
left on a namespace (:attr:`Namespace.uncorrectable <nvme_emu.namespace.Namespace>`) and
the ranges of the fault injector's media-error faults that fail reads
(:class:`~nvme_emu.lba_ranges.LbaStatusState`). The controller knows of no other bad LBA,
so a scan (Action Type 10h) finds exactly the tracked ones: nothing is ever untracked
(ESTULB 0).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Iterator

from .lba_ranges import LbaRanges
from .spec.commands import NvmeError, Status
from .spec.events import AsyncEventConfig, AsyncEventNotice, AsyncEventType
from .spec.log_pages import (
    LBA_STATUS_DESCRIPTOR_SIZE,
    LBA_STATUS_LIST_HEADER_SIZE,
    LBA_STATUS_LOG_ELEMENT_SIZE,
    LBA_STATUS_LOG_HEADER_SIZE,
    LBA_STATUS_LOG_RANGE_SIZE,
    LbaStatusAction,
    LbaStatusCompletion,
    LogPageId,
)
from .sqe import CDW12, CDW13, NSID, starting_lba
from .state import ControllerHooks, ControllerState
from .transfer import to_host

if TYPE_CHECKING:
    from .namespace import Namespace
    from .queue import SubmissionQueue

LIST_HEADER = struct.Struct("<IB3x")  # NLSD, CMPC
DESCRIPTOR = struct.Struct("<QIxB2x")  # DSLBA, NLB, Status
LOG_HEADER = struct.Struct("<III2xH")  # LSLPLEN, NLSLNE, ESTULB, LSGC
LOG_ELEMENT = struct.Struct("<IIB7x")  # NEID, NLRD, RATYPE
LOG_RANGE = struct.Struct("<QI4x")  # RSLBA, RNLB
assert (LIST_HEADER.size, DESCRIPTOR.size) == (LBA_STATUS_LIST_HEADER_SIZE, LBA_STATUS_DESCRIPTOR_SIZE)
assert (LOG_HEADER.size, LOG_ELEMENT.size, LOG_RANGE.size) == (LBA_STATUS_LOG_HEADER_SIZE, LBA_STATUS_LOG_ELEMENT_SIZE, LBA_STATUS_LOG_RANGE_SIZE)
#: A descriptor's NLB is 32 bits: a longer range is reported in pieces.
MAX_DESCRIPTOR_NLB = 0xFFFF_FFFF
#: The Action Types served; 02h (tracked allocated LBAs) needs allocated-LBA tracking.
SERVED_ACTIONS = frozenset({LbaStatusAction.SCAN_UNTRACKED_AND_TRACKED, LbaStatusAction.TRACKED})
#: What the log recommends a host use for our ranges: they are all tracked.
RECOMMENDED_ACTION = LbaStatusAction.TRACKED
#: Descriptor Status for Action Types 10h/11h (the field has meaning for 02h only).
DESCRIPTOR_STATUS = 0


def lba_status_changed(state: ControllerState, hooks: ControllerHooks, *, added: bool) -> None:
    """The tracked LBAs changed: a new LSGC; new ones raise the LBA Status Information Alert
    when the host enabled it (Asynchronous Event Configuration bit 13)."""
    state.lba_status.changed()
    if added and state.features.async_event_config & AsyncEventConfig.LBA_STATUS:
        hooks.async_event(AsyncEventType.NOTICE, AsyncEventNotice.LBA_STATUS_INFORMATION_ALERT, LogPageId.LBA_STATUS_INFORMATION)


def tracked_ranges(state: ControllerState, ns: "Namespace") -> LbaRanges:
    """The namespace's tracked potentially unrecoverable LBAs: its marks and the media-error
    faults on it (a fault for every namespace, or to the end, cut to this one's size)."""
    ranges = ns.uncorrectable.copy()
    nsze = ns.nsze
    for nsid, slba, nlb in state.lba_status.fault_ranges.values():
        if nsid in (0, ns.nsid) and slba < nsze:
            ranges.add(slba, min(nlb or nsze, nsze - slba))
    return ranges


# -- Get LBA Status -------------------------------------------------------------------------


def get_lba_status(state: ControllerState, hooks: ControllerHooks, sq: "SubmissionQueue", e: tuple) -> int:
    """The LBA Status Descriptor List of [SLBA, SLBA + RL), as much as MNDW + 1 dwords hold."""
    ns = state.active_namespace(e[NSID])  # 0h and FFFFFFFFh included: Invalid Namespace or Format
    slba, mndw = starting_lba(e), e[CDW12]
    atype, rl = e[CDW13] >> 24, e[CDW13] & 0xFFFF
    if atype not in SERVED_ACTIONS:
        raise NvmeError(Status.INVALID_FIELD, f"Get LBA Status action type {atype:#x}")
    if slba >= ns.nsze:
        raise NvmeError(Status.LBA_OUT_OF_RANGE, f"SLBA {slba} beyond namespace {ns.nsid}")
    end = ns.nsze if rl == 0 else min(ns.nsze, slba + rl)  # RL 0h: to the last LBA
    found = list(_descriptors(tracked_ranges(state, ns), slba, end - slba))
    room = ((mndw + 1) * 4 - LBA_STATUS_LIST_HEADER_SIZE) // LBA_STATUS_DESCRIPTOR_SIZE
    room = min(room, (state.config.max_transfer - LBA_STATUS_LIST_HEADER_SIZE) // LBA_STATUS_DESCRIPTOR_SIZE)
    shown = found[: max(room, 0)]
    cmpc = LbaStatusCompletion.RANGE_DONE if len(shown) == len(found) else LbaStatusCompletion.MNDW_REACHED
    data = LIST_HEADER.pack(len(shown), cmpc) + b"".join(DESCRIPTOR.pack(s, n, DESCRIPTOR_STATUS) for s, n in shown)
    to_host(state, e, data, min(len(data), (mndw + 1) * 4))  # never past MNDW
    return 0


def _descriptors(ranges: LbaRanges, slba: int, nlb: int) -> Iterator[tuple[int, int]]:
    for start, n in ranges.within(slba, nlb):
        while n:
            piece = min(n, MAX_DESCRIPTOR_NLB)
            yield start, piece
            start, n = start + piece, n - piece


# -- the LBA Status Information log ---------------------------------------------------------


def lba_status_log(state: ControllerState) -> bytes:
    """One namespace element per active namespace with tracked LBAs, in NSID order, each
    with its ranges (RATYPE 11h: they are tracked)."""
    elements = []
    for nsid in sorted(state.namespaces):
        ranges = list(_descriptors(tracked_ranges(state, state.namespaces[nsid]), 0, state.namespaces[nsid].nsze))
        if ranges:
            body = b"".join(LOG_RANGE.pack(s, n) for s, n in ranges)
            elements.append(LOG_ELEMENT.pack(nsid, len(ranges), RECOMMENDED_ACTION) + body)
    length = LOG_HEADER.size + sum(len(x) for x in elements)
    return LOG_HEADER.pack(length, len(elements), 0, state.lba_status.generation) + b"".join(elements)
