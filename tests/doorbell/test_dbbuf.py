"""Doorbell Buffer Config (shadow doorbells in host memory) + EventIdx, with the server in this
process so the test can hold it still or act at the exact moment of the lost race.

Kicks (the real doorbell write EventIdx asks for) go by trapped REGION_WRITE, by a plain
ioeventfd the client signals itself (= what KVM does; mode ioeventfd, nothing registered with
KVM here), by a shadow ioeventfd, or into the poll path's mapped page.
"""

from __future__ import annotations

import threading

import pytest

from ..support.server import DEADLINE
from .db_helpers import LBA, PAGE, PATHS, Status
from nvme_emu.spec.commands import NvmOpcode

KICKS = ["dbbuf-trap", "dbbuf-ioeventfd", "dbbuf-shadow", "dbbuf-poll"]


def _reads(s, count: int, *, ring: bool, first: int = 0) -> list[int]:
    return [s.submit_io(1, NvmOpcode.READ, (first + i) * (PAGE // LBA), s.mem.alloc(PAGE), ring=ring) for i in range(count)]


def _ok(done, cids) -> None:
    assert sorted(c.cid for c in done) == sorted(cids)
    assert all(c.status == Status.SUCCESS for c in done), done


@pytest.mark.parametrize("kind", KICKS)
def test_eventidx_suppresses_rings_during_a_burst(inproc, session, kind):
    mode, _ = PATHS[kind]
    srv = inproc(mode)
    s = session(srv.path)
    s.bring_up(kind, depth=64)
    db = s.host.doorbells
    cids = _reads(s, 1, ring=True)
    _ok(s.host.wait(1, 1), cids)  # the server is idle, EventIdx = tail
    srv.settle()
    assert s.eventidx(2) == s.shadow_tail(2) == 1
    kicks0, supp0 = s.kicks_by_slot.get(2, 0), db.suppressed
    n = 30
    with srv.paused():
        cids = _reads(s, n, ring=True)
    # the first ring of the burst passes EventIdx, the server cannot move it: all others suppressed
    assert s.kicks_by_slot[2] - kicks0 == 1
    assert db.suppressed - supp0 >= n - 1
    _ok(s.host.wait(1, n), cids)
    s.expect_no_completion(1)
    srv.settle()
    assert s.eventidx(2) == s.shadow_tail(2) == 1 + n  # re-armed at the consumed tail
    print(f"{kind}: burst of {n}: kicks {s.kicks_by_slot[2] - kicks0}, suppressed {db.suppressed - supp0}, sq1 {srv.stats()['queues']['sq1']}")
    # idle again: the next single submission rings the real doorbell
    k = s.kicks_by_slot[2]
    cids = _reads(s, 1, ring=True)
    _ok(s.host.wait(1, 1), cids)
    assert s.kicks_by_slot[2] == k + 1


@pytest.mark.parametrize("kind", KICKS)
def test_lost_race_recheck_then_repeated_kick_value(inproc, session, kind):
    """The host writes its shadow tail after the server's last look but before the server
    publishes EventIdx, so it does not ring (EventIdx still old): the server's re-check after
    publishing must find the work. Then the next kick carries the same value as the kick
    before the race (depth 8, batches of 4: kicks 4, [0 suppressed], 4): it must still count.
    """
    mode, _ = PATHS[kind]
    srv = inproc(mode)
    s = session(srv.path)
    s.bring_up(kind, depth=8)
    ctrl = srv.ctrl
    db = s.host.doorbells
    real = ctrl.process_sq
    raced = threading.Event()
    batch_b: list[int] = []

    def process_sq(sq):
        n = real(sq)
        if sq.qid == 1 and not raced.is_set():
            # the host, right now: 4 more commands and a ring that EventIdx suppresses
            supp = db.suppressed
            batch_b.extend(_reads(s, 4, ring=False, first=4))
            s.host.ring_sq(1)
            assert db.suppressed == supp + 1, "the race ring was not suppressed"
            raced.set()
        return n

    ctrl.process_sq = process_sq
    try:
        kicks0 = s.kicks_by_slot.get(2, 0)
        coalesced0 = ctrl.sqs[1].stats.coalesced
        batch_a = _reads(s, 4, ring=False)
        s.host.ring_sq(1)  # kick with tail 4
        assert raced.wait(DEADLINE)
        _ok(s.host.wait(1, 8), batch_a + batch_b)
    finally:
        ctrl.process_sq = real
    assert ctrl.sqs[1].stats.coalesced == coalesced0 + 1  # found by the re-check
    assert s.kicks_by_slot[2] == kicks0 + 1
    srv.settle()
    assert s.eventidx(2) == s.shadow_tail(2) == 0
    # next kick: tail 4 again, the value of the last kick this slot saw
    batch_c = _reads(s, 4, ring=False, first=8)
    s.host.ring_sq(1)
    assert s.kicks_by_slot[2] == kicks0 + 2
    _ok(s.host.wait(1, 4), batch_c)
    s.write_read_check(1, 64, 6, qd=3)


@pytest.mark.parametrize("kind", ["dbbuf-trap", "dbbuf-ioeventfd"])
def test_recheck_bound_does_not_strand_a_busy_host(inproc, session, kind):
    """A host that submits during every processing round keeps the re-check loop going past its
    bound (64 rounds); EventIdx then lags the tail and the host will not ring again, so the
    server must come back by itself and finish."""
    mode, _ = PATHS[kind]
    srv = inproc(mode)
    s = session(srv.path)
    s.bring_up(kind, depth=256)
    ctrl = srv.ctrl
    real = ctrl.process_sq
    total = 100
    extra: list[int] = []
    finished = threading.Event()

    def process_sq(sq):
        n = real(sq)
        if sq.qid == 1 and len(extra) < total:
            extra.extend(_reads(s, 1, ring=True, first=len(extra) % 64))  # suppressed: EventIdx is behind
            if len(extra) == total:
                finished.set()
        return n

    ctrl.process_sq = process_sq
    try:
        first = _reads(s, 1, ring=True)
        assert finished.wait(DEADLINE), f"server stopped after {len(extra)} of {total} re-check rounds"
        _ok(s.host.wait(1, total + 1), first + extra)
    finally:
        ctrl.process_sq = real
    st = ctrl.sqs[1].stats
    print(f"{kind}: {total + 1} commands, {st.batches} batches, {st.coalesced} found by re-check, kicks {s.kicks_by_slot.get(2)}")
    assert st.commands == total + 1
    assert st.coalesced > 64  # the re-check loop ran past its bound and the server came back
    srv.settle()
    assert s.eventidx(2) == s.shadow_tail(2)


def test_dbbuf_is_dropped_by_reset_and_reconfigured(inproc, session):
    srv = inproc("trap")
    s = session(srv.path)
    s.bring_up("dbbuf-trap", depth=16)
    s.write_read_check(1, 0, 6, qd=3)
    assert srv.ctrl.dbbuf is not None
    s.host.doorbells = s.host.doorbells.inner
    s.host.disable()
    assert srv.call(lambda: srv.ctrl.dbbuf) is None
    s.host.enable()
    s.host.create_io_queue_pair(1, 16)
    s.write_read_check(1, 0, 6, qd=3)  # plain trapped doorbells after the reset
    s.reset_and_bring_up("dbbuf-trap", depth=16)
    assert srv.call(lambda: srv.ctrl.dbbuf) is not None
    s.write_read_check(1, 128, 6, qd=6)


@pytest.mark.parametrize("kind", ["dbbuf-trap", "dbbuf-ioeventfd"])
def test_unmapped_doorbell_buffer_is_controller_fatal(inproc, session, kind):
    """A kick whose shadow buffer the client unmapped: CSTS.CFS, not an exception in the
    server's loop (the inproc fixture fails on those); a reset with memory back recovers."""
    from .db_helpers import IOVA, RAM_SIZE
    from nvme_emu.spec.registers import Csts, Reg

    mode, _ = PATHS[kind]
    srv = inproc(mode)
    s = session(srv.path)
    s.bring_up(kind, depth=16)
    s.write_read_check(1, 0, 2, qd=2)
    s.client.dma_unmap(IOVA, RAM_SIZE)
    s.host.doorbells.ring(2, 1)  # shadow store in host memory, then the kick
    srv.settle()
    assert s.host.reg32(Reg.CSTS) & Csts.CFS
    s.client.dma_map(IOVA, RAM_SIZE, s.ram)
    s.reset_and_bring_up(kind, depth=16)
    s.write_read_check(1, 0, 2, qd=2)
