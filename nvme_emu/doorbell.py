"""Doorbell paths: how SQ tail and CQ head values get from the host to the controller.

Every path ends in the same place, a :class:`DoorbellPage`: one 32-bit slot per doorbell
(DSTRD 0) and the values last acted on. A *scan* compares the two and hands every changed
slot to the controller, so several writes between two looks coalesce into the last value.
The paths differ only in where the slot values live and what wakes us up:

``trap``      REGION_WRITE messages (posted by QEMU when nothing is mmapped); the baseline.
``shadow``    a shadow ioeventfd per doorbell: KVM (POST_WRITE) or the client stores the value
              in a shared memfd page and signals an eventfd; we wake, scan, re-check.
``ioeventfd`` plain eventfds, no value: only useful with shadow doorbell buffers
              (Doorbell Buffer Config), where the value is in guest memory.
``poll``      the doorbell page is mmapped into the client (sparse area of BAR0); we poll
              it, spinning while work arrives and backing off to a timer when idle.
``auto``      shadow ioeventfds when the client takes them, trap (+ dbbuf) otherwise.

Trapped writes work in every mode (a client may always fall back to messages), and shadow
doorbell buffers (dbbuf) work with trap, shadow and ioeventfd alike.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vfio_user.device import IoEventFd, Region, SharedMemory

from .atomics import fence
from .queue import RingUnavailable
from .spec import Reg

if TYPE_CHECKING:
    from .controller import Controller

log = logging.getLogger(__name__)

DOORBELL_PAGE = 4096


class DoorbellMode(str, enum.Enum):
    AUTO = "auto"
    TRAP = "trap"
    SHADOW = "shadow"
    IOEVENTFD = "ioeventfd"
    POLL = "poll"


@dataclass
class DoorbellStats:
    """Per-path counters (the CLI prints them; benchmarks divide them by I/Os)."""

    trapped: int = 0  # doorbell REGION_WRITEs
    trapped_io_sq: int = 0  # of which I/O queue SQ tails (zero once an agent serves them)
    signals: int = 0  # eventfd counts: writes that reached us by ioeventfd
    wakeups: int = 0  # eventfd read-ready callbacks / poll rounds that found work
    doorbells: int = 0  # slot changes acted on
    coalesced: int = 0  # writes that never needed their own wake-up
    spins: int = 0  # scans during a spin window
    spin_hits: int = 0  # spin-window scans that found work
    polls: int = 0  # poll rounds
    poll_cpu_seconds: float = 0.0  # CPU the poller burned
    lost_values: int = 0  # ioeventfd signals with no way to know the value

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class DoorbellPage:
    """Slot values and what was last acted on; see the module docstring."""

    def __init__(self, ctrl: "Controller", values: np.ndarray) -> None:
        self.ctrl = ctrl
        self.values = values
        self.last = np.zeros(len(values), dtype=np.uint32)

    def scan(self) -> int:
        """Act on every changed slot; returns how many changed."""
        changed = np.flatnonzero(self.values != self.last)
        if len(changed):
            fence()  # acquire: the SQEs a new tail announces are read after the tail (aarch64)
        # CQ heads (odd slots) first: an SQ processed after its CQ's new head sees the room the
        # host freed instead of stalling on a full CQ that is not full any more.
        for slot in sorted(changed.tolist(), key=lambda s: not s & 1):
            value = int(self.values[slot])
            self.last[slot] = value
            self.ctrl.doorbell(slot >> 1, bool(slot & 1), value)
        return len(changed)

    def clear(self, slots: slice | None = None) -> None:
        """Doorbells read as zero after a reset or a queue (re)creation."""
        sl = slots if slots is not None else slice(None)
        self.values[sl] = 0
        self.last[sl] = 0


class DoorbellPath:
    """Base: owns the doorbell page; subclasses add the wake-up mechanism."""

    mode = DoorbellMode.TRAP
    #: Whether slot values can change behind our back (shared memory): then act on a scan.
    page_shared = False

    def __init__(self, ctrl: "Controller", bar0: Region, *, spin_us: float = 0.0) -> None:
        self.ctrl = ctrl
        self.bar0 = bar0
        self.nslots = 2 * (ctrl.config.max_io_queues + 1)
        self.spin_s = spin_us * 1e-6
        self.stats = DoorbellStats()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.page = DoorbellPage(ctrl, self._slot_memory())
        ctrl.queue_listeners.append(self._queue_event)

    def _slot_memory(self) -> np.ndarray:
        return np.zeros(self.nslots, dtype=np.uint32)

    @property
    def active_mode(self) -> DoorbellMode:
        return self.mode

    # -- lifecycle ----------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def detach(self) -> None:
        self.loop = None

    def close(self) -> None:
        """Release what setup created (eventfds and shared memory are the region's)."""

    def _queue_event(self, event: str, qid: int) -> None:
        if event == "reset":
            self.page.clear()
        elif event in ("create-sq", "create-cq", "delete-sq", "delete-cq"):
            slot = 2 * qid + (1 if event.endswith("cq") else 0)
            self.page.clear(slice(slot, slot + 1))

    # -- trapped writes (every mode) ------------------------------------------------------

    def trapped_write(self, offset: int, data: bytes) -> None:
        """A doorbell REGION_WRITE: store it in the page, then act on the page."""
        slot = (offset - Reg.DOORBELLS) >> 2
        if len(data) != 4 or offset & 3 or slot >= self.nslots:
            log.debug("ignored doorbell write of %d bytes at %#x", len(data), offset)
            return
        self.stats.trapped += 1
        if slot >= 2 and not slot & 1:
            self.stats.trapped_io_sq += 1
        self.page.values[slot] = int.from_bytes(data, "little")
        self._kick(slot)
        if self.page_shared:
            self._run()
        else:
            self._run_slot(slot)

    def _run_slot(self, slot: int) -> None:
        """A private page changes only by trapped writes: check the one slot, no scan."""
        page = self.page
        value = int(page.values[slot])
        if value != page.last[slot]:
            page.last[slot] = value
            self.stats.doorbells += 1
            self.ctrl.doorbell(slot >> 1, bool(slot & 1), value)

    def _kick(self, slot: int) -> None:
        """A write that repeats the slot's last value still counts under shadow doorbell buffers.

        There the write is only a kick (the tail is in host memory): after an EventIdx
        re-check consumed a suppressed tail, or after a wrap, the next kick may carry the
        very value we acted on last, and a scan would see no change and lose the wake-up.
        """
        if slot >= 2 and self.ctrl.dbbuf is not None and self.page.values[slot] == self.page.last[slot]:
            self.stats.doorbells += 1
            self.ctrl.doorbell(slot >> 1, bool(slot & 1), int(self.page.values[slot]))

    def _run(self) -> int:
        n = self.page.scan()
        self.stats.doorbells += n
        if n and self.spin_s:
            n += self._spin()
        return n

    def _spin(self) -> int:
        """Look again for a short while before going back to sleep (cheaper than a wake-up)."""
        found = 0
        deadline = time.perf_counter() + self.spin_s
        while time.perf_counter() < deadline:
            self.stats.spins += 1
            n = self.page.scan()
            if n:
                self.stats.spin_hits += 1
                self.stats.doorbells += n
                found += n
                deadline = time.perf_counter() + self.spin_s
        return found

    def read(self, offset: int, count: int) -> bytes:
        """Doorbells are write-only; reads return zero (as on real controllers)."""
        return bytes(count)


class TrapPath(DoorbellPath):
    mode = DoorbellMode.TRAP


class ShadowPath(DoorbellPath):
    """Shadow ioeventfds: the value arrives in shared memory, the signal by eventfd."""

    mode = DoorbellMode.SHADOW
    page_shared = True

    def _slot_memory(self) -> np.ndarray:
        self.shadow = SharedMemory(DOORBELL_PAGE, "nvme-doorbell-shadow")
        self.ioeventfds: list[IoEventFd] = []
        for slot in range(self.nslots):
            efd = IoEventFd(Reg.DOORBELLS + 4 * slot, 4, shadow=self.shadow, shadow_offset=4 * slot)
            self.ioeventfds.append(self.bar0.add_ioeventfd(efd))
        return np.frombuffer(self.shadow.view, dtype=np.uint32, count=self.nslots)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        super().attach(loop)
        for efd in self.ioeventfds:
            loop.add_reader(efd.fd, self._signalled, efd)

    def detach(self) -> None:
        if self.loop is not None:
            for efd in self.ioeventfds:
                self.loop.remove_reader(efd.fd)
        super().detach()

    def _signalled(self, efd: IoEventFd) -> None:
        writes = efd.drain()
        if not writes:
            return
        self.stats.wakeups += 1
        self.stats.signals += writes
        self._kick((efd.offset - Reg.DOORBELLS) >> 2)
        changed = self._run()
        # Writes beyond one per changed slot were absorbed: coalesced into the last value.
        self.stats.coalesced += max(0, writes - max(changed, 1))

    def close(self) -> None:
        for efd in self.ioeventfds:
            if efd in self.bar0.ioeventfds:
                self.bar0.remove_ioeventfd(efd)
        self.ioeventfds.clear()
        del self.page
        self.shadow.close()


class AutoPath(ShadowPath):
    """Offers shadow ioeventfds; reports ``shadow`` once the client took them, else ``trap``."""

    mode = DoorbellMode.AUTO

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.client_took_ioeventfds = False

    @property
    def active_mode(self) -> DoorbellMode:
        return DoorbellMode.SHADOW if self.client_took_ioeventfds else DoorbellMode.TRAP

    def detach(self) -> None:
        super().detach()
        self.client_took_ioeventfds = False


class IoEventFdPath(DoorbellPath):
    """Plain ioeventfds on I/O queue doorbells; the value comes from the dbbuf shadow."""

    mode = DoorbellMode.IOEVENTFD

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ioeventfds: dict[int, IoEventFd] = {}
        for slot in range(2, self.nslots):  # the admin queue has no shadow buffer: trapped
            efd = IoEventFd(Reg.DOORBELLS + 4 * slot, 4)
            self.ioeventfds[slot] = self.bar0.add_ioeventfd(efd)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        super().attach(loop)
        for slot, efd in self.ioeventfds.items():
            loop.add_reader(efd.fd, self._signalled, slot, efd)

    def detach(self) -> None:
        if self.loop is not None:
            for efd in self.ioeventfds.values():
                self.loop.remove_reader(efd.fd)
        super().detach()

    def _signalled(self, slot: int, efd: IoEventFd) -> None:
        writes = efd.drain()
        if not writes:
            return
        self.stats.wakeups += 1
        self.stats.signals += writes
        self.stats.coalesced += writes - 1
        if self.ctrl.dbbuf is None:
            # Without Doorbell Buffer Config nothing tells us what was written.
            self.stats.lost_values += writes
            log.warning("ioeventfd doorbell %d fired but no shadow doorbell buffer holds its value", slot)
            return
        self.stats.doorbells += 1
        self.ctrl.doorbell(slot >> 1, bool(slot & 1), 0)  # the value is read from dbbuf

    def close(self) -> None:
        for efd in self.ioeventfds.values():
            if efd in self.bar0.ioeventfds:
                self.bar0.remove_ioeventfd(efd)
        self.ioeventfds.clear()


class PollPath(DoorbellPath):
    """The doorbell page is mapped into the client; an adaptive poller watches it."""

    mode = DoorbellMode.POLL
    page_shared = True

    def __init__(self, *args, idle_max_us: float = 1000.0, busy_spin_us: float = 50.0, **kwargs) -> None:
        kwargs.setdefault("spin_us", busy_spin_us)
        super().__init__(*args, **kwargs)
        self.idle_max_s = idle_max_us * 1e-6
        self._task: asyncio.Task[None] | None = None

    def _slot_memory(self) -> np.ndarray:
        memory = self.bar0.memory
        assert memory is not None, "poll mode needs BAR0's doorbell page to be mmappable"
        return np.frombuffer(memory.view[Reg.DOORBELLS : Reg.DOORBELLS + DOORBELL_PAGE], dtype=np.uint32, count=self.nslots)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        super().attach(loop)
        self._task = loop.create_task(self._poll())

    def detach(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        super().detach()

    async def _poll(self) -> None:
        """Spin while work arrives; when idle, sleep exponentially longer up to idle_max."""
        idle = 0
        while True:
            t0 = time.thread_time()
            self.stats.polls += 1
            n = self._run() + self._poll_dbbuf()
            self.stats.poll_cpu_seconds += time.thread_time() - t0
            if n:
                self.stats.wakeups += 1
                idle = 0
                await asyncio.sleep(0)
            else:
                idle = min(idle + 1, 20)
                await asyncio.sleep(min(self.idle_max_s, 1e-6 * (1 << idle)))

    def _poll_dbbuf(self) -> int:
        """Under shadow doorbell buffers the SQ tails live in host memory: poll them too.

        The host's kicks land in the mapped page, where a kick repeating the slot's last
        value is invisible (see :meth:`DoorbellPath._kick`); the shadow tail is not.
        """
        ctrl = self.ctrl
        dbbuf = ctrl.dbbuf
        if dbbuf is None:
            return 0
        n = 0
        try:
            for qid, sq in list(ctrl.sqs.items()):
                if qid and ctrl.dbbuf is dbbuf:
                    tail = dbbuf.sq_tail(qid)
                    if tail != sq.tail and tail < sq.size:  # invalid values: the page scan reports them
                        ctrl.doorbell(qid, False, 0)
                        n += 1
        except RingUnavailable:
            pass  # the buffer was unmapped; the controller notices on its next access
        self.stats.doorbells += n
        return n

    def close(self) -> None:
        del self.page


PATHS: dict[DoorbellMode, type[DoorbellPath]] = {
    DoorbellMode.AUTO: AutoPath,
    DoorbellMode.TRAP: TrapPath,
    DoorbellMode.SHADOW: ShadowPath,
    DoorbellMode.IOEVENTFD: IoEventFdPath,
    DoorbellMode.POLL: PollPath,
}


def make_path(mode: DoorbellMode | str, ctrl: "Controller", bar0: Region, **kwargs) -> DoorbellPath:
    return PATHS[DoorbellMode(mode)](ctrl, bar0, **kwargs)


def bar0_mmap_areas(mode: DoorbellMode | str) -> list[tuple[int, int]]:
    """Only the poll path maps the doorbell page (any mmap turns QEMU's posted writes off)."""
    return [(Reg.DOORBELLS, DOORBELL_PAGE)] if DoorbellMode(mode) == DoorbellMode.POLL else []

