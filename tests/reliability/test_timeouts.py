"""The one client slot cannot be held by a client that never speaks or stops mid-message.

The server (a separate process, ``--handshake-timeout 0.5``) must drop a client that has not
finished VERSION within that time, and one that stops inside a message (half a header, half
a body) for that long, and then let the next client attach. A client that finished VERSION
and simply sends nothing (a VMM is idle for long stretches) stays, and so does one that sends
a message slowly but keeps making progress.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

from ..support.server import DEADLINE, ServerProcess
from ..support.wire import read_reply, seconds_until_dropped, version_request
from vfio_user import messages as m
from vfio_user.vmm.client import VfioUserClient
from vfio_user.constants import HEADER_SIZE, Command, MsgType
from vfio_user.protocol import encode

TIMEOUT = 0.5


@pytest.fixture
def server(spawn) -> ServerProcess:
    srv = spawn("ram:size=16M", extra=["--handshake-timeout", str(TIMEOUT), "--queues", "2"])
    srv.settle()
    return srv


def _connect(srv: ServerProcess) -> socket.socket:
    srv.wait_idle()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(srv.path)
    return s


def _slot_is_free(srv: ServerProcess) -> None:
    """Dropped means gone: baseline fds, and a new client negotiates and reads CAP."""
    assert srv.alive(), srv.log()[-3000:]
    srv.wait_idle()
    assert srv.wait_fds() == srv.baseline_fds, "\n".join(srv.fds())
    assert srv.answers()


def test_silent_client_is_dropped_and_the_slot_freed(server):
    s = _connect(server)
    try:
        took = seconds_until_dropped(s)
    finally:
        s.close()
    assert TIMEOUT * 0.8 <= took < TIMEOUT + 2.0, took
    server.wait_log("no VERSION")
    _slot_is_free(server)


def test_half_a_header_is_dropped(server):
    s = _connect(server)
    try:
        s.sendall(version_request()[:7])
        took = seconds_until_dropped(s)
    finally:
        s.close()
    assert took < TIMEOUT + 2.0, took
    _slot_is_free(server)


def test_client_stalled_mid_message_after_version_is_dropped(server):
    """Negotiated, then half a header; and (new connection) a header and half a body."""
    for cut in (HEADER_SIZE // 2, HEADER_SIZE + 5):
        s = _connect(server)
        try:
            s.sendall(version_request())
            assert read_reply(s)[0] == 0
            req = encode(1, Command.REGION_WRITE, MsgType.REQUEST, m.REGION_ACCESS.pack(0x14, 0, 4) + bytes(4))
            s.sendall(req[:cut])
            took = seconds_until_dropped(s)
        finally:
            s.close()
        assert TIMEOUT * 0.8 <= took < TIMEOUT + 2.0, (cut, took)
        server.wait_log("stalled", cut // HEADER_SIZE + 1)
        _slot_is_free(server)


def test_idle_client_after_version_is_kept(server):
    """A VMM sends nothing for long stretches: after VERSION, silence is not a stall."""
    c = VfioUserClient(server.path, timeout=DEADLINE)
    try:
        c.negotiate()
        time.sleep(TIMEOUT * 4)
        assert struct.unpack("<Q", c.region_read(0, 0, 8))[0] & 0xFFFF == 4095
        time.sleep(TIMEOUT * 2)
        assert struct.unpack("<Q", c.region_read(0, 0, 8))[0] & 0xFFFF == 4095
    finally:
        c.close()
    assert "no VERSION" not in server.log() and "stalled" not in server.log()
    _slot_is_free(server)


def test_slow_but_progressing_client_is_kept(server):
    """A request trickled in 4-byte pieces every 0.6 x timeout (2.4 x timeout in all), after a
    VERSION sent in two halves: every piece is progress, so the client is served. (libvfio-user
    reads the VERSION header in one recv right after accept and refuses a partial one, so there
    the VERSION is cut after its header; docs/libvfio-user.md.)"""
    s = _connect(server)
    try:
        v = version_request()
        cut = HEADER_SIZE + 4 if server.backend == "libvfio-user" else 10
        s.sendall(v[:cut])
        time.sleep(TIMEOUT * 0.4)
        s.sendall(v[cut:])
        assert read_reply(s)[0] == 0
        req = encode(1, Command.REGION_READ, MsgType.REQUEST, m.REGION_ACCESS.pack(0, 0, 8))
        assert len(req) == 32
        for off in range(0, len(req), 4):
            s.sendall(req[off : off + 4])
            time.sleep(TIMEOUT * 0.6)
        msg_id, flags, body = read_reply(s)
        assert msg_id == 1 and flags == MsgType.REPLY
        assert struct.unpack_from("<Q", body, 16)[0] & 0xFFFF == 4095
    finally:
        s.close()
    assert "stalled" not in server.log()
    _slot_is_free(server)
