"""Raw vfio-user bytes on a plain socket, for tests that must send what no client would:
half a header, a trickled VERSION, a stall. Real clients use ``vfio_user.vmm.client``."""

from __future__ import annotations

import socket
import time

import pytest

from vfio_user import messages as m
from vfio_user.constants import HEADER_SIZE, Command, MsgType
from vfio_user.protocol import encode

from .server import DEADLINE


def version_request(msg_id: int = 0) -> bytes:
    """A whole VERSION request (the first message every client sends)."""
    payload = m.VersionPayload.build({"major": 0, "minor": 0, "json": m.encode_version_json({"max_msg_fds": 8})})
    return encode(msg_id, Command.VERSION, MsgType.REQUEST, payload)


def _recv_exactly(s: socket.socket, count: int) -> bytes:
    buf = b""
    while len(buf) < count:
        chunk = s.recv(count - len(buf))
        assert chunk, "server closed the connection"
        buf += chunk
    return buf


def read_reply(s: socket.socket, timeout: float = DEADLINE) -> tuple[int, int, bytes]:
    """One whole message from the server: (id, flags, payload)."""
    s.settimeout(timeout)
    msg_id, _cmd, size, flags, _err = m.HEADER.unpack(_recv_exactly(s, HEADER_SIZE))
    return msg_id, flags, _recv_exactly(s, size - HEADER_SIZE)


def seconds_until_dropped(s: socket.socket, limit: float = DEADLINE) -> float:
    """How long until the server closes ``s`` (EOF or reset); fails if it never does within ``limit``."""
    t0 = time.monotonic()
    s.settimeout(limit)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except (TimeoutError, socket.timeout):
        pytest.fail(f"the server kept a stalled client for {limit} s")
    return time.monotonic() - t0
