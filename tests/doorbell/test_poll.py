"""The poll path's poller: a real exponential back-off when idle, and no silent death."""

from __future__ import annotations

import time

from ..support.server import wait_until
from .db_helpers import PATHS

IDLE_S = 0.5


def test_idle_poller_backs_off_to_its_cap(inproc, session):
    """Idle, the poller sleeps 2, 4 ... us up to idle_max (200 us here): about IDLE_S / 200 us rounds.

    With the loop's own timers a sub-millisecond sleep returned at once (uvloop keeps whole
    milliseconds and rounds 200 us down to 0), so an idle poller with a cap below 1 ms spun
    flat out: tens of thousands of rounds in the same time. The bound below is an upper
    one: a slow or busy machine only makes the count smaller.
    """
    srv = inproc("poll", poll_idle_max_us=200)
    s = session(srv.path)
    s.bring_up(PATHS["poll"][1], depth=8)
    s.write_read_check(1, 0, 2, qd=1)
    time.sleep(0.05)  # past the busy spin window after the last doorbell
    before = srv.doorbell_stats()["polls"]
    time.sleep(IDLE_S)
    rounds = srv.doorbell_stats()["polls"] - before
    cap_s = srv.doorbells.idle_max_s
    print(f"{rounds} poll rounds in {IDLE_S} s idle (cap {cap_s * 1e6:.0f} us)")
    assert 0 < rounds <= 2 * IDLE_S / cap_s + 64, rounds
    assert [srv.doorbells.backoff_s(n) for n in (1, 2, 3)] == [2e-6, 4e-6, 8e-6]
    assert srv.doorbells.backoff_s(40) == cap_s


def test_a_failing_poll_round_makes_the_controller_fatal_and_polling_goes_on(inproc, session):
    srv = inproc("poll")
    s = session(srv.path)
    kind = PATHS["poll"][1]
    s.bring_up(kind, depth=8)
    path = srv.doorbells
    real = path._poll_dbbuf
    failures: list[int] = []

    def broken() -> int:
        if not failures:
            failures.append(1)
            raise RuntimeError("injected poller bug")
        return real()

    srv.call(lambda: setattr(path, "_poll_dbbuf", broken))
    wait_until(lambda: srv.call(lambda: srv.ctrl.fatal), "CSTS.CFS after the poller's failure")
    polls = srv.doorbell_stats()["polls"]
    wait_until(lambda: srv.doorbell_stats()["polls"] > polls + 10, "the poller to keep polling")
    # The host resets the controller (what Linux does on CFS) and I/O works again.
    s.reset_and_bring_up(kind, depth=8)
    s.write_read_check(1, 0, 3, qd=1, seed=7)
    assert failures == [1]
