"""MSI-X and INTx interrupts, observed on the eventfds the client handed over."""

from __future__ import annotations

import os

from ..support.fds import efd_count, efd_wait
from ..support.host import Host
from .ctrl_helpers import NOOP_ADMIN
from nvme_emu.spec.commands import NvmOpcode as Op, Status
from nvme_emu.spec.identify import Cns
from nvme_emu.spec.registers import Reg


def test_admin_completions_raise_vector_0(nvme: Host):
    efd_count(nvme.efds[0])
    assert nvme.identify(Cns.CONTROLLER)[0].status == Status.SUCCESS
    assert efd_wait(nvme.efds[0]) >= 1
    nvme.sync()
    assert all(efd_count(fd) == 0 for fd in nvme.efds[1:])


def test_io_cq_vector_fires(io: Host):
    nvme = io
    for fd in nvme.efds:
        efd_count(fd)
    nvme.write_ok(1, 1, 0, os.urandom(4096))
    assert efd_wait(nvme.efds[1]) == 1
    nvme.sync()
    assert efd_count(nvme.efds[0]) == 0
    assert all(efd_count(fd) == 0 for fd in nvme.efds[2:])


def test_four_queues_each_fire_their_own_vector(io: Host):
    for qid in (2, 3, 4):
        io.create_pair(qid, 16, vector=qid)
    for fd in io.efds:
        efd_count(fd)
    for qid in (1, 2, 3, 4):
        io.write_ok(qid, 1, qid, os.urandom(512))
        assert efd_wait(io.efds[qid]) == 1, qid
        io.sync()
        for other in range(len(io.efds)):
            if other != qid:
                assert efd_count(io.efds[other]) == 0, (qid, other)


def test_two_cqs_may_share_a_vector(io: Host):
    io.create_pair(2, 16, vector=5)
    io.create_pair(3, 16, vector=5)
    efd_count(io.efds[5])
    io.write_ok(2, 1, 0, os.urandom(512))
    assert efd_wait(io.efds[5]) == 1
    io.write_ok(3, 1, 0, os.urandom(512))
    assert efd_wait(io.efds[5]) == 1


def test_one_interrupt_per_batch(io: Host):
    efd = io.efds[1]
    efd_count(efd)
    buf = io.alloc(4096)
    cids = [io.submit(1, Op.READ, nsid=1, prp1=buf, cdw10=i, cdw12=7, ring=False) for i in range(16)]
    io.host.ring_sq(1)
    for cid in cids:
        assert io.wait_cid(1, cid).status == Status.SUCCESS
    io.sync()
    fired = efd_count(efd)
    assert 1 <= fired < 16
    assert fired == 1  # one doorbell, one batch, one interrupt


def test_queue_without_interrupts_stays_silent(io: Host):
    io.create_pair(2, 16, vector=2, ien=False)
    efd_count(io.efds[2])
    io.write_ok(2, 1, 0, os.urandom(512))
    io.sync()
    assert efd_count(io.efds[2]) == 0


def test_intx(server):
    n = Host(server.path, msix=0, intx=True)
    fd = n.intx_fd
    try:
        assert fd is not None
        assert efd_count(fd) == 0  # enabling raised nothing
        # A: completes, the line fires once (and is auto-masked)
        assert n.admin(**NOOP_ADMIN).status == Status.SUCCESS
        assert efd_wait(fd) == 1
        # B: completes, but the line stays masked: no new interrupt
        cid = n.submit(0, **NOOP_ADMIN)
        n.peek_cqe(0)
        n.sync()
        assert efd_count(fd) == 0
        # unmask while B is unconsumed: level-triggered, so it fires again
        n.client.unmask_intx()
        assert efd_wait(fd) == 1
        assert n.wait_cid(0, cid).status == Status.SUCCESS  # consume (CQ head doorbell)
        # unmask with nothing pending: silent
        n.client.unmask_intx()
        n.sync()
        assert efd_count(fd) == 0
        # C: a new completion fires
        assert n.admin(**NOOP_ADMIN).status == Status.SUCCESS
        assert efd_wait(fd) == 1
        n.client.unmask_intx()
        # INTMS bit 0 masks the pin
        n.set_reg32(Reg.INTMS, 1)
        cid = n.submit(0, **NOOP_ADMIN)
        n.peek_cqe(0)
        n.sync()
        assert efd_count(fd) == 0
        # INTMC with the completion still unconsumed re-raises it
        n.set_reg32(Reg.INTMC, 1)
        assert efd_wait(fd) == 1
        assert n.wait_cid(0, cid).status == Status.SUCCESS
        n.client.unmask_intx()
        # and I/O queues use the same pin
        n.set_queues(1)
        n.create_pair(1, 16, vector=0)
        efd_count(fd)
        n.client.unmask_intx()
        n.write_ok(1, 1, 0, os.urandom(512))
        assert efd_wait(fd) == 1
    finally:
        n.close()
