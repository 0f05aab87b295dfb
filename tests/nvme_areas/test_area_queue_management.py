"""Create/Delete I/O SQ and CQ (01h, 05h, 00h, 04h) in-process: the statuses the spec
names for each bad field, the queue objects made, and the queue events announced."""

from __future__ import annotations

import pytest
from .area_helpers import BUF, Area, status_of

from nvme_emu.queue import QueueEvent
from nvme_emu.queue_management import create_io_cq, create_io_sq, delete_io_cq, delete_io_sq
from nvme_emu.spec.commands import AdminOpcode, Status
from nvme_emu.spec.registers import Cc
from nvme_emu.outcome import DEFERRED

CQ_BASE, SQ_BASE = BUF, BUF + 0x10000


def make_cq(area: Area, qid: int = 1, size: int = 16, *, base: int = CQ_BASE, iv: int = 1, flags: int = 0b11) -> int:
    return area.run(create_io_cq, opc=AdminOpcode.CREATE_IO_CQ, prp1=base, cdw10=(size - 1) << 16 | qid, cdw11=iv << 16 | flags)


def make_sq(area: Area, qid: int = 1, cqid: int = 1, size: int = 16, *, base: int = SQ_BASE, flags: int = 0b1) -> int:
    return area.run(create_io_sq, opc=AdminOpcode.CREATE_IO_SQ, prp1=base, cdw10=(size - 1) << 16 | qid, cdw11=cqid << 16 | flags)


def delete(area: Area, handler, qid: int, cid: int = 1):
    opc = AdminOpcode.DELETE_IO_SQ if handler is delete_io_sq else AdminOpcode.DELETE_IO_CQ
    return area.run(handler, opc=opc, cid=cid, cdw10=qid)


def test_create_pair_announces_queues(area: Area):
    make_cq(area)
    make_sq(area)
    cq, sq = area.state.cqs[1], area.state.sqs[1]
    assert (cq.size, cq.vector, cq.irq_enabled) == (16, 1, True)
    assert sq.cq is cq and cq.sqs == {1}
    assert area.record.named("queue_event") == [(QueueEvent.CREATE_CQ, 1), (QueueEvent.CREATE_SQ, 1)]


@pytest.mark.parametrize(
    "kwargs, status",
    [
        (dict(qid=0), Status.INVALID_QUEUE_IDENTIFIER),
        (dict(qid=65), Status.INVALID_QUEUE_IDENTIFIER),  # above Number of Queues
        (dict(size=1), Status.INVALID_QUEUE_SIZE),
        (dict(size=4097), Status.INVALID_QUEUE_SIZE),
        (dict(flags=0b10), Status.INVALID_FIELD),  # not physically contiguous
        (dict(iv=65), Status.INVALID_INTERRUPT_VECTOR),
        (dict(base=CQ_BASE + 512), Status.INVALID_PRP_OFFSET),
        (dict(base=0x10_0000_0000), Status.DATA_TRANSFER_ERROR),
    ],
)
def test_create_cq_failures(area: Area, kwargs, status):
    assert status_of(lambda: make_cq(area, **kwargs)) == status
    assert 1 not in area.state.cqs and area.record.named("queue_event") == []


def test_create_cq_twice(area: Area):
    make_cq(area)
    assert status_of(lambda: make_cq(area)) == Status.INVALID_QUEUE_IDENTIFIER


def test_entry_sizes_must_be_configured(area: Area):
    area.state.cc = Cc.EN
    assert status_of(lambda: make_cq(area)) == Status.INVALID_FIELD
    area.state.cc = Cc.EN | 4 << Cc.IOCQES_SHIFT
    make_cq(area)
    assert status_of(lambda: make_sq(area)) == Status.INVALID_FIELD


def test_create_sq_needs_an_io_cq(area: Area):
    assert status_of(lambda: make_sq(area, cqid=1)) == Status.COMPLETION_QUEUE_INVALID
    assert status_of(lambda: make_sq(area, cqid=0)) == Status.COMPLETION_QUEUE_INVALID
    make_cq(area)
    make_sq(area)
    assert status_of(lambda: make_sq(area)) == Status.INVALID_QUEUE_IDENTIFIER


def test_delete_cq_with_sq_is_invalid_deletion(area: Area):
    make_cq(area)
    make_sq(area)
    assert status_of(lambda: delete(area, delete_io_cq, 1)) == Status.INVALID_QUEUE_DELETION
    assert delete(area, delete_io_sq, 1) == 0
    assert delete(area, delete_io_cq, 1) == 0
    assert area.state.sqs.keys() == area.state.cqs.keys() == {0}
    assert area.record.named("queue_event")[-2:] == [(QueueEvent.DELETE_SQ, 1), (QueueEvent.DELETE_CQ, 1)]


def test_delete_missing_or_admin_queue(area: Area):
    for handler in (delete_io_sq, delete_io_cq):
        assert status_of(lambda handler=handler: delete(area, handler, 0)) == Status.INVALID_QUEUE_IDENTIFIER
        assert status_of(lambda handler=handler: delete(area, handler, 3)) == Status.INVALID_QUEUE_IDENTIFIER


def test_delete_sq_with_commands_in_flight_completes_after_them(area: Area):
    make_cq(area)
    make_sq(area)
    victim = area.state.sqs[1]
    victim.outstanding = 1
    assert delete(area, delete_io_sq, 1, cid=9) is DEFERRED
    assert 1 not in area.state.sqs  # no more fetches for it
    assert area.record.named("begin_request") == [(area.admin_sq,)]
    assert area.record.named("finish_request") == []
    victim.outstanding = 0
    victim.on_idle()  # the last command in flight was posted
    assert area.record.named("finish_request") == [(area.admin_sq, 9, Status.SUCCESS)]
    assert (QueueEvent.DELETE_SQ, 1) in area.record.named("queue_event")
