"""Interrupt coalescing (Features 08h/09h) in-process: THR and TIME decide whether a CQ's
interrupt goes now or when a timer expires; a deleted CQ's timer delivers nothing."""

from __future__ import annotations

from .area_helpers import BUF, Area

from nvme_emu.coalescing import Coalescing
from nvme_emu.queue import CompletionQueue


class Timer:
    def __init__(self, delay: float, fn) -> None:
        self.delay, self.fn, self.cancelled = delay, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    """Stands in for FineTimers: keeps the timers so the test fires them."""

    def __init__(self) -> None:
        self.made: list[Timer] = []

    def call_later(self, delay: float, fn) -> Timer:
        self.made.append(Timer(delay, fn))
        return self.made[-1]


def setup(area: Area, coalescing: int):
    area.state.features.coalescing = coalescing
    cq = area.state.cqs[1] = CompletionQueue(1, BUF, 16, vector=1, irq_enabled=True)
    flushed: list[CompletionQueue] = []
    return cq, Coalescing(area.state, flushed.append), Timers(), flushed


def test_no_time_means_no_delay(area: Area):
    cq, co, timers, _ = setup(area, 0x0005)  # THR 5, TIME 0
    cq.unsignalled = 1
    assert co.allows(cq, timers) and not timers.made


def test_below_threshold_waits_for_time(area: Area):
    cq, co, timers, flushed = setup(area, 0x0203)  # THR 3 (4 completions), TIME 2 x 100 us
    cq.unsignalled = 2
    assert not co.allows(cq, timers)
    assert not co.allows(cq, timers)  # one timer per CQ
    assert len(timers.made) == 1 and abs(timers.made[0].delay - 200e-6) < 1e-9
    timers.made[0].fn()
    assert flushed == [cq]


def test_threshold_reached_goes_now_and_cancels_timer(area: Area):
    cq, co, timers, _ = setup(area, 0x0203)
    cq.unsignalled = 1
    co.allows(cq, timers)
    cq.unsignalled = 4
    assert co.allows(cq, timers) and timers.made[0].cancelled


def test_vector_with_coalescing_disabled(area: Area):
    cq, co, timers, _ = setup(area, 0x0203)
    area.state.features.vector_config[1] = True
    cq.unsignalled = 1
    assert co.allows(cq, timers)


def test_deleted_cq_gets_nothing(area: Area):
    cq, co, timers, flushed = setup(area, 0x0203)
    cq.unsignalled = 1
    co.allows(cq, timers)
    del area.state.cqs[1]
    timers.made[0].fn()
    assert flushed == []
