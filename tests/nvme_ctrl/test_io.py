"""NVM command set: every command, with the statuses the spec names for failures."""

from __future__ import annotations

import os
import struct

import pytest

from ..support.host import Host
from .ctrl_helpers import IOVA, NS1_SIZE
from nvme_emu.spec.commands import NvmOpcode as Op, RwCdw12, Status
from vfio_user.vmm.client import GuestRam

NSZE1 = NS1_SIZE // 512


def test_write_read_every_namespace(io: Host):
    for nsid, lba in ((1, 512), (2, 4096), (3, 512)):
        data = os.urandom(8 * lba)
        io.write_ok(1, nsid, 5, data, lba)
        assert io.read_ok(1, nsid, 5, 8, lba) == data
        assert io.read_ok(1, nsid, 6, 2, lba) == data[lba : 3 * lba]


def test_write_fua(io: Host, disk):
    data = os.urandom(4096)
    io.write_ok(1, 3, 40, data, cdw12=RwCdw12.FUA)
    io.write_ok(1, 1, 40, data, cdw12=RwCdw12.FUA)
    assert io.read_ok(1, 3, 40, 8) == data
    assert io.read_ok(1, 1, 40, 8, cdw12=RwCdw12.FUA) == data  # FUA on a read is harmless
    with open(disk, "rb") as f:
        f.seek(40 * 512)
        assert f.read(4096) == data


@pytest.mark.parametrize("nsid", [1, 2, 3, 0xFFFFFFFF])
def test_flush(io: Host, nsid: int):
    io.write_ok(1, 3, 0, os.urandom(512))
    assert io.cmd(1, Op.FLUSH, nsid=nsid).status == Status.SUCCESS


@pytest.mark.parametrize("nsid", [0, 4, 99, 0xFFFFFFFE])
def test_flush_bad_namespace(io: Host, nsid: int):
    assert io.cmd(1, Op.FLUSH, nsid=nsid).status == Status.INVALID_NAMESPACE_OR_FORMAT


@pytest.mark.parametrize("nsid", [1, 3])
@pytest.mark.parametrize("deac", [False, True])
def test_write_zeroes(io: Host, nsid: int, deac: bool):
    data = os.urandom(64 * 512)
    io.write_ok(1, nsid, 100, data)
    c = io.io(1, Op.WRITE_ZEROES, nsid, 108, 20, cdw12=RwCdw12.DEAC if deac else 0)
    assert c.status == Status.SUCCESS
    out = io.read_ok(1, nsid, 100, 64)
    assert out[: 8 * 512] == data[: 8 * 512]
    assert out[8 * 512 : 28 * 512] == bytes(20 * 512)
    assert out[28 * 512 :] == data[28 * 512 :]


def test_write_zeroes_out_of_range(io: Host):
    assert io.io(1, Op.WRITE_ZEROES, 1, NSZE1 - 1, 2).status == Status.LBA_OUT_OF_RANGE


def dsm_ranges(io: Host, ranges: list[tuple[int, int]]) -> int:
    buf = io.alloc(4096)
    io.write_mem(buf, b"".join(struct.pack("<IIQ", 0, nlb, slba) for slba, nlb in ranges))
    return buf


@pytest.mark.parametrize("nsid", [1, 3])
def test_dataset_management_deallocate_reads_zeros(io: Host, nsid: int):
    data = os.urandom(128 * 512)
    io.write_ok(1, nsid, 0, data)
    buf = dsm_ranges(io, [(8, 16), (64, 8), (100, 0)])
    c = io.cmd(1, Op.DATASET_MANAGEMENT, nsid=nsid, prp1=buf, cdw10=2, cdw11=1 << 2)  # 3 ranges, AD
    assert c.status == Status.SUCCESS
    out = io.read_ok(1, nsid, 0, 128)
    expect = bytearray(data)
    expect[8 * 512 : 24 * 512] = bytes(16 * 512)
    expect[64 * 512 : 72 * 512] = bytes(8 * 512)
    assert out == bytes(expect)


def test_dataset_management_without_ad_keeps_data(io: Host):
    data = os.urandom(16 * 512)
    io.write_ok(1, 1, 0, data)
    buf = dsm_ranges(io, [(0, 16)])
    assert io.cmd(1, Op.DATASET_MANAGEMENT, nsid=1, prp1=buf, cdw10=0, cdw11=0b11).status == Status.SUCCESS
    assert io.read_ok(1, 1, 0, 16) == data


def test_dataset_management_out_of_range_touches_nothing(io: Host):
    data = os.urandom(8 * 512)
    io.write_ok(1, 1, 0, data)
    buf = dsm_ranges(io, [(0, 8), (NSZE1 - 4, 8)])
    c = io.cmd(1, Op.DATASET_MANAGEMENT, nsid=1, prp1=buf, cdw10=1, cdw11=1 << 2)
    assert c.status == Status.LBA_OUT_OF_RANGE
    assert io.read_ok(1, 1, 0, 8) == data


def test_compare(io: Host):
    data = os.urandom(16 * 512)
    io.write_ok(1, 1, 200, data)
    buf = io.alloc(len(data))
    io.write_mem(buf, data)
    p1, p2 = io.prps(buf, len(data))
    assert io.io(1, Op.COMPARE, 1, 200, 16, prp1=p1, prp2=p2).status == Status.SUCCESS
    io.write_mem(buf + 5000, bytes([data[5000] ^ 1]))
    c = io.io(1, Op.COMPARE, 1, 200, 16, prp1=p1, prp2=p2)
    assert c.status == Status.COMPARE_FAILURE
    assert c.status >> 8 == 2  # media and data integrity error


def test_verify(io: Host):
    io.write_ok(1, 3, 0, os.urandom(4096))
    assert io.io(1, Op.VERIFY, 3, 0, 8).status == Status.SUCCESS
    assert io.io(1, Op.VERIFY, 1, 0, 1024).status == Status.SUCCESS
    assert io.io(1, Op.VERIFY, 1, NSZE1, 1).status == Status.LBA_OUT_OF_RANGE


def copy_descriptors(io: Host, ranges: list[tuple[int, int]]) -> int:
    buf = io.alloc(4096)
    io.write_mem(buf, b"".join(struct.pack("<8xQH14x", slba, nlb - 1) for slba, nlb in ranges))
    return buf


@pytest.mark.parametrize("nsid,lba", [(1, 512), (2, 4096), (3, 512)])
def test_copy(io: Host, nsid: int, lba: int):
    a, b, c = os.urandom(4 * lba), os.urandom(2 * lba), os.urandom(3 * lba)
    io.write_ok(1, nsid, 10, a, lba)
    io.write_ok(1, nsid, 50, b, lba)
    io.write_ok(1, nsid, 70, c, lba)
    buf = copy_descriptors(io, [(10, 4), (50, 2), (70, 3)])
    done = io.cmd(1, Op.COPY, nsid=nsid, prp1=buf, cdw10=1000, cdw11=0, cdw12=2)  # 3 ranges -> 1000
    assert done.status == Status.SUCCESS
    assert io.read_ok(1, nsid, 1000, 9, lba) == a + b + c
    assert io.read_ok(1, nsid, 10, 4, lba) == a  # sources untouched


def test_copy_refusals(io: Host):
    buf = copy_descriptors(io, [(NSZE1 - 1, 2)])
    assert io.cmd(1, Op.COPY, nsid=1, prp1=buf, cdw10=0, cdw12=0).status == Status.LBA_OUT_OF_RANGE
    buf = copy_descriptors(io, [(0, 8)])
    assert io.cmd(1, Op.COPY, nsid=1, prp1=buf, cdw10=NSZE1 - 4, cdw12=0).status == Status.LBA_OUT_OF_RANGE
    assert io.cmd(1, Op.COPY, nsid=1, prp1=buf, cdw10=100, cdw12=1 << 8).status == Status.INVALID_FIELD  # format 1


@pytest.mark.parametrize(
    "slba,nlb",
    [(NSZE1, 1), (NSZE1 - 1, 2), (NSZE1 - 100, 200), ((1 << 64) - 1, 2), ((1 << 64) - 1, 1), (1 << 63, 1), ((1 << 64) - 8, 16)],
)
def test_lba_out_of_range(io: Host, slba: int, nlb: int):
    buf = io.alloc(nlb * 512)
    p1, p2 = io.prps(buf, nlb * 512)
    for op in (Op.READ, Op.WRITE, Op.COMPARE, Op.VERIFY, Op.WRITE_ZEROES):
        c = io.io(1, op, 1, slba, nlb, prp1=p1, prp2=p2)
        assert c.status == Status.LBA_OUT_OF_RANGE, op


def test_last_block_is_in_range(io: Host):
    data = os.urandom(512)
    io.write_ok(1, 1, NSZE1 - 1, data)
    assert io.read_ok(1, 1, NSZE1 - 1, 1) == data


@pytest.mark.parametrize("nsid", [0, 4, 99, 0xFFFFFFFF])
def test_invalid_namespace(io: Host, nsid: int):
    buf = io.alloc(4096)
    for op in (Op.READ, Op.WRITE, Op.WRITE_ZEROES, Op.COMPARE):
        assert io.io(1, op, nsid, 0, 1, prp1=buf).status == Status.INVALID_NAMESPACE_OR_FORMAT


@pytest.mark.parametrize("opc", [Op.RESERVATION_REGISTER, Op.RESERVATION_REPORT, 0x7F, 0x80, 0xFF])
def test_invalid_io_opcode(io: Host, opc: int):
    c = io.io(1, opc, 1, 0, 1, prp1=io.alloc(4096))
    assert c.status == Status.INVALID_OPCODE


def test_admin_opcode_on_io_queue_is_invalid(io: Host):
    # Identify's opcode (06h) means nothing in the NVM command set
    assert io.cmd(1, 0x06, nsid=1, prp1=io.alloc(4096)).status == Status.INVALID_OPCODE


def test_fused_and_reserved_psdt_are_invalid_field(io: Host):
    buf = io.alloc(4096)
    assert io.io(1, Op.READ, 1, 0, 1, prp1=buf, flags=1).status == Status.INVALID_FIELD
    assert io.io(1, Op.READ, 1, 0, 1, prp1=buf, flags=3 << 6).status == Status.INVALID_FIELD


@pytest.mark.parametrize("where", ["prp1", "prp2", "list"])
def test_prp_outside_guest_memory(io: Host, where: str):
    buf = io.alloc(3 * 4096)
    outside = 0x4000_0000
    if where == "prp1":
        p1, p2, n = outside, 0, 1
    elif where == "prp2":
        p1, p2, n = buf, outside, 16
    else:
        plist = io.alloc(4096)
        io.write_mem(plist, struct.pack("<QQ", buf + 4096, outside))
        p1, p2, n = buf, plist, 24
    for op in (Op.READ, Op.WRITE):
        assert io.io(1, op, 1, 0, n, prp1=p1, prp2=p2).status == Status.DATA_TRANSFER_ERROR, op
    # the PRP list itself outside guest memory
    assert io.io(1, Op.READ, 1, 0, 24, prp1=buf, prp2=outside).status == Status.DATA_TRANSFER_ERROR


def test_read_into_read_only_mapping(io: Host):
    ro_iova = 0x1000_0000
    ro = GuestRam(1 << 20, "read-only")
    try:
        io.client.dma_map(ro_iova, 1 << 20, ro, writable=False)
        pattern = os.urandom(8192)
        ro.view[:8192] = pattern
        c = io.io(1, Op.READ, 1, 0, 16, prp1=ro_iova, prp2=ro_iova + 4096)
        assert c.status == Status.DATA_TRANSFER_ERROR
        assert bytes(ro.view[:8192]) == pattern
        # the device may read it: a Write from the read-only range works
        assert io.io(1, Op.WRITE, 1, 64, 16, prp1=ro_iova, prp2=ro_iova + 4096).status == Status.SUCCESS
        assert io.read_ok(1, 1, 64, 16) == pattern
        io.client.dma_unmap(ro_iova, 1 << 20)
    finally:
        ro.close()
    assert IOVA < ro_iova


def test_nlb_is_16_bits(io: Host):
    # NLB 0xFFFF = 65536 blocks = 32 MiB > MDTS
    assert io.io(1, Op.READ, 1, 0, 65536, prp1=io.alloc(4096)).status == Status.INVALID_FIELD
