"""Controller registers: CAP, VS, CMB, INTMS/INTMC, enable/disable, shutdown, NSSR."""

from __future__ import annotations

import os

from ..support.host import Host
from .ctrl_helpers import NOOP_ADMIN
from nvme_emu.spec.commands import Status
from nvme_emu.spec.registers import NSSR_RESET_VALUE, Cap, Cc, Csts, Reg, Shst


def test_cap_fields(nvme: Host):
    cap = nvme.reg64(Reg.CAP)
    assert (cap >> Cap.MQES_SHIFT) & Cap.MQES_MASK == 4095  # 4096 entries, 0-based
    assert cap & Cap.CQR
    assert (cap >> Cap.TO_SHIFT) & Cap.TO_MASK == 15
    assert (cap >> Cap.DSTRD_SHIFT) & Cap.DSTRD_MASK == 0
    assert cap & Cap.NSSRS
    css = (cap >> Cap.CSS_SHIFT) & Cap.CSS_MASK
    assert css & 1 and css & (1 << 6) and not css & (1 << 7)
    assert (cap >> Cap.MPSMIN_SHIFT) & Cap.MPSMIN_MASK == 0  # 4 KiB
    assert (cap >> Cap.MPSMAX_SHIFT) & Cap.MPSMAX_MASK == 4  # 64 KiB
    assert not cap & Cap.CMBS and not cap & Cap.PMRS
    # the two halves read separately agree with the 8-byte read
    assert nvme.reg32(Reg.CAP) | nvme.reg32(Reg.CAP + 4) << 32 == cap


def test_version_is_2_0(nvme: Host):
    assert nvme.reg32(Reg.VS) == 0x00020000


def test_cmbloc_cmbsz_read_zero(nvme: Host):
    assert nvme.reg32(Reg.CMBLOC) == 0
    assert nvme.reg32(Reg.CMBSZ) == 0


def test_intms_intmc(nvme: Host):
    assert nvme.reg32(Reg.INTMS) == 0 and nvme.reg32(Reg.INTMC) == 0
    nvme.set_reg32(Reg.INTMS, 0b101)
    assert nvme.reg32(Reg.INTMS) == 0b101
    assert nvme.reg32(Reg.INTMC) == 0b101  # both read the mask
    nvme.set_reg32(Reg.INTMS, 0b010)  # INTMS sets bits, never clears
    assert nvme.reg32(Reg.INTMS) == 0b111
    nvme.set_reg32(Reg.INTMC, 0b001)  # INTMC clears bits
    assert nvme.reg32(Reg.INTMS) == 0b110
    assert nvme.reg32(Reg.INTMC) == 0b110
    nvme.set_reg32(Reg.INTMC, 0xFFFFFFFF)
    assert nvme.reg32(Reg.INTMS) == 0


def test_enable_sets_ready_and_admin_registers(server):
    n = Host(server.path, enable=False)
    try:
        n.set_reg32(Reg.CC, 0)
        assert n.reg32(Reg.CSTS) & Csts.RDY == 0
        n.enable()
        assert n.reg32(Reg.CSTS) & Csts.RDY
        assert n.reg32(Reg.CC) & Cc.EN
        q = n.host.queues[0]
        assert n.reg64(Reg.ASQ) == q.sq and n.reg64(Reg.ACQ) == q.cq
        assert n.reg32(Reg.AQA) == (31 << 16 | 31)
        c, data = n.identify(1)
        assert c.status == Status.SUCCESS
    finally:
        n.close()


def test_disable_resets_queues_and_ready_follows(io: Host):
    io.write_ok(1, 1, 0, os.urandom(4096))
    io.host.disable()  # CC.EN 1 -> 0
    assert io.reg32(Reg.CSTS) & Csts.RDY == 0
    assert io.reg32(Reg.CC) == 0
    io.enable()
    assert io.reg32(Reg.CSTS) & Csts.RDY
    # I/O queue 1 is gone: Number of Queues may be set again and queue 1 made afresh
    io.set_queues(2)
    io.create_pair(1, 16)
    data = os.urandom(1024)
    io.write_ok(1, 1, 8, data)
    assert io.read_ok(1, 1, 8, 2) == data


def test_enable_with_bad_configuration_sets_cfs(server):
    n = Host(server.path, enable=False)
    try:
        q_base = n.alloc(4096)
        n.set_reg32(Reg.AQA, 0)  # 1-entry admin queues are invalid
        n.host.set_reg64(Reg.ASQ, q_base)
        n.host.set_reg64(Reg.ACQ, q_base)
        n.set_reg32(Reg.CC, Cc.EN | 6 << Cc.CSS_SHIFT | 6 << Cc.IOSQES_SHIFT | 4 << Cc.IOCQES_SHIFT)
        csts = n.reg32(Reg.CSTS)
        assert csts & Csts.CFS and not csts & Csts.RDY
        n.enable()  # CC.EN 0 and a good configuration recover
        assert n.reg32(Reg.CSTS) & (Csts.RDY | Csts.CFS) == Csts.RDY
    finally:
        n.close()


def test_shutdown_reports_complete_and_file_data_reaches_disk(io: Host, disk):
    data = os.urandom(8192)
    io.write_ok(1, 3, 100, data)  # namespace 3 is the file
    shst = io.host.shutdown()
    assert shst == Shst.COMPLETE
    assert (io.reg32(Reg.CSTS) >> Csts.SHST_SHIFT) & Csts.SHST_MASK == Shst.COMPLETE
    with open(disk, "rb") as f:
        f.seek(100 * 512)
        assert f.read(8192) == data
    # clearing CC.SHN clears SHST; CC.EN 0 -> 1 brings the controller back
    io.host.disable()
    assert (io.reg32(Reg.CSTS) >> Csts.SHST_SHIFT) & Csts.SHST_MASK == 0
    io.enable()
    io.set_queues(1)
    io.create_pair(1, 16)
    assert io.read_ok(1, 3, 100, 16) == data


def test_shutdown_flushes_every_namespace(inproc, disk):
    srv = inproc()
    namespaces = srv.device.controller.namespaces
    flushed: list[int] = []
    for ns in namespaces.values():
        orig = ns.backend.flush

        def spy(orig=orig, nsid=ns.nsid):
            flushed.append(nsid)
            orig()

        ns.backend.flush = spy
    n = Host(srv.path)
    try:
        n.set_queues(1)
        n.create_pair(1, 16)
        n.write_ok(1, 3, 0, b"\x5a" * 4096)
        assert flushed == []
        assert n.host.shutdown() == Shst.COMPLETE
        assert sorted(flushed) == [1, 2, 3]
    finally:
        n.close()
    with open(disk, "rb") as f:
        assert f.read(4096) == b"\x5a" * 4096


def test_nssr_sets_nssro_and_resets(io: Host):
    assert io.reg32(Reg.CSTS) & Csts.NSSRO == 0
    io.set_reg32(Reg.NSSR, 0x12345678)  # any other value does nothing
    assert io.reg32(Reg.CSTS) & (Csts.NSSRO | Csts.RDY) == Csts.RDY
    io.set_reg32(Reg.NSSR, NSSR_RESET_VALUE)
    csts = io.reg32(Reg.CSTS)
    assert csts & Csts.NSSRO
    assert not csts & Csts.RDY  # the subsystem reset reset the controller
    io.enable()
    assert io.reg32(Reg.CSTS) & Csts.NSSRO  # survives the re-enable
    io.set_reg32(Reg.CSTS, Csts.NSSRO)  # write 1 to clear
    assert io.reg32(Reg.CSTS) & (Csts.NSSRO | Csts.RDY) == Csts.RDY
    c, _ = io.identify(1)
    assert c.status == Status.SUCCESS


def test_registers_beyond_the_block_read_zero_and_doorbells_read_zero(nvme: Host):
    assert nvme.reg32(Reg.BPINFO) == 0
    assert nvme.reg32(Reg.DOORBELLS) == 0
    assert nvme.reg32(Reg.DOORBELLS + 4) == 0
    assert nvme.admin(**NOOP_ADMIN).status == Status.SUCCESS
