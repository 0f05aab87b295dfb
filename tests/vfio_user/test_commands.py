"""Every command round-trips against the sample server running in its own process.

The client is vfio_user.vmm.client.VfioUserClient over a real Unix socket; fds travel with
SCM_RIGHTS, guest memory is a memfd, interrupts are eventfds.
"""

from __future__ import annotations

import errno
import os
import random
import select
import struct
import time

import pytest

from vfio_user import messages as m
from vfio_user.vmm.client import GuestRam
from vfio_user.constants import (
    DEVICE_FLAG_PCI,
    DEVICE_FLAG_RESET,
    DMA_FLAG_READ,
    DMA_FLAG_WRITE,
    DMA_UNMAP_FLAG_ALL,
    IO_FD_TYPE_IOEVENTFD_SHADOW,
    IRQ_ACTION_MASK,
    IRQ_ACTION_TRIGGER,
    IRQ_ACTION_UNMASK,
    IRQ_DATA_BOOL,
    IRQ_DATA_EVENTFD,
    IRQ_DATA_NONE,
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    REGION_FLAG_CAPS,
    REGION_FLAG_MMAP,
    REGION_FLAG_READ,
    REGION_FLAG_WRITE,
    Command,
    IrqIndex,
)
from vfio_user.sample import REG_DMA_DST, REG_DMA_SRC, REG_ID, REG_RINGS, REG_SCRATCH, TICKER_ID

from ..support.fds import efd_count, efd_wait, new_eventfd
from ..support.server import DEADLINE
from .vu_helpers import assert_error, exchange, read32, ticker_ring, write32

PAGE = 4096
CONFIG = 7


@pytest.fixture
def ram():
    with GuestRam(1 << 20) as r:
        yield r


def _dma_map_raw(client, iova, size, *, flags=DMA_FLAG_READ | DMA_FLAG_WRITE, offset=0, fds=(), argsz=32):
    return exchange(client, Command.DMA_MAP, m.DmaMap.build({"argsz": argsz, "flags": flags, "offset": offset, "address": iova, "size": size}), fds)


def _dma_unmap_raw(client, iova, size, flags=0):
    return exchange(client, Command.DMA_UNMAP, m.DmaUnmap.build({"argsz": 24, "flags": flags, "address": iova, "size": size}))


# -- VERSION ------------------------------------------------------------------------------


def test_version_reply(fresh_server):
    c = fresh_server.connect(negotiate=False)
    try:
        caps = c.negotiate()
        assert c.version_reply_size <= 214  # QEMU's receive buffer is its own 214-byte request
        assert caps["max_msg_fds"] == 8 and caps["max_data_xfer_size"] >= 4096
        assert caps["pgsizes"] % 4096 == 0 and caps["write_multiple"] is True
        assert read32(c, 0, REG_ID) == TICKER_ID  # and the session works afterwards
    finally:
        c.close()


def test_version_reply_wire_format(server):
    c = server.connect(negotiate=False)
    try:
        body = m.VersionPayload.build({"major": 0, "minor": 0, "json": m.encode_version_json({"max_msg_fds": 4})})
        reply = exchange(c, Command.VERSION, body)
        assert not reply.is_error and reply.fds == []
        major, minor = struct.unpack_from("<HH", reply.payload)
        assert (major, minor) == (0, 0)
        assert reply.payload.endswith(b"\0") and reply.payload.count(b"\0", 4) == 1
        assert m.decode_version_json(reply.payload[4:])["max_msg_fds"] == 8
    finally:
        c.close()


# -- DMA_MAP / DMA_UNMAP -------------------------------------------------------------------


def test_dma_map_unmap_round_trip_and_munmap_before_reply(server, client, ram):
    base = server.fd_count()
    client.dma_map(0x100000, 0x10000, ram)
    assert server.fd_count() == base + 1  # the server holds the mapping (one dup'd fd in the mmap)
    echo = client.dma_unmap(0x100000, 0x10000)
    assert echo == m.DmaUnmap.build({"argsz": 24, "flags": 0, "address": 0x100000, "size": 0x10000})
    assert server.fd_count() == base  # unmapped before the reply was sent


def test_dma_unmap_nonexistent_is_enoent(client, ram):
    assert_error(_dma_unmap_raw(client, 0x200000, PAGE), errno.ENOENT)
    client.dma_map(0x200000, 2 * PAGE, ram)
    assert_error(_dma_unmap_raw(client, 0x200000, PAGE), errno.ENOENT)  # size must match
    assert_error(_dma_unmap_raw(client, 0x201000, PAGE), errno.ENOENT)  # start must match
    client.dma_unmap(0x200000, 2 * PAGE)
    assert_error(_dma_unmap_raw(client, 0x200000, 2 * PAGE), errno.ENOENT)  # already gone


@pytest.mark.parametrize(
    "iova,size",
    [
        pytest.param(0x10000, 0x4000, id="identical"),
        pytest.param(0xF000, 0x2000, id="head"),
        pytest.param(0x13000, 0x2000, id="tail"),
        pytest.param(0x11000, 0x1000, id="inside"),
        pytest.param(0x0, 0x100000, id="around"),
    ],
)
def test_overlapping_map_is_eexist(client, ram, iova, size):
    client.dma_map(0x10000, 0x4000, ram)
    assert_error(_dma_map_raw(client, iova, size, fds=[ram.fd]), errno.EEXIST)
    assert_error(_dma_map_raw(client, iova, size), errno.EEXIST)
    client.dma_map(0x14000, 0x1000, ram)  # adjacent is fine
    client.dma_map(0xF000, 0x1000, ram)


@pytest.mark.parametrize(
    "offset,size",
    [pytest.param(0, 2 << 20, id="too-long"), pytest.param(1 << 20, PAGE, id="offset-past-end"), pytest.param((1 << 20) - PAGE, 2 * PAGE, id="straddles-end")],
)
def test_map_outside_its_memfd_is_einval(server, client, ram, offset, size):
    base = server.fd_count()
    assert_error(_dma_map_raw(client, 0x100000, size, offset=offset, fds=[ram.fd]), errno.EINVAL)
    assert server.fd_count() == base  # the passed fd was closed
    client.dma_map(0x100000, PAGE, ram, ram_offset=(1 << 20) - PAGE)  # the last page is fine


@pytest.mark.parametrize(
    "iova,size,offset,flags",
    [
        pytest.param(0x100800, PAGE, 0, 3, id="iova"),
        pytest.param(0x100000, PAGE + 1, 0, 3, id="size"),
        pytest.param(0x100000, PAGE, 0x100, 3, id="offset"),
        pytest.param(0x100000, 0, 0, 3, id="zero-size"),
        pytest.param(0x100000, PAGE, 0, 0, id="no-prot"),
        pytest.param(0x100000, PAGE, 0, DMA_FLAG_WRITE, id="write-only"),
        pytest.param(0x100000, PAGE, 0, 0x10, id="unknown-flag"),
        pytest.param(0xFFFFFFFFFFFFF000, 2 * PAGE, 0, 3, id="wraps"),
    ],
)
def test_bad_map_is_einval(client, ram, iova, size, offset, flags):
    assert_error(_dma_map_raw(client, iova, size, flags=flags, offset=offset, fds=[ram.fd]), errno.EINVAL)
    client.dma_map(0x100000, PAGE, ram)  # nothing was left behind


def test_dma_map_with_unmappable_fd_fails_cleanly(server, client):
    base = server.fd_count()
    efd = new_eventfd()
    try:
        reply = _dma_map_raw(client, 0x100000, PAGE, fds=[efd])
    finally:
        os.close(efd)
    assert reply.is_error and reply.error_no in (errno.ENODEV, errno.EINVAL, errno.EACCES)
    assert server.fd_count() == base
    assert read32(client, 0, REG_ID) == TICKER_ID


def test_dma_map_with_two_fds_is_einval(server, client, ram):
    base = server.fd_count()
    assert_error(_dma_map_raw(client, 0x100000, PAGE, fds=[ram.fd, ram.fd]), errno.EINVAL)
    assert server.fd_count() == base


def test_read_only_and_fdless_maps_accepted(client, ram):
    client.dma_map(0xFFFC0000, 0x40000, ram, with_fd=False, writable=False)  # BIOS
    client.dma_map(0x100000, 0x10000, ram, writable=False)
    client.dma_unmap(0xFFFC0000, 0x40000)
    client.dma_unmap(0x100000, 0x10000)


def test_unmap_all(server, client, ram):
    base = server.fd_count()
    client.dma_map(0x0, 0x10000, ram)
    client.dma_map(0x20000, 0x10000, ram, ram_offset=0x20000)
    client.dma_map(0xFFFC0000, 0x40000, ram, with_fd=False)
    assert server.fd_count() == base + 2
    client.dma_unmap(0, 0, DMA_UNMAP_FLAG_ALL)
    assert server.fd_count() == base
    assert_error(_dma_unmap_raw(client, 0x0, 0x10000), errno.ENOENT)
    assert_error(_dma_unmap_raw(client, 0, PAGE, DMA_UNMAP_FLAG_ALL), errno.EINVAL)  # ALL takes no range
    client.dma_map(0x0, 0x10000, ram)  # the space is free again
    client.dma_map(0xFFFC0000, 0x40000, ram, with_fd=False)


def test_unmap_dirty_bitmap_is_enotsup(client, ram):
    client.dma_map(0x0, PAGE, ram)
    assert_error(_dma_unmap_raw(client, 0, PAGE, flags=1), errno.ENOTSUP)
    client.dma_unmap(0, PAGE)


# -- device and region description ----------------------------------------------------------


def test_device_get_info(client):
    info = client.device_info()
    assert info.flags == DEVICE_FLAG_PCI | DEVICE_FLAG_RESET
    assert info.num_regions == 9 and info.num_irqs == 5 and info.argsz == 16
    assert_error(exchange(client, Command.DEVICE_GET_INFO, m.DeviceInfo.build({"argsz": 8, "flags": 0, "num_regions": 0, "num_irqs": 0})), errno.EINVAL)


def _region_info_raw(client, index, argsz):
    return exchange(
        client, Command.DEVICE_GET_REGION_INFO, m.RegionInfo.build({"argsz": argsz, "flags": 0, "index": index, "cap_offset": 0, "size": 0, "offset": 0})
    )


def test_region_info_two_phase_sparse_mmap(client):
    first = _region_info_raw(client, 1, 32)
    assert len(first.payload) <= 32  # QEMU's buffer: 16 + argsz
    info = m.RegionInfo.parse(first.payload)
    assert info.argsz == 32 + 16 + 16  # one sparse area
    assert info.flags == REGION_FLAG_READ | REGION_FLAG_WRITE | REGION_FLAG_MMAP  # no CAPS: they did not fit
    assert info.cap_offset == 0 and info.size == 4096
    assert len(first.fds) <= 1
    first.close_fds()

    second = _region_info_raw(client, 1, info.argsz)
    assert len(second.payload) == info.argsz
    info2 = m.RegionInfo.parse(second.payload)
    assert info2.flags == REGION_FLAG_READ | REGION_FLAG_WRITE | REGION_FLAG_MMAP | REGION_FLAG_CAPS
    assert info2.cap_offset == 32
    cap = m.SparseMmapCap.parse(second.payload[info2.cap_offset :])
    assert cap.next == 0 and [(a.offset, a.size) for a in cap.areas] == [(0, 4096)]
    assert len(second.fds) == 1
    fd = second.fds[0]
    try:
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:vfio-user-region")
        assert os.fstat(fd).st_size >= 4096
    finally:
        second.close_fds()


def test_region_info_all_indexes(client):
    expect = {
        0: (REGION_FLAG_READ | REGION_FLAG_WRITE, 32),
        1: (REGION_FLAG_READ | REGION_FLAG_WRITE | REGION_FLAG_MMAP | REGION_FLAG_CAPS, 4096),
        2: (REGION_FLAG_READ | REGION_FLAG_WRITE, 4096),
        3: (0, 0), 4: (0, 0), 5: (0, 0), 6: (0, 0),
        7: (REGION_FLAG_READ | REGION_FLAG_WRITE, 4096),
        8: (0, 0),
    }
    for index, (flags, size) in expect.items():
        info = client.region_info(index)
        assert (info.index, info.flags, info.size) == (index, flags, size), index
        assert (info.fd is not None) == bool(flags & REGION_FLAG_MMAP)
    assert_error(_region_info_raw(client, 9, 32), errno.EINVAL)
    assert_error(_region_info_raw(client, 0xFFFFFFFF, 32), errno.EINVAL)
    assert_error(_region_info_raw(client, 0, 31), errno.EINVAL)


def test_region_info_replies_without_mmap_carry_no_fds(client):
    for index in (0, 2, 3, 7):
        reply = _region_info_raw(client, index, 64)
        assert reply.fds == [] and len(reply.payload) == 32


# -- GET_REGION_IO_FDS ---------------------------------------------------------------------


def _io_fds_raw(client, index, argsz, flags=0, count=0):
    return exchange(client, Command.DEVICE_GET_REGION_IO_FDS, m.RegionIoFdsRequest.build({"argsz": argsz, "flags": flags, "index": index, "count": count}))


def test_region_io_fds_two_phase(client):
    probe = _io_fds_raw(client, 0, 16)
    head = m.RegionIoFdsReply.parse(probe.payload)
    assert (head.argsz, head.count, head.index, head.records) == (16 + 48, 1, 0, b"")
    assert probe.fds == []

    full = _io_fds_raw(client, 0, head.argsz)
    body = m.RegionIoFdsReply.parse(full.payload)
    assert body.count == 1 and len(body.records) == 48
    rec = m.IoFdRecord.parse(body.records)
    assert rec.type == IO_FD_TYPE_IOEVENTFD_SHADOW
    assert (rec.gpa_offset, rec.size, rec.flags, rec.shadow_offset) == (0x8, 4, 0, 0)
    assert len(full.fds) == 2 and rec.fd_index != rec.shadow_mem_fd_index
    try:
        assert os.readlink(f"/proc/self/fd/{full.fds[rec.fd_index]}") == "anon_inode:[eventfd]"
        assert os.readlink(f"/proc/self/fd/{full.fds[rec.shadow_mem_fd_index]}").startswith("/memfd:ticker-shadow")
    finally:
        full.close_fds()

    empty = _io_fds_raw(client, 1, 16)
    assert m.RegionIoFdsReply.parse(empty.payload).count == 0 and empty.fds == []
    absent = _io_fds_raw(client, 4, 16)
    assert m.RegionIoFdsReply.parse(absent.payload).count == 0


@pytest.mark.parametrize(
    "index,argsz,flags,count",
    [
        pytest.param(9, 16, 0, 0, id="bad-index"),
        pytest.param(0, 8, 0, 0, id="argsz-small"),
        pytest.param(0, 64 << 20, 0, 0, id="argsz-huge"),
        pytest.param(0, 64, 1, 0, id="flags"),
        pytest.param(0, 64, 0, 1, id="count"),
    ],
)
def test_region_io_fds_errors(client, index, argsz, flags, count):
    assert_error(_io_fds_raw(client, index, argsz, flags, count), errno.EINVAL)


def test_shadow_ioeventfd_really_works(client):
    """The client plays KVM POST_WRITE: value into the shadow memfd, then signal the eventfd."""
    [iofd] = client.region_io_fds(0)
    assert iofd.shadow is not None and iofd.gpa_offset == 0x8 and iofd.size == 4
    vectors = client.enable_irqs(IrqIndex.MSIX, 2)
    assert read32(client, 0, REG_RINGS) == 0

    iofd.emulate_post_write(1)  # odd value: vector 1
    assert efd_wait(vectors[1]) == 1
    assert efd_count(vectors[0]) == 0
    assert read32(client, 0, REG_RINGS) == 1

    iofd.emulate_post_write(6)  # even value: vector 0 -- the device read what we stored
    assert efd_wait(vectors[0]) == 1
    assert efd_count(vectors[1]) == 0
    assert read32(client, 0, REG_RINGS) == 2

    ticker_ring(client, 3)  # the trapped path still works alongside
    assert efd_count(vectors[1]) == 1 and read32(client, 0, REG_RINGS) == 3


# -- interrupts ----------------------------------------------------------------------------


def test_irq_info(client):
    expect = {
        IrqIndex.INTX: (IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED, 1),
        IrqIndex.MSI: (IRQ_INFO_EVENTFD, 0),
        IrqIndex.MSIX: (IRQ_INFO_EVENTFD, 2),
        IrqIndex.ERR: (IRQ_INFO_EVENTFD, 1),
        IrqIndex.REQ: (IRQ_INFO_EVENTFD, 1),
    }
    for index, (flags, count) in expect.items():
        info = client.irq_info(index)
        assert (info.index, info.flags, info.count, info.argsz) == (index, flags, count, 16)
    assert_error(exchange(client, Command.DEVICE_GET_IRQ_INFO, m.IrqInfo.build({"argsz": 16, "flags": 0, "index": 5, "count": 0})), errno.EINVAL)
    assert_error(exchange(client, Command.DEVICE_GET_IRQ_INFO, m.IrqInfo.build({"argsz": 8, "flags": 0, "index": 0, "count": 0})), errno.EINVAL)


def test_msix_vectors_fire(client):
    v = client.enable_irqs(IrqIndex.MSIX, 2)
    intx = client.enable_irqs(IrqIndex.INTX, 1)[0]
    ticker_ring(client, 0)
    assert efd_wait(v[0], 5) == 1
    assert efd_count(v[1]) == 0 and efd_count(intx) == 0  # MSI-X wins over INTx
    ticker_ring(client, 1)
    ticker_ring(client, 1)
    assert efd_wait(v[1], 5) == 2  # MSI-X is not auto-masked
    assert efd_count(v[0]) == 0


def test_intx_auto_mask_and_unmask(client):
    efd = client.enable_irqs(IrqIndex.INTX, 1)[0]
    ticker_ring(client, 0)
    ticker_ring(client, 0)  # the line is auto-masked after the first
    assert efd_wait(efd, 5) == 1
    ticker_ring(client, 1)
    assert efd_count(efd) == 0  # still masked
    client.unmask_intx()
    ticker_ring(client, 0)
    assert efd_wait(efd, 5) == 1
    ticker_ring(client, 0)
    assert efd_count(efd) == 0
    assert read32(client, 0, REG_RINGS) == 5  # the device saw every doorbell


def test_intx_resample_eventfd_unmasks(server, client):
    """KVM irqfd bypass, as QEMU sets it up: MASK, UNMASK+resamplefd, UNMASK. The guest's EOI
    then reaches the server only through the resample eventfd, never as an UNMASK message."""
    efd = client.enable_irqs(IrqIndex.INTX, 1)[0]
    resample = new_eventfd()
    try:
        client.set_irqs(IrqIndex.INTX, IRQ_DATA_NONE | IRQ_ACTION_MASK, 0, 1)
        client.set_irqs(IrqIndex.INTX, IRQ_DATA_EVENTFD | IRQ_ACTION_UNMASK, 0, 1, [resample])
        client.unmask_intx()
        ticker_ring(client, 0)
        ticker_ring(client, 0)
        assert efd_wait(efd, 5) == 1  # auto-masked after the first
        for _ in range(3):
            os.eventfd_write(resample, 1)  # what KVM does on the guest's EOI
            deadline = time.monotonic() + DEADLINE
            while select.select([resample], [], [], 0)[0]:  # until the server has consumed it
                assert time.monotonic() < deadline, "the server never read the resample eventfd"
                time.sleep(0.001)
            ticker_ring(client, 0)
            assert efd_wait(efd, 5) == 1
            ticker_ring(client, 0)
            assert efd_count(efd) == 0
    finally:
        os.close(resample)


def test_intx_deassign_with_eventfd_flag_and_no_fds(client):
    efd = client.enable_irqs(IrqIndex.INTX, 1)[0]
    client.set_irqs(IrqIndex.INTX, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, 0, 1)  # no fd: de-assign
    ticker_ring(client, 0)
    assert efd_count(efd) == 0
    again = client.enable_irqs(IrqIndex.INTX, 1)[0]
    ticker_ring(client, 0)
    assert efd_wait(again, 5) == 1 and efd_count(efd) == 0


def test_count_zero_disables_index(client):
    msix = client.enable_irqs(IrqIndex.MSIX, 2)
    intx = client.enable_irqs(IrqIndex.INTX, 1)[0]
    client.disable_irqs(IrqIndex.MSIX)  # DATA_NONE|TRIGGER count 0
    ticker_ring(client, 0)
    assert efd_count(msix[0]) == 0
    assert efd_wait(intx, 5) == 1  # the device fell back to INTx
    client.disable_irqs(IrqIndex.INTX)
    client.unmask_intx()
    ticker_ring(client, 0)
    assert efd_count(intx) == 0 and efd_count(msix[0]) == 0


def test_eventfd_replaced_per_vector(client):
    old = client.enable_irqs(IrqIndex.MSIX, 2)
    new1 = client.enable_irqs(IrqIndex.MSIX, 1, start=1)[0]  # only vector 1 changes
    ticker_ring(client, 1)
    assert efd_wait(new1, 5) == 1 and efd_count(old[1]) == 0
    ticker_ring(client, 0)
    assert efd_wait(old[0], 5) == 1


def test_msix_mask_unmask_and_loopback_trigger(client):
    v = client.enable_irqs(IrqIndex.MSIX, 2)
    client.set_irqs(IrqIndex.MSIX, IRQ_DATA_NONE | IRQ_ACTION_MASK, 0, 1)
    ticker_ring(client, 0)
    assert efd_count(v[0]) == 0
    client.set_irqs(IrqIndex.MSIX, IRQ_DATA_BOOL | IRQ_ACTION_UNMASK, 0, 2, data=b"\x01\x00")
    ticker_ring(client, 0)
    assert efd_wait(v[0], 5) == 1
    client.set_irqs(IrqIndex.MSIX, IRQ_DATA_BOOL | IRQ_ACTION_TRIGGER, 0, 2, data=b"\x00\x01")
    assert efd_wait(v[1], 5) == 1 and efd_count(v[0]) == 0
    client.set_irqs(IrqIndex.MSIX, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, 0, 1)
    assert efd_wait(v[0], 5) == 1


def test_err_eventfd_accepted(client):
    err = client.enable_irqs(IrqIndex.ERR, 1)[0]
    client.set_irqs(IrqIndex.ERR, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, 0, 1)  # loopback
    assert efd_wait(err, 5) == 1


# -- region access -------------------------------------------------------------------------


def test_region_read_write_bar0_and_config(client):
    assert read32(client, 0, REG_ID) == TICKER_ID
    reply = exchange(client, Command.REGION_WRITE, m.REGION_ACCESS.pack(REG_SCRATCH, 0, 4) + (0xCAFE).to_bytes(4, "little"))
    assert reply.payload == m.REGION_ACCESS.pack(REG_SCRATCH, 0, 4)  # the write reply echoes the prefix
    reply = exchange(client, Command.REGION_READ, m.REGION_ACCESS.pack(REG_SCRATCH, 0, 4))
    assert reply.payload == m.REGION_ACCESS.pack(REG_SCRATCH, 0, 4) + (0xCAFE).to_bytes(4, "little")
    write32(client, 0, REG_SCRATCH, 0xBEEF, posted=True)
    assert read32(client, 0, REG_SCRATCH) == 0xBEEF
    write32(client, 0, REG_ID, 0)  # read-only register: ignored
    assert read32(client, 0, REG_ID) == TICKER_ID

    cfg = client.region_read(CONFIG, 0, 4096)
    assert len(cfg) == 4096 and cfg[0:4] == bytes.fromhex("584e0100")
    client.region_write(CONFIG, 0x3C, b"\x0b")
    assert client.region_read(CONFIG, 0x3C, 2) == b"\x0b\x01"  # line written, pin read-only
    assert client.region_read(2, 0x800, 8) == bytes(8)  # PBA


def test_bar1_mmap_shared_with_server(client):
    info = client.region_info(1)
    [mm] = client.mmap_region(info).values()
    mm[100:108] = b"fromcli!"
    assert client.region_read(1, 100, 8) == b"fromcli!"
    client.region_write(1, 2000, b"fromsrv!")
    assert mm[2000:2008] == b"fromsrv!"
    client.region_write(1, 4088, b"12345678", posted=True)
    assert client.region_read(1, 4088, 8) == b"12345678"  # a read after a posted write sees it
    assert mm[4088:4096] == b"12345678"


def test_posted_writes_ordered_with_reads(client):
    for i in range(500):
        write32(client, 0, REG_SCRATCH, i, posted=True)
    assert read32(client, 0, REG_SCRATCH) == 499


def test_posted_writes_interleavings(client):
    info = client.region_info(1)
    [mm] = client.mmap_region(info).values()
    rng = random.Random(1234)
    scratch = 0
    bar1 = bytearray(4096)
    for step in range(600):
        op = rng.randrange(6)
        if op == 0:
            scratch = rng.getrandbits(32)
            write32(client, 0, REG_SCRATCH, scratch, posted=True)
        elif op == 1:
            scratch = rng.getrandbits(32)
            write32(client, 0, REG_SCRATCH, scratch)
        elif op == 2:
            off, data = rng.randrange(0, 4096 - 8), rng.randbytes(rng.choice([1, 2, 4, 8]))
            bar1[off : off + len(data)] = data
            client.region_write(1, off, data, posted=rng.random() < 0.8)
        elif op == 3:
            writes = []
            for _ in range(rng.randrange(1, 20)):
                if rng.random() < 0.5:
                    scratch = rng.getrandbits(32)
                    writes.append((0, REG_SCRATCH, scratch.to_bytes(4, "little")))
                else:
                    off, data = rng.randrange(0, 4096 - 8), rng.randbytes(rng.randrange(1, 9))
                    bar1[off : off + len(data)] = data
                    writes.append((1, off, data))
            client.write_multi(writes)
        elif op == 4:
            assert read32(client, 0, REG_SCRATCH) == scratch, step
        else:
            off = rng.randrange(0, 4096 - 64)
            assert client.region_read(1, off, 64) == bytes(bar1[off : off + 64]), step
    assert read32(client, 0, REG_SCRATCH) == scratch
    assert bytes(mm[:]) == bytes(bar1)


def test_write_multi_applied_in_order(client):
    client.write_multi(
        [
            (0, REG_SCRATCH, b"\x01\0\0\0"),
            (1, 0, b"aaaa"),
            (0, REG_SCRATCH, b"\x02\0\0\0"),
            (1, 2, b"bb"),
            (CONFIG, 0x3C, b"\x07"),
            (0, REG_SCRATCH, b"\x03\0\0\0"),
        ]
    )
    assert read32(client, 0, REG_SCRATCH) == 3
    assert client.region_read(1, 0, 4) == b"aabb"
    assert client.region_read(CONFIG, 0x3C, 1) == b"\x07"


def test_write_multi_not_posted_gets_wr_cnt_reply(client):
    payload = m.WriteMulti.build(
        {
            "wr_cnt": 2,
            "entries": [
                {"offset": REG_SCRATCH, "region": 0, "count": 4, "data": b"\x05\0\0\0\0\0\0\0"},
                {"offset": REG_SCRATCH, "region": 0, "count": 1, "data": b"\x09" + bytes(7)},
            ],
        }
    )
    reply = exchange(client, Command.REGION_WRITE_MULTI, payload)
    assert not reply.is_error and reply.payload == (2).to_bytes(8, "little")
    # a 1-byte write to SCRATCH is ignored by the device, so the 4-byte one stands
    assert read32(client, 0, REG_SCRATCH) == 5


def test_write_multi_max_entries(client):
    client.write_multi([(0, REG_SCRATCH, i.to_bytes(4, "little")) for i in range(200)])
    assert read32(client, 0, REG_SCRATCH) == 199


# -- DMA through the device: fd-backed memory and DMA_READ/DMA_WRITE messages ---------------


def _device_copy(client, src, dst, length, done_fd):
    """Program the Ticker's DMA engine; serve DMA requests until its completion interrupt."""
    served = 0
    write32(client, 0, REG_SCRATCH, length)  # DMA_LEN lives in SCRATCH
    client.region_write(0, REG_DMA_SRC, src.to_bytes(8, "little"))
    client.region_write(0, REG_DMA_DST, dst.to_bytes(8, "little"))  # starts the copy
    deadline = time.monotonic() + DEADLINE
    while True:
        served += client.poll(0.05)
        if select.select([done_fd], [], [], 0)[0]:
            assert efd_count(done_fd) == 1
            return served
        assert time.monotonic() < deadline, "the device never finished its DMA"


def test_dma_through_messages(client, ram):
    """Guest RAM mapped WITHOUT fd: the server must DMA_READ and DMA_WRITE through the client."""
    done = client.enable_irqs(IrqIndex.MSIX, 2)[1]
    client.dma_map(0x10000, 0x10000, ram, ram_offset=0x10000, with_fd=False)
    pattern = os.urandom(5000)
    ram.view[0x10000 : 0x10000 + len(pattern)] = pattern
    served = _device_copy(client, 0x10000, 0x18000, len(pattern), done)
    assert served >= 2  # at least one DMA_READ and one DMA_WRITE
    assert bytes(ram.view[0x18000 : 0x18000 + len(pattern)]) == pattern


def test_dma_messages_split_at_client_max_data_xfer(server, ram):
    caps = dict(__import__("vfio_user.vmm.client", fromlist=["QEMU_CAPABILITIES"]).QEMU_CAPABILITIES, max_data_xfer_size=4096)
    c = server.connect(negotiate=False)
    try:
        c.negotiate(caps)
        done = c.enable_irqs(IrqIndex.MSIX, 2)[1]
        c.dma_map(0x40000, 0x20000, ram, ram_offset=0x40000, with_fd=False)
        pattern = os.urandom(3 * 4096 + 100)
        ram.view[0x40000 : 0x40000 + len(pattern)] = pattern
        served = _device_copy(c, 0x40000, 0x50000, len(pattern), done)
        assert served == 8  # 4 DMA_READs + 4 DMA_WRITEs of <= 4096 bytes
        assert bytes(ram.view[0x50000 : 0x50000 + len(pattern)]) == pattern
    finally:
        c.close()


@pytest.mark.parametrize("src_fd,dst_fd", [(True, True), (True, False), (False, True)], ids=["fd-fd", "fd-msg", "msg-fd"])
def test_dma_mixed_paths(client, ram, src_fd, dst_fd):
    done = client.enable_irqs(IrqIndex.MSIX, 2)[1]
    client.dma_map(0x100000, 0x10000, ram, ram_offset=0x10000, with_fd=src_fd)
    client.dma_map(0x200000, 0x10000, ram, ram_offset=0x20000, with_fd=dst_fd)
    pattern = os.urandom(0x3000)
    ram.view[0x10000 : 0x13000] = pattern  # written by the client, read by the server via its mmap
    served = _device_copy(client, 0x100000, 0x200000 + 0x800, len(pattern), done)
    assert served == (0 if src_fd else 1) + (0 if dst_fd else 1)
    assert bytes(ram.view[0x20800 : 0x23800]) == pattern  # written by the server, read here


def test_dma_to_unmapped_address_raises_no_interrupt(client, ram):
    done = client.enable_irqs(IrqIndex.MSIX, 2)[1]
    client.dma_map(0x100000, 0x10000, ram)
    write32(client, 0, REG_SCRATCH, 16)
    client.region_write(0, REG_DMA_SRC, (0x100000).to_bytes(8, "little"))
    client.region_write(0, REG_DMA_DST, (0x900000).to_bytes(8, "little"))
    # the copy task is started by the write; a later request is served after it ran
    assert read32(client, 0, REG_SCRATCH) == 16
    client.poll(0.05)
    assert efd_count(done) == 0


# -- reset and unsupported commands ----------------------------------------------------------


def test_device_reset(client, ram):
    client.dma_map(0x100000, PAGE, ram)
    client.region_write(CONFIG, 0x4, (0x6).to_bytes(2, "little"))
    assert client.region_read(CONFIG, 0x4, 2) == b"\x06\x00"
    write32(client, 0, REG_SCRATCH, 77)
    ticker_ring(client, 0)
    assert read32(client, 0, REG_RINGS) == 1
    client.reset()
    assert read32(client, 0, REG_RINGS) == 0
    assert client.region_read(CONFIG, 0x4, 2) == b"\x00\x00"
    assert read32(client, 0, REG_SCRATCH) == 77
    client.dma_unmap(0x100000, PAGE)  # DMA maps survive a device reset
    assert_error(exchange(client, Command.DEVICE_RESET, b"\0"), errno.EINVAL)


def test_flr_through_pcie_capability(client):
    cfg = client.region_read(CONFIG, 0, 256)
    ptr = cfg[0x34]
    exp = None
    while ptr:
        if cfg[ptr] == 0x10:
            exp = ptr
        ptr = cfg[ptr + 1]
    assert exp is not None
    ticker_ring(client, 0)
    client.region_write(CONFIG, 0x4, b"\x06\x00")
    client.region_write(CONFIG, exp + 0x8, (1 << 15).to_bytes(2, "little"))
    assert read32(client, 0, REG_RINGS) == 0
    assert client.region_read(CONFIG, 0x4, 2) == b"\x00\x00"


@pytest.mark.parametrize(
    "command,err",
    [
        (Command.DIRTY_PAGES, errno.ENOTSUP),
        (Command.DEVICE_FEATURE, errno.ENOTSUP),
        (Command.MIG_DATA_READ, errno.ENOTSUP),
        (Command.MIG_DATA_WRITE, errno.ENOTSUP),
        (Command.DMA_READ, errno.ENOTSUP),
        (Command.DMA_WRITE, errno.ENOTSUP),
        (99, errno.ENOSYS),
        (0, errno.ENOSYS),
    ],
)
def test_unsupported_commands(client, command, err):
    assert_error(exchange(client, command, bytes(16)), err)
    assert read32(client, 0, REG_ID) == TICKER_ID


def test_pipelined_requests_with_a_slow_reader(client):
    """Thousands of requests sent before reading any reply: the server's socket buffer fills,
    it queues the rest, and every reply still arrives complete and in order."""
    n = 3000
    ids = []
    out = bytearray()
    for i in range(n):
        msg_id, data = client.conn.request(Command.REGION_READ, m.REGION_ACCESS.pack(0, CONFIG, 4096))
        ids.append(msg_id)
        out += data
        if i % 7 == 0:  # a posted write in between: never answered, always applied in order
            out += client.conn.request(Command.REGION_WRITE, m.REGION_ACCESS.pack(REG_SCRATCH, 0, 4) + i.to_bytes(4, "little"), no_reply=True)[1]
    client.sock.sendall(out)  # ~100 KiB of requests, ~12 MiB of replies
    cfg = None
    for msg_id in ids:
        reply = client.wait_reply(msg_id)
        assert not reply.is_error and len(reply.payload) == 16 + 4096
        cfg = cfg or reply.payload
        assert reply.payload == cfg
    assert client._events == []
    assert read32(client, 0, REG_SCRATCH) == (n - 1) // 7 * 7
