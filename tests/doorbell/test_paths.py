"""Every doorbell path, each with a separate ``python -m nvme_emu serve --doorbell MODE`` process
driven by the real vfio-user client and the host driver.

Paths (see db_helpers.PATHS): trap (REGION_WRITE), shadow (shadow ioeventfds, client-emulated
POST_WRITE), poll (BAR0's sparse mmap area), dbbuf with a trapped kick, dbbuf with a plain
ioeventfd kick (the client signals the eventfd itself, as KVM would).
"""

from __future__ import annotations

import pytest

from ..support.server import wait_until
from .db_helpers import LBA, NS_SIZE, PAGE, PATHS, pattern
from nvme_emu.spec.commands import AdminOpcode, NvmOpcode, Status
from nvme_emu.spec.events import AsyncEventError, AsyncEventType
from nvme_emu.spec.log_pages import LogPageId
from vfio_user.constants import RegionIndex
from vfio_user.pci import COMMAND, COMMAND_MASTER

PATH_IDS = list(PATHS)

#: Which counter of the CLI's stats line proves the path carried the I/O doorbells.
CARRIER = {
    "trap": "trapped",
    "shadow": "signals",
    "poll": "polls",
    "dbbuf-trap": "trapped",
    "dbbuf-ioeventfd": "signals",
    "dbbuf-shadow": "signals",
    "dbbuf-poll": "polls",
}


@pytest.mark.parametrize("path", PATH_IDS)
def test_data_integrity_qd1_and_batched(serve, session, path):
    mode, kind = PATHS[path]
    srv = serve(mode)
    s = session(srv.path)
    s.bring_up(kind, depth=32)
    before = srv.stats()
    s.write_read_check(1, 0, 6, qd=1, seed=1)
    s.write_read_check(1, 256, 24, qd=8, seed=2)  # 8 per doorbell
    s.write_read_check(1, 1024, 31, qd=31, seed=3)  # a full queue, one doorbell
    st = srv.stats()
    print(f"{path}: {st}")
    assert st["doorbell_mode"] == mode
    q = st["queues"]["sq1"]
    assert q["commands"] == q["cq_completions"] == 2 * (6 + 24 + 31)
    assert q["max_batch"] > 1, "batched submissions were processed one doorbell at a time"
    db, db0 = st["doorbells"], before["doorbells"]
    assert db[CARRIER[path]] > db0[CARRIER[path]]
    if path in ("shadow", "poll", "dbbuf-ioeventfd", "dbbuf-shadow", "dbbuf-poll"):
        # the I/O queue never needed a REGION_WRITE (the admin queue may, on dbbuf-ioeventfd)
        assert db["trapped"] == db0["trapped"]
    if mode == "poll":
        assert db["wakeups"] > 0 and "poll_cpu_seconds" in db
        assert db["signals"] == 0
    if path.startswith("dbbuf"):
        # EventIdx was published: the host's last SQ tail is what the server consumed
        assert s.eventidx(2) == s.shadow_tail(2) == s.host.queues[1].tail
    s.expect_no_completion(1)


def _submit_aer(s) -> int:
    return s.host.submit(0, AdminOpcode.ASYNC_EVENT_REQUEST)


def _check_invalid_value_event(s, aer_cid: int) -> None:
    (c,) = s.host.wait(0, 1)
    assert c.cid == aer_cid and c.status == Status.SUCCESS
    assert c.dw0 & 7 == AsyncEventType.ERROR
    assert (c.dw0 >> 8) & 0xFF == AsyncEventError.INVALID_DOORBELL_WRITE_VALUE
    assert (c.dw0 >> 16) & 0xFF == LogPageId.ERROR_INFORMATION


@pytest.mark.parametrize("path", PATH_IDS)
def test_invalid_sq_tail_raises_event_and_is_not_processed(serve, session, path):
    mode, kind = PATHS[path]
    srv = serve(mode)
    s = session(srv.path)
    depth = 16
    s.bring_up(kind, depth=depth)
    aer = _submit_aer(s)
    buf = s.mem.alloc(PAGE)
    s.submit_io(1, NvmOpcode.READ, 0, buf, ring=False)  # a valid entry sits at slot 0
    s.host.doorbells.ring(2, depth)  # tail == queue size: invalid
    _check_invalid_value_event(s, aer)
    s.expect_no_completion(1)
    q = srv.stats()["queues"]["sq1"]
    assert q["commands"] == 0, q
    # The queue still works with a valid tail afterwards.
    s.host.ring_sq(1)
    (c,) = s.host.wait(1, 1)
    assert c.status == Status.SUCCESS
    assert srv.stats()["queues"]["sq1"]["commands"] == 1
    # ... and a far-out-of-range value is rejected the same way (after acknowledging the log).
    s.host.get_log(LogPageId.ERROR_INFORMATION, 64)
    aer = _submit_aer(s)
    s.submit_io(1, NvmOpcode.READ, 0, buf, ring=False)
    s.host.doorbells.ring(2, 0xFFFF)
    _check_invalid_value_event(s, aer)
    s.expect_no_completion(1)
    assert srv.stats()["queues"]["sq1"]["commands"] == 1


@pytest.mark.parametrize("path", ["trap", "shadow", "poll", "dbbuf-trap"])
def test_invalid_cq_head_raises_event(serve, session, path):
    mode, kind = PATHS[path]
    srv = serve(mode)
    s = session(srv.path)
    s.bring_up(kind, depth=16)
    aer = _submit_aer(s)
    if path == "shadow":
        # Lazy CQ heads: nothing wakes the server for a CQ head; it reads the slot when it
        # next uses a CQ that is half full by its count, here for the ninth command on the SQ
        # (which still completes). The host reaps nothing until then.
        buf = s.mem.alloc(PAGE)
        cids = [s.submit_io(1, NvmOpcode.READ, 0, buf, ring=True) for _ in range(8)]
        wait_until(lambda: srv.stats()["queues"]["sq1"]["commands"] == 8, "8 completions (not reaped)")
        s.host.doorbells.ring(3, 16)  # CQ head == queue size
        cids.append(s.submit_io(1, NvmOpcode.READ, 0, buf, ring=True))
        _check_invalid_value_event(s, aer)
        done = s.host.wait(1, 9)
        assert [c.cid for c in done] == cids and {c.status for c in done} == {Status.SUCCESS}
        assert srv.stats()["doorbells"]["lazy_cq_heads"] >= 1
    else:
        s.host.doorbells.ring(3, 16)  # CQ head == queue size
        _check_invalid_value_event(s, aer)
    s.write_read_check(1, 0, 3, qd=3)


@pytest.mark.parametrize("path", PATH_IDS)
def test_controller_reset_then_new_queues_keep_working(serve, session, path):
    mode, kind = PATHS[path]
    srv = serve(mode)
    s = session(srv.path)
    s.bring_up(kind, depth=16)
    s.write_read_check(1, 0, 10, qd=5, seed=10)  # tails move past 0 before the reset
    for round_ in range(2):
        s.reset_and_bring_up(kind, depth=8 + 8 * round_)
        s.write_read_check(1, 512, 12, qd=4, seed=20 + round_)
        # data written before the reset is still there
        assert s.read_blocks(1, 0, 2) == [pattern(10, 0), pattern(10, 1)]
    st = srv.stats()
    assert st["doorbell_mode"] == mode
    assert st["queues"]["sq1"]["commands"] == 2 * 12 + 2  # the re-created queue only


# Write with one mode, serve the same file in another mode, read it back.
SWITCHES = [("trap", "shadow"), ("shadow", "poll"), ("poll", "dbbuf-ioeventfd"), ("dbbuf-ioeventfd", "dbbuf-trap"), ("dbbuf-trap", "trap")]


@pytest.mark.parametrize("first,second", SWITCHES, ids=[f"{a}->{b}" for a, b in SWITCHES])
def test_second_server_in_other_mode_serves_same_file(serve, session, tmp_path, first, second):
    image = tmp_path / "ns.img"
    spec = f"file:{image},size={NS_SIZE}"
    srv = serve(PATHS[first][0], namespace=spec)
    s = session(srv.path)
    s.bring_up(PATHS[first][1], depth=16)
    s.write_read_check(1, 8, 12, qd=6, seed=42)
    s.host.shutdown()
    s.close()
    assert srv.stop() == 0
    srv2 = serve(PATHS[second][0], namespace=spec)
    s2 = session(srv2.path)
    s2.bring_up(PATHS[second][1], depth=16)
    got = []
    for i in range(12):
        got += s2.read_blocks(1, 8 + i * (PAGE // LBA), 1)
    assert got == [pattern(42, i) for i in range(12)]
    s2.write_read_check(1, 4096, 4, qd=4, seed=43)
    assert srv2.stats()["doorbell_mode"] == PATHS[second][0]


def test_auto_with_io_fds_is_shadow(serve, session):
    srv = serve("auto")
    s = session(srv.path)
    s.bring_up("shadow", depth=16)  # region_io_fds(0) -> shadow ioeventfds
    s.write_read_check(1, 0, 8, qd=4)
    st = srv.stats()
    assert st["doorbell_mode"] == "shadow"
    assert st["doorbells"]["signals"] > 0
    # All I/O doorbells came by eventfd; only the bring-up before io fds was trapped.
    trapped = st["doorbells"]["trapped"]
    s.write_read_check(1, 64, 8, qd=8)
    assert srv.stats()["doorbells"]["trapped"] == trapped


@pytest.mark.parametrize("kind", ["trap", "dbbuf-trap"])
def test_auto_without_io_fds_is_trap(serve, session, kind):
    srv = serve("auto")
    # A first client takes the io fds and leaves: the next one starts over.
    first = session(srv.path)
    first.bring_up("shadow", depth=8)
    first.write_read_check(1, 0, 2, qd=1)
    assert srv.stats()["doorbell_mode"] == "shadow"
    first.close()
    s = session(srv.path)
    s.bring_up(kind, depth=16)
    s.write_read_check(1, 0, 8, qd=4)
    st = srv.stats()
    assert st["doorbell_mode"] == "trap", st
    assert st["doorbells"]["trapped"] > 0


def test_shadow_spin_window_counts(serve, session):
    """--spin-us: after work the server keeps scanning for a while; the stats say so."""
    srv = serve("shadow", spin_us=200)
    s = session(srv.path)
    s.bring_up("shadow", depth=16)
    s.write_read_check(1, 0, 8, qd=2)
    db = srv.stats()["doorbells"]
    print(f"shadow --spin-us 200: {db}")
    assert db["spins"] > 0
    assert db["spin_hits"] <= db["spins"]


def test_poll_server_reports_cpu(serve, session):
    srv = serve("poll")
    s = session(srv.path)
    s.bring_up("poll", depth=16)
    s.write_read_check(1, 0, 16, qd=4)
    db = srv.stats()["doorbells"]
    print(f"poll: {db}")
    assert db["polls"] > 0 and db["wakeups"] > 0 and db["trapped"] == 0
    assert db["poll_cpu_seconds"] > 0.0  # thread CPU time (ns resolution) of polls that ran


@pytest.mark.parametrize("path", PATH_IDS)
def test_full_cq_stalls_then_resumes_on_cq_head(serve, session, path):
    """A CQ with no room stalls its SQ; the host's CQ head doorbell must wake the server.

    On shadow, CQ head slots are lazy (no wake-up of their own): the stall arms the CQ's
    eventfd, which is what brings the rest of the commands home here.
    """
    mode, kind = PATHS[path]
    srv = serve(mode)
    s = session(srv.path)
    depth = 16
    s.bring_up(kind, depth=depth)
    buf = s.mem.alloc(PAGE)
    for _ in range(depth - 1):
        s.submit_io(1, NvmOpcode.READ, 0, buf, ring=False)
    s.host.ring_sq(1)
    wait_until(lambda: srv.stats()["queues"]["sq1"]["commands"] == depth - 1, "a full CQ")
    extra = 5
    for _ in range(extra):
        s.submit_io(1, NvmOpcode.READ, 0, buf, ring=False)
    s.host.ring_sq(1)
    wait_until(lambda: srv.stats()["queues"]["sq1"]["cq_full_stalls"] >= 1, "the SQ to stall on its full CQ")
    assert srv.stats()["queues"]["sq1"]["commands"] == depth - 1
    first = s.host.reap(1)  # consumes all 15 and rings the CQ head once
    assert len(first) == depth - 1 and all(c.status == Status.SUCCESS for c in first)
    rest = s.host.wait(1, extra)
    assert all(c.status == Status.SUCCESS for c in rest)
    st = srv.stats()
    assert st["queues"]["sq1"]["commands"] == depth - 1 + extra
    if path == "shadow":
        assert st["doorbells"]["cq_head_arms"] >= 1
    s.expect_no_completion(1)


def test_shadow_spin_serves_the_next_doorbell_without_a_wakeup(inproc, session):
    """``--spin-us`` on shadow: after a doorbell the server watches that one slot for a while;
    a QD1 host submitting again within the window is served from the spin (its eventfd signal
    consumed there), and the data stays right."""
    srv = inproc("shadow", spin_us=50_000)
    s = session(srv.path)
    s.bring_up("shadow", depth=8)
    before = srv.doorbell_stats()
    s.write_read_check(1, 0, 6, qd=1, seed=11)
    st = srv.doorbell_stats()
    assert st["spin_hits"] > before["spin_hits"], st
    # 12 SQ tails acted on, one way or the other, and not one CQ head: the spin watches the
    # slot that woke it (CQ heads stay lazy; a page scan would act on each of them too)
    assert st["doorbells"] - before["doorbells"] == 12, (before, st)
    s.expect_no_completion(1)


def test_shadow_spin_reports_an_invalid_sq_tail(inproc, session):
    """A tail that the spin catches (not the eventfd) is validated the same way: the error
    event, nothing fetched, and the queue keeps working with a valid tail."""
    srv = inproc("shadow", spin_us=50_000)
    s = session(srv.path)
    depth = 8
    s.bring_up("shadow", depth=depth)
    aer = _submit_aer(s)
    buf = s.mem.alloc(PAGE)
    # (the stats come from the server's loop: not while it spins, so read them before)
    before = srv.doorbell_stats()
    s.submit_io(1, NvmOpcode.WRITE, 0, buf, ring=True)
    (c,) = s.host.wait(1, 1)  # the server now watches the SQ tail slot for 50 ms
    assert c.status == Status.SUCCESS
    s.submit_io(1, NvmOpcode.READ, 0, buf, ring=False)
    s.host.doorbells.ring(2, depth)  # tail == queue size: invalid
    _check_invalid_value_event(s, aer)
    after = srv.doorbell_stats()
    # the write woke the server; the bad tail was caught by the spin, not by a wake-up
    assert after["wakeups"] - before["wakeups"] == 1 and after["spin_hits"] - before["spin_hits"] == 1, (before, after)
    s.expect_no_completion(1)
    assert srv.stats()["queues"]["sq1"]["commands"] == 1
    s.host.ring_sq(1)
    (c,) = s.host.wait(1, 1)
    assert c.status == Status.SUCCESS


def _bus_master(s, on: bool) -> None:
    """PCI COMMAND.BME by a config-space REGION_WRITE (read-modify-write)."""
    cmd = int.from_bytes(s.client.region_read(RegionIndex.CONFIG, COMMAND, 2), "little")
    cmd = cmd | COMMAND_MASTER if on else cmd & ~COMMAND_MASTER
    s.client.region_write(RegionIndex.CONFIG, COMMAND, cmd.to_bytes(2, "little"))


@pytest.mark.parametrize("path", PATH_IDS)
def test_bus_master_clear_holds_every_path(serve, session, path):
    """With PCI COMMAND.BME clear a doorbell on any path fetches nothing, moves no data,
    posts nothing and (with shadow doorbell buffers) writes no EventIdx; once BME is set
    again the latched doorbell is served."""
    mode, kind = PATHS[path]
    srv = serve(mode)
    s = session(srv.path)
    s.bring_up(kind, depth=16)
    s.write_read_check(1, 0, 2, qd=1, seed=7)  # LBAs 0-15 hold pattern(7, 0..1); tails past 0
    _bus_master(s, False)
    eventidx = s.eventidx(2) if s.dbbuf else None
    buf = s.mem.alloc(PAGE)
    s.mem.write(buf, b"\xee" * PAGE)
    cid = s.submit_io(1, NvmOpcode.READ, 0, buf, ring=True)
    s.host.reg32(0)  # a round trip: a trapped doorbell has been handled
    s.expect_no_completion(1, settle=0.2)
    assert s.mem.read(buf, PAGE) == b"\xee" * PAGE, "data moved while Bus Master Enable was clear"
    if eventidx is not None:
        assert s.eventidx(2) == eventidx, "EventIdx written while Bus Master Enable was clear"
    _bus_master(s, True)
    (c,) = s.host.wait(1, 1)
    assert (c.cid, c.status) == (cid, Status.SUCCESS)
    assert s.mem.read(buf, PAGE) == pattern(7, 0)
    s.write_read_check(1, 64, 4, qd=2, seed=8)  # and the path keeps working
