"""Helpers for the vfio_user tests: the sample device's registers, hand-made messages."""

from __future__ import annotations

import errno

from vfio_user.constants import FLAG_NO_REPLY, HEADER_SIZE
from vfio_user.messages import HEADER
from vfio_user.vmm.client import VfioUserClient


def ticker_ring(client: VfioUserClient, value: int, *, posted: bool = False) -> None:
    """Write the sample device's DOORBELL register (raises vector ``value & 1``)."""
    client.region_write(0, 0x8, value.to_bytes(4, "little"), posted=posted)


def u32(data: bytes) -> int:
    return int.from_bytes(data, "little")


def read32(client: VfioUserClient, region: int, offset: int) -> int:
    return u32(client.region_read(region, offset, 4))


def write32(client: VfioUserClient, region: int, offset: int, value: int, *, posted: bool = False) -> None:
    client.region_write(region, offset, value.to_bytes(4, "little"), posted=posted)


def exchange(client: VfioUserClient, command: int, payload: bytes = b"", fds=(), *, flags: int = 0, size: int | None = None):
    """Send one hand-made request and return its reply Message, error replies included.

    ``size`` overrides the header's size field (for malformed messages).
    """
    msg_id = client.conn.request(command)[0]  # allocate an id the client will expect a reply to
    hdr = HEADER.pack(msg_id, command, HEADER_SIZE + len(payload) if size is None else size, flags, 0)
    send_bytes(client, hdr + payload, fds)
    return client.wait_reply(msg_id)


def send_bytes(client: VfioUserClient, data: bytes, fds=()) -> None:
    """Raw bytes on the client's socket; fds (if any) ride on the first byte."""
    fds = list(fds)
    if fds:
        client.send_raw(data, fds)
    else:
        client.sock.sendall(data)


def send_posted(client: VfioUserClient, command: int, payload: bytes = b"", fds=(), *, size: int | None = None) -> int:
    """Send a NO_REPLY request by hand; returns its id (no reply is expected for it)."""
    msg_id = client.conn.request(command, no_reply=True)[0]
    send_bytes(client, HEADER.pack(msg_id, command, HEADER_SIZE + len(payload) if size is None else size, FLAG_NO_REPLY, 0) + payload, fds)
    return msg_id


def assert_error(reply, err: int) -> None:
    assert reply.is_reply and reply.is_error, f"expected error {errno.errorcode[err]}, got a success reply"
    assert reply.error_no == err, f"expected {errno.errorcode[err]}, got {errno.errorcode.get(reply.error_no, reply.error_no)}"
    assert reply.payload == b"" and reply.fds == []
