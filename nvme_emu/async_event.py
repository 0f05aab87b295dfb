"""Asynchronous events: Asynchronous Event Request (admin opcode 0Ch), the events that
complete them, and the masking until the host reads the event's log page.

An AER completes only when an event arrives; an event whose type was reported and not yet
acknowledged (its log page read with RAE clear) waits, as do events with no AER outstanding.
"""

from __future__ import annotations

import logging
from collections import deque

from .queue import SubmissionQueue
from .spec.commands import NvmeError, Status
from .spec.events import AsyncEventConfig, AsyncEventNotice, AsyncEventType, async_event_dw0
from .spec.log_pages import ERROR_LOG_NOT_SPECIFIC, LogPageId
from .sqe import CID
from .outcome import DEFERRED
from .state import ControllerHooks, ControllerState

log = logging.getLogger(__name__)

#: Events kept while their type is masked or no AER is outstanding. Each distinct (type,
#: info, log page) is kept once (reading its log page covers every occurrence), and no more
#: than this many in all, so a host that never reads the log cannot make the list grow.
MAX_QUEUED_EVENTS = 16

#: The event type a log page acknowledges when read with RAE clear.
ACKNOWLEDGED_BY_LOG: dict[int, AsyncEventType] = {
    LogPageId.ERROR_INFORMATION: AsyncEventType.ERROR,
    LogPageId.SMART_HEALTH: AsyncEventType.SMART_HEALTH,
    LogPageId.CHANGED_NAMESPACE_LIST: AsyncEventType.NOTICE,
    LogPageId.LBA_STATUS_INFORMATION: AsyncEventType.NOTICE,
    LogPageId.CHANGED_ZONE_LIST: AsyncEventType.NOTICE,  # Zone Descriptor Changed (ZNS 1.1)
}


def async_event_request(state: ControllerState, hooks: ControllerHooks, sq: SubmissionQueue, e: tuple):
    """Hold the command until an event completes it (up to AERL + 1 outstanding)."""
    if len(state.events.aer_cids) > state.config.aerl:
        raise NvmeError(Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED, "too many AERs outstanding", dnr=True)
    state.events.aer_cids.append(e[CID])
    hooks.call_soon(lambda: deliver_events(state, hooks))
    return DEFERRED


def post_event(state: ControllerState, hooks: ControllerHooks, event_type: int, info: int, log_page: int) -> None:
    """Queue an event (unless the same one already waits, or the queue is full); it
    completes an outstanding AER unless its type is masked."""
    queued = state.events.queued
    event = (event_type, info, log_page)
    if event in queued:
        log.debug("asynchronous event type %d info %#x already pending", event_type, info)
    elif len(queued) >= MAX_QUEUED_EVENTS:
        log.warning("asynchronous event type %d info %#x dropped: %d events pending", event_type, info, len(queued))
    else:
        queued.append(event)
        log.info("asynchronous event type %d info %#x (log %#x)", event_type, info, log_page)
    deliver_events(state, hooks)


def doorbell_error(state: ControllerState, hooks: ControllerHooks, info: int, sqid: int = ERROR_LOG_NOT_SPECIFIC) -> None:
    """An invalid doorbell write: an Error Information entry (no command: CID FFFFh; SQID of
    an SQ doorbell, FFFFh for a CQ's) that the Error event points the host to, then the event."""
    state.error_log.add(sqid=sqid, cid=ERROR_LOG_NOT_SPECIFIC, status_field=0, nsid=0, lba=0)
    hooks.async_event(AsyncEventType.ERROR, info, LogPageId.ERROR_INFORMATION)


def deliver_events(state: ControllerState, hooks: ControllerHooks) -> None:
    """Complete outstanding AERs with queued events (again after the admin CQ had no room)."""
    ev_state = state.events
    kept: deque[tuple[int, int, int]] = deque()
    while ev_state.queued:
        ev = ev_state.queued.popleft()
        if ev[0] in ev_state.masked_types or not ev_state.aer_cids:
            kept.append(ev)
            continue
        cid = ev_state.aer_cids.popleft()
        if not hooks.complete(0, cid, Status.SUCCESS, async_event_dw0(*ev)):
            ev_state.aer_cids.appendleft(cid)
            kept.append(ev)
            break
        ev_state.masked_types.add(ev[0])
    kept.extend(ev_state.queued)
    ev_state.queued = kept


def acknowledge(state: ControllerState, hooks: ControllerHooks, lid: int) -> None:
    """Reading a log page with RAE clear re-enables its event type."""
    etype = ACKNOWLEDGED_BY_LOG.get(lid)
    if etype is not None and etype in state.events.masked_types:
        state.events.masked_types.discard(etype)
        deliver_events(state, hooks)


def namespace_changed(state: ControllerState, hooks: ControllerHooks, nsid: int) -> None:
    """Add ``nsid`` to the Changed Namespace List; a notice if the host enabled it."""
    state.events.changed_nsids.add(nsid)
    if state.features.async_event_config & AsyncEventConfig.NAMESPACE_ATTRIBUTE:
        hooks.async_event(AsyncEventType.NOTICE, AsyncEventNotice.NAMESPACE_ATTRIBUTE_CHANGED, LogPageId.CHANGED_NAMESPACE_LIST)
