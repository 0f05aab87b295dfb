"""aio.IoPool: blocking calls on worker threads, results back on the loop thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from nvme_emu.aio import IoPool
from vfio_user.server import new_event_loop


@pytest.fixture
def loop():
    lp = new_event_loop()
    yield lp
    lp.close()


def test_results_and_errors_come_back_on_the_loop_thread(loop):
    pool = IoPool(loop, workers=3)
    seen: list[tuple] = []
    loop_thread = threading.get_ident()
    done = loop.create_future()

    def callback(tag):
        def cb(result, error):
            seen.append((tag, result, type(error).__name__ if error else None, threading.get_ident() == loop_thread))
            if len(seen) == 3:
                done.set_result(None)

        return cb

    def boom():
        raise OSError(5, "EIO")

    pool.submit(lambda: threading.get_ident(), callback("a"))
    pool.submit(boom, callback("b"))
    pool.submit(lambda: 42, callback("c"))
    assert pool.pending == 3
    loop.run_until_complete(asyncio.wait_for(done, 10))
    by_tag = {t: (r, e, on_loop) for t, r, e, on_loop in seen}
    assert by_tag["a"][0] != loop_thread  # ran on a worker
    assert by_tag["b"][1:] == ("OSError", True)
    assert by_tag["c"] == (42, None, True)
    assert pool.pending == 0
    pool.close()


def test_a_slow_call_does_not_hold_back_the_others(loop):
    pool = IoPool(loop, workers=2)
    gate = threading.Event()
    order: list[str] = []
    fast_done = loop.create_future()
    pool.submit(lambda: gate.wait(10), lambda r, e: order.append("slow"))
    pool.submit(lambda: None, lambda r, e: (order.append("fast"), fast_done.set_result(None)))
    loop.run_until_complete(asyncio.wait_for(fast_done, 10))
    assert order == ["fast"]
    gate.set()
    pool.close()  # joins the workers: the slow call finished, its result is dropped
    assert not any(t.is_alive() for t in pool._threads)
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None, lambda r, e: None)


def test_when_idle_waits_for_every_submitted_call(loop):
    """A deleted namespace's fd closes only after the last worker call that may use it."""
    pool = IoPool(loop, workers=2)
    release = threading.Event()
    order: list[str] = []
    idle = loop.create_future()
    pool.when_idle(lambda: order.append("idle-at-once"))  # nothing pending: runs now
    pool.submit(release.wait, lambda r, e: order.append("call"))
    pool.when_idle(lambda: (order.append("idle"), idle.set_result(None)))
    assert order == ["idle-at-once"]
    loop.call_soon(release.set)
    loop.run_until_complete(asyncio.wait_for(idle, 10))
    assert order == ["idle-at-once", "call", "idle"]
    pool.close()


def test_quiesce_cancels_queued_calls_it_selects_and_waits_for_running_ones(loop):
    """Two workers: one runs a call on buffer A (held 0.3 s), one a call with no buffer that
    stays blocked; queued behind them, one more call on A and one on B. quiesce(A) waits for
    the running A call, takes the queued A call back with the caller's error, leaves B and
    the blocked call alone, and has delivered every callback it concerns when it returns."""
    pool = IoPool(loop, workers=2)
    a, b = bytearray(8), bytearray(8)
    view_a, view_b = memoryview(a), memoryview(b)
    release_a, stuck = threading.Event(), threading.Event()
    started = threading.Semaphore(0)
    got: dict[str, tuple] = {}

    def run(gate: threading.Event, tag: str):
        def fn():
            started.release()
            gate.wait(10)
            return tag

        return fn

    def cb(tag: str):
        return lambda result, error: got.__setitem__(tag, (result, type(error).__name__ if error else None))

    pool.submit(run(release_a, "running-a"), cb("running-a"), [view_a[:4]])
    pool.submit(run(stuck, "blocked"), cb("blocked"), ())
    assert started.acquire(timeout=10) and started.acquire(timeout=10)  # both workers busy
    pool.submit(lambda: a.__setitem__(0, 1), cb("queued-a"), [view_a[4:]])
    pool.submit(lambda: "b", cb("queued-b"), [view_b])
    threading.Timer(0.3, release_a.set).start()
    cancelled = pool.quiesce(lambda views: any(v.obj is a for v in views), lambda: LookupError("gone"))
    assert cancelled == 1
    assert got["running-a"] == ("running-a", None) and got["queued-a"] == (None, "LookupError")
    assert a[0] == 0, "the cancelled call ran"
    assert "blocked" not in got  # not waited for: it uses no A (queued-b may have run meanwhile)
    stuck.set()
    deadline = loop.time() + 10
    while pool.pending and loop.time() < deadline:
        loop.run_until_complete(asyncio.sleep(0.01))
    assert got["blocked"] == ("blocked", None) and got["queued-b"] == ("b", None)
    pool.close()


def test_started_calls_complete_from_any_thread_on_the_loop_thread(loop):
    """IoPool.start: a call completed by another thread (as librbd's callbacks are) comes back
    on the loop thread; one whose start raises gets that error; when_idle waits for them; no
    worker runs anything."""
    pool = IoPool(loop, workers=1)
    loop_thread = threading.get_ident()
    seen: dict[str, tuple] = {}
    done = loop.create_future()

    def cb(tag):
        def callback(result, error):
            seen[tag] = (result, type(error).__name__ if error else None, threading.get_ident() == loop_thread)
            if len(seen) == 2:
                done.set_result(None)

        return callback

    def refused(complete):
        raise OSError(22, "EINVAL")

    pool.start(lambda complete: threading.Timer(0.05, complete, (7, None)).start(), cb("later"))
    pool.start(refused, cb("refused"))
    idle: list[str] = []
    pool.when_idle(lambda: idle.append("idle"))
    assert pool.pending == 2 and not idle
    loop.run_until_complete(asyncio.wait_for(done, 10))
    assert seen == {"later": (7, None, True), "refused": (None, "OSError", True)}
    assert idle == ["idle"] and pool.pending == 0
    pool.close()


def test_quiesce_cancels_started_calls_and_drops_their_late_completion(loop):
    """A started call on the quiesced memory completes at once with the quiesce's error and is
    never waited for; its completion, arriving later, runs no callback; a started call on
    other memory goes on; after close a late completion is dropped (no write to a closed fd)."""
    pool = IoPool(loop, workers=1)
    a, b = memoryview(bytearray(8)), memoryview(bytearray(8))
    completes: dict[str, object] = {}
    got: list[tuple] = []
    pool.start(lambda c: completes.__setitem__("a", c), lambda r, e: got.append(("a", r, type(e).__name__ if e else None)), [a])
    pool.start(lambda c: completes.__setitem__("b", c), lambda r, e: got.append(("b", r, type(e).__name__ if e else None)), [b])
    assert pool.quiesce(lambda views: any(v is a for v in views), lambda: LookupError("gone")) == 1
    assert got == [("a", None, "LookupError")] and pool.pending == 1
    completes["a"]("late data", None)  # from "librbd", after the cancel
    completes["b"]("b data", None)
    deadline = loop.time() + 10
    while pool.pending and loop.time() < deadline:
        loop.run_until_complete(asyncio.sleep(0.01))
    assert got == [("a", None, "LookupError"), ("b", "b data", None)]
    pool.start(lambda c: completes.__setitem__("c", c), lambda r, e: got.append(("c", r, e)), [a])
    pool.close()
    completes["c"]("after close", None)  # dropped, no error
    assert len(got) == 2
