"""Memory shared by fd must not be able to kill the server (issue 22, an outside fuzz).

A client can ``ftruncate`` any memfd it holds. For the memfds the server hands out (the
doorbell shadow page of GET_REGION_IO_FDS, the doorbell page of a ``--doorbell poll`` region)
the server's next store into them would SIGBUS it, so they are sealed before they leave. For
guest RAM (DMA_MAP) the client owns the memfd: the server wants it sealed against shrinking,
and for what cannot be sealed (an opt-out, a sparse file on a full tmpfs) a fault in a data
copy fails that command with Data Transfer Error instead of the process.

Servers are separate processes, on both vfio-user backends (``spawn``).
"""

from __future__ import annotations

import errno
import mmap
import os
import struct

import pytest

from ..support.host import PAGE, Host, status_name
from nvme_emu.spec.commands import AdminOpcode, NvmOpcode, Status
from nvme_emu.spec.registers import Reg
from vfio_user import messages as m
from vfio_user.constants import DMA_FLAG_READ, DMA_FLAG_WRITE, REGION_FLAG_MMAP, Command
from vfio_user.memfd import sealed_memfd
from vfio_user.vmm.client import VfioUserClientError

BAR0 = 0
SQ0_TAIL = Reg.DOORBELLS  # BAR0 + 0x1000


def _handed_out_memfd(h: Host, doorbell: str) -> int:
    """The memfd the server shares for its doorbell page: shadow (auto) or region (poll)."""
    if doorbell == "poll":
        info = h.client.region_info(BAR0)
        assert info.flags & REGION_FLAG_MMAP and info.fd is not None, info
        return info.fd
    iofds = h.client.region_io_fds(BAR0)
    shadows = {f.shadow_fd for f in iofds if f.shadow_fd is not None}
    assert shadows, iofds
    return shadows.pop()


@pytest.mark.parametrize("doorbell", ["auto", "poll"])
def test_truncating_a_handed_out_memfd_is_refused_and_the_doorbell_served(spawn, doorbell):
    srv = spawn(extra=["--doorbell", doorbell])
    h = Host(srv.path)
    try:
        assert h.identify(1)[0].status == 0
        fd = _handed_out_memfd(h, doorbell)
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, 0)
        assert e.value.errno == errno.EPERM
        assert os.fstat(fd).st_size > 0
        # A non-posted doorbell write of the tail the controller already has: the store into
        # the shared page that used to SIGBUS the server, answered here.
        h.client.region_write(BAR0, SQ0_TAIL, struct.pack("<I", h.host.queues[0].tail))
        c, data = h.identify(1)
        assert c.status == 0 and data[:2] != b"\xa5\xa5"
        assert srv.alive()
    finally:
        h.close()


# -- guest RAM: seals required by default; what can still fault fails the command ----------

#: Where the tests map their second piece of guest memory (beyond the Host's RAM).
IOVA2 = 0x4000_0000
EXTRA = 1 << 20
LBA = 512


def _unsealed_memfd(size: int = EXTRA) -> int:
    fd = os.memfd_create("guest-ram-unsealed", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _dma_map_fd(h: Host, iova: int, size: int, fd: int) -> None:
    payload = m.DmaMap.build({"argsz": 32, "flags": DMA_FLAG_READ | DMA_FLAG_WRITE, "offset": 0, "address": iova, "size": size})
    h.client.request(Command.DMA_MAP, payload, [fd])


def _read_into(h: Host, slba: int, buf: int, length: int = PAGE) -> int:
    """A Read of ``length`` bytes from LBA ``slba`` into guest memory at ``buf``: its status."""
    return h.wait_cid(1, h.rw(1, NvmOpcode.READ, 1, slba, length // LBA, buf, length)).status


def _io_host(srv) -> Host:
    h = Host(srv.path, ram_size=8 << 20)
    h.set_queues(1)
    h.create_pair(1, 16)
    return h


def test_unsealed_guest_memfd_is_refused_unless_opted_out(spawn):
    """DMA_MAP of a memfd the client could still shrink: EPERM and a log line saying why
    (QEMU seals its memory-backend-memfd by default); accepted with ``--dma-unsealed``. The
    Host's own RAM is sealed (vfio_user.memfd) and taken either way."""
    strict = spawn()
    h = Host(strict.path)
    fd = _unsealed_memfd()
    try:
        with pytest.raises(VfioUserClientError) as e:
            _dma_map_fd(h, IOVA2, EXTRA, fd)
        assert e.value.errno == errno.EPERM
        strict.wait_log("not sealed against shrinking")
        assert h.identify(1)[0].status == 0  # the connection goes on
    finally:
        h.close()
    lax = spawn(extra=["--dma-unsealed"])
    h = Host(lax.path)
    try:
        _dma_map_fd(h, IOVA2, EXTRA, fd)
        h.client.dma_unmap(IOVA2, EXTRA)
    finally:
        h.close()
        os.close(fd)


def _fault_then_recover(srv, h: Host, buf: int, *, sigbus: bool = True) -> None:
    """A Read into ``buf`` (memory that cannot be backed any more) fails with Data Transfer
    Error; the server lives; after a SIGBUS the mapping is refused from then on (a ``preadv``
    into it only gets EFAULT, nothing to withdraw); healthy memory still works; an unmap and a
    new map at the same place (sealed) work again."""
    pattern = bytes(range(256)) * (PAGE // 256)
    h.write_ok(1, 1, 0, pattern)
    status = _read_into(h, 0, buf)
    assert status == Status.DATA_TRANSFER_ERROR, status_name(status)
    assert srv.alive()
    status = _read_into(h, 0, IOVA2)  # the mapping's first page, still backed
    if sigbus:  # the mapping that faulted is withdrawn: even that page is refused now
        srv.wait_log("faulted (SIGBUS")
        assert status == Status.DATA_TRANSFER_ERROR, status_name(status)
    else:
        assert status == Status.SUCCESS, status_name(status)
    assert h.read_ok(1, 1, 0, PAGE // LBA) == pattern  # healthy memory: served
    h.client.dma_unmap(IOVA2, EXTRA)
    fresh = sealed_memfd("guest-ram-fresh", EXTRA)
    try:
        _dma_map_fd(h, IOVA2, EXTRA, fresh)
        assert _read_into(h, 0, IOVA2 + EXTRA // 2) == Status.SUCCESS
        with mmap.mmap(fresh, EXTRA) as mm:
            assert mm[EXTRA // 2 : EXTRA // 2 + PAGE] == pattern
    finally:
        os.close(fresh)
    assert "Traceback" not in srv.log()


@pytest.mark.parametrize("namespace", ["ram", "file"])
def test_guest_memfd_shrunk_after_dma_map_fails_the_read_not_the_server(spawn, tmp_path, namespace):
    """With ``--dma-unsealed`` the client truncates its memfd to one page after DMA_MAP and
    reads into the lost part: RAM namespace, a memcpy into the vanished page (SIGBUS,
    absorbed by vfio_user.dma_guard); file namespace, preadv into it (EFAULT)."""
    spec = "ram:size=16M" if namespace == "ram" else f"file:{tmp_path / 'ns.img'},size=16M"
    srv = spawn(spec, extra=["--dma-unsealed"])
    h = _io_host(srv)
    fd = _unsealed_memfd()
    try:
        _dma_map_fd(h, IOVA2, EXTRA, fd)
        os.ftruncate(fd, PAGE)
        _fault_then_recover(srv, h, IOVA2 + EXTRA // 2, sigbus=namespace == "ram")
    finally:
        h.close()
        os.close(fd)


def test_sparse_guest_file_on_a_full_tmpfs_fails_the_read_not_the_server(spawn, small_tmpfs):
    """Regular files are accepted as guest memory (QEMU's memory-backend-file; they cannot be
    sealed). A sparse one on a tmpfs that another file has filled: the server's store into a
    hole cannot be backed (SIGBUS), so that Read fails, not the process."""
    ram = small_tmpfs / "guest-ram"
    fd = os.open(ram, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, EXTRA)  # sparse: no page allocated yet
    filler = os.open(small_tmpfs / "filler", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        with pytest.raises(OSError) as e:
            while True:
                os.write(filler, bytes(PAGE))
    finally:
        os.close(filler)
    assert e.value.errno == errno.ENOSPC
    srv = spawn()
    h = _io_host(srv)
    try:
        _dma_map_fd(h, IOVA2, EXTRA, fd)
        _fault_then_recover(srv, h, IOVA2 + EXTRA // 2)
    finally:
        h.close()
        os.close(fd)


def test_identify_into_shrunk_guest_memory_fails_the_command(spawn):
    """The admin path too: an Identify whose buffer lies in the lost part of a shrunk memfd
    completes with Data Transfer Error (not success with the data gone to a scratch page), and
    the admin queue goes on."""
    srv = spawn(extra=["--dma-unsealed"])
    h = Host(srv.path)
    fd = _unsealed_memfd()
    try:
        _dma_map_fd(h, IOVA2, EXTRA, fd)
        os.ftruncate(fd, PAGE)
        c = h.admin(AdminOpcode.IDENTIFY, nsid=0, prp1=IOVA2 + EXTRA // 2, cdw10=1)
        assert c.status == Status.DATA_TRANSFER_ERROR, status_name(c.status)
        assert srv.alive()
        c, data = h.identify(1)
        assert c.status == Status.SUCCESS and data[:2] != b"\xa5\xa5"
    finally:
        h.close()
        os.close(fd)
