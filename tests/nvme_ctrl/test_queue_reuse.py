"""A queue ID while its deletion is pending: Delete I/O SQ waits for the SQ's commands in
flight (queue_management.delete_io_sq), and until it completes the ID is still in use and the
SQ still counts as attached to its CQ (an outside fuzz run's finding, issue 22 item 6).

The server runs in process on the gated file namespace of test_requests (a write held at its
gate is really in flight on a worker thread); the host is the real client over a socket.
"""

from __future__ import annotations

import threading

import pytest

from .test_requests import FILE_NSID, Rig
from .test_requests import rig as gated_file_rig  # noqa: F401 (a fixture: pytest finds it by this name)
from nvme_emu.spec.commands import AdminOpcode, NvmOpcode, Status
from nvme_emu.spec.registers import Reg

DEPTH = 64


@pytest.fixture
def rig(gated_file_rig: Rig) -> Rig:  # noqa: F811 (the imported fixture, by name)
    return gated_file_rig


def _create_sq(rig: Rig, qid: int, base: int) -> int:
    """Create I/O SQ ``qid`` of DEPTH entries at ``base`` on CQ ``qid``; its cid."""
    return rig.nvme.submit(0, AdminOpcode.CREATE_IO_SQ, prp1=base, cdw10=(DEPTH - 1) << 16 | qid, cdw11=qid << 16 | 1)


def _held_write(rig: Rig, qid: int) -> int:
    """A write to the file namespace on ``qid`` that waits at its gate on a worker; its cid."""
    n = rig.nvme
    rig.backend.hold("write")
    buf = n.alloc(4096)
    n.write_mem(buf, b"\x5a" * 4096)
    cid = n.submit(qid, NvmOpcode.WRITE, nsid=FILE_NSID, prp1=buf, cdw10=0, cdw12=7)
    rig.backend.wait_arrived("write")
    return cid


def test_sq_id_stays_in_use_until_its_deletion_completes(rig: Rig):
    n = rig.nvme
    write_cid = _held_write(rig, 1)
    del_cid = n.submit(0, AdminOpcode.DELETE_IO_SQ, cdw10=1)
    assert n.no_completion(0, del_cid), "Delete I/O SQ completed while its write was in flight"
    new_sq = n.alloc(DEPTH * 64)
    c = n.wait_cid(0, _create_sq(rig, 1, new_sq))
    assert c.status == Status.INVALID_QUEUE_IDENTIFIER, f"Create I/O SQ 1 while its deletion is pending: {c.status:#x}"
    n.fails(Status.INVALID_QUEUE_DELETION, 0, AdminOpcode.DELETE_IO_CQ, cdw10=1)  # SQ 1 still uses CQ 1
    rig.backend.open_all()
    assert n.wait_cid(1, write_cid).status == Status.SUCCESS
    assert n.wait_cid(0, del_cid).status == Status.SUCCESS
    # now the ID is free: SQ 1 again, on the same CQ 1, which it keeps in use
    q = n.host.queues[1]
    q.sq, q.tail, q.inflight = new_sq, 0, 0
    assert n.wait_cid(0, _create_sq(rig, 1, new_sq)).status == Status.SUCCESS
    n.fails(Status.INVALID_QUEUE_DELETION, 0, AdminOpcode.DELETE_IO_CQ, cdw10=1)
    data = bytes(range(256)) * 16
    n.write_ok(1, FILE_NSID, 64, data)
    assert n.read_ok(1, FILE_NSID, 64, 8) == data
    n.ok(0, AdminOpcode.DELETE_IO_SQ, cdw10=1)
    n.ok(0, AdminOpcode.DELETE_IO_CQ, cdw10=1)


def test_delete_cq_is_refused_while_its_sq_deletion_is_pending(rig: Rig):
    n = rig.nvme
    write_cid = _held_write(rig, 1)
    del_cid = n.submit(0, AdminOpcode.DELETE_IO_SQ, cdw10=1)
    assert n.no_completion(0, del_cid)
    n.fails(Status.INVALID_QUEUE_DELETION, 0, AdminOpcode.DELETE_IO_CQ, cdw10=1)
    rig.backend.open_all()
    assert n.wait_cid(1, write_cid).status == Status.SUCCESS  # posted into CQ 1, which still exists
    assert n.wait_cid(0, del_cid).status == Status.SUCCESS
    n.ok(0, AdminOpcode.DELETE_IO_CQ, cdw10=1)
    assert rig.srv.call(lambda: 1 not in rig.ctrl.cqs)


def test_reset_during_a_pending_deletion_forgets_it(rig: Rig):
    n = rig.nvme
    _held_write(rig, 1)
    del_cid = n.submit(0, AdminOpcode.DELETE_IO_SQ, cdw10=1)
    assert n.no_completion(0, del_cid)
    # The reset is answered only once no worker can write guest memory (docs/reliability.md,
    # fix 12), so the held write must be let go while the CC write waits for it.
    release = threading.Timer(0.2, rig.backend.open_all)
    release.start()
    try:
        n.set_reg32(Reg.CC, 0)
    finally:
        release.join()
    n.host.wait_ready(False)
    n.enable()
    n.sync()
    assert not rig.posted(0), "the Delete I/O SQ from before the reset completed into the new admin queue"
    n.set_queues(4)
    n.create_pair(1, DEPTH)  # the same IDs again: nothing of the old deletion is left to touch them
    n.sync()
    assert not rig.posted(1), "a request from before the reset posted into the new CQ 1"
    data = b"\x42" * 4096
    n.write_ok(1, FILE_NSID, 8, data)
    assert n.read_ok(1, FILE_NSID, 8, 8) == data
    n.ok(0, AdminOpcode.DELETE_IO_SQ, cdw10=1)
    n.ok(0, AdminOpcode.DELETE_IO_CQ, cdw10=1)
