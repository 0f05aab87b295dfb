"""Create and Delete I/O Submission and Completion Queues (admin opcodes 00h, 01h, 04h, 05h).

Every change is announced through ``hooks.queue_event`` (:class:`~nvme_emu.queue.QueueEvent`
CREATE_CQ, CREATE_SQ, DELETE_SQ, DELETE_CQ), so doorbell paths and coalescing timers follow
the queues.
"""

from __future__ import annotations

from .features import io_queue_limit
from .queue import CompletionQueue, QueueEvent, SubmissionQueue
from .spec.commands import CQES_LOG2, CQE_SIZE, SQES_LOG2, SQE_SIZE, NvmeError, Status
from .spec.registers import Cc
from .sqe import CDW10, CDW11, CID, PRP1
from .outcome import DEFERRED
from .state import ControllerHooks, ControllerState


def create_io_cq(state: ControllerState, hooks: ControllerHooks, sq: SubmissionQueue, e: tuple) -> int:
    """A physically contiguous CQ at PRP1, interrupting on vector IV when IEN is set."""
    qid, qsize = e[CDW10] & 0xFFFF, (e[CDW10] >> 16) + 1
    pc, ien, iv = e[CDW11] & 1, bool(e[CDW11] & 2), e[CDW11] >> 16
    _nsq, ncq = io_queue_limit(state)
    _check_io_qid(qid, ncq)
    if qid in state.cqs:
        raise NvmeError(Status.INVALID_QUEUE_IDENTIFIER, f"CQ {qid} exists")
    _check_qsize(state, qsize)
    _check_contiguous(pc)
    if (state.cc >> Cc.IOCQES_SHIFT) & Cc.IOCQES_MASK != CQES_LOG2:
        raise NvmeError(Status.INVALID_FIELD, "CC.IOCQES is not 4 (16-byte CQEs)")
    if iv >= state.config.msix_vectors:
        raise NvmeError(Status.INVALID_INTERRUPT_VECTOR, f"vector {iv}")
    _check_base(state, e[PRP1], qsize, CQE_SIZE)
    state.cqs[qid] = CompletionQueue(qid, e[PRP1], qsize, vector=iv, irq_enabled=ien)
    hooks.queue_event(QueueEvent.CREATE_CQ, qid)
    return 0


def create_io_sq(state: ControllerState, hooks: ControllerHooks, sq: SubmissionQueue, e: tuple) -> int:
    """A physically contiguous SQ at PRP1 whose completions go to an existing I/O CQ."""
    qid, qsize = e[CDW10] & 0xFFFF, (e[CDW10] >> 16) + 1
    # QPRIO (CDW11 bits 2:1) matters only under weighted round robin arbitration, which
    # CAP.AMS does not offer: every SQ is served round robin, whatever its priority says.
    pc, cqid = e[CDW11] & 1, e[CDW11] >> 16
    nsq, _ncq = io_queue_limit(state)
    _check_io_qid(qid, nsq)
    if qid in state.sqs:
        raise NvmeError(Status.INVALID_QUEUE_IDENTIFIER, f"SQ {qid} exists")
    if _deletion_pending(state, qid):
        raise NvmeError(Status.INVALID_QUEUE_IDENTIFIER, f"SQ {qid} is still being deleted")
    if cqid == 0 or cqid not in state.cqs:
        raise NvmeError(Status.COMPLETION_QUEUE_INVALID, f"CQ {cqid} does not exist")
    _check_qsize(state, qsize)
    _check_contiguous(pc)
    if (state.cc >> Cc.IOSQES_SHIFT) & Cc.IOSQES_MASK != SQES_LOG2:
        raise NvmeError(Status.INVALID_FIELD, "CC.IOSQES is not 6 (64-byte SQEs)")
    _check_base(state, e[PRP1], qsize, SQE_SIZE)
    cq = state.cqs[cqid]
    state.sqs[qid] = SubmissionQueue(qid, e[PRP1], qsize, cq)
    cq.sqs.add(qid)
    hooks.queue_event(QueueEvent.CREATE_SQ, qid)
    return 0


def delete_io_sq(state: ControllerState, hooks: ControllerHooks, sq: SubmissionQueue, e: tuple):
    """Delete an I/O SQ; with commands still in flight it completes after them."""
    qid = e[CDW10] & 0xFFFF
    if qid == 0 or qid not in state.sqs:
        raise NvmeError(Status.INVALID_QUEUE_IDENTIFIER, f"SQ {qid} does not exist")
    victim = state.sqs.pop(qid)  # no more doorbells or fetches for it
    victim.ring.drop()
    if not victim.outstanding:
        _finish_delete_sq(hooks, victim)
        return 0
    # Commands in flight cannot be recalled from a worker thread: they complete (and
    # post) first, then the deletion completes, so no buffer the host frees after it
    # is ever written again.
    cid = e[CID]
    hooks.begin_request(sq)

    def idle() -> None:
        if sq.live:  # else a reset took every queue away already
            _finish_delete_sq(hooks, victim)
            hooks.finish_request(sq, cid, Status.SUCCESS)

    victim.on_idle = idle
    return DEFERRED


def _deletion_pending(state: ControllerState, qid: int) -> bool:
    """Is SQ ``qid`` deleted but still waiting for its commands? Its identifier is in use
    until then (Create I/O SQ gets Invalid Queue Identifier): a new SQ of the same ID would
    share the CQ's attachment with it, and the old deletion would detach the new queue."""
    return any(qid in cq.sqs for cq in state.cqs.values())


def _finish_delete_sq(hooks: ControllerHooks, victim: SubmissionQueue) -> None:
    """The SQ is gone: only now does its CQ stop counting it (Delete I/O CQ got Invalid
    Queue Deletion until here, so the deferred CQEs still had a ring to go to)."""
    victim.cq.sqs.discard(victim.qid)
    hooks.queue_event(QueueEvent.DELETE_SQ, victim.qid)


def delete_io_cq(state: ControllerState, hooks: ControllerHooks, sq: SubmissionQueue, e: tuple) -> int:
    """Delete an I/O CQ that no SQ uses any more."""
    qid = e[CDW10] & 0xFFFF
    if qid == 0 or qid not in state.cqs:
        raise NvmeError(Status.INVALID_QUEUE_IDENTIFIER, f"CQ {qid} does not exist")
    if state.cqs[qid].sqs:
        raise NvmeError(Status.INVALID_QUEUE_DELETION, f"CQ {qid} still has SQs")
    state.cqs.pop(qid).ring.drop()
    hooks.queue_event(QueueEvent.DELETE_CQ, qid)
    return 0


def _check_io_qid(qid: int, limit: int) -> None:
    if qid == 0 or qid > limit:
        raise NvmeError(Status.INVALID_QUEUE_IDENTIFIER, f"queue id {qid} outside 1..{limit}")


def _check_qsize(state: ControllerState, qsize: int) -> None:
    if qsize < 2 or qsize > state.config.max_queue_entries:
        raise NvmeError(Status.INVALID_QUEUE_SIZE, f"queue size {qsize}")


def _check_contiguous(pc: int) -> None:
    if not pc:
        raise NvmeError(Status.INVALID_FIELD, "non-contiguous queues are not supported (CAP.CQR)")


def _check_base(state: ControllerState, base: int, qsize: int, entry_size: int) -> None:
    if base & (state.page_size - 1):
        raise NvmeError(Status.INVALID_PRP_OFFSET, f"queue base {base:#x} not page aligned")
    state.dma_check(base, qsize * entry_size)
