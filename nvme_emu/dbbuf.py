"""Shadow doorbells and EventIdx: Doorbell Buffer Config (admin opcode 7Ch, OACS bit 8).

The host keeps its SQ tails and CQ heads in a shadow buffer in its own memory and rings the
real doorbell only when the new value passes the EventIdx the controller published. We
publish EventIdx = the tail we have consumed, so the host rings again exactly when new work
arrives after we went idle; then we re-read the shadow (the lost-race check): a host that
wrote its shadow just before our EventIdx store did not ring, so we must look once more.
That store->load order needs a full fence (:func:`nvme_emu.atomics.fence`), and the shadow
values are loaded with acquire semantics: the SQEs (or consumed CQ slots) they announce are
read (or overwritten) only after the value itself.
"""

from __future__ import annotations

from .queue import DoorbellBuffer, QueueEvent, SubmissionQueue
from .spec.commands import NvmeError, Status
from .sqe import PRP1, PRP2
from .state import ControllerHooks, ControllerState


def doorbell_buffer_config(state: ControllerState, hooks: ControllerHooks, sq: SubmissionQueue, e: tuple) -> int:
    """PRP1: the shadow doorbell page, PRP2: the EventIdx page; both page aligned and mapped."""
    shadow, eventidx = e[PRP1], e[PRP2]
    page = state.page_size
    if shadow & (page - 1) or eventidx & (page - 1) or not shadow or not eventidx:
        raise NvmeError(Status.INVALID_FIELD, "doorbell buffers must be page aligned")
    state.dma_check(shadow, page)
    state.dma_check(eventidx, page)
    configure(state, hooks, shadow, eventidx)
    return 0


def configure(state: ControllerState, hooks: ControllerHooks, shadow: int, eventidx: int) -> None:
    """From now on I/O queue doorbells live in host memory: seed them with what we know."""
    dbbuf = state.dbbuf = DoorbellBuffer(state.host_memory(), shadow, eventidx, state.page_size)
    for qid, sq in state.sqs.items():
        if qid:
            dbbuf.seed(qid, sq.tail, sq.cq.head if sq.cq.qid == qid else 0)
    hooks.queue_event(QueueEvent.DBBUF, 0)
