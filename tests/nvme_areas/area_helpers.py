"""In-process helpers for the per-spec-area tests: a ControllerState with RAM namespaces
over real memfd-backed guest memory, and hooks that record what a handler caused.

No socket, no server, no Controller: each test calls one area's handler with a decoded SQE.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

from nvme_emu.admin import handlers_for
from nvme_emu.backends.ram import RamBackend
from nvme_emu.namespace import Namespace
from nvme_emu.queue import CompletionQueue, SubmissionQueue
from nvme_emu.spec.commands import CQES_LOG2, SQES_LOG2, NvmeError, Status
from nvme_emu.spec.registers import Cc
from nvme_emu.sqe import SQE
from nvme_emu.state import ControllerConfig, ControllerHooks, ControllerState
from vfio_user.dma import DMA_FLAG_READ, DMA_FLAG_WRITE, DmaTable, GuestMemory
from vfio_user.memfd import sealed_memfd

#: Guest-physical base and size of the memfd the tests map as guest RAM.
GUEST_BASE = 0x100000
GUEST_SIZE = 4 << 20
PAGE = 4096
#: The admin queue pair lives in the first two pages; data buffers start after.
ADMIN_SQ, ADMIN_CQ, BUF = GUEST_BASE, GUEST_BASE + PAGE, GUEST_BASE + 2 * PAGE


class Guest:
    """Guest RAM: the GuestMemory handlers use, and our own mmap of it to check data."""

    def __init__(self) -> None:
        self.fd = sealed_memfd("nvme-areas-guest", GUEST_SIZE)  # as QEMU's: the DMA table wants it sealed
        self.table = DmaTable()
        self.table.add(GUEST_BASE, GUEST_SIZE, DMA_FLAG_READ | DMA_FLAG_WRITE, self.fd, 0)
        self.memory = GuestMemory(self.table)
        self.ram = mmap.mmap(self.fd, GUEST_SIZE)

    def read(self, iova: int, length: int) -> bytes:
        off = iova - GUEST_BASE
        return bytes(self.ram[off : off + length])

    def write(self, iova: int, data: bytes) -> None:
        off = iova - GUEST_BASE
        self.ram[off : off + len(data)] = data

    def close(self) -> None:
        self.ram.close()
        os.close(self.fd)


@dataclass
class RecordingHooks:
    """Hooks that record every call as (name, args); a test asserts on ``calls``.

    ``complete`` answers ``complete_result`` (False: the admin CQ is full); ``call_soon``
    keeps its functions until :meth:`run_soon`, as a loop would after the batch.
    """

    calls: list[tuple[str, tuple]] = field(default_factory=list)
    complete_result: bool = True
    soon: list[Callable[[], None]] = field(default_factory=list)

    def named(self, name: str) -> list[tuple]:
        return [args for n, args in self.calls if n == name]

    def run_soon(self) -> None:
        pending, self.soon = self.soon, []
        for fn in pending:
            fn()

    def hooks(self) -> ControllerHooks:
        def record(name: str, result: object = None) -> Callable[..., object]:
            def hook(*args: object) -> object:
                self.calls.append((name, args))
                return result() if callable(result) else result

            return hook

        def call_soon(fn: Callable[[], None]) -> None:
            self.calls.append(("call_soon", (fn,)))
            self.soon.append(fn)

        return ControllerHooks(
            complete=record("complete", lambda: self.complete_result),
            begin_request=record("begin_request"),
            finish_request=record("finish_request"),
            io_pool=record("io_pool"),
            queue_event=record("queue_event"),
            call_soon=call_soon,
            async_event=record("async_event"),
        )


class KeptPool:
    """An I/O pool that keeps submitted work, so the test decides when it runs and finishes."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], object], Callable[[object, BaseException | None], None]]] = []

    def submit(self, fn: Callable[[], object], done: Callable[[object, BaseException | None], None], views: Sequence[memoryview] = ()) -> None:
        self.jobs.append((fn, done))

    @property
    def pending(self) -> int:
        """Submitted and not finished (an inline-capable command runs inline only at 0)."""
        return len(self.jobs)

    def finish_one(self) -> None:
        """Run the oldest job, then its completion callback, as the loop would."""
        fn, done = self.jobs.pop(0)
        done(fn(), None)


@dataclass
class Area:
    """What a test needs: the state, the hooks and their record, guest RAM, the admin SQ."""

    state: ControllerState
    hooks: ControllerHooks
    record: RecordingHooks
    guest: Guest
    admin_sq: SubmissionQueue

    def run(self, handler, **fields: int):
        """Call ``handler`` as the admin dispatcher would, with an SQE of these fields."""
        return handler(self.state, self.hooks, self.admin_sq, sqe(**fields))


def sqe(opc: int = 0, *, flags: int = 0, cid: int = 1, nsid: int = 0, prp1: int = 0, prp2: int = 0, **cdw: int) -> tuple:
    """A decoded SQE, from keyword fields; cdw10..cdw15. Packed and unpacked by
    :data:`nvme_emu.sqe.SQE`, so it is exactly what the queue loop would hand a handler."""
    dws = [cdw.pop(f"cdw{i}", 0) for i in range(10, 16)]
    assert not cdw, f"unknown fields {sorted(cdw)}"
    return SQE.unpack(SQE.pack(opc, flags, cid, nsid, 0, 0, 0, prp1, prp2, *dws))


def make_state(memory: GuestMemory, config: ControllerConfig | None = None, *, namespaces: int = 1) -> ControllerState:
    """An enabled controller's state: RAM namespaces, 4 KiB pages, an admin queue pair."""
    state = ControllerState.of([Namespace(i + 1, RamBackend(1 << 20)) for i in range(namespaces)], config)
    state.memory = memory
    state.cc = Cc.EN | SQES_LOG2 << Cc.IOSQES_SHIFT | CQES_LOG2 << Cc.IOCQES_SHIFT
    cq = CompletionQueue(0, ADMIN_CQ, 64, vector=0, irq_enabled=True)
    state.cqs[0] = cq
    state.sqs[0] = SubmissionQueue(0, ADMIN_SQ, 64, cq)
    cq.sqs.add(0)
    return state


def make_area(guest: Guest, config: ControllerConfig | None = None, *, namespaces: int = 1) -> Area:
    """A state over ``guest`` with recording hooks and the opcodes a Controller dispatches."""
    record = RecordingHooks()
    hooks = record.hooks()
    state = make_state(guest.memory, config, namespaces=namespaces)
    compose_opcodes(state)
    return Area(state, hooks, record, guest, state.sqs[0])


def compose_opcodes(state: ControllerState) -> None:
    """Record the dispatched admin opcodes as the Controller does (Commands Supported log;
    the I/O ones are their command set's)."""
    state.admin_opcodes = frozenset(handlers_for(state.config))


def status_of(call: Callable[[], object]) -> int:
    """The status an NvmeError carries (as the dispatcher would post it), or Success."""
    try:
        call()
    except NvmeError as e:
        return e.status
    return Status.SUCCESS
