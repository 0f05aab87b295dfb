"""The NVMe function on both backends: the host driver enables it and moves data.

The device is the same object either way (nvme_emu.function.NvmeFunction); only the
vfio-user server underneath changes. Doorbells go by trapped REGION_WRITEs, then by shadow
ioeventfds (KVM POST_WRITE emulated by the client) where the backend offers them.
"""

from __future__ import annotations

import os

import pytest

from nvme_emu.testing.host import HostMemory, NvmeHost, ShadowIoEventFdDoorbells
from nvme_emu.spec.registers import Reg
from vfio_user.vmm.client import GuestRam
from vfio_user.constants import IrqIndex

from ..support.server import ServerProcess
from .libvfio_helpers import BACKENDS, skip_unless_available

IOVA = 0x1000_0000
RAM = 16 << 20
LBA = 512


@pytest.fixture
def host(nvme_server):
    client = nvme_server.connect()
    ram = GuestRam(RAM)
    client.dma_map(IOVA, RAM, ram)
    efds = client.enable_irqs(IrqIndex.MSIX, 4)
    h = NvmeHost(client, HostMemory(ram.view, IOVA))  # polls the CQ; the eventfds are checked here
    h.client, h.ram, h.efds, h.backend = client, ram, efds, nvme_server.backend
    try:
        yield h
    finally:
        client.close()
        ram.close()


def _io_round_trip(h: NvmeHost, qid: int, blocks: int = 64) -> None:
    buf = h.mem.alloc(blocks * LBA)
    data = os.urandom(blocks * LBA)
    for start in range(0, blocks, 8):  # 4 KiB commands, distinct LBAs
        h.mem.write(buf, data[start * LBA : (start + 8) * LBA])
        assert h.write(qid, 1, 100 + start, 8, buf, 8 * LBA).status == 0
    for start in range(0, blocks, 8):
        h.mem.write(buf, bytes(8 * LBA))
        assert h.read(qid, 1, 100 + start, 8, buf, 8 * LBA).status == 0
        assert h.mem.read(buf, 8 * LBA) == data[start * LBA : (start + 8) * LBA]


def test_enable_identify_and_io_with_trapped_doorbells(host):
    host.enable()
    ident = host.identify_controller()
    assert ident[4:24].decode().strip() == "LIBVFIO0001"  # serial number
    assert ident[24:64].decode().strip() == "nvme-emu-test"
    host.create_io_queue_pair(1, 32, vector=1)
    assert _ready(host.efds[0], 1.0)  # admin completions: MSI-X vector 0
    assert not _ready(host.efds[1])
    _io_round_trip(host, 1)
    assert _ready(host.efds[1], 1.0)  # I/O completions on queue 1: vector 1
    # a 128 KiB transfer through a PRP list
    buf = host.mem.alloc(128 << 10)
    payload = os.urandom(128 << 10)
    host.mem.write(buf, payload)
    assert host.write(1, 1, 4096, 256, buf, 128 << 10).status == 0
    host.mem.write(buf, bytes(128 << 10))
    assert host.read(1, 1, 4096, 256, buf, 128 << 10).status == 0
    assert host.mem.read(buf, 128 << 10) == payload
    host.delete_io_queue_pair(1)
    assert host.shutdown() == 2  # CSTS.SHST complete


def test_io_with_shadow_ioeventfd_doorbells(host):
    iofds = host.client.region_io_fds(0)
    if not iofds:
        pytest.skip("no shadow ioeventfds offered (libvfio-user built without -Dshadow-ioeventfd=true)")
    assert all(f.shadow is not None and f.size == 4 for f in iofds)
    assert {f.gpa_offset for f in iofds} >= {Reg.DOORBELLS + 4 * s for s in range(4)}
    host.doorbells = ShadowIoEventFdDoorbells(host.client, iofds)
    host.enable()
    host.identify_controller()
    host.create_io_queue_pair(1, 32, vector=1)
    _io_round_trip(host, 1)


def test_reconnect_keeps_namespace_data(nvme_server):
    payload = os.urandom(4096)
    for attempt in range(2):
        client = nvme_server.connect()
        with GuestRam(RAM) as ram:
            client.dma_map(IOVA, RAM, ram)
            h = NvmeHost(client, HostMemory(ram.view, IOVA))
            h.enable()
            h.create_io_queue_pair(1, 8)
            buf = h.mem.alloc(4096)
            if attempt == 0:
                h.mem.write(buf, payload)
                assert h.write(1, 1, 8, 8, buf, 4096).status == 0
            else:
                assert h.read(1, 1, 8, 8, buf, 4096).status == 0
                assert h.mem.read(buf, 4096) == payload
            client.close()
    assert nvme_server.wait_fds() == nvme_server.baseline_fds


def test_unmap_while_queues_live_then_controller_reset(host):
    """QEMU unmaps RAM only at teardown; the device must drop its views and survive."""
    host.enable()
    host.create_io_queue_pair(1, 8)
    _io_round_trip(host, 1, blocks=8)
    host.client.dma_unmap(IOVA, RAM)
    host.client.dma_map(IOVA, RAM, host.ram)
    host.enable()  # CC.EN 0 -> 1: a controller reset, queues made again
    host.create_io_queue_pair(1, 8)
    _io_round_trip(host, 1, blocks=8)


def _ready(fd: int, timeout: float = 0.0) -> bool:
    import select

    return bool(select.select([fd], [], [], timeout)[0])



#: Windows' NVMe driver masks BAR0's address with 0xFFFFC000: the BAR must span 16 KiB or more.
WINDOWS_BAR0_MIN = 0x4000


@pytest.fixture(params=[(b, d) for b in BACKENDS for d in ("auto", "poll")], ids=lambda p: f"{p[0]}-{p[1]}")
def nvme_server_by_doorbell(request, tmp_path):
    """The NVMe function on each backend with the auto and the poll (mmapped page) doorbells."""
    backend, doorbell = request.param
    skip_unless_available(backend)
    srv = ServerProcess.device(backend, "nvme", str(tmp_path / "nvme.sock"), tmp_path / "server.log", "--doorbell", doorbell)
    srv.doorbell = doorbell
    try:
        yield srv
        assert srv.alive(), srv.log()[-3000:]
    finally:
        srv.kill()


def test_bar0_is_16k_with_doorbells_in_place(nvme_server_by_doorbell):
    """GET_REGION_INFO and the config space's BAR sizing over the socket; the doorbell page's
    mmap area and ioeventfds stay where the doorbells are, and I/O still works."""
    srv = nvme_server_by_doorbell
    client = srv.connect()
    try:
        bar0 = client.region_info(0)
        assert bar0.size >= WINDOWS_BAR0_MIN and bar0.size & (bar0.size - 1) == 0, bar0
        # BAR sizing as firmware does it: all ones, then the size mask reads back
        client.region_write(7, 0x10, b"\xff\xff\xff\xff")
        client.region_write(7, 0x14, b"\xff\xff\xff\xff")
        low, high = (int.from_bytes(client.region_read(7, off, 4), "little") for off in (0x10, 0x14))
        size = (~((high << 32 | low) & ~0xF) + 1) & 0xFFFF_FFFF_FFFF_FFFF
        assert size == bar0.size, (hex(low), hex(high), bar0)
        if srv.doorbell == "poll":
            assert bar0.areas == [(Reg.DOORBELLS, 4096)], bar0.areas
        for efd in client.region_io_fds(0):
            assert Reg.DOORBELLS <= efd.gpa_offset < Reg.DOORBELLS + 4096, efd
        with GuestRam(RAM) as ram:
            client.dma_map(IOVA, RAM, ram)
            h = NvmeHost(client, HostMemory(ram.view, IOVA))
            h.enable()
            h.create_io_queue_pair(1, 8)
            _io_round_trip(h, 1, blocks=16)
            assert h.shutdown() == 2
    finally:
        client.close()
