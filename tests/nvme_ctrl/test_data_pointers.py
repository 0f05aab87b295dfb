"""PRPs and SGLs built by hand in guest memory: offsets, lists, chains, bit buckets, MDTS."""

from __future__ import annotations

import os
import random
import struct

import pytest

from ..support.host import Host
from .ctrl_helpers import PAGE
from nvme_emu.spec.commands import NvmOpcode as Op, Status

MDTS_BYTES = 512 * 1024
DATA, BUCKET, SEGMENT, LAST = 0x0, 0x1, 0x2, 0x3


def scattered_pages(io: Host, n: int) -> list[int]:
    """``n`` page addresses in a shuffled order (so contiguity cannot hide a bug)."""
    base = io.alloc((n + 1) * PAGE)
    pages = [base + PAGE * i for i in range(n + 1)]
    random.Random(n).shuffle(pages)
    return pages[:n]


def prp_transfer(io: Host, length: int, offset: int = 0) -> tuple[int, int, list[tuple[int, int]]]:
    """PRP1/PRP2 and the (iova, len) pieces for a transfer over scattered pages."""
    first = min(length, PAGE - offset)
    rest = length - first
    npages = 1 + -(-rest // PAGE)
    pages = scattered_pages(io, npages)
    pieces = [(pages[0] + offset, first)]
    left = rest
    for p in pages[1:]:
        pieces.append((p, min(PAGE, left)))
        left -= min(PAGE, left)
    if npages == 1:
        return pages[0] + offset, 0, pieces
    if npages == 2:
        return pages[0] + offset, pages[1], pieces
    plist = io.alloc(PAGE)
    io.write_mem(plist, struct.pack(f"<{npages - 1}Q", *pages[1:]))
    return pages[0] + offset, plist, pieces


def fill(io: Host, pieces, data: bytes) -> None:
    pos = 0
    for addr, n in pieces:
        io.write_mem(addr, data[pos : pos + n])
        pos += n


def gather(io: Host, pieces) -> bytes:
    return b"".join(io.read_mem(addr, n) for addr, n in pieces)


@pytest.mark.parametrize("length", [4096, 8192, 128 * 1024, MDTS_BYTES])
@pytest.mark.parametrize("offset", [0, 0x200, 0xFFC])
def test_prp_transfers(io: Host, length: int, offset: int):
    data = os.urandom(length)
    p1, p2, pieces = prp_transfer(io, length, offset)
    fill(io, pieces, data)
    assert io.io(1, Op.WRITE, 1, 1000, length // 512, prp1=p1, prp2=p2).status == Status.SUCCESS
    assert io.read_ok(1, 1, 1000, length // 512) == data  # read back through contiguous PRPs
    p1, p2, pieces = prp_transfer(io, length, offset)
    fill(io, pieces, b"\xcc" * length)
    assert io.io(1, Op.READ, 1, 1000, length // 512, prp1=p1, prp2=p2).status == Status.SUCCESS
    assert gather(io, pieces) == data


def test_prp1_offset_small_transfer_in_one_page(io: Host):
    data = os.urandom(1024)
    buf = io.alloc(PAGE)
    io.write_mem(buf + 0x400, data)
    assert io.io(1, Op.WRITE, 1, 7, 2, prp1=buf + 0x400, prp2=0xDEAD0000).status == Status.SUCCESS  # PRP2 unused
    assert io.read_ok(1, 1, 7, 2) == data


@pytest.mark.parametrize("offset, length", [(100, 3584), (100, PAGE), (100, 2 * PAGE), (3072, 3 * PAGE + 1024)])
def test_support_prp_builder_counts_prp1_offset(io: Host, offset: int, length: int):
    """The harness's own PRP builder (tests.support.host.prps), checked against the server: a
    buffer that starts ``offset`` bytes into a page spans one more page than ``length`` says
    whenever the tail spills over, and the entries after PRP1 must be page aligned."""
    base = io.alloc(-(-(offset + length) // PAGE) * PAGE)
    buf = base + offset
    prp1, prp2 = io.prps(buf, length)
    assert prp1 == buf
    data = os.urandom(length)
    io.write_mem(buf, data)
    assert io.io(1, Op.WRITE, 1, 200, length // 512, prp1=prp1, prp2=prp2).status == Status.SUCCESS
    assert io.read_ok(1, 1, 200, length // 512) == data
    io.write_mem(buf, bytes(length))
    assert io.io(1, Op.READ, 1, 200, length // 512, prp1=prp1, prp2=prp2).status == Status.SUCCESS
    assert io.read_mem(buf, length) == data


def test_mdts_plus_one_page_is_invalid_field(io: Host):
    length = MDTS_BYTES + 4096
    p1, p2, _ = prp_transfer(io, length)
    for op in (Op.READ, Op.WRITE, Op.COMPARE):
        assert io.io(1, op, 1, 0, length // 512, prp1=p1, prp2=p2).status == Status.INVALID_FIELD, op


def test_prp_list_chained_across_list_pages(io: Host):
    """A PRP list starting 4 entries before a page end: 3 entries, then a chain pointer."""
    length = 64 * 1024  # 16 pages: PRP1 + 15 list entries
    pages = scattered_pages(io, 16)
    lists = io.alloc(2 * PAGE)
    first_list = lists + PAGE - 4 * 8
    second_list = lists + PAGE
    io.write_mem(first_list, struct.pack("<4Q", pages[1], pages[2], pages[3], second_list))
    io.write_mem(second_list, struct.pack("<12Q", *pages[4:]))
    pieces = [(p, PAGE) for p in pages]
    data = os.urandom(length)
    fill(io, pieces, data)
    assert io.io(1, Op.WRITE, 1, 300, 128, prp1=pages[0], prp2=first_list).status == Status.SUCCESS
    assert io.read_ok(1, 1, 300, 128) == data
    fill(io, pieces, bytes(length))
    assert io.io(1, Op.READ, 1, 300, 128, prp1=pages[0], prp2=first_list).status == Status.SUCCESS
    assert gather(io, pieces) == data


def test_prp_offset_errors(io: Host):
    buf = io.alloc(4 * PAGE)
    assert io.io(1, Op.READ, 1, 0, 1, prp1=buf + 2).status == Status.PRP_OFFSET_INVALID  # not dword aligned
    assert io.io(1, Op.READ, 1, 0, 16, prp1=buf, prp2=buf + PAGE + 0x200).status == Status.PRP_OFFSET_INVALID
    plist = io.alloc(PAGE)
    io.write_mem(plist, struct.pack("<2Q", buf + PAGE, buf + 2 * PAGE + 8))
    assert io.io(1, Op.READ, 1, 0, 24, prp1=buf, prp2=plist).status == Status.PRP_OFFSET_INVALID
    assert io.io(1, Op.READ, 1, 0, 24, prp1=buf, prp2=plist + 4).status == Status.PRP_OFFSET_INVALID  # list not qword aligned


# -- SGL ----------------------------------------------------------------------------------------


def desc(addr: int, length: int, kind: int) -> bytes:
    return struct.pack("<QI3xB", addr, length, kind << 4)


def sgl_io(io: Host, op: int, slba: int, nlb: int, sgl1: bytes, nsid: int = 1):
    p1, p2 = struct.unpack("<QQ", sgl1)
    return io.io(1, op, nsid, slba, nlb, prp1=p1, prp2=p2, flags=1 << 6)


def test_sgl_single_data_block(io: Host):
    data = os.urandom(8192)
    buf = io.alloc(3 * PAGE)
    io.write_mem(buf + 100, data)  # no alignment needed
    assert sgl_io(io, Op.WRITE, 20, 16, desc(buf + 100, 8192, DATA)).status == Status.SUCCESS
    assert io.read_ok(1, 1, 20, 16) == data
    out = io.alloc(3 * PAGE)
    assert sgl_io(io, Op.READ, 20, 16, desc(out + 3, 8192, DATA)).status == Status.SUCCESS
    assert io.read_mem(out + 3, 8192) == data


def test_sgl_segment_and_last_segment_chain_across_pages(io: Host):
    data = os.urandom(12 * 1024)
    chunks = [(0, 1000), (1000, 3096), (4096, 512), (4608, 7680)]  # arbitrary lengths
    bufs = [io.alloc(n + 64, align=8) + 3 for _, n in chunks]
    seg_pages = io.alloc(3 * PAGE)
    seg1 = seg_pages + PAGE - 32  # two descriptors right at the end of a page
    seg2 = seg_pages + 2 * PAGE + 16  # in another page
    # segment 1: data chunk 0, then the Last Segment descriptor -> segment 2 with chunks 1..3
    io.write_mem(seg1, desc(bufs[0], chunks[0][1], DATA) + desc(seg2, 48, LAST))
    io.write_mem(seg2, b"".join(desc(b, n, DATA) for b, (_, n) in zip(bufs[1:], chunks[1:], strict=True)))
    sgl1 = desc(seg1, 32, SEGMENT)
    for b, (off, n) in zip(bufs, chunks, strict=True):
        io.write_mem(b, data[off : off + n])
    assert sgl_io(io, Op.WRITE, 500, 24, sgl1).status == Status.SUCCESS
    assert io.read_ok(1, 1, 500, 24) == data
    for b, (_, n) in zip(bufs, chunks, strict=True):
        io.write_mem(b, bytes(n))
    assert sgl_io(io, Op.READ, 500, 24, sgl1).status == Status.SUCCESS
    assert b"".join(io.read_mem(b, n) for b, (_, n) in zip(bufs, chunks, strict=True)) == data


def test_sgl_last_segment_directly(io: Host):
    data = os.urandom(4096)
    a, b = io.alloc(PAGE), io.alloc(PAGE)
    seg = io.alloc(PAGE)
    io.write_mem(seg, desc(a, 1536, DATA) + desc(b, 2560, DATA))
    io.write_mem(a, data[:1536])
    io.write_mem(b, data[1536:])
    assert sgl_io(io, Op.WRITE, 0, 8, desc(seg, 32, LAST)).status == Status.SUCCESS
    assert io.read_ok(1, 1, 0, 8) == data


def test_sgl_bit_bucket_on_read(io: Host):
    data = os.urandom(8 * 512)
    io.write_ok(1, 1, 40, data)
    out = io.alloc(2 * PAGE)
    io.write_mem(out, b"\xab" * 2 * PAGE)
    seg = io.alloc(PAGE)
    io.write_mem(seg, desc(out, 1024, DATA) + desc(0, 2048, BUCKET) + desc(out + 1024, 1024, DATA))
    assert sgl_io(io, Op.READ, 40, 8, desc(seg, 48, LAST)).status == Status.SUCCESS
    assert io.read_mem(out, 2048) == data[:1024] + data[3072:]
    assert io.read_mem(out + 2048, 16) == b"\xab" * 16  # nothing beyond


def test_sgl_bit_bucket_on_write_is_invalid(io: Host):
    seg = io.alloc(PAGE)
    buf = io.alloc(PAGE)
    io.write_mem(seg, desc(buf, 512, DATA) + desc(0, 512, BUCKET))
    assert sgl_io(io, Op.WRITE, 0, 2, desc(seg, 32, LAST)).status == Status.SGL_DESCRIPTOR_TYPE_INVALID


def test_sgl_errors(io: Host):
    buf = io.alloc(2 * PAGE)
    assert sgl_io(io, Op.READ, 0, 8, desc(buf, 2048, DATA)).status == Status.DATA_SGL_LENGTH_INVALID  # short
    assert sgl_io(io, Op.READ, 0, 1, desc(buf, 4096, DATA)).status == Status.DATA_SGL_LENGTH_INVALID  # long
    assert sgl_io(io, Op.READ, 0, 1, desc(buf, 512, 0x4)).status == Status.SGL_DESCRIPTOR_TYPE_INVALID  # keyed
    assert sgl_io(io, Op.READ, 0, 1, desc(buf, 20, SEGMENT)).status == Status.INVALID_SGL_SEGMENT_DESCRIPTOR
    assert sgl_io(io, Op.READ, 0, 1, desc(0x4000_0000, 512, DATA)).status == Status.DATA_TRANSFER_ERROR
    assert sgl_io(io, Op.READ, 0, 1, desc(0x4000_0000, 32, LAST)).status == Status.DATA_TRANSFER_ERROR
    # a segment that points at itself: bounded, refused
    seg = io.alloc(PAGE)
    io.write_mem(seg, desc(buf, 0, DATA) + desc(seg, 32, SEGMENT))  # zero-length data: loops forever
    assert sgl_io(io, Op.READ, 0, 1, desc(seg, 32, SEGMENT)).status == Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS


def test_sgl_for_range_lists(io: Host):
    """Dataset Management reads its range list through an SGL too."""
    io.write_ok(1, 1, 0, os.urandom(16 * 512))
    ranges = io.alloc(PAGE)
    io.write_mem(ranges, struct.pack("<IIQ", 0, 8, 4))
    c = io.cmd(1, Op.DATASET_MANAGEMENT, nsid=1, flags=1 << 6, cdw10=0, cdw11=1 << 2,
               prp1=ranges, prp2=struct.unpack("<Q", struct.pack("<I3xB", 16, DATA << 4))[0])
    assert c.status == Status.SUCCESS
    assert io.read_ok(1, 1, 4, 8) == bytes(4096)
