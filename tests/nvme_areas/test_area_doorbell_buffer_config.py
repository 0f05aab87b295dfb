"""Doorbell Buffer Config (7Ch) in-process: alignment, seeding the shadow with the doorbell
values the controller knows, and the queue event that moves the doorbell paths."""

from __future__ import annotations

import struct

from .area_helpers import BUF, Area, status_of

from nvme_emu.dbbuf import doorbell_buffer_config
from nvme_emu.queue import CompletionQueue, QueueEvent, SubmissionQueue
from nvme_emu.spec.commands import AdminOpcode, Status

SHADOW, EVENTIDX = BUF, BUF + 4096


def config(area: Area, shadow: int = SHADOW, eventidx: int = EVENTIDX) -> int:
    return area.run(doorbell_buffer_config, opc=AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=shadow, prp2=eventidx)


def test_seeds_io_queue_values_and_announces(area: Area):
    cq = CompletionQueue(1, BUF + 0x10000, 16, vector=1, irq_enabled=True)
    sq = SubmissionQueue(1, BUF + 0x20000, 16, cq)
    area.state.cqs[1], area.state.sqs[1] = cq, sq
    sq.tail, cq.head = 5, 3
    assert config(area) == 0
    assert area.state.dbbuf is not None
    # slot 2*qid: SQ tail, 2*qid+1: CQ head (4-byte slots, DSTRD 0); the admin pair is not shadowed
    assert struct.unpack_from("<4I", area.guest.read(SHADOW, 16)) == (0, 0, 5, 3)
    assert struct.unpack_from("<4I", area.guest.read(EVENTIDX, 16)) == (0, 0, 5, 3)
    assert area.record.named("queue_event") == [(QueueEvent.DBBUF, 0)]


def test_reads_the_host_shadow_after_config(area: Area):
    config(area)
    area.guest.write(SHADOW + 8, struct.pack("<II", 7, 2))
    assert (area.state.dbbuf.sq_tail(1), area.state.dbbuf.cq_head(1)) == (7, 2)


def test_buffers_must_be_page_aligned_and_mapped(area: Area):
    assert status_of(lambda: config(area, shadow=SHADOW + 4)) == Status.INVALID_FIELD
    assert status_of(lambda: config(area, eventidx=0)) == Status.INVALID_FIELD
    assert status_of(lambda: config(area, shadow=0x10_0000_0000)) == Status.DATA_TRANSFER_ERROR
    assert area.state.dbbuf is None and area.record.named("queue_event") == []
