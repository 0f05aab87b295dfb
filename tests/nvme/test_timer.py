"""nvme_emu.timer: microsecond timers on a real timerfd in a real uvloop loop."""

from __future__ import annotations

import asyncio
import os

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
        # gaps of 2 ms: far more than one call_later costs, even the first (cffi warms up)
        timers.call_later(6e-3, lambda: fired.append("c"))
        timers.call_later(2e-3, lambda: fired.append("a"))
        dropped = timers.call_later(3e-3, lambda: fired.append("x"))
        timers.call_later(4e-3, lambda: fired.append("b"))
        timers.call_later(8e-3, lambda: done.set_result(None))
        dropped.cancel()
        await asyncio.wait_for(done, 5)
        timers.close()
        return fired

    assert _run(body) == ["a", "b", "c"]


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
