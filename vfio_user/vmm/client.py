"""A vfio-user client that behaves like QEMU's, for tests, benchmarks and the KVM harness.

It is blocking (one request at a time, like a vCPU thread), owns the "guest memory" it maps
into the server (memfds), and answers the server's DMA_READ/DMA_WRITE requests while it
waits for its own replies, as QEMU does. It reuses the message definitions and the sans-IO
core of the server.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from .. import messages as m
from ..constants import (
    DEFAULT_MAX_DATA_XFER,
    DMA_FLAG_READ,
    DMA_FLAG_WRITE,
    IO_FD_TYPE_IOEVENTFD_SHADOW,
    IO_FDS_HEADER_SIZE,
    IRQ_ACTION_TRIGGER,
    IRQ_ACTION_UNMASK,
    IRQ_DATA_EVENTFD,
    IRQ_DATA_NONE,
    MAX_MAX_MSG_FDS,
    REGION_FLAG_CAPS,
    REGION_FLAG_MMAP,
    REGION_INFO_BASE_SIZE,
    VERSION_MAJOR,
    VERSION_MINOR,
    Command,
    IrqIndex,
)
from ..memfd import SharedMemory
from ..protocol import Connection, Message, Rejected, close_fds
from ..unix import recv_chunk, send_message

#: What QEMU 11.1.3 announces (vfio-user-protocol.md §2.1).
QEMU_CAPABILITIES: dict[str, Any] = {
    "pgsizes": 4096,
    "max_msg_fds": 16,
    "max_dma_maps": 65535,
    "max_data_xfer_size": 1048576,
    "migration": {"max_bitmap_size": 268435456, "pgsize": 4096},
    "write_multiple": True,
}


class VfioUserClientError(Exception):
    """The server answered with an error reply."""

    def __init__(self, command: int, err: int) -> None:
        super().__init__(f"command {command} failed: {errno.errorcode.get(err, err)} ({os.strerror(err) if err else 'no errno'})")
        self.command = command
        self.errno = err


class GuestRam(SharedMemory):
    """memfd-backed guest memory the client owns and may map into the server (by fd)."""

    def __init__(self, size: int, name: str = "guest-ram") -> None:
        super().__init__(size, name)


@dataclass
class RegionInfo:
    index: int
    flags: int
    size: int
    offset: int
    areas: list[tuple[int, int]] = field(default_factory=list)
    fd: int | None = None


@dataclass
class IoFd:
    """One GET_REGION_IO_FDS record with its fds (and the shadow memory mapped)."""

    gpa_offset: int
    size: int
    type: int
    flags: int
    datamatch: int
    eventfd: int
    shadow_fd: int | None = None
    shadow_offset: int = 0
    shadow: mmap.mmap | None = None

    def emulate_post_write(self, value: int) -> None:
        """What KVM's POST_WRITE does: store the value in the shadow slot, then signal."""
        assert self.shadow is not None
        self.shadow[self.shadow_offset : self.shadow_offset + self.size] = value.to_bytes(self.size, "little")
        os.eventfd_write(self.eventfd, 1)

    def signal(self) -> None:
        os.eventfd_write(self.eventfd, 1)


@dataclass
class _Mapping:
    iova: int
    size: int
    ram: GuestRam
    ram_offset: int
    writable: bool


class VfioUserClient:
    """Blocking client; see the module docstring."""

    def __init__(self, path: str, *, timeout: float = 10.0, connect_timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise
                time.sleep(0.02)
        self.conn = Connection(max_data_xfer=64 << 20, max_msg_fds=MAX_MAX_MSG_FDS * 16)
        self._events: list[Message | Rejected] = []
        self._maps: list[_Mapping] = []
        self.server_caps: dict[str, Any] = {}
        self.max_data_xfer = DEFAULT_MAX_DATA_XFER
        self.dma_requests_served = 0
        self.owned_fds: list[int] = []
        self.mmaps: list[mmap.mmap] = []

    # -- plumbing --------------------------------------------------------------------

    def send_raw(self, data: bytes, fds: Iterable[int] = ()) -> None:
        send_message(self.sock, data, list(fds))

    def _receive(self, timeout: float) -> None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            raise TimeoutError("no message from the server")
        data, fds = recv_chunk(self.sock)
        if not data:
            close_fds(fds)
            raise ConnectionError("server closed the connection")
        self._events.extend(self.conn.receive(data, fds))

    def request(self, command: int, payload: bytes = b"", fds: Iterable[int] = (), *, no_reply: bool = False) -> Message | None:
        """Send a request; wait for its reply (serving DMA requests meanwhile); raise on error."""
        msg_id, data = self.conn.request(command, payload, no_reply=no_reply)
        self.send_raw(data, fds)
        if no_reply:
            return None
        reply = self.wait_reply(msg_id)
        if reply.is_error:
            reply.close_fds()
            raise VfioUserClientError(command, reply.error_no)
        return reply

    def wait_reply(self, msg_id: int) -> Message:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, ev in enumerate(self._events):
                if isinstance(ev, Message) and ev.is_reply and ev.msg_id == msg_id:
                    del self._events[i]
                    return ev
            self._serve_requests()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.conn.forget(msg_id)
                raise TimeoutError(f"no reply to request {msg_id}")
            self._receive(remaining)

    def poll(self, timeout: float = 0.0) -> int:
        """Serve server requests that arrived (DMA_READ/WRITE); returns how many."""
        served = self.dma_requests_served
        try:
            self._receive(timeout)
        except TimeoutError:
            pass
        self._serve_requests()
        return self.dma_requests_served - served

    def _serve_requests(self) -> None:
        keep: list[Message | Rejected] = []
        for ev in self._events:
            if isinstance(ev, Message) and not ev.is_reply:
                self._serve_dma(ev)
            else:
                keep.append(ev)
        self._events = keep

    def _serve_dma(self, msg: Message) -> None:
        self.dma_requests_served += 1
        if msg.fds:
            msg.close_fds()
            self.send_raw(Connection.error_reply(msg, errno.EINVAL))
            return
        try:
            addr, count = m.DMA_ACCESS.unpack_from(msg.payload)
            if msg.command == Command.DMA_READ:
                data = self._ram_read(addr, count)
                reply = Connection.reply(msg, m.DMA_ACCESS.pack(addr, count) + data)
            elif msg.command == Command.DMA_WRITE:
                self._ram_write(addr, msg.payload[m.DMA_ACCESS.size :][:count])
                reply = Connection.reply(msg, m.DMA_ACCESS.pack(addr, count))
            else:
                reply = Connection.error_reply(msg, errno.ENOSYS)
        except (OSError, ValueError, IndexError) as e:
            reply = Connection.error_reply(msg, getattr(e, "errno", None) or errno.EFAULT)
        if not msg.no_reply:
            self.send_raw(reply)

    def _find(self, addr: int, count: int) -> tuple[_Mapping, int]:
        for mp in self._maps:
            if mp.iova <= addr and addr + count <= mp.iova + mp.size:
                return mp, mp.ram_offset + addr - mp.iova
        raise OSError(errno.EFAULT, f"{addr:#x}+{count} not mapped")

    def _ram_read(self, addr: int, count: int) -> bytes:
        mp, off = self._find(addr, count)
        return bytes(mp.ram.view[off : off + count])

    def _ram_write(self, addr: int, data: bytes) -> None:
        mp, off = self._find(addr, len(data))
        if not mp.writable:
            raise OSError(errno.EPERM, "read-only mapping")
        mp.ram.view[off : off + len(data)] = data

    # -- commands --------------------------------------------------------------------

    def negotiate(self, capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
        caps = QEMU_CAPABILITIES if capabilities is None else capabilities
        payload = m.VersionPayload.build({"major": VERSION_MAJOR, "minor": VERSION_MINOR, "json": m.encode_version_json(caps)})
        reply = self.request(Command.VERSION, payload)
        assert reply is not None
        v = m.VersionPayload.parse(reply.payload)
        self.server_caps = m.decode_version_json(v.json)
        self.max_data_xfer = self.server_caps.get("max_data_xfer_size", DEFAULT_MAX_DATA_XFER)
        self.version_reply_size = len(reply.payload) + 16
        return self.server_caps

    def dma_map(self, iova: int, size: int, ram: GuestRam, *, ram_offset: int = 0, with_fd: bool = True, writable: bool = True) -> None:
        """Map ``ram[ram_offset:+size]`` at ``iova``; without fd, the server must use messages."""
        flags = DMA_FLAG_READ | (DMA_FLAG_WRITE if writable else 0)
        payload = m.DmaMap.build({"argsz": 32, "flags": flags, "offset": ram_offset if with_fd else 0, "address": iova, "size": size})
        self.request(Command.DMA_MAP, payload, [ram.fd] if with_fd else [])
        self._maps.append(_Mapping(iova, size, ram, ram_offset, writable))

    def dma_unmap(self, iova: int, size: int, flags: int = 0) -> bytes:
        payload = m.DmaUnmap.build({"argsz": 24, "flags": flags, "address": iova, "size": size})
        reply = self.request(Command.DMA_UNMAP, payload)
        self._maps = [mp for mp in self._maps if flags or not (mp.iova == iova and mp.size == size)]
        assert reply is not None
        return reply.payload

    def device_info(self) -> Any:
        reply = self.request(Command.DEVICE_GET_INFO, m.DeviceInfo.build({"argsz": 16, "flags": 0, "num_regions": 0, "num_irqs": 0}))
        assert reply is not None
        return m.DeviceInfo.parse(reply.payload)

    def region_info(self, index: int, argsz: int = REGION_INFO_BASE_SIZE) -> RegionInfo:
        """GET_REGION_INFO the way QEMU asks: small argsz first, again if caps need more."""
        req = {"argsz": argsz, "flags": 0, "index": index, "cap_offset": 0, "size": 0, "offset": 0}
        reply = self.request(Command.DEVICE_GET_REGION_INFO, m.RegionInfo.build(req))
        assert reply is not None
        info = m.RegionInfo.parse(reply.payload[: REGION_INFO_BASE_SIZE])
        if info.argsz > argsz:
            reply.close_fds()
            return self.region_info(index, info.argsz)
        result = RegionInfo(index, info.flags, info.size, info.offset)
        if info.flags & REGION_FLAG_CAPS and info.cap_offset:
            cap = m.SparseMmapCap.parse(reply.payload[info.cap_offset :])
            result.areas = [(a.offset, a.size) for a in cap.areas]
        fds = reply.take_fds()
        if fds:
            result.fd = fds[0]
            self.owned_fds.append(fds[0])
            close_fds(fds[1:])
        return result

    def mmap_region(self, info: RegionInfo) -> dict[int, mmap.mmap]:
        """Map every sparse area of a region (as QEMU does); keyed by area offset."""
        if not info.flags & REGION_FLAG_MMAP or info.fd is None:
            return {}
        out = {}
        for off, size in info.areas or [(0, info.size)]:
            mm = mmap.mmap(info.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=info.offset + off)
            self.mmaps.append(mm)
            out[off] = mm
        return out

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        reply = self.request(Command.REGION_READ, m.REGION_ACCESS.pack(offset, index, count))
        assert reply is not None
        data = reply.payload[m.REGION_ACCESS.size :]
        if len(data) != count:
            raise VfioUserClientError(Command.REGION_READ, errno.EIO)
        return data

    def region_write(self, index: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        self.request(Command.REGION_WRITE, m.REGION_ACCESS.pack(offset, index, len(data)) + data, no_reply=posted)

    def write_multi(self, writes: list[tuple[int, int, bytes]]) -> None:
        """REGION_WRITE_MULTI, posted as QEMU sends it: (region, offset, data<=8) entries."""
        entries = [{"offset": off, "region": reg, "count": len(d), "data": d.ljust(8, b"\0")} for reg, off, d in writes]
        self.request(Command.REGION_WRITE_MULTI, m.WriteMulti.build({"wr_cnt": len(entries), "entries": entries}), no_reply=True)

    def irq_info(self, index: int) -> Any:
        reply = self.request(Command.DEVICE_GET_IRQ_INFO, m.IrqInfo.build({"argsz": 16, "flags": 0, "index": index, "count": 0}))
        assert reply is not None
        return m.IrqInfo.parse(reply.payload)

    def set_irqs(self, index: int, flags: int, start: int = 0, count: int = 0, fds: Iterable[int] = (), data: bytes = b"") -> None:
        payload = m.SetIrqs.build({"argsz": 20 + len(data), "flags": flags, "index": index, "start": start, "count": count, "data": data})
        self.request(Command.DEVICE_SET_IRQS, payload, fds)

    def enable_irqs(self, index: IrqIndex, count: int, start: int = 0) -> list[int]:
        """Hand the server ``count`` new eventfds for ``index``; the client keeps and waits on them."""
        efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        self.owned_fds.extend(efds)
        self.set_irqs(index, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, start, count, efds)
        return efds

    def disable_irqs(self, index: IrqIndex) -> None:
        self.set_irqs(index, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, 0, 0)

    def unmask_intx(self) -> None:
        self.set_irqs(IrqIndex.INTX, IRQ_DATA_NONE | IRQ_ACTION_UNMASK, 0, 1)

    def region_io_fds(self, index: int) -> list[IoFd]:
        """Two-phase GET_REGION_IO_FDS as the shadow-ioeventfd QEMU fork does; maps shadows."""
        probe = self.request(
            Command.DEVICE_GET_REGION_IO_FDS, m.RegionIoFdsRequest.build({"argsz": IO_FDS_HEADER_SIZE, "flags": 0, "index": index, "count": 0})
        )
        assert probe is not None
        head = m.RegionIoFdsReply.parse(probe.payload)
        probe.close_fds()
        if head.count == 0:
            return []
        reply = self.request(Command.DEVICE_GET_REGION_IO_FDS, m.RegionIoFdsRequest.build({"argsz": head.argsz, "flags": 0, "index": index, "count": 0}))
        assert reply is not None
        body = m.RegionIoFdsReply.parse(reply.payload)
        fds = reply.take_fds()
        self.owned_fds.extend(fds)
        out = []
        shadow_maps: dict[int, mmap.mmap] = {}
        for i in range(body.count):
            rec = m.IoFdRecord.parse(body.records[i * m.IoFdRecord.sizeof() :])
            iofd = IoFd(rec.gpa_offset, rec.size, rec.type, rec.flags, rec.datamatch, fds[rec.fd_index])
            if rec.type == IO_FD_TYPE_IOEVENTFD_SHADOW:
                sfd = fds[rec.shadow_mem_fd_index]
                if sfd not in shadow_maps:
                    shadow_maps[sfd] = mmap.mmap(sfd, os.fstat(sfd).st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                    self.mmaps.append(shadow_maps[sfd])
                iofd.shadow_fd, iofd.shadow_offset, iofd.shadow = sfd, rec.shadow_offset, shadow_maps[sfd]
            out.append(iofd)
        return out

    def reset(self) -> None:
        self.request(Command.DEVICE_RESET)

    def close(self) -> None:
        for mm in self.mmaps:
            try:
                mm.close()
            except BufferError:
                pass
        self.mmaps.clear()
        close_fds(self.owned_fds)
        self.owned_fds.clear()
        for ev in self._events:
            if isinstance(ev, Message):
                ev.close_fds()
        self._events.clear()
        self.conn.close()
        self.sock.close()

    def __enter__(self) -> "VfioUserClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
