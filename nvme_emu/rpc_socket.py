"""JSON-RPC over a Unix socket: the asyncio server (on the device's own event loop) and a
small blocking client. Generic; the messages are :mod:`nvme_emu.jsonrpc`'s.

The socket never exists with wider permissions than asked (the same listener as the
vfio-user socket's), owner-only by default: whoever can connect can remove namespaces and
break the device on purpose.
"""

from __future__ import annotations

import asyncio
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


class _Connection(asyncio.Protocol):
    """One client: lines in, each answered in order (methods are synchronous)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.buffer = LineBuffer()
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            lines = self.buffer.feed(data)
        except RpcError as e:
            log.warning("control client dropped: %s", e)
            self.transport.close()
            return
        for line in lines:
            response = self.dispatcher.handle(line)
            if response is not None:
                self.transport.write(response)


class RpcServer:
    """Serves a :class:`Dispatcher` on a Unix socket on the running loop."""

    def __init__(self, dispatcher: Dispatcher, path: str, *, mode: int = 0o600) -> None:
        self.dispatcher = dispatcher
        self.path = path
        self.mode = mode
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        sock = listen_unix(self.path, self.mode, backlog=8)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self.dispatcher), sock=sock)
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
