"""The shadow path's default spin: a window learned from the host (AdaptiveSpin).

The policy is tested on its own, deterministically; the server is tested with a host too
slow for any window, where only the back-off can keep the misses down. That a fast host is
caught by the window is a speed claim: bench/server_throughput.py measures it.
"""

from __future__ import annotations

import time

import pytest

from nvme_emu.doorbell import ADAPTIVE_SPIN_FLOOR_US, ADAPTIVE_SPIN_MAX_SKIP, AdaptiveSpin
from nvme_emu.spec.commands import NvmOpcode, Status

from .db_helpers import PAGE

CAP = 20e-6


def _opened(spin: AdaptiveSpin, wakeups: int) -> list[int]:
    """Which of ``wakeups`` fresh wake-ups open a window, when every window misses."""
    opened = []
    for i in range(wakeups):
        if spin.window() > 0:
            opened.append(i)
            spin.miss()
    return opened


def test_first_window_is_the_cap_and_hits_shrink_it_towards_the_gap():
    spin = AdaptiveSpin(CAP)
    assert spin.window() == pytest.approx(CAP)
    for _ in range(64):
        spin.hit(0.2e-6)  # the host comes back at once
    assert spin.window() == pytest.approx(ADAPTIVE_SPIN_FLOOR_US * 1e-6, rel=0.2)
    for _ in range(64):
        spin.hit(4e-6)
    assert spin.window() == pytest.approx(16e-6, rel=0.1)  # four times the usual gap
    for _ in range(64):
        spin.hit(50e-6)
    assert spin.window() == pytest.approx(CAP)  # never past the cap


def test_misses_back_off_exponentially_up_to_the_cap_and_a_hit_resets():
    spin = AdaptiveSpin(CAP)
    opened = _opened(spin, 1000)
    gaps = [b - a - 1 for a, b in zip(opened, opened[1:], strict=False)]  # wake-ups skipped between windows
    assert gaps[:7] == [1, 2, 4, 8, 16, 32, 64]
    assert set(gaps[7:]) == {ADAPTIVE_SPIN_MAX_SKIP}
    spin.skip = 0
    spin.hit(3e-6)
    spin.miss()  # the first miss after a hit skips one wake-up again, not 64
    assert spin.window() == 0.0 and spin.window() > 0


def test_hits_counted_at_once_learn_as_much_as_one_by_one():
    one, many = AdaptiveSpin(CAP), AdaptiveSpin(CAP)
    for _ in range(5):
        one.hit(3e-6)
    many.hit(3e-6, 5)  # an episode of five hits, updated when it ends
    assert many.gap_s == pytest.approx(one.gap_s)
    assert many.window() == pytest.approx(one.window())


def test_slow_host_costs_few_spin_windows(serve, session):
    """A QD1 host that comes back only after milliseconds never meets a window: the server
    (default options: adaptive) must stop opening one for most of its wake-ups, and serve
    every I/O right all the same."""
    srv = serve("shadow")
    s = session(srv.path)
    s.bring_up("shadow", depth=8)
    before = srv.stats()["doorbells"]
    n = 24
    buf = s.mem.alloc(PAGE)
    for i in range(n):
        s.mem.write(buf, bytes([i]) * PAGE)
        s.submit_io(1, NvmOpcode.WRITE, i * 8, buf, ring=True)
        (c,) = s.host.wait(1, 1)
        assert c.status == Status.SUCCESS
        time.sleep(0.003)  # far past the window's cap
    after = srv.stats()["doorbells"]
    d = {k: after[k] - before[k] for k in ("wakeups", "spins", "spin_hits", "spin_misses")}
    print(f"slow host, {n} QD1 writes: {d}")
    assert d["wakeups"] == n, d
    # With no hits, 24 wake-ups open windows at 0, 2, 5, 10 and 19: 5 misses. A spin that a
    # descheduled server resumes late may see the next tail (a hit, which resets the
    # back-off); a window at every wake-up would be 24 misses.
    assert 3 <= d["spin_misses"] <= 10, d
    assert d["spin_hits"] <= 2, d
    assert [blk[:1] for blk in s.read_blocks(1, 0, n)][::8] == [bytes([i]) for i in range(0, n, 8)]
