"""The asyncio transport of the server: a Unix socket, one client at a time.

Everything protocol-shaped happens in :mod:`vfio_user.session` and :mod:`vfio_user.protocol`;
this module only moves bytes and fds. Requests are handled synchronously in arrival order, so
a posted write is always applied before a later read. While the device waits for one of its
own DMA_READ/DMA_WRITE requests, the reader keeps serving the client's requests (QEMU would
otherwise deadlock, vfio-user-protocol.md §2.11).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import logging
import os
import socket
from typing import Callable

from . import dma_guard
from . import messages as m
from .client_watch import ACCEPT_RETRY, DEFAULT_DMA_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT, StallTimer, client_timeout, peer_credentials
from .constants import Command
from .device import Device, DeviceContext
from .dma import DmaError, GuestMemory
from .protocol import Connection, FatalProtocolError, Message, Rejected, close_fds
from .resources import dma_map_budget
from .server_api import ServerBackend
from .session import Reply, ServerLimits, ServerSession
from .unix import listen_unix, recv_chunk_checked, remove_stale_socket, send_message

log = logging.getLogger(__name__)

#: Replies queued for a client that does not read them: above this, stop reading its requests
#: until it catches up (otherwise a client that never reads grows the server without bound).
OUT_HIGH_WATER = 8 << 20


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (faster wake-ups and socket calls), else the stdlib loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ClientConnection:
    """The live connection to one client: transport for a :class:`ServerSession`."""

    def __init__(self, server: "Server", sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.session = ServerSession(server.device, server.limits)
        self.conn = Connection(max_data_xfer=server.limits.max_data_xfer, max_msg_fds=server.limits.max_msg_fds)
        self.memory = GuestMemory(self.session.dma, remote=self)
        self.closed: asyncio.Future[str] = self.loop.create_future()
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._out: list[tuple[memoryview, list[int]]] = []
        self._out_bytes = 0
        self._backlog: collections.deque[Message | Rejected] = collections.deque()
        self._paused = False
        self.peer = peer_credentials(sock.fileno())
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._stall = StallTimer(
            self.loop,
            server.handshake_timeout,
            in_message=lambda: not self.closed.done() and self.conn.partial,
            held_by_us=lambda: self._paused,
            on_stall=self.close,
        )

    def start(self) -> None:
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._readable)
        if self.server.handshake_timeout is not None:
            self._handshake_timer = self.loop.call_later(self.server.handshake_timeout, self._handshake_expired)
        self.session.irqs.resample_watch = self._watch_resample
        ctx = DeviceContext(memory=self.memory, irqs=self.session.irqs, loop=self.loop)
        self.server.device.attached(ctx)

    def _watch_resample(self, old: int | None, new: int | None) -> None:
        """INTx resample eventfd (KVM irqfd bypass): the guest's EOI arrives there, not as UNMASK.

        The new fd is watched before the old one is dropped: if the loop refuses it (raises),
        nothing changed and the old one is still watched."""
        if new is not None:
            try:
                self.loop.add_reader(new, self._resampled, new)
            except BaseException:
                self._forget_reader(new)
                raise
        if old is not None:
            self.loop.remove_reader(old)

    def _forget_reader(self, fd: int) -> None:
        """After a failed add_reader: drop whatever the loop may have half-registered."""
        try:
            self.loop.remove_reader(fd)
        except (OSError, ValueError, KeyError):
            pass

    def _resampled(self, fd: int) -> None:
        try:
            os.read(fd, 8)
        except OSError:
            pass
        self.session.irqs.resampled()

    # -- timeouts: the one client slot is not held by a client that never speaks ----------

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if not self.closed.done() and not self.session.negotiated:
            self.close(f"no VERSION within {self.server.handshake_timeout:g} s")

    # -- receiving -------------------------------------------------------------------

    def _readable(self) -> None:
        if self._drain_backlog():
            return
        for _ in range(64):  # bounded, so DMA replies and other fds get their turn
            if self._paused or self.closed.done():
                return
            try:
                data, fds, lost = recv_chunk_checked(self.sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.close(f"receive failed: {e}")
                return
            if not data:
                close_fds(fds)
                self.close("client disconnected")
                return
            try:
                events = self.conn.receive(data, fds, fds_lost=lost)
            except FatalProtocolError as e:
                self.close(f"protocol error: {e}")
                return
            if self.conn.partial:
                self._stall.progress()  # a stopped client is dropped handshake_timeout after this
            self._backlog.extend(events)
            if self._drain_backlog():
                return

    def _drain_backlog(self) -> bool:
        """Dispatch received events in order until too many replies wait; True when paused."""
        while self._backlog:
            if self.closed.done():
                for event in self._backlog:
                    if isinstance(event, Message):
                        event.close_fds()
                self._backlog.clear()
                return True
            if self._out_bytes > OUT_HIGH_WATER:
                if not self._paused:
                    self._paused = True
                    self.loop.remove_reader(self.sock.fileno())
                return True
            self._dispatch(self._backlog.popleft())
        return False

    def _dispatch(self, event: Message | Rejected) -> None:
        if isinstance(event, Rejected):
            log.warning("message id %d command %d rejected: %s", event.msg_id, event.command, event.reason)
            if not event.is_reply and not event.no_reply:
                self._send(Reply(Connection.error_reply(event, event.errno)))
            return
        if event.is_reply:
            fut = self._pending.pop(event.msg_id, None)
            event.close_fds()
            if fut is not None and not fut.done():
                fut.set_result(event)
            return
        reply = self.session.handle(event)
        if reply is not None:
            self._send(reply)

    # -- sending ---------------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        if self.closed.done():
            return
        if self._out:
            self._out.append((memoryview(reply.data), reply.fds))
            self._out_bytes += len(reply.data)
            return
        try:
            n = send_message(self.sock, reply.data, reply.fds)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self.close(f"send failed: {e}")
            return
        if n < len(reply.data):
            # fds went with the first byte; only unsent bytes (and unsent fds) are queued
            self._out.append((memoryview(reply.data)[n:], [] if n else reply.fds))
            self._out_bytes += len(reply.data) - n
            self.loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        while self._out:
            data, fds = self._out[0]
            try:
                n = send_message(self.sock, bytes(data), fds)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.close(f"send failed: {e}")
                return
            self._out_bytes -= n
            if n < len(data):
                self._out[0] = (data[n:], [])
                return
            self._out.pop(0)
        self.loop.remove_writer(self.sock.fileno())
        if self._paused and not self.closed.done():  # caught up: read (and serve) again
            self._paused = False
            self.loop.add_reader(self.sock.fileno(), self._readable)
            self.loop.call_soon(self._readable)

    # -- requests to the client (RemoteDma) ------------------------------------------

    async def _request(self, command: Command, payload: bytes) -> Message:
        msg_id, data = self.conn.request(command, payload)
        fut: asyncio.Future[Message] = self.loop.create_future()
        self._pending[msg_id] = fut
        self._send(Reply(data))
        try:
            reply = await asyncio.wait_for(fut, self.server.dma_timeout)
        except asyncio.TimeoutError:
            self.conn.forget(msg_id)
            raise DmaError(errno.ETIMEDOUT, f"client did not answer {command.name}") from None
        finally:
            self._pending.pop(msg_id, None)
        if reply.is_error:
            raise DmaError(reply.error_no or errno.EIO, f"client refused {command.name}: {os.strerror(reply.error_no or errno.EIO)}")
        return reply

    def _chunks(self, iova: int, length: int):
        step = max(1, self.session.client_max_data_xfer)
        for off in range(0, length, step):
            yield iova + off, min(step, length - off), off

    async def dma_read(self, iova: int, length: int) -> bytes:
        out = bytearray()
        for addr, n, _off in self._chunks(iova, length):
            reply = await self._request(Command.DMA_READ, m.DMA_ACCESS.pack(addr, n))
            if len(reply.payload) < m.DMA_ACCESS.size:
                raise DmaError(errno.EIO, "short DMA_READ reply")
            addr_r, count = m.DMA_ACCESS.unpack_from(reply.payload)
            data = reply.payload[m.DMA_ACCESS.size :]
            if addr_r != addr or count != n or len(data) != n:
                raise DmaError(errno.EIO, "malformed DMA_READ reply")
            out += data
        return bytes(out)

    async def dma_write(self, iova: int, data: bytes) -> None:
        for addr, n, off in self._chunks(iova, len(data)):
            await self._request(Command.DMA_WRITE, m.DMA_ACCESS.pack(addr, n) + data[off : off + n])

    # -- teardown --------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Drop the client: release its fds and mappings; the device keeps its state."""
        if self.closed.done():
            return
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._stall.cancel()
        fileno = self.sock.fileno()
        if fileno >= 0:
            self.loop.remove_reader(fileno)
            self.loop.remove_writer(fileno)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(DmaError(errno.ENOTCONN, "client disconnected"))
        self._pending.clear()
        self._out.clear()
        self._out_bytes = 0
        for event in self._backlog:
            if isinstance(event, Message):
                event.close_fds()
        self._backlog.clear()
        self.conn.close()
        try:
            self.server.device.detached()
        finally:
            self.session.close()
            self.sock.close()
            self.closed.set_result(reason)


class Server:
    """Serves one device on a Unix socket path; one client at a time, then the next."""

    backend = ServerBackend.PYTHON

    def __init__(
        self,
        device: Device,
        path: str,
        *,
        limits: ServerLimits | None = None,
        mode: int = 0o600,
        dma_timeout: float = DEFAULT_DMA_TIMEOUT,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        on_connect: Callable[[ClientConnection], None] | None = None,
        on_disconnect: Callable[[ClientConnection, str], None] | None = None,
        dma_unsealed: bool = False,
    ) -> None:
        self.device = device
        self.path = path
        self.limits = limits or ServerLimits()
        if dma_unsealed:
            self.limits = dataclasses.replace(self.limits, dma_unsealed=True)
        self.mode = mode
        self.dma_timeout = dma_timeout
        self.handshake_timeout = client_timeout(handshake_timeout)
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.client: ClientConnection | None = None
        self.clients_served = 0
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind and listen; the socket exists when this returns (QEMU never retries).

        The advertised ``max_dma_maps`` is cut to what the process can hold now that the
        device is built (each map costs an fd and a memory-map entry)."""
        budget = dma_map_budget(self.limits.max_dma_maps, sum(self.device.irq_counts.values()))
        self.limits = dataclasses.replace(self.limits, max_dma_maps=budget)
        dma_guard.ensure_ready()  # a missing compiler is reported now, not at the first DMA_MAP
        self._listener = listen_unix(self.path, self.mode)
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())
        log.info("listening on %s (mode %o)", self.path, self.mode)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except OSError as e:  # EMFILE/ENFILE/ENOBUFS: keep listening, try again shortly
                log.error("accept failed: %s", e)
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            if self.client is not None and not self.client.closed.done():
                log.warning("refused a second client (pid/uid/gid %s): one is attached", peer_credentials(sock.fileno()))
                sock.close()
                continue
            self._start_client(sock)

    def _start_client(self, sock: socket.socket) -> None:
        client = ClientConnection(self, sock)
        self.client = client
        self.clients_served += 1
        log.info("client connected (pid/uid/gid %s)", client.peer)
        client.start()
        if self.on_connect is not None:
            self.on_connect(client)
        client.closed.add_done_callback(lambda fut: self._client_gone(client, fut.result()))

    def _client_gone(self, client: ClientConnection, reason: str) -> None:
        log.info("client gone: %s", reason)
        if self.on_disconnect is not None:
            self.on_disconnect(client, reason)

    async def serve_forever(self) -> None:
        if self._listener is None:
            await self.start()
        assert self._accept_task is not None
        await self._accept_task

    def close(self) -> None:
        """Stop listening, drop the client, remove the socket path."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            self._accept_task = None
        if self.client is not None:
            self.client.close("server shutting down")
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            remove_stale_socket(self.path)
