"""Hostile client over a live socket: the server is a separate process (RAM namespace).

After each attack the server must still be alive, hold exactly the fds it held before the
attacker connected (``/proc/<pid>/fd``), hold no mapping of the attacker's memory
(``/proc/<pid>/maps``), and serve the next client.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..libvfio.libvfio_helpers import BACKENDS, skip_unless_available
from ..support.host import Host, IOVA, PAGE, status_name
from ..support.server import DEADLINE
from nvme_emu.spec.commands import NvmOpcode, Status
from .test_protocol_fuzz import _make_fd, messages
from vfio_user import messages as m
from vfio_user.vmm.client import GuestRam, VfioUserClient, VfioUserClientError
from vfio_user.constants import FLAG_ERROR, HEADER_SIZE, Command, MsgType
from vfio_user.protocol import encode
from vfio_user.unix import recv_chunk
from vfio_user.unix import send_message as _send_message


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory):
    skip_unless_available(request.param)
    from ..support.server import ServerProcess

    d = tmp_path_factory.mktemp("hostile-client")
    srv = ServerProcess.serve(str(d / "s.sock"), d / "server.log", ["ram:size=16M"], backend=request.param, extra=["--queues", "8"])
    srv.settle()
    yield srv
    rc = srv.stop()
    assert rc == 0, srv.log()[-3000:]


def _raw(srv) -> socket.socket:
    srv.wait_idle()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(srv.path)
    s.settimeout(DEADLINE)
    return s


def send_message(s: socket.socket, data: bytes, fds: list[int]) -> None:
    """One sendmsg with the fds (as a client does), the rest of a long message after it."""
    n = _send_message(s, data, fds)
    if n < len(data):
        s.sendall(data[n:])


def _drain(s: socket.socket, seconds: float = 0.2) -> bytes:
    """What the server sent back within ``seconds`` (fds closed)."""
    out = b""
    s.settimeout(seconds)
    try:
        while True:
            data, fds = recv_chunk(s)
            for fd in fds:
                os.close(fd)
            if not data:
                break
            out += data
    except (TimeoutError, socket.timeout, BlockingIOError, ConnectionResetError):
        pass
    return out


def _clean(srv) -> None:
    """The attacker is gone: nothing of it remains in the server, and it serves again."""
    assert srv.alive(), srv.log()[-3000:]
    srv.wait_idle()
    n = srv.wait_fds()
    assert n == srv.baseline_fds, f"server holds {n} fds, baseline {srv.baseline_fds}:\n" + "\n".join(srv.fds())
    assert srv.guest_mappings() == 0
    assert srv.answers()


def _version_bytes(msg_id: int = 0) -> bytes:
    from .test_protocol_fuzz import _version

    return encode(msg_id, Command.VERSION, MsgType.REQUEST, _version())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(msgs=st.lists(messages(), min_size=1, max_size=30), negotiate=st.integers(0, 4).map(bool))
def test_random_streams_over_the_socket(server, msgs, negotiate):
    ram = GuestRam(1 << 20, "hostile")
    s = _raw(server)
    try:
        if negotiate:
            send_message(s, _version_bytes(), [])
        for data, nfds, kind in msgs:
            fds = [_make_fd(ram.fd, kind) for _ in range(nfds)]
            try:
                send_message(s, data, fds)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server dropped us on a bad header: allowed
            finally:
                for fd in fds:
                    os.close(fd)
        _drain(s, 0.05)
    finally:
        s.close()
        ram.close()
    _clean(server)


def test_fd_flood(server):
    """253 fds on one message, then many messages each carrying the maximum: all refused
    (more than max_msg_fds) or closed; none kept."""
    s = _raw(server)
    efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(253)]
    try:
        send_message(s, _version_bytes(), [])
        for i in range(50):
            send_message(
                s,
                encode(
                    100 + i,
                    Command.DEVICE_SET_IRQS,
                    MsgType.REQUEST,
                    m.SetIrqs.build({"argsz": 20, "flags": 0x24, "index": 2, "start": 0, "count": 253, "data": b""}),
                ),
                efds,
            )
        for i in range(50):  # fds on commands that take none
            send_message(s, encode(200 + i, Command.REGION_READ, MsgType.REQUEST, m.REGION_ACCESS.pack(0, 0, 4)), efds[:8])
        out = _drain(s, 1.0)
        # every request got an answer (an error for each SET_IRQS / fd-carrying read)
        n = 0
        pos = 0
        while pos + HEADER_SIZE <= len(out):
            _id, _cmd, size, flags, _err = m.HEADER.unpack_from(out, pos)
            n += 1
            pos += size
        assert n == 101
        assert server.fd_count() < server.baseline_fds + 20  # nothing accumulated while attached
    finally:
        s.close()
        for fd in efds:
            os.close(fd)
    _clean(server)


def test_huge_announced_sizes_are_not_buffered(server):
    """A header announcing 4 GiB, then 64 MiB of junk: the server discards, never buffers."""
    s = _raw(server)
    rss0 = server.rss_kb()
    try:
        send_message(s, _version_bytes(), [])
        send_message(s, struct.pack("<HHIII", 1, Command.REGION_WRITE, 0xFFFFFFFF, MsgType.REQUEST, 0), [])
        junk = b"\xa5" * (1 << 20)
        try:
            for _ in range(64):
                s.sendall(junk)
        except (BrokenPipeError, ConnectionResetError):
            # libvfio-user would take the body for headers: our glue answers E2BIG and drops
            assert server.backend == "libvfio-user"
        _drain(s, 0.2)
        assert server.rss_kb() - rss0 < 32 * 1024, "server buffered a message larger than its limit"
    finally:
        s.close()
    _clean(server)
    s = _raw(server)
    try:
        send_message(s, _version_bytes(), [])
        big = (1 << 20) + 64 + 1  # max_data_xfer + overhead + 1
        try:
            send_message(s, struct.pack("<HHIII", 5, Command.REGION_WRITE, big, MsgType.REQUEST, 0) + bytes(big - HEADER_SIZE), [])
            send_message(s, encode(6, Command.REGION_READ, MsgType.REQUEST, m.REGION_ACCESS.pack(0, 0, 8)), [])
        except (BrokenPipeError, ConnectionResetError):
            assert server.backend == "libvfio-user"  # E2BIG, then dropped (below)
        out = _drain(s, 0.5)
        replies = {}
        pos = 0
        while pos + HEADER_SIZE <= len(out):
            msg_id, _cmd, size, flags, err = m.HEADER.unpack_from(out, pos)
            replies[msg_id] = (flags, err, out[pos + HEADER_SIZE : pos + size])
            pos += size
        assert replies[5][0] & FLAG_ERROR and replies[5][1] == errno.E2BIG
        if server.backend == "libvfio-user":
            # the oversized body is not read (the library cannot skip it): E2BIG, then dropped
            assert 6 not in replies
            assert s.recv(1) == b""
        else:  # the Python backend skips the body and serves the next request
            assert not replies[6][0] & FLAG_ERROR and len(replies[6][2]) == 16 + 8
    finally:
        s.close()
    _clean(server)


def test_replies_nobody_asked_for_and_out_of_order(server):
    """Replies with random ids, error replies, replies carrying fds: dropped; requests still served."""
    c = VfioUserClient(server.path, timeout=DEADLINE)
    try:
        c.negotiate()
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            for i in range(200):
                flags = MsgType.REPLY | (FLAG_ERROR if i % 3 == 0 else 0)
                c.send_raw(
                    encode(i * 331 & 0xFFFF, Command.DMA_READ if i % 2 else Command.DMA_WRITE, flags, os.urandom(i % 40), error_no=i),
                    [efd] if i % 5 == 0 else [],
                )
        finally:
            os.close(efd)
        assert struct.unpack("<Q", c.region_read(0, 0, 8))[0] & 0xFFFF == 4095
    finally:
        c.close()
    _clean(server)


def test_overlapping_dma_maps_and_bad_unmaps(server):
    ram = GuestRam(4 << 20, "hostile")
    c = VfioUserClient(server.path, timeout=DEADLINE)
    try:
        c.negotiate()
        c.dma_map(0x100000, 1 << 20, ram)
        attempts = [
            (0x100000, 1 << 20, 0),  # identical
            (0x0FF000, 0x2000, 0),  # overlaps the start
            (0x1FF000, 0x2000, 0),  # overlaps the end
            (0x080000, 4 << 20, 0),  # covers it
            (0x140000, 0x1000, 0x1000),  # inside it
        ]
        for n, (iova, size, off) in enumerate(attempts):
            if n == 0 and server.backend == "libvfio-user":
                c.dma_map(iova, size, ram, ram_offset=off)  # the library takes an identical map as a no-op
                assert server.guest_mappings() == server.mappings_per_dma_map
                continue
            with pytest.raises(VfioUserClientError) as ei:
                c.dma_map(iova, size, ram, ram_offset=off)
            # libvfio-user refuses overlaps with EINVAL, the Python backend (and the spec) EEXIST
            assert ei.value.errno == (errno.EINVAL if server.backend == "libvfio-user" else errno.EEXIST)
        # beyond the memfd, past 2^64, unaligned, offset huge
        for iova, size, off, err in [
            (0x400000, 8 << 20, 0, errno.EINVAL),
            (2**64 - 4096, 8192, 0, errno.EINVAL),
            (0x500001, 4096, 0, errno.EINVAL),
            (0x600000, 4096, 2**63, errno.EINVAL),
        ]:
            with pytest.raises(VfioUserClientError) as ei:
                c.dma_map(iova, size, ram, ram_offset=off)
            assert ei.value.errno == err, (hex(iova), ei.value.errno)
        assert server.guest_mappings() == server.mappings_per_dma_map
        for iova, size in [(0x100000, 0x1000), (0x100000, 2 << 20), (0x101000, 1 << 20), (0, 0)]:
            with pytest.raises(VfioUserClientError) as ei:
                c.dma_unmap(iova, size)
            assert ei.value.errno == errno.ENOENT
        c.dma_unmap(0x100000, 1 << 20)
        assert server.guest_mappings() == 0
        # many small maps then disconnect without unmapping
        for i in range(512):
            c.dma_map(0x10000000 + i * 0x2000, 0x1000, ram, ram_offset=(i % 1024) * 0x1000)
        assert server.guest_mappings() == 512 * server.mappings_per_dma_map
    finally:
        c.close()
        ram.close()
    _clean(server)


def test_unmap_under_io(server):
    """Queues in one mapping, data buffers in another. Unmapping the data mapping while
    commands are queued -> those commands complete with Data Transfer Error; unmapping the
    queue memory -> Controller Fatal Status. Either way the mappings really go away, and
    after a controller reset with memory re-mapped, I/O works again."""
    h = Host(server.path, ram_size=4 << 20)
    data = GuestRam(1 << 20, "hostile")
    try:
        h.set_queues(2)
        h.create_pair(1, 64)
        DATA = 0x40000000
        h.client.dma_map(DATA, 1 << 20, data)
        data.view[:] = b"\x5a" * (1 << 20)
        per_map = server.mappings_per_dma_map
        assert server.guest_mappings() == 2 * per_map
        # queue 60 writes, unmap the data memory, then ring once
        cids = [h.host.submit(1, NvmOpcode.WRITE, nsid=1, prp1=DATA + (i % 256) * PAGE, cdw10=i * 8, cdw12=7, ring=False) for i in range(60)]
        h.client.dma_unmap(DATA, 1 << 20)
        assert server.guest_mappings() == per_map
        h.host.ring_sq(1)
        statuses = {h.wait_cid(1, cid).status for cid in cids}
        assert statuses == {Status.DATA_TRANSFER_ERROR}, [status_name(s) for s in statuses]
        # now pull the queue memory itself away, with commands queued
        cids = [h.host.submit(1, NvmOpcode.READ, nsid=1, prp1=IOVA + 0x300000, cdw10=i, cdw12=0, ring=False) for i in range(10)]
        h.client.dma_unmap(IOVA, 4 << 20)
        assert server.guest_mappings() == 0
        h.host.ring_sq(1)
        assert h.csts() & 0x2, "controller must report fatal status"
        # recover: disable, map again, enable, do I/O
        h.client.dma_map(IOVA, 4 << 20, h.ram)
        h.host.set_reg32(0x14, 0)
        h.host.wait_ready(False)
        h.stash.clear()
        h.host.enable()
        h.set_queues(2)
        h.create_pair(1, 64)
        c = h.write(1, 1, 100, b"\x11" * 512)
        assert c.status == Status.SUCCESS
        c, got = h.read(1, 1, 100, 1)
        assert c.status == Status.SUCCESS and got == b"\x11" * 512
    finally:
        h.close()
        data.close()
    _clean(server)


def test_disconnect_with_commands_in_flight(server):
    """The client vanishes mid-I/O (queued, doorbell posted, no one reaps): server cleans up."""
    for _ in range(3):
        h = Host(server.path, ram_size=4 << 20)
        h.set_queues(2)
        h.create_pair(1, 128)
        buf = h.alloc(128 * PAGE)
        for i in range(127):
            h.rw(1, NvmOpcode.WRITE if i % 2 else NvmOpcode.READ, 1, i * 8, 8, buf + i * PAGE, PAGE, ring=False)
        h.host.ring_sq(1)  # posted: no reply awaited
        h.client.sock.shutdown(socket.SHUT_RDWR)
        h.close()
        _clean(server)


def test_server_survives_a_client_that_never_reads(server):
    """A client that floods requests and never reads replies: the server's send buffer fills;
    it must keep its queue bounded by the client's pace (or drop the client), not die."""
    s = _raw(server)
    rss0 = server.rss_kb()
    try:
        send_message(s, _version_bytes(), [])
        # 80 bytes in, 4.3 KiB out: the amplification a client could use to grow the server
        req = encode(9, Command.REGION_READ, MsgType.REQUEST, m.REGION_ACCESS.pack(0, 7, 256)) + encode(
            10, Command.REGION_READ, MsgType.REQUEST, m.REGION_ACCESS.pack(0, 0, 0x1000)
        )
        s.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and sent < 200000:
            try:
                s.send(req * 64)
                sent += 64
            except BlockingIOError:
                time.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError):
                break
        assert server.alive()
        rss = server.rss_kb()
    finally:
        s.close()
    _clean(server)
    assert rss - rss0 < 64 * 1024, f"server RSS grew {rss - rss0} kB while a client did not read ({sent} requests sent)"
