"""Shadow ioeventfds with the server in this process, so the test can hold its loop still
while the host rings (what a vCPU does while the server thread is busy elsewhere), and read
the path's internal counters.
"""

from __future__ import annotations

import pytest

from ..support.server import wait_until
from .db_helpers import LBA, PAGE, pattern
from nvme_emu.spec.commands import NvmOpcode, Status
from nvme_emu.spec.registers import Reg


@pytest.mark.parametrize("spin_us", [0, 100])
def test_coalesced_shadow_writes_lose_nothing(inproc, session, spin_us):
    srv = inproc("shadow", spin_us=spin_us)
    s = session(srv.path)
    s.bring_up("shadow", depth=64)
    sq_fd = s.host.doorbells.by_slot[2]
    n = 40
    wbufs = [s.mem.alloc(PAGE) for _ in range(n)]
    for i, buf in enumerate(wbufs):
        s.mem.write(buf, pattern(7, i))
    srv.settle()
    db0 = srv.doorbell_stats()
    q0 = srv.stats()["queues"]["sq1"]
    with srv.paused():
        # n POST_WRITEs (value, then signal) while the server cannot run
        cids = [s.submit_io(1, NvmOpcode.WRITE, i * (PAGE // LBA), buf, ring=True) for i, buf in enumerate(wbufs)]
        assert int.from_bytes(sq_fd.shadow[sq_fd.shadow_offset : sq_fd.shadow_offset + 4], "little") == n  # only the last value
        assert srv.function.controller.sqs[1].tail == 0  # nothing seen yet
    done = s.host.wait(1, n)
    assert sorted(c.cid for c in done) == sorted(cids)
    assert all(c.status == Status.SUCCESS for c in done)
    s.expect_no_completion(1)
    srv.settle()
    db = srv.doorbell_stats()
    q = srv.stats()["queues"]["sq1"]
    d = {k: db[k] - db0[k] for k in ("signals", "wakeups", "coalesced", "doorbells", "spins", "spin_hits")}
    print(
        f"shadow burst of {n} (spin_us={spin_us}): {d}, sq1 commands +{q['commands'] - q0['commands']} batches +{q['batches'] - q0['batches']} "
        f"max_batch {q['max_batch']}"
    )
    # exactly once: n commands, all in one batch from one wake-up on the SQ tail eventfd
    assert q["commands"] - q0["commands"] == n
    assert q["batches"] - q0["batches"] == 1 and q["max_batch"] == n
    assert d["signals"] >= n  # every write counted (plus CQ head doorbells of the reaps)
    assert d["coalesced"] >= n - 1
    assert d["wakeups"] < d["signals"]
    if spin_us:
        assert d["spins"] > 0
    # and the data are there
    rbufs = [s.mem.alloc(PAGE) for _ in range(n)]
    for i, buf in enumerate(rbufs):
        s.submit_io(1, NvmOpcode.READ, i * (PAGE // LBA), buf, ring=False)
    s.host.ring_sq(1)
    assert all(c.status == Status.SUCCESS for c in s.host.wait(1, n))
    assert [s.mem.read(b, PAGE) for b in rbufs] == [pattern(7, i) for i in range(n)]


def test_signals_without_value_change_are_harmless(inproc, session):
    """Extra eventfd signals with an unchanged shadow slot (e.g. a write of the same tail)
    wake the server, which finds nothing new and processes nothing twice."""
    srv = inproc("shadow")
    s = session(srv.path)
    s.bring_up("shadow", depth=16)
    s.write_read_check(1, 0, 4, qd=4)
    srv.settle()
    q0 = srv.stats()["queues"]["sq1"]["commands"]
    db0 = srv.doorbell_stats()
    fd = s.host.doorbells.by_slot[2]
    for _ in range(5):
        fd.emulate_post_write(s.host.queues[1].tail)  # same value again
    wait_until(lambda: srv.doorbell_stats()["signals"] >= db0["signals"] + 5, "the 5 signals")
    s.expect_no_completion(1)
    assert srv.stats()["queues"]["sq1"]["commands"] == q0


def test_ioeventfd_path_without_dbbuf_counts_lost_values(inproc, session):
    """Plain ioeventfds carry no value: without Doorbell Buffer Config a signal cannot be
    served (counted as lost); trapped writes still work on the same controller."""
    srv = inproc("ioeventfd")
    s = session(srv.path)
    s.bring_up("trap", depth=16)
    iofds = s.client.region_io_fds(0)
    by_slot = {(f.gpa_offset - Reg.DOORBELLS) // 4: f for f in iofds}
    assert min(by_slot) == 2 and all(f.shadow is None for f in iofds)  # admin queue: trapped
    s.submit_io(1, NvmOpcode.READ, 0, s.mem.alloc(PAGE), ring=False)
    by_slot[2].signal()
    wait_until(lambda: srv.doorbell_stats()["lost_values"] >= 1, "the lost value to be counted")
    s.expect_no_completion(1)
    s.host.ring_sq(1)  # trapped: served
    assert s.host.wait(1, 1)[0].status == Status.SUCCESS


def test_poll_path_reports_cpu_in_process(inproc, session):
    srv = inproc("poll")
    s = session(srv.path)
    s.bring_up("poll", depth=16)
    s.write_read_check(1, 0, 12, qd=3)
    db = srv.doorbell_stats()
    print(f"poll: {db}")
    assert db["polls"] > 0 and db["wakeups"] > 0 and db["trapped"] == 0
    assert db["poll_cpu_seconds"] > 0.0
