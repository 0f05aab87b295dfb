"""PRP and SGL walking against real fd-backed guest memory (memfd + DmaTable + GuestMemory).

Layout of the test guest:
  [BASE, BASE + RAM_SIZE)      read/write memfd ``ram`` (we keep our own mmap to check data)
  [BASE + RAM_SIZE, HOLE_END)  unmapped hole
  [RO_BASE, RO_BASE + 64 KiB)  read-only mapping of another memfd
"""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from nvme_emu.prp import (
    SglDescriptor,
    gather,
    is_bit_bucket,
    prp_views,
    release_views,
    scatter,
    sgl_views,
)
from nvme_emu.spec.commands import NvmeError, SglType, Status
from vfio_user.constants import DMA_FLAG_READ, DMA_FLAG_WRITE
from vfio_user.dma import DmaTable, GuestMemory
from vfio_user.memfd import sealed_memfd

PAGE = 4096
BASE = 0x10_0000
RAM_SIZE = 8 << 20
HOLE = BASE + RAM_SIZE
RO_BASE = 0x100_0000
RO_SIZE = 64 << 10


class Guest:
    """Guest memory plus our own window onto the same memfd for checking what landed."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.maps: list[mmap.mmap] = []
        self.table = DmaTable()
        self.mem = GuestMemory(self.table)
        self.ram = self._memfd(BASE, RAM_SIZE, DMA_FLAG_READ | DMA_FLAG_WRITE)
        self.ro = self._memfd(RO_BASE, RO_SIZE, DMA_FLAG_READ)

    def _memfd(self, iova: int, size: int, prot: int) -> mmap.mmap:
        fd = sealed_memfd("guest", size)  # as QEMU's guest RAM: the DMA table wants it sealed
        self.fds.append(fd)
        self.table.add(iova, size, prot, fd, 0)
        mm = mmap.mmap(fd, size)
        self.maps.append(mm)
        return mm

    def poke(self, iova: int, data: bytes) -> None:
        """Write through our own mapping (the guest's view of memory)."""
        if RO_BASE <= iova < RO_BASE + RO_SIZE:
            self.ro[iova - RO_BASE : iova - RO_BASE + len(data)] = data
        else:
            self.ram[iova - BASE : iova - BASE + len(data)] = data

    def peek(self, iova: int, n: int) -> bytes:
        return bytes(self.ram[iova - BASE : iova - BASE + n])

    def page(self, i: int) -> int:
        return BASE + i * PAGE

    def prp_list(self, iova: int, entries: list[int]) -> None:
        self.poke(iova, struct.pack(f"<{len(entries)}Q", *entries))

    def close(self) -> None:
        self.table.remove_all()
        for mm in self.maps:
            mm.close()
        for fd in self.fds:
            os.close(fd)
        assert self.table.open_count() == 0


@pytest.fixture
def guest():
    g = Guest()
    try:
        yield g
    finally:
        g.close()


def transfer_length(views: list[memoryview]) -> int:
    """Bytes the views cover, bit buckets included."""
    return sum(len(v) for v in views)


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def release(views) -> None:
    """Views pin the guest mapping; drop them so the fixture can unmap."""
    release_views(views)


def status_of(excinfo) -> Status:
    return excinfo.value.status


# ------------------------------------------------------------------------------------- PRP ----


def test_zero_length_is_empty(guest):
    assert prp_views(guest.mem, 0xDEAD0000, 0, 0, PAGE, write=True) == []
    assert sgl_views(guest.mem, bytes(16), 0, write=True) == []


def test_prp1_with_offset_and_prp2(guest):
    prp1 = guest.page(3) + 0x200
    prp2 = guest.page(10)
    views = prp_views(guest.mem, prp1, prp2, PAGE, PAGE, write=True)
    assert [len(v) for v in views] == [PAGE - 0x200, 0x200]
    data = pattern(PAGE)
    assert scatter(views, data) == PAGE
    release(views)
    assert guest.peek(prp1, PAGE - 0x200) == data[: PAGE - 0x200]
    assert guest.peek(prp2, 0x200) == data[PAGE - 0x200 :]
    assert guest.peek(prp2 + 0x200, 16) == bytes(16)  # nothing past the transfer


def test_single_page_ignores_prp2(guest):
    views = prp_views(guest.mem, guest.page(1) + 8, 0xFFFF_FFFF_FFFF_F123, 100, PAGE, write=False)
    assert transfer_length(views) == 100
    release(views)


def test_exactly_two_pages(guest):
    guest.poke(guest.page(5), pattern(PAGE, 1))
    guest.poke(guest.page(2), pattern(PAGE, 2))
    views = prp_views(guest.mem, guest.page(5), guest.page(2), 2 * PAGE, PAGE, write=False)
    assert [len(v) for v in views] == [PAGE, PAGE]
    assert gather(views) == pattern(PAGE, 1) + pattern(PAGE, 2)
    release(views)


def test_prp_list_128k(guest):
    # 32 pages: PRP1 + a 31-entry list; data pages in reverse order so nothing coalesces.
    pages = [guest.page(100 - i) for i in range(32)]
    lst = guest.page(200)
    guest.prp_list(lst, pages[1:])
    views = prp_views(guest.mem, pages[0], lst, 128 << 10, PAGE, write=True)
    assert len(views) == 32 and transfer_length(views) == 128 << 10
    data = pattern(128 << 10, 3)
    scatter(views, data)
    release(views)
    for i, p in enumerate(pages):
        assert guest.peek(p, PAGE) == data[i * PAGE : (i + 1) * PAGE]


def test_contiguous_pages_coalesce(guest):
    lst = guest.page(300)
    guest.prp_list(lst, [guest.page(i) for i in range(11, 20)])
    views = prp_views(guest.mem, guest.page(10), lst, 10 * PAGE, PAGE, write=True)
    assert [len(v) for v in views] == [10 * PAGE]
    release(views)


def test_prp_list_chained_across_list_pages(guest):
    # 600 data pages beyond PRP1: list page 1 holds 511 entries + a chain pointer to list
    # page 2, which holds the other 89. Every other page is used, so nothing coalesces.
    n = 600
    data_pages = [guest.page(2 * i + 2) for i in range(n)]
    for i, p in enumerate(data_pages):
        guest.poke(p, struct.pack("<I", i + 1) * (PAGE // 4))
    guest.poke(guest.page(0), bytes(PAGE))
    list1, list2 = BASE + RAM_SIZE - 2 * PAGE, BASE + RAM_SIZE - PAGE
    guest.prp_list(list1, data_pages[:511] + [list2])
    guest.prp_list(list2, data_pages[511:])
    views = prp_views(guest.mem, guest.page(0), list1, (n + 1) * PAGE, PAGE, write=False)
    try:
        assert len(views) == n + 1 and transfer_length(views) == (n + 1) * PAGE
        for i, v in enumerate(views):
            assert struct.unpack_from("<I", v, PAGE - 4)[0] == i  # page i of the transfer
    finally:
        release(views)


def test_prp_list_pointer_with_offset_chains_early(guest):
    # The list starts 16 bytes before the end of its page: one data entry, then a chain.
    lst = guest.page(400) + PAGE - 16
    nxt = guest.page(401)
    guest.prp_list(lst, [guest.page(50), nxt])
    guest.prp_list(nxt, [guest.page(52), guest.page(54), guest.page(56)])
    views = prp_views(guest.mem, guest.page(48), lst, 5 * PAGE, PAGE, write=True)
    scatter(views, pattern(5 * PAGE, 9))
    release(views)
    for i, p in enumerate([48, 50, 52, 54, 56]):
        assert guest.peek(guest.page(p), PAGE) == pattern(5 * PAGE, 9)[i * PAGE : (i + 1) * PAGE]


def test_prp_list_loop_terminates(guest):
    # A list page whose chain pointer points at itself: the walk is bounded by the length.
    lst = guest.page(500)
    guest.prp_list(lst, [guest.page(1)] * 511 + [lst])
    views = prp_views(guest.mem, guest.page(0), lst, 2000 * PAGE, PAGE, write=False)
    assert transfer_length(views) == 2000 * PAGE
    release(views)


@pytest.mark.parametrize(
    "prp1_off,prp2_off,length",
    [
        (2, 0, 100),  # PRP1 not dword aligned
        (0, 0x10, 2 * PAGE),  # PRP2 used as a data pointer with an offset
        (0, 4, 3 * PAGE),  # PRP list pointer not qword aligned
    ],
)
def test_prp_offset_invalid(guest, prp1_off, prp2_off, length):
    with pytest.raises(NvmeError) as ei:
        prp_views(guest.mem, guest.page(1) + prp1_off, guest.page(2) + prp2_off, length, PAGE, write=True)
    assert status_of(ei) == Status.PRP_OFFSET_INVALID


def test_prp_list_entry_with_offset(guest):
    lst = guest.page(20)
    guest.prp_list(lst, [guest.page(21), guest.page(22) + 0x100])
    with pytest.raises(NvmeError) as ei:
        prp_views(guest.mem, guest.page(1), lst, 3 * PAGE, PAGE, write=True)
    assert status_of(ei) == Status.PRP_OFFSET_INVALID
    assert ei.value.dnr


def test_chained_pointer_with_offset(guest):
    lst = guest.page(20) + PAGE - 16
    guest.prp_list(lst, [guest.page(21), guest.page(30) + 8])
    with pytest.raises(NvmeError) as ei:
        prp_views(guest.mem, guest.page(1), lst, 4 * PAGE, PAGE, write=True)
    assert status_of(ei) == Status.PRP_OFFSET_INVALID


def test_prp_into_hole_is_data_transfer_error(guest):
    with pytest.raises(NvmeError) as ei:
        prp_views(guest.mem, HOLE, 0, PAGE, PAGE, write=False)
    assert status_of(ei) == Status.DATA_TRANSFER_ERROR
    # a list entry pointing into the hole
    lst = guest.page(20)
    guest.prp_list(lst, [guest.page(21), HOLE + PAGE])
    with pytest.raises(NvmeError) as ei:
        prp_views(guest.mem, guest.page(1), lst, 3 * PAGE, PAGE, write=False)
    assert status_of(ei) == Status.DATA_TRANSFER_ERROR
    # the list itself in the hole
    with pytest.raises(NvmeError) as ei:
        prp_views(guest.mem, guest.page(1), HOLE, 3 * PAGE, PAGE, write=False)
    assert status_of(ei) == Status.DATA_TRANSFER_ERROR
    # a transfer running off the end of RAM into the hole
    with pytest.raises(NvmeError) as ei:
        prp_views(guest.mem, HOLE - PAGE, HOLE, 2 * PAGE, PAGE, write=False)
    assert status_of(ei) == Status.DATA_TRANSFER_ERROR


def test_read_only_mapping(guest):
    guest.poke(RO_BASE, b"ro-data!")
    views = prp_views(guest.mem, RO_BASE, 0, 8, PAGE, write=False)
    assert gather(views) == b"ro-data!"
    release(views)
    with pytest.raises(NvmeError) as ei:
        prp_views(guest.mem, RO_BASE, 0, 8, PAGE, write=True)
    assert status_of(ei) == Status.DATA_TRANSFER_ERROR


def test_prp_list_in_read_only_memory_is_fine(guest):
    guest.prp_list(RO_BASE, [guest.page(7), guest.page(9)])
    views = prp_views(guest.mem, guest.page(5), RO_BASE, 3 * PAGE, PAGE, write=True)
    assert len(views) == 3
    release(views)


def test_larger_memory_page_size(guest):
    mps = 16 << 10
    views = prp_views(guest.mem, BASE + 0x100, BASE + mps, mps, mps, write=True)
    assert [len(v) for v in views] == [mps]  # contiguous: coalesced into one view
    release(views)


def test_view_across_adjacent_mappings(guest):
    # Add a second memfd right after the hole's start: BASE+RAM_SIZE .. +64K, adjacent to RAM.
    fd = sealed_memfd("adj", 64 << 10)
    try:
        guest.table.add(HOLE, 64 << 10, DMA_FLAG_READ | DMA_FLAG_WRITE, fd, 0)
        views = prp_views(guest.mem, HOLE - PAGE, HOLE, 2 * PAGE, PAGE, write=True)
        assert [len(v) for v in views] == [PAGE, PAGE]
        release(views)
        guest.table.remove(HOLE, 64 << 10)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------- SGL ----


def desc(t: int, addr: int = 0, length: int = 0, subtype: int = 0) -> bytes:
    return SglDescriptor(addr, length, t, subtype).pack()


def test_sgl_data_block(guest):
    addr = guest.page(3) + 5  # byte aligned: we advertise no alignment requirement
    views = sgl_views(guest.mem, desc(SglType.DATA_BLOCK, addr, 1000), 1000, write=True)
    scatter(views, pattern(1000, 4))
    release(views)
    assert guest.peek(addr, 1000) == pattern(1000, 4)


def test_sgl_segment_chain_across_pages(guest):
    # SGL1 -> Segment (2 data blocks + Last Segment descriptor), placed so it straddles a page
    # boundary -> Last Segment with 2 data blocks crossing page boundaries.
    seg1 = guest.page(30) + PAGE - 32
    last = guest.page(40) + PAGE - 16
    blocks = [(guest.page(10) + 4000, 300), (guest.page(12) + 100, 5000), (guest.page(20) + 7, 1), (guest.page(25), 8191)]
    guest.poke(seg1, desc(SglType.DATA_BLOCK, *blocks[0]) + desc(SglType.DATA_BLOCK, *blocks[1]) + desc(SglType.LAST_SEGMENT, last, 32))
    guest.poke(last, desc(SglType.DATA_BLOCK, *blocks[2]) + desc(SglType.DATA_BLOCK, *blocks[3]))
    total = sum(n for _, n in blocks)
    views = sgl_views(guest.mem, desc(SglType.SEGMENT, seg1, 48), total, write=True)
    assert transfer_length(views) == total
    data = pattern(total, 5)
    scatter(views, data)
    release(views)
    pos = 0
    for addr, n in blocks:
        assert guest.peek(addr, n) == data[pos : pos + n]
        pos += n


def test_sgl_last_segment_directly(guest):
    last = guest.page(60)
    guest.poke(last, desc(SglType.DATA_BLOCK, guest.page(61), 512) + desc(SglType.DATA_BLOCK, guest.page(63), 512))
    guest.poke(guest.page(61), b"A" * 512)
    guest.poke(guest.page(63), b"B" * 512)
    views = sgl_views(guest.mem, desc(SglType.LAST_SEGMENT, last, 32), 1024, write=False)
    assert gather(views) == b"A" * 512 + b"B" * 512
    release(views)


def test_sgl_bit_bucket_on_read(guest):
    last = guest.page(70)
    guest.poke(
        last,
        desc(SglType.DATA_BLOCK, guest.page(71), 100) + desc(SglType.BIT_BUCKET, 0, 200) + desc(SglType.DATA_BLOCK, guest.page(72), 100),
    )
    views = sgl_views(guest.mem, desc(SglType.LAST_SEGMENT, last, 48), 400, write=True)
    assert [len(v) for v in views] == [100, 200, 100]
    assert [is_bit_bucket(v) for v in views] == [False, True, False]
    data = pattern(400, 6)
    scatter(views, data)
    release(views)
    assert guest.peek(guest.page(71), 100) == data[:100]
    assert guest.peek(guest.page(72), 100) == data[300:]


def test_sgl_bit_bucket_on_device_read_of_host_memory_is_invalid(guest):
    with pytest.raises(NvmeError) as ei:
        sgl_views(guest.mem, desc(SglType.BIT_BUCKET, 0, 512), 512, write=False)
    assert status_of(ei) == Status.SGL_DESCRIPTOR_TYPE_INVALID


def test_sgl_looping_chain_terminates(guest):
    seg = guest.page(80)
    guest.poke(seg, desc(SglType.DATA_BLOCK, guest.page(81), 0) + desc(SglType.SEGMENT, seg, 32))
    with pytest.raises(NvmeError) as ei:
        sgl_views(guest.mem, desc(SglType.SEGMENT, seg, 32), 4096, write=True)
    assert status_of(ei) == Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS


@pytest.mark.parametrize("have,want", [(100, 200), (300, 200)])
def test_sgl_wrong_length(guest, have, want):
    with pytest.raises(NvmeError) as ei:
        sgl_views(guest.mem, desc(SglType.DATA_BLOCK, guest.page(1), have), want, write=True)
    assert status_of(ei) == Status.DATA_SGL_LENGTH_INVALID


def test_sgl_excess_allowed_when_advertised(guest):
    views = sgl_views(guest.mem, desc(SglType.DATA_BLOCK, guest.page(1), 300), 200, write=True, allow_excess=True)
    assert transfer_length(views) == 200
    release(views)


def test_sgl_excess_descriptor_after_satisfied(guest):
    last = guest.page(90)
    guest.poke(last, desc(SglType.DATA_BLOCK, guest.page(91), 512) + desc(SglType.DATA_BLOCK, guest.page(92), 512))
    with pytest.raises(NvmeError) as ei:
        sgl_views(guest.mem, desc(SglType.LAST_SEGMENT, last, 32), 512, write=True)
    assert status_of(ei) == Status.DATA_SGL_LENGTH_INVALID


@pytest.mark.parametrize("seglen", [0, 24])
def test_sgl_segment_length_not_multiple_of_16(guest, seglen):
    with pytest.raises(NvmeError) as ei:
        sgl_views(guest.mem, desc(SglType.LAST_SEGMENT, guest.page(1), seglen), 512, write=True)
    assert status_of(ei) == Status.INVALID_SGL_SEGMENT_DESCRIPTOR


def test_sgl_segment_descriptor_mid_segment(guest):
    seg = guest.page(100)
    guest.poke(seg, desc(SglType.SEGMENT, guest.page(101), 16) + desc(SglType.DATA_BLOCK, guest.page(102), 512))
    with pytest.raises(NvmeError) as ei:
        sgl_views(guest.mem, desc(SglType.SEGMENT, seg, 32), 512, write=True)
    assert status_of(ei) == Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS


def test_sgl_last_segment_containing_segment(guest):
    last = guest.page(110)
    guest.poke(last, desc(SglType.DATA_BLOCK, guest.page(111), 256) + desc(SglType.SEGMENT, guest.page(112), 16))
    guest.poke(guest.page(112), desc(SglType.DATA_BLOCK, guest.page(113), 256))
    with pytest.raises(NvmeError) as ei:
        sgl_views(guest.mem, desc(SglType.LAST_SEGMENT, last, 32), 512, write=True)
    assert status_of(ei) == Status.INVALID_SGL_SEGMENT_DESCRIPTOR


@pytest.mark.parametrize(
    "d",
    [
        desc(SglType.DATA_BLOCK, BASE, 512, subtype=1),  # offset sub type: fabrics only
        desc(SglType.KEYED_DATA_BLOCK, BASE, 512),
        desc(SglType.TRANSPORT_DATA_BLOCK, BASE, 512),
        desc(0x7, BASE, 512),
        desc(SglType.SEGMENT, BASE, 16, subtype=1),
    ],
)
def test_sgl_descriptor_type_invalid(guest, d):
    with pytest.raises(NvmeError) as ei:
        sgl_views(guest.mem, d, 512, write=True)
    assert status_of(ei) == Status.SGL_DESCRIPTOR_TYPE_INVALID


def test_sgl_holes(guest):
    with pytest.raises(NvmeError) as ei:
        sgl_views(guest.mem, desc(SglType.DATA_BLOCK, HOLE, 512), 512, write=True)
    assert status_of(ei) == Status.DATA_TRANSFER_ERROR
    with pytest.raises(NvmeError) as ei:
        sgl_views(guest.mem, desc(SglType.LAST_SEGMENT, HOLE, 16), 512, write=True)
    assert status_of(ei) == Status.DATA_TRANSFER_ERROR
    with pytest.raises(NvmeError) as ei:
        sgl_views(guest.mem, desc(SglType.DATA_BLOCK, RO_BASE, 512), 512, write=True)
    assert status_of(ei) == Status.DATA_TRANSFER_ERROR
    with pytest.raises(NvmeError) as ei:
        sgl_views(guest.mem, desc(SglType.DATA_BLOCK, (1 << 64) - 16, 512), 512, write=True)
    assert status_of(ei) == Status.DATA_TRANSFER_ERROR


def test_scatter_zero_fills_and_truncates(guest):
    guest.poke(guest.page(1), b"\xff" * 64)
    views = prp_views(guest.mem, guest.page(1), 0, 64, PAGE, write=True)
    assert scatter(views, b"abc") == 3
    assert scatter(views, b"x" * 100) == 64
    scatter(views, b"abc")
    release(views)
    assert guest.peek(guest.page(1), 64) == b"abc" + bytes(61)
