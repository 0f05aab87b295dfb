"""Asynchronous events in-process: AER limit, delivery, masking until the log is read."""

from __future__ import annotations

from .area_helpers import BUF, Area, status_of

from nvme_emu.async_event import (
    MAX_QUEUED_EVENTS,
    async_event_request,
    deliver_events,
    doorbell_error,
    namespace_changed,
    post_event,
)
from nvme_emu.log_page import get_log_page
from nvme_emu.spec.commands import AdminOpcode, Status
from nvme_emu.spec.events import AsyncEventConfig, AsyncEventError, AsyncEventNotice, AsyncEventType, async_event_dw0
from nvme_emu.spec.log_pages import LogPageId
from nvme_emu.outcome import DEFERRED

ERROR_EVENT = (AsyncEventType.ERROR, AsyncEventError.INVALID_DOORBELL_WRITE_VALUE, LogPageId.ERROR_INFORMATION)


def aer(area: Area, cid: int):
    result = area.run(async_event_request, opc=AdminOpcode.ASYNC_EVENT_REQUEST, cid=cid)
    area.record.run_soon()  # the loop delivers after the batch
    return result


def test_aer_waits_for_an_event(area: Area):
    assert aer(area, 7) is DEFERRED
    assert area.record.named("complete") == []
    post_event(area.state, area.hooks, *ERROR_EVENT)
    assert area.record.named("complete") == [(0, 7, Status.SUCCESS, async_event_dw0(*ERROR_EVENT))]


def test_completion_dw0_layout():
    # type in bits 2:0, information in 15:8, log page in 23:16
    assert async_event_dw0(AsyncEventType.NOTICE, 0x00, LogPageId.CHANGED_NAMESPACE_LIST) == 0x04_00_02
    assert async_event_dw0(AsyncEventType.ERROR, 0x01, LogPageId.ERROR_INFORMATION) == 0x01_01_00


def test_event_before_any_aer_is_kept(area: Area):
    post_event(area.state, area.hooks, *ERROR_EVENT)
    assert list(area.state.events.queued) == [ERROR_EVENT]
    aer(area, 3)
    assert area.record.named("complete")[0][1] == 3
    assert list(area.state.events.queued) == []


def test_aer_limit_exceeded(area: Area):
    for cid in range(area.state.config.aerl + 1):
        assert aer(area, cid) is DEFERRED
    assert status_of(lambda: aer(area, 99)) == Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED


def test_type_masked_until_its_log_page_is_read(area: Area):
    aer(area, 1)
    aer(area, 2)
    post_event(area.state, area.hooks, *ERROR_EVENT)
    post_event(area.state, area.hooks, *ERROR_EVENT)
    assert len(area.record.named("complete")) == 1  # the second waits: its type is masked
    area.run(get_log_page, opc=AdminOpcode.GET_LOG_PAGE, prp1=BUF, cdw10=LogPageId.ERROR_INFORMATION | 15 << 16)
    assert [c[1] for c in area.record.named("complete")] == [1, 2]


def test_rae_keeps_the_type_masked(area: Area):
    aer(area, 1)
    aer(area, 2)
    post_event(area.state, area.hooks, *ERROR_EVENT)
    post_event(area.state, area.hooks, *ERROR_EVENT)
    area.run(get_log_page, opc=AdminOpcode.GET_LOG_PAGE, prp1=BUF, cdw10=LogPageId.ERROR_INFORMATION | 1 << 15 | 15 << 16)
    assert len(area.record.named("complete")) == 1


def test_full_admin_cq_keeps_aer_and_event(area: Area):
    aer(area, 4)
    area.record.complete_result = False
    post_event(area.state, area.hooks, *ERROR_EVENT)
    assert list(area.state.events.aer_cids) == [4] and list(area.state.events.queued) == [ERROR_EVENT]
    area.record.complete_result = True
    deliver_events(area.state, area.hooks)  # the controller calls this when the CQ has room
    assert area.record.named("complete")[-1][1] == 4 and not area.state.events.queued


def test_namespace_changed_notice_only_when_enabled(area: Area):
    namespace_changed(area.state, area.hooks, 1)
    assert area.state.events.changed_nsids == {1}
    assert area.record.named("async_event") == []
    area.state.features.async_event_config = AsyncEventConfig.NAMESPACE_ATTRIBUTE
    namespace_changed(area.state, area.hooks, 1)
    assert area.record.named("async_event") == [(AsyncEventType.NOTICE, AsyncEventNotice.NAMESPACE_ATTRIBUTE_CHANGED, LogPageId.CHANGED_NAMESPACE_LIST)]


def test_reset_drops_aers_but_keeps_changed_list(area: Area):
    aer(area, 1)
    area.state.events.changed_nsids.add(1)
    area.state.events.reset()
    assert not area.state.events.aer_cids and area.state.events.changed_nsids == {1}


def test_events_waiting_while_masked_are_bounded(area: Area):
    aer(area, 1)
    post_event(area.state, area.hooks, *ERROR_EVENT)  # delivered: the Error type is now masked
    for _ in range(10_000):  # a host that never reads the Error log, and a guest that keeps erring
        post_event(area.state, area.hooks, *ERROR_EVENT)
    assert list(area.state.events.queued) == [ERROR_EVENT]  # the same event waits once
    for info in range(256):
        post_event(area.state, area.hooks, AsyncEventType.ERROR, info, LogPageId.ERROR_INFORMATION)
    assert len(area.state.events.queued) == MAX_QUEUED_EVENTS


def test_doorbell_error_adds_an_error_information_entry(area: Area):
    doorbell_error(area.state, area.hooks, AsyncEventError.INVALID_DOORBELL_WRITE_VALUE, 3)
    doorbell_error(area.state, area.hooks, AsyncEventError.INVALID_DOORBELL_REGISTER)  # a CQ's
    newest, older = area.state.error_log.entries[0], area.state.error_log.entries[1]
    assert (older["sqid"], older["cid"], older["error_count"]) == (3, 0xFFFF, 1)
    assert (newest["sqid"], newest["cid"], newest["error_count"]) == (0xFFFF, 0xFFFF, 2)
    assert area.record.named("async_event") == [
        ERROR_EVENT,
        (AsyncEventType.ERROR, AsyncEventError.INVALID_DOORBELL_REGISTER, LogPageId.ERROR_INFORMATION),
    ]
