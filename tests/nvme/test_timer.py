"""nvme_emu.timer: microsecond timers on a real timerfd in a real uvloop loop."""

from __future__ import annotations

import asyncio
import math
import os
import time

import pytest
import uvloop

from nvme_emu.timer import FineTimers


def _run(coro_fn):
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(coro_fn(loop))
    finally:
        loop.close()


def test_timers_fire_in_deadline_order_and_cancelled_ones_never():
    async def body(loop):
        timers = FineTimers(loop)
        fired: list[str] = []
        done = loop.create_future()
        # Scheduled out of order; each timer's deadline is what its call_later made of its
        # delay (monotonic time at the call plus the delay), so a busy machine that stalls
        # between two calls changes the deadlines, not what the test expects of them.
        deadlines = {}
        for name, delay in (("c", 6e-3), ("a", 2e-3), ("x", 3e-3), ("b", 4e-3)):
            timer = timers.call_later(delay, lambda name=name: fired.append(name))
            deadlines[name] = timer.deadline
            if name == "x":
                timer.cancel()
        timers.call_later(8e-3, lambda: done.set_result(None))
        await asyncio.wait_for(done, 5)
        timers.close()
        return fired, sorted((d, n) for n, d in deadlines.items() if n != "x")

    fired, by_deadline = _run(body)
    assert fired == [n for _, n in by_deadline]
    assert "x" not in fired


def test_sleep_returns_and_a_failing_callback_does_not_lose_the_others():
    async def body(loop):
        timers = FineTimers(loop)
        fired: list[int] = []

        def boom() -> None:
            raise RuntimeError("callback bug")

        timers.call_later(0, boom)
        timers.call_later(0, lambda: fired.append(1))
        await timers.sleep(50e-6)
        await timers.sleep(0)
        timers.close()
        return fired

    assert _run(body) == [1]


def test_close_releases_the_fd_and_is_idempotent():
    async def body(loop):
        before = len(os.listdir("/proc/self/fd"))
        timers = FineTimers(loop)
        assert len(os.listdir("/proc/self/fd")) == before + 1
        timers.call_later(1.0, lambda: None)
        timers.close()
        timers.close()
        return before

    before = _run(body)
    assert len(os.listdir("/proc/self/fd")) <= before


async def _a_good_timer_still_fires(loop, timers: FineTimers, fired: list[str]) -> list[str]:
    """After whatever the test did: a 100 us timer fires (then the timers close); what fired."""
    done = loop.create_future()
    timers.call_later(100e-6, lambda: fired.append("good"))
    timers.call_later(200e-6, lambda: done.set_result(None))
    await asyncio.wait_for(done, 5)
    timers.close()
    return fired


def test_a_delay_that_is_not_finite_is_refused_and_poisons_nothing():
    """A NaN or infinite deadline broke the heap (NaN compares false with everything) and the
    timerfd could not be armed for it, so every later timer's callback was lost (issue 22,
    finding 9). Such delays are refused; a huge finite one is clamped; a raising callback is
    logged; a 100 us timer set afterwards fires."""
    async def body(loop):
        timers = FineTimers(loop)
        fired: list[str] = []
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValueError):
                timers.call_later(bad, lambda: fired.append("bad"))
        far = timers.call_later(1e300, lambda: fired.append("far"))
        assert far.deadline <= time.monotonic() + 366 * 86400

        def boom() -> None:
            raise RuntimeError("callback bug")

        timers.call_later(50e-6, boom)
        return await _a_good_timer_still_fires(loop, timers, fired)

    assert _run(body) == ["good"]


def test_an_entry_the_timerfd_cannot_take_is_dropped_not_kept(caplog):
    """Belt and braces: should an entry reach the heap that the timerfd refuses (here forced
    past the clamp), it is logged and dropped, and the timers behind it still fire."""
    async def body(loop):
        timers = FineTimers(loop)
        fired: list[str] = []
        timers.call_later(1.0, lambda: fired.append("poison"))  # its deadline is replaced below
        poisoned = timers._heap[0]
        timers._heap[0] = (1e300, poisoned[1], poisoned[2])
        return await _a_good_timer_still_fires(loop, timers, fired)

    assert _run(body) == ["good"]
    assert "cannot arm" in caplog.text
