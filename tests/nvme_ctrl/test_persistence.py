"""Several namespaces and queues; data survives controller reset, DEVICE_RESET and a restart."""

from __future__ import annotations

import os

from ..support.host import Host
from nvme_emu.spec.commands import NvmOpcode as Op, Status
from nvme_emu.spec.registers import Reg

LBA = {1: 512, 2: 4096, 3: 512}


def write_pattern(n: Host, qid: int) -> dict[tuple[int, int], bytes]:
    """Different data at the same LBAs of every namespace."""
    out = {}
    for nsid, lba in LBA.items():
        for slba in (0, 17, 1000):
            data = os.urandom(4 * lba)
            n.write_ok(qid, nsid, slba, data, lba)
            out[(nsid, slba)] = data
    return out


def check_pattern(n: Host, qid: int, pattern: dict[tuple[int, int], bytes]) -> None:
    for (nsid, slba), data in pattern.items():
        assert n.read_ok(qid, nsid, slba, 4, LBA[nsid]) == data, (nsid, slba)


def test_four_queues_interleaved_at_depth(io: Host):
    for qid in (2, 3, 4):
        io.create_pair(qid, 32)
    expected = {}
    cids = {}
    for round_ in range(8):  # 8 writes per queue, interleaved, all queued before any doorbell
        for qid in (1, 2, 3, 4):
            nsid = 1 + (qid + round_) % 3
            lba = LBA[nsid]
            slba = 100 * qid + 4 * round_
            data = os.urandom(4 * lba)
            buf = io.alloc(len(data))
            io.write_mem(buf, data)
            p1, p2 = io.prps(buf, len(data))
            cid = io.submit(qid, Op.WRITE, nsid=nsid, prp1=p1, prp2=p2, cdw10=slba, cdw12=3, ring=False)
            cids.setdefault(qid, []).append(cid)
            expected[(nsid, slba)] = data
    for qid in (1, 2, 3, 4):
        io.host.ring_sq(qid)
    for qid, qcids in cids.items():
        for cid in qcids:
            c = io.wait_cid(qid, cid)
            assert c.status == Status.SUCCESS and c.sqid == qid
    # read everything back, queued the same way, through other queues
    reads = []
    for i, ((nsid, slba), data) in enumerate(expected.items()):
        qid = 1 + (i * 3) % 4
        buf = io.alloc(len(data))
        p1, p2 = io.prps(buf, len(data))
        cid = io.submit(qid, Op.READ, nsid=nsid, prp1=p1, prp2=p2, cdw10=slba, cdw12=3, ring=False)
        reads.append((qid, cid, buf, data))
    for qid in (1, 2, 3, 4):
        io.host.ring_sq(qid)
    for qid, cid, buf, data in reads:
        assert io.wait_cid(qid, cid).status == Status.SUCCESS
        assert io.read_mem(buf, len(data)) == data


def test_more_commands_than_the_queue_holds(io: Host):
    io.create_pair(2, 4)  # 3 usable slots
    for i in range(50):
        data = os.urandom(512)
        io.write_ok(2, 1, i, data)
        assert io.read_ok(2, 1, i, 1) == data


def test_data_survives_controller_reset(io: Host):
    pattern = write_pattern(io, 1)
    io.host.disable()
    io.enable()
    io.set_queues(4)
    io.create_pair(3, 16)
    check_pattern(io, 3, pattern)


def test_data_survives_device_reset(io: Host):
    pattern = write_pattern(io, 1)
    io.client.reset()  # DEVICE_RESET
    assert io.reg32(Reg.CSTS) & 1 == 0
    assert io.reg32(Reg.CC) == 0
    io.enable()
    io.set_queues(2)
    io.create_pair(1, 16)
    check_pattern(io, 1, pattern)


def test_data_survives_reconnect(server):
    n = Host(server.path)
    try:
        n.set_queues(1)
        n.create_pair(1, 16)
        pattern = write_pattern(n, 1)
    finally:
        n.close()
    n = Host(server.path)
    try:
        n.set_queues(1)
        n.create_pair(1, 16)
        check_pattern(n, 1, pattern)
    finally:
        n.close()


def test_file_data_survives_server_restart(spawn, namespaces, disk):
    first = spawn(*namespaces)
    n = Host(first.path)
    try:
        n.set_queues(1)
        n.create_pair(1, 16)
        data = os.urandom(64 * 1024)
        n.write_ok(1, 3, 2048, data)
        n.write_ok(1, 3, 0, data[:4096], cdw12=1 << 30)
    finally:
        n.close()
    assert first.stop() == 0
    assert "shutting down" in first.log()
    second = spawn(*namespaces)
    n = Host(second.path)
    try:
        n.set_queues(1)
        n.create_pair(1, 16)
        assert n.read_ok(1, 3, 2048, 128) == data
        assert n.read_ok(1, 3, 0, 8) == data[:4096]
        assert n.read_ok(1, 1, 2048, 128) == bytes(64 * 1024)  # RAM namespaces start empty
    finally:
        n.close()
    assert os.path.getsize(disk) == 64 << 20
