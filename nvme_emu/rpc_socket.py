"""JSON-RPC over a Unix socket: the asyncio server (on the device's own event loop) and a
small blocking client. Generic; the messages are :mod:`nvme_emu.jsonrpc`'s.

The socket never exists with wider permissions than asked (the same listener as the
vfio-user socket's), owner-only by default: whoever can connect can remove namespaces and
break the device on purpose.

Replies are flow-controlled: a client that sends requests and does not read the answers is
no longer read from once :data:`REPLY_HIGH_WATER` bytes of replies wait for it (its requests
then wait in its own socket), and it is dropped if they keep waiting for
:data:`DRAIN_TIMEOUT`. Without that, one such client grew the server by 405 MiB in 10 s
(issue 22, finding 8).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import socket
from typing import Any

from vfio_user.unix import listen_unix

from .jsonrpc import Dispatcher, LineBuffer, RpcError, decode_response, encode_request

log = logging.getLogger(__name__)

#: How long the client waits for an answer (a method runs on the device's loop: quick).
CLIENT_TIMEOUT = 30.0
#: Replies queued for one client above which the server stops reading its requests, and
#: below which it reads again: a client that does not read holds at most this much (plus
#: one reply, and the requests of one read) of the server's memory.
REPLY_HIGH_WATER = 256 << 10
REPLY_LOW_WATER = 64 << 10
#: How long replies may stay above the high-water mark before their client is dropped (a
#: client waits this long for an answer itself).
DRAIN_TIMEOUT = CLIENT_TIMEOUT


class _Connection(asyncio.Protocol):
    """One client: lines in, each answered in order (methods are synchronous), no more
    than the client reads (see the module docstring)."""

    def __init__(self, dispatcher: Dispatcher, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        self.dispatcher = dispatcher
        self.drain_timeout = drain_timeout
        self.buffer = LineBuffer()
        #: Request lines received but not answered yet (the replies wait for the client).
        self.pending: collections.deque[bytes] = collections.deque()
        self.paused = False
        self._drain_timer: asyncio.TimerHandle | None = None
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=REPLY_HIGH_WATER, low=REPLY_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            self.pending.extend(self.buffer.feed(data))
        except RpcError as e:
            log.warning("control client dropped: %s", e)
            self.transport.close()
            return
        self._answer()

    def _answer(self) -> None:
        """Answer the pending requests in order until the client's replies back up."""
        while self.pending and not self.paused and not self.transport.is_closing():
            response = self.dispatcher.handle(self.pending.popleft())
            if response is not None:
                self.transport.write(response)  # may call pause_writing()

    def pause_writing(self) -> None:
        """Replies above the high-water mark: read no more requests until they drain."""
        self.paused = True
        self.transport.pause_reading()
        self._drain_timer = asyncio.get_running_loop().call_later(self.drain_timeout, self._not_drained)

    def resume_writing(self) -> None:
        self.paused = False
        self._cancel_drain_timer()
        self.transport.resume_reading()
        self._answer()

    def _not_drained(self) -> None:
        self._drain_timer = None
        size = self.transport.get_write_buffer_size()
        log.warning("control client dropped: %d bytes of replies unread for %g s", size, self.drain_timeout)
        self.transport.abort()

    def _cancel_drain_timer(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_drain_timer()
        self.pending.clear()


class RpcServer:
    """Serves a :class:`Dispatcher` on a Unix socket on the running loop."""

    def __init__(self, dispatcher: Dispatcher, path: str, *, mode: int = 0o600, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        self.dispatcher = dispatcher
        self.path = path
        self.mode = mode
        self.drain_timeout = drain_timeout
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        sock = listen_unix(self.path, self.mode, backlog=8)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self.dispatcher, self.drain_timeout), sock=sock)
        log.info("control socket %s (mode %o)", self.path, self.mode)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class RpcClient:
    """A blocking client: ``client.call("method", key=value)`` returns the result or raises
    :class:`~nvme_emu.jsonrpc.RpcError`."""

    def __init__(self, path: str, *, timeout: float = CLIENT_TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self._ids = itertools.count(1)
        self._buffer = LineBuffer()
        self._lines: list[bytes] = []

    def call(self, method: str, **params: Any) -> Any:
        request_id = next(self._ids)
        self.sock.sendall(encode_request(request_id, method, params))
        return decode_response(self._next_line(), request_id)

    def _next_line(self) -> bytes:
        while not self._lines:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("control socket closed by the server")
            self._lines.extend(self._buffer.feed(data))
        return self._lines.pop(0)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RpcClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
