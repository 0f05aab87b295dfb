"""Deleting an I/O SQ and creating it again with the same ID while its writes are in flight,
against a separate server process on both backends (an outside fuzz run's finding, issue 22
item 6). The control plane's latency fault keeps the writes in flight for LATENCY_S, so the
Delete I/O SQ is pending for that long; the guest's mappings must be gone once it leaves.
"""

from __future__ import annotations

from ..support.host import Host, PAGE
from ..support.server import ServerProcess, wait_until
from nvme_emu.ctl import ControlClient, default_control_socket
from nvme_emu.spec.commands import AdminOpcode, NvmOpcode, Status

LATENCY_S = 2.0
DEPTH = 64
NSID = 1


def _create_sq(h: Host, base: int) -> int:
    """Create I/O SQ 1 at ``base`` on CQ 1; its status."""
    return h.cmd(0, AdminOpcode.CREATE_IO_SQ, prp1=base, cdw10=(DEPTH - 1) << 16 | 1, cdw11=1 << 16 | 1).status


def _writes_in_flight(h: Host, count: int) -> list[int]:
    buf = h.alloc(PAGE)
    h.write_mem(buf, b"\xa5" * PAGE)
    return [h.rw(1, NvmOpcode.WRITE, NSID, 8 * i, 8, buf, PAGE) for i in range(count)]


def _warm_up(srv: ServerProcess) -> None:
    """One write: the server's I/O workers (and their eventfd) exist from then on, for good."""
    h = Host(srv.path, ram_size=1 << 20)
    try:
        h.set_queues(1)
        h.create_pair(1, 2)
        h.write_ok(1, NSID, 0, bytes(PAGE))
    finally:
        h.close()
    srv.wait_idle()


def test_sq_id_reuse_during_a_pending_delete_and_disconnect(spawn, tmp_path):
    srv: ServerProcess = spawn(f"file:{tmp_path / 'ns.img'},size=16M")
    _warm_up(srv)
    baseline = srv.settle()
    with ControlClient(default_control_socket(srv.path)) as ctl:
        ctl.fault_add(kind="latency", op="write", us=LATENCY_S * 1e6)
    h = Host(srv.path, ram_size=8 << 20)
    try:
        h.set_queues(4)
        h.create_pair(1, DEPTH)
        writes = _writes_in_flight(h, 4)
        delete = h.submit(0, AdminOpcode.DELETE_IO_SQ, cdw10=1)
        assert h.no_completion(0, delete)
        new_sq = h.alloc(DEPTH * 64)
        status = _create_sq(h, new_sq)
        assert status == Status.INVALID_QUEUE_IDENTIFIER, f"Create I/O SQ 1 while its deletion is pending: {status:#x}"
        h.fails(Status.INVALID_QUEUE_DELETION, 0, AdminOpcode.DELETE_IO_CQ, cdw10=1)
        assert h.no_completion(0, delete), "the checks above took longer than the writes' latency"
        assert {h.wait_cid(1, cid).status for cid in writes} == {Status.SUCCESS}
        assert h.wait_cid(0, delete).status == Status.SUCCESS
        # the deletion is over: SQ 1 again on CQ 1, which must now refuse deletion
        q = h.host.queues[1]
        q.sq, q.tail, q.inflight = new_sq, 0, 0
        assert _create_sq(h, new_sq) == Status.SUCCESS
        h.fails(Status.INVALID_QUEUE_DELETION, 0, AdminOpcode.DELETE_IO_CQ, cdw10=1)
        assert h.read_ok(1, NSID, 0, 8) == b"\xa5" * PAGE
        # and once more pending, the client leaves before the writes complete
        _writes_in_flight(h, 4)
        delete = h.submit(0, AdminOpcode.DELETE_IO_SQ, cdw10=1)
        assert h.no_completion(0, delete)
    finally:
        h.close()
    srv.wait_idle()
    wait_until(lambda: srv.guest_mappings() == 0, "the server to unmap the guest's memory", timeout=LATENCY_S + 3)
    assert srv.wait_fds(baseline) == baseline, srv.fds()
    assert srv.answers()
