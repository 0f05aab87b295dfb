"""Malformed requests, table-driven: each gets its error reply with the right errno (or, when
sent NO_REPLY, no reply at all), its fds are closed by the server, and the server answers the
next valid request on the same connection."""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

import pytest

from vfio_user import messages as m
from vfio_user.vmm.client import QEMU_CAPABILITIES, VfioUserClient
from vfio_user.constants import (
    DEFAULT_MAX_DATA_XFER,
    IRQ_ACTION_MASK,
    IRQ_ACTION_TRIGGER,
    IRQ_ACTION_UNMASK,
    IRQ_DATA_BOOL,
    IRQ_DATA_EVENTFD,
    IRQ_DATA_NONE,
    MESSAGE_OVERHEAD,
    Command,
    IrqIndex,
)
from vfio_user.sample import REG_ID, REG_SCRATCH, TICKER_ID

from ..support.fds import new_eventfd
from .vu_helpers import assert_error, exchange, read32, send_bytes, send_posted

C = Command
MSIX, INTX = IrqIndex.MSIX, IrqIndex.INTX


def dma_map(argsz=32, flags=3, offset=0, address=0x100000, size=0x1000):
    return m.DmaMap.build({"argsz": argsz, "flags": flags, "offset": offset, "address": address, "size": size})


def dma_unmap(argsz=24, flags=0, address=0x100000, size=0x1000):
    return m.DmaUnmap.build({"argsz": argsz, "flags": flags, "address": address, "size": size})


def info(argsz=16):
    return m.DeviceInfo.build({"argsz": argsz, "flags": 0, "num_regions": 0, "num_irqs": 0})


def rinfo(index=0, argsz=32):
    return m.RegionInfo.build({"argsz": argsz, "flags": 0, "index": index, "cap_offset": 0, "size": 0, "offset": 0})


def iofds(index=0, argsz=16, flags=0, count=0):
    return m.RegionIoFdsRequest.build({"argsz": argsz, "flags": flags, "index": index, "count": count})


def irqinfo(index=0, argsz=16):
    return m.IrqInfo.build({"argsz": argsz, "flags": 0, "index": index, "count": 0})


def setirqs(flags, index, start, count, data=b"", argsz=None):
    return m.SetIrqs.build({"argsz": 20 + len(data) if argsz is None else argsz, "flags": flags, "index": index, "start": start, "count": count, "data": data})


def rread(region, offset, count):
    return m.REGION_ACCESS.pack(offset, region, count)


def rwrite(region, offset, data, count=None):
    return m.REGION_ACCESS.pack(offset, region, len(data) if count is None else count) + data


def multi(entries, wr_cnt=None):
    body = b"".join(struct.pack("<QII", off, reg, cnt) + data.ljust(8, b"\0") for reg, off, cnt, data in entries)
    return struct.pack("<Q", len(entries) if wr_cnt is None else wr_cnt) + body


def version(major=0, minor=0, caps=None, raw=None):
    js = raw if raw is not None else m.encode_version_json(QEMU_CAPABILITIES if caps is None else caps)
    return struct.pack("<HH", major, minor) + js


@dataclass
class Case:
    id: str
    command: int
    payload: bytes
    err: int
    nfds: int = 0
    size: int | None = None  # header size field override
    negotiated: bool = True


BIG = DEFAULT_MAX_DATA_XFER + MESSAGE_OVERHEAD + 1  # one byte past what the server accepts

CASES = [
    # -- truncated or padded payloads, per command
    Case("version-short", C.VERSION, b"\0\0\0", errno.EINVAL, negotiated=False),
    Case("dma-map-short", C.DMA_MAP, dma_map()[:31], errno.EINVAL),
    Case("dma-map-half", C.DMA_MAP, dma_map()[:16], errno.EINVAL),
    Case("dma-map-long", C.DMA_MAP, dma_map() + bytes(8), errno.EINVAL),
    Case("dma-map-empty", C.DMA_MAP, b"", errno.EINVAL),
    Case("dma-unmap-short", C.DMA_UNMAP, dma_unmap()[:23], errno.EINVAL),
    Case("get-info-short", C.DEVICE_GET_INFO, info()[:15], errno.EINVAL),
    Case("get-info-empty", C.DEVICE_GET_INFO, b"", errno.EINVAL),
    Case("region-info-short", C.DEVICE_GET_REGION_INFO, rinfo()[:31], errno.EINVAL),
    Case("io-fds-short", C.DEVICE_GET_REGION_IO_FDS, iofds()[:15], errno.EINVAL),
    Case("io-fds-long", C.DEVICE_GET_REGION_IO_FDS, iofds() + bytes(4), errno.EINVAL),
    Case("irq-info-short", C.DEVICE_GET_IRQ_INFO, irqinfo()[:15], errno.EINVAL),
    Case("set-irqs-short", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, 0, 0, 0)[:19], errno.EINVAL),
    Case("set-irqs-bool-short", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_BOOL | IRQ_ACTION_TRIGGER, MSIX, 0, 2, b"\1"), errno.EINVAL),
    Case("region-read-short", C.REGION_READ, rread(0, 0, 4)[:15], errno.EINVAL),
    Case("region-read-long", C.REGION_READ, rread(0, 0, 4) + bytes(4), errno.EINVAL),
    Case("region-write-short", C.REGION_WRITE, rwrite(0, 4, b"")[:15], errno.EINVAL),
    Case("region-write-data-short", C.REGION_WRITE, rwrite(0, 4, b"abc", count=4), errno.EINVAL),
    Case("region-write-data-long", C.REGION_WRITE, rwrite(0, 4, b"abcde", count=4), errno.EINVAL),
    Case("write-multi-short", C.REGION_WRITE_MULTI, b"\1\0\0\0\0\0\0", errno.EINVAL),
    Case("write-multi-missing-entry", C.REGION_WRITE_MULTI, multi([(0, REG_SCRATCH, 4, b"abcd")], wr_cnt=2), errno.EINVAL),
    Case("write-multi-zero", C.REGION_WRITE_MULTI, multi([]), errno.EINVAL),
    Case("write-multi-201", C.REGION_WRITE_MULTI, multi([(0, REG_SCRATCH, 4, b"abcd")] * 201), errno.EINVAL),
    Case("write-multi-count-9", C.REGION_WRITE_MULTI, multi([(0, REG_SCRATCH, 9, b"abcd")]), errno.EINVAL),
    Case("write-multi-count-0", C.REGION_WRITE_MULTI, multi([(0, REG_SCRATCH, 0, b"")]), errno.EINVAL),
    Case("write-multi-oob", C.REGION_WRITE_MULTI, multi([(0, REG_SCRATCH, 4, b"abcd"), (0, 30, 4, b"abcd")]), errno.EINVAL),
    Case("reset-with-payload", C.DEVICE_RESET, b"\0\0\0\0", errno.EINVAL),
    # -- bad argsz
    Case("dma-map-argsz", C.DMA_MAP, dma_map(argsz=24), errno.EINVAL),
    Case("dma-unmap-argsz", C.DMA_UNMAP, dma_unmap(argsz=16), errno.EINVAL),
    Case("get-info-argsz", C.DEVICE_GET_INFO, info(argsz=15), errno.EINVAL),
    Case("region-info-argsz", C.DEVICE_GET_REGION_INFO, rinfo(argsz=31), errno.EINVAL),
    Case("io-fds-argsz", C.DEVICE_GET_REGION_IO_FDS, iofds(argsz=15), errno.EINVAL),
    Case("irq-info-argsz", C.DEVICE_GET_IRQ_INFO, irqinfo(argsz=15), errno.EINVAL),
    Case("set-irqs-argsz", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, 0, 0, 0, argsz=19), errno.EINVAL),
    # -- region access
    Case("read-past-bar0", C.REGION_READ, rread(0, 30, 4), errno.EINVAL),
    Case("read-past-config", C.REGION_READ, rread(7, 4095, 2), errno.EINVAL),
    Case("read-offset-wraps", C.REGION_READ, rread(0, (1 << 64) - 2, 4), errno.EINVAL),
    Case("read-absent-region", C.REGION_READ, rread(3, 0, 4), errno.EINVAL),
    Case("read-rom-absent", C.REGION_READ, rread(6, 0, 4), errno.EINVAL),
    Case("read-region-9", C.REGION_READ, rread(9, 0, 4), errno.EINVAL),
    Case("read-zero-length", C.REGION_READ, rread(0, 0, 0), errno.EINVAL),
    Case("read-too-big", C.REGION_READ, rread(7, 0, DEFAULT_MAX_DATA_XFER + 1), errno.E2BIG),
    Case("write-past-bar1", C.REGION_WRITE, rwrite(1, 4093, b"abcd"), errno.EINVAL),
    Case("write-absent-region", C.REGION_WRITE, rwrite(5, 0, b"abcd"), errno.EINVAL),
    Case("write-zero-length", C.REGION_WRITE, rwrite(0, 4, b""), errno.EINVAL),
    # -- SET_IRQS index, range and flag combinations
    Case("irq-info-bad-index", C.DEVICE_GET_IRQ_INFO, irqinfo(index=5), errno.EINVAL),
    Case("set-irqs-bad-index", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, 5, 0, 0), errno.EINVAL),
    Case("set-irqs-msi-no-vectors", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, IrqIndex.MSI, 0, 1), errno.EINVAL),
    Case("set-irqs-range", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, MSIX, 1, 2), errno.EINVAL),
    Case("set-irqs-start-past-end", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, MSIX, 3, 0), errno.EINVAL),
    Case("set-irqs-start-huge", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, MSIX, 0xFFFFFFFF, 1), errno.EINVAL),
    Case("set-irqs-no-flags", C.DEVICE_SET_IRQS, setirqs(0, MSIX, 0, 1), errno.EINVAL),
    Case("set-irqs-two-data-types", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_NONE | IRQ_DATA_BOOL | IRQ_ACTION_TRIGGER, MSIX, 0, 1, b"\1"), errno.EINVAL),
    Case("set-irqs-two-actions", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_NONE | IRQ_ACTION_MASK | IRQ_ACTION_UNMASK, INTX, 0, 1), errno.EINVAL),
    Case("set-irqs-no-action", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_NONE, INTX, 0, 1), errno.EINVAL),
    Case("set-irqs-unknown-flag", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER | 0x40, INTX, 0, 1), errno.EINVAL),
    Case("set-irqs-mask-eventfd", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_EVENTFD | IRQ_ACTION_MASK, INTX, 0, 1), errno.EINVAL, nfds=1),
    Case("set-irqs-fds-without-eventfd", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, MSIX, 0, 1), errno.EINVAL, nfds=1),
    Case("set-irqs-fd-count-mismatch", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, MSIX, 0, 1), errno.EINVAL, nfds=2),
    Case("set-irqs-unmask-eventfd-msix", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_EVENTFD | IRQ_ACTION_UNMASK, MSIX, 0, 1), errno.EINVAL, nfds=1),
    # -- fds where none belong, too many fds
    Case("fd-on-region-read", C.REGION_READ, rread(0, 0, 4), errno.EINVAL, nfds=1),
    Case("fds-on-get-info", C.DEVICE_GET_INFO, info(), errno.EINVAL, nfds=2),
    Case("fd-on-reset", C.DEVICE_RESET, b"", errno.EINVAL, nfds=1),
    Case("fd-on-dma-unmap", C.DMA_UNMAP, dma_unmap(), errno.EINVAL, nfds=1),
    Case("fd-on-unknown", 99, b"", errno.ENOSYS, nfds=1),
    Case("dma-map-9-fds", C.DMA_MAP, dma_map(), errno.EINVAL, nfds=9),
    Case("set-irqs-9-fds", C.DEVICE_SET_IRQS, setirqs(IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, MSIX, 0, 2), errno.EINVAL, nfds=9),
    # -- oversized, unknown, unsupported
    Case("oversized", C.REGION_WRITE, rwrite(1, 0, bytes(BIG - 32)), errno.E2BIG),
    Case("oversized-with-fd", C.DMA_MAP, dma_map() + bytes(BIG - 48), errno.E2BIG, nfds=1),
    Case("unknown-99", 99, b"", errno.ENOSYS),
    Case("unknown-65535", 0xFFFF, bytes(8), errno.ENOSYS),
    Case("dirty-pages", C.DIRTY_PAGES, bytes(16), errno.ENOTSUP),
    Case("device-feature", C.DEVICE_FEATURE, bytes(8), errno.ENOTSUP),
    # -- negotiation
    Case("before-version", C.DEVICE_GET_INFO, info(), errno.EINVAL, negotiated=False),
    Case("dma-map-before-version", C.DMA_MAP, dma_map(), errno.EINVAL, nfds=1, negotiated=False),
    Case("version-twice", C.VERSION, version(), errno.EINVAL),
    Case("version-major-1", C.VERSION, version(major=1), errno.ENOTSUP, negotiated=False),
    Case("json-no-nul", C.VERSION, version(raw=b'{"capabilities":{}}'), errno.EINVAL, negotiated=False),
    Case("json-not-object", C.VERSION, version(raw=b"[1,2,3]\0"), errno.EINVAL, negotiated=False),
    Case("json-caps-not-object", C.VERSION, version(raw=b'{"capabilities":7}\0'), errno.EINVAL, negotiated=False),
    Case("json-syntax", C.VERSION, version(raw=b'{"capabilities":\0'), errno.EINVAL, negotiated=False),
    Case("json-not-utf8", C.VERSION, version(raw=b'{"capabilities":{"x":"\xff\xfe"}}\0'), errno.EINVAL, negotiated=False),
    Case("max-msg-fds-string", C.VERSION, version(caps={"max_msg_fds": "8"}), errno.EINVAL, negotiated=False),
    Case("max-msg-fds-negative", C.VERSION, version(caps={"max_msg_fds": -1}), errno.EINVAL, negotiated=False),
    Case("max-msg-fds-bool", C.VERSION, version(caps={"max_msg_fds": True}), errno.EINVAL, negotiated=False),
    Case("max-msg-fds-huge", C.VERSION, version(caps={"max_msg_fds": 100000}), errno.EINVAL, negotiated=False),
    Case("pgsizes-zero", C.VERSION, version(caps={"pgsizes": 0}), errno.EINVAL, negotiated=False),
    Case("pgsizes-odd", C.VERSION, version(caps={"pgsizes": 4095}), errno.EINVAL, negotiated=False),
    Case("pgsizes-float", C.VERSION, version(caps={"pgsizes": 4096.0}), errno.EINVAL, negotiated=False),
    Case("max-data-xfer-huge", C.VERSION, version(caps={"max_data_xfer_size": 1 << 40}), errno.EINVAL, negotiated=False),
    Case("migration-not-object", C.VERSION, version(caps={"migration": []}), errno.EINVAL, negotiated=False),
    Case("migration-pgsize", C.VERSION, version(caps={"migration": {"pgsize": 100}}), errno.EINVAL, negotiated=False),
]


def _next_valid_request_works(client: VfioUserClient, negotiated: bool) -> None:
    if not negotiated:
        client.negotiate()  # a failed VERSION leaves the session able to negotiate
    assert read32(client, 0, REG_ID) == TICKER_ID
    write32 = lambda v: client.region_write(0, REG_SCRATCH, v.to_bytes(4, "little"))  # noqa: E731
    write32(0x5A5A)
    assert read32(client, 0, REG_SCRATCH) == 0x5A5A
    assert client._events == [], f"unexpected extra messages from the server: {client._events}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_gets_error_and_connection_survives(server, case: Case):
    client = server.connect(negotiate=case.negotiated)
    try:
        if not case.negotiated:  # one round trip, so the server has accepted us before we count
            assert_error(exchange(client, Command.DEVICE_GET_INFO, info()), errno.EINVAL)
        base = server.fd_count()
        fds = [new_eventfd() for _ in range(case.nfds)]
        try:
            reply = exchange(client, case.command, case.payload, fds, size=case.size)
        finally:
            for fd in fds:
                os.close(fd)
        assert_error(reply, case.err)
        assert server.fd_count() == base, "the server kept fds of a refused request"
        _next_valid_request_works(client, case.negotiated)
    finally:
        client.close()


NO_REPLY_CASES = [c for c in CASES if c.negotiated and c.id != "version-twice"]


@pytest.mark.parametrize("case", NO_REPLY_CASES, ids=[c.id for c in NO_REPLY_CASES])
def test_failed_no_reply_request_gets_no_reply(server, case: Case):
    client = server.connect()
    try:
        base = server.fd_count()
        fds = [new_eventfd() for _ in range(case.nfds)]
        try:
            send_posted(client, case.command, case.payload, fds, size=case.size)
        finally:
            for fd in fds:
                os.close(fd)
        # The very next message from the server must be the reply to this read.
        reply = exchange(client, Command.REGION_READ, m.REGION_ACCESS.pack(REG_ID, 0, 4))
        assert not reply.is_error and reply.payload[16:] == TICKER_ID.to_bytes(4, "little")
        assert client._events == [], f"the server replied to a NO_REPLY request: {client._events}"
        assert server.fd_count() == base
        _next_valid_request_works(client, True)
    finally:
        client.close()


def test_write_multi_validates_all_entries_before_applying(client):
    client.region_write(0, REG_SCRATCH, (1).to_bytes(4, "little"))
    reply = exchange(client, Command.REGION_WRITE_MULTI, multi([(0, REG_SCRATCH, 4, (2).to_bytes(4, "little")), (0, 64, 4, b"abcd")]))
    assert_error(reply, errno.EINVAL)
    assert read32(client, 0, REG_SCRATCH) == 1


def test_oversized_message_sent_in_pieces_stays_in_sync(client):
    """The body of a refused message arrives over many recvs; the server skips exactly it."""
    msg_id = client.conn.request(Command.REGION_WRITE)[0]
    body = bytes(BIG - 16)
    send_bytes(client, struct.pack("<HHIII", msg_id, Command.REGION_WRITE, BIG, 0, 0) + body[:1000])
    for i in range(1000, len(body), 65536):
        client.sock.sendall(body[i : i + 65536])
    assert_error(client.wait_reply(msg_id), errno.E2BIG)
    assert read32(client, 0, REG_ID) == TICKER_ID


@pytest.mark.parametrize("size", [0, 8, 15])
def test_header_size_below_16_drops_connection_and_server_keeps_serving(server, size):
    client = server.connect()
    try:
        client.region_write(0, REG_SCRATCH, (0x77).to_bytes(4, "little"))
        client.sock.sendall(struct.pack("<HHIII", 500, Command.REGION_READ, size, 0, 0) + bytes(16))
        with pytest.raises((ConnectionError, OSError)):
            client.request(Command.REGION_READ, m.REGION_ACCESS.pack(REG_ID, 0, 4))
    finally:
        client.close()
    again = server.connect()
    try:
        assert read32(again, 0, REG_SCRATCH) == 0x77
    finally:
        again.close()


def test_unknown_message_type_drops_connection(server):
    client = server.connect()
    try:
        client.sock.sendall(struct.pack("<HHIII", 1, Command.REGION_READ, 32, 0x3, 0) + m.REGION_ACCESS.pack(0, 0, 4))
        with pytest.raises((ConnectionError, OSError)):
            client.request(Command.REGION_READ, m.REGION_ACCESS.pack(REG_ID, 0, 4))
    finally:
        client.close()
    again = server.connect()
    again.close()


def test_unexpected_reply_from_client_is_ignored(client):
    """A reply the server never asked for is dropped (its fds closed); the stream goes on."""
    fd = new_eventfd()
    try:
        client.send_raw(struct.pack("<HHIII", 1234, Command.DMA_READ, 16 + 8, 0x1, 0) + bytes(8), [fd])
    finally:
        os.close(fd)
    assert read32(client, 0, REG_ID) == TICKER_ID
    assert client._events == []


def test_half_sent_message_then_disconnect(server):
    """A client that dies mid-message (fds already sent) leaks nothing in the server."""
    client = server.connect()
    fd = new_eventfd()
    try:
        client.send_raw(struct.pack("<HHIII", 77, Command.DMA_MAP, 48, 0, 0) + dma_map()[:10], [fd])
    finally:
        os.close(fd)
        client.close()
    # the server fixture checks at teardown that the fd count is back to its baseline
