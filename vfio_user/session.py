"""Server-side handling of client requests, without I/O: a message in, a reply (bytes + fds) out.

One :class:`ServerSession` lives as long as one client connection. It owns that client's DMA
mappings and interrupt eventfds and drops them all in :meth:`close`, while the device (and
its state) outlives it. The transport in :mod:`vfio_user.server` feeds it messages in order
and sends what it returns.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import Any

from construct import ConstructError

from . import messages as m
from .constants import (
    DEFAULT_MAX_DATA_XFER,
    DEFAULT_MAX_DMA_MAPS,
    DEFAULT_MAX_MSG_FDS,
    DEFAULT_PGSIZE,
    DEVICE_FLAG_PCI,
    DEVICE_FLAG_RESET,
    DMA_UNMAP_FLAG_ALL,
    DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
    IO_FD_TYPE_IOEVENTFD,
    IO_FD_TYPE_IOEVENTFD_SHADOW,
    IO_FDS_HEADER_SIZE,
    IOEVENTFD_FLAG_DATAMATCH,
    IOEVENTFD_FLAG_PIO,
    MAX_MAX_DATA_XFER,
    PCI_NUM_IRQS,
    PCI_NUM_REGIONS,
    REGION_ACCESS_PREFIX,
    REGION_FLAG_CAPS,
    REGION_FLAG_MMAP,
    REGION_FLAG_READ,
    REGION_FLAG_WRITE,
    REGION_INFO_BASE_SIZE,
    VERSION_MAJOR,
    VERSION_MINOR,
    WRITE_MULTI_ENTRY_SIZE,
    WRITE_MULTI_MAX,
    WRITE_MULTI_MAX_DATA,
    Command,
    IrqIndex,
    RegionIndex,
)
from .device import Device, Region, ResetKind
from .dma import DmaError, DmaTable
from .irq import IrqError, IrqState
from .pci import EXP_DEVCTL, EXP_DEVCTL_BCR_FLR
from .protocol import Connection, Message, close_fds

log = logging.getLogger(__name__)


class VfioUserError(Exception):
    """A request that gets an error reply; ``errno`` goes on the wire."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


@dataclass
class ServerLimits:
    """Limits the server enforces and declares in its VERSION reply."""

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer: int = DEFAULT_MAX_DATA_XFER
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    pgsize: int = DEFAULT_PGSIZE
    write_multiple: bool = True
    #: Accept guest-memory memfds not sealed against shrinking (``serve --dma-unsealed``;
    #: not announced). The client could then truncate them: the SIGBUS guard absorbs that.
    dma_unsealed: bool = False

    def capabilities(self) -> dict[str, Any]:
        caps: dict[str, Any] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer,
            "max_dma_maps": self.max_dma_maps,
            "pgsizes": self.pgsize,
        }
        if self.write_multiple:
            caps["write_multiple"] = True
        return caps


@dataclass
class Reply:
    """Bytes to send in one sendmsg, with fds that stay owned by the device (never closed here)."""

    data: bytes
    fds: list[int] = field(default_factory=list)


@dataclass
class SessionStats:
    requests: int = 0
    errors: int = 0
    region_writes: int = 0
    region_reads: int = 0
    by_command: dict[int, int] = field(default_factory=dict)


def _parse(struct_: Any, payload: bytes, what: str) -> Any:
    try:
        return struct_.parse(payload)
    except (ConstructError, ValueError) as e:
        raise VfioUserError(errno.EINVAL, f"malformed {what}: {e}") from None


class ServerSession:
    """One client's view of a device: negotiation state, DMA table, IRQ eventfds."""

    def __init__(self, device: Device, limits: ServerLimits | None = None) -> None:
        self.device = device
        self.limits = limits or ServerLimits()
        self.dma = DmaTable(self.limits.max_dma_maps, self.limits.pgsize, unsealed_ok=self.limits.dma_unsealed)
        self.dma.unmap_listeners.append(device.dma_unmapping)
        self.irqs = IrqState(device.irq_counts, on_unmask=device.irq_unmasked)
        self.negotiated = False
        self.client_caps: dict[str, Any] = {}
        #: The client's limits for what we send it (DMA requests, fds per message).
        self.client_max_data_xfer = DEFAULT_MAX_DATA_XFER
        self.client_max_msg_fds = 1
        self.stats = SessionStats()
        self._handlers = {
            Command.VERSION: self._version,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._get_info,
            Command.DEVICE_GET_REGION_INFO: self._region_info,
            Command.DEVICE_GET_REGION_IO_FDS: self._region_io_fds,
            Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.DEVICE_RESET: self._reset,
            Command.REGION_WRITE_MULTI: self._write_multi,
        }
        device.config.write_hooks.append(self._config_hook)

    # -- entry point ---------------------------------------------------------------------

    def handle(self, msg: Message) -> Reply | None:
        """Serve one request; None when no reply may be sent (NO_REPLY)."""
        self.stats.requests += 1
        self.stats.by_command[msg.command] = self.stats.by_command.get(msg.command, 0) + 1
        try:
            reply = self._dispatch(msg)
        except VfioUserError as e:
            msg.close_fds()
            self.stats.errors += 1
            log.warning("command %s (id %d) refused: %s [%s]", _cmd_name(msg.command), msg.msg_id, e, errno.errorcode.get(e.errno, e.errno))
            return None if msg.no_reply else Reply(Connection.error_reply(msg, e.errno))
        except Exception:  # a device bug must not take the server down
            msg.close_fds()
            self.stats.errors += 1
            log.exception("command %s (id %d) failed in the device", _cmd_name(msg.command), msg.msg_id)
            return None if msg.no_reply else Reply(Connection.error_reply(msg, errno.EIO))
        msg.close_fds()  # whatever a handler did not take
        return None if msg.no_reply else reply

    def _dispatch(self, msg: Message) -> Reply | None:
        try:
            command = Command(msg.command)
        except ValueError:
            raise VfioUserError(errno.ENOSYS, f"unknown command {msg.command}") from None
        if command != Command.VERSION and not self.negotiated:
            raise VfioUserError(errno.EINVAL, f"{command.name} before VERSION")
        handler = self._handlers.get(command)
        if handler is None:
            raise VfioUserError(errno.ENOTSUP, f"{command.name} is not supported")
        if command not in (Command.DMA_MAP, Command.DEVICE_SET_IRQS) and msg.fds:
            raise VfioUserError(errno.EINVAL, f"{command.name} carries {len(msg.fds)} unexpected fds")
        return handler(msg)

    def close(self) -> None:
        """The client is gone: unmap everything and close its eventfds."""
        self.dma.remove_all()
        self.irqs.close()
        if self._config_hook in self.device.config.write_hooks:
            self.device.config.write_hooks.remove(self._config_hook)

    # -- negotiation -----------------------------------------------------------------

    def _version(self, msg: Message) -> Reply:
        if self.negotiated:
            raise VfioUserError(errno.EINVAL, "VERSION sent twice")
        if len(msg.payload) < 4:
            raise VfioUserError(errno.EINVAL, "short VERSION payload")
        v = m.VersionPayload.parse(msg.payload)
        if v.major != VERSION_MAJOR:
            raise VfioUserError(errno.ENOTSUP, f"unsupported major version {v.major}")
        try:
            caps = m.decode_version_json(v.json)
        except (ValueError, UnicodeDecodeError) as e:
            raise VfioUserError(errno.EINVAL, f"bad VERSION JSON: {e}") from None
        self._apply_client_caps(caps)
        self.client_caps = caps
        self.negotiated = True
        body = m.VersionPayload.build(
            {"major": VERSION_MAJOR, "minor": VERSION_MINOR, "json": m.encode_version_json(self.limits.capabilities())}
        )
        return Reply(Connection.reply(msg, body))

    def _apply_client_caps(self, caps: dict[str, Any]) -> None:
        def uint(key: str, default: int, maximum: int | None = None) -> int:
            value = caps.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (maximum is not None and value > maximum):
                raise VfioUserError(errno.EINVAL, f"bad capability {key}={value!r}")
            return value

        fds = uint("max_msg_fds", 1, 253)
        xfer = uint("max_data_xfer_size", DEFAULT_MAX_DATA_XFER, MAX_MAX_DATA_XFER)
        pgsizes = uint("pgsizes", DEFAULT_PGSIZE)
        if pgsizes == 0 or pgsizes % DEFAULT_PGSIZE:
            raise VfioUserError(errno.EINVAL, f"bad capability pgsizes={pgsizes:#x}")
        uint("max_dma_maps", DEFAULT_MAX_DMA_MAPS)
        migration = caps.get("migration", {})
        if not isinstance(migration, dict):
            raise VfioUserError(errno.EINVAL, "bad capability migration")
        if "pgsize" in migration and (not isinstance(migration["pgsize"], int) or migration["pgsize"] % DEFAULT_PGSIZE):
            raise VfioUserError(errno.EINVAL, "bad migration pgsize")
        self.client_max_msg_fds = max(1, fds)
        self.client_max_data_xfer = max(4096, xfer)

    # -- DMA ---------------------------------------------------------------------------

    def _dma_map(self, msg: Message) -> Reply:
        req = _parse(m.DmaMap, msg.payload, "DMA_MAP")
        if req.argsz < m.DmaMap.sizeof() or len(msg.payload) != m.DmaMap.sizeof():
            raise VfioUserError(errno.EINVAL, f"DMA_MAP argsz {req.argsz}")
        if len(msg.fds) > 1:
            raise VfioUserError(errno.EINVAL, f"DMA_MAP with {len(msg.fds)} fds")
        fds = msg.take_fds()
        try:
            self.dma.add(req.address, req.size, req.flags, fds[0] if fds else None, req.offset)
        except DmaError as e:
            raise VfioUserError(e.errno, str(e)) from None
        finally:
            close_fds(fds)  # the mmap (if any) keeps the memory
        return Reply(Connection.reply(msg))

    def _dma_unmap(self, msg: Message) -> Reply:
        req = _parse(m.DmaUnmap, msg.payload[: m.DmaUnmap.sizeof()], "DMA_UNMAP")
        if req.argsz < m.DmaUnmap.sizeof() or len(msg.payload) < m.DmaUnmap.sizeof():
            raise VfioUserError(errno.EINVAL, f"DMA_UNMAP argsz {req.argsz}")
        if req.flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
            raise VfioUserError(errno.ENOTSUP, "dirty page tracking is not supported")
        if req.flags & ~DMA_UNMAP_FLAG_ALL:
            raise VfioUserError(errno.EINVAL, f"bad DMA_UNMAP flags {req.flags:#x}")
        if req.flags & DMA_UNMAP_FLAG_ALL:
            if req.address or req.size:
                raise VfioUserError(errno.EINVAL, "UNMAP_ALL with an address or size")
            self.dma.remove_all()
        else:
            try:
                self.dma.remove(req.address, req.size)
            except DmaError as e:
                raise VfioUserError(e.errno, str(e)) from None
        return Reply(Connection.reply(msg, msg.payload[: m.DmaUnmap.sizeof()]))

    # -- device description ------------------------------------------------------------

    def _get_info(self, msg: Message) -> Reply:
        req = _parse(m.DeviceInfo, msg.payload, "DEVICE_GET_INFO")
        if req.argsz < m.DeviceInfo.sizeof():
            raise VfioUserError(errno.EINVAL, f"DEVICE_GET_INFO argsz {req.argsz}")
        flags = DEVICE_FLAG_PCI | (DEVICE_FLAG_RESET if self.device.supports_reset else 0)
        body = m.DeviceInfo.build({"argsz": m.DeviceInfo.sizeof(), "flags": flags, "num_regions": PCI_NUM_REGIONS, "num_irqs": PCI_NUM_IRQS})
        return Reply(Connection.reply(msg, body))

    def region(self, index: int) -> Region | None:
        return self.device.regions.get(index)

    def _region_info(self, msg: Message) -> Reply:
        req = _parse(m.RegionInfo, msg.payload, "DEVICE_GET_REGION_INFO")
        if req.argsz < REGION_INFO_BASE_SIZE:
            raise VfioUserError(errno.EINVAL, f"region info argsz {req.argsz}")
        if req.index >= PCI_NUM_REGIONS:
            raise VfioUserError(errno.EINVAL, f"bad region index {req.index}")
        if req.index == RegionIndex.CONFIG:
            body = m.RegionInfo.build(
                {
                    "argsz": REGION_INFO_BASE_SIZE,
                    "flags": REGION_FLAG_READ | REGION_FLAG_WRITE,
                    "index": req.index,
                    "cap_offset": 0,
                    "size": self.device.config.size,
                    "offset": 0,
                }
            )
            return Reply(Connection.reply(msg, body))
        region = self.region(req.index)
        if region is None:
            body = m.RegionInfo.build({"argsz": REGION_INFO_BASE_SIZE, "flags": 0, "index": req.index, "cap_offset": 0, "size": 0, "offset": 0})
            return Reply(Connection.reply(msg, body))
        flags = (REGION_FLAG_READ if region.readable else 0) | (REGION_FLAG_WRITE if region.writable else 0)
        caps = b""
        fds: list[int] = []
        if region.mmap_areas and region.memory is not None:
            flags |= REGION_FLAG_MMAP
            areas = [{"offset": o, "size": s} for o, s in region.mmap_areas]
            caps = m.SparseMmapCap.build({"next": 0, "nr_areas": len(areas), "reserved": 0, "areas": areas})
            fds = [region.memory.fd]
        needed = REGION_INFO_BASE_SIZE + len(caps)
        include_caps = bool(caps) and req.argsz >= needed
        if include_caps:
            flags |= REGION_FLAG_CAPS
        info = m.RegionInfo.build(
            {"argsz": needed, "flags": flags, "index": req.index, "cap_offset": REGION_INFO_BASE_SIZE if include_caps else 0, "size": region.size, "offset": 0}
        )
        return Reply(Connection.reply(msg, info + (caps if include_caps else b"")), fds)

    def _region_io_fds(self, msg: Message) -> Reply:
        req = _parse(m.RegionIoFdsRequest, msg.payload, "DEVICE_GET_REGION_IO_FDS")
        if len(msg.payload) != m.RegionIoFdsRequest.sizeof():
            raise VfioUserError(errno.EINVAL, "GET_REGION_IO_FDS payload size")
        if req.flags or req.count:
            raise VfioUserError(errno.EINVAL, "GET_REGION_IO_FDS flags and count must be 0")
        if req.argsz < IO_FDS_HEADER_SIZE or req.argsz > self.limits.max_data_xfer:
            raise VfioUserError(errno.EINVAL, f"GET_REGION_IO_FDS argsz {req.argsz}")
        if req.index >= PCI_NUM_REGIONS:
            raise VfioUserError(errno.EINVAL, f"bad region index {req.index}")
        region = self.region(req.index)
        efds = list(region.ioeventfds) if region is not None else []
        needed = IO_FDS_HEADER_SIZE + len(efds) * m.IoFdRecord.sizeof()
        if req.argsz < needed:
            body = m.RegionIoFdsReply.build({"argsz": needed, "flags": 0, "index": req.index, "count": len(efds), "records": b""})
            return Reply(Connection.reply(msg, body))
        fds: list[int] = []

        def fd_index(fd: int) -> int:
            if fd not in fds:
                fds.append(fd)
            return fds.index(fd)

        records = b""
        for efd in efds:
            idx = fd_index(efd.fd)
            shadow_idx = fd_index(efd.shadow.fd) if efd.shadow is not None else 0
            flags = (IOEVENTFD_FLAG_DATAMATCH if efd.datamatch is not None else 0) | (IOEVENTFD_FLAG_PIO if efd.pio else 0)
            records += m.IoFdRecord.build(
                {
                    "gpa_offset": efd.offset,
                    "size": efd.size,
                    "fd_index": idx,
                    "type": IO_FD_TYPE_IOEVENTFD_SHADOW if efd.shadow is not None else IO_FD_TYPE_IOEVENTFD,
                    "flags": flags,
                    "shadow_mem_fd_index": shadow_idx,
                    "shadow_offset": efd.shadow_offset,
                    "datamatch": efd.datamatch or 0,
                }
            )
        body = m.RegionIoFdsReply.build({"argsz": needed, "flags": 0, "index": req.index, "count": len(efds), "records": records})
        if efds:
            self.device.ioeventfds_taken(req.index)
        return Reply(Connection.reply(msg, body), fds)

    # -- interrupts ----------------------------------------------------------------------

    def _irq_info(self, msg: Message) -> Reply:
        req = _parse(m.IrqInfo, msg.payload, "DEVICE_GET_IRQ_INFO")
        if req.argsz < m.IrqInfo.sizeof():
            raise VfioUserError(errno.EINVAL, f"irq info argsz {req.argsz}")
        if req.index >= PCI_NUM_IRQS:
            raise VfioUserError(errno.EINVAL, f"bad IRQ index {req.index}")
        index = IrqIndex(req.index)
        body = m.IrqInfo.build({"argsz": m.IrqInfo.sizeof(), "flags": self.irqs.info_flags(index), "index": index, "count": self.irqs.counts[index]})
        return Reply(Connection.reply(msg, body))

    def _set_irqs(self, msg: Message) -> Reply:
        if len(msg.payload) < 20:
            raise VfioUserError(errno.EINVAL, "short SET_IRQS")
        req = _parse(m.SetIrqs, msg.payload, "DEVICE_SET_IRQS")
        if req.argsz < 20:
            raise VfioUserError(errno.EINVAL, f"SET_IRQS argsz {req.argsz}")
        fds = msg.take_fds()
        try:
            self.irqs.set_irqs(req.flags, req.index, req.start, req.count, fds, req.data)
        except IrqError as e:
            raise VfioUserError(e.errno, str(e)) from None
        return Reply(Connection.reply(msg))

    # -- region access -------------------------------------------------------------------

    def _check_access(self, index: int, offset: int, count: int) -> Region | None:
        if count > self.limits.max_data_xfer:
            raise VfioUserError(errno.E2BIG, f"access of {count} bytes exceeds {self.limits.max_data_xfer}")
        if index == RegionIndex.CONFIG:
            size = self.device.config.size
            region = None
        else:
            region = self.region(index)
            if region is None:
                raise VfioUserError(errno.EINVAL, f"no region {index}")
            size = region.size
        if offset + count > size or count == 0:
            raise VfioUserError(errno.EINVAL, f"access {offset:#x}+{count} outside region {index} ({size:#x} bytes)")
        return region

    def _region_read(self, msg: Message) -> Reply:
        if len(msg.payload) != REGION_ACCESS_PREFIX:
            raise VfioUserError(errno.EINVAL, "REGION_READ payload size")
        offset, index, count = m.REGION_ACCESS.unpack_from(msg.payload)
        region = self._check_access(index, offset, count)
        self.stats.region_reads += 1
        data = self.device.config.read(offset, count) if region is None else self._device_read(region, offset, count)
        if len(data) != count:
            raise VfioUserError(errno.EIO, f"device returned {len(data)} of {count} bytes")
        return Reply(Connection.reply(msg, msg.payload + data))

    @staticmethod
    def _device_read(region: Region, offset: int, count: int) -> bytes:
        try:
            return region.do_read(offset, count)
        except PermissionError as e:
            raise VfioUserError(errno.EPERM, str(e)) from None

    def _region_write(self, msg: Message) -> Reply:
        if len(msg.payload) < REGION_ACCESS_PREFIX:
            raise VfioUserError(errno.EINVAL, "short REGION_WRITE")
        offset, index, count = m.REGION_ACCESS.unpack_from(msg.payload)
        if len(msg.payload) != REGION_ACCESS_PREFIX + count:
            raise VfioUserError(errno.EINVAL, f"REGION_WRITE count {count} but {len(msg.payload) - REGION_ACCESS_PREFIX} data bytes")
        self._write(index, offset, msg.payload[REGION_ACCESS_PREFIX:])
        return Reply(Connection.reply(msg, msg.payload[:REGION_ACCESS_PREFIX]))

    def _write(self, index: int, offset: int, data: bytes) -> None:
        region = self._check_access(index, offset, len(data))
        self.stats.region_writes += 1
        if region is None:
            self.device.config.write(offset, data)
            return
        try:
            region.do_write(offset, data)
        except PermissionError as e:
            raise VfioUserError(errno.EPERM, str(e)) from None

    def _write_multi(self, msg: Message) -> Reply:
        if len(msg.payload) < 8:
            raise VfioUserError(errno.EINVAL, "short REGION_WRITE_MULTI")
        count = int.from_bytes(msg.payload[:8], "little")
        if count == 0 or count > WRITE_MULTI_MAX or len(msg.payload) != 8 + count * WRITE_MULTI_ENTRY_SIZE:
            raise VfioUserError(errno.EINVAL, f"REGION_WRITE_MULTI of {count} entries in {len(msg.payload)} bytes")
        req = _parse(m.WriteMulti, msg.payload, "REGION_WRITE_MULTI")
        for entry in req.entries:  # validate all before applying any
            if entry.count == 0 or entry.count > WRITE_MULTI_MAX_DATA:
                raise VfioUserError(errno.EINVAL, f"REGION_WRITE_MULTI entry count {entry.count}")
            self._check_access(entry.region, entry.offset, entry.count)
        for entry in req.entries:
            self._write(entry.region, entry.offset, entry.data[: entry.count])
        return Reply(Connection.reply(msg, msg.payload[:8]))

    # -- reset ---------------------------------------------------------------------------

    def _reset(self, msg: Message) -> Reply:
        if msg.payload:
            raise VfioUserError(errno.EINVAL, "DEVICE_RESET takes no payload")
        self.device_reset(ResetKind.DEVICE)
        return Reply(Connection.reply(msg))

    def device_reset(self, kind: ResetKind) -> None:
        self.device.config.reset_registers()
        self.device.reset(kind)

    def _config_hook(self, offset: int, old: int, new: int) -> None:
        exp = self.device.config.exp_offset
        if exp is not None and offset == exp + EXP_DEVCTL and new & EXP_DEVCTL_BCR_FLR:
            log.info("function-level reset requested")
            self.device_reset(ResetKind.FLR)
            return
        self.device.config_written(offset, old, new)


def _cmd_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return str(command)
