"""Completions on their own: :class:`nvme_emu.completions.Completions` over a bare state and
real memfd guest memory, with hooks that record what it reports upward ("memory gone", "room
again"). No controller: the one CQE poster and the interrupts, checked in the guest's bytes."""

from __future__ import annotations

import struct

import pytest

from .area_helpers import BUF, PAGE, Guest
from nvme_emu.completions import CompletionHooks, Completions
from nvme_emu.queue import CompletionQueue, SubmissionQueue
from nvme_emu.spec.commands import CQE_SIZE, Status
from nvme_emu.state import ControllerConfig, ControllerState

CQ1, CQ2, SQ1, SQ2 = BUF, BUF + PAGE, BUF + 2 * PAGE, BUF + 3 * PAGE


class Rig:
    def __init__(self) -> None:
        self.guest = Guest()
        self.state = ControllerState.of([], ControllerConfig())
        self.state.memory = self.guest.memory
        self.soon: list = []
        self.gone: list[str] = []
        self.room: list[int] = []
        self.irqs: list[int] = []
        self.cq_heads: list[tuple[int, int]] = []
        hooks = CompletionHooks(
            accept_cq_head=self._accept,
            memory_gone=self.gone.append,
            room_again=lambda cq: self.room.append(cq.qid),
            call_soon=self.soon.append,
        )
        self.completions = Completions(self.state, hooks)
        self.completions.attach(lambda vector: self.irqs.append(vector) or True, None)

    def _accept(self, cq: CompletionQueue, value: int) -> bool:
        self.cq_heads.append((cq.qid, value))
        cq.set_head(value)
        return True

    def queue_pair(self, qid: int, cq_base: int, sq_base: int, *, vector: int, size: int = 8) -> SubmissionQueue:
        cq = CompletionQueue(qid, cq_base, size, vector=vector, irq_enabled=True)
        sq = SubmissionQueue(qid, sq_base, size, cq)
        cq.sqs.add(qid)
        self.state.cqs[qid], self.state.sqs[qid] = cq, sq
        return sq

    def cqe(self, base: int, slot: int) -> tuple[int, int, int, int, int]:
        """(dw0, sqhd, sqid, cid, status|phase) of a CQE as the guest reads it."""
        dw0, _dw1, sqhd, sqid, cid, sf = struct.unpack("<IIHHHH", self.guest.read(base + slot * CQE_SIZE, CQE_SIZE))
        return dw0, sqhd, sqid, cid, sf

    def run_soon(self) -> None:
        pending, self.soon[:] = list(self.soon), []
        for fn in pending:
            fn()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.guest.close()


def test_requests_post_at_one_drain_in_order_and_report_room(rig):
    sq = rig.queue_pair(1, CQ1, SQ1, vector=1)
    for _ in range(3):
        rig.completions.begin_request(sq)
    assert sq.cq.reserved == 3 and sq.cq.room == 8 - 1 - 3
    rig.completions.finish_request(sq, 7, Status.SUCCESS, 0xAB)
    rig.completions.finish_request(sq, 8, Status.INVALID_FIELD)
    assert len(rig.soon) == 1  # one drain per loop turn, however many finish
    sq.head = 5
    rig.run_soon()
    assert rig.cqe(CQ1, 0) == (0xAB, 5, 1, 7, Status.SUCCESS << 1 | 1)
    assert rig.cqe(CQ1, 1) == (0, 5, 1, 8, Status.INVALID_FIELD << 1 | 1)
    assert sq.cq.reserved == 1 and sq.outstanding == 1
    assert rig.irqs == [1] and rig.room == [1]


def test_cqs_sharing_a_vector_get_one_interrupt_per_drain(rig):
    a = rig.queue_pair(1, CQ1, SQ1, vector=3)
    b = rig.queue_pair(2, CQ2, SQ2, vector=3)
    for sq in (a, b):
        rig.completions.begin_request(sq)
        rig.completions.finish_request(sq, 1, Status.SUCCESS)
    rig.run_soon()
    assert rig.irqs == [3]
    assert sorted(rig.room) == [1, 2]


def test_bus_master_clear_holds_posting_and_deferred_completions(rig):
    sq = rig.queue_pair(1, CQ1, SQ1, vector=1)
    rig.state.bus_master = False
    rig.completions.begin_request(sq)
    rig.completions.finish_request(sq, 4, Status.SUCCESS)
    rig.run_soon()
    assert rig.cqe(CQ1, 0) == (0, 0, 0, 0, 0) and rig.irqs == []
    assert rig.completions.complete(1, 5, Status.SUCCESS) is False
    rig.state.bus_master = True
    rig.completions.drain()
    assert rig.cqe(CQ1, 0)[3] == 4 and rig.irqs == [1]


def test_cq_outside_guest_memory_reports_memory_gone_and_posts_nothing(rig):
    sq = rig.queue_pair(1, 1 << 40, SQ1, vector=1)  # the CQ's IOVA is mapped nowhere
    rig.completions.begin_request(sq)
    rig.completions.finish_request(sq, 1, Status.SUCCESS)
    rig.run_soon()
    assert len(rig.gone) == 1 and "queue 1" in rig.gone[0]
    assert rig.irqs == [] and rig.room == []


def test_deferred_completion_waits_for_room_the_host_made(rig):
    rig.queue_pair(0, CQ1, SQ1, vector=0, size=2)
    assert rig.completions.complete(0, 1, Status.SUCCESS) is True
    assert rig.completions.complete(0, 2, Status.SUCCESS) is False  # one slot is always empty

    class Source:
        def peek_cq_head(self, qid: int) -> int | None:
            return 1

        def arm_cq_head(self, qid: int) -> None:
            raise AssertionError("room was found: nothing to arm")

    rig.completions.cq_head_source = Source()
    assert rig.completions.complete(0, 2, Status.SUCCESS) is True
    assert rig.cq_heads == [(0, 1)]
    assert rig.cqe(CQ1, 1)[3] == 2 and rig.irqs == [0, 0]


def test_a_full_cq_arms_the_doorbell_path(rig):
    sq = rig.queue_pair(1, CQ1, SQ1, vector=1, size=2)
    armed: list[int] = []

    class Source:
        def peek_cq_head(self, qid: int) -> int | None:
            return None

        def arm_cq_head(self, qid: int) -> None:
            armed.append(qid)

    rig.completions.cq_head_source = Source()
    sq.cq.post(rig.guest.memory, 0, 0, 0, 1, 1, Status.SUCCESS)
    assert rig.completions.refresh_cq_head(sq.cq) is False
    assert armed == [1]


def test_intms_unmask_while_bme_clear_is_delivered_when_dma_resumes(rig):
    sq = rig.queue_pair(1, CQ1, SQ1, vector=2)
    sq.cq.post(rig.guest.memory, 0, 0, 0, 1, 1, Status.SUCCESS)
    rig.state.bus_master = False
    rig.completions.signal_all()
    assert rig.irqs == []
    rig.state.bus_master = True
    rig.completions.dma_resumed()
    assert rig.irqs == [2, 2]  # the coalescing flush, then the held unmask's re-check
