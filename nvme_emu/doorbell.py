"""Doorbell paths: how SQ tail and CQ head values get from the host to the controller.

Every path ends in the same place, a :class:`DoorbellPage`: one 32-bit slot per doorbell
(DSTRD 0) and the values last acted on. Where something names the slot (a trapped write's
offset, the eventfd that fired) we act on that one slot, in O(1); only the poller, which
nothing names a slot for, *scans* the page for changed slots. Either way several writes
between two looks coalesce into the last value. The paths differ in where the slot values
live and what wakes us up:

``trap``      REGION_WRITE messages (posted by QEMU when nothing is mmapped); the baseline.
``shadow``    a shadow ioeventfd per doorbell: KVM (POST_WRITE) or the client stores the value
              in a shared memfd page and signals an eventfd; we wake and act on that slot.
              CQ head slots are *lazy*: nothing wakes for them; the controller peeks at
              the page when a CQ looks full, and arms the CQ's eventfd only if it still is.
``ioeventfd`` plain eventfds, no value: only useful with shadow doorbell buffers
              (Doorbell Buffer Config), where the value is in guest memory.
``poll``      the doorbell page is mmapped into the client (sparse area of BAR0); we poll
              it, spinning while work arrives and backing off to a timer when idle.
``auto``      shadow ioeventfds when the client takes them, trap (+ dbbuf) otherwise.

Trapped writes work in every mode (a client may always fall back to messages), and shadow
doorbell buffers (dbbuf) work with trap, shadow and ioeventfd alike.

A path holds no controller: it is given a :class:`~nvme_emu.doorbell_port.DoorbellPort`, the
few things it may use (deliver a value, look up a queue, register as the CQ head source ...),
which the controller implements and a test's fake can too.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass

import numpy as np

from vfio_user.device import IoEventFd, Region, SharedMemory

from .atomics import fence
from .doorbell_port import DoorbellPort
from .latency import Via, clock_ns
from .queue import QueueEvent, RingUnavailable
from .spec.registers import Reg
from .timer import FineTimers

log = logging.getLogger(__name__)

DOORBELL_PAGE = 4096

#: The routes as module globals: an enum member read through its class costs ~70 ns (3.11).
_TRAP, _EVENTFD, _SPIN, _IOEVENTFD, _POLL = Via.TRAP, Via.EVENTFD, Via.SPIN, Via.IOEVENTFD, Via.POLL


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
    spin_misses: int = 0  # spin windows that closed without work
    polls: int = 0  # poll rounds
    poll_cpu_seconds: float = 0.0  # CPU the poller burned
    lost_values: int = 0  # ioeventfd signals with no way to know the value
    lazy_cq_heads: int = 0  # CQ head values taken from the page without a wake-up
    cq_head_arms: int = 0  # full CQs whose head eventfd we armed

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


#: An adaptive spin window never exceeds this (a host slower than this is not worth waiting
#: for: the eventfd wakes us for it).
ADAPTIVE_SPIN_CAP_US = 20.0
#: The shortest adaptive window worth opening.
ADAPTIVE_SPIN_FLOOR_US = 2.0
#: After consecutive misses an adaptive window stays shut for 1, 2, 4 ... up to this many
#: wake-ups, so a slow host costs at most ``cap / 64`` of spinning per doorbell.
ADAPTIVE_SPIN_MAX_SKIP = 64
#: One spin episode yields to the loop after this long, however many hits it has.
SPIN_EPISODE_MAX_S = 200e-6


class AdaptiveSpin:
    """How long to watch an SQ tail slot after acting on it, learned from the host.

    A QD1 host that submits again a few microseconds after each completion is caught by a
    window of a few times its usual gap (an average over recent hits), so the server does
    not sleep and get woken per I/O. A host that does not (deep queues whose doorbells
    batch, a guest slower than the cap) turns misses into exponentially longer runs of
    wake-ups without spinning; one hit resets that.
    """

    def __init__(self, cap_s: float, floor_s: float = ADAPTIVE_SPIN_FLOOR_US * 1e-6) -> None:
        self.cap_s = cap_s
        self.floor_s = min(floor_s, cap_s)
        self.gap_s = cap_s / 4  # a hopeful start: the first window is the whole cap
        self.backoff = 0  # wake-ups to skip after the next miss (0: none yet)
        self.skip = 0  # wake-ups left to skip

    def window(self) -> float:
        """Seconds to spin after a wake-up (0: this one is skipped by the back-off)."""
        if self.skip:
            self.skip -= 1
            return 0.0
        return min(self.cap_s, max(self.floor_s, 4 * self.gap_s))

    def hit(self, waited_s: float, n: int = 1) -> None:
        """The host came back ``n`` times, after ``waited_s`` on average: the average gap moves
        towards it as ``n`` single updates of 1/8 each would move it."""
        self.gap_s = waited_s + (self.gap_s - waited_s) * 0.875**n
        self.backoff = 0

    def miss(self) -> None:
        self.backoff = min(2 * self.backoff or 1, ADAPTIVE_SPIN_MAX_SKIP)
        self.skip = self.backoff


class FixedSpin:
    """``--spin-us N``: the same window after every wake-up and every hit."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s

    def window(self) -> float:
        return self.window_s

    def hit(self, waited_s: float, n: int = 1) -> None:
        """Nothing learned: the window stays as given."""

    def miss(self) -> None:
        """Nothing learned: the window stays as given."""


class DoorbellPage:
    """Slot values and what was last acted on; see the module docstring."""

    def __init__(self, port: DoorbellPort, values: np.ndarray) -> None:
        self.port = port
        #: the controller's latency recorder (it lives as long as the controller)
        self.latency = port.latency
        self.values = values
        self.last = np.zeros(len(values), dtype=np.uint32)
        # Word views of the same two arrays, for one slot at a time: indexing a memoryview
        # gives a Python int directly, several times cheaper than a numpy scalar (which the
        # O(1) paths would pay three or four times per doorbell). numpy stays for the scan.
        self.value_words = values.data.cast("B").cast("I")
        self.last_words = self.last.data.cast("B").cast("I")

    def release(self) -> None:
        """Drop the word views (a shared page cannot be unmapped while they exist)."""
        self.value_words.release()
        self.last_words.release()

    def scan(self) -> int:
        """Act on every changed slot; returns how many changed."""
        changed = np.flatnonzero(self.values != self.last)
        if len(changed):
            self.latency.arrive(_POLL)  # only the poller scans
            fence()  # acquire: the SQEs a new tail announces are read after the tail (aarch64)
        # CQ heads (odd slots) first: an SQ processed after its CQ's new head sees the room the
        # host freed instead of stalling on a full CQ that is not full any more.
        for slot in sorted(changed.tolist(), key=lambda s: not s & 1):
            value = int(self.values[slot])
            self.last[slot] = value
            self.port.doorbell(slot >> 1, bool(slot & 1), value)
        return len(changed)

    def clear(self, slots: slice | None = None) -> None:
        """Doorbells read as zero after a reset or a queue (re)creation."""
        sl = slots if slots is not None else slice(None)
        self.values[sl] = 0
        self.last[sl] = 0


class DoorbellPath:
    """Base: owns the doorbell page; subclasses add the wake-up mechanism."""

    mode = DoorbellMode.TRAP

    def __init__(self, port: DoorbellPort, bar0: Region, *, spin_us: float = 0.0) -> None:
        #: all a path uses of the controller (nvme_emu.doorbell_port)
        self.port = port
        self.bar0 = bar0
        self.nslots = 2 * (port.max_io_queues + 1)
        self.spin_s = spin_us * 1e-6
        self.stats = DoorbellStats()
        #: the controller's latency recorder (it lives as long as the controller)
        self.latency = port.latency
        self._bind_port()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.page = DoorbellPage(port, self._slot_memory())
        port.add_queue_listener(self._queue_event)

    def _bind_port(self) -> None:
        """Bind the port's queues and shadow buffer, which the wake-ups read: the controller
        replaces them only before a queue event (RESET, DBBUF), where they are bound again.
        A read through the port's property costs ~35 ns more than one of these (54 vs 18 ns
        for ``dbbuf is None``; 3.11), on every SQ tail wake-up."""
        port = self.port
        self.sqs, self.cqs, self.dbbuf = port.sqs, port.cqs, port.dbbuf

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

    def _queue_event(self, event: QueueEvent, qid: int) -> None:
        self._bind_port()
        if event is QueueEvent.RESET:
            self.page.clear()
        elif event.is_queue:
            slot = 2 * qid + event.is_cq
            self.page.clear(slice(slot, slot + 1))

    # -- trapped writes (every mode) ------------------------------------------------------

    def trapped_write(self, offset: int, data: bytes) -> None:
        """A doorbell REGION_WRITE: store it in the page, then act on the page."""
        slot = (offset - Reg.DOORBELLS) >> 2
        if len(data) != 4 or offset & 3 or slot >= self.nslots:
            log.debug("ignored doorbell write of %d bytes at %#x", len(data), offset)
            return
        self.stats.trapped += 1
        if not slot & 1:
            lat = self.latency
            if lat.left == 1:  # inline arrive(): a method call costs ~70 ns more per doorbell
                lat.arrived, lat.via = clock_ns(), _TRAP
            if slot >= 2:
                self.stats.trapped_io_sq += 1
        self.page.value_words[slot] = int.from_bytes(data, "little")
        self._act(slot)

    def _act(self, slot: int) -> bool:
        """Hand one slot's value to the controller if it is news; True if it was.

        Under shadow doorbell buffers an I/O queue write is news even when it repeats the
        slot's last value: there it is only a kick (the value is in host memory), and after
        an EventIdx re-check consumed a suppressed tail, or after a wrap, the next kick may
        carry the very value we acted on last.
        """
        page = self.page
        value = page.value_words[slot]
        if value == page.last_words[slot] and (slot < 2 or self.dbbuf is None):
            return False
        page.last_words[slot] = value
        self.stats.doorbells += 1
        self.port.doorbell(slot >> 1, bool(slot & 1), value)
        return True

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


class SharedPagePath(DoorbellPath):
    """A page the host writes behind our back: the controller may peek at CQ heads in it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.port.register_cq_head_source(self)

    def peek_cq_head(self, qid: int) -> int | None:
        slot = 2 * qid + 1
        if slot >= self.nslots:
            return None
        page = self.page
        value = page.value_words[slot]
        if value == page.last_words[slot]:
            return None
        # acquire: the host's reads of the entries it consumed are done before we reuse them
        # (no syscall orders this load, unlike an eventfd wake-up; matters on aarch64)
        fence()
        page.last_words[slot] = value
        self.stats.lazy_cq_heads += 1
        return value

    def arm_cq_head(self, qid: int) -> None:
        """Something else watches every slot (the poller); nothing to arm."""

    def close(self) -> None:
        self.port.unregister_cq_head_source(self)
        self.page.release()
        del self.page


class ShadowPath(SharedPagePath):
    """Shadow ioeventfds: the value arrives in shared memory, the signal by eventfd.

    SQ tail eventfds are always watched. CQ head eventfds are watched only while their CQ
    is full (armed by the controller): a host consuming completions does not wake us, and
    a signal that arrived before arming leaves the eventfd readable, so none is lost.

    After an SQ tail the path spins on that slot (:meth:`_spin_slot`): for ``spin_us`` when
    given, else (``spin_us=None``, the default) for an :class:`AdaptiveSpin` window.
    """

    def __init__(self, *args, spin_us: float | None = None, **kwargs) -> None:
        self.adaptive = spin_us is None
        self._spins: dict[int, AdaptiveSpin | FixedSpin] = {}
        super().__init__(*args, spin_us=spin_us or 0.0, **kwargs)

    mode = DoorbellMode.SHADOW

    def _slot_memory(self) -> np.ndarray:
        self.shadow = SharedMemory(DOORBELL_PAGE, "nvme-doorbell-shadow")
        self.ioeventfds: list[IoEventFd] = []
        self.armed: set[int] = set()
        for slot in range(self.nslots):
            efd = IoEventFd(Reg.DOORBELLS + 4 * slot, 4, shadow=self.shadow, shadow_offset=4 * slot)
            self.ioeventfds.append(self.bar0.add_ioeventfd(efd))
        return np.frombuffer(self.shadow.view, dtype=np.uint32, count=self.nslots)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        super().attach(loop)
        for slot in range(0, self.nslots, 2):
            loop.add_reader(self.ioeventfds[slot].fd, self._signalled, slot)

    def detach(self) -> None:
        if self.loop is not None:
            for slot in range(0, self.nslots, 2):
                self.loop.remove_reader(self.ioeventfds[slot].fd)
            for slot in self.armed:
                self.loop.remove_reader(self.ioeventfds[slot].fd)
        self.armed.clear()
        super().detach()

    def arm_cq_head(self, qid: int) -> None:
        slot = 2 * qid + 1
        if self.loop is None or slot >= self.nslots or slot in self.armed:
            return
        self.armed.add(slot)
        self.stats.cq_head_arms += 1
        self.loop.add_reader(self.ioeventfds[slot].fd, self._signalled, slot)

    def _disarm(self, slot: int) -> None:
        self.armed.discard(slot)
        if self.loop is not None:
            self.loop.remove_reader(self.ioeventfds[slot].fd)

    def _signalled(self, slot: int) -> None:
        writes = self.ioeventfds[slot].drain()
        if writes:
            self.stats.wakeups += 1
            self.stats.signals += writes
            self.stats.coalesced += writes - 1  # one wake-up served them all: the last value counts
            lat = self.latency
            if lat.left == 1 and not slot & 1:  # inline arrive(): ~0.1 us less per wake-up
                lat.arrived, lat.via = clock_ns(), _EVENTFD
            if self._act(slot) and self._spins_on(slot):
                self._spin_slot(slot)
        if slot & 1:
            cq = self.cqs.get(slot >> 1)
            if cq is None or cq.room > 0:
                self._disarm(slot)

    def _spins_on(self, slot: int) -> bool:
        """Spinning pays only where the slot's value is the news: not for CQ heads (lazy) and
        not under shadow doorbell buffers, whose kicks EventIdx already suppresses."""
        return not slot & 1 and (self.spin_s > 0 or self.adaptive) and (slot < 2 or self.dbbuf is None)

    def _spin_slot(self, slot: int) -> None:
        """Watch this one slot for a short window after work: a host that submits again
        within it is served without the loop going to sleep and being woken.

        A hit goes straight to the SQ, looked up once per episode: nothing but this loop runs
        meanwhile, and running a queue never deletes that queue. Counters and the policy are
        updated once, when the episode ends. The eventfd is read then too, not per hit: its count
        covers the signals of every write served here, and the slot is looked at once more
        after the read, since a write whose signal that read consumed stored its value before
        signalling. An episode yields to the loop after :data:`SPIN_EPISODE_MAX_S`, so the
        other slots, the socket and the completions of other queues keep their turn.
        """
        policy = self._spin_policy(slot)
        window = policy.window()
        if window <= 0.0:
            return
        sq = self.sqs.get(slot >> 1)
        if sq is None:
            return
        submitted = self.port.sq_tail_doorbell
        values, last, clock = self.page.value_words, self.page.last_words, time.perf_counter
        lat = self.latency
        hits = spins = 0
        waited = 0.0
        missed = False
        now = idle_since = clock()
        deadline, end = now + window, now + SPIN_EPISODE_MAX_S
        while True:
            value = values[slot]
            if value != last[slot]:
                last[slot] = value
                hits += 1
                waited += now - idle_since  # up to the last look that found nothing
                fence()  # acquire: the SQEs the tail announces are read after it
                if lat.left == 1:  # the batch this hit starts is the sampled one
                    lat.arrived, lat.via = clock_ns(), _SPIN
                submitted(sq, value)
                now = idle_since = clock()
                if now >= end:
                    break
                deadline = now + window
                continue
            spins += 1
            now = clock()
            if now >= deadline:
                missed = True
                break
        stats = self.stats
        stats.spins += spins
        stats.spin_hits += hits
        stats.doorbells += hits
        if hits:
            policy.hit(waited / hits, hits)
        if missed:
            stats.spin_misses += 1
            policy.miss()
        stats.signals += self.ioeventfds[slot].drain()
        if values[slot] != last[slot]:
            if lat.left == 1:  # the last look of the episode found a tail: a spin hit too
                lat.arrived, lat.via = clock_ns(), _SPIN
            self._act(slot)

    def _spin_policy(self, slot: int) -> "AdaptiveSpin | FixedSpin":
        """The slot's spin window: learned per slot, or the fixed ``spin_us``."""
        spin = self._spins.get(slot)
        if spin is None:
            spin = self._spins[slot] = AdaptiveSpin(ADAPTIVE_SPIN_CAP_US * 1e-6) if self.adaptive else FixedSpin(self.spin_s)
        return spin

    def _queue_event(self, event: QueueEvent, qid: int) -> None:
        super()._queue_event(event, qid)
        if event is QueueEvent.RESET or event.is_cq:
            for slot in list(self.armed):
                if event is QueueEvent.RESET or slot == 2 * qid + 1:
                    self._disarm(slot)

    def close(self) -> None:
        for efd in self.ioeventfds:
            if efd in self.bar0.ioeventfds:
                self.bar0.remove_ioeventfd(efd)
        self.ioeventfds.clear()
        super().close()
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
        if self.dbbuf is None:
            # Without Doorbell Buffer Config nothing tells us what was written.
            self.stats.lost_values += writes
            log.warning("ioeventfd doorbell %d fired but no shadow doorbell buffer holds its value", slot)
            return
        self.stats.doorbells += 1
        self.latency.arrive(_IOEVENTFD)
        self.port.doorbell(slot >> 1, bool(slot & 1), 0)  # the value is read from dbbuf

    def close(self) -> None:
        for efd in self.ioeventfds.values():
            if efd in self.bar0.ioeventfds:
                self.bar0.remove_ioeventfd(efd)
        self.ioeventfds.clear()


class PollPath(SharedPagePath):
    """The doorbell page is mapped into the client; an adaptive poller watches it."""

    mode = DoorbellMode.POLL

    def __init__(self, *args, idle_max_us: float = 1000.0, busy_spin_us: float = 50.0, **kwargs) -> None:
        kwargs.setdefault("spin_us", busy_spin_us)
        super().__init__(*args, **kwargs)
        self.idle_max_s = idle_max_us * 1e-6
        self._task: asyncio.Task[None] | None = None
        self._timers: FineTimers | None = None

    def _slot_memory(self) -> np.ndarray:
        memory = self.bar0.memory
        assert memory is not None, "poll mode needs BAR0's doorbell page to be mmappable"
        return np.frombuffer(memory.view[Reg.DOORBELLS : Reg.DOORBELLS + DOORBELL_PAGE], dtype=np.uint32, count=self.nslots)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        super().attach(loop)
        self._timers = FineTimers(loop)
        self._task = loop.create_task(self._poll(self._timers))

    def detach(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._timers is not None:
            self._timers.close()
            self._timers = None
        super().detach()

    def backoff_s(self, idle_rounds: int) -> float:
        """How long to sleep after ``idle_rounds`` empty rounds: 2, 4, 8 ... us, capped at idle_max."""
        return min(self.idle_max_s, 1e-6 * (1 << min(idle_rounds, 30)))

    async def _poll(self, timers: FineTimers) -> None:
        """Spin while work arrives; when idle, sleep exponentially longer up to idle_max.

        The sleeps are timerfd sleeps (:mod:`nvme_emu.timer`): the loop's own timers would
        round every step below a millisecond up to one. A round that raises is a bug: it
        is logged and makes the controller fatal (the host resets it), and polling goes on,
        since a poller that died silently would leave every later doorbell unserved.
        """
        idle = 0
        while True:
            t0 = time.thread_time()
            self.stats.polls += 1
            try:
                n = self._run() + self._poll_dbbuf()
            except Exception:
                log.exception("doorbell poll round failed")
                self.port.set_fatal("internal error in the doorbell poller")
                n = 0
            self.stats.poll_cpu_seconds += time.thread_time() - t0
            if n:
                self.stats.wakeups += 1
                idle = 0
                await asyncio.sleep(0)
            else:
                idle += 1
                await timers.sleep(self.backoff_s(idle))

    def _poll_dbbuf(self) -> int:
        """Under shadow doorbell buffers the SQ tails live in host memory: poll them too.

        The host's kicks land in the mapped page, where a kick repeating the slot's last
        value is invisible (see :meth:`DoorbellPath._act`); the shadow tail is not.
        """
        port = self.port
        dbbuf = self.dbbuf
        if dbbuf is None or not port.bus_master:  # host memory: not read while BME is clear
            return 0
        n = 0
        try:
            for qid, sq in list(self.sqs.items()):
                if qid and self.dbbuf is dbbuf:
                    tail = dbbuf.sq_tail(qid)
                    if tail != sq.tail and tail < sq.size:  # invalid values: the page scan reports them
                        self.latency.arrive(_POLL)
                        port.doorbell(qid, False, 0)
                        n += 1
        except RingUnavailable:
            pass  # the buffer was unmapped; the controller notices on its next access
        self.stats.doorbells += n
        return n


PATHS: dict[DoorbellMode, type[DoorbellPath]] = {
    DoorbellMode.AUTO: AutoPath,
    DoorbellMode.TRAP: TrapPath,
    DoorbellMode.SHADOW: ShadowPath,
    DoorbellMode.IOEVENTFD: IoEventFdPath,
    DoorbellMode.POLL: PollPath,
}


def make_path(mode: DoorbellMode | str, port: DoorbellPort, bar0: Region, **kwargs) -> DoorbellPath:
    return PATHS[DoorbellMode(mode)](port, bar0, **kwargs)


def bar0_mmap_areas(mode: DoorbellMode | str) -> list[tuple[int, int]]:
    """Only the poll path maps the doorbell page (any mmap turns QEMU's posted writes off)."""
    return [(Reg.DOORBELLS, DOORBELL_PAGE)] if DoorbellMode(mode) == DoorbellMode.POLL else []

