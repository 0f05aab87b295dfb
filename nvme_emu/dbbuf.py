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

import numpy as np

from vfio_user.dma import DmaError, GuestMemory

from .atomics import AtomicBuffer
from .queue import RingUnavailable, SubmissionQueue
from .spec import NvmeError, Status
from .sqe import PRP1, PRP2
from .state import ControllerHooks, ControllerState


class DoorbellBuffer:
    """Views of the host's shadow-doorbell and EventIdx pages (DSTRD 0: 4-byte slots)."""

    def __init__(self, memory: GuestMemory, shadow: int, eventidx: int, page_size: int) -> None:
        self.memory = memory
        self.shadow_base = shadow
        self.eventidx_base = eventidx
        self.page_size = page_size
        self._shadow: np.ndarray | None = None
        self._eventidx: np.ndarray | None = None
        self._shadow_loads: AtomicBuffer | None = None

    def _views(self) -> tuple[np.ndarray, np.ndarray]:
        if self._shadow is None or self._eventidx is None:
            n = self.page_size // 4
            try:
                self._shadow = self.memory.ndarray(self.shadow_base, n, np.uint32)
                self._eventidx = self.memory.ndarray(self.eventidx_base, n, np.uint32, write=True)
            except DmaError as e:
                raise RingUnavailable(f"doorbell buffer unmapped: {e}") from None
        return self._shadow, self._eventidx

    def _loads(self) -> AtomicBuffer:
        a = self._shadow_loads
        if a is None:
            a = self._shadow_loads = AtomicBuffer(self._views()[0], writable=False)
        return a

    def sq_tail(self, qid: int) -> int:
        return self._loads().load_acquire_u32(8 * qid)

    def cq_head(self, qid: int) -> int:
        return self._loads().load_acquire_u32(8 * qid + 4)

    def set_sq_eventidx(self, qid: int, value: int) -> None:
        self._views()[1][2 * qid] = value

    def set_cq_eventidx(self, qid: int, value: int) -> None:
        self._views()[1][2 * qid + 1] = value

    def seed(self, qid: int, sq_tail: int, cq_head: int) -> None:
        """Copy the doorbell values we know into the shadow when the buffer is configured."""
        shadow, eventidx = self._views()
        shadow_w = self.memory.ndarray(self.shadow_base, self.page_size // 4, np.uint32, write=True)
        shadow_w[2 * qid] = sq_tail
        shadow_w[2 * qid + 1] = cq_head
        eventidx[2 * qid] = sq_tail
        eventidx[2 * qid + 1] = cq_head
        del shadow

    def overlaps(self, iova: int, size: int) -> bool:
        return any(base < iova + size and iova < base + self.page_size for base in (self.shadow_base, self.eventidx_base))

    def drop(self) -> None:
        if self._shadow_loads is not None:
            self._shadow_loads.release()
            self._shadow_loads = None
        self._shadow = None
        self._eventidx = None


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
    hooks.queue_event("dbbuf", 0)
