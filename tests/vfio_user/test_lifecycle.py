"""Client lifecycle: disconnect and reconnect keep device state but drop the client's DMA maps
and eventfds; a second concurrent client is refused; no fd or mapping leaks over many cycles.

The tests on a server process run on both backends (``backend`` below)."""

from __future__ import annotations

import errno
import os
import time

import pytest

from vfio_user.vmm.client import GuestRam, VfioUserClient, VfioUserClientError
from vfio_user.constants import IrqIndex
from vfio_user.sample import REG_ID, REG_RINGS, REG_SCRATCH, TICKER_ID, Ticker

from ..support.fds import efd_count, efd_wait
from ..support.inproc import InProcessServer
from ..libvfio.libvfio_helpers import BACKENDS, skip_unless_available
from ..support.server import DEADLINE
from .vu_helpers import read32, ticker_ring, write32


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    skip_unless_available(request.param)
    return request.param


def test_reconnect_keeps_device_state_and_drops_client_resources(fresh_server):
    srv = fresh_server
    ram = GuestRam(1 << 20)
    try:
        first = srv.connect()
        first.dma_map(0x100000, 0x10000, ram)
        msix = first.enable_irqs(IrqIndex.MSIX, 2)
        write32(first, 0, REG_SCRATCH, 0xDEAD)
        first.region_write(1, 0, b"bar1 survives")
        ticker_ring(first, 1)
        assert efd_wait(msix[1], 5) == 1
        kept = os.dup(msix[1])  # outlives the client's own copy
        with_client = srv.fd_count()
        first.close()
        assert srv.wait_fds() == srv.baseline_fds < with_client

        second = srv.connect()
        try:
            assert read32(second, 0, REG_SCRATCH) == 0xDEAD  # device state survived
            assert second.region_read(1, 0, 13) == b"bar1 survives"
            assert read32(second, 0, REG_RINGS) == 1
            ticker_ring(second, 1)  # no eventfds wired for this client: nothing may fire
            assert efd_count(kept) == 0
            with pytest.raises(VfioUserClientError) as e:
                second.dma_unmap(0x100000, 0x10000)  # the old mapping is gone
            assert e.value.errno == errno.ENOENT
            second.dma_map(0x100000, 0x10000, ram)  # and the range is free again
            v = second.enable_irqs(IrqIndex.MSIX, 2)
            ticker_ring(second, 1)
            assert efd_wait(v[1], 5) == 1 and efd_count(kept) == 0
        finally:
            second.close()
            os.close(kept)
    finally:
        ram.close()


def test_immediate_reconnect_is_accepted(fresh_server):
    """QEMU-like: the old client hangs up and a new one connects at once, without waiting."""
    for i in range(30):
        c = fresh_server.connect()
        try:
            write32(c, 0, REG_SCRATCH, i)
        finally:
            c.close()
    last = fresh_server.connect()
    try:
        assert read32(last, 0, REG_SCRATCH) == 29
    finally:
        last.close()


def test_second_concurrent_client_is_refused(fresh_server):
    first = fresh_server.connect()
    try:
        write32(first, 0, REG_SCRATCH, 1)
        # ours accepts and closes it at once; libvfio-user leaves it in the listen backlog
        intruder = VfioUserClient(fresh_server.path, timeout=2.0)
        try:
            with pytest.raises((ConnectionError, OSError)):
                intruder.negotiate()
        finally:
            intruder.close()
        assert read32(first, 0, REG_SCRATCH) == 1  # the first client keeps working
        write32(first, 0, REG_SCRATCH, 2)
        assert read32(first, 0, REG_ID) == TICKER_ID
    finally:
        first.close()
    later = fresh_server.connect()  # and once it is gone, the next one is served
    try:
        assert read32(later, 0, REG_SCRATCH) == 2
    finally:
        later.close()


def test_client_dying_with_dma_in_flight(fresh_server):
    """The device waits on a DMA_READ reply when the client disappears: nothing leaks."""
    ram = GuestRam(1 << 20)
    try:
        c = fresh_server.connect()
        c.dma_map(0x10000, 0x10000, ram, with_fd=False)
        write32(c, 0, REG_SCRATCH, 64)
        c.region_write(0, 0x10, (0x10000).to_bytes(8, "little"))
        c.region_write(0, 0x18, (0x18000).to_bytes(8, "little"))  # DMA_READ now on its way to us
        c.close()  # never answered
        again = fresh_server.connect()
        try:
            assert read32(again, 0, REG_SCRATCH) == 64
        finally:
            again.close()
    finally:
        ram.close()


# -- in-process leak check ---------------------------------------------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_leaks_over_connect_map_irq_disconnect_cycles(tmp_path):
    sessions: list = []
    srv = InProcessServer(Ticker(), str(tmp_path / "inproc.sock"), on_disconnect=lambda client, reason: sessions.append(client.session))
    try:
        # one warm-up cycle: the loop allocates some fds lazily on first use
        VfioUserClient(srv.server.path).close()
        deadline = time.monotonic() + DEADLINE
        while len(sessions) < 1:
            assert time.monotonic() < deadline
            srv.call(lambda: None)
        baseline = _fd_count()
        with GuestRam(1 << 20) as ram:
            for i in range(20):
                with VfioUserClient(srv.server.path, timeout=DEADLINE) as c:
                    c.negotiate()
                    c.dma_map(0x100000, 0x10000, ram)
                    c.dma_map(0x200000, 0x10000, ram, ram_offset=0x10000)
                    c.dma_map(0xFFFC0000, 0x40000, ram, with_fd=False)
                    v = c.enable_irqs(IrqIndex.MSIX, 2)
                    c.enable_irqs(IrqIndex.INTX, 1)
                    c.enable_irqs(IrqIndex.ERR, 1)
                    [iofd] = c.region_io_fds(0)
                    [mm] = c.mmap_region(c.region_info(1)).values()
                    mm[0:4] = i.to_bytes(4, "little")
                    ticker_ring(c, 1)
                    assert efd_wait(v[1], 5) == 1
                    write32(c, 0, REG_SCRATCH, i)
                # wait until the server has seen this client go
                deadline = time.monotonic() + DEADLINE
                while len(sessions) < i + 2:
                    assert time.monotonic() < deadline, "the server never noticed the disconnect"
                    srv.call(lambda: None)
        assert len(sessions) == 21
        for session in sessions:
            assert len(session.dma) == 0 and session.dma.open_count() == 0
            assert all(fd is None for fds in session.irqs.efds.values() for fd in fds)
        assert srv.call(lambda: srv.server.clients_served) == 21
        assert _fd_count() == baseline, "\n".join(
            f"{n} -> {os.readlink('/proc/self/fd/' + n)}" for n in os.listdir("/proc/self/fd") if os.path.exists("/proc/self/fd/" + n)
        )
        assert srv.device.regs[REG_SCRATCH] == 19
    finally:
        srv.close()
