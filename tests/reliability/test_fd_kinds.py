"""Every fd-carrying command, fed every kind of fd a hostile client can pass, and fd floods.

The server runs as a separate process. For each (command, fd kind) the client must get a
reply (success only where the fd is really usable for that command), the fd the server
received must be closed again (its fd count returns to what it was before the message), the
log must hold no traceback, and the same connection must keep working. At the end the
server holds its baseline fds and serves a new client.

Then the server's fd limit: started with RLIMIT_NOFILE = 256 (so the tests are quick), it must
advertise a ``max_dma_maps`` it can hold and refuse the excess cleanly; when it is out of fds
anyway (exhausted through its control socket), fds the kernel had to drop refuse their
message, and a client waiting to be accepted is accepted once fds are free.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import socket
import struct
import time
from contextlib import ExitStack
from typing import Callable

import pytest

from ..libvfio.libvfio_helpers import BACKENDS, skip_unless_available
from ..support.host import Host, IOVA, PAGE
from ..support.server import DEADLINE, ServerProcess
from nvme_emu.spec.commands import Status
from vfio_user import messages as m
from vfio_user.memfd import sealed_memfd
from vfio_user.vmm.client import GuestRam, VfioUserClient, VfioUserClientError
from vfio_user.constants import (
    DMA_FLAG_READ,
    DMA_FLAG_WRITE,
    IRQ_ACTION_TRIGGER,
    IRQ_ACTION_UNMASK,
    IRQ_DATA_EVENTFD,
    Command,
    IrqIndex,
)

MAP_SIZE = 1 << 20

# -- fd kinds: each opener returns (fd, what the server may legitimately do with it) -----------


def _memfd(size: int) -> int:
    """Sealed against resizing, as QEMU's guest RAM (``_unsealed_memfd``: the server refuses it)."""
    return sealed_memfd("hostile", size)


def _unsealed_memfd(size: int) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _pipe_read() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def _pipe_write() -> int:
    r, w = os.pipe()
    os.close(r)
    return w


def _socket() -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def _directory() -> int:
    return os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _regular_file(tmp: str) -> int:
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, MAP_SIZE)
    return fd


#: name -> opener(tmpfile) ; the openers make a fresh fd the client closes after sending.
FD_KINDS: dict[str, Callable[[str], int]] = {
    "eventfd": lambda _t: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
    "memfd": lambda _t: _memfd(MAP_SIZE),
    "memfd-unsealed": lambda _t: _unsealed_memfd(MAP_SIZE),
    "memfd-too-small": lambda _t: _memfd(PAGE),
    "memfd-empty": lambda _t: _memfd(0),
    "pipe-read": lambda _t: _pipe_read(),
    "pipe-write": lambda _t: _pipe_write(),
    "socket": lambda _t: _socket(),
    "dev-null": lambda _t: os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC),
    "dev-zero": lambda _t: os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC),
    "directory": lambda _t: _directory(),
    "regular-file": _regular_file,
    "read-only-file": lambda t: (os.close(_regular_file(t)), os.open(t, os.O_RDONLY | os.O_CLOEXEC))[1],
}

#: What each command may accept; every other kind must be refused.
ACCEPTED = {
    "dma_map": {"memfd", "regular-file", "dev-zero"},  # mappable, big enough, writable
    "msix_trigger": {"eventfd"},
    "intx_trigger": {"eventfd"},
    "err_trigger": {"eventfd"},
    "intx_resample": {"eventfd"},
}


def _set_irqs(index: int, flags: int) -> tuple[int, bytes]:
    return Command.DEVICE_SET_IRQS, m.SetIrqs.build({"argsz": 20, "flags": flags, "index": index, "start": 0, "count": 1, "data": b""})


#: command name -> (command, payload) for a request carrying exactly one fd.
COMMANDS: dict[str, tuple[int, bytes]] = {
    "dma_map": (Command.DMA_MAP, m.DmaMap.build({"argsz": 32, "flags": DMA_FLAG_READ | DMA_FLAG_WRITE, "offset": 0, "address": 0x40000000, "size": MAP_SIZE})),
    "msix_trigger": _set_irqs(IrqIndex.MSIX, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER),
    "intx_trigger": _set_irqs(IrqIndex.INTX, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER),
    "err_trigger": _set_irqs(IrqIndex.ERR, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER),
    "intx_resample": _set_irqs(IrqIndex.INTX, IRQ_DATA_EVENTFD | IRQ_ACTION_UNMASK),
    # commands that take no fd at all: any fd is refused
    "region_read": (Command.REGION_READ, m.REGION_ACCESS.pack(0, 0, 8)),
    "region_write": (Command.REGION_WRITE, m.REGION_ACCESS.pack(0x14, 0, 4) + bytes(4)),
    "region_io_fds": (Command.DEVICE_GET_REGION_IO_FDS, m.RegionIoFdsRequest.build({"argsz": 4096, "flags": 0, "index": 0, "count": 0})),
    "dma_unmap": (Command.DMA_UNMAP, m.DmaUnmap.build({"argsz": 24, "flags": 0, "address": 0x40000000, "size": MAP_SIZE})),
    "device_info": (Command.DEVICE_GET_INFO, m.DeviceInfo.build({"argsz": 16, "flags": 0, "num_regions": 0, "num_irqs": 0})),
    "irq_info": (Command.DEVICE_GET_IRQ_INFO, m.IrqInfo.build({"argsz": 16, "flags": 0, "index": 2, "count": 0})),
}

#: After an accepted fd, undo it so the next kind starts from the same state.
UNDO: dict[str, tuple[int, bytes]] = {
    "dma_map": COMMANDS["dma_unmap"],
    # DATA_NONE | TRIGGER with count 0 disables the index (its eventfds are closed)
    "msix_trigger": (Command.DEVICE_SET_IRQS, m.SetIrqs.build({"argsz": 20, "flags": 0x21, "index": IrqIndex.MSIX, "start": 0, "count": 0, "data": b""})),
    "intx_trigger": (Command.DEVICE_SET_IRQS, m.SetIrqs.build({"argsz": 20, "flags": 0x21, "index": IrqIndex.INTX, "start": 0, "count": 0, "data": b""})),
    "err_trigger": (Command.DEVICE_SET_IRQS, m.SetIrqs.build({"argsz": 20, "flags": 0x21, "index": IrqIndex.ERR, "start": 0, "count": 0, "data": b""})),
    # UNMASK + DATA_EVENTFD without an fd drops the resample eventfd
    "intx_resample": COMMANDS["intx_resample"],
}


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory):
    skip_unless_available(request.param)
    d = tmp_path_factory.mktemp("fd-kinds")
    srv = ServerProcess.serve(str(d / "s.sock"), d / "server.log", ["ram:size=16M"], backend=request.param, extra=["--queues", "4"])
    srv.settle()
    yield srv
    rc = srv.stop()
    assert rc == 0, srv.log()[-3000:]


def _no_traceback(srv: ServerProcess, since: int = 0) -> None:
    log = srv.log()[since:]
    assert "Traceback" not in log, log[-4000:]


def _clean(srv: ServerProcess, since: int = 0) -> None:
    assert srv.alive(), srv.log()[-3000:]
    srv.wait_idle()
    n = srv.wait_fds()
    assert n == srv.baseline_fds, f"server holds {n} fds, baseline {srv.baseline_fds}:\n" + "\n".join(srv.fds())
    assert srv.guest_mappings() == 0
    _no_traceback(srv, since)
    assert srv.answers()


def _attached_fds(srv: ServerProcess, c: VfioUserClient) -> int:
    """The server's fd count with this client attached and idle (after a round trip)."""
    c.region_read(0, 0, 8)
    n = srv.fd_count()
    assert srv.baseline_fds < n <= srv.baseline_fds + 4, "\n".join(srv.fds())
    return n


def _try(c: VfioUserClient, command: int, payload: bytes, fds: list[int]) -> int:
    """Send one request; 0 on success, else the errno of the error reply (a reply must come)."""
    try:
        c.request(command, payload, fds)
    except VfioUserClientError as e:
        assert e.errno, "an error reply must carry an errno"
        return e.errno
    return 0


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_fd_kind_on_every_command(server, tmp_path, command):
    """One connection per command; each fd kind in turn: a reply, the fd closed, still serving."""
    code, payload = COMMANDS[command]
    mark = len(server.log())
    c = VfioUserClient(server.path, timeout=DEADLINE)
    try:
        c.negotiate()
        attached = _attached_fds(server, c)
        for kind, opener in FD_KINDS.items():
            fd = opener(str(tmp_path / f"{kind}.bin"))
            try:
                err = _try(c, code, payload, [fd])
            finally:
                os.close(fd)
            legit = kind in ACCEPTED.get(command, set())
            if legit:
                assert err == 0, f"{command} with a {kind} fd refused: {errno.errorcode.get(err, err)}"
                if command in UNDO:
                    undo_cmd, undo_payload = UNDO[command]
                    assert _try(c, undo_cmd, undo_payload, []) == 0
            else:
                assert err != 0, f"{command} accepted a {kind} fd"
            # the connection still works, and the server kept no fd of this attempt
            assert struct.unpack("<Q", c.region_read(0, 0, 8))[0] & 0xFFFF == 4095
            held = server.wait_fds(attached)
            assert held == attached, f"{command}/{kind}: server holds {held} fds, expected {attached}:\n" + "\n".join(server.fds())
        _no_traceback(server, mark)
    finally:
        c.close()
    _clean(server, mark)


def test_unpollable_resample_fds_are_refused_without_leaking(server):
    """The fuzz finding: INTx resample (SET_IRQS UNMASK + eventfd) with a directory fd raised
    inside the event loop's add_reader (traceback, EIO) and left the fd open; a run of them
    grew the server's fd count. Each must get EINVAL, and the count must not move."""
    mark = len(server.log())
    c = VfioUserClient(server.path, timeout=DEADLINE)
    code, payload = COMMANDS["intx_resample"]
    try:
        c.negotiate()
        attached = _attached_fds(server, c)
        for i in range(40):
            fd = _directory() if i % 2 else os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            try:
                assert _try(c, code, payload, [fd]) == errno.EINVAL
            finally:
                os.close(fd)
        assert server.wait_fds(attached) == attached, "\n".join(server.fds())
        # a real resample eventfd still works afterwards: INTx fires, the resample unmasks it
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            assert _try(c, code, payload, [efd]) == 0
        finally:
            os.close(efd)
        # the Python backend keeps the resample eventfd; libvfio-user has no INTx resample
        # (INTx is not MASKABLE there: docs/libvfio-user.md) and keeps none
        kept = 0 if server.backend == "libvfio-user" else 1
        assert server.wait_fds(attached + kept) == attached + kept
        _no_traceback(server, mark)
    finally:
        c.close()
    _clean(server, mark)


# -- DMA_MAP floods against a small fd limit ---------------------------------------------------

NOFILE = 256


def _limit_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@pytest.fixture(params=BACKENDS)
def small_server(request, tmp_path):
    skip_unless_available(request.param)
    srv = ServerProcess.serve(str(tmp_path / "s.sock"), tmp_path / "server.log", ["ram:size=16M"], backend=request.param, extra=["--queues", "4"],
                              preexec_fn=_limit_nofile)
    srv.settle()
    yield srv
    rc = srv.stop()
    assert rc == 0, srv.log()[-3000:]


def _max_dma_maps(srv: ServerProcess, c: VfioUserClient) -> int:
    """The server's bound on DMA maps, which it logs at start (``dma_map_budget``). The Python
    backend announces it in VERSION; libvfio-user announces no max_dma_maps (docs/libvfio-user.md)."""
    found = re.search(r"max_dma_maps (\d+) \(", srv.log())
    assert found, srv.log()[-3000:]
    logged = int(found.group(1))
    if srv.backend == "libvfio-user":
        assert "max_dma_maps" not in c.server_caps
    else:
        assert c.server_caps["max_dma_maps"] == logged
    return logged


def test_dma_map_flood_is_bounded_by_the_fd_limit(small_server):
    """With RLIMIT_NOFILE = 256, a client maps 1 MiB ranges (one fd each) until refused. The
    server must advertise a max_dma_maps it can hold, refuse maps beyond it with an error
    reply (not run into EMFILE), keep serving this client's I/O, and accept a new client."""
    srv = small_server
    with open(f"/proc/{srv.pid}/limits") as f:
        assert any(line.startswith("Max open files") and f"{NOFILE}" in line for line in f)
    h = Host(srv.path, ram_size=4 << 20)
    flood = GuestRam(4 << 20, "hostile")
    try:
        advertised = _max_dma_maps(srv, h.client)
        h.set_queues(2)
        h.create_pair(1, 16)
        held = 1  # the Host's own guest RAM
        accepted = 0
        refusals: list[int] = []
        for i in range(2 * NOFILE):
            try:
                h.client.dma_map(0x100000000 + i * 0x200000, 0x1000, flood, ram_offset=(i % 1024) * 0x1000)
                accepted += 1
            except VfioUserClientError as e:
                refusals.append(e.errno)
        # beyond its max_dma_maps libvfio-user answers EINVAL, the Python backend ENOSPC
        beyond = errno.EINVAL if srv.backend == "libvfio-user" else errno.ENOSPC
        assert refusals and set(refusals) == {beyond}, {errno.errorcode.get(e, e) for e in refusals}
        assert 16 <= advertised < NOFILE, f"max_dma_maps {advertised} not derived from RLIMIT_NOFILE {NOFILE}"
        assert accepted + held == advertised, (accepted, held, advertised)
        assert srv.guest_mappings() == (accepted + 1) * srv.mappings_per_dma_map
        assert "Too many open files" not in srv.log() and "EMFILE" not in srv.log(), srv.log()[-3000:]
        # the client's I/O goes on, interrupts and all
        c = h.write(1, 1, 8, b"\x42" * 512)
        assert c.status == Status.SUCCESS
        c, got = h.read(1, 1, 8, 1)
        assert c.status == Status.SUCCESS and got == b"\x42" * 512
        # a second connection meanwhile is refused, not a crash: the server still accepts
        # (libvfio-user leaves it in the listen backlog until the first client leaves:
        # test_access.test_second_concurrent_client_is_refused)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(srv.path)
        if srv.backend == "libvfio-user":
            probe.settimeout(0.5)
            with pytest.raises((TimeoutError, socket.timeout)):
                probe.recv(1)
        else:
            probe.settimeout(DEADLINE)
            assert probe.recv(1) == b""
        probe.close()
    finally:
        h.close()
        flood.close()
    _clean(srv)


def test_eventfd_flood_near_the_fd_limit_gets_replies(small_server):
    """SET_IRQS messages with many eventfds while the server holds its maximum of maps: the
    server either takes them or refuses them with a reply; never a traceback, fds balanced."""
    srv = small_server
    c = VfioUserClient(srv.path, timeout=DEADLINE)
    flood = GuestRam(4 << 20, "hostile")
    try:
        c.negotiate()
        n = _max_dma_maps(srv, c)
        for i in range(n):
            c.dma_map(0x100000000 + i * 0x200000, 0x1000, flood, ram_offset=(i % 1024) * 0x1000)
        with ExitStack() as stack:
            for round_ in range(20):
                efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(8)]
                for fd in efds:
                    stack.callback(os.close, fd)
                payload = m.SetIrqs.build(
                    {"argsz": 20, "flags": IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, "index": IrqIndex.MSIX, "start": 8 * (round_ % 8), "count": 8, "data": b""}
                )
                _try(c, Command.DEVICE_SET_IRQS, payload, efds)
        assert struct.unpack("<Q", c.region_read(0, 0, 8))[0] & 0xFFFF == 4095
        _no_traceback(srv)
    finally:
        c.close()
        flood.close()
    _clean(srv)


def test_a_message_whose_fds_the_kernel_dropped_is_refused():
    """Sans-IO: when recvmsg reports MSG_CTRUNC (the server was out of fds, the kernel dropped
    some), the message owning them is refused with EMFILE, not handled as if it had none (a
    DMA_MAP would otherwise become an fd-less mapping). Its surviving fds are closed; the
    next message is served normally."""
    from vfio_user.protocol import Connection, Message, Rejected, encode
    from vfio_user.constants import MsgType

    conn = Connection()
    dma_map = encode(7, Command.DMA_MAP, MsgType.REQUEST, COMMANDS["dma_map"][1])
    survivor = os.eventfd(0, os.EFD_CLOEXEC)
    events = conn.receive(dma_map[:20], [survivor], fds_lost=True)
    assert events == []
    events += conn.receive(dma_map[20:])
    events += conn.receive(encode(8, Command.REGION_READ, MsgType.REQUEST, m.REGION_ACCESS.pack(0, 0, 8)))
    assert [type(e) for e in events] == [Rejected, Message]
    assert events[0].msg_id == 7 and events[0].errno == errno.EMFILE
    assert events[1].msg_id == 8 and events[1].fds == []
    with pytest.raises(OSError) as ei:
        os.fstat(survivor)
    assert ei.value.errno == errno.EBADF
    assert not conn.partial


def _exhaust_fds(srv: ServerProcess, ctl: list[socket.socket]) -> None:
    """Open control-plane connections until the server holds RLIMIT_NOFILE fds."""
    ctl_path = srv.path + ".ctl"
    assert os.path.exists(ctl_path)
    deadline = time.monotonic() + DEADLINE
    while srv.fd_count() < NOFILE and time.monotonic() < deadline:
        before = srv.fd_count()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1.0)
        try:
            s.connect(ctl_path)
        except OSError:
            s.close()
            break
        ctl.append(s)
        t = time.monotonic()
        while srv.fd_count() == before and time.monotonic() - t < 0.5:
            time.sleep(0.002)
    assert srv.fd_count() == NOFILE, f"could not exhaust the server's fds ({srv.fd_count()})"


def test_fds_the_kernel_drops_at_emfile_refuse_the_message(small_server):
    """Server out of fds while a client is attached: the kernel drops the fds of the next
    DMA_MAP / SET_IRQS (MSG_CTRUNC). Those requests must fail (EMFILE), not succeed as an
    fd-less DMA mapping or interrupts wired to nothing; when fds are free again, they work."""
    srv = small_server
    ctl: list[socket.socket] = []
    c = VfioUserClient(srv.path, timeout=DEADLINE)
    ram = GuestRam(MAP_SIZE, "hostile")
    efds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(4)]
    msix = m.SetIrqs.build({"argsz": 20, "flags": IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, "index": IrqIndex.MSIX, "start": 0, "count": 4, "data": b""})
    try:
        c.negotiate()
        attached = _attached_fds(srv, c)
        _exhaust_fds(srv, ctl)
        with pytest.raises(VfioUserClientError) as ei:
            c.dma_map(IOVA, MAP_SIZE, ram)
        assert ei.value.errno == errno.EMFILE
        assert _try(c, Command.DEVICE_SET_IRQS, msix, efds) == errno.EMFILE
        assert struct.unpack("<Q", c.region_read(0, 0, 8))[0] & 0xFFFF == 4095
        for s in ctl:
            s.close()
        ctl.clear()
        assert srv.wait_fds(attached) == attached, "\n".join(srv.fds())
        c.dma_map(IOVA, MAP_SIZE, ram)
        assert _try(c, Command.DEVICE_SET_IRQS, msix, efds) == 0
        assert srv.guest_mappings() == srv.mappings_per_dma_map
    finally:
        for s in ctl:
            s.close()
        c.close()
        ram.close()
        for fd in efds:
            os.close(fd)
    _clean(srv)


def test_out_of_fds_at_accept_keeps_the_server_listening(small_server):
    """The server's fds exhausted by control-plane connections (RLIMIT_NOFILE = 256): a
    vfio-user client that connects then cannot be accepted (EMFILE). The accept loop must
    survive it (it used to end, leaving a listening socket nobody accepts on), and once fds
    are free again the waiting client is served."""
    srv = small_server
    ctl: list[socket.socket] = []
    waiting: VfioUserClient | None = None
    try:
        _exhaust_fds(srv, ctl)
        waiting = VfioUserClient(srv.path, timeout=DEADLINE)  # connected (backlog), not accepted
        srv.wait_log("accept failed")  # the server tried to accept it and got EMFILE
        assert srv.alive()
        for s in ctl:
            s.close()
        ctl.clear()
        waiting.negotiate()  # accepted once fds are free
        assert struct.unpack("<Q", waiting.region_read(0, 0, 8))[0] & 0xFFFF == 4095
    finally:
        for s in ctl:
            s.close()
        if waiting is not None:
            waiting.close()
    srv.wait_idle()
    assert srv.wait_fds() == srv.baseline_fds, "\n".join(srv.fds())
    assert srv.answers()
