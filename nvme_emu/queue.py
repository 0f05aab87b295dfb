"""Submission and completion queues over DMA-mapped guest memory, and the host's shadow
doorbell buffer beside them.

Hot path: one ``struct.unpack_from`` per SQE (:data:`nvme_emu.sqe.SQE`) straight out of the guest's ring (no copy)
and one CQE stored phase-last (a release store, nvme_emu/atomics.py); struct measured faster than numpy record views for single entries
(bench/README.md, "hot path"). Ring views are resolved lazily and dropped when the client
unmaps the memory under them. The shadow doorbell and EventIdx pages
(:class:`DoorbellBuffer`) are views of guest memory resolved and dropped the same way; the
protocol they serve, and the admin command that configures them, are :mod:`nvme_emu.dbbuf`'s.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from vfio_user.dma import DmaError, GuestMemory

from .atomics import AtomicBuffer
from .spec.commands import CQE_PHASE, CQE_SIZE, SQE_SIZE
from .sqe import SQE

#: dw0, dw1, sqhd, sqid, cid, status|phase
CQE = struct.Struct("<IIHHHH")
assert CQE.size == CQE_SIZE


class RingUnavailable(Exception):
    """The ring's memory is not (or no longer) mapped: a controller fatal condition."""


class QueueEvent(enum.Enum):
    """What changed about the queues, announced with a QID through the ``queue_event`` hook
    (:class:`~nvme_emu.state.ControllerHooks`) to the controller's listeners: the doorbell
    paths (a new or deleted queue's doorbell reads as zero, an armed CQ head eventfd goes
    with its CQ), the PCI function (where doorbell values live) and the coalescing timers."""

    CREATE_SQ = "create-sq"
    CREATE_CQ = "create-cq"
    DELETE_SQ = "delete-sq"
    DELETE_CQ = "delete-cq"
    #: Doorbell Buffer Config: I/O doorbells now live in host memory (QID 0)
    DBBUF = "dbbuf"
    #: a Controller Level Reset took every queue away (QID 0)
    RESET = "reset"

    @property
    def is_queue(self) -> bool:
        """One queue, the event's QID, was created or deleted."""
        return self in _ONE_QUEUE

    @property
    def is_cq(self) -> bool:
        """A completion queue was created or deleted (its doorbell is the CQ head's)."""
        return self is QueueEvent.CREATE_CQ or self is QueueEvent.DELETE_CQ


_ONE_QUEUE = frozenset({QueueEvent.CREATE_SQ, QueueEvent.CREATE_CQ, QueueEvent.DELETE_SQ, QueueEvent.DELETE_CQ})


@dataclass
class QueueStats:
    doorbells: int = 0
    commands: int = 0
    coalesced: int = 0
    batches: int = 0
    max_batch: int = 0
    completions: int = 0
    interrupts: int = 0
    cq_full_stalls: int = 0
    to_workers: int = 0  # commands that went to the I/O workers (page cache misses, writes, ...)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(eq=False)
class Ring:
    """A contiguous ring of ``size`` entries of ``entry_size`` bytes at guest ``base``."""

    base: int
    size: int
    entry_size: int
    _view: memoryview | None = field(default=None, repr=False)
    _atomic: AtomicBuffer | None = field(default=None, repr=False)

    def view(self, memory: GuestMemory, *, write: bool) -> memoryview:
        v = self._view
        if v is None:
            try:
                v = memory.view(self.base, self.size * self.entry_size, write=write)
            except DmaError as e:
                raise RingUnavailable(str(e)) from None
            self._view = v
        return v

    def atomic(self, memory: GuestMemory) -> AtomicBuffer:
        """Ordered stores into the (writable) ring: the native pointer is taken once per view."""
        a = self._atomic
        if a is None:
            a = self._atomic = AtomicBuffer(self.view(memory, write=True))
        return a

    def overlaps(self, iova: int, length: int) -> bool:
        return self.base < iova + length and iova < self.base + self.size * self.entry_size

    def drop(self) -> None:
        if self._atomic is not None:
            self._atomic.release()
            self._atomic = None
        if self._view is not None:
            self._view.release()
            self._view = None


class CompletionQueue:
    def __init__(self, qid: int, base: int, size: int, *, vector: int, irq_enabled: bool) -> None:
        self.qid = qid
        self.ring = Ring(base, size, CQE_SIZE)
        self.size = size
        self.vector = vector
        self.irq_enabled = irq_enabled
        self.tail = 0
        self.head = 0
        self.phase = 1
        self.sqs: set[int] = set()
        self.stats = QueueStats()
        #: Completions posted since the last interrupt (for coalescing / one IRQ per batch).
        self.unsignalled = 0
        #: Slots promised to requests in flight and to completions waiting in ``ready``: a
        #: command is fetched only while the CQ has room beyond these, so none is ever lost.
        self.reserved = 0
        #: Finished requests waiting to be posted: (sq, cid, status, dw0), one drain per turn.
        self.ready: deque[tuple["SubmissionQueue", int, int, int, list[int] | None]] = deque()

    @property
    def room(self) -> int:
        """Free slots not promised to anything (the host's newest head not looked up)."""
        return (self.head - self.tail - 1) % self.size - self.reserved

    @property
    def pending(self) -> bool:
        """Entries the host has not consumed yet (the INTx level condition)."""
        return self.head != self.tail

    def post(self, memory: GuestMemory, dw0: int, dw1: int, sqhd: int, sqid: int, cid: int, status: int) -> None:
        """Write one CQE so the host never sees the new phase before the rest of the entry:
        bytes 0-11, then the CID+status|phase dword as a release store (nvme_emu/atomics.c)."""
        self.ring.atomic(memory).store_cqe(self.tail * CQE_SIZE, dw0, dw1, sqhd, sqid, cid, (status << 1) | self.phase)
        self.tail += 1
        if self.tail == self.size:
            self.tail = 0
            self.phase ^= CQE_PHASE
        self.unsignalled += 1
        self.stats.completions += 1

    def set_head(self, head: int) -> None:
        self.head = head


class SubmissionQueue:
    def __init__(self, qid: int, base: int, size: int, cq: CompletionQueue) -> None:
        self.qid = qid
        self.ring = Ring(base, size, SQE_SIZE)
        self.size = size
        self.cq = cq
        self.head = 0
        self.tail = 0
        self.stats = QueueStats()
        #: Requests fetched whose CQE is not posted yet (in flight, or ready to post).
        self.outstanding = 0
        #: False once a reset or a detach took the queues away: late completions are dropped.
        self.live = True
        #: Run when ``outstanding`` drops to 0 (a Delete I/O SQ waiting for its commands).
        self.on_idle: Callable[[], None] | None = None

    @property
    def empty(self) -> bool:
        return self.head == self.tail

    def fetch(self, memory: GuestMemory) -> tuple:
        """The SQE at head as a tuple (:data:`nvme_emu.sqe.SQE`); advances head."""
        view = self.ring.view(memory, write=False)
        entry = SQE.unpack_from(view, self.head * SQE_SIZE)
        self.head += 1
        if self.head == self.size:
            self.head = 0
        return entry


class DoorbellBuffer:
    """Views of the host's shadow-doorbell and EventIdx pages (DSTRD 0: 4-byte slots).

    Configured by Doorbell Buffer Config (:mod:`nvme_emu.dbbuf`, which explains the EventIdx
    protocol); the shadow values are loaded with acquire semantics."""

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
